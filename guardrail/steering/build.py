"""Building a policy's rails: each rail's components from the registry, its energy models (and
gate) from its artifact, checked against the loaded model's fingerprint.

Values ``guardrail calibrate`` stored in the artifact fill what the policy leaves open: steerer
params the rail's ``steerer.params`` does not set (per gate side when calibrated per side), and
gate thresholds set to ``auto``. An artifact with one energy-model set per gate side gives the
rail a :class:`~guardrail.steering.rails.Direction` per side.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from guardrail.artifact.energy import SIDES, EnergyArtifact
from guardrail.artifact.gate import GateSet
from guardrail.artifact.header import Calibration
from guardrail.errors import ArtifactError, PolicyError
from guardrail.plugin.components import ActivationSource, OutputRail, RefusalClassifier, Steerer
from guardrail.plugin.energy_model import EnergyModel
from guardrail.plugin.registry import Registry
from guardrail.policy.artifacts import calibrated_for, calibrated_spec
from guardrail.policy.checks import check_plugins
from guardrail.policy.model import GateSpec, PluginSpec, Policy, RailSpec
from guardrail.steering.rails import SHARED, Direction, Rail


def build_rail(
    spec: RailSpec,
    index: int,
    registry: Registry,
    fingerprint: dict[str, Any],
    device: torch.device,
    where: str,
) -> Rail:
    """Instantiate one rail's components and load its energy-model artifact."""
    source = registry.create(
        "activation_source", spec.activation_source.plugin, spec.activation_source.params
    )
    assert isinstance(source, ActivationSource)
    key = f"rails[{index}]"
    artifact = _artifact(spec, key, registry, fingerprint, device, where)
    calibrated = calibration_of(artifact, spec.name) if artifact is not None else None
    # What calibration chose for this rail's steerer plugin (None: nothing, or another one's).
    tuned = calibrated if calibrated_for(calibrated, spec.steerer.plugin, registry) else None
    named = str(spec.energy_model.artifact if spec.energy_model else "")
    steerer = create_steerer(calibrated_spec(spec.steerer, calibrated, None, registry, named),
                             registry)
    disabled: dict[int, str] = {}
    sets: dict[str, dict[int, EnergyModel]] = {}
    if artifact is not None:
        layers, sets, disabled = _energies(artifact, spec, key, where)
    else:
        auto = list(range(int(fingerprint.get("num_layers") or 0)))
        layers = auto if spec.layers == "auto" else list(spec.layers)
    if artifact is not None and artifact.sides and spec.gate is None:
        raise PolicyError(where, [f"{key}.gate: missing; the artifact "
                                  f"{spec.energy_model.artifact if spec.energy_model else ''} "
                                  f"holds one energy-model set per gate side "
                                  f"({', '.join(artifact.sides)}), and only a gate can choose "
                                  "the side a prompt is steered towards"])
    shared = sets.get(SHARED, {})
    directions: dict[str, Direction] = {}
    for side in SIDES:
        values = tuned.steerer_values(side) if tuned is not None else {}
        if side not in sets and not values:
            continue
        own = (create_steerer(calibrated_spec(spec.steerer, calibrated, side, registry, named),
                              registry) if values else steerer)
        directions[side] = Direction(sets.get(side, shared), own)
    gate, below, above = None, None, None
    if spec.gate is not None:
        assert artifact is not None  # check_plugins: a gate needs an energy-model artifact
        gate, below, above = _gate(spec.gate, artifact.gate, calibrated, f"{key}.gate", named,
                                   where)
        missing = [side for side, value in (("answer", below), ("refuse", above))
                   if value is not None and artifact.sides and side not in artifact.sides]
        if missing:
            raise PolicyError(where, [f"{key}.gate: steers towards {missing} but the artifact "
                                      f"has no energy models for that side (it has "
                                      f"{sorted(artifact.sides)})"])
    return Rail(
        name=spec.name,
        layers=layers,
        source=source,
        steerer=steerer,
        energies=shared,
        plugins={
            "activation_source": spec.activation_source.plugin,
            "steerer": spec.steerer.plugin,
        },
        fingerprint=fingerprint,
        disabled=disabled,
        gate=gate,
        below=below,
        above=above,
        budget=calibrated.budget.model_dump(exclude_none=True) if calibrated else {},
        directions=directions,
        strength_limit=strength_limit(tuned, steerer, directions, below, above),
    )


