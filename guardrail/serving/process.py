"""``guardrail serve`` as a child process on the loopback address, started and waited for until
``/healthz`` answers: what the end-to-end tests and the load benchmarks share."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx

HOST = "127.0.0.1"


class ServerStartError(RuntimeError):
    """The server exited, or did not answer ``/healthz`` in time; the message ends with the
    tail of its log."""


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve_command(*args: str) -> list[str]:
    """The ``guardrail`` command of this interpreter's environment with ``args``."""
    script = Path(sys.executable).with_name("guardrail")
    return [str(script) if script.exists() else sys.executable,
            *([] if script.exists() else ["-m", "guardrail"]), *args]


def start_serving(command: Sequence[str], port: int, log_path: Path, *,
                  env: Mapping[str, str] | None = None, timeout: float = 180.0,
                  host: str = HOST) -> subprocess.Popen[bytes]:
    """Run ``command`` (a ``guardrail serve`` on ``host:port``) with its output in
    ``log_path``, and return it once ``/healthz`` answers 200. Raises
    :class:`ServerStartError` (the process stopped) when it exits or times out first."""
    environment = dict(os.environ if env is None else env)
    with log_path.open("wb") as log:
        process = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT,
                                   env=environment)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerStartError(f"server exited with {process.returncode}:\n"
                                   f"{_tail(log_path)}")
        try:
            if httpx.get(f"http://{host}:{port}/healthz", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    process.kill()
    process.wait()
    raise ServerStartError(f"server did not answer /healthz within {timeout:g} s:\n"
                           f"{_tail(log_path)}")


def _tail(path: Path, size: int = 3000) -> str:
    return path.read_text(errors="replace")[-size:]
