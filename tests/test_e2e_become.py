"""End to end as an unprivileged login with become, over real sshd and real sudo: its own module,
since the users it makes and removes would otherwise pull them from under test_become's."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import sudo_users
from sudo_users import become_users, sudo_log

pytestmark = pytest.mark.skipif(sudo_users.available() is not None, reason=str(sudo_users.available()))


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    with sudo_users.shared_folder() as path:
        yield path


@contextlib.contextmanager
def _interpreter_reachable() -> Iterator[None]:
    """The lab's stand-ins run this interpreter (their #! line), so the login user must reach it.
    A folder on its way that others cannot enter (a mode-700 home holding pyenv's Python) gets the
    search bit alone (no listing) for this test, and its mode back afterwards."""
    real = Path(os.path.realpath(sys.executable))
    closed = [(folder, folder.stat().st_mode) for folder in real.parents
              if not folder.stat().st_mode & stat.S_IXOTH]
    try:
        for folder, mode in closed:
            os.chmod(folder, stat.S_IMODE(mode) | stat.S_IXOTH)
        yield
    finally:
        for folder, mode in closed:
            os.chmod(folder, stat.S_IMODE(mode))


def test_an_unprivileged_login_converges_a_host_with_become_and_comfyui_runs_as_its_user(
        shared_dir: Path) -> None:
    """The whole of it over real sshd and real sudo: the login (prov-nopw) owns ComfyUI's root and
    is not root; ComfyUI runs as root under a unit written by hand. With ansible_become, plan says
    which changes run as root; apply converges and verifies; the unit runs ComfyUI as prov-nopw;
    every file under the root stays prov-nopw's; sudo's log shows only the unit's steps as root."""
    from lab import open_lab
    from sshd import listening

    with _interpreter_reachable(), open_lab(shared_dir / "lab") as lab:
        (host,) = lab.add(1)
        host.under_systemd()                                   # as root, by hand
        log = shared_dir / "sudo.log"
        with become_users(host.sshd, log):
            uid, gid = sudo_users.ids("prov-nopw")
            systems = (host.sandbox.root / "etc", host.sandbox.root / "systemd")   # root's: units, their state
            for path in (host.sandbox.root, *host.sandbox.root.rglob("*")):
                if not any(path.is_relative_to(d) for d in systems):
                    os.lchown(path, uid, gid)
            # The plugin's origin is a local repository, which git clones only for its owner (no
            # safe.directory anywhere): give it to the login, as an https origin would not care.
            subprocess.run(["chown", "-R", "prov-nopw:", str(shared_dir / "lab" / "world" / "git")], check=True)
            lab.host_vars[host.name] = {"ansible_user": "prov-nopw", "ansible_become": True}
            lab.overlays[host.name] = {"comfyui": {"root": str(host.comfy), "port": host.port, "restart": None,
                                                   "service": "systemd", "unit_dir": str(host.unit_dir)}}
            lab.write()
            deadline = time.monotonic() + 60            # the hand-written unit's ComfyUI, as root, listening
            while not listening(host.port) and time.monotonic() < deadline:
                time.sleep(0.2)
            code, out = lab.run("plan", "--limit", host.name)
            assert code == 2, out
            assert "(as root (sudo, as prov-nopw))" in out and "ComfyUI runs as root" in out
            code, out = lab.run("apply", "--limit", host.name)
            assert code == 2, out
            assert f"{host.name} PASS generation" in out
            unit = (host.unit_dir / "comfyui.service").read_text()
            assert "User=prov-nopw\n" in unit and "ProtectSystem=strict\n" in unit
            (address,) = listening(host.port)
            foreign = [p for p in (host.comfy, *host.comfy.rglob("*")) if p.lstat().st_uid != uid]
            assert foreign == [], foreign[:5]                   # every file under the root is still its owner's
            assert _listener_uid(host.port) == uid                 # ComfyUI runs as the root's owner
            escalated = [e for e in sudo_log(log) if "prov-nopw" in e and "USER=root" in e]
            launches = [e for e in escalated if "COMMAND=/bin/sh -c" in e]
            # the check (sudo -n true) once per connection, and one supervisor per system step:
            # write the unit (its content, then chmod and rename), daemon-reload, enable, restart; the
            # hand-written unit is backed up as the login, and every other step ran as the login too.
            assert len(launches) == 5, escalated
            assert lab.run("plan", "--limit", host.name)[0] == 0


def test_a_root_owned_by_a_service_user_is_worked_in_as_that_user_and_only_the_unit_steps_run_as_root(
        shared_dir: Path) -> None:
    """ComfyUI's root (its venv, custom_nodes, everything under it) belongs to prov-comfy, a service
    user that cannot log in; the login is prov-nopw with ansible_become. The plan says the changes
    under the root run as prov-comfy and the unit's as root; apply converges and verifies; a second
    apply changes nothing; every file under the root is still prov-comfy's; sudo's log shows the
    root's work as prov-comfy and nothing as root but the unit's steps."""
    from lab import open_lab
    from sshd import listening

    with _interpreter_reachable(), open_lab(shared_dir / "lab") as lab:
        (host,) = lab.add(1)
        host.under_systemd()                                   # as root, by hand
        log = shared_dir / "sudo.log"
        with become_users(host.sshd, log):
            uid, gid = sudo_users.ids(sudo_users.SERVICE)
            systems = (host.sandbox.root / "etc", host.sandbox.root / "systemd")   # root's: units, their state
            for path in (host.sandbox.root, *host.sandbox.root.rglob("*")):
                if not any(path.is_relative_to(d) for d in systems):
                    os.lchown(path, uid, gid)
            # git clones a local origin only for its owner: the root's owner clones it
            subprocess.run(["chown", "-R", f"{sudo_users.SERVICE}:", str(shared_dir / "lab" / "world" / "git")],
                           check=True)
            assert (host.comfy / "venv").is_dir() and (host.comfy / "custom_nodes").is_dir()
            lab.host_vars[host.name] = {"ansible_user": "prov-nopw", "ansible_become": True}
            lab.overlays[host.name] = {"comfyui": {"root": str(host.comfy), "port": host.port, "restart": None,
                                                   "service": "systemd", "unit_dir": str(host.unit_dir)}}
            lab.write()
            deadline = time.monotonic() + 60            # the hand-written unit's ComfyUI, as root, listening
            while not listening(host.port) and time.monotonic() < deadline:
                time.sleep(0.2)
            code, out = lab.run("plan", "--limit", host.name, "--json")
            assert code == 2, out
            doc, _ = json.JSONDecoder().raw_decode(out[out.index("{"):])
            changes = doc["hosts"][0]["changes"]
            whom = {c["resource"]: c["as"] for c in changes}
            assert set(whom.values()) == {"prov-comfy (sudo, as prov-nopw)", "root (sudo, as prov-nopw)"}, whom
            assert whom["service"] == "root (sudo, as prov-nopw)", whom
            code, out = lab.run("plan", "--limit", host.name)
            assert code == 2, out
            assert "(as prov-comfy (sudo, as prov-nopw))" in out and "(as root (sudo, as prov-nopw))" in out, out
            assert sudo_log(log) and not [e for e in sudo_log(log) if "USER=root" in e and "COMMAND=/bin/sh" in e]
            code, out = lab.run("apply", "--limit", host.name)
            assert code == 2, out
            assert f"{host.name} PASS generation" in out
            unit = (host.unit_dir / "comfyui.service").read_text()
            assert f"User={sudo_users.SERVICE}\n" in unit and "ProtectSystem=strict\n" in unit
            (address,) = listening(host.port)
            assert _listener_uid(host.port) == uid                 # ComfyUI runs as the root's owner
            applied = len(sudo_log(log))
            code, out = lab.run("apply", "--limit", host.name)
            assert code == 0, out                                  # nothing left to change
            foreign = [p for p in (host.comfy, *host.comfy.rglob("*")) if (p.lstat().st_uid, p.lstat().st_gid) != (uid, gid)]
            assert foreign == [], foreign[:5]                      # every file under the root is still its owner's
            entries = [e for e in sudo_log(log) if "prov-nopw" in e]
            launches = [e for e in entries if "COMMAND=/bin/sh -c" in e]
            as_root = [e for e in launches if "USER=root" in e]
            as_owner = [e for e in launches if f"USER={sudo_users.SERVICE}" in e]
            assert len(as_owner) + len(as_root) == len(launches), launches
            # root: one supervisor per unit step (write the unit: its content, then chmod and rename;
            # daemon-reload, enable, restart), all in the first apply; the rest ran as prov-comfy
            assert len(as_root) == 5, as_root
            assert not [e for e in sudo_log(log)[applied:] if "USER=root" in e and "COMMAND=/bin/sh" in e]
            assert len(as_owner) > 10, len(as_owner)
            assert lab.run("plan", "--limit", host.name)[0] == 0
            # history reads the snapshots and what runs now as the owner too: its checkouts, unrefused
            code, out = lab.run("history", "--limit", host.name, "--json")
            assert code == 0, out
            found = json.JSONDecoder().raw_decode(out[out.index("{"):])[0][host.name]
            assert found["snapshots"] and found["changed_since_newest"] == [] and found["errors"] == [], found


def _listener_uid(port: int) -> int | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].split(":")[1], 16) == port:
                return int(cols[7])
    return None