def strength_limit(calibrated: Calibration | None, steerer: Steerer,
                   directions: dict[str, Direction], below: float | None,
                   above: float | None) -> float:
    """The largest strength ``calibrated`` (the calibration of this rail's steerer) vouches
    for: on each side the rail steers, the largest value of the steerer's ``strength_param``
    calibration tried, at the side's other tunable values and the chosen threshold, whose
    setting held the safety budget, over the value the side steers with now; the smallest
    over the sides. 1 without that evidence (no calibration, one for another steerer, or one
    that stored no curves), and never below 1: the calibrated strength held the budget."""
    curves = (calibrated.model_extra or {}).get("curves") if calibrated is not None else None
    if not isinstance(curves, dict):
        return 1.0
    limits = []
    for side, threshold in (("answer", below), ("refuse", above)):
        if threshold is None:
            continue
        own = directions[side].steerer if side in directions else steerer
        param = own.strength_param
        current = getattr(own.params, param, None) if param else None
        if param is None or not isinstance(current, (int, float)) or current <= 0:
            return 1.0
        others = {name: getattr(own.params, name) for name in own.tunable if name != param}
        tried = [_curve_values(c) for c in curves.get(side) or []
                 if isinstance(c, dict) and c.get("feasible") is True
                 and c.get("threshold") == threshold]
        values = [float(v[param]) for v in tried
                  if isinstance(v.get(param), (int, float))
                  and all(v.get(name) in (value, None) for name, value in others.items())]
        limits.append(max(values) / current if values else 1.0)
    return max(1.0, min(limits)) if limits else 1.0


def calibration_of(artifact: EnergyArtifact, rail: str) -> Calibration | None:
    """What ``guardrail calibrate`` stored in ``artifact`` for ``rail`` (None if nothing)."""
    found = artifact.calibration
    if found is None or found.rail not in (None, rail):
        return None
    return found


def _gate(spec: GateSpec, fitted: GateSet | None, calibrated: Calibration | None, key: str,
          artifact: str, where: str) -> tuple[GateSet, float | None, float | None]:
    """The rail's fitted gate and its thresholds, ``auto`` read from the calibration."""
    if fitted is None:
        raise PolicyError(where, [f"{key}: the artifact {artifact} has no fitted gate; retrain "
                                  "it with `guardrail train` from this policy"])
    wanted = [m.plugin for m in spec.members]
    stored = [m.plugin for m in fitted.members]
    if wanted != stored:
        raise PolicyError(where, [f"{key}.members: the policy names {wanted} but the artifact "
                                  f"{artifact} was fitted with {stored}; retrain it"])
    thresholds: list[float | None] = []
    for side in ("below", "above"):
        value = getattr(spec, side)
        if value == "auto":
            chosen = calibrated.gate if calibrated is not None else None
            value = getattr(chosen, side) if chosen is not None else "missing"
            if value == "missing":
                raise PolicyError(where, [
                    f"{key}.{side}: 'auto' takes the threshold `guardrail calibrate` stores in "
                    f"the artifact, and {artifact} has none; run `guardrail calibrate --policy "
                    f"{where}` or give a number"])
        thresholds.append(None if value is None else float(value))
    return fitted, thresholds[0], thresholds[1]


def with_steerer(rail: Rail, spec: PluginSpec, registry: Registry) -> Rail:
    """``rail`` with the steerer ``spec`` names on every side; its source and energy models
    are shared."""
    plugins = {**rail.plugins, "steerer": spec.plugin}
    steerer = create_steerer(spec, registry)
    directions = {side: Direction(d.energies, steerer) for side, d in rail.directions.items()}
    return dataclasses.replace(rail, steerer=steerer, plugins=plugins, directions=directions)


def create_steerer(spec: PluginSpec, registry: Registry) -> Steerer:
    """The steerer a rail's ``steerer:`` section names, with its validated params."""
    steerer = registry.create("steerer", spec.plugin, spec.params)
    assert isinstance(steerer, Steerer)
    return steerer


