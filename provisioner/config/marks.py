"""YAML files read into plain dicts/lists plus a `file:line:col` mark for every key path."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from provisioner.errors import MAX_PROBLEMS, ConfigError, Problem, stopped

KeyPath = tuple[str | int, ...]
# Mappings that replace instead of merging (profiles over parents, hosts over groups): `restart`
# is one mode, a parent's docker plus a child's systemd would be two.
ATOMIC: frozenset[KeyPath] = frozenset({("comfyui", "restart")})


@dataclass(frozen=True)
class Mark:
    """Where a key (or list item) was written: 1-based line and column."""

    file: str
    line: int
    col: int
    source: str = field(default="", compare=False)   # the value as written, when YAML read it as no string (1.10)


@dataclass(frozen=True)
class Document:
    """One YAML file: its data, and the mark of every key path in it (`()` is the top)."""

    file: str
    data: Any
    marks: Mapping[KeyPath, Mark] = field(default_factory=dict)


def key_text(path: KeyPath) -> str:
    """`("backend", "sources", 1, "wheelhouse")` -> `backend.sources[1].wheelhouse`."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def problem(marks: Mapping[KeyPath, Mark], file: str, path: KeyPath, message: str,
            hint: str = "") -> Problem:
    """A Problem placed at `path`, or at its nearest marked parent (a missing key has no mark)."""
    for cut in range(len(path), -1, -1):
        mark = marks.get(path[:cut])
        if mark is not None:
            return Problem(mark.file, mark.line, mark.col, key_text(path), message, hint)
    return Problem(file, 0, 0, key_text(path), message, hint)


