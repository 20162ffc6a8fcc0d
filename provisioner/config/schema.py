"""The JSON Schemas (Draft 2020-12) of profiles and inventories, and their errors as located, hinted Problems."""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from provisioner.config import verdicts
from provisioner.config.marks import KeyPath, Mark, problem, shown
from provisioner.errors import MAX_PROBLEMS, Problem, UsageError, stopped

if TYPE_CHECKING:
    import jsonschema

KINDS = ("profile", "inventory", "lock")
_TYPE_NAMES = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "empty"}


def schema_text(kind: str) -> str:
    """The JSON Schema of `kind` (profile | inventory | lock), as shipped, for `provision schema KIND`."""
    if kind not in KINDS:
        raise UsageError(f"unknown schema {kind!r}; choose one of: {', '.join(KINDS)}")
    return resources.files("provisioner.config").joinpath("schemas", f"{kind}.schema.json").read_text(
        encoding="utf-8")


@lru_cache(maxsize=None)
def schema(kind: str) -> Mapping[str, Any]:
    """The parsed schema of `kind`."""
    return json.loads(schema_text(kind))


@lru_cache(maxsize=None)
def _ecma(pattern: str) -> re.Pattern[str]:
    """`pattern` with JSON Schema's (ECMA-262's) `$`: the end of the text. Python's `$` also matches
    before a final newline, so `plugin.tag: "v1.1.0\\n"` would pass `^v[0-9]+\\.[0-9]+\\.[0-9]+$` and plan
    a change that never converges; editors, which run the schema as ECMA-262, refuse it."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if in_class:
            in_class = char != "]" or out[-1] in ("[", "[^")  # `[]…]`: a first `]` is literal
        elif char == "[":
            in_class = True
            if pattern.startswith("[^", i):
                char, i = "[^", i + 1
        elif char == "$":
            char = r"\Z"
        out.append(char)
        i += 1
    return re.compile("".join(out))


@lru_cache(maxsize=None)
def _validator(kind: str) -> Any:
    # Imported here: a run on a file that passed before (verdicts.py) never needs jsonschema.
    import jsonschema

    def ecma_pattern(validator: Any, pattern: str, instance: Any, _schema: Any) -> Iterator[jsonschema.ValidationError]:
        if validator.is_type(instance, "string") and not _ecma(pattern).search(instance):
            yield jsonschema.ValidationError(f"{shown(instance)} does not match {pattern!r}")

    # Draft 2020-12 with two corrections: `pattern` reads `$` as JSON Schema means it (above), and an
    # integer is an int: the spec counts 8188.0 as one, but a port or a step count written 8188.0 is a typo.
    validator = jsonschema.validators.extend(
        jsonschema.Draft202012Validator, validators={"pattern": ecma_pattern},
        type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
            "integer", lambda _, value: isinstance(value, int) and not isinstance(value, bool)))
    return validator(schema(kind))


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
                  file: str) -> Iterator[Problem]:
    known = sorted(err.schema.get("properties", {}))
    for key in err.instance:
        if key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(known)}"
        yield problem(marks, file, (*path, key), "unknown key", hint)


def _one(err: jsonschema.ValidationError, path: KeyPath, marks: Mapping[KeyPath, Mark]) -> tuple[KeyPath, str, str]:
    """(where, message, hint) for one schema error that is not about unknown keys. Advice quotes
    the value as it was written (`1.10`, which YAML read as the number 1.1)."""
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
        if "integer" in wanted and isinstance(value, float) and value.is_integer():
            hint = f"write {int(value)}"
        elif "string" in wanted and isinstance(value, (int, float, bool)):
            written = marks[path].source if path in marks and marks[path].source else value
            hint = f"quote it: \"{written}\""
        elif value is None:
            hint = "the value is empty"
        return path, f"expected {expected}, got {_yaml_type(value)}", hint
    if kind == "enum":
        options = [str(o) for o in err.validator_value]
        close = difflib.get_close_matches(str(value), options, n=1)
        hint = f"did you mean '{close[0]}'?" if close else ""
        return path, f"{shown(value)} is not one of: {', '.join(options)}", hint
    if kind in ("pattern", "const") and custom:
        return path, f"{shown(value)} is not valid", f"expected {custom}"
    if kind in ("minProperties", "maxProperties") and custom:
        return path, f"expected {custom}", ""
    if kind in _BOUNDS and isinstance(value, float) and not math.isfinite(value):
        return path, f"{value} is not a finite number", ""      # YAML's .inf: past any bound
    if kind in _BOUNDS:
        return path, f"{shown(value)} {_BOUNDS[kind]} {err.validator_value}", ""
    if kind == "maxItems":
        return path, f"{len(value)} items, more than the {err.validator_value} allowed", ""
    return path, err.message if len(err.message) < 200 else err.message[:190] + "…", ""


def schema_problems(data: Any, marks: Mapping[KeyPath, Mark], file: str, kind: str) -> list[Problem]:
    """Every schema violation of `data` (up to MAX_PROBLEMS), each placed at its key's `file:line:col`."""
    key = verdicts.digest(schema_text(kind), data)
    if verdicts.passed(key):
        return []
    out: list[Problem] = []
    for found in _problems(data, marks, file, kind):
        if len(out) == MAX_PROBLEMS:  # a file of 100000 unknown keys must not take minutes
            out.append(stopped(file))
            break
        out.append(found)
    if not out:
        verdicts.record_pass(key)
    return sorted(out, key=lambda p: (p.file, p.line == 0, p.line, p.col, p.key))


def _problems(data: Any, marks: Mapping[KeyPath, Mark], file: str, kind: str) -> Iterator[Problem]:
    for err in _validator(kind).iter_errors(data):
        path = tuple(err.absolute_path)
        if "propertyNames" in err.schema_path:  # the instance is the offending key itself
            hint = f"expected {err.schema['errorMessage']}" if "errorMessage" in err.schema else ""
            yield problem(marks, file, (*path, err.instance), "not a valid name", hint)
        elif err.validator == "additionalProperties" and err.validator_value is False:
            yield from _unknown_keys(err, path, marks, file)
        else:
            where, message, hint = _one(err, path, marks)
            yield problem(marks, file, where, message, hint)
