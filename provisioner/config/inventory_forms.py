"""Ansible's other inventory forms, read into the YAML form's shape, so that one model (groups,
their vars, precedence, host ranges, `provision:` overlays; config/inventory.py) serves them all:

- INI (`[group]`, `[group:vars]`, `[group:children]`, inline `host key=value`, `host:port`),
  written from Ansible's documented format (docs/inventory-reference.md, "Other forms");
- the JSON that `ansible-inventory --list` prints (groups with `hosts`/`children`/`vars`, every
  host's variables under `_meta.hostvars`), which is also the answer of
- an executable inventory (Ansible's script protocol: run with `--list`; with `--host NAME` for each
  host when that answer has no `_meta`), within a time limit and an output bound.

Each returns a Document whose marks place every key at its line in the file (or name the script),
so a bad value is reported where it was written, as in a YAML inventory.
"""

from __future__ import annotations

import ast
import json
import os
import re
import selectors
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping
from typing import Any

from provisioner.config.marks import Document, KeyPath, Mark, read_text, read_yaml, shown, sub_marks
from provisioner.errors import ConfigError, Problem

SCRIPT_TIMEOUT_S = 120           # a cloud inventory script asks an API; one that hangs must not hang us
SCRIPT_MAX_BYTES = 16 << 20      # its answer: 5000 hosts with their variables fit many times over
_SECTION = re.compile(r"\[([^\[\]:\s]+)(?::([^\[\]\s]*))?\]")
_GROUP_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_VAR_NAME = re.compile(r"[^\s=]+")
_HOST_PORT = re.compile(r"(.+?)(?::([0-9]+))?")


def inventory_form(file: str) -> str:
    """`script`, `ini` or `yaml` (YAML, or JSON: a YAML reader reads both) for an inventory path."""
    if os.path.isfile(file) and os.access(file, os.X_OK):
        try:
            with open(file, "rb") as fh:
                if fh.read(2) == b"#!":
                    return "script"
        except OSError:
            pass  # read_text says why, located
    if file.endswith((".yaml", ".yml", ".json")):
        return "yaml"
    if file.endswith(".ini"):
        return "ini"
    try:
        text = read_text(file)
    except ConfigError:
        return "yaml"  # the YAML reader reports the file as it is (missing, binary, too large)
    first = next((s for s in (line.strip() for line in text.splitlines()) if s and s[0] not in "#;"), "")
    looks_yaml = first.startswith(("{", "---")) or re.match(r"[^\s=\[]+:(\s|$)", first)
    return "yaml" if looks_yaml or not first else "ini"


def read_inventory(file: str) -> Document:
    """Any inventory form as a Document in the YAML form's shape; ConfigError, located, if malformed."""
    form = inventory_form(file)
    if form == "script":
        return from_script(file)
    if form == "ini":
        return from_ini(file, read_text(file))
    doc = read_yaml(file)
    return from_listing(doc.data, doc.marks, file) if is_listing(doc.data) else doc


# --- INI ---------------------------------------------------------------------------------------

