"""Render a JSON Schema as the Markdown reference in docs/: the schema's descriptions are the one
source of field documentation, and a test keeps the rendered file in step with them."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from provisioner.config.schema import schema


def _type(node: Mapping[str, Any]) -> str:
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    kinds = node.get("type")
    if kinds is None and ("oneOf" in node or "anyOf" in node):
        kinds = [_type(option) for option in node.get("oneOf", node.get("anyOf", []))]
        return " or ".join(dict.fromkeys(kinds))
    if isinstance(kinds, list):
        return " or ".join(kinds)
    if kinds == "array" and isinstance(node.get("items"), Mapping):
        return f"list of {_type(node['items'])}"
    return str(kinds or "any")


def _rows(node: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, str, str, str]]:
    for name, child in node.get("properties", {}).items():
        key = f"{prefix}{name}"
        default = json.dumps(child["default"]) if "default" in child else ""
        text = " ".join(str(child.get("description", "")).split()).replace("|", "\\|")
        yield key, _type(child), default, text
        if "properties" in child:
            yield from _rows(child, key + ".")


def markdown(kind: str) -> str:
    doc = schema(kind)
    lines = [f"# {doc.get('title', kind)}", "",
             "Generated from `provisioner/config/schemas/" + kind + ".schema.json` by "
             f"`provision schema {kind} --markdown`; edit the schema, not this file.", "",
             " ".join(str(doc.get("description", "")).split()), "",
             "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for key, kind_text, default, text in _rows(doc, ""):
        lines.append(f"| `{key}` | {kind_text} | {f'`{default}`' if default else ''} | {text} |")
    return "\n".join(lines) + "\n"
