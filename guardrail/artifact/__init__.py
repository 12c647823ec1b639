"""Energy artifacts: what ``guardrail train`` writes and a rail steers with.

- :mod:`~guardrail.artifact.safetensors`: a safetensors file's header, read without torch;
- :mod:`~guardrail.artifact.header`: the artifact's header checked field by field (both formats,
  gate, calibration);
- :mod:`~guardrail.artifact.energy`: :class:`EnergyArtifact`, the per-layer (per gate side)
  energy models, saved and loaded (torch);
- :mod:`~guardrail.artifact.digest`: the digest caches key on.
"""
