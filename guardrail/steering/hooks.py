"""Where the hidden state is changed: forward hooks on the rails' layers that steer during
``generate`` (:meth:`SteeringSession._steer`, which hands each layer's states to the rail's
steerer plugin, ``Steerer.steer``, and writes what it returns back into the layer's output).

Prefill (a forward over more than one position) steers the positions the activation source
names for prompts (default: the last prompt token); decoding steers each new token. Rails
stack in policy order. A rail with a gate steers only the rows its gate let through, each
towards the side the gate chose (``rows``: per rail, side -> row mask, decided before
generation): rows on the ``answer`` side with that side's energy models and steerer, rows on
the ``refuse`` side with the other's; the rest pass the rail's layers untouched. Telemetry is
kept per row, per rail and layer, on the model's device until it is read, so the hooks never
wait on it.

A position whose energy (or steered state) is not finite is left as it was: a skip, counted
in the row's ``nonfinite_positions`` and logged once per row and layer by
:func:`log_nonfinite` after the call, not once per decoding step.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import structlog
import torch
from torch import nn

from guardrail.errors import PluginError
from guardrail.plugin.components import Phase, SteerContext, Steerer
from guardrail.plugin.energy_model import EnergyModel
from guardrail.steering.rails import SHARED, Rail
from guardrail.telemetry import LayerTelemetry, StepEvent

log = structlog.get_logger("guardrail.steering.hooks")


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
        rows: dict[str, dict[str, torch.Tensor]] | None = None,
    ) -> None:
        self.model = model
        self.rails = rails
        self.measure_only = measure_only
        self.on_step = on_step
        #: While True the hooks pass every output through (a gate's own forward pass).
        self.paused = False
        #: Under ``attach()``: the last prompt's gate decisions (rail -> score, sides).
        self.gate_decisions: dict[str, Any] = {}
        self._handles: list[Any] = []
        self.records: dict[tuple[str, int], dict[str, list[_Record]]] = defaultdict(
            lambda: {"prefill": [], "decode": []}
        )
        self.set_rows(rows)

    def set_rows(self, rows: dict[str, dict[str, torch.Tensor]] | None) -> None:
        """Which rows each gated rail steers, per side (``rows[rail][side]``: a bool mask);
        a rail not named steers every row on its shared side. Clears earlier telemetry."""
        self.rows = rows or {}
        # rail name -> [(side, indices of the batch rows on that side)].
        self.row_index = {name: [(side, mask.nonzero().flatten()) for side, mask in sides.items()]
                          for name, sides in self.rows.items()}
        self.records.clear()

    def sides_of(self, rail: str, batch: int) -> list[str | None]:
        """Per row, the side ``rail`` steers it towards (None: left alone)."""
        if rail not in self.rows:
            return [SHARED] * batch
        out: list[str | None] = [None] * batch
        for side, mask in self.rows[rail].items():
            for row in mask.nonzero().flatten().tolist():
                out[row] = side
        return out

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
            if self.paused:
                return output
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
        parts: list[tuple[str, torch.Tensor | None]] | None = \
            self.row_index.get(rail.name)  # type: ignore[assignment]
        if parts is None:
            parts = [(SHARED, None)]
        new_states = None
        records = []
        for side, index in parts:
            direction = rail.direction(side)
            energy = direction.energies.get(layer)
            if energy is None and direction.energies:
                continue  # this side has no energy model at this layer
            selected = states[:, window, :] if index is None else states[index, window, :]
            rows, positions = selected.shape[0], selected.shape[1]
            flat = selected.reshape(-1, hidden)
            ctx = SteerContext(rail=rail.name, layer=layer, phase=phase)
            if rows == 0:
                new_flat, record = flat, _Record(None, None, None, None, None)
            elif self.measure_only:
                new_flat, record = flat, self._measure(energy, flat)
            else:
                new_flat, record = self._run_steerer(rail, direction.steerer, flat, energy, ctx)
            records.append(_last_position(record, rows, positions, index, batch))
            if new_flat is flat:
                continue
            if new_states is None:
                new_states = states.clone()
            steered = new_flat.reshape(rows, positions, hidden).to(states.dtype)
            if index is None:
                new_states[:, window, :] = steered
            else:
                new_states[index, window, :] = steered
        record = _merge(records, batch, states.device)
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
        if new_states is None:
            return output
        return rail.source.write(output, new_states)

    @staticmethod
    def _run_steerer(
        rail: Rail, steerer: Steerer, flat: torch.Tensor, energy: EnergyModel | None,
        ctx: SteerContext
    ) -> tuple[torch.Tensor, _Record]:
        """The steerer's states (rows it made non-finite put back as they were) and record."""
        try:
            outcome = steerer.steer(flat, energy, ctx)
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
        sides = {rail.name: self.sides_of(rail.name, len(completion_lengths))
                 for rail in self.rails}
        for (rail, layer), phases in self.records.items():
            prefill = _on_cpu(phases["prefill"][-1]) if phases["prefill"] else None
            decode = [_on_cpu(r) for r in phases["decode"]]
            for row, length in enumerate(completion_lengths):
                item = LayerTelemetry(rail=rail, layer=layer, side=sides[rail][row])
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


def _merge(records: list[_Record], batch: int, device: torch.device) -> _Record:
    """One record for the whole batch from the records of its sides (disjoint rows)."""
    if len(records) == 1:
        return records[0]
    covered = torch.zeros(batch, dtype=torch.bool, device=device)
    fields: list[torch.Tensor | None] = [None] * 5
    for record in records:
        rows = record.rows if record.rows is not None else torch.ones(
            batch, dtype=torch.bool, device=device)
        covered |= rows
        for i, value in enumerate((record.energy_before, record.energy_after, record.steps,
                                   record.steered, record.nonfinite)):
            if value is None:
                continue
            current = fields[i]
            fields[i] = torch.where(rows, value, current) if current is not None else (
                torch.where(rows, value, torch.zeros_like(value)))
    return _Record(*fields, covered)  # type: ignore[call-arg]  # five fields, then rows


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
        out.energy_before, out.energy_after, out.steps, out.steered, out.nonfinite)),
        covered)  # type: ignore[call-arg]


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
