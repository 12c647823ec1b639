"""The shipped policy files: package data of ``guardrail`` (``guardrail.policies`` once
installed). Policies are YAML; ``guardrail policy list`` lists them."""
