"""The JSON Schema of a policy file, as editors and CI check it (``guardrail policy schema``).

It is the pydantic schema of :class:`~guardrail.policy.model.Policy` with what validation adds:

- ``extends``: a file that extends another may leave out anything its parent gives (each
  rail still needs its ``name``, which is how rails merge), so such a file is checked
  against a *partial* variant in which no other key is required;
- typed plugin sections: each ``{plugin, params}`` section lists the registered names of
  its kind (aliases included) and checks ``params`` against the chosen component's
  ``Params`` schema (the default component's when ``plugin`` is left out of a complete file).
"""

from __future__ import annotations

import copy
import json
from typing import TYPE_CHECKING, Any

from guardrail.plugin.defaults import DEFAULT_COMPONENTS
from guardrail.policy.model import Policy

if TYPE_CHECKING:
    from guardrail.plugin.registry import Registry

# Rail keys and the top-level classifier: their component kind.
_SECTIONS = {"activation_source": "activation_source", "steerer": "steerer",
             "energy_model": "energy_model", "classifier": "refusal_classifier"}
_KEEP_REQUIRED = {"RailSpec": ["name"]}  # in a partial file: rails merge by name
_NO_PLUGIN = {"not": {"required": ["plugin"]}}
PARTIAL = "Partial"


def policy_schema(registry: Registry | None = None) -> dict[str, Any]:
    """The schema as a mapping; with ``registry``, plugin sections are typed."""
    full = Policy.model_json_schema()
    defs: dict[str, Any] = full.pop("$defs", {})
    if registry is not None:
        _type_plugin_sections(full, defs, registry)
    partial_defs = {f"{name}{PARTIAL}": _partial(name, body) for name, body in defs.items()}
    top = _partial("Policy", full)
    top["properties"] = {
        "extends": {
            "type": "string", "minLength": 1,
            "description": "Parent policy: a path relative to this file, or a shipped "
                           "policy's name. Mappings merge, rails merge by name, other values "
                           "and lists replace the parent's.",
        },
        **top["properties"],
    }
    full_ref = {"$ref": "#/$defs/Policy"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": full.get("title", "Policy"),
        "description": full.get("description", ""),
        **{k: v for k, v in top.items() if k not in ("title", "description")},
        # A complete file (no extends) must have everything a policy needs.
        "if": {"required": ["extends"]},
        "else": full_ref,
        "$defs": {"Policy": full, **defs, **partial_defs},
    }


def policy_json_schema(registry: Registry | None = None) -> str:
    """The schema as indented JSON."""
    return json.dumps(policy_schema(registry), indent=2)


def _partial(name: str, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` for a file that extends another: nothing required but a rail's name, refs
    to partial definitions, and no default component for a section that names none."""
    out = _rewrite_refs(copy.deepcopy(body), lambda ref: f"{ref}{PARTIAL}")
    _strip_required(out)
    if name in _KEEP_REQUIRED:
        out["required"] = _KEEP_REQUIRED[name]
    if "allOf" in out:
        out["allOf"] = [c for c in out["allOf"] if c.get("if") != _NO_PLUGIN]
    return out


def _strip_required(node: Any) -> None:
    if isinstance(node, dict):
        node.pop("required", None)
        for key, value in node.items():
            if key != "if":  # conditions test for keys; they stay as they are
                _strip_required(value)
    elif isinstance(node, list):
        for value in node:
            _strip_required(value)


def _rewrite_refs(node: Any, rename: Any) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            node["$ref"] = "#/$defs/" + rename(ref.removeprefix("#/$defs/"))
        for value in node.values():
            _rewrite_refs(value, rename)
    elif isinstance(node, list):
        for value in node:
            _rewrite_refs(value, rename)
    return node


def _type_plugin_sections(full: dict[str, Any], defs: dict[str, Any], registry: Registry) -> None:
    """One definition per plugin-section kind, with its names and per-component params."""
    rail = defs["RailSpec"]["properties"]
    for key, kind in _SECTIONS.items():
        holder = full["properties"] if key == "classifier" else rail
        schema = holder[key]
        ref = _find_ref(schema)
        if ref is None:
            continue
        typed_name = _kind_def_name(kind)
        defs[typed_name] = _typed_section(copy.deepcopy(defs[ref]), kind, registry, defs)
        _replace_ref(schema, ref, typed_name)
    outputs = full["properties"].get("output_rails", {}).get("items")
    ref = _find_ref(outputs) if isinstance(outputs, dict) else None
    if outputs is not None and ref is not None:
        typed_name = _kind_def_name("output_rail")
        defs[typed_name] = _typed_section(copy.deepcopy(defs[ref]), "output_rail", registry, defs)
        _replace_ref(outputs, ref, typed_name)


def _typed_section(section: dict[str, Any], kind: str, registry: Registry,
                   defs: dict[str, Any]) -> dict[str, Any]:
    aliases: dict[str, str] = registry.aliases(kind)
    section["title"] = f"{_kind_def_name(kind)}"
    section["properties"]["plugin"] = {
        **{k: v for k, v in section["properties"]["plugin"].items() if k != "type"},
        "type": "string", "enum": sorted(aliases),
        "description": f"A registered {kind.replace('_', ' ')} (guardrail plugins --all).",
    }
    conditions = []
    for entry in registry.registrations(kind):
        params = _hoisted(entry.Params.model_json_schema(), f"{kind}.{entry.name}.", defs)
        names = sorted(k for k, name in aliases.items() if name == entry.name)
        conditions.append({
            "if": {"required": ["plugin"], "properties": {"plugin": {"enum": names}}},
            "then": {"properties": {"params": params}},
        })
        if entry.name == DEFAULT_COMPONENTS.get(kind):
            conditions.append({"if": _NO_PLUGIN, "then": {"properties": {"params": params}}})
    section["allOf"] = conditions
    return section


def _hoisted(schema: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its own ``$defs`` moved into ``defs`` under ``prefix``."""
    own = schema.pop("$defs", {})
    rename = {name: f"{prefix}{name}" for name in own}

    def fix(node: Any) -> Any:
        return _rewrite_refs(node, lambda ref: rename.get(ref, ref))

    for name, body in own.items():
        defs[rename[name]] = fix(body)
    return dict(fix(schema))


def _find_ref(schema: dict[str, Any]) -> str | None:
    if "$ref" in schema:
        return str(schema["$ref"]).removeprefix("#/$defs/")
    for option in schema.get("anyOf", []):
        if "$ref" in option:
            return str(option["$ref"]).removeprefix("#/$defs/")
    return None


def _replace_ref(schema: dict[str, Any], old: str, new: str) -> None:
    for node in (schema, *schema.get("anyOf", [])):
        if node.get("$ref") == f"#/$defs/{old}":
            node["$ref"] = f"#/$defs/{new}"


def _kind_def_name(kind: str) -> str:
    return "".join(part.title() for part in kind.split("_")) + "Section"
