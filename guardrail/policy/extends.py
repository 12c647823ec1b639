"""``extends``: a child policy merged over its parent.

Mappings merge key by key, lists are replaced, and rails merge by name (a child rail that names a
parent's rail changes it; a new name adds one). A component whose child names another plugin is
replaced whole: none of the parent's params or calibration grids, which belong to the old plugin,
are inherited.
"""

from __future__ import annotations

from typing import Any


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A child policy (``override``) over its parent: ``rails`` merge by name
    (:func:`merge_rails`), other mappings merge recursively, and other lists and scalars in
    ``override`` replace those in ``base``."""
    merged = _merge_mappings(base, {k: v for k, v in override.items() if k != "rails"})
    if "rails" in override:
        rails = override["rails"]
        parent = base.get("rails")
        both = isinstance(rails, list) and isinstance(parent, list)
        merged["rails"] = merge_rails(parent, rails) if both else rails  # type: ignore[arg-type]
        calibration = merged.get("calibration")
        if both and isinstance(calibration, dict) and _swaps_a_steerer(parent or [], rails):
            # Calibration grids name the parent steerer's knobs: like its params, they are not
            # inherited by a child that swaps the steerer (unless the child gives its own).
            own = override.get("calibration")
            merged["calibration"] = {k: v for k, v in calibration.items() if k not in (
                "grid", "refuse_grid") or (isinstance(own, dict) and k in own)}
    return merged


def _swaps_a_steerer(parent: list[Any], child: list[Any]) -> bool:
    steerers = {r["name"]: r["steerer"] for r in parent
                if isinstance(r, dict) and "name" in r and isinstance(r.get("steerer"), dict)}
    return any(isinstance(r, dict) and isinstance(r.get("steerer"), dict)
               and r.get("name") in steerers
               and _names_another_plugin(steerers[r["name"]], r["steerer"]) for r in child)


def merge_rails(parent: list[Any], child: list[Any]) -> list[Any]:
    """The parent's rails with the child's merged in by ``name``.

    A child rail whose name the parent has is deep-merged into it, in the parent's place
    (``enabled: false`` removes it instead); a rail with a new name is appended.
    """
    rails = list(parent)
    where = {rail["name"]: i for i, rail in enumerate(rails)
             if isinstance(rail, dict) and isinstance(rail.get("name"), str)}
    dropped: set[int] = set()
    for rail in child:
        name = rail.get("name") if isinstance(rail, dict) else None
        if not isinstance(name, str) or name not in where:
            rails.append(rail)  # new (or nameless: validation reports it)
        elif rail.get("enabled") is False:
            dropped.add(where[name])
        else:
            rails[where[name]] = _merge_mappings(rails[where[name]], rail)
    return [rail for i, rail in enumerate(rails) if i not in dropped]


def _merge_mappings(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    if _names_another_plugin(base, override):
        # Another plugin's params mean nothing to this one: the child's section replaces the
        # parent's whole (a steerer swapped for a plugin of your own inherits no `normalize`).
        return dict(override)
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_mappings(merged[key], value)
        else:
            merged[key] = value
    return merged


def _names_another_plugin(base: dict[str, Any], override: dict[str, Any]) -> bool:
    """Whether a component section of the child names a plugin other than the parent's (by
    the name as written: an alias of the same plugin counts as another name)."""
    return "plugin" in override and "plugin" in base and override["plugin"] != base["plugin"]
