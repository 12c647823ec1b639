"""Policy files: what a guardrail is built from.

- :mod:`~guardrail.policy.files`: reading a file safely (size, nesting, aliases, encoding);
- :mod:`~guardrail.policy.model`: the schema (pydantic, unknown keys rejected), environment
  variables and paths, :func:`load_policy`; :mod:`~guardrail.policy.extends`: a child policy
  merged over its parent;
- :mod:`~guardrail.policy.training`: the ``training:`` and ``calibration:`` sections;
  :mod:`~guardrail.policy.tuning`: calibration grids keyed by a steerer's tunable parameters;
- :mod:`~guardrail.policy.checks`: plugin, range and reference checks beyond the schema;
  :mod:`~guardrail.policy.artifacts`: the artifacts a policy names, and a file's whole check;
- :mod:`~guardrail.policy.json_schema`: the exported JSON Schema;
- :mod:`~guardrail.policy.shipped`: the shipped policies and artifacts, by name.
"""

from guardrail.policy.model import Policy, RailSpec, load_policy, parse_policy

__all__ = ["Policy", "RailSpec", "load_policy", "parse_policy"]
