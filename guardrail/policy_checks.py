"""Checks of a loaded policy beyond its schema: plugin names and parameters against the
registry, references between sections, artifacts not there yet; and ``validate_policy_file``,
which reports schema and plugin problems of a file in one pass (``guardrail validate``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import ValidationError

from guardrail.defaults import DEFAULT_COMPONENTS
from guardrail.errors import GuardrailError, PluginError, PolicyError
from guardrail.policy import (
    EnergyModelSpec,
    GateMemberSpec,
    PluginSpec,
    Policy,
    RailSpec,
    format_validation_error,
    is_file,
    load_raw,
    parse_policy,
    shown,
)
from guardrail.shipped import resolve_policy


def check_plugins(policy: Policy, registry: Any) -> list[str]:
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
    return problems


def _check_spec(
    registry: Any, kind: str, plugin: str, params: dict[str, Any], where: str
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


def check_plugin_sections(data: dict[str, Any], registry: Any) -> list[str]:
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
        if artifact is not None and _exists(Path(artifact)) and not is_file(Path(artifact)):
            what = "a directory" if Path(artifact).is_dir() else "not a regular file"
            problems.append(f"rails[{i}].energy_model.artifact: {artifact} is {what}; "
                            "expected an artifact file (.safetensors)")
    return problems


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def missing_artifacts(policy: Policy, registry: Any = None) -> list[str]:
    """Artifacts a policy names that do not exist yet, each with the command that writes it.

    The command is the energy model's ``artifact_command`` (looked up in ``registry``), else
    ``guardrail train`` from the policy's ``training:`` section.
    """
    where = policy.path or "<policy>"
    installed = _ships_installed(policy)
    if installed:
        # Its folder is inside the installed package: no place to write an artifact.
        where = "my-policy.yaml"
    notes = []
    for i, rail in enumerate(policy.rails):
        energy = rail.energy_model
        if energy is None or energy.artifact is None or _exists(Path(energy.artifact)):
            continue
        artifact = energy.artifact
        command = _artifact_command(registry, energy.plugin)
        if command is not None:
            how = f"compute it with `{command.format(policy=where)}`"
        elif policy.training is None:
            how = "train it with `guardrail train` from a policy with a `training:` section"
        else:
            how = f"train it with `guardrail train --policy {where}`"
        if installed:
            how = (f"this policy ships inside the installed package, so make one of your own "
                   f"first: `guardrail policy init my-policy.yaml --extends {policy.name}`, set "
                   f"its rails[{i}] (name {rail.name!r}) energy_model.artifact to a file of "
                   f"yours, then {how}")
        notes.append(f"rails[{i}].energy_model.artifact: {artifact} does not exist yet; {how}")
    return notes


def _ships_installed(policy: Policy) -> bool:
    """Whether ``policy`` is a shipped policy file of an installed wheel (not a checkout)."""
    from guardrail.shipped import is_checkout, policies_dir

    if policy.path is None:
        return False
    try:
        folder = policies_dir().resolve()
        return policy.path.resolve().parent == folder and not is_checkout()
    except (GuardrailError, OSError):
        return False


def _artifact_command(registry: Any, plugin: str) -> str | None:
    if registry is None:
        return None
    try:
        command: str | None = registry.get("energy_model", plugin).attribute("artifact_command")
    except PluginError:
        return None  # validation reports the unknown plugin
    return command


def _steers_states(registry: Any, rail: RailSpec) -> bool:
    """Whether the rail moves hidden states (it has, or its steerer needs, an energy model)."""
    if rail.energy_model is not None:
        return True
    return _is_registered(registry, rail) and bool(
        registry.get("steerer", rail.steerer.plugin).cls.requires_energy_model)


def _is_registered(registry: Any, rail: RailSpec) -> bool:
    try:
        registry.get("steerer", rail.steerer.plugin)
    except PluginError:
        return False
    return True


def validate_policy_file(path: str | Path, registry: Any) -> Policy:
    """Schema, plugin and reference checks; raise one :class:`PolicyError` with every problem.

    A file the schema rejects still has its plugin sections checked, so one run reports
    both kinds of problem.
    """
    resolved = resolve_policy(path).resolve()
    data = load_raw(resolved)
    try:
        policy = parse_policy(data, resolved)
    except PolicyError as exc:
        raise PolicyError(exc.path, exc.problems + check_plugin_sections(data, registry)) from None
    problems = check_plugins(policy, registry) + check_references(policy)
    if problems:
        raise PolicyError(str(policy.path or path), problems)
    return policy
