"""The steering runtime: forward hooks on the rails' layers that steer during ``generate``.

Prefill (a forward over more than one position) steers the positions the activation source
names for prompts (default: the last prompt token); decoding steers each new token. Rails
stack in policy order. A rail with a gate steers only the rows its gate let through (``rows``,
decided before generation); the others pass its layers untouched. Telemetry is kept per row,
per rail and layer, on the model's device until it is read, so the hooks never wait on it.

A position whose energy (or steered state) is not finite is left as it was: a skip, counted
in the row's ``nonfinite_positions`` and logged once per row and layer by
:func:`log_nonfinite` after the call, not once per decoding step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch
from torch import nn

from guardrail.components import ActivationSource, EnergyModel, Phase, SteerContext, Steerer
from guardrail.errors import PluginError
from guardrail.gating import GateSet
from guardrail.telemetry import LayerTelemetry, StepEvent

log = structlog.get_logger("guardrail.steering")


@dataclass
class Rail:
    """A steering rail ready to run: its components and, per layer, its energy model."""

    name: str
    layers: list[int]
    source: ActivationSource
    steerer: Steerer
    energies: dict[int, EnergyModel] = field(default_factory=dict)
    plugins: dict[str, str] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    #: Which prompts the rail steers, and its thresholds (None: every row).
    gate: GateSet | None = None
    below: float | None = None
    above: float | None = None
    #: The safety budget the artifact was calibrated to (``guardrail calibrate``), if any.
    budget: dict[str, Any] = field(default_factory=dict)
    #: Layers the policy names that are not steered, and why (non-finite artifact weights).
    disabled: dict[int, str] = field(default_factory=dict)


@dataclass
class _Record:
    """Per-row values from one step at one (rail, layer); ``rows`` marks the rows it covers
    (None: all), the others were not steered by this rail's gate."""

    energy_before: torch.Tensor | None
    energy_after: torch.Tensor | None
    steps: torch.Tensor | None
    steered: torch.Tensor | None
    nonfinite: torch.Tensor | None
    rows: torch.Tensor | None = None


