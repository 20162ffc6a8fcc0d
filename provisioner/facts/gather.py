"""Facts in ONE round trip: send the script and the merged probe, read one JSON answer."""

from __future__ import annotations

import json
import posixpath
from dataclasses import replace

from provisioner.config.model import Profile
from provisioner.connection.base import NO_PYTHON, Connection, Result
from provisioner.connection.become import BecomeConnection
from provisioner.errors import ConnectError, FactsError
from provisioner.facts.model import Facts, Login, Probe
from provisioner.facts import venv_record
from provisioner.facts.parse import parse_facts
from provisioner import remote

def facts_argv() -> list[str]:
    """The one command the host runs: its system python3 runs the script (the supervisor that
    runs it already says so when the host has no python3), isolated and without `site`."""
    return list(remote.argv("facts"))


def base_probe(profile: Profile) -> Probe:
    """What every run looks at: ComfyUI's checkout and version, its venv, whether it answers, and
    the apply lock's text (an apply need not gather again under the lock when it is unchanged)."""
    comfy = profile.comfyui
    return Probe(
        stat=(comfy.root, comfy.venv),
        read=(posixpath.join(comfy.root, "comfyui_version.py"),
              posixpath.join(comfy.root, "pyproject.toml"), comfy.lock),
        git=(comfy.root,),
        http=(comfy.url + "/system_stats",),
    )


def build_request(profile: Profile, probe: Probe) -> dict:
    """The JSON the script reads on stdin."""
    return {
        "root": profile.comfyui.root,
        "python": profile.comfyui.python,
        "checksums": profile.comfyui.checksums,
        "stat": list(probe.stat),
        "read": list(probe.read),
        "grep": [list(pair) for pair in probe.grep],
        "git": list(probe.git),
        "git_command": remote.git_request(),
        "http": list(probe.http),
        "show": [list(pair) for pair in probe.show],
        "remote_tags": [list(item) for item in probe.remote_tags],
        "headers": list(probe.headers),
        "interpreters": list(probe.interpreters),
        "ports": list(probe.ports),
        "units": {"files": [list(pair) for pair in probe.unit_files], "names": list(probe.units)},
        "space": list(probe.space),
        "listing": list(probe.listing),
        "markers": list(probe.markers),
        "node_packs": list(probe.node_packs),
    }


def read_answer(host_name: str, result: Result, comfyui_gpu: int | str | None = None) -> Facts:
    """The script's stdout as `Facts`; anything else is a one-line FactsError."""
    return parse_facts(host_name, json_answer(host_name, result), comfyui_gpu)


def json_answer(host_name: str, result: Result) -> dict:
    """The script's stdout as its JSON object; anything else is a one-line FactsError."""
    err_lines = [x.strip() for x in result.stderr.splitlines() if x.strip()]
    if NO_PYTHON in result.stderr:
        raise FactsError(f"{host_name}: no python3 on the host; the facts script needs python3 >= 3.8 "
                         "on PATH (install it, e.g. `apt-get install python3`)")
    try:
        answer = json.loads(result.stdout)
        if not isinstance(answer, dict):
            raise ValueError("not an object")
    except ValueError:
        # The first stderr line, unless it opens a traceback: then its last line says what broke.
        why = err_lines[0] if err_lines else "no stderr"
        if why.startswith(("Traceback", "File ")):
            why = err_lines[-1]
        raise FactsError(f"{host_name}: the facts script answered no JSON "
                         f"(exit {result.exit_code}): {why}") from None
    return answer


def gather(conn: Connection, profile: Profile, probe: Probe = Probe()) -> Facts:
    """Everything about the host in one `conn.run`: base facts plus what `probe` asks.

    Where ComfyUI's root belongs to another user than the login (not root) and the login can
    become that owner, the work under the root runs as the owner (`choose_owner`): the facts are
    read once more, as the owner (git reads a checkout only for its owner), and every later read
    of this connection runs as the owner at once."""
    owner = conn.owner
    if owner is not None and isinstance(getattr(owner, "login", None), Login):
        facts = _read(owner, profile, probe)
        if facts.login.root_owner_uid == facts.login.uid:     # still the owner's root
            return replace(facts, login=_as_login(owner.login, facts.login))  # type: ignore[attr-defined]
        conn.owner = None                                    # given to someone else since: choose again
    facts = _read(conn, profile, probe)
    login = choose_owner(conn, can_become(conn.machine, facts.login))
    if conn.owner is None:
        return replace(facts, login=login)
    conn.owner.login = login            # type: ignore[attr-defined]
    facts = _read(conn.owner, profile, probe)
    return replace(facts, login=_as_login(login, facts.login))


def _as_login(login: Login, read: Login) -> Login:
    """The login's own Login (who it is, whom it becomes), with the root's owner as the facts just
    read it as that owner."""
    return replace(login, root_owner=read.root_owner, root_owner_uid=read.root_owner_uid, root_group=read.root_group)


def _read(conn: Connection, profile: Profile, probe: Probe) -> Facts:
    """The facts script's answer, as the user `conn` runs commands as."""
    request = build_request(profile, base_probe(profile) | probe)
    python = profile.comfyui.python
    before = venv_record.recorded(conn.name, python)
    if before is not None:      # the host answers "unchanged" rather than start the venv's python
        request["venv_known"] = before["fingerprint"]
    result = conn.run(facts_argv(), stdin=json.dumps(request).encode(), timeout=profile.timeouts.facts_s,
                      check=False)
    answer = json_answer(conn.name, result)
    answer["env"] = venv_record.merge(conn.name, python, answer.get("env"), before)
    return parse_facts(conn.name, answer, profile.comfyui.gpu)


def choose_owner(conn: Connection, login: Login) -> Login:
    """The one place that decides whom the work under ComfyUI's root runs as: the login, unless it
    is neither root nor the root's owner and ansible_become is on; then the owner, through sudo
    (`conn.owner`), once sudo said yes (else `works_as_error`, in sudo's words: the plan refuses)."""
    if login.uid in (None, 0) or login.root_owner is None or login.root_owner_uid in (None, login.uid):
        return login
    if not isinstance(conn.become, BecomeConnection):
        return login                    # become off: the plan refuses (plan/build.py)
    owner = conn.become if conn.become.user == login.root_owner else conn.become.to(login.root_owner)
    try:
        owner.check()
    except ConnectError as err:
        return replace(login, works_as_error=str(err))
    conn.owner = owner
    return replace(login, works_as=login.root_owner)


def can_become(conn: Connection, login: Login) -> Login:
    """The login as the plan needs it: whom `system` steps run as (ansible_become, checked with
    `sudo -n true`, or with the password on stdin: one more exec, only when the login is not root)."""
    if not isinstance(conn.become, BecomeConnection):
        return login
    if login.user == conn.become.user:
        conn.become = None      # the login already is that user: its steps need no sudo at all
        return login
    if login.uid == 0:
        return login
    try:
        conn.become.check()
    except ConnectError as err:
        return replace(login, become_error=str(err))
    return replace(login, become=conn.become.user)
