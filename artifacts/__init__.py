"""The shipped energy-model artifacts: package data of ``guardrail`` (``guardrail.artifacts``
once installed), next to the shipped policies so their ``../artifacts/...`` paths resolve."""
