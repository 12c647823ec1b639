"""Difference-of-means refusal directions for the linear baselines, saved as energy artifacts.

What ``guardrail baseline directions`` runs (:mod:`guardrail_plugins.baselines.command`).

States at the last prompt token of every layer come from one forward pass per batch
(:meth:`guardrail.steering.guard.Guardrail.prompt_states`) and are cached on disk per
(model, activation source, rendered prompts), so building a second artifact is free.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors.torch import load_file, save_file

from guardrail.artifact.energy import EnergyArtifact
from guardrail.errors import DataError, PluginError
from guardrail.plugin import DEFAULT_COMPONENTS, cache_root, digest
from guardrail.plugin.components import ActivationSource
from guardrail.plugin.registry import Registry
from guardrail.policy.model import Policy, load_policy
from guardrail.prompts import load_prompts, resolve_data_dir
from guardrail.steering.generation import user_turns
from guardrail.steering.guard import Guardrail

log = structlog.get_logger("guardrail.evaluation")

# The data files a side reads when the command names none (in the data directory).
DEFAULT_FILES = {"harmful": "harmful_train.json", "benign": "harmless_train.json"}


def prompt_states(
    guard: Guardrail,
    source: ActivationSource,
    prompts: Sequence[str],
    layers: Sequence[int],
    *,
    batch_size: int = 16,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = False,
) -> torch.Tensor:
    """``[n, len(layers), hidden]`` float32 states at the last prompt token of each prompt."""
    texts = guard.render(user_turns(prompts), steer=False)
    key = digest({"model": guard.fingerprint,
                  "source": [source.name, source.params.model_dump()], "texts": texts,
                  "layers": list(layers)})
    path = cache_root(cache_dir) / "evaluation" / "states" / f"{key}.safetensors"
    if use_cache and path.is_file():
        log.info("directions.cache_hit", path=str(path), prompts=len(texts))
        return load_file(str(path))["states"]
    started = time.perf_counter()
    found = guard.prompt_states(user_turns(prompts), source, layers, batch_size=batch_size,
                                progress=progress)
    states = torch.stack([found[layer] for layer in layers], dim=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"states": states.contiguous()}, str(path))
    log.info("directions.states", prompts=len(texts), layers=len(layers),
             seconds=round(time.perf_counter() - started, 1))
    return states


def direction_artifact(
    harmful: torch.Tensor,
    benign: torch.Tensor,
    layers: Sequence[int],
    *,
    registry: Registry,
    fingerprint: dict[str, Any],
    energy_model: str = "linear",
    direction_layer: int | None = None,
    metadata: dict[str, Any] | None = None,
) -> tuple[EnergyArtifact, list[dict[str, Any]]]:
    """One linear energy model per layer from ``[n, L, hidden]`` harmful and benign states.

    With ``direction_layer`` every layer uses that layer's direction (Arditi et al. ablate one
    direction everywhere); each layer keeps its own midpoint. Returns the artifact and per-layer
    statistics: separation ||mu_harmful - mu_benign||, balanced accuracy of E > 0, mean ||h||.
    """
    if harmful.shape[0] == 0 or benign.shape[0] == 0:
        raise DataError("difference of means needs at least one harmful and one benign prompt")
    cls = registry.get("energy_model", energy_model).cls
    from_means = getattr(cls, "from_means", None)
    if from_means is None:
        raise PluginError(
            f"energy model {energy_model!r} cannot be built from class means (it has no "
            "from_means(harmful, benign)); use 'linear'"
        )
    layers = list(layers)
    if direction_layer is not None and direction_layer not in layers:
        raise DataError(f"--direction-layer {direction_layer} is not among the layers {layers}")
    mu_h, mu_b = harmful.mean(dim=0), benign.mean(dim=0)
    models = {}
    stats = []
    for i, layer in enumerate(layers):
        model = from_means(mu_h[i], mu_b[i])
        if direction_layer is not None:
            j = layers.index(direction_layer)
            shared = from_means(mu_h[j], mu_b[j])
            model.direction.copy_(shared.direction)
        models[layer] = model.eval().requires_grad_(False)
        with torch.no_grad():
            tpr = float((model.energy(harmful[:, i]) > 0).float().mean())
            tnr = float((model.energy(benign[:, i]) <= 0).float().mean())
        stats.append({"layer": layer, "separation": round(float((mu_h[i] - mu_b[i]).norm()), 4),
                      "balanced_accuracy": round((tpr + tnr) / 2, 4),
                      "mean_norm": round(float(torch.cat([harmful[:, i], benign[:, i]])
                                               .norm(dim=-1).mean()), 4)})
    meta = {**(metadata or {}), "method": "difference-of-means", "direction_layer": direction_layer,
            "n_harmful": int(harmful.shape[0]), "n_benign": int(benign.shape[0]),
            "position": "last prompt token", "layer_stats": stats}
    return EnergyArtifact(plugin=energy_model, fingerprint=fingerprint, models=models,
                          metadata=meta), stats


def default_output(policy: Policy) -> Path | None:
    """The artifact path of the policy's first rail with a ``linear`` energy model."""
    for rail in policy.rails:
        if rail.energy_model is not None and rail.energy_model.plugin in ("linear",
                                                                          "difference-of-means"):
            return Path(rail.energy_model.artifact) if rail.energy_model.artifact else None
    return None


