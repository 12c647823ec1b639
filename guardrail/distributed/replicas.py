"""Model replicas on a worker: each policy's guardrail built once, each model loaded once.

Workers build what they need from the policy they are sent (a validated
:class:`~guardrail.policy.model.Policy`, picklable), never from a pickled model; policies on the
same model source, device and dtype (a calibration's grid points, an evaluation's
contenders) share one load, as ``guardrail eval`` shares it in one process.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from guardrail.policy.model import Policy

_models: dict[tuple[str, str, str], Any] = {}


def policy_digest(policy: Policy, device: str | None) -> str:
    """What identifies a replica: the policy as validated (its file too) and the device."""
    payload = {"policy": policy.model_dump(mode="json"), "path": str(policy.path),
               "device": device}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def guardrail_for(policy: Policy, device: str | None) -> Any:
    """A :class:`~guardrail.steering.guard.Guardrail` for ``policy`` on ``device`` (None: the
    policy's), its model shared with every other policy on the same model."""
    from guardrail.models import load_model
    from guardrail.steering.guard import Guardrail

    key = (policy.model.source, device or policy.model.device, policy.model.dtype)
    if key not in _models:
        _models[key] = load_model(key[0], device=key[1], dtype=key[2])
    return Guardrail.from_policy(policy, loaded=_models[key])
