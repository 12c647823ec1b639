"""A steerer's tunable parameters: the grids ``calibration.grid`` and ``guardrail sweep --grid``
set, keyed by the names the steerer itself declares.

The core knows no steerer's knobs. A steerer lists the ``Params`` fields it lets calibration
and sweeps set in its ``tunable`` class attribute (checked against its ``Params`` when it is
registered); a grid maps some of those names to the values to try, and each value is checked
by the steerer's own ``Params``. A grid point is the ``(name, value)`` pairs of one
combination, in the order the steerer declares them, so points sort the way the steerer
lists its knobs (the smaller first value first).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from guardrail.errors import PluginError
from guardrail.policy.model import PluginSpec, Policy, RailSpec, shown

if TYPE_CHECKING:
    from guardrail.plugin.registry import Registry

#: A grid: parameter name -> the values to try.
Grid = Mapping[str, Sequence[Any]]
#: One grid point: ``(name, value)`` pairs in the steerer's ``tunable`` order; hashable, and
#: sortable when the values of one name are.
Point = tuple[tuple[str, Any], ...]


def tunable(registry: Registry, steerer: str) -> tuple[str, ...]:
    """The ``Params`` fields steerer plugin ``steerer`` (a name or alias) lets a grid set."""
    return tuple(registry.get("steerer", steerer).attribute("tunable"))


def grid_problems(grid: Grid, steerer: PluginSpec, registry: Registry, where: str) -> list[str]:
    """What is wrong with ``grid`` for the rail steerer ``steerer``: names it does not declare
    tunable, and values its ``Params`` refuse (each line starts with ``where.NAME``)."""
    try:
        entry = registry.get("steerer", steerer.plugin)
    except PluginError:
        return []  # the unknown steerer is reported where the rail is checked
    names = tuple(entry.attribute("tunable"))
    problems = []
    for name, values in grid.items():
        if name not in names:
            problems.append(f"{where}.{name}: not a tunable parameter of steerer "
                            f"{entry.name!r} (tunable: {', '.join(names) or 'none'})")
            continue
        for i, value in enumerate(values):
            try:
                entry.Params.model_validate({**steerer.params, name: value})
            except ValidationError as exc:
                problems += [f"{where}.{name}[{i}]: got {shown(value)}; expected "
                             f"{err['msg'].removeprefix('Value error, ').lower()}"
                             for err in exc.errors() if err["loc"][:1] == (name,)]
    return problems


def calibrated_rail(policy: Policy) -> RailSpec | None:
    """The rail ``guardrail calibrate`` tunes: ``calibration.rail``, else ``training.rail``,
    else the first rail with an energy model (None: no such rail)."""
    section = policy.calibration
    name = (section.rail if section else None) or (
        policy.training.rail if policy.training else None)
    return next((rail for rail in policy.rails if rail.energy_model is not None
                 and (name is None or rail.name == name)), None)


def calibration_grid_problems(policy: Policy, registry: Registry) -> list[str]:
    """``calibration.grid`` and ``calibration.refuse_grid`` checked against the steerer of the
    rail calibration tunes."""
    section = policy.calibration
    rail = calibrated_rail(policy)
    if section is None or rail is None:
        return []
    problems = grid_problems(section.grid, rail.steerer, registry, "calibration.grid")
    if section.refuse_grid is not None:
        problems += grid_problems(section.refuse_grid, rail.steerer, registry,
                                  "calibration.refuse_grid")
    return problems


def grid_points(grid: Grid, steerer: PluginSpec, registry: Registry) -> list[Point]:
    """Every combination of ``grid``'s values, each validated by the steerer's ``Params``
    (values as they coerce them: ``1`` for a float field is ``1.0``), sorted. An empty grid
    is one point with no values: the steerer as the policy sets it."""
    entry = registry.get("steerer", steerer.plugin)
    order = tuple(entry.attribute("tunable"))
    names = [n for n in order if n in grid] + [n for n in grid if n not in order]
    points = set()
    for combo in itertools.product(*(grid[n] for n in names)):
        params = entry.Params.model_validate({**steerer.params, **dict(zip(names, combo,
                                                                           strict=True))})
        points.add(tuple((n, getattr(params, n)) for n in names))
    return sorted(points)


def point_label(point: Point | Mapping[str, Any]) -> str:
    """``NAME=0.5,OTHER=3``: how a point names a policy variant and labels reports."""
    pairs = point.items() if isinstance(point, Mapping) else point
    return ",".join(f"{name}={shown_value(value)}" for name, value in pairs)


def shown_value(value: Any) -> str:
    """A grid value for a label or table: numbers compactly (``0.1``, ``3``)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:g}"
    return str(value)


def with_steerer_values(policy: Policy, values: Mapping[int, Mapping[str, Any]], label: str
                        ) -> Policy:
    """``policy`` with the steerer params of rail ``i`` updated by ``values[i]``, renamed
    ``policy.name[label]`` (params are validated when the variant's rails are built)."""
    rails = list(policy.rails)
    for index, update in values.items():
        steerer = rails[index].steerer
        rails[index] = rails[index].model_copy(update={"steerer": steerer.model_copy(
            update={"params": {**steerer.params, **update}})})
    variant = policy.model_copy(update={"rails": rails, "name": f"{policy.name}[{label}]"})
    variant._path = policy.path
    return variant
