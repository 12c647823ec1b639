"""An artifact file read without torch: its header checked against the models of
:mod:`guardrail.artifact.header` (each problem named by its field path), and its safetensors
tensor table checked against the header: every tensor belongs to a layer or gate member the
header lists, and every listed layer has tensors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from guardrail.artifact.header import (
    FORMATS,
    GATE_TENSOR_PREFIX,
    HEADER_KEY,
    ArtifactHeader,
    FieldProblem,
    first_line,
    shown,
)
from guardrail.artifact.safetensors import TensorEntry, read_safetensors_header
from guardrail.errors import ArtifactError


def check_header(header: Any, where: str) -> ArtifactHeader:
    """The header mapping as an :class:`ArtifactHeader`, or one :class:`ArtifactError` listing
    every problem, each as ``header field 'PATH': got VALUE; expected WHAT``."""
    if not isinstance(header, dict):
        raise ArtifactError(f"{where}: header is a JSON {type(header).__name__}; expected an "
                            "object")
    if header.get("format") not in FORMATS:
        raise ArtifactError(f"{where}: header key 'format' is {shown(header.get('format'))}; "
                            f"expected one of {list(FORMATS)}")
    try:
        return ArtifactHeader.model_validate(header)
    except ValidationError as exc:
        raise ArtifactError(f"{where}: " + "; ".join(header_problems(exc))) from None
    except RecursionError:
        raise ArtifactError(f"{where}: header is nested too deeply") from None


def header_problems(exc: ValidationError) -> list[str]:
    """One line per problem of a header's validation error."""
    problems = []
    for err in exc.errors():
        context = err.get("ctx") or {}
        inner = context.get("error")
        base = _key_path(tuple(err["loc"]))
        if isinstance(inner, FieldProblem):
            field = f"{base}.{inner.field}" if base else inner.field
            problems.append(f"header field '{field}': {inner.message}")
            continue
        field = base or "(top level)"
        if err["type"] == "missing":
            problems.append(f"header field '{field}': missing")
        elif err["type"] == "extra_forbidden":
            problems.append(f"header field '{field}': unknown key (value "
                            f"{shown(err['input'])}); not part of this artifact format")
        else:
            expected = err["msg"].removeprefix("Value error, ").removeprefix("Input should be ")
            expected = expected.split(" or instance of ")[0]
            problems.append(f"header field '{field}': got {shown(err['input'])}; expected "
                            f"{expected[:1].lower()}{expected[1:]}")
    return problems


def check_tensor_table(header: ArtifactHeader, tensors: dict[str, TensorEntry],
                       where: str) -> None:
    """Every tensor belongs to a listed layer or gate member; every listed layer has some."""
    sets = header.sets()
    claimed = {(side, str(layer)) for side, entry in sets.items() for layer in entry.layers}
    if header.gate is not None:
        claimed |= {("gate", str(i)) for i in range(len(header.gate.members))}
    owners = {name: _owner(name) for name in tensors}
    strays = sorted(name for name, owner in owners.items() if owner not in claimed)
    if strays:
        listed = (f"'layers' {sets['shared'].layers}" if "shared" in sets else
                  "'sides' (" + "; ".join(f"{side}: {entry.layers}"
                                          for side, entry in sets.items()) + ")")
        gate = (f" nor to a member of its {len(header.gate.members)}-member gate"
                if header.gate is not None else " and there is no gate")
        raise ArtifactError(f"{where}: tensors {shown(strays)} belong to no layer in the "
                            f"header's {listed}{gate}")
    found = set(owners.values())
    for side, entry in sets.items():
        for layer in entry.layers:
            if (side, str(layer)) not in found:
                label = "" if side == "shared" else f"side {side!r} "
                raise ArtifactError(f"{where}: {label}layer {layer}: the header lists it but "
                                    f"the file has no tensors named {_prefix(side)}{layer}.*")


def _owner(name: str) -> tuple[str, str] | None:
    """Which set's layer (``("answer", "3")``) or gate member (``("gate", "0")``) a tensor
    name belongs to."""
    if name.startswith(GATE_TENSOR_PREFIX):
        index, dot, _ = name[len(GATE_TENSOR_PREFIX):].partition(".")
        return ("gate", index) if dot else None
    side, rest = ("shared", name) if name.startswith("layers.") else name.partition(".")[::2]
    if not rest.startswith("layers."):
        return None
    layer, dot, _ = rest[len("layers."):].partition(".")
    return (side, layer) if dot else None


@dataclass(frozen=True)
class ArtifactFile:
    """An artifact's checked header, the raw header mapping, and its tensor table."""

    header: ArtifactHeader
    raw: dict[str, Any]
    tensors: dict[str, TensorEntry]


def read_artifact(path: str | Path) -> ArtifactFile:
    """Read and check an artifact's header and tensor table (no tensor data; no torch)."""
    path = Path(path)
    container = read_safetensors_header(path)
    if HEADER_KEY not in container.metadata:
        raise ArtifactError(f"{path}: no '{HEADER_KEY}' header; not a guardrail artifact")
    try:
        raw = json.loads(container.metadata[HEADER_KEY])
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path}: header is not valid JSON ({first_line(exc)})") from None
    header = check_header(raw, str(path))
    check_tensor_table(header, container.tensors, str(path))
    return ArtifactFile(header, raw, container.tensors)


def _prefix(side: str) -> str:
    """Tensor-name prefix of a set's layers: ``layers.`` (shared) or ``{side}.layers.``."""
    return "layers." if side == "shared" else f"{side}.layers."


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
