"""The JSON Schemas (Draft 2020-12) of profiles and inventories, and their errors as located, hinted Problems."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from functools import lru_cache
from importlib import resources
from typing import Any

import jsonschema

from provisioner.config.marks import KeyPath, Mark, problem
from provisioner.errors import Problem, UsageError

KINDS = ("profile", "inventory")
_TYPE_NAMES = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "empty"}


def schema_text(kind: str) -> str:
    """The JSON Schema of `kind` (profile | inventory), as shipped, for `provision schema KIND`."""
    if kind not in KINDS:
        raise UsageError(f"unknown schema {kind!r}; choose one of: {', '.join(KINDS)}")
    return resources.files("provisioner.config").joinpath("schemas", f"{kind}.schema.json").read_text(
        encoding="utf-8")


@lru_cache(maxsize=None)
def schema(kind: str) -> Mapping[str, Any]:
    """The parsed schema of `kind`."""
    return json.loads(schema_text(kind))


@lru_cache(maxsize=None)
def _validator(kind: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(schema(kind))


_BOUNDS = {"minimum": "is below the minimum", "maximum": "is above the maximum",
           "exclusiveMinimum": "must be greater than", "exclusiveMaximum": "must be less than",
           "multipleOf": "must be a multiple of", "minItems": "needs at least this many items:",
           "minLength": "is shorter than"}


def _yaml_type(value: Any) -> str:
    for name, types in (("empty", type(None)), ("true/false", bool), ("a mapping", Mapping),
                        ("a list", list), ("a string", str), ("a number", (int, float))):
        if isinstance(value, types):
            return name
    return type(value).__name__   # dates and other YAML-only scalars


def _first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".")


def _unknown_keys(err: jsonschema.ValidationError, path: KeyPath, marks: Mapping[KeyPath, Mark],
                  file: str) -> list[Problem]:
    known = sorted(err.schema.get("properties", {}))
    out = []
    for key in err.instance:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(known)}"
        out.append(problem(marks, file, (*path, key), "unknown key", hint))
    return out


def _one(err: jsonschema.ValidationError, path: KeyPath) -> tuple[KeyPath, str, str]:
    """(where, message, hint) for one schema error that is not about unknown keys."""
    kind, value, sch = err.validator, err.instance, err.schema
    custom = sch.get("errorMessage", "")
    if kind == "required":
        missing = next(k for k in err.validator_value if k not in value)
        about = sch.get("properties", {}).get(missing, {}).get("description", "")
        return (*path, missing), "missing required key", _first_sentence(about)
    if kind == "type":
        wanted = err.validator_value if isinstance(err.validator_value, list) else [err.validator_value]
        expected = " or ".join(_TYPE_NAMES[t] for t in wanted if t != "null")
        hint = ""
        if "string" in wanted and isinstance(value, (int, float, bool)):
            hint = f"quote it: \"{value}\""
        elif value is None:
            hint = "the value is empty"
        return path, f"expected {expected}, got {_yaml_type(value)}", hint
    if kind == "enum":
        options = [str(o) for o in err.validator_value]
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f"did you mean '{close[0]}'?" if close else ""
        return path, f"{value!r} is not one of: {', '.join(options)}", hint
    if kind in ("pattern", "const") and custom:
        return path, f"{value!r} is not valid", f"expected {custom}"
    if kind in ("minProperties", "maxProperties") and custom:
        return path, f"expected {custom}", ""
    if kind in _BOUNDS:
        return path, f"{value!r} {_BOUNDS[kind]} {err.validator_value}", ""
    return path, err.message, ""


def schema_problems(data: Any, marks: Mapping[KeyPath, Mark], file: str, kind: str) -> list[Problem]:
    """Every schema violation of `data`, each placed at its key's `file:line:col`."""
    out: list[Problem] = []
    for err in _validator(kind).iter_errors(data):
        path = tuple(err.absolute_path)
        if "propertyNames" in err.schema_path:  # the instance is the offending key itself
            hint = f"expected {err.schema['errorMessage']}" if "errorMessage" in err.schema else ""
            out.append(problem(marks, file, (*path, err.instance), "not a valid name", hint))
            continue
        if err.validator == "additionalProperties" and err.validator_value is False:
            out += _unknown_keys(err, path, marks, file)
            continue
        where, message, hint = _one(err, path)
        out.append(problem(marks, file, where, message, hint))
    return sorted(out, key=lambda p: (p.file, p.line, p.col, p.key))