def ini_value(text: str) -> Any:
    """A value as Ansible types INI values: a Python literal (`2222`, `True`, `None`, `[1, 2]`,
    `'quoted'`) becomes that value, anything else stays the text (`yes`, `true`, `/opt/x`)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text
    return _plain(value, text)


def _plain(value: Any, text: str) -> Any:
    """A literal in the types an inventory holds (JSON's): tuples become lists; sets, bytes and
    complex numbers, which no variable provision reads can be, stay the text they were."""
    if isinstance(value, tuple | list):
        return [_plain(v, text) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, text) for k, v in value.items()}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return text


class _Ini:
    """One pass over the lines; each section adds to its group in the YAML shape."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.data: dict[str, dict[str, dict[str, Any]]] = {"all": {"hosts": {}, "vars": {}, "children": {}}}
        self.marks: dict[KeyPath, Mark] = {(): Mark(file, 1, 1), ("all",): Mark(file, 1, 1)}
        self.problems: list[Problem] = []
        self.vars_only: dict[str, int] = {}    # groups only a [g:vars] named so far -> its line

    def fail(self, line: int, col: int, message: str, hint: str = "") -> None:
        self.problems.append(Problem(self.file, line, col, "", message, hint))

    def group(self, name: str, line: int) -> dict[str, dict[str, Any]]:
        if name not in self.data:
            self.data[name] = {"hosts": {}, "vars": {}, "children": {}}
            self.marks[(name,)] = Mark(self.file, line, 1)
        return self.data[name]

    def parse(self, text: str) -> None:
        group, kind = "all", "hosts"  # hosts before any section are ungrouped
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            col = raw.index(line[0]) + 1
            if line.startswith("["):
                section = _SECTION.match(line)
                rest = line[section.end():].strip() if section else ""
                if not section or (rest and rest[0] not in "#;"):
                    self.fail(number, col, f"{shown(line)} is not a section header",
                              "write [group], [group:vars] or [group:children]")
                    group, kind = "", "skip"
                    continue
                group, suffix = section.group(1), section.group(2)
                kind = {None: "hosts", "vars": "vars", "children": "children"}.get(suffix, "")
                if not kind:
                    self.fail(number, col, f"section [{group}:{suffix}]: unknown suffix :{suffix}",
                              "a section is [group], [group:vars] or [group:children]")
                    kind = "skip"
                elif not _GROUP_NAME.fullmatch(group):
                    self.fail(number, col, f"{shown(group)} is not a group name",
                              "letters, digits, _ and -, not starting with a digit")
                    kind = "skip"
                elif kind == "vars" and group not in self.data:
                    self.vars_only.setdefault(group, number)
                    self.group(group, number)
                else:
                    self.vars_only.pop(group, None)
                    self.group(group, number)
            elif kind == "hosts":
                self.host_line(group, raw, number, col)
            elif kind == "vars":
                self.var_line(group, line, number, col)
            elif kind == "children":
                self.child_line(group, line, number, col)
        for name, number in self.vars_only.items():
            self.fail(number, 1, f"[{name}:vars] sets variables of a group that no section defines",
                      f"add a [{name}] section (or list it under a [parent:children])")

    def host_line(self, group: str, raw: str, number: int, col: int) -> None:
        try:
            words = shlex.split(raw, comments=True)
        except ValueError as err:  # an unclosed quote
            self.fail(number, col, f"cannot split the host line: {err}", "close the quote")
            return
        if not words:
            return
        name, port = _HOST_PORT.fullmatch(words[0]).groups()  # type: ignore[union-attr]
        if port is None or ":" in name.split("]")[-1]:       # an IPv6 address: no port to split off
            name, port = words[0], None
        host_vars: dict[str, Any] = {} if port is None else {"ansible_port": int(port)}
        path: KeyPath = (group, "hosts", name)
        self.marks.setdefault(path, Mark(self.file, number, col))
        at = 0
        for word in words[1:]:
            at = raw.find(word.split("=", 1)[0], at)
            key, equals, value = word.partition("=")
            if not equals or not _VAR_NAME.fullmatch(key):
                self.fail(number, at + 1, f"{shown(word)} after host {name!r} is not key=value",
                          "write host key=value …; quote a value with spaces")
                continue
            host_vars[key] = ini_value(value)
            self.marks[(*path, key)] = Mark(self.file, number, at + 1)
        if port is not None:
            self.marks[(*path, "ansible_port")] = Mark(self.file, number, col)
        hosts = self.data[group]["hosts"]
        hosts[name] = {**(hosts.get(name) or {}), **host_vars} or None

    def var_line(self, group: str, line: str, number: int, col: int) -> None:
        key, equals, value = (part.strip() for part in line.partition("="))
        if not equals or not _VAR_NAME.fullmatch(key):
            self.fail(number, col, f"{shown(line)} in [{group}:vars] is not key=value",
                      "one key=value per line")
            return
        self.data[group]["vars"][key] = ini_value(value)
        self.marks[(group, "vars", key)] = Mark(self.file, number, col)

    def child_line(self, group: str, line: str, number: int, col: int) -> None:
        child = line.split()[0]
        if not _GROUP_NAME.fullmatch(child) or len(line.split()) > 1 and line.split()[1][0] not in "#;":
            self.fail(number, col, f"{shown(line)} in [{group}:children] is not a group name",
                      "one group name per line")
            return
        self.group(child, number)
        self.vars_only.pop(child, None)
        self.data[group]["children"][child] = None
        self.marks[(group, "children", child)] = Mark(self.file, number, col)


def from_ini(file: str, text: str) -> Document:
    """An Ansible INI inventory in the YAML form's shape."""
    ini = _Ini(file)
    ini.parse(text)
    if ini.problems:
        raise ConfigError(ini.problems)
    data = {name: {k: v for k, v in body.items() if v} for name, body in ini.data.items()}
    return Document(file, data, ini.marks)


# --- `ansible-inventory --list` JSON and inventory scripts -------------------------------------

def is_listing(data: Any) -> bool:
    """The JSON `ansible-inventory --list` prints: groups, and every host's variables under `_meta`
    (a YAML inventory cannot have that group: `_meta` is Ansible's reserved name)."""
    return isinstance(data, Mapping) and "_meta" in data


def from_listing(data: Mapping[str, Any], marks: Mapping[KeyPath, Mark], file: str,
                 host_vars: Mapping[str, Any] | None = None) -> Document:
    """A listing in the YAML form's shape. Each host's variables are those of `_meta.hostvars`
    (or `host_vars`, the answers to `--host`), set once, where the host is first listed."""
    problems: list[Problem] = []

    def wrong(path: KeyPath, message: str) -> None:
        mark = next((marks[path[:cut]] for cut in range(len(path), -1, -1) if path[:cut] in marks), None)
        where = (mark.line, mark.col) if mark else (0, 0)
        problems.append(Problem(file, *where, ".".join(map(str, path)), message,
                                "see `ansible-inventory --list` for the shape"))

    meta = data.get("_meta") or {}
    if host_vars is None:
        host_vars = meta.get("hostvars") if isinstance(meta, Mapping) else None
        if not isinstance(host_vars or {}, Mapping):
            wrong(("_meta", "hostvars"), "expected a mapping of host name -> variables")
            host_vars = {}
        vars_marks: Mapping[KeyPath, Mark] = sub_marks(marks, ("_meta", "hostvars"), host_vars or {})
    else:
        vars_marks = {}
    out: dict[str, Any] = {}
    out_marks: dict[KeyPath, Mark] = {(): marks.get((), Mark(file, 0, 0))}   # a script's answer has no lines
    placed: set[str] = set()
    for name, body in data.items():
        if name == "_meta":
            continue
        if isinstance(body, list):
            body = {"hosts": body}
        if not isinstance(body, Mapping):
            wrong((name,), "expected a group: a list of hosts, or a mapping with hosts, vars, children")
            continue
        group: dict[str, Any] = {}
        for key, kind in (("hosts", list), ("children", list), ("vars", Mapping)):
            if body.get(key) is not None and not isinstance(body[key], kind):
                wrong((name, key), f"expected a {'list' if kind is list else 'mapping'}")
            elif body.get(key):
                group[key] = body[key]
        if name == "ungrouped" and not group:
            continue  # ansible-inventory lists it even when it holds no host
        out_marks[(name,)] = marks.get((name,), out_marks[()])
        hosts: dict[str, Any] = {}
        for index, host in enumerate(group.get("hosts") or ()):
            if not isinstance(host, str):
                wrong((name, "hosts", index), f"host {shown(host)} is not a name")
                continue
            out_marks[(name, "hosts", host)] = marks.get((name, "hosts", index), out_marks[(name,)])
            own = (host_vars or {}).get(host) if host not in placed else None
            placed.add(host)
            if own is not None and not isinstance(own, Mapping):
                wrong(("_meta", "hostvars", host), "expected a mapping of variables")
                own = None
            hosts[host] = dict(own) if own else None
            for path, mark in sub_marks(vars_marks, (host,), own or {}).items():
                if path:
                    out_marks[(name, "hosts", host, *path)] = mark
        body_out: dict[str, Any] = {}
        if hosts:
            body_out["hosts"] = hosts
        if group.get("vars"):
            body_out["vars"] = group["vars"]
            out_marks.update({(name, "vars", *p): m for p, m in sub_marks(marks, (name, "vars"), group["vars"]).items()})
        children = {}
        for index, child in enumerate(group.get("children") or ()):
            if not isinstance(child, str):
                wrong((name, "children", index), f"child {shown(child)} is not a group name")
                continue
            children[child] = None
            out_marks[(name, "children", child)] = marks.get((name, "children", index), out_marks[(name,)])
        if children:
            body_out["children"] = children
        out[name] = body_out or None
    if problems:
        raise ConfigError(problems)
    return Document(file, out or {"all": None}, out_marks)


def from_script(file: str) -> Document:
    """Run an executable inventory as Ansible does (`--list`, then `--host NAME` for each host when
    the listing has no `_meta`) and read its answer like an `ansible-inventory --list` JSON. All of
    its runs together get SCRIPT_TIMEOUT_S."""
    timeout_s = SCRIPT_TIMEOUT_S
    deadline = time.monotonic() + timeout_s
    listing = _script_json(file, ["--list"], deadline, timeout_s)
    where = f"{file} --list"
    if not isinstance(listing, Mapping):
        raise ConfigError([Problem(where, 0, 0, "", "printed no inventory (a JSON mapping of groups)",
                                   "run it by hand to see what it prints")])
    host_vars = None
    if "_meta" not in listing:
        names = dict.fromkeys(h for body in listing.values()
                              for h in (body if isinstance(body, list) else (body or {}).get("hosts") or ())
                              if isinstance(h, str))
        host_vars = {h: _script_json(file, ["--host", h], deadline, timeout_s) for h in names}
    return from_listing(listing, {}, where, host_vars)


def _script_json(file: str, args: list[str], deadline: float, timeout_s: float) -> Any:
    where = " ".join([file, *args])
    out, err, status = _run_bounded([os.path.abspath(file), *args], deadline)
    if status == "timeout":
        raise _script_error(where, f"gave no answer within {timeout_s:g} s", "make it answer faster")
    if status == "too large":
        raise _script_error(where, f"printed more than {SCRIPT_MAX_BYTES >> 20} MiB",
                            "an inventory that large is not an inventory")
    if status:
        last = next((ln.strip() for ln in reversed(err.decode("utf-8", "replace").splitlines()) if ln.strip()), "")
        raise _script_error(where, f"{status}{': ' + last[-300:] if last else ''}", "run it by hand to see why")
    try:
        return json.loads(out)
    except (ValueError, RecursionError) as exc:
        at = f" (line {exc.lineno}, column {exc.colno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise _script_error(where, f"printed no JSON{at}: {str(exc).split(':')[0]}",
                            "an inventory script prints one JSON document") from None


