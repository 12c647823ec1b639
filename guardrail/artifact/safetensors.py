"""The header of a safetensors file, read without torch or the safetensors package.

A safetensors file is eight bytes (little-endian length N), N bytes of JSON (the string
metadata under ``__metadata__``, and per tensor its dtype, shape and byte range), then the
tensors' bytes. Reading the JSON needs nothing else, so an artifact can be checked before
torch is imported; the sizes are checked here as safetensors would (a header claiming more
bytes than the file has, a tensor whose bytes lie outside the file, an unknown dtype).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guardrail.errors import ArtifactError

#: safetensors refuses larger headers; so does this reader (before reading them).
MAX_HEADER_BYTES = 100_000_000
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file's table: dtype and shape (its bytes are not read here)."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    """The string metadata and the tensor table of a safetensors file."""

    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The metadata and tensor table of ``path``, checked for size and shape; torch-free."""
    where = str(path)
    try:
        if path.is_dir():
            raise ArtifactError(f"energy-model artifact {where} is a directory, not a file")
        if not path.is_file():
            raise ArtifactError(f"energy-model artifact {where} not found")
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise ArtifactError(f"{where}: not a readable safetensors file (it is "
                                    f"{size} bytes, shorter than the 8-byte header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or length > size - 8:
                raise ArtifactError(f"{where}: not a readable safetensors file (its header "
                                    f"claims {length} bytes in a {size}-byte file)")
            raw = handle.read(length)
    except OSError as exc:
        raise ArtifactError(f"{where}: cannot read the file: {exc.strerror or exc}") from None
    try:
        table = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{where}: not a readable safetensors file (header: "
                            f"{_first_line(exc)})") from None
    if not isinstance(table, dict):
        raise ArtifactError(f"{where}: not a readable safetensors file (its header is a JSON "
                            f"{type(table).__name__}, not an object)")
    data_bytes = size - 8 - length
    metadata = table.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ArtifactError(f"{where}: not a readable safetensors file (__metadata__ must map "
                            "strings to strings)")
    tensors: dict[str, TensorEntry] = {}
    for name, entry in table.items():
        problem = _tensor_problem(entry, data_bytes)
        if problem:
            raise ArtifactError(f"{where}: not a readable safetensors file (tensor "
                                f"{_shown(name)}: {problem})")
        tensors[name] = TensorEntry(entry["dtype"], tuple(entry["shape"]))
    return SafetensorsHeader(metadata, tensors)


def _tensor_problem(entry: Any, data_bytes: int) -> str | None:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        return "expected an object with dtype, shape and data_offsets"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPE_BYTES:
        return f"dtype {_shown(dtype)} is not a safetensors dtype"
    if not isinstance(shape, list) or not all(_is_index(n) for n in shape) or len(shape) > 8:
        return f"shape {_shown(shape)} is not a list of sizes"
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_index, offsets))
            or not offsets[0] <= offsets[1] <= data_bytes):
        return f"data_offsets {_shown(offsets)} do not lie in the file's {data_bytes} data bytes"
    if offsets[1] - offsets[0] != math.prod(shape) * _DTYPE_BYTES[dtype]:
        return f"data_offsets {offsets} do not hold a {dtype} tensor of shape {shape}"
    return None



def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
