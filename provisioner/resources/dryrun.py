"""pip's own answer to "what would this install do": `pip install --dry-run --report -`.

A plan that installs into the venv names only the requirements it asks for; pip's resolver may move
others with them (pinning `tokenizers` can move `huggingface_hub`). `preview(step, env)` turns the
plan's install step into its dry run, `moves(report, env)` reads pip's installation report
(https://pip.pypa.io/en/stable/reference/installation-report/) into every distribution it would add
or move. Pure: the dry run itself runs in plan/preview.py (and plan/resolve.py, for the lock).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from provisioner.catalog.requirements import is_held
from provisioner.errors import PlanError
from provisioner.facts.model import PythonEnv, canonical
from provisioner.resources.base import Run

DRY_RUN = ("--dry-run", "--quiet", "--report", "-")


def held_pins(env: PythonEnv) -> tuple[str, ...]:
    """The torch family as installed, as requirements: what the constraints file holds at apply time
    (resources/hold.py), without writing it on the host at plan time."""
    return tuple(f"{d.name}=={d.version}" for key, d in sorted(env.distributions.items()) if is_held(key))


def preview(step: Run, env: PythonEnv) -> Run:
    """The dry run of a pip install step (`python -m pip install …`, or the hold program's `python -c
    SOURCE install …`): `python -m pip` with the same requirements and sources, the constraints
    file (written only by the apply) replaced by the held versions it would hold."""
    python, args = step.argv[0], list(step.argv[3:])
    if "-c" in args:
        c = args.index("-c")
        del args[c:c + 2]
        args += held_pins(env)
    at = args.index("install") + 1
    args[at:at] = DRY_RUN
    return Run((python, "-m", "pip", *args), what="pip's dry run of: " + (step.what or "pip install"),
               timeout=step.timeout)


def moves(report: str, env: PythonEnv) -> dict[str, tuple[str | None, str]]:
    """By canonical name, every distribution the report would install, with the version the venv
    has now (None: added). One a report lists at the version installed is no move (a reinstall)."""
    try:
        data = json.loads(report)
        items = data["install"]
        found = {canonical(i["metadata"]["name"]): str(i["metadata"]["version"]) for i in items}
    except (ValueError, KeyError, TypeError) as err:
        raise PlanError(f"pip's --report could not be read ({type(err).__name__}: {err}); pip >= 22.2 "
                        "writes it: upgrade pip in the venv") from None
    return {name: (env.version_of(name), version) for name, version in sorted(found.items())
            if env.version_of(name) != version}


def resolved(env: PythonEnv, moved: Mapping[str, tuple[str | None, str]]) -> dict[str, str]:
    """The venv's distributions (by canonical name, exact versions) once the moves are made."""
    out = {key: d.version for key, d in env.distributions.items()}
    out.update({name: new for name, (_, new) in moved.items()})
    return dict(sorted(out.items()))
