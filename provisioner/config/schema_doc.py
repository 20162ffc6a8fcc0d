"""Render a JSON Schema as the Markdown reference in docs/: the schema's descriptions are the one
source of field documentation, and a test keeps the rendered file in step with them."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from provisioner.config.schema import schema


def _resolve(doc: Mapping[str, Any], node: Mapping[str, Any]) -> Mapping[str, Any]:
    """`node` with its local `$ref` (`#/$defs/...`) filled in; the node's own keys win."""
    if "$ref" not in node:
        return node
    target: Any = doc
    for part in node["$ref"].removeprefix("#/").split("/"):
        target = target[part]
    return {**_resolve(doc, target), **{k: v for k, v in node.items() if k != "$ref"}}


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


def _bounds(node: Mapping[str, Any]) -> str:
    """A value's range as the schema bounds it: `1 to 500`, `> 0, at most 3600`, `at most 16 items`."""
    low = (f"{node['minimum']} to " if "minimum" in node
           else f"> {node['exclusiveMinimum']}, at most " if "exclusiveMinimum" in node else "at most ")
    if "maximum" in node:
        return f", {low}{node['maximum']}"
    if "maxItems" in node:
        return f", at most {node['maxItems']} items"
    return ""


def _rows(doc: Mapping[str, Any], node: Mapping[str, Any], prefix: str) -> Iterator[tuple[str, str, str, str]]:
    for name, written in node.get("properties", {}).items():
        child = _resolve(doc, written)
        key = f"{prefix}{name}"
        default = json.dumps(child["default"]) if "default" in child else ""
        text = _text(child).replace("|", "\\|")
        yield key, _type(child) + _bounds(child), default, text
        if "properties" in written:  # a `$ref`'d definition has its own section
            yield from _rows(doc, child, key + ".")


def markdown(kind: str) -> str:
    """The reference of `kind`: its keys, then one section per `$defs` entry that has keys (the
    inventory's groups and variables)."""
    doc = schema(kind)
    lines = [f"# {doc.get('title', kind)}", "",
             "Generated from `provisioner/config/schemas/" + kind + ".schema.json` by "
             f"`provision schema {kind} --markdown`; edit the schema, not this file.", "",
             _text(doc), ""]
    sections = [("", doc)] + [(name, node) for name, node in doc.get("$defs", {}).items() if "properties" in node]
    for name, node in sections:
        if not node.get("properties"):
            continue
        if name:
            lines += [f"## {name}", "", _text(node), ""]
        lines += ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for key, kind_text, default, text in _rows(doc, node, ""):
            lines.append(f"| `{key}` | {kind_text} | {f'`{default}`' if default else ''} | {text} |")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _text(node: Mapping[str, Any]) -> str:
    return " ".join(str(node.get("description", "")).split())
