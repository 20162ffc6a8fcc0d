"""Ansible YAML inventories (`all:` / `children:` / `hosts:` / `vars:`) into a list of Hosts.

An existing Ansible YAML inventory loads as-is: `ansible_host`, `ansible_port`, `ansible_user`,
`ansible_ssh_private_key_file`, `ansible_connection` (ssh | local | docker) are understood.
provision's own variables are prefixed `provision_`; a `provision:` mapping in host or group vars
is deep-merged over the profile for that host (a different ComfyUI root on one box, say).
Variable precedence is Ansible's: all < parent group < child group < host.
"""

from __future__ import annotations

import difflib
import fnmatch
import itertools
import math
import os
import re
import shlex
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

from provisioner.config.marks import (ATOMIC, Document, KeyPath, Mark, deep_merge, merge_marks, problem,
                                      sub_marks)
from provisioner.config.inventory_forms import read_inventory
from provisioner.config.schema import schema_problems
from provisioner.errors import ConfigError, Problem, UsageError

if TYPE_CHECKING:
    from provisioner.config.model import Profile

Transport = Literal["ssh", "local", "docker"]
CONNECTIONS: Mapping[str, Transport] = {
    "ssh": "ssh", "smart": "ssh", "paramiko": "ssh", "local": "local",
    "docker": "docker", "community.docker.docker": "docker"}
_RANGE = re.compile(r"\[([0-9]{0,9}|[A-Za-z]):([0-9]{1,9}|[A-Za-z])(?::([0-9]{1,9}))?\]")
MAX_RANGE_HOSTS = 10_000   # one inventory entry; a typo like [0:99999999] must not fill memory
MAX_GROUP_DEPTH = 32       # groups inside groups; real inventories nest a few levels
_PLAIN_HOST = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class Host:
    name: str                                    # inventory name; also the ~/.ssh/config alias
    address: str | None = None                   # ansible_host; None: ssh config / name decides
    port: int | None = None
    user: str | None = None
    key_file: str | None = None
    transport: Transport = "ssh"
    container: str | None = None                 # docker: container name (provision_container)
    via: Transport = "ssh"                       # docker: how the container's host is reached
    jump: str | None = None                      # ProxyJump spec, when not from ssh config
    become: bool = False                         # ansible_become: escalate where a step needs it
    become_user: str = "root"                    # ansible_become_user
    become_password_env: str | None = None       # provision_become_password_env
    groups: tuple[str, ...] = ()
    vars: Mapping[str, Any] = field(default_factory=dict)
    origin: str = ""                             # inventory file the host came from ("" inline)
    overlay_marks: Mapping[KeyPath, Mark] = field(default_factory=dict, compare=False, repr=False)

    @property
    def overlay(self) -> Mapping[str, Any]:
        """Profile keys this host overrides (`provision:` in its vars)."""
        return self.vars.get("provision") or {}