def _script_error(where: str, message: str, hint: str) -> ConfigError:
    return ConfigError([Problem(where, 0, 0, "", message, hint)])


def _run_bounded(argv: list[str], deadline: float) -> tuple[bytes, bytes, str]:
    """(stdout, the end of stderr, "" | "exited N" | "killed by SIGX" | "timeout" | "too large"),
    never holding more than SCRIPT_MAX_BYTES nor waiting past `deadline`; what the program started
    is stopped with it (its own process group)."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as err:
        return b"", str(err.strerror or err).encode(), "could not be run"
    out, err, status = bytearray(), bytearray(), ""
    with selectors.DefaultSelector() as sel:
        assert proc.stdout and proc.stderr
        sel.register(proc.stdout, selectors.EVENT_READ, out)
        sel.register(proc.stderr, selectors.EVENT_READ, err)
        while sel.get_map() and not status:
            left = deadline - time.monotonic()
            if left <= 0:
                status = "timeout"
                break
            for key, _ in sel.select(left):
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                    continue
                key.data.extend(chunk)
                del err[:-4096]  # stderr: its last lines say why
                if len(out) > SCRIPT_MAX_BYTES:
                    status = "too large"
    if status:
        _stop(proc.pid)
    try:
        code = proc.wait(max(0.0, deadline - time.monotonic()) if not status else None)
    except subprocess.TimeoutExpired:
        _stop(proc.pid)
        proc.wait()
        status = "timeout"
    finally:
        proc.stdout.close()
        proc.stderr.close()
    if not status and code:
        status = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited {code}"
    return bytes(out), bytes(err), status


def _stop(group: int) -> None:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it ended by itself meanwhile