def shown(value: Any, limit: int = 60) -> str:
    """`repr(value)` for a message: one line, at most about `limit` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit limit for text
        return f"a {value.bit_length()}-bit number"
    return text if len(text) <= limit else f"{text[:limit - 10]}…{text[-8:]} ({len(text)} characters)"


def clip(text: str, limit: int = 200) -> str:
    """`text` for a message, its middle cut when it is longer than `limit`."""
    return text if len(text) <= limit else f"{text[:limit - 40]}…{text[-30:]} ({len(text)} characters)"


def walk(data: Any, path: KeyPath = ()) -> Iterator[KeyPath]:
    """Every key path inside `data`, parents before children."""
    yield path
    if isinstance(data, Mapping):
        for key, value in data.items():
            yield from walk(value, (*path, key))
    elif isinstance(data, list):
        for index, value in enumerate(data):
            yield from walk(value, (*path, index))


def _mark(file: str, node: yaml.Node) -> Mark:
    return Mark(file, node.start_mark.line + 1, node.start_mark.column + 1)


def _fail(file: str, message: str, hint: str = "", line: int = 0, col: int = 0) -> ConfigError:
    return ConfigError([Problem(file, line, col, "", message, hint)])


MAX_BYTES = 512 << 10  # a profile is a few KB, an inventory of 5000 hosts fits; parsing stays under ~2 s


def read_text(file: str) -> str:
    """The file as UTF-8 text; every way it can fail becomes a one-line ConfigError."""
    try:
        with open(file, "rb") as fh:
            raw = fh.read(MAX_BYTES + 1)  # never more: the "file" may be /dev/zero
    except FileNotFoundError:
        raise _fail(file, "no such file") from None
    except IsADirectoryError:
        raise _fail(file, "is a directory, not a YAML file") from None
    except PermissionError:
        raise _fail(file, "cannot be read: permission denied") from None
    except OSError as err:
        raise _fail(file, f"cannot be read: {err.strerror or err}") from None
    if len(raw) > MAX_BYTES:
        raise _fail(file, f"larger than {MAX_BYTES >> 10} KiB: too large for a profile or inventory",
                    "split the inventory, or check that this is the file you meant", 1, 1)
    if b"\0" in raw:
        line = raw[: raw.index(b"\0")].count(b"\n") + 1
        raise _fail(file, "binary data (NUL byte), not YAML text", line=line, col=1)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        before = raw[: err.start]
        line, col = before.count(b"\n") + 1, err.start - (before.rfind(b"\n") + 1) + 1
        raise _fail(file, f"not UTF-8 text: byte 0x{raw[err.start]:02x}", "save the file as UTF-8",
                    line, col) from None


_PLAIN_TAGS = {"tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"}
_INT = "tag:yaml.org,2002:int"
_KINDS = {_INT: "integer", "tag:yaml.org,2002:float": "number", "tag:yaml.org,2002:bool": "boolean",
          "tag:yaml.org,2002:timestamp": "date", "tag:yaml.org,2002:binary": "base64 value",
          "tag:yaml.org,2002:null": "null", "tag:yaml.org,2002:str": "string"}


class _AliasError(yaml.MarkedYAMLError):
    """A node the reader refuses: a self-referring alias, an alias bomb, a foreign tag."""


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, stopped while composing a node nested past MAX_DEPTH: its composer
    recurses once per level and its scanner slows quadratically with flow depth, so 5000 `[` took
    seconds and then a RecursionError."""

    depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self.depth += 1
        try:
            if self.depth > _Reader.MAX_DEPTH + 1:  # the top node is not a level: as the reader counts
                raise _AliasError(problem=f"nested deeper than {_Reader.MAX_DEPTH} levels",
                                  problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self.depth -= 1


class _Reader:
    """Composes the node tree, records marks per key path, then builds plain Python data."""

    MAX_ALIASED = 10_000  # nodes reached again through aliases: a "billion laughs" bomb passes this
    MAX_DEPTH = 64        # real profiles and inventories nest under 10 levels

    def __init__(self, file: str) -> None:
        self.file = file
        self.marks: dict[KeyPath, Mark] = {}
        self.problems: list[Problem] = []
        self.scalars = yaml.SafeLoader("")
        self.active: set[int] = set()
        self.built: set[int] = set()
        self.aliased = 0

    def build(self, node: yaml.Node, path: KeyPath) -> Any:
        if id(node) in self.active:
            raise _AliasError(problem="recursive alias", problem_mark=node.start_mark)
        if id(node) in self.built:
            self.aliased += 1
            if self.aliased > self.MAX_ALIASED:
                raise _AliasError(problem="aliases expand too far (alias bomb?)", problem_mark=node.start_mark)
        self.built.add(id(node))
        if len(path) > self.MAX_DEPTH:
            raise _AliasError(problem=f"nested deeper than {self.MAX_DEPTH} levels",
                              problem_mark=node.start_mark)
        if isinstance(node, yaml.ScalarNode):
            return self._scalar(node, path)
        if node.tag not in _PLAIN_TAGS:  # `!!python/object` and friends: never built, never ignored
            raise _AliasError(problem=f"unsupported tag {node.tag}", problem_mark=node.start_mark)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            out = []
            for index, item in enumerate(node.value):
                self.marks[(*path, index)] = _mark(self.file, item)
                out.append(self.build(item, (*path, index)))
            return out
        finally:
            self.active.discard(id(node))

    def _scalar(self, node: yaml.ScalarNode, path: KeyPath) -> Any:
        """A scalar as YAML types it; one it cannot be (`2001-13-45`, `!!int abc`, a 5000-digit
        number) is a located problem, and its text stands in so reading goes on."""
        kind = _KINDS.get(node.tag)
        if kind is None:  # `!!python/name:os.system x`, `!foo bar`: never built, never ignored
            self._refuse(node, path, f"unsupported tag {shown(node.tag)}", "remove the tag")
            return node.value
        if node.tag == _INT and len(node.value) > 40:  # int() of thousands of digits is slow, then refused
            value: Any = None
        else:
            try:
                value = self.scalars.construct_object(node, deep=True)
            except (ValueError, KeyError, AttributeError, TypeError, OverflowError, yaml.YAMLError):
                implicit = node.style is None and self.scalars.resolve(
                    yaml.ScalarNode, node.value, (True, False)) == node.tag  # typed by its looks, not a tag
                self._refuse(node, path, f"{shown(node.value)} is not a valid {kind}",
                             "quote it to keep it as text" if implicit else "remove the tag")
                return node.value
        if node.tag == _INT and (value is None or value.bit_length() > 64):
            self._refuse(node, path, f"{shown(node.value)} is too large a number (over 64 bits)",
                         "quote it if it is text")
            return node.value
        return value

    def _refuse(self, node: yaml.Node, path: KeyPath, message: str, hint: str) -> None:
        mark = _mark(self.file, node)
        self._add(Problem(mark.file, mark.line, mark.col, key_text(path), message, hint))

    def _add(self, found: Problem) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(found)
        elif len(self.problems) == MAX_PROBLEMS:
            self.problems.append(stopped(self.file))

    def _mapping(self, node: yaml.MappingNode, path: KeyPath) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        seen: dict[str, Mark] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: keys set below win
                merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for source in merged:
                    if isinstance(source, yaml.MappingNode):
                        out.update({k: v for k, v in self.build(source, path).items() if k not in seen})
                continue
            key = self.build(key_node, path)
            mark = _mark(self.file, key_node)
            if not isinstance(key, str):
                self._add(Problem(mark.file, mark.line, mark.col, key_text(path),
                                  f"key {shown(key)} is not a string", "quote the key"))
                key = str(key)
            sub = (*path, key)
            if key in seen:
                self._add(Problem(mark.file, mark.line, mark.col, key_text(sub),
                                  f"duplicate key (first set at line {seen[key].line})", "keep only one"))
            out[key] = self.build(value_node, sub)
            if isinstance(value_node, yaml.ScalarNode) and value_node.style is None and not isinstance(out[key], str):
                mark = replace(mark, source=value_node.value)    # advice quotes `1.10`, not the float 1.1
            seen[key] = self.marks[sub] = mark
        return out


def read_yaml(file: str) -> Document:
    """Read one YAML file. Raises ConfigError (every problem, located) for anything unreadable."""
    text = read_text(file)
    try:
        node = yaml.compose(text, Loader=_Loader)
        reader = _Reader(file)
        data = None if node is None else reader.build(node, ())
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = (mark.line + 1, mark.column + 1) if mark else (0, 0)
        what = " ".join(str(x) for x in (err.context, err.problem) if x)
        hint = "" if isinstance(err, _AliasError) else "check indentation and quoting"
        raise _fail(file, f"invalid YAML: {what}", hint, *where) from None
    except yaml.reader.ReaderError as err:      # a control character: PyYAML gives its offset only
        before = text[:err.position]
        where = (before.count("\n") + 1, err.position - (before.rfind("\n") + 1) + 1)
        raise _fail(file, f"invalid YAML: the control character {chr(err.character)!r} is not allowed in YAML",
                    "remove it, or write it as an escape in a double-quoted string", *where) from None
    except yaml.YAMLError as err:
        raise _fail(file, f"invalid YAML: {err}") from None
    except RecursionError:  # not expected (the loader stops at MAX_DEPTH): one line all the same
        raise _fail(file, "invalid YAML: nested too deeply", "flatten the structure", 1, 1) from None
    if reader.problems:
        raise ConfigError(reader.problems)
    reader.marks[()] = Mark(file, 1, 1)
    return Document(file, data, reader.marks)


def deep_merge(parent: Any, child: Any, atomic: frozenset[KeyPath] = frozenset(),
               path: KeyPath = ()) -> Any:
    """Child over parent: mappings merge key by key; lists, scalars and `atomic` paths replace."""
    if isinstance(parent, Mapping) and isinstance(child, Mapping) and path not in atomic:
        out = dict(parent)
        for key, value in child.items():
            out[key] = deep_merge(parent[key], value, atomic, (*path, key)) if key in parent else value
        return out
    return child


def merge_marks(merged: Any, parent: Mapping[KeyPath, Mark],
                child: Mapping[KeyPath, Mark]) -> dict[KeyPath, Mark]:
    """Marks of `merged`: each path placed where the child wrote it, else where the parent did."""
    out: dict[KeyPath, Mark] = {}
    for path in walk(merged):
        mark = child.get(path) or parent.get(path)
        if mark is not None:
            out[path] = mark
    return out


def sub_marks(marks: Mapping[KeyPath, Mark], prefix: KeyPath, data: Any) -> dict[KeyPath, Mark]:
    """The marks of `data`, found at `prefix` in `marks`, re-rooted so `prefix` becomes `()`.

    Walks `data` only, never all of `marks`: an inventory's hosts cost linear time, not quadratic."""
    out: dict[KeyPath, Mark] = {}
    for path in walk(data):
        mark = marks.get((*prefix, *path))
        if mark is not None:
            out[path] = mark
    return out
