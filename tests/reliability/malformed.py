"""Generated malformed profiles and inventories: every case is bad input by construction.

`cases(count, seed)` is deterministic. Each case starts from a valid profile and inventory (the
suite checks they validate) and breaks one thing, cycling through the families below so a small
run still meets every family: wrong types, out-of-range and huge numbers, control characters,
strings no pattern allows, unknown and duplicate keys, YAML syntax and tabs, non-UTF-8 bytes,
alias bombs, deep nesting, scalars YAML cannot build, oversized files, `extends` cycles and broken
parents, odd top levels; then the inventory's variables, structure (ranges, cycles, `all` as a
child), ssh arguments, host overlays, and the same file-level damage done to the inventory.
"""

from __future__ import annotations

import copy
import datetime
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from provisioner.config.schema import schema

REPO = Path(__file__).resolve().parents[2]
PROFILE, INVENTORY = "profile.yaml", "inventory.yaml"
CLOSED_PORT = 9  # discard: nothing listens on loopback here, so a plan that got this far fails fast


@dataclass(frozen=True)
class Case:
    name: str                      # family-number, stable for a seed
    family: str
    files: Mapping[str, bytes]     # relative path -> content
    note: str                      # what was broken, for failure messages


def base_profile() -> dict[str, Any]:
    return {
        "inventory": INVENTORY, "hosts": "gpu",
        "comfyui": {"root": "/opt/ComfyUI", "port": 8188, "venv": "venv",
                    "restart": {"systemd": "comfyui.service"}},
        "plugin": {"tag": "v1.1.0", "name": "ComfyUI-nunchaku"},
        "backend": {"version": "1.0.1", "sources": ["github", {"mirror": "https://mirror.example/{filename}"}]},
        "packages": ["diffusers>=0.35", "peft>=0.17"],
        "pip": {"find_links": ["https://wheels.example/"]},
        "model": {"variant": "lightning-4step-r128"},
        "huggingface": {"endpoint": "https://huggingface.co", "token_env": "HF_TOKEN"},
        "workflow": {"template_dir": str(REPO / "templates"), "steps": 4, "width": 1024, "prompt": "a fox",
                     "dest": "workflows", "templates": ["qwen-image-edit-lightning.json.j2"]},
        "verify": {"warm_runs": 2, "prompts": ["a fox"], "thresholds": {"warm_seconds": 6.0}},
    }


def base_inventory() -> dict[str, Any]:
    return {"all": {
        "vars": {"ansible_user": "ops"},
        "hosts": {"gpu-01": {"ansible_host": "127.0.0.1", "ansible_port": CLOSED_PORT}},
        "children": {"gpu": {"hosts": {"gpu-01": None}, "vars": {"gpu_kind": "rtx3090"}}},
    }}


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=False, width=10_000)


def files(profile: Any = None, inventory: Any = None, **more: bytes | str) -> dict[str, bytes]:
    """A case's files: the profile and inventory (data, or text/bytes as written), and others."""
    out: dict[str, bytes] = {}
    for name, value, default in ((PROFILE, profile, base_profile), (INVENTORY, inventory, base_inventory)):
        value = default() if value is None else value
        out[name] = value if isinstance(value, bytes) else (value if isinstance(value, str) else dump(value)).encode()
    for name, value in more.items():
        out[name.replace("__", "/")] = value if isinstance(value, bytes) else value.encode()
    return out


# --- the schema, walked -----------------------------------------------------------------------

def _leaves(node: Mapping[str, Any], path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Mapping[str, Any]]]:
    for name, child in node.get("properties", {}).items():
        if "properties" in child:
            yield from _leaves(child, (*path, name))
        else:
            yield (*path, name), child
            if child.get("type") == "array" and isinstance(child.get("items"), Mapping):
                yield (*path, name, 0), child["items"]


def _types(node: Mapping[str, Any]) -> set[str]:
    kinds = node.get("type")
    if kinds is None and "if" in node:  # backend.sources items: "github" or a one-key mapping
        return {"string", "object"}
    return set(kinds) if isinstance(kinds, list) else {kinds} if kinds else set()


LEAVES = [(p, s) for p, s in _leaves(schema("profile")) if p[0] not in ("extends",)]
STRINGS = [(p, s) for p, s in LEAVES if "string" in _types(s)]
NUMBERS = [(p, s) for p, s in LEAVES if _types(s) & {"integer", "number"}]


