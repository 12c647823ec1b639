"""Checks of a loaded policy beyond its schema: plugin names and parameters against the
registry (calibration grids against the steerer's tunable parameters included), value ranges
the runtime needs (seeds, devices, layer indices) and references between sections. The
artifacts a policy names are checked by :mod:`guardrail.policy.artifacts`."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from guardrail.artifact.header import MAX_LAYERS
from guardrail.errors import PluginError
from guardrail.plugin.components import Steerer
from guardrail.plugin.defaults import DEFAULT_COMPONENTS
from guardrail.policy.model import (
    EnergyModelSpec,
    GateMemberSpec,
    PluginSpec,
    Policy,
    RailSpec,
    format_validation_error,
    is_file,
    shown,
)
from guardrail.policy.tuning import calibration_grid_problems

if TYPE_CHECKING:
    from guardrail.plugin.registry import Registry


def check_plugins(policy: Policy, registry: Registry) -> list[str]:
    """Check plugin names and their parameters against the registry; return problems."""
    problems: list[str] = []

    def check(kind: str, spec: PluginSpec | EnergyModelSpec | GateMemberSpec, where: str
              ) -> None:
        problems.extend(_check_spec(registry, kind, spec.plugin, spec.params, where))

    for i, rail in enumerate(policy.rails):
        where = f"rails[{i}]"
        check("activation_source", rail.activation_source, f"{where}.activation_source")
        check("steerer", rail.steerer, f"{where}.steerer")
        if rail.energy_model is not None:
            check("energy_model", rail.energy_model, f"{where}.energy_model")
        elif (
            _is_registered(registry, rail)
            and registry.get("steerer", rail.steerer.plugin).attribute("requires_energy_model")
        ):
            problems.append(
                f"{where}.energy_model: missing; steerer {rail.steerer.plugin!r} needs one"
            )
        if rail.gate is not None:
            for j, member in enumerate(rail.gate.members):
                check("gate", member, f"{where}.gate.members[{j}]")
            if rail.energy_model is None:
                problems.append(f"{where}.gate: a gate is fitted into the rail's energy-model "
                                "artifact; give the rail an energy_model")
        if rail.layers != "auto" and any(layer < 0 for layer in rail.layers):
            problems.append(f"{where}.layers: got {shown(rail.layers)}; expected layer "
                            "indices >= 0")
        if rail.layers == [] and _steers_states(registry, rail):
            problems.append(f"{where}.layers: got []; expected 'auto' or at least one layer "
                            "index (only a prompt-only steerer may have no layers)")
    names = [rail.name for rail in policy.rails]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"rails: name {name!r} is used twice; rail names must be unique")
    check("refusal_classifier", policy.classifier, "classifier")
    for i, spec in enumerate(policy.output_rails):
        check("output_rail", spec, f"output_rails[{i}]")
    return problems + check_ranges(policy) + calibration_grid_problems(policy, registry)


#: What torch accepts as a seed (``torch.manual_seed``).
SEED_RANGE = (-(2**63), 2**64 - 1)
#: Devices a policy may name (``meta`` and the like load a model that cannot generate).
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:[0-9]{1,3})?")
DEVICES = "'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'"


def seed_problem(value: Any) -> str | None:
    """Why ``value`` is not a seed torch accepts (None: it is one)."""
    if isinstance(value, int) and not isinstance(value, bool) \
            and SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        return None
    return f"got {shown(value)}; expected an integer from -2**63 to 2**64-1"


def device_problem(value: Any) -> str | None:
    """Why ``value`` is not a device a policy or flag may name (None: it is one)."""
    if isinstance(value, str) and DEVICE_PATTERN.fullmatch(value):
        return None
    return f"got {shown(value)}; expected {DEVICES}"


def check_ranges(policy: Policy) -> list[str]:
    """Values the schema types allow but the runtime cannot use: seeds beyond torch's range,
    devices that cannot generate, layer indices no model has."""
    problems = []
    if policy.generation.seed is not None and (why := seed_problem(policy.generation.seed)):
        problems.append(f"generation.seed: {why}")
    if policy.training is not None and (why := seed_problem(policy.training.seed)):
        problems.append(f"training.seed: {why}")
    if why := device_problem(policy.model.device):
        problems.append(f"model.device: {why}")
    for i, rail in enumerate(policy.rails):
        if rail.layers != "auto":
            beyond = [layer for layer in rail.layers if layer >= MAX_LAYERS]
            if beyond:
                problems.append(f"rails[{i}].layers: got {shown(beyond)}; expected layer "
                                f"indices under {MAX_LAYERS} (no model has more layers)")
    return problems


def _check_spec(
    registry: Registry, kind: str, plugin: str, params: dict[str, Any], where: str
) -> list[str]:
    """The problems of one ``{plugin, params}`` section: an unknown name, or bad params."""
    try:
        registry.get(kind, plugin)
    except PluginError as exc:
        return [f"{where}.plugin: got {plugin!r}; {exc}"]
    try:
        registry.params(kind, plugin, params)
    except ValidationError as exc:
        return format_validation_error(exc, prefix=f"{where}.params")
    return []


_RAIL_SPECS = (
    ("activation_source", "activation_source"), ("steerer", "steerer"),
    ("energy_model", "energy_model"),
)


def check_plugin_sections(data: dict[str, Any], registry: Registry) -> list[str]:
    """Plugin names and params of a policy mapping the schema may reject elsewhere.

    What :func:`check_plugins` checks per section, for each section whose shape allows it,
    so that ``guardrail validate`` reports schema and plugin problems in one pass.
    """
    sections: list[tuple[str, Any, str]] = []
    rails = data.get("rails")
    for i, rail in enumerate(rails if isinstance(rails, list) else []):
        if isinstance(rail, dict):
            sections += [(kind, rail.get(key, {} if key != "energy_model" else None),
                          f"rails[{i}].{key}") for key, kind in _RAIL_SPECS]
            gate = rail.get("gate")
            members = gate.get("members") if isinstance(gate, dict) else None
            sections += [("gate", member, f"rails[{i}].gate.members[{j}]")
                         for j, member in enumerate(members if isinstance(members, list) else [])]
    sections.append(("refusal_classifier", data.get("classifier", {}), "classifier"))
    outputs = data.get("output_rails")
    sections += [("output_rail", spec, f"output_rails[{i}]")
                 for i, spec in enumerate(outputs if isinstance(outputs, list) else [])]
    problems: list[str] = []
    for kind, section, where in sections:
        if not isinstance(section, dict):
            continue
        plugin = section.get("plugin", DEFAULT_COMPONENTS.get(kind))
        params = section.get("params", {})
        if isinstance(plugin, str) and isinstance(params, dict):
            problems += _check_spec(registry, kind, plugin, params, where)
    return problems


def check_references(policy: Policy) -> list[str]:
    """What the schema cannot see: ``training.rail`` naming a rail with an energy model, and
    artifact paths that exist but are not files."""
    problems: list[str] = []
    trainable = [rail.name for rail in policy.rails if rail.energy_model is not None]
    if policy.training is not None and policy.training.rail is not None \
            and policy.training.rail not in trainable:
        problems.append(f"training.rail: got {shown(policy.training.rail)}; expected one of "
                        f"{trainable} (rails with an energy_model)")
    for i, rail in enumerate(policy.rails):
        artifact = rail.energy_model.artifact if rail.energy_model is not None else None
        if artifact is not None and path_exists(Path(artifact)) and not is_file(Path(artifact)):
            what = "a directory" if Path(artifact).is_dir() else "not a regular file"
            problems.append(f"rails[{i}].energy_model.artifact: {artifact} is {what}; "
                            "expected an artifact file (.safetensors)")
    return problems










def field_line(line: str, prefix: str = "") -> str:
    """``path: got X; expected input should be Y`` as ``header field 'path': got X; expected
    Y``."""
    path, _, rest = line.partition(": ")
    rest = rest.replace("expected input should be ", "expected ")
    return f"header field '{prefix}{path}': {rest}"


def spec_problems(registry: Registry, kind: str, plugin: str, params: dict[str, Any],
                   prefix: str) -> list[str]:
    """``header field 'PREFIX.params.KEY': ...`` lines for params the ``Params`` refuse."""
    try:
        registry.params(kind, plugin, params)
    except PluginError as exc:
        return [f"header field '{prefix}plugin': {exc}"]
    except ValidationError as exc:
        return [field_line(line, prefix) for line in
                format_validation_error(exc, prefix="params")]
    return []


def canonical(registry: Registry, kind: str, name: str) -> str:
    try:
        return str(registry.get(kind, name).name)
    except PluginError:
        return name


def path_exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False








def _steers_states(registry: Registry, rail: RailSpec) -> bool:
    """Whether the rail moves hidden states (it has, or its steerer needs, an energy model)."""
    if rail.energy_model is not None:
        return True
    if not _is_registered(registry, rail):
        return False
    steerer = registry.get("steerer", rail.steerer.plugin).cls
    return issubclass(steerer, Steerer) and steerer.requires_energy_model


def _is_registered(registry: Registry, rail: RailSpec) -> bool:
    try:
        registry.get("steerer", rail.steerer.plugin)
    except PluginError:
        return False
    return True


