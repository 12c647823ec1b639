"""Declarative policy files: schema (pydantic v2, unknown keys rejected), loading, ``extends``.

A policy names the model, generation defaults, an ordered list of steering rails and the
refusal classifier. Rails stack in order. Relative paths are resolved against the file that
defines them, after ``${VAR}`` / ``${VAR:-default}`` environment expansion (an unset ``${VAR}``
is an error; ``${VAR:-}`` allows empty). Files are read by :mod:`guardrail.policy_files`,
which bounds their size, nesting and alias expansion.

``extends: PARENT`` (a path, or a shipped policy's name) starts from the parent file:
mappings merge key by key, rails merge by ``name`` (:func:`merge_rails`), and every other
list or value replaces the parent's.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from guardrail.defaults import DEFAULT_COMPONENTS
from guardrail.errors import PluginError, PolicyError
from guardrail.policy_files import read_policy_file
from guardrail.shipped import resolve_policy, shipped_policy
from guardrail.training_config import CalibrationSection, TrainingSection


class StrictModel(BaseModel):
    """A policy section: unknown keys are errors, and so are NaN and infinite numbers."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ModelSection(StrictModel):
    """Which model to load and how."""

    source: str = Field(
        min_length=1,
        description="Packaged short name, local HF directory, .gguf file, or hub id (offline).",
    )
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    system_prompt: str | None = Field(
        None, description="Prepended as a system message when a conversation has none."
    )


class GenerationSection(StrictModel):
    """Defaults for generation; every call may override them."""

    max_new_tokens: int = Field(128, ge=1, le=32768)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0)
    batch_size: int = Field(8, ge=1)
    seed: int | None = None


class PluginSpec(StrictModel):
    """A plugin component by registered name, with parameters its ``Params`` model validates."""

    plugin: str
    params: dict[str, Any] = Field(default_factory=dict)


def _default(kind: str) -> Any:
    """A factory of the :class:`PluginSpec` naming the default component of ``kind``."""
    return lambda: PluginSpec(plugin=DEFAULT_COMPONENTS[kind])


def _default_plugins(data: Any, sections: dict[str, str]) -> Any:
    """Fill ``plugin`` of each ``{key: kind}`` section given without one with the default
    component of its kind (``steerer: {params: {eta: 0.5}}`` is the default steerer)."""
    if not isinstance(data, dict):
        return data
    filled = dict(data)
    for key, kind in sections.items():
        section = filled.get(key)
        if isinstance(section, dict) and "plugin" not in section:
            filled[key] = {"plugin": DEFAULT_COMPONENTS[kind], **section}
    return filled


class EnergyModelSpec(StrictModel):
    """The rail's energy model: plugin name, trained artifact, and build parameters."""

    plugin: str = DEFAULT_COMPONENTS["energy_model"]
    artifact: str | None = Field(
        None,
        min_length=1,
        description="Path of the trained artifact (.safetensors); relative to the policy file.",
    )
    params: dict[str, Any] = Field(default_factory=dict)


class GateMemberSpec(StrictModel):
    """One gate component scoring prompts for harm, and its weight in the rail's gate."""

    plugin: str
    params: dict[str, Any] = Field(default_factory=dict)
    weight: float = Field(1.0, gt=0, le=1000)


class GateSpec(StrictModel):
    """Which rows the rail steers, decided per prompt before generation.

    The members' harm scores are standardised on the training prompts and summed; a row is
    steered when the score is below ``below`` (confidently benign) or above ``above``
    (confidently harmful). ``auto`` takes the threshold ``guardrail calibrate`` stored in the
    artifact; ``null`` never steers on that side.
    """

    members: list[GateMemberSpec] = Field(min_length=1, max_length=16)
    below: float | Literal["auto"] | None = Field(
        "auto", description="Steer rows scoring below this (training standard deviations).")
    above: float | Literal["auto"] | None = Field(
        None, description="Also steer rows scoring above this; null: never.")


