"""A digest of an energy-model artifact that ignores its calibration.

``guardrail calibrate`` rewrites an artifact's metadata; answers cached for the artifact's
models and gate stay valid, so cache keys hash the tensors and the header without it. What
the calibration changes (steerer params, thresholds) is keyed separately, as resolved.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from guardrail.models.fingerprint import file_sha256

HEADER_KEY = "guardrail"


def artifact_digest(path: Path) -> str:
    """sha256 of the file's tensor bytes and its header less ``metadata.calibration``; the
    plain file hash for a file that is not a readable artifact."""
    try:
        with path.open("rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            table = json.loads(handle.read(size))
            header = json.loads(table.get("__metadata__", {}).get(HEADER_KEY, "{}"))
            header.get("metadata", {}).pop("calibration", None)
            table.get("__metadata__", {}).pop(HEADER_KEY, None)
            digest = hashlib.sha256(json.dumps([table, header], sort_keys=True).encode())
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    except (OSError, ValueError, struct.error, AttributeError):
        return file_sha256(path)
    return digest.hexdigest()
