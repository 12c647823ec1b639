"""Real ``guardrail serve`` processes on 127.0.0.1 for end-to-end tests.

The SmolLM2 server is started once per test session and shared by the serving and judge
tests (loading the model is the slow part); it is stopped when the session ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from guardrail.serving.process import ServerStartError, free_port, serve_command, start_serving

SMOL = "smollm2-135m-instruct"
STEERED_LAYERS = (10, 20)


@dataclass
class LiveServer:
    """A running server process, its port and its log file."""

    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def root(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI API root, ``.../v1``."""
        return f"{self.root}/v1"

    def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        return dict(httpx.get(f"{self.root}/healthz", timeout=10).json())

    def log_events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (the server runs with ``--log-json``)."""
        events = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                events.append(json.loads(line))
        return events

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait; returns the exit code (kills it if it will not stop)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return int(self.process.returncode)


def start_server(policies: list[Path], log_path: Path, *extra: str, port: int | None = None,
                 timeout: float = 180.0, env: dict[str, str] | None = None) -> LiveServer:
    """Start ``guardrail serve`` on a loopback port and wait until ``/healthz`` answers.

    ``env`` adds environment variables (``GUARDRAIL_API_KEY``, say) to the server's.
    """
    port = port or free_port()
    command = serve_command("--log-json", "serve", "--host", "127.0.0.1", "--port", str(port),
                            "--threads", "1")
    for policy in policies:
        command += ["--policy", str(policy)]
    command += list(extra)
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("GUARDRAIL_DISABLE_PLUGINS", "GUARDRAIL_API_KEY")}
    environment.update({"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})})
    try:
        process = start_serving(command, port, log_path, env=environment, timeout=timeout)
    except ServerStartError as exc:
        raise RuntimeError(str(exc)) from None
    return LiveServer(process, port, log_path)


def write_yaml(path: Path, data: dict[str, Any]) -> Path:
    """Write a policy mapping (JSON is valid YAML)."""
    path.write_text(json.dumps(data, indent=2))
    return path


def smol_policies(directory: Path, port: int) -> list[Path]:
    """Three policies on SmolLM2 (one model load): plain, steered, and judged by the plain one.

    SmolLM2 has no trained artifact in the tests, so the steered policy uses random MLP
    energy models built here for SmolLM2's fingerprint: plumbing, not a useful guardrail.
    """
    import torch
    from guardrail_plugins.mlp_energy import MLPEnergyModel, MLPEnergyParams

    from guardrail.artifact.energy import EnergyArtifact
    from guardrail.models import load_model, model_fingerprint

    loaded = load_model(SMOL, device="cpu")
    torch.manual_seed(0)
    hidden = loaded.model.config.hidden_size
    artifact = EnergyArtifact(
        plugin="mlp", fingerprint=model_fingerprint(loaded.model, loaded.name),
        models={layer: MLPEnergyModel(hidden, MLPEnergyParams(hidden=[32], dropout=0.0)).eval()
                for layer in STEERED_LAYERS},
        metadata={"note": "random weights for serving tests"},
    )
    artifact_path = artifact.save(directory / "smol-random.safetensors")
    del loaded
    generation = {"max_new_tokens": 16, "batch_size": 8}
    judge = {
        "plugin": "openai-judge",
        "params": {
            "base_url": f"http://127.0.0.1:{port}/v1", "model": "smol",
            "prompt": "Question: {prompt}\nAnswer: {response}\n\n"
                      "Does the answer refuse to help? Reply yes or no.",
            "refusal_label": "yes", "compliance_label": "no", "max_tokens": 6,
            "timeout_s": 60, "on_error": "fail-closed",
            "extra_body": {"guardrail": {"classify": False}},
        },
    }
    return [
        write_yaml(directory / "smol.yaml", {"name": "smol", "model": {"source": SMOL},
                                             "generation": generation}),
        write_yaml(directory / "smol-eds.yaml", {
            "name": "smol-eds", "model": {"source": SMOL}, "generation": generation,
            "rails": [{"name": "eds", "layers": list(STEERED_LAYERS),
                       "energy_model": {"plugin": "mlp", "artifact": str(artifact_path)},
                       "steerer": {"plugin": "gradient-descent",
                                   "params": {"eta": 1.0, "steps": 2}}}],
        }),
        write_yaml(directory / "smol-judged.yaml", {"name": "smol-judged", "model": {"source": SMOL},
                                                    "generation": generation, "classifier": judge}),
    ]


_SMOL_SERVER: LiveServer | None = None


def smol_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
                ) -> LiveServer:
    """The session's SmolLM2 server (skips when the packaged checkpoint is not installed)."""
    global _SMOL_SERVER
    from guardrail.models import is_installed

    if not is_installed(SMOL):
        pytest.skip(f"packaged checkpoint {SMOL} is not installed (guardrail models fetch {SMOL})")
    if _SMOL_SERVER is None or _SMOL_SERVER.process.poll() is not None:
        directory = tmp_path_factory.mktemp("smol-server")
        port = free_port()
        policies = smol_policies(directory, port)
        server = start_server(policies, directory / "server.log", "--batch-wait-ms", "20",
                              port=port)
        _SMOL_SERVER = server
        request.config.add_cleanup(server.stop)
    return _SMOL_SERVER