class RailSpec(StrictModel):
    """One steering rail: where to read/write states, what energy model, which steerer, where."""

    name: str
    enabled: bool = True
    layers: Literal["auto"] | list[int] = Field(
        "auto", description="'auto' takes the layers stored in the artifact."
    )
    activation_source: PluginSpec = Field(default_factory=_default("activation_source"))
    energy_model: EnergyModelSpec | None = None
    steerer: PluginSpec = Field(default_factory=_default("steerer"))
    gate: GateSpec | None = Field(
        None, description="Steer only the rows this gate lets through (default: every row).")

    @model_validator(mode="before")
    @classmethod
    def _fill_plugins(cls, data: Any) -> Any:
        return _default_plugins(data, {"activation_source": "activation_source",
                                       "steerer": "steerer"})


class Policy(StrictModel):
    """A whole policy file."""

    name: str
    description: str = ""
    model: ModelSection
    generation: GenerationSection = Field(default_factory=lambda: GenerationSection())
    rails: list[RailSpec] = Field(default_factory=list)
    classifier: PluginSpec = Field(default_factory=_default("refusal_classifier"))
    training: TrainingSection | None = Field(
        None,
        description="What `guardrail train` trains the rail's energy model on (docs/training.md).",
    )
    calibration: CalibrationSection | None = Field(
        None, description="The safety budget `guardrail calibrate` holds (docs/training.md).",
    )

    _path: Path | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _fill_plugins(cls, data: Any) -> Any:
        return _default_plugins(data, {"classifier": "refusal_classifier"})

    @property
    def path(self) -> Path | None:
        """The file this policy was loaded from, if any."""
        return self._path


# Keys whose string values are filesystem paths, resolved against the defining file.
PATH_KEYS = frozenset({"artifact", "path", "output", "cache_dir", "state_cache", "report"})
_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class UnsetVariableError(Exception):
    """``${NAME}`` names an environment variable that is not set and has no default."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def problem(self, where: str) -> str:
        """The policy problem line for the key path ``where``."""
        return (f"{where}: environment variable ${{{self.name}}} is not set; set it, or write "
                f"${{{self.name}:-default}} (${{{self.name}:-}} allows an empty value)")


def expand_env(value: str) -> str:
    """Expand ``${VAR}`` and ``${VAR:-default}``; raise :class:`UnsetVariableError` for an
    unset ``${VAR}`` without a default (a silent empty string would turn ``${ART}/x`` into
    ``/x``)."""

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is None:
            raise UnsetVariableError(name)
        return default

    return _ENV_PATTERN.sub(substitute, value)


def _resolve_paths(node: Any, base: Path, problems: list[str], key: str | None = None,
                   where: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _resolve_paths(v, base, problems, k, f"{where}.{k}" if where else k)
                for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_paths(v, base, problems, key, f"{where}[{i}]")
                for i, v in enumerate(node)]
    if not isinstance(node, str) or (key not in PATH_KEYS and key != "source"):
        return node
    try:
        text = expand_env(node)
    except UnsetVariableError as exc:
        problems.append(exc.problem(where))
        return node
    if key == "source" and not text.startswith((".", "/", "~")):
        return text
    if not text:
        return text  # schema validation names the empty value
    try:
        candidate = Path(text).expanduser()
    except RuntimeError:  # ~name of a user that does not exist
        problems.append(f"{where}: got {_shown(text)}; cannot expand '~' (no such user's home)")
        return node
    return str(candidate if candidate.is_absolute() else (base / candidate).resolve())


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A child policy (``override``) over its parent: ``rails`` merge by name
    (:func:`merge_rails`), other mappings merge recursively, and other lists and scalars in
    ``override`` replace those in ``base``."""
    merged = _merge_mappings(base, {k: v for k, v in override.items() if k != "rails"})
    if "rails" in override:
        rails = override["rails"]
        parent = base.get("rails")
        both = isinstance(rails, list) and isinstance(parent, list)
        merged["rails"] = merge_rails(parent, rails) if both else rails
    return merged


