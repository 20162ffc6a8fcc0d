"""The injection corpus against a real host: every hostile string, through every field that reaches
a host, is either refused by `provision validate` (exit 3, located) or carried as data, and then
`provision plan` (and `apply`) over a real sshd sandbox host never creates the canary file, never
crashes, and never reports an internal error.

Default run: every payload is validated in every field; the CORE payloads that pass are planned,
and one of them applied in every field that accepts it. `PROVISION_RELIABILITY=full`: every
accepted combination is planned, and every accepted CORE combination applied.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml
from bounded import FULL, LOCATED, Tally
from hostile import CANARY, CORE, FIELDS, PAYLOADS, Field
from lab import Lab, open_lab

from provisioner import cli
from provisioner.config import load_profile
from provisioner.sandbox.world import write_yaml

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-injection")) as lab:
        lab.add(1)
        code, out = lab.run("apply", "--no-verify")
        assert code == 2, out
        yield lab


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


def put(data: dict[str, Any], path: tuple[Any, ...], value: Any, effective: dict[str, Any]) -> None:
    """`value` at `path` in `data`; a final "+" appends to the list the profile has in effect there."""
    node = data
    for i, part in enumerate(path[:-1]):
        if path[i + 1] == "+":
            current = effective
            for p in path[:i + 1]:
                current = current.get(p, {}) if isinstance(current, dict) else {}
            node[part] = [*(current if isinstance(current, list) else []), value]
            return
        node = node.setdefault(part, {})
    node[path[-1]] = value


def configure(lab: Lab, field: Field, value: Any) -> None:
    """The lab's own profile and inventory, with `value` where `field` puts it."""
    lab.write()
    profile = yaml.safe_load(lab.profile.read_text())
    inventory = yaml.safe_load(lab.inventory.read_text())
    host = inventory["all"]["hosts"][lab.hosts[0].name]
    effective = dict(load_profile(lab.profile).data)
    for path, also in field.also:
        put(profile, path, also, effective)
    if field.where == "profile":
        put(profile, field.path, value, effective)
    elif field.where == "overlay":
        put(host["provision"], field.path, value, {})
    elif field.where == "var":
        host[field.path[0]] = value
    else:  # another name for the same server
        inventory["all"]["hosts"][value] = copy.deepcopy(host)
    write_yaml(lab.profile, profile)
    write_yaml(lab.inventory, inventory)


def crashed(output: str) -> bool:
    return "Traceback" in output or "internal error" in output


def check(lab: Lab, field: Field, payload: str, canary: Path, counts: dict[str, int],
          applied_fields: set[str]) -> str:
    """What went wrong with this value in this field, or ""."""
    code, out = run("validate", str(lab.profile))
    if code == 3:
        counts["refused at validation"] += 1
        if crashed(out) or not any(LOCATED.match(line) for line in out.splitlines()):
            return f"refused without a located message\n{out[-800:]}"
        return ""
    if code != 0 or crashed(out):
        return f"validate exited {code}\n{out[-800:]}"
    counts["carried as data"] += 1
    runs = []
    if FULL or payload in CORE:
        runs.append(("plan",))
    if payload in CORE and (FULL or field.name not in applied_fields):
        applied_fields.add(field.name)
        prompts = field.name in ("workflow.prompt", "verify.prompts")
        runs.append(("apply",) if prompts else ("apply", "--no-verify"))  # prompts reach ComfyUI's API
    for argv in runs:
        code, out = lab.run(*argv)
        counts["planned" if argv[0] == "plan" else "applied"] += 1
        if code not in (0, 1, 2) or crashed(out) or canary.exists():
            return f"{argv[0]} exited {code}, canary {canary.exists()}\n{out[-800:]}"
    return ""


def test_hostile_strings_are_refused_or_carried_as_data(lab: Lab, capsys: pytest.CaptureFixture[str]) -> None:
    canary = lab.root / "CANARY"
    tally = Tally("injection corpus", bounded=False)
    counts = {"refused at validation": 0, "carried as data": 0, "planned": 0, "applied": 0}
    applied_fields: set[str] = set()
    try:
        for field in FIELDS:
            for payload in PAYLOADS:
                value = field.shape(payload.replace(CANARY, str(canary)), lab)
                configure(lab, field, value)
                wrong = check(lab, field, payload, canary, counts, applied_fields)
                tally.add(not wrong, f"{field.name} = {value!r}: {wrong}")
                assert not canary.exists(), f"{field.name} = {value!r} created the canary"
    finally:
        lab.write()
    tally.extra.update(counts)
    tally.extra["fields"] = len(FIELDS)
    tally.extra["payloads"] = len(PAYLOADS)
    with capsys.disabled():
        print(f"\n{tally.line()}")
    assert not canary.exists()
    assert not tally.failures, f"{len(tally.failures)} of {tally.tried}:\n" + "\n".join(tally.failures[:10])
    assert counts["refused at validation"] and counts["carried as data"] and counts["applied"]