def put(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A copy of `data` with `value` at `path` (mappings and a first list item made as needed)."""
    out = copy.deepcopy(data)
    node: Any = out
    for part, nxt in zip(path, path[1:]):
        if isinstance(part, int):
            while len(node) <= part:
                node.append({} if isinstance(nxt, str) else [])
            node = node[part]
        else:
            if not isinstance(node.get(part), (dict, list)):
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not node:
            node.append(value)
        else:
            node[0] = value
    else:
        node[last] = value
    return out


def key_text(path: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in path)


# --- families: profile ------------------------------------------------------------------------

WRONG = {"string": "text", "integer": 7, "number": 2.5, "boolean": True, "null": None,
         "array": ["x"], "object": {"x": 1}}


def wrong_type(rng: random.Random) -> tuple[dict[str, bytes], str]:
    path, node = rng.choice(LEAVES)
    allowed = _types(node) | ({"integer"} if "number" in _types(node) else set())
    kinds = [k for k in WRONG if k not in allowed] + ["date"]
    kind = rng.choice(kinds)
    value = datetime.date(2024, 1, 2) if kind == "date" else WRONG[kind]
    return files(put(base_profile(), path, value)), f"{key_text(path)} set to a {kind}"


def number_bounds(rng: random.Random) -> tuple[dict[str, bytes], str]:
    path, node = rng.choice(NUMBERS)
    options: list[Any] = [float("nan"), float("inf"), float("-inf")]
    if "minimum" in node:
        options += [node["minimum"] - 1, -(10 ** 18)]
    if "exclusiveMinimum" in node:
        options += [node["exclusiveMinimum"], -1]
    if "maximum" in node:
        options += [node["maximum"] + 1, 10 ** 30]
    if "integer" in _types(node):
        options += [float(node.get("minimum", 1)) + 0.5, float(node.get("default", 8) or 8)]
    if "multipleOf" in node:
        options.append(node["multipleOf"] * 100 + 1)
    value = rng.choice(options)
    text = dump(put(base_profile(), path, 0)).replace(f"{path[-1]}: 0\n", f"{path[-1]}: {_yaml_number(value)}\n", 1)
    return files(text), f"{key_text(path)} = {value!r}"


def _yaml_number(value: Any) -> str:
    if isinstance(value, float) and value != value:
        return ".nan"
    if value in (float("inf"), float("-inf")):
        return ".inf" if value > 0 else "-.inf"
    return repr(value)


CONTROL = ["\n", "\x00", "\x1b[2J", "\x7f", "\u2028", "\x85", "\r", "\x08", "\x0c"]
PROMPT_CONTROL = ["\x00", "\x1b[31m", "\x7f", "\x07", "\x1b]0;title\x07"]


def control_chars(rng: random.Random) -> tuple[dict[str, bytes], str]:
    path, node = rng.choice(STRINGS)
    prompt = path[:2] in (("workflow", "prompt"), ("verify", "prompts"))
    current = _value_at(base_profile(), path)
    text = current if isinstance(current, str) else str(node.get("default") or "x")
    bad = rng.choice(PROMPT_CONTROL if prompt else CONTROL)
    where = rng.choice(["end", "middle", "start"])
    value = {"end": text + bad, "start": bad + text, "middle": text[:1] + bad + text[1:]}[where]
    return files(put(base_profile(), path, value)), f"{key_text(path)} with {bad!r} at the {where}"


def _value_at(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


# Values each key's pattern or rule refuses (hostile, wrong shape, or both).
REFUSED: dict[tuple[Any, ...], list[str]] = {
    ("comfyui", "root"): ["opt/ComfyUI", "/", "//", "/opt/../etc", "/opt/a;b", "~/ComfyUI", "-rf"],
    ("comfyui", "listen"): ["0.0.0.0;id", "a b", "$(id)", "127.0.0.1/8"],
    ("comfyui", "restart", "systemd"): ["-x", "a b", "unit;id", "$(id).service"],
    ("comfyui", "restart", "docker"): ["-x", "a/b", "c;id", "`id`"],
    ("plugin", "name"): ["../x", "a/b", ".hidden", "-x", "a b", "$(id)"],
    ("plugin", "repo"): ["-uhttps://x", "--upload-pack=touch x", "ext::sh -c touch% x", "fd::17", "ext::sh",
                         "https://x y", "transport::address"],
    ("plugin", "tag"): ["latest", "v1.1", "1.1.0", "v1.1.0;id", "v1.1.0 ", "v1234567890.0.0"],
    ("backend", "version"): ["one.zero", "1.0.1;id", "$(id)", "1.0.1 and more"],
    ("packages", 0): ["diffusers>>0.35", "nunchaku", "peft>=0.17\npeft", "; rm -rf /", "diffusers @ ",
                      "diffusers>=0.35 ; os_name ==", "-e .", "--index-url=http://evil"],
    ("pip", "index_url"): ["ftp://x", "-i http://x", "http://x y", "javascript:alert(1)"],
    ("pip", "find_links", 0): ["-f x", "a b", "--no-deps"],
    ("model", "family"): ["Qwen", "flux-1-dev", "a/b", "../x"],
    ("model", "variant"): ["lightning-2step", "A", "x;y"],
    ("model", "sha256"): ["abc", "A" * 64, "g" * 64],
    ("huggingface", "endpoint"): ["ftp://hub", "huggingface.co", "http://a b"],
    ("huggingface", "token_env"): ["HF TOKEN", "1TOKEN", "$HF_TOKEN", "A-B"],
    ("workflow", "templates", 0): ["../secrets", "a/b.j2", "-x.j2", "missing.json.j2"],
    ("workflow", "dest"): ["/etc", "../..", "../x", "a/../../b"],
    ("workflow", "sampler"): ["euler;id", "a b", "$(id)"],
    ("workflow", "scheduler"): ["beta'", "a-b", ""],
    ("hosts", ): ["a b", "", "gpu\n"],
    ("backend", "sources", 1, "mirror"): ["ftp://x/{filename}", "https://x/{nope}", "https://x/{filename"],
    ("backend", "sources", 1, "huggingface"): ["no-slash", "a/b/c", "-a/b"],
    ("backend", "sources", 1, "github"): ["git@github.com:a/b", "http://a b"],
}


def refused_string(rng: random.Random) -> tuple[dict[str, bytes], str]:
    path = rng.choice(sorted(REFUSED, key=str))
    value = rng.choice(REFUSED[path])
    data = base_profile()
    if path[:3] == ("backend", "sources", 1):  # a one-key mapping: replace it whole
        data["backend"]["sources"][1] = {path[3]: value}
        return files(data), f"{key_text(path)} = {value!r}"
    return files(put(data, path, value)), f"{key_text(path)} = {value!r}"


def unknown_key(rng: random.Random) -> tuple[dict[str, bytes], str]:
    data = base_profile()
    mappings = [()] + [p[:-1] for p, _ in LEAVES if p[:-1] and not any(isinstance(x, int) for x in p)]
    where = rng.choice(sorted(set(mappings), key=str))
    known = list(_value_at(schema("profile"), _schema_path(where))["properties"]) if where else list(data)
    name = rng.choice(known)
    typo = rng.choice([name[:-1], name + "s", name[1:] + name[0], name.upper(), name.replace("_", "-") + "_", "x" + name])
    if typo in known:
        typo = typo + "_"
    return files(put(data, (*where, typo), 1)), f"unknown key {key_text((*where, typo))}"


def _schema_path(path: tuple[Any, ...]) -> tuple[Any, ...]:
    out: list[Any] = []
    for part in path:
        out += ["properties", part]
    return tuple(out)


def duplicate_key(rng: random.Random) -> tuple[dict[str, bytes], str]:
    lines = dump(base_profile()).splitlines(keepends=True)
    candidates = [i for i, line in enumerate(lines) if ": " in line and not line.lstrip().startswith("- ")]
    i = rng.choice(candidates)
    lines.insert(i + 1, lines[i])
    return files("".join(lines)), f"line {i + 1} repeated"


def syntax(rng: random.Random) -> tuple[dict[str, bytes], str]:
    lines = dump(base_profile()).splitlines(keepends=True)
    indented = [i for i, line in enumerate(lines) if line.startswith("  ") and ": " in line]
    scalars = [i for i, line in enumerate(lines) if line.rstrip().endswith(tuple("0123456789abcdefghijklmnopqrstuvwxyz"))
               and ": " in line and not line.lstrip().startswith("- ")]
    kind = rng.choice(["tab", "flow", "quote", "colon", "dash", "alias", "documents", "directive", "escape"])
    i = rng.choice(indented if kind == "tab" else scalars)
    line = lines[i]
    if kind == "tab":
        lines[i] = "\t" + line.lstrip(" ")
    elif kind == "flow":
        key, _, _ = line.partition(": ")
        lines[i] = f"{key}: [a, b\n"
    elif kind == "quote":
        key, _, value = line.partition(": ")
        lines[i] = f'{key}: "{value.rstrip()}\n'
    elif kind == "colon":
        lines[i] = line.replace(": ", " ", 1)
    elif kind == "dash":
        lines.insert(i + 1, " " * (len(line) - len(line.lstrip())) + "- stray\n")
    elif kind == "alias":
        key, _, _ = line.partition(": ")
        lines[i] = f"{key}: *nowhere\n"
    elif kind == "documents":
        lines.append("---\nhosts: all\n")
    elif kind == "directive":
        lines.insert(0, "%YAML 9.1\n---\n")
    else:
        key, _, _ = line.partition(": ")
        lines[i] = f'{key}: "bad \\q escape"\n'
    return files("".join(lines)), f"{kind} at line {i + 1}"


BAD_BYTES = [b"\xff", b"\xc3", b"\xe9t\xe9", b"\xed\xa0\x80", b"\xc0\xaf", b"\x00", b"\xfe\xff", b"\x80",
             b"\x01", b"\x1b", b"\x7f", b"\x08"]          # raw control characters, which PyYAML refuses unlocated


def encoding(rng: random.Random, text: str | None = None) -> tuple[bytes, str]:
    raw = (text if text is not None else dump(base_profile())).encode()
    kind = rng.choice(["insert", "insert", "utf16", "latin1"])
    if kind == "utf16":
        return raw.decode().encode("utf-16"), "the file in UTF-16"
    if kind == "latin1":
        return raw.replace(b"a fox", "a fox \u00e9t\u00e9".encode("latin-1"), 1) + "# caf\u00e9\n".encode("latin-1"), "Latin-1 text"
    at = rng.randrange(len(raw))
    bad = rng.choice(BAD_BYTES)
    return raw[:at] + bad + raw[at:], f"{bad!r} at byte {at}"


def encoding_profile(rng: random.Random) -> tuple[dict[str, bytes], str]:
    raw, note = encoding(rng)
    return files(raw), note


def bomb(rng: random.Random) -> str:
    """A YAML text whose aliases expand past any sane size (or refer to themselves)."""
    kind = rng.choice(["laughs", "laughs", "merge", "recursive-seq", "recursive-map", "wide"])
    if kind == "recursive-seq":
        return "a: &x [1, *x]\n"
    if kind == "recursive-map":
        return "a: &x {k: *x}\n"
    if kind == "merge":
        depth = rng.randint(12, 20)
        out = ["m0: &m0 {k: v}"] + [f"m{i}: &m{i} {{<<: [*m{i - 1}], k{i}: [*m{i - 1}, *m{i - 1}]}}" for i in range(1, depth)]
        return "\n".join(out) + "\n"
    width, depth = rng.randint(6, 12), rng.randint(6, 10)
    if kind == "wide":
        width, depth = 400, 3
    out = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    out += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth)]
    return "\n".join(out) + "\n"


def alias_bomb(rng: random.Random) -> tuple[dict[str, bytes], str]:
    text = dump(base_profile()) + "# a bomb in a key provision does not know\n" + bomb(rng)
    return files(text), "alias bomb"


def nesting(rng: random.Random) -> str:
    kind = rng.choice(["flow", "block", "mixed"])
    if kind == "flow":
        n = rng.choice([65, 200, 999, 5000, 100_000])
        return "deep: " + "[" * n + "]" * n + "\n"
    if kind == "block":
        n = rng.randint(65, 300)
        return "deep:\n" + "".join("  " * (i + 1) + "a:\n" for i in range(n)) + "  " * (n + 1) + "x: 1\n"
    n = rng.randint(40, 120)
    return "deep: " + "{a: [" * n + "1" + "]}" * n + "\n"


def deep_nesting(rng: random.Random) -> tuple[dict[str, bytes], str]:
    return files(dump(base_profile()) + nesting(rng)), "deep nesting"


SCALARS = ["2001-13-45", "2024-02-30", "!!int abc", "!!int 0xZZ", "!!float x", "!!bool maybe",
           "!!timestamp nope", "!!binary '%%%'", "!!python/name:os.system x", "!!python/object/new:os.system [id]",
           "!foo bar", "!<tag:evil.example,2024:x> y", "1" * 5000, "0x" + "f" * 3000, "-" + "9" * 30,
           "!!python/object/apply:os.system ['id']", "!!set {a: 1}", "!!omap [a: 1]"]


def yaml_scalar(rng: random.Random) -> tuple[dict[str, bytes], str]:
    path, _ = rng.choice([(p, s) for p, s in LEAVES if not isinstance(p[-1], int)])
    scalar = rng.choice(SCALARS)
    text = dump(put(base_profile(), path, "PLACEHOLDER")).replace("PLACEHOLDER", scalar, 1)
    return files(text), f"{key_text(path)}: {scalar[:40]}"


def huge(rng: random.Random) -> tuple[dict[str, bytes], str]:
    kind = rng.choice(["padding", "string", "version", "list", "keys"])
    data = base_profile()
    if kind == "padding":
        return files(dump(data) + "#" + "x" * (520 << 10) + "\n"), "over 512 KiB"
    if kind == "string":
        path, _ = rng.choice([(p, s) for p, s in STRINGS if p[:2] not in (("workflow", "prompt"), ("verify", "prompts"))])
        return files(put(data, path, "a" * rng.choice([10_000, 200_000]) + "\n")), f"{key_text(path)}: a long line"
    if kind == "version":
        path = rng.choice([("backend", "version"), ("plugin", "tag"), ("packages", 0)])
        value = {"backend": "1." + "1" * 5000, "plugin": "v" + "9" * 5000 + ".0.0", "packages": "peft>=" + "7" * 5000}[path[0]]
        return files(put(data, path, value)), f"{key_text(path)}: 5000 digits"
    if kind == "list":
        data["packages"] = [f"pkg{i % 50}>=1" for i in range(5000)]  # names repeat: listed twice
        return files(data), "5000 packages, most listed twice"
    data.update({f"unknown_{i}": i for i in range(5000)})
    return files(data), "5000 unknown keys"


def extends(rng: random.Random) -> tuple[dict[str, bytes], str]:
    kind = rng.choice(["cycle", "self", "missing", "directory", "not-a-name", "broken-parent", "broken-parent"])
    child: dict[str, Any] = {}  # the parent's break must not be merged away
    if kind == "cycle":
        n = rng.randint(2, 4)
        names = [PROFILE] + [f"p{i}.yaml" for i in range(1, n)]
        parents = base_profile()
        out = files({"extends": names[1], **child})
        for i in range(1, n):
            out[names[i]] = dump({**(parents if i == 1 else {}), "extends": names[(i + 1) % n]}).encode()
        return out, f"extends cycle of {n}"
    if kind == "self":
        return files({"extends": PROFILE, **base_profile()}), "extends itself"
    if kind == "missing":
        return files({"extends": "nowhere/base.yaml", **child}), "extends a missing file"
    if kind == "directory":
        return files({"extends": "parents", **child}, **{"parents__keep": ""}), "extends a directory"
    if kind == "not-a-name":
        return files({"extends": rng.choice([["base.yaml"], 3, {"file": "base.yaml"}, "", "a\x00b"]), **child}), \
            "extends is not a file name"
    broken, note = rng.choice(PROFILE_FAMILIES[:-2])[1](rng)
    out = files({"extends": "base.yaml", **child})
    out["base.yaml"] = broken[PROFILE]
    for name, content in broken.items():
        if name not in (PROFILE, INVENTORY):
            out[name] = content
    return out, f"broken parent: {note}"


TOPS = ["", "# only a comment\n", "~\n", "[]\n", "- a\n- b\n", "42\n", "'text'\n", "---\n...\n",
        "a: 1\n---\nb: 2\n", "\ufeff\n", "{}\n"]


def top_level(rng: random.Random) -> tuple[dict[str, bytes], str]:
    top = rng.choice(TOPS)
    return files(top), f"top level {top!r}"


# --- families: inventory ----------------------------------------------------------------------

INVENTORY_VALUES: dict[str, list[Any]] = {
    "ansible_port": ["abc", 0, 70000, -1, 22.5, 22.0, "22; id", "0x16", [22], True, ""],
    "ansible_ssh_port": ["abc", 0, 70000, 22.5, "22 ", {"p": 22}],
    "ansible_host": ["-oProxyCommand=touch x", "a b", "host\n", "", " 127.0.0.1", 42, ["a"]],
    "ansible_ssh_host": ["-x", "a\tb", "x\n", 7],
    "ansible_user": ["root;id", "", "a b", "-l", "root\n", "$(id)", 0],
    "ansible_ssh_user": ["root;id", "-oX", "x\n"],
    "ansible_connection": ["winrm", "ssh ", "SSH", 1, "docker;id"],
    "provision_via": ["telnet", "ssh\n", True],
    "provision_container": ["-x", "a/b", "c;id", "", "x\n"],
    "provision_jump": ["-J", " bastion", "a b", "x\n", ""],
    "ansible_group_priority": ["high", 0, -3, 1.5],
    "ansible_ssh_private_key_file": ["key\n", "a\x00b", 5],
    "ansible_private_key_file": ["k\x1b", ["a"]],
    "ansible_ssh_common_args": [7, ["-J", "x"]],
}


def inventory_var(rng: random.Random) -> tuple[dict[str, bytes], str]:
    var = rng.choice(sorted(INVENTORY_VALUES))
    value = rng.choice(INVENTORY_VALUES[var])
    inv = base_inventory()
    level = rng.choice(["host", "all", "group"])
    target = {"host": inv["all"]["hosts"]["gpu-01"], "all": inv["all"]["vars"],
              "group": inv["all"]["children"]["gpu"]["vars"]}[level]
    target[var] = value
    return files(inventory=inv), f"{var} = {value!r} in {level} vars"


def inventory_structure(rng: random.Random) -> tuple[dict[str, bytes], str]:
    inv = base_inventory()
    kind = rng.choice(["hosts-list", "vars-list", "children-scalar", "group-name", "cycle", "all-child",
                       "deep-groups", "unknown-key", "host-name", "range", "range", "range", "not-mapping"])
    all_ = inv["all"]
    if kind == "hosts-list":
        all_["hosts"] = ["gpu-01"]
    elif kind == "vars-list":
        all_["vars"] = ["ansible_user=ops"]
    elif kind == "children-scalar":
        all_["children"] = "gpu"
    elif kind == "group-name":
        all_["children"][rng.choice(["bad group", "9lives", "g;id", "g\n", "-g"])] = {"hosts": {"gpu-01": None}}
    elif kind == "cycle":
        n = rng.randint(2, 4)
        all_["children"]["gpu"]["children"] = {"c0": None}
        for i in range(n):
            all_["children"][f"c{i}"] = {"children": {f"c{(i + 1) % n}": None}}
    elif kind == "all-child":
        place = rng.choice([all_, all_["children"]["gpu"]])
        place.setdefault("children", {})["all"] = None
    elif kind == "deep-groups":
        n = rng.randint(40, 400)
        order = range(n) if rng.random() < 0.5 else range(n - 1, -1, -1)
        for i in order:
            all_["children"][f"g{i}"] = {"children": {f"g{i + 1}": None}}
    elif kind == "unknown-key":
        all_["children"]["gpu"][rng.choice(["hots", "var", "child", "host"])] = {}
    elif kind == "host-name":
        all_["hosts"][rng.choice(["gpu 01", "gpu;id", "gpu\n01", "gpu/01", "$(id)", "gpu-01\n"])] = None
    elif kind == "range":
        name = rng.choice(["gpu-[09:01]", "gpu-[0:99999999]", "n[0:999]-[0:99]", "gpu-[1:c]", "gpu-[1:4:0]",
                           "gpu-[1-4]", "gpu-[01:100]", "rack-[Z:A]", "gpu-[0:" + "9" * 12 + "]", "gpu-[a:z][0:9999]"])
        all_["children"]["gpu"]["hosts"][name] = None
        return files(inventory=inv), f"host range {name}"
    else:
        return files(inventory=rng.choice(["- gpu-01\n", "gpu-01\n", "", "all: []\n", "{}\n"])), "not a mapping of groups"
    return files(inventory=inv), kind


SSH_ARGS = ["-o ProxyCommand=nc\\ %h\\ %p", "-oProxyCommand=touch\\ x", "-o 'ProxyCommand ssh -W %h:%p b'",
            "-o proxycommand=x", "-o PROXYCOMMAND=x", "-o 'unclosed", "-J", "-J -oProxyCommand=x",
            "-o ProxyJump=-oProxyCommand=x", "-o ProxyJump=", "-J ''"]


def inventory_ssh_args(rng: random.Random) -> tuple[dict[str, bytes], str]:
    inv = base_inventory()
    var = rng.choice(["ansible_ssh_common_args", "ansible_ssh_extra_args"])
    value = rng.choice(SSH_ARGS)
    rng.choice([inv["all"]["hosts"]["gpu-01"], inv["all"]["vars"], inv["all"]["children"]["gpu"]["vars"]])[var] = value
    return files(inventory=inv), f"{var}: {value}"


def overlay(rng: random.Random) -> tuple[dict[str, bytes], str]:
    kind = rng.choice(["type", "bounds", "control", "refused", "unknown", "shape", "extends"])
    inv = base_inventory()
    host = inv["all"]["hosts"]["gpu-01"]
    if kind == "shape":
        host["provision"] = rng.choice([["comfyui"], "root=/opt", 5])
        return files(inventory=inv), "provision: is not a mapping"
    if kind == "extends":
        host["provision"] = {"extends": "base.yaml"}
        return files(inventory=inv), "provision: extends"
    if kind == "unknown":
        host["provision"] = {"comfyui": {"rot": "/srv/ComfyUI"}}
        return files(inventory=inv), "provision: unknown key"
    family = {"type": wrong_type, "bounds": number_bounds, "control": control_chars, "refused": refused_string}[kind]
    broken, note = family(rng)
    data = yaml.safe_load(broken[PROFILE].decode())
    good = base_profile()
    diff = {k: v for k, v in data.items() if good.get(k) != v and k not in ("inventory", "hosts")}
    if not diff:  # the break was in `inventory` or `hosts`, which overlays do not carry: use a type break
        diff = {"comfyui": {"port": "8188"}}
    target = rng.choice([host, inv["all"]["children"]["gpu"].setdefault("vars", {})])
    target["provision"] = diff
    return files(inventory=inv), f"overlay: {note}"


def inventory_file(rng: random.Random) -> tuple[dict[str, bytes], str]:
    kind = rng.choice(["encoding", "bomb", "nesting", "duplicate", "tab", "scalar", "huge"])
    text = dump(base_inventory())
    if kind == "encoding":
        raw, note = encoding(rng, text)
        return files(inventory=raw), f"inventory: {note}"
    if kind == "bomb":
        return files(inventory=text + bomb(rng)), "inventory: alias bomb"
    if kind == "nesting":
        return files(inventory=text + nesting(rng)), "inventory: deep nesting"
    if kind == "duplicate":
        return files(inventory=text.replace("    gpu-01:\n", "    gpu-01:\n      ansible_user: a\n      ansible_user: b\n", 1)
                     if rng.random() < 0.5 else text + "all: {}\n"), "inventory: duplicate key"
    if kind == "tab":
        return files(inventory=text.replace("  hosts:", "\thosts:", 1)), "inventory: a tab"
    if kind == "scalar":
        scalar = rng.choice(SCALARS)
        return files(inventory=text.replace(f"ansible_port: {CLOSED_PORT}", f"ansible_port: {scalar}", 1)), \
            f"inventory: ansible_port {scalar[:30]}"
    return files(inventory=text + "#" + "x" * (520 << 10) + "\n"), "inventory over 512 KiB"


Family = Callable[[random.Random], tuple[dict[str, bytes], str]]
PROFILE_FAMILIES: list[tuple[str, Family]] = [
    ("wrong-type", wrong_type), ("number-bounds", number_bounds), ("control-chars", control_chars),
    ("refused-string", refused_string), ("unknown-key", unknown_key), ("duplicate-key", duplicate_key),
    ("syntax", syntax), ("encoding", encoding_profile), ("alias-bomb", alias_bomb), ("deep-nesting", deep_nesting),
    ("yaml-scalar", yaml_scalar), ("huge", huge), ("top-level", top_level), ("extends", extends),
]
INVENTORY_FAMILIES: list[tuple[str, Family]] = [
    ("inventory-var", inventory_var), ("inventory-structure", inventory_structure),
    ("inventory-ssh-args", inventory_ssh_args), ("overlay", overlay), ("inventory-file", inventory_file),
]
FAMILIES = PROFILE_FAMILIES + INVENTORY_FAMILIES


def cases(count: int, seed: int) -> list[Case]:
    """`count` cases, the families taken in turn, each drawn from its own seeded generator."""
    rng = random.Random(seed)
    out = []
    for i in range(count):
        family, make = FAMILIES[i % len(FAMILIES)]
        made, note = make(random.Random(rng.getrandbits(64)))
        out.append(Case(f"{family}-{i:03d}", family, made, note))
    return out
