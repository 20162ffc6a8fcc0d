"""Generated malformed profiles and inventories through the real CLI: each one must be bad input
(exit 3) with a `file:line:col:` message naming one of its files, within 5 s and 512 MiB of
address space, and never a traceback or an "internal error".

`PROVISION_RELIABILITY=full` runs 520 cases (each through `validate` and `plan`); the default is
one round of the families, about a minute on two cores. `PROVISION_RELIABILITY_SEED` picks
another deterministic draw.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from bounded import FULL, LOCATED, Outcome, Tally, provision
from malformed import FAMILIES, INVENTORY, PROFILE, Case, base_inventory, base_profile, cases, dump

pytestmark = pytest.mark.reliability

COUNT = 520 if FULL else 3 * len(FAMILIES)
SEED = int(os.environ.get("PROVISION_RELIABILITY_SEED", "2025"))
VERBS = (("validate",), ("plan", "--connect-timeout", "1"))


def write(case: Case, root: Path) -> Path:
    where = root / case.name
    for name, content in case.files.items():
        path = where / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return where


def verdict(case: Case, where: Path, outcome: Outcome) -> str:
    """Why this run is not what bad input must give, or "" when it is."""
    if outcome.code is None:
        return f"still running after {outcome.seconds:.1f} s"
    if outcome.code != 3:
        return f"exit {outcome.code}, not 3"
    if "Traceback" in outcome.output or "internal error" in outcome.output:
        return "a traceback or internal error"
    ours = {(where / name).resolve() for name in case.files}
    located = [m for m in map(LOCATED.match, outcome.output.splitlines()) if m]
    if not any((where / m["file"]).resolve() in ours for m in located):
        return "no `file:line:col:` message naming one of its files"
    if any(len(line) > 1000 for line in outcome.output.splitlines()):
        return "a line over 1000 characters"
    return ""


def test_the_bases_the_cases_break_are_valid(tmp_path: Path) -> None:
    (tmp_path / PROFILE).write_text(dump(base_profile()))
    (tmp_path / INVENTORY).write_text(dump(base_inventory()))
    outcome = provision(["validate", PROFILE, INVENTORY], tmp_path)
    assert outcome.code == 0, outcome.output


def test_malformed_inputs_are_located_bad_input_in_bounded_time_and_memory(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    made = cases(COUNT, SEED)
    assert len({c.family for c in made}) == len(FAMILIES)
    tally = Tally(f"malformed inputs (seed {SEED})")
    tally.extra["runs"] = 0

    def run(case: Case) -> list[tuple[bool, str, float]]:
        where = write(case, tmp_path)
        out = []
        for verb in VERBS:
            outcome = provision([*verb, PROFILE], where)
            why = verdict(case, where, outcome)
            out.append((not why, f"{case.name} [{case.note}] `provision {verb[0]}`: {why}\n"
                                  f"{outcome.output[-600:]}", outcome.seconds))
        return out

    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        for case, runs in zip(made, pool.map(run, made)):
            ok = all(held for held, _, _ in runs)
            tally.add(ok, "\n".join(why for held, why, _ in runs if not held), max(s for _, _, s in runs))
            tally.extra["runs"] += len(runs)
    with capsys.disabled():
        print(f"\n{tally.line()}")
    assert not tally.failures, f"{len(tally.failures)} of {tally.tried} cases:\n" + "\n".join(tally.failures[:15])
