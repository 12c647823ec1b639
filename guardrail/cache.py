"""The on-disk cache root and its atomically written entries (dequantised models).

An entry is a directory that appears in one rename once it is complete; its manifest is
written last. Writers that die leave a temp directory that the next writer removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("guardrail.models")

CACHE_DIR_ENV = "GUARDRAIL_CACHE_DIR"
CACHE_MANIFEST = "guardrail-cache.json"
"""Written last into a cache entry; an entry without it is incomplete and never loaded."""
_TMP_PREFIX = ".tmp-"
# mkdtemp names look like ".tmp-<entry>-<pid>-<random>"; the pid tells a dead writer's leftovers.
_TMP_PID = re.compile(r"-(\d+)-[A-Za-z0-9_]+$")


def digest(payload: Any) -> str:
    """sha256 of a JSON-serialisable payload (keys sorted): the key of a cache entry."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$GUARDRAIL_CACHE_DIR``, else ``~/.cache/guardrail``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "guardrail"


CACHE_DTYPES = ("float32", "bfloat16", "float16")
"""The dtypes a dequantised copy is kept in: float32, or the model's compute dtype."""


def cache_entry_path(
    name: str, sha256: str, cache_dir: str | Path | None = None, dtype: str = "float32"
) -> Path:
    """Where the dequantised copy in ``dtype`` of the GGUF with this name and sha256 lives
    (float32 entries keep the name they always had)."""
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {dtype!r}; expected one of {', '.join(CACHE_DTYPES)}")
    safe = re.sub(r"[^\w.-]+", "_", name)
    suffix = "" if dtype == "float32" else f"-{dtype}"
    return cache_root(cache_dir) / "models" / f"{safe}-{sha256[:16]}{suffix}"


def is_cached(entry: Path) -> bool:
    """Whether a cache entry is complete (its manifest is written last, before the rename)."""
    return (entry / CACHE_MANIFEST).is_file()


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_tmp(parent: Path) -> None:
    """Delete temp dirs left by writers that died; a live writer's dir is left alone."""
    for tmp in parent.glob(f"{_TMP_PREFIX}*"):
        match = _TMP_PID.search(tmp.name)
        if match and _pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        log.info("model.cache_tmp_removed", path=str(tmp))


def writer_dir(parent: Path, label: str) -> Path:
    """A new private directory in ``parent`` for a writer's work in progress.

    Its name carries this process's pid, so the next writer removes it if this one dies.
    """
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{label}-{os.getpid()}-", dir=parent))


def fill_cache_entry(entry: Path, build: Callable[[Path], dict[str, Any]]) -> None:
    """Run ``build(tmp_dir)`` and move the result to ``entry`` in one rename.

    ``build`` writes the model files and returns the manifest; an exception (or a kill) leaves
    at most a temp dir that the next writer removes, never a half-written ``entry``.
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(entry.parent)
    tmp = writer_dir(entry.parent, entry.name)
    try:
        manifest = build(tmp)
        (tmp / CACHE_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        # mkdtemp makes the dir private; the cache is meant to be read like any other cache.
        tmp.chmod(0o755)
        for file in tmp.iterdir():
            file.chmod(0o644)
        if entry.exists() and not is_cached(entry):
            shutil.rmtree(entry)  # incomplete entry from an older layout or a manual edit
        try:
            os.replace(tmp, entry)
        except OSError:
            if not is_cached(entry):
                raise
            log.info("model.cache_race_lost", path=str(entry))  # another process finished first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
