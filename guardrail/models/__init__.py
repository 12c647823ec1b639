"""Model sources, one job a module.

- :mod:`~guardrail.models.catalogue`: the packaged offline checkpoints and installing them
- :mod:`~guardrail.models.gguf`: GGUF files verified, assembled, dequantised into the cache
- :mod:`~guardrail.models.loading`: a source to a :class:`LoadedModel` on a device, in a dtype
- :mod:`~guardrail.models.fingerprint`: the architecture fingerprint and file sha256

The loading names import transformers, so they are imported on first use: code that only
fingerprints (artifacts, caches, evaluation) imports :mod:`guardrail.models.fingerprint`
without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from guardrail.models.catalogue import (
    PACKAGED_MODELS,
    PackagedModel,
    encoder_installed,
    fetch_packaged,
    is_installed,
    packaged_cache_path,
    packaged_encoders,
    packaged_files,
)
from guardrail.models.fingerprint import file_sha256, model_fingerprint

if TYPE_CHECKING:
    from guardrail.models.loading import (
        ALLOW_DOWNLOADS_ENV,
        LoadedModel,
        load_model,
        resolve_device,
        resolve_dtype,
    )

_LOADING = frozenset(
    {"ALLOW_DOWNLOADS_ENV", "LoadedModel", "load_model", "resolve_device", "resolve_dtype"}
)

__all__ = [
    "ALLOW_DOWNLOADS_ENV",
    "PACKAGED_MODELS",
    "LoadedModel",
    "PackagedModel",
    "encoder_installed",
    "fetch_packaged",
    "file_sha256",
    "is_installed",
    "load_model",
    "model_fingerprint",
    "packaged_cache_path",
    "packaged_encoders",
    "packaged_files",
    "resolve_device",
    "resolve_dtype",
]


def __getattr__(name: str) -> Any:
    if name in _LOADING:
        from guardrail.models import loading

        return getattr(loading, name)
    raise AttributeError(f"module 'guardrail.models' has no attribute {name!r}")