def build_directions(
    policy_path: str | Path,
    *,
    out: str | Path | None = None,
    harmful: Sequence[str | Path] | None = None,
    benign: Sequence[str | Path] | None = None,
    limit: int | None = 256,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    direction_layer: int | None = None,
    batch_size: int = 16,
    data_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    device: str | None = None,
    progress: bool = False,
) -> tuple[Path, list[dict[str, Any]]]:
    """Load the policy's model, capture states of both prompt sets, save the linear artifact."""
    policy = load_policy(policy_path)
    target = Path(out) if out is not None else default_output(policy)
    if target is None:
        raise DataError(
            f"{policy_path}: no rail with a 'linear' energy model names an artifact; "
            "pass --out PATH"
        )
    files: dict[str, list[Path]] = {}
    for side, given in (("harmful", harmful), ("benign", benign)):
        files[side] = ([Path(f) for f in given] if given
                       else [resolve_data_dir(data_dir) / DEFAULT_FILES[side]])
    prompts = {side: [r.text for f in paths for r in load_prompts(f, sample=limit, seed=seed)]
               for side, paths in files.items()}
    # The rails are not built: their artifact is what this command is about to write.
    guard = Guardrail.from_policy(policy.model_copy(update={"rails": []}), device=device)
    spec = next((r.activation_source for r in policy.rails), None)
    source = guard.registry.create("activation_source",
                                   spec.plugin if spec else DEFAULT_COMPONENTS["activation_source"],
                                   spec.params if spec else {})
    assert isinstance(source, ActivationSource)
    fingerprint = guard.fingerprint
    chosen = list(layers) if layers else list(range(int(fingerprint["num_layers"])))
    states = {side: prompt_states(guard, source, texts, chosen, batch_size=batch_size,
                                  cache_dir=cache_dir, use_cache=use_cache, progress=progress)
              for side, texts in prompts.items()}
    artifact, stats = direction_artifact(
        states["harmful"], states["benign"], chosen, registry=guard.registry,
        fingerprint=fingerprint, direction_layer=direction_layer,
        metadata={"harmful_files": [str(f) for f in files["harmful"]],
                  "benign_files": [str(f) for f in files["benign"]], "limit": limit, "seed": seed,
                  "activation_source": source.name},
    )
    path = artifact.save(target)
    log.info("directions.saved", path=str(path), layers=len(chosen),
             direction_layer=direction_layer)
    return path, stats
