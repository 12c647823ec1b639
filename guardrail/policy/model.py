"""Declarative policy files: schema (pydantic v2, unknown keys rejected), loading, ``extends``.

A policy names the model, generation defaults, an ordered list of steering rails and the
refusal classifier. Rails stack in order. Relative paths are resolved against the file that
defines them, after ``${VAR}`` / ``${VAR:-default}`` environment expansion (an unset ``${VAR}``
is an error; ``${VAR:-}`` allows empty). Files are read by :mod:`guardrail.policy.files`,
which bounds their size, nesting and alias expansion.

``extends: PARENT`` (a path, or a shipped policy's name) starts from the parent file:
mappings merge key by key, rails merge by ``name`` (:func:`merge_rails`), and every other
list or value replaces the parent's. A component section (``steerer``, ``energy_model``,
``classifier``, ...) that names another ``plugin`` than the parent's replaces the parent's
section whole: params are never inherited across plugins.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from guardrail.console import remember_expansion
from guardrail.errors import PolicyError
from guardrail.plugin.defaults import DEFAULT_COMPONENTS
from guardrail.policy.extends import merge
from guardrail.policy.files import read_policy_file, resolved
from guardrail.policy.shipped import resolve_policy, shipped_policy
from guardrail.policy.training import CalibrationSection, TrainingSection


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
    component of its kind (``steerer: {params: {...}}``: the default steerer, those params)."""
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
    output_rails: list[PluginSpec] = Field(
        default_factory=list, max_length=16,
        description="Review finished answers, in order, and answer some again (docs/policies.md).",
    )
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


#: The longest chain of ``extends`` followed (a child, its parent, its grandparent, ...).
MAX_EXTENDS = 32
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
            remember_expansion(name, os.environ[name])
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
        problems.append(f"{where}: got {shown(node)}; cannot expand '~' (no such user's home)")
        return node
    try:
        return str(candidate if candidate.is_absolute() else (base / candidate).resolve())
    except (RuntimeError, OSError):  # a symlink loop (RuntimeError on Python < 3.13)
        problems.append(f"{where}: got {shown(node)}; the path is a symlink loop")
        return node












def load_raw(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a policy file, follow ``extends`` (at most :data:`MAX_EXTENDS` files deep) and
    resolve paths; no schema validation yet."""
    path = resolved(Path(path))
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise PolicyError(str(path), [f"extends: cycle {chain}"])
    if len(_seen) >= MAX_EXTENDS:
        raise PolicyError(str(_seen[0]), [
            f"extends: the chain is more than {MAX_EXTENDS} files long ({_seen[0]} -> "
            f"{_seen[1] if len(_seen) > 1 else path} -> ... -> {path}); policies extend a "
            "few parents at most"])
    problems: list[str] = []
    data = _resolve_paths(read_policy_file(path), path.parent, problems)
    if problems:
        raise PolicyError(str(path), problems)
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise PolicyError(str(path), [f"extends: expected a file path, got {shown(parent)}"])
    try:
        parent_path = Path(expand_env(parent)).expanduser()
    except UnsetVariableError as exc:
        raise PolicyError(str(path), [exc.problem("extends")]) from None
    except (RuntimeError, ValueError):
        raise PolicyError(str(path), [f"extends: got {shown(parent)}; cannot expand '~' (no "
                                      "such user's home)"]) from None
    if not parent_path.is_absolute():
        parent_path = path.parent / parent_path
    if not is_file(parent_path):
        shipped = shipped_policy(parent)
        if shipped is None:
            raise PolicyError(str(path), [f"extends: {shown(parent)} not found (looked at "
                                          f"{shown(str(parent_path))}, and it is not a shipped "
                                          "policy name)"])
        parent_path = shipped
    return merge(load_raw(parent_path, (*_seen, path)), data)


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long for the file system, say
        return False


def shown(value: Any, limit: int = 120) -> str:
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
            problems.append(f"{path}: unknown key (value {shown(err['input'])})")
        elif err["type"] == "missing":
            problems.append(f"{path}: required key is missing")
        else:
            expected = err["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: got {shown(err['input'])}; expected {expected.lower()}")
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
    found = resolved(resolve_policy(path))
    return parse_policy(load_raw(found), found)
