"""A policy's artifacts: each rail's artifact found and checked against the rail (layers, energy
model, gate, calibration), the calibrated values a rail takes from it, the command that writes a
missing one; and :func:`validate_policy_file`, every check of a policy file, artifacts included.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from guardrail.artifact.file import ArtifactFile, read_artifact
from guardrail.artifact.header import Calibration
from guardrail.errors import ArtifactError, GuardrailError, PluginError, PolicyError
from guardrail.policy.checks import (
    canonical,
    check_plugin_sections,
    check_plugins,
    check_references,
    field_line,
    path_exists,
    spec_problems,
)
from guardrail.policy.files import resolved
from guardrail.policy.model import (
    PluginSpec,
    Policy,
    RailSpec,
    format_validation_error,
    is_file,
    load_raw,
    parse_policy,
)
from guardrail.policy.shipped import resolve_policy

if TYPE_CHECKING:
    from guardrail.plugin.registry import Registry


def check_artifacts(policy: Policy, registry: Registry, *, load: bool = True) -> list[str]:
    """Every artifact the policy names that exists, checked as a run would use it, without
    loading the model: the header and tensor table; the policy's layers, gate members and
    ``auto`` thresholds against it; calibrated steerer values against the rail's steerer
    and gate member params against their plugins. With ``load`` (and no problem so far),
    the artifact is then loaded: energy models rebuilt, weights checked, the gate's members
    rebuilt and the files they name resolved (this imports torch)."""
    problems: list[str] = []
    for i, rail in enumerate(policy.rails):
        energy = rail.energy_model
        if energy is None or energy.artifact is None or not is_file(Path(energy.artifact)):
            continue
        key = f"rails[{i}].energy_model.artifact"
        try:
            found = read_artifact(energy.artifact)
        except ArtifactError as exc:
            problems.append(f"{key}: {exc}")
            continue
        own = _rail_artifact_problems(rail, found, registry, f"rails[{i}]", energy.artifact)
        problems += own
        if load and not own:
            from guardrail.artifact.energy import EnergyArtifact

            try:
                EnergyArtifact.load(energy.artifact, registry)
            except GuardrailError as exc:
                problems.append(f"{key}: {exc}")
    return problems


def _rail_artifact_problems(rail: RailSpec, found: ArtifactFile, registry: Registry, key: str,
                            artifact: str) -> list[str]:
    header = found.header
    problems = []
    stored = sorted({layer for entry in header.sets().values() for layer in entry.layers})
    if rail.layers != "auto":
        missing = [layer for layer in rail.layers if layer not in stored]
        if missing:
            problems.append(f"{key}.layers: {missing} are not in the artifact {artifact} (it "
                            f"has {stored})")
    if header.format != "guardrail-energy/1" and rail.gate is None:
        problems.append(f"{key}.gate: missing; the artifact {artifact} holds one energy-model "
                        f"set per gate side ({', '.join(header.sets())}), and only a gate can "
                        "choose the side a prompt is steered towards")
    calibration = header.calibration
    if calibration is not None and calibration.rail not in (None, rail.name):
        calibration = None
    if rail.gate is not None:
        if header.gate is None:
            problems.append(f"{key}.gate: the artifact {artifact} has no fitted gate; retrain "
                            "it with `guardrail train` from this policy")
        else:
            wanted = [canonical(registry, "gate", m.plugin) for m in rail.gate.members]
            stored_members = [canonical(registry, "gate", m.plugin)
                              for m in header.gate.members]
            if wanted != stored_members:
                problems.append(f"{key}.gate.members: the policy names {wanted} but the "
                                f"artifact {artifact} was fitted with {stored_members}; "
                                "retrain it")
            for j, member in enumerate(header.gate.members):
                problems += [f"{key}.energy_model.artifact: {artifact}: {line}" for line in
                             spec_problems(registry, "gate", member.plugin, member.params,
                                            f"gate.members[{j}].")]
        for side in ("below", "above"):
            if getattr(rail.gate, side) == "auto" and (
                    calibration is None or calibration.gate is None):
                problems.append(f"{key}.gate.{side}: 'auto' takes the threshold `guardrail "
                                f"calibrate` stores in the artifact, and {artifact} has none; "
                                "run `guardrail calibrate` or give a number")
    if calibration is not None:
        sides: tuple[str | None, ...] = (None, "answer", "refuse")
        for part in sides:
            try:
                calibrated_spec(rail.steerer, calibration, part, registry, artifact)
            except ArtifactError as exc:
                problems.append(f"{key}.energy_model.artifact: {exc}")
    return problems


def calibrated_for(calibrated: Calibration | None, steerer: str, registry: Registry) -> bool:
    """Whether ``calibrated`` holds steerer values for the steerer plugin ``steerer`` (a name
    or alias); a calibration that does not say which steerer it tuned is taken as the rail's."""
    if calibrated is None:
        return False
    return calibrated.steerer_plugin in (None, steerer, canonical(registry, "steerer", steerer))


def calibrated_spec(spec: PluginSpec, calibrated: Calibration | None, side: str | None,
                    registry: Registry, artifact: str) -> PluginSpec:
    """``spec`` with the steerer values calibration stored (shared, or ``side``'s) filled in;
    the policy's own win; none when calibration chose them for another steerer plugin.
    Values the steerer's ``Params`` refuse are an :class:`ArtifactError` naming the artifact
    and the header field."""
    found = calibrated_for(calibrated, spec.plugin, registry)
    values = calibrated.steerer_values(side) if found and calibrated is not None else {}
    if not values:
        return spec
    merged = spec.model_copy(update={"params": {**values, **spec.params}})
    try:
        registry.params("steerer", spec.plugin, merged.params)
    except ValidationError as exc:
        field = ("metadata.calibration.steerer" if side is None
                 else f"metadata.calibration.sides.{side}.steerer")
        problems = [field_line(line) for line in format_validation_error(exc, prefix=field)
                    if line.split(":")[0].removeprefix(field + ".").split(".")[0] in values]
        if problems:
            raise ArtifactError(f"{artifact}: " + "; ".join(problems)
                                + f" (values for steerer {spec.plugin!r})") from None
    except PluginError:
        pass  # an unknown steerer: check_plugins reports it
    return merged


def missing_artifacts(policy: Policy, registry: Registry | None = None) -> list[str]:
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
        if energy is None or energy.artifact is None or path_exists(Path(energy.artifact)):
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
    from guardrail.policy.shipped import is_checkout, policies_dir

    if policy.path is None:
        return False
    try:
        folder = policies_dir().resolve()
        return policy.path.resolve().parent == folder and not is_checkout()
    except (GuardrailError, OSError):
        return False


def _artifact_command(registry: Registry | None, plugin: str) -> str | None:
    if registry is None:
        return None
    try:
        command: str | None = registry.get("energy_model", plugin).attribute("artifact_command")
    except PluginError:
        return None  # validation reports the unknown plugin
    return command


def validate_policy_file(path: str | Path, registry: Registry) -> Policy:
    """Schema, plugin and reference checks; raise one :class:`PolicyError` with every problem.

    A file the schema rejects still has its plugin sections checked, so one run reports
    both kinds of problem.
    """
    found = resolved(resolve_policy(path))
    data = load_raw(found)
    try:
        policy = parse_policy(data, found)
    except PolicyError as exc:
        raise PolicyError(exc.path, exc.problems + check_plugin_sections(data, registry)) from None
    problems = check_plugins(policy, registry) + check_references(policy)
    if not problems:
        problems = check_artifacts(policy, registry)
    if problems:
        raise PolicyError(str(policy.path or path), problems)
    return policy