def merge_rails(parent: list[Any], child: list[Any]) -> list[Any]:
    """The parent's rails with the child's merged in by ``name``.

    A child rail whose name the parent has is deep-merged into it, in the parent's place
    (``enabled: false`` removes it instead); a rail with a new name is appended.
    """
    rails = list(parent)
    where = {rail["name"]: i for i, rail in enumerate(rails)
             if isinstance(rail, dict) and isinstance(rail.get("name"), str)}
    dropped: set[int] = set()
    for rail in child:
        name = rail.get("name") if isinstance(rail, dict) else None
        if not isinstance(name, str) or name not in where:
            rails.append(rail)  # new (or nameless: validation reports it)
        elif rail.get("enabled") is False:
            dropped.add(where[name])
        else:
            rails[where[name]] = _merge_mappings(rails[where[name]], rail)
    return [rail for i, rail in enumerate(rails) if i not in dropped]


def _merge_mappings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_mappings(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a policy file, follow ``extends`` and resolve paths; no schema validation yet."""
    path = Path(path).expanduser().resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise PolicyError(str(path), [f"extends: cycle {chain}"])
    problems: list[str] = []
    data = _resolve_paths(read_policy_file(path), path.parent, problems)
    if problems:
        raise PolicyError(str(path), problems)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise PolicyError(str(path), [f"extends: expected a file path, got {_shown(parent)}"])
    try:
        parent_path = Path(expand_env(parent)).expanduser()
    except UnsetVariableError as exc:
        raise PolicyError(str(path), [exc.problem("extends")]) from None
    except RuntimeError:
        raise PolicyError(str(path), [f"extends: got {_shown(parent)}; cannot expand '~' (no "
                                      "such user's home)"]) from None
    if not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    if not _is_file(parent_path):
        shipped = shipped_policy(parent)
        if shipped is None:
            raise PolicyError(str(path), [f"extends: {_shown(parent)} not found (looked at "
                                          f"{_shown(str(parent_path))}, and it is not a shipped "
                                          "policy name)"])
        parent_path = shipped
    return merge(load_raw(parent_path, (*_seen, path)), data)


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system, say
        return False


def _shown(value: Any, limit: int = 120) -> str:
    """``repr(value)``, cut to ``limit`` characters: errors must not echo a megabyte value."""
    try:
        text = repr(value)
    except ValueError:  # an int too large to print
        return f"<{type(value).__name__} too large to show>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_validation_error(exc: ValidationError, prefix: str = "") -> list[str]:
    """One line per pydantic error: key path, bad value, what was expected."""
    problems = []
    for err in exc.errors():
        loc = _key_path(tuple(err["loc"]))
        path = f"{prefix}.{loc}" if prefix and loc != "(top level)" else (prefix or loc)
        if err["type"] == "extra_forbidden":
            problems.append(f"{path}: unknown key (value {_shown(err['input'])})")
        elif err["type"] == "missing":
            problems.append(f"{path}: required key is missing")
        else:
            expected = err["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: got {_shown(err['input'])}; expected {expected.lower()}")
    return problems


def parse_policy(data: dict[str, Any], path: str | Path = "<policy>") -> Policy:
    """Validate an already-loaded mapping; raise :class:`PolicyError` listing every problem."""
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        raise PolicyError(str(path), format_validation_error(exc)) from None
    policy._path = Path(path) if str(path) != "<policy>" else None
    return policy


def load_policy(path: str | Path) -> Policy:
    """Load, merge and validate a policy file or shipped policy name (schema only; see
    :func:`check_plugins`)."""
    resolved = resolve_policy(path).resolve()
    return parse_policy(load_raw(resolved), resolved)


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
            problems.append(f"{where}.layers: got {_shown(rail.layers)}; expected layer "
                            "indices >= 0")
        if rail.layers == [] and _steers_states(registry, rail):
            problems.append(f"{where}.layers: got []; expected 'auto' or at least one layer "
                            "index (only a prompt-only steerer may have no layers)")
    names = [rail.name for rail in policy.rails]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"rails: name {name!r} is used twice; rail names must be unique")
    check("refusal_classifier", policy.classifier, "classifier")
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
        problems.append(f"training.rail: got {_shown(policy.training.rail)}; expected one of "
                        f"{trainable} (rails with an energy_model)")
    for i, rail in enumerate(policy.rails):
        artifact = rail.energy_model.artifact if rail.energy_model is not None else None
        if artifact is not None and _exists(Path(artifact)) and not _is_file(Path(artifact)):
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
        notes.append(f"rails[{i}].energy_model.artifact: {artifact} does not exist yet; {how}")
    return notes


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