@dataclass(frozen=True)
class Inventory:
    file: str                                    # "" for an inline host list
    hosts: tuple[Host, ...]                      # in inventory order
    groups: Mapping[str, tuple[str, ...]]        # group -> member host names (descendants included)

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise UsageError(f"no host {name!r} in {self.file or 'the inline host list'}")

    def select(self, pattern: str) -> list[Host]:
        """Hosts matching an Ansible pattern: unions first, then `&` intersections, then `!` exclusions."""
        terms = [t.strip() for t in re.split(r"[,:]", pattern) if t.strip()]
        if not terms:
            raise UsageError("empty host pattern; use all, a group or a host name")
        plain = [t for t in terms if t[0] not in "&!"]
        chosen = set().union(*(self._match(t, pattern) for t in plain)) if plain else self._match("all", pattern)
        for term in terms:
            if term[0] == "&":
                chosen &= self._match(term[1:], pattern)
        for term in terms:
            if term[0] == "!":
                chosen -= self._match(term[1:], pattern)
        return [h for h in self.hosts if h.name in chosen]

    def _match(self, term: str, pattern: str) -> set[str]:
        names = [h.name for h in self.hosts]
        if term in ("all", "*"):
            return set(names)
        if term in self.groups:
            return set(self.groups[term])
        if term in names:
            return {term}
        hit: Callable[[str], object] | None = None
        if term.startswith("~"):
            try:
                hit = re.compile(term[1:]).search
            except re.error as err:
                raise UsageError(f"host pattern {pattern!r}: bad regex {term!r}: {err}") from None
        elif any(c in term for c in "*?["):
            hit = partial(fnmatch.fnmatchcase, pat=term)
        if hit is not None:
            found = {n for n in names if hit(n)}
            found.update(*(self.groups[g] for g in self.groups if hit(g)))
            if found or any(hit(g) for g in self.groups):
                return found
        groups = [g for g in self.groups if g not in ("all", "ungrouped")]
        close = difflib.get_close_matches(term, groups + names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UsageError(f"host pattern {pattern!r}: {term!r} matches no host or group in "
                         f"{self.file or 'the inline host list'}; groups: {', '.join(groups) or '(none)'}{hint}")


def expand_range(name: str) -> list[str]:
    """Ansible host ranges: `gpu-[01:04]` -> gpu-01 … gpu-04, `node-[a:c]`, `rack-[A:D]`,
    `n[1:9:2]`, several per name. Raises ValueError for a range that names no host (`[09:01]`),
    mismatched widths, a bracket that is not a range, or more than MAX_RANGE_HOSTS names."""
    pieces: list[Sequence[str]] = []
    at = 0
    for found in _RANGE.finditer(name):
        pieces += [(name[at:found.start()],), _range_items(*found.groups())]
        at = found.end()
    pieces.append((name[at:],))
    if any("[" in text or "]" in text for (text,) in pieces[::2]):
        raise ValueError("a bracket that is not a host range (ranges are [01:04], [a:f] or [1:9:2])")
    _at_most(math.prod(len(p) for p in pieces))
    return ["".join(parts) for parts in itertools.product(*pieces)]


def _range_items(start: str, end: str, step_text: str | None) -> Sequence[str]:
    """What one `[start:end:step]` stands for."""
    step = int(step_text or 1)
    if step < 1:
        raise ValueError("a range step must be at least 1")
    numeric = start.isdigit() or not start  # Ansible: an empty start is 0
    if numeric != end.isdigit():
        raise ValueError("a range is letters or numbers, not both")
    if numeric:
        first, last = int(start or 0), int(end)
        if start.startswith("0") and len(start) > 1 and len(start) != len(end):
            raise ValueError("zero-padded range bounds must have the same width, like [01:10]")
        if first > last:
            raise ValueError(f"the range runs backwards, so it names no host; write [{end}:{start}]")
        numbers = range(first, last + 1, step)
        _at_most(len(numbers))  # counted before a single name is made
        width = len(start) if start.startswith("0") else 0
        return [str(n).zfill(width) for n in numbers]
    first, last = string.ascii_letters.index(start), string.ascii_letters.index(end)  # a…z then A…Z
    if first > last:
        raise ValueError(f"the range runs backwards, so it names no host; write [{end}:{start}]")
    return string.ascii_letters[first:last + 1:step]


def _at_most(count: int) -> None:
    if count > MAX_RANGE_HOSTS:
        raise ValueError(f"expands to {count} hosts, over the {MAX_RANGE_HOSTS} one entry may name; split it")


@dataclass
class _Group:
    parents: set[str] = field(default_factory=set)
    levels: list[tuple[Mapping[str, Any], dict[KeyPath, Mark]]] = field(default_factory=list)
    hosts: dict[str, None] = field(default_factory=dict)    # an ordered set
    mark: KeyPath = ()


class _Parser:
    """Walks the `all:` tree once, collecting groups, their vars and each host's own vars."""

    def __init__(self, file: str, marks: Mapping[KeyPath, Mark]) -> None:
        self.file = file
        self.marks = marks
        self.groups: dict[str, _Group] = {}
        self.host_levels: dict[str, list[tuple[Mapping[str, Any], dict[KeyPath, Mark]]]] = {}
        self.host_path: dict[str, KeyPath] = {}
        self.problems: list[Problem] = []

    def group(self, name: str, body: Any, path: KeyPath, parent: str | None) -> None:
        if name == "all" and parent is not None:
            self.problems.append(problem(self.marks, self.file, path, "`all` is every host's group; it "
                                         "cannot be the child of a group", "remove it from children"))
            return
        group = self.groups.setdefault(name, _Group(mark=path))
        if parent is not None:
            group.parents.add(parent)
        body = body or {}
        if body.get("vars"):
            group.levels.append((body["vars"], sub_marks(self.marks, (*path, "vars"), body["vars"])))
        for raw, host_vars in (body.get("hosts") or {}).items():
            try:
                names = expand_range(raw)
            except ValueError as err:
                self.problems.append(problem(self.marks, self.file, (*path, "hosts", raw), str(err)))
                continue
            level = (host_vars or {}, sub_marks(self.marks, (*path, "hosts", raw), host_vars))
            for name_ in names:
                self.host_path.setdefault(name_, (*path, "hosts", raw))
                self.host_levels.setdefault(name_, []).append(level)
                group.hosts[name_] = None
        for child, child_body in (body.get("children") or {}).items():
            self.group(child, child_body, (*path, "children", child), name)

    def depths(self) -> dict[str, int]:
        """Each group's distance from `all`; a cycle, or nesting past MAX_GROUP_DEPTH, is a problem
        (and ends the walk there: later steps recurse along the same chains)."""
        depth: dict[str, int] = {"all": 0}

        def visit(name: str, stack: tuple[str, ...]) -> int:
            if name in depth:
                return depth[name]
            if name in stack:
                chain = " -> ".join((*stack[stack.index(name):], name))
                self.problems.append(problem(self.marks, self.file, self.groups[name].mark, f"group cycle: {chain}"))
                depth[name] = 1
                return 1
            if len(stack) > MAX_GROUP_DEPTH:
                depth[name] = MAX_GROUP_DEPTH + 1
                return depth[name]
            parents = self.groups[name].parents or {"all"}
            depth[name] = 1 + max(visit(p, (*stack, name)) for p in sorted(parents))
            return depth[name]

        for name in self.groups:
            visit(name, ())
        deep = next((g for g in self.groups if depth[g] > MAX_GROUP_DEPTH), None)
        if deep is not None:
            self.problems.append(problem(self.marks, self.file, self.groups[deep].mark,
                                         f"groups nested deeper than {MAX_GROUP_DEPTH} levels"))
        return depth


def _merge_vars(levels: list[tuple[Mapping[str, Any], dict[KeyPath, Mark]]]) -> tuple[dict[str, Any], dict[KeyPath, Mark]]:
    """Later levels win; `provision:` mappings deep-merge instead of replacing."""
    out: dict[str, Any] = {}
    overlay_marks: dict[KeyPath, Mark] = {}
    for values, marks in levels:
        for key, value in values.items():
            if key == "provision" and isinstance(value, Mapping):
                merged = deep_merge(out.get("provision") or {}, value, ATOMIC)
                overlay_marks = merge_marks(merged, overlay_marks, sub_marks(marks, ("provision",), value))
                out[key] = merged
            else:
                out[key] = value
    return out, overlay_marks


def _jump(vars_: Mapping[str, Any]) -> str | None:
    """provision_jump, else a ProxyJump (`-J x`, `-o ProxyJump=x`) in Ansible's ssh args. A
    ProxyCommand there is refused, never ignored: without it the host may not be reachable at all."""
    jump = None
    for var, option, value in _ssh_options(vars_):
        if option == "proxycommand":
            raise ValueError(f"{var} sets ProxyCommand, which provision does not run (it reaches hosts "
                             "without local commands); use ProxyJump: -J HOST, or provision_jump")
        if option == "proxyjump":
            if not value or value.startswith("-"):
                raise ValueError(f"ProxyJump {value!r} in {var} is not a host")
            jump = value
    if vars_.get("provision_jump"):
        return str(vars_["provision_jump"])
    return jump


def _ssh_options(vars_: Mapping[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(variable, option name in lower case, value) of each `-o Name=value` and `-J host` in
    ansible_ssh_common_args and ansible_ssh_extra_args."""
    for var in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
        try:
            words = shlex.split(str(vars_.get(var) or ""))
        except ValueError as err:  # an unclosed quote
            raise ValueError(f"{var}: {err}") from None
        for i, word in enumerate(words):
            following = words[i + 1] if i + 1 < len(words) else ""
            if word.startswith("-J"):
                yield var, "proxyjump", word[2:] or following
            elif word.startswith("-o"):
                name, _, value = (word[2:] or following).strip().replace("=", " ", 1).partition(" ")
                yield var, name.lower(), value.strip()


def _host(name: str, vars_: dict[str, Any], groups: tuple[str, ...], origin: str,
          overlay_marks: dict[KeyPath, Mark]) -> Host:
    connection = CONNECTIONS[vars_.get("ansible_connection", "ssh")]
    address = vars_.get("ansible_host", vars_.get("ansible_ssh_host"))
    container = vars_.get("provision_container")
    if connection == "docker" and not container:  # Ansible's docker plugin: ansible_host is the container
        container, address = address or name, None
    port = vars_.get("ansible_port", vars_.get("ansible_ssh_port"))
    if port is not None and not 0 < int(port) < 65536:
        raise ValueError(f"ansible_port {port} is out of range 1-65535")
    return Host(
        name=name, address=address, port=int(port) if port is not None else None,
        user=vars_.get("ansible_user", vars_.get("ansible_ssh_user")),
        key_file=vars_.get("ansible_ssh_private_key_file", vars_.get("ansible_private_key_file")),
        transport="docker" if container else connection, container=container,
        via=vars_.get("provision_via", "ssh" if connection == "ssh" else "local"),
        jump=_jump(vars_), groups=groups, vars=vars_, origin=origin, overlay_marks=overlay_marks,
        become=_become(vars_), become_user=vars_.get("ansible_become_user", "root"),
        become_password_env=vars_.get("provision_become_password_env"))


def _become(vars_: Mapping[str, Any]) -> bool:
    """ansible_become, with its method: only sudo is driven (su reads a password from a terminal)."""
    on = str(vars_.get("ansible_become", False)).lower() in ("true", "yes")
    if on and vars_.get("ansible_become_method", "sudo") != "sudo":
        raise ValueError(f"ansible_become_method {vars_['ansible_become_method']} is not supported: su reads "
                         "the password only from a terminal; use sudo")
    return on


def load_inventory(path: str | os.PathLike[str], document: Document | None = None) -> Inventory:
    """Read (unless `document` is the file, already read) an Ansible inventory: YAML, INI, the JSON
    of `ansible-inventory --list`, or an executable script (config/inventory_forms.py). Raises
    ConfigError listing every problem, located."""
    file = os.fspath(path)
    doc = document if document is not None else read_inventory(file)
    if not isinstance(doc.data, Mapping) or not doc.data:
        raise ConfigError([Problem(file, 1, 1, "", "expected a mapping of groups like all: {hosts: …, children: …}",
                                   "see `provision schema inventory`")])
    problems = schema_problems(doc.data, doc.marks, file, "inventory")
    if problems:
        raise ConfigError(problems)
    parser = _Parser(file, doc.marks)
    parser.groups.setdefault("all", _Group())
    for name, body in doc.data.items():
        parser.group(name, body, (name,), None if name == "all" else "all")
    depth = parser.depths()
    if parser.problems:
        raise ConfigError(parser.problems)
    members = _members(parser.groups)
    members["all"] = set(parser.host_levels)
    ungrouped = [h for h in parser.host_levels if not any(h in m for g, m in members.items() if g != "all")]
    if ungrouped:
        members["ungrouped"] = set(ungrouped)
        parser.groups.setdefault("ungrouped", _Group(parents={"all"}))
        depth["ungrouped"] = 1
    hosts, problems = [], []
    for name, own in parser.host_levels.items():
        mine = sorted((g for g in members if name in members[g]),
                      key=lambda g: (depth[g], _priority(parser.groups[g]), g))
        levels = [lv for g in mine for lv in parser.groups[g].levels] + own
        vars_, overlay_marks = _merge_vars(levels)
        try:
            hosts.append(_host(name, vars_, tuple(g for g in mine if g != "all"), file, overlay_marks))
        except ValueError as err:
            problems.append(problem(doc.marks, file, parser.host_path[name], str(err)))
    if problems:
        raise ConfigError(problems)
    order = [h.name for h in hosts]
    return Inventory(file, tuple(hosts), {g: tuple(h for h in order if h in m) for g, m in members.items()})


def _members(groups: Mapping[str, _Group]) -> dict[str, set[str]]:
    """Each group's hosts, its descendants' included (cycles were rejected before)."""
    children: dict[str, list[str]] = {g: [] for g in groups}
    for name, group in groups.items():
        for parent in group.parents:
            children[parent].append(name)
    out: dict[str, set[str]] = {}

    def collect(name: str) -> set[str]:
        if name not in out:
            out[name] = set(groups[name].hosts).union(*(collect(c) for c in children[name]))
        return out[name]

    return {name: collect(name) for name in groups}


def _priority(group: _Group) -> int:
    values = [lv[0].get("ansible_group_priority") for lv in group.levels]
    return next((int(v) for v in reversed(values) if isinstance(v, int)), 1)


def inline_inventory(spec: str) -> Inventory:
    """A profile's `hosts: a,b` without an inventory file, like `ansible -i a,b,`."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if not _PLAIN_HOST.match(n) or n == "all"]
    if not names or bad:
        raise UsageError(f"hosts {spec!r} needs an inventory: set `inventory:` in the profile or give "
                         "-i INVENTORY, or list plain host names like gpu-01,gpu-02")
    hosts = tuple(Host(n, transport="local" if n == "localhost" else "ssh",
                       via="local" if n == "localhost" else "ssh", groups=("ungrouped",))
                  for n in dict.fromkeys(names))
    every = tuple(h.name for h in hosts)
    return Inventory("", hosts, {"all": every, "ungrouped": every})


def hosts_for(profile: Profile, inventory: str | None = None, limit: str | None = None,
              where: str | None = None) -> list[Host]:
    """The hosts a profile targets: its `hosts` pattern over `inventory` (`-i`, else the profile's
    own, else `hosts` names them itself), narrowed by `--limit` as Ansible's is (never widened).
    `where` names the profile's `hosts` key in messages (`file:line:col: hosts`, when known)."""
    where = where or f"the profile's `hosts` ({profile.file})"
    source = inventory or profile.inventory
    if source:
        inv = load_inventory(source)
    else:
        try:
            inv = inline_inventory(profile.hosts)
        except UsageError as err:
            raise UsageError(f"{where}: {err}") from None
    chosen = _select(inv, profile.hosts, where)
    if limit:
        keep = {h.name for h in _select(inv, limit, "--limit")}
        narrowed = [h for h in chosen if h.name in keep]
        if not narrowed:
            raise UsageError(f"--limit {limit!r} keeps none of the {len(chosen)} host(s) the profile's "
                             f"`hosts: {profile.hosts}` selects ({', '.join(h.name for h in chosen[:5])}"
                             f"{', …' if len(chosen) > 5 else ''}); --limit narrows, it never adds hosts")
        chosen = narrowed
    return chosen


def _select(inv: Inventory, pattern: str, origin: str) -> list[Host]:
    try:
        chosen = inv.select(pattern)
    except UsageError as err:
        raise UsageError(f"{origin}: {err}") from None
    if not chosen:
        raise UsageError(f"{origin}: host pattern {pattern!r} selects no host of "
                         f"{inv.file or 'the inline host list'}")
    return chosen
