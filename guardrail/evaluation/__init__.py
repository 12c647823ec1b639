"""Evaluation: suites, refusal/compliance metrics, answer quality, KL guard, reports, sweeps."""
