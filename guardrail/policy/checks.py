"""Checks of a loaded policy beyond its schema: plugin names and parameters against the
registry, value ranges the runtime needs (seeds, devices, layer indices), references between
sections, the artifacts it names (header, tensor table, gate and calibration, then a load),
artifacts not there yet; and ``validate_policy_file``, which reports schema, plugin and
artifact problems of a file in one pass (``guardrail validate``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from guardrail.artifact.file import ArtifactFile, read_artifact
from guardrail.artifact.header import MAX_LAYERS, Calibration
from guardrail.errors import ArtifactError, GuardrailError, PluginError, PolicyError
from guardrail.plugin.components import Steerer
from guardrail.plugin.defaults import DEFAULT_COMPONENTS
from guardrail.policy.files import resolved
from guardrail.policy.model import (
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
from guardrail.policy.shipped import resolve_policy
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
        if artifact is not None and _exists(Path(artifact)) and not is_file(Path(artifact)):
            what = "a directory" if Path(artifact).is_dir() else "not a regular file"
            problems.append(f"rails[{i}].energy_model.artifact: {artifact} is {what}; "
                            "expected an artifact file (.safetensors)")
    return problems


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
            wanted = [_canonical(registry, "gate", m.plugin) for m in rail.gate.members]
            stored_members = [_canonical(registry, "gate", m.plugin)
                              for m in header.gate.members]
            if wanted != stored_members:
                problems.append(f"{key}.gate.members: the policy names {wanted} but the "
                                f"artifact {artifact} was fitted with {stored_members}; "
                                "retrain it")
            for j, member in enumerate(header.gate.members):
                problems += [f"{key}.energy_model.artifact: {artifact}: {line}" for line in
                             _spec_problems(registry, "gate", member.plugin, member.params,
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
    return calibrated.steerer_plugin in (None, steerer, _canonical(registry, "steerer", steerer))


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
        problems = [_field_line(line) for line in format_validation_error(exc, prefix=field)
                    if line.split(":")[0].removeprefix(field + ".").split(".")[0] in values]
        if problems:
            raise ArtifactError(f"{artifact}: " + "; ".join(problems)
                                + f" (values for steerer {spec.plugin!r})") from None
    except PluginError:
        pass  # an unknown steerer: check_plugins reports it
    return merged


def _field_line(line: str, prefix: str = "") -> str:
    """``path: got X; expected input should be Y`` as ``header field 'path': got X; expected
    Y``."""
    path, _, rest = line.partition(": ")
    rest = rest.replace("expected input should be ", "expected ")
    return f"header field '{prefix}{path}': {rest}"


def _spec_problems(registry: Registry, kind: str, plugin: str, params: dict[str, Any],
                   prefix: str) -> list[str]:
    """``header field 'PREFIX.params.KEY': ...`` lines for params the ``Params`` refuse."""
    try:
        registry.params(kind, plugin, params)
    except PluginError as exc:
        return [f"header field '{prefix}plugin': {exc}"]
    except ValidationError as exc:
        return [_field_line(line, prefix) for line in
                format_validation_error(exc, prefix="params")]
    return []


def _canonical(registry: Registry, kind: str, name: str) -> str:
    try:
        return str(registry.get(kind, name).name)
    except PluginError:
        return name


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


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