def _artifact(spec: RailSpec, key: str, registry: Registry, fingerprint: dict[str, Any],
              device: torch.device, where: str) -> EnergyArtifact | None:
    """The rail's energy-model artifact, loaded and checked against the model (None: no
    energy model)."""
    if spec.energy_model is None:
        return None
    artifact_path = spec.energy_model.artifact
    if artifact_path is None:
        raise PolicyError(where, [f"{key}.energy_model.artifact: missing; train one first"])
    try:
        artifact = EnergyArtifact.load(artifact_path, registry, device=device)
    except ArtifactError as exc:
        raise ArtifactError(f"{where}: {key}.energy_model.artifact: {exc}") from exc
    artifact.check_model(fingerprint, f"{where}: {key}.energy_model.artifact {artifact_path}")
    return artifact


def _energies(
    artifact: EnergyArtifact, spec: RailSpec, key: str, where: str
) -> tuple[list[int], dict[str, dict[int, EnergyModel]], dict[int, str]]:
    """The rail's layers; per side (``shared``, or ``answer``/``refuse``), the energy model its
    artifact holds for each of those layers; and the layers the artifact disabled at load
    (non-finite weights), which the rail leaves out."""
    assert spec.energy_model is not None
    sets, disabled_sets = artifact.sets(), artifact.disabled_sets()
    stored = sorted({layer for side in sets for layer in (*sets[side], *disabled_sets[side])})
    layers = stored if spec.layers == "auto" else list(spec.layers)
    missing = [layer for layer in layers if layer not in stored]
    if missing:
        raise PolicyError(
            where,
            [
                f"{key}.layers: {missing} are not in the artifact {spec.energy_model.artifact} "
                f"(it has {stored})"
            ],
        )
    disabled: dict[int, str] = {}
    for side, found in disabled_sets.items():
        for layer, why in found.items():
            if layer in layers:
                disabled[layer] = why if side == SHARED else f"{side}: {why}"
    chosen = {side: {layer: models[layer] for layer in layers if layer in models}
              for side, models in sets.items()}
    empty = [side for side, models in chosen.items() if not models]
    if empty:
        raise ArtifactError(
            f"{where}: {key}.energy_model.artifact {spec.energy_model.artifact}: every layer the "
            f"rail steers is disabled "
            f"({', '.join(f'{k}: {v}' for k, v in disabled.items()) or 'none of them stored'})"
            + ("" if empty == [SHARED] else f" for side {', '.join(empty)}")
        )
    steered = sorted({layer for models in chosen.values() for layer in models})
    return steered, chosen, disabled


def create_output_rails(policy: Policy, registry: Registry) -> list[OutputRail]:
    """The policy's output rails, created with their validated params, in order."""
    out = []
    for spec in policy.output_rails:
        rail = registry.create("output_rail", spec.plugin, spec.params)
        assert isinstance(rail, OutputRail)
        out.append(rail)
    return out


def create_classifier(policy: Policy, registry: Registry) -> RefusalClassifier:
    """The policy's refusal classifier, created with its validated params."""
    classifier = registry.create(
        "refusal_classifier", policy.classifier.plugin, policy.classifier.params
    )
    assert isinstance(classifier, RefusalClassifier)
    return classifier


def variant_rails(policy: Policy, variant: Policy, rails: list[Rail], registry: Registry
                  ) -> list[Rail]:
    """``rails`` (built for ``policy``) under ``variant``, which may change steerer params only:
    the rails whose steerer changed get a new one, everything else is shared."""
    where = str(variant.path or variant.name)
    if _but_steerer_params(variant) != _but_steerer_params(policy):
        raise PolicyError(where, ["a variant of a loaded policy may change steerer params "
                                  "only; load any other policy with Guardrail.from_policy"])
    problems = check_plugins(variant, registry)
    if problems:
        raise PolicyError(where, problems)
    pairs = zip([s for s in variant.rails if s.enabled],
                [s for s in policy.rails if s.enabled], rails, strict=True)
    return [rail if new == old else with_steerer(rail, new.steerer, registry)
            for new, old, rail in pairs]


def _but_steerer_params(policy: Policy) -> dict[str, Any]:
    """The policy as data, less its name and its rails' steerer params."""
    return policy.model_dump(exclude={"name": True, "rails": {"__all__": {"steerer": {"params"}}}})


def _curve_values(point: dict[str, Any]) -> dict[str, Any]:
    """The steerer values a calibration curve's point was steered with: its ``steerer``
    mapping, or (artifacts calibrated before curves named them so) its own keys."""
    values = point.get("steerer")
    return values if isinstance(values, dict) else point