class SteeringSession:
    """Hooks installed on enter, removed on exit; ``measure_only`` scores without steering."""

    def __init__(
        self,
        model: nn.Module,
        rails: list[Rail],
        *,
        measure_only: bool = False,
        on_step: Any = None,
        rows: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.model = model
        # rail name -> indices of the batch rows it steers (a gate's decision).
        self.row_index = {name: mask.nonzero().flatten() for name, mask in (rows or {}).items()}
        self.rails = rails
        self.measure_only = measure_only
        self.on_step = on_step
        self._handles: list[Any] = []
        self.records: dict[tuple[str, int], dict[str, list[_Record]]] = defaultdict(
            lambda: {"prefill": [], "decode": []}
        )

    def __enter__(self) -> SteeringSession:
        by_module: dict[int, tuple[nn.Module, list[tuple[Rail, int]]]] = {}
        for rail in self.rails:
            modules = rail.source.modules(self.model)
            for layer in rail.layers:
                if layer >= len(modules):
                    raise PluginError(
                        f"rail {rail.name!r}: layer {layer} does not exist "
                        f"({len(modules)} layers found by "
                        f"{rail.plugins.get('activation_source')!r})"
                    )
                module = modules[layer]
                by_module.setdefault(id(module), (module, []))[1].append((rail, layer))
        for module, entries in by_module.values():
            self._handles.append(module.register_forward_hook(self._make_hook(entries)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _make_hook(self, entries: list[tuple[Rail, int]]) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            for rail, layer in entries:
                output = self._steer(rail, layer, output)
            return output

        return hook

    def _steer(self, rail: Rail, layer: int, output: Any) -> Any:
        states = rail.source.read(output)
        batch, seq_len, hidden = states.shape
        phase: Phase = "prefill" if seq_len > 1 else "decode"
        window = rail.source.positions(phase, seq_len)
        if window is None:
            return output
        index = self.row_index.get(rail.name)
        selected = states[:, window, :] if index is None else states[index, window, :]
        rows, positions = selected.shape[0], selected.shape[1]
        flat = selected.reshape(-1, hidden)
        energy = rail.energies.get(layer)
        ctx = SteerContext(rail=rail.name, layer=layer, phase=phase)
        if rows == 0:
            new_flat, record = flat, _Record(None, None, None, None, None)
        elif self.measure_only:
            new_flat, record = flat, self._measure(energy, flat)
        else:
            new_flat, record = self._run_steerer(rail, flat, energy, ctx)
        record = _last_position(record, rows, positions, index, batch)
        self.records[(rail.name, layer)][phase].append(record)
        if self.on_step is not None:
            self.on_step(
                StepEvent(
                    rail=rail.name,
                    layer=layer,
                    phase=phase,
                    energy_before=_tolist(record.energy_before),
                    energy_after=_tolist(record.energy_after),
                    steps=_tolist(record.steps),
                    steered=_tolist(record.steered),
                )
            )
        if new_flat is flat:
            return output
        new_states = states.clone()
        steered = new_flat.reshape(rows, positions, hidden).to(states.dtype)
        if index is None:
            new_states[:, window, :] = steered
        else:
            new_states[index, window, :] = steered
        return rail.source.write(output, new_states)

    @staticmethod
    def _run_steerer(
        rail: Rail, flat: torch.Tensor, energy: EnergyModel | None, ctx: SteerContext
    ) -> tuple[torch.Tensor, _Record]:
        """The steerer's states (rows it made non-finite put back as they were) and record."""
        try:
            outcome = rail.steerer.steer(flat, energy, ctx)
        except Exception as exc:
            raise PluginError(
                f"plugin {rail.plugins.get('steerer')!r} raised in Steerer.steer "
                f"(rail {rail.name!r}, layer {ctx.layer}, {ctx.phase}): "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        new_flat = outcome.states
        # A steerer must never return non-finite states; if one does, those rows keep their
        # input and count as skipped. No host sync here: warnings come after the call.
        bad_rows = ~torch.isfinite(new_flat).all(dim=-1)
        new_flat = torch.where(bad_rows[:, None], flat, new_flat)
        nonfinite = bad_rows if outcome.nonfinite is None else outcome.nonfinite | bad_rows
        record = _Record(
            outcome.energy_before,
            outcome.energy_after,
            outcome.steps,
            outcome.steered,
            nonfinite,
        )
        return new_flat, record

    @staticmethod
    def _measure(energy: EnergyModel | None, flat: torch.Tensor) -> _Record:
        if energy is None:
            return _Record(None, None, None, None, None)
        with torch.no_grad():
            values = energy.energy(flat.float())
        return _Record(values, values, None, None, ~torch.isfinite(values))

    def telemetry(self, completion_lengths: list[int]) -> list[list[LayerTelemetry]]:
        """Per row, one :class:`LayerTelemetry` per (rail, layer), counting only real tokens."""
        rows: list[list[LayerTelemetry]] = [[] for _ in completion_lengths]
        for (rail, layer), phases in self.records.items():
            prefill = _on_cpu(phases["prefill"][-1]) if phases["prefill"] else None
            decode = [_on_cpu(r) for r in phases["decode"]]
            for row, length in enumerate(completion_lengths):
                item = LayerTelemetry(rail=rail, layer=layer)
                if prefill is not None:
                    item.energy_before = _item(prefill.energy_before, row, prefill.rows)
                    item.energy_after = _item(prefill.energy_after, row, prefill.rows)
                    _count(item, prefill, row)
                # The token produced by the prefill is never re-fed, so decode step i sees token i.
                steps = decode[: max(length - 1, 0)]
                before = [v for r in steps
                          if (v := _item(r.energy_before, row, r.rows)) is not None]
                after = [v for r in steps if (v := _item(r.energy_after, row, r.rows)) is not None]
                item.generated_positions = len(steps)
                if before:
                    item.mean_energy_before_generated = sum(before) / len(before)
                if after:
                    item.mean_energy_after_generated = sum(after) / len(after)
                for record in steps:
                    _count(item, record, row)
                rows[row].append(item)
        return rows


def _on_cpu(record: _Record) -> _Record:
    """The record with its tensors on the CPU (one transfer each, when telemetry is read)."""
    return _Record(*(None if t is None else t.cpu() for t in (
        record.energy_before, record.energy_after, record.steps, record.steered,
        record.nonfinite, record.rows)))


def log_nonfinite(rows: list[list[LayerTelemetry]], **fields: Any) -> None:
    """One ``steer.nonfinite_skipped`` warning per row (request) and layer that skipped."""
    for row, layers in enumerate(rows):
        for item in layers:
            if item.nonfinite_positions:
                log.warning("steer.nonfinite_skipped", rail=item.rail, layer=item.layer,
                            row=row, positions=item.nonfinite_positions,
                            action="left unsteered", **fields)


def _last_position(record: _Record, rows: int, positions: int, index: torch.Tensor | None,
                   batch: int) -> _Record:
    """Keep each row's last steered position (the one telemetry reports); a row counts as
    skipped when any of its positions was. Rows a gate kept out are marked uncovered."""

    def last(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().reshape(rows, positions)[:, -1]

    nonfinite = record.nonfinite
    out = _Record(
        last(record.energy_before),
        last(record.energy_after),
        last(record.steps),
        last(record.steered),
        None if nonfinite is None else nonfinite.detach().reshape(rows, positions).any(-1),
    )
    if index is None:
        return out
    covered = torch.zeros(batch, dtype=torch.bool, device=index.device)
    covered[index] = True
    return _Record(*(None if t is None else _scatter(t, index, batch) for t in (
        out.energy_before, out.energy_after, out.steps, out.steered, out.nonfinite)), covered)


def _scatter(values: torch.Tensor, index: torch.Tensor, batch: int) -> torch.Tensor:
    """A ``[batch]`` tensor holding ``values`` at ``index`` (zeros/False elsewhere)."""
    full = torch.zeros(batch, dtype=values.dtype, device=values.device)
    full[index] = values
    return full


def _tolist(t: torch.Tensor | None) -> list[Any] | None:
    return None if t is None else t.tolist()


def _item(t: torch.Tensor | None, row: int, covered: torch.Tensor | None = None
          ) -> float | None:
    if t is None or (covered is not None and not bool(covered[row])):
        return None
    value = float(t[row])
    return value if value == value and abs(value) != float("inf") else None


def _count(item: LayerTelemetry, record: _Record, row: int) -> None:
    if record.rows is not None and not bool(record.rows[row]):
        return
    if record.steps is not None:
        item.steps += int(record.steps[row])
    if record.steered is not None:
        steered = bool(record.steered[row])
        item.steered_positions += int(steered)
        item.gated_positions += int(not steered)
    if record.nonfinite is not None:
        item.nonfinite_positions += int(bool(record.nonfinite[row]))
