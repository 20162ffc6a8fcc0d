"""The service-manager stand-in (tests/service_manager.py, what the fast suite's hosts run) held
against real systemd: the same sequence of `systemctl` and `journalctl` commands, over the same unit
file, on a booted host and on the stand-in; what provision reads of the answers must be the same.
The same for units with `User=` (the hardened unit's). docs/testing.md lists what this found."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from machines import Machine
from sshd import install_service_manager

pytestmark = pytest.mark.hosts

# A service that says something on both streams, then fails while "starting": as a ComfyUI whose
# custom node ends the process. Restart=on-failure, as provision's own unit has it.
UNIT = """[Unit]
Description=Probe of the stand-in

[Service]
ExecStart=/bin/sh -c 'echo "probe: on stdout"; echo "probe: on stderr" >&2; sleep 3; exit 3'
Restart=on-failure
RestartSec=30
TimeoutStopSec=30

[Install]
WantedBy=multi-user.target
"""
Runner = Callable[..., "subprocess.CompletedProcess[str]"]
CHILD_LINE = re.compile(r"^TIME HOST \([^)]*\)\[PID\]: ")   # a line of systemd's forked child, shaped


def journal_shape(text: str) -> list[str]:
    """The journal's lines with their time, host and pid made neutral, lines about CPU time
    (accounting, which systemd logs only where it has it) left out."""
    shaped = []
    for line in text.splitlines():
        line = re.sub(r"^\w{3} \d\d \d\d:\d\d:\d\d \S+ ", "TIME HOST ", line)
        line = re.sub(r"\[\d+\]:", "[PID]:", line)
        if "Consumed " not in line and "Journal begins" not in line:
            shaped.append(line)
    return shaped


def sequence(run: Runner) -> list[tuple[str, object]]:
    """What provision reads, step by step: exit codes, states, the journal."""
    seen: list[tuple[str, object]] = []

    def look(label: str, *argv: str) -> None:
        proc = run(*argv)
        seen.append((label, (proc.returncode, proc.stdout.strip())))

    look("is-enabled before", "systemctl", "is-enabled", "probe")
    look("daemon-reload", "systemctl", "daemon-reload")
    look("enable", "systemctl", "enable", "probe")
    look("is-enabled", "systemctl", "is-enabled", "probe")
    look("start", "systemctl", "start", "probe")
    look("active while it runs", "systemctl", "show", "probe", "--property=ActiveState,SubState")
    time.sleep(5.0)                                          # it exited 3; the restart is 30 s away
    look("after it died", "systemctl", "show", "probe", "--property=ActiveState,SubState,MainPID")
    look("is-active after it died", "systemctl", "is-active", "probe")
    journal = run("journalctl", "-u", "probe", "-n", "40", "--no-pager").stdout
    # Sorted: journald orders systemd's `Started` line and the service's first lines by their own
    # clocks, so either may come first on a real host.
    seen.append(("journal", sorted(journal_shape(journal))))
    look("stop", "systemctl", "stop", "probe")
    look("after stop", "systemctl", "show", "probe", "--property=ActiveState,SubState,MainPID")
    look("disable", "systemctl", "disable", "--now", "probe")
    look("is-enabled after", "systemctl", "is-enabled", "probe")
    return seen


@pytest.fixture(scope="module")
def machine(boot: Callable[[str], Machine]) -> Machine:
    return boot("probe")


def test_the_service_manager_stand_in_answers_as_real_systemd(machine: Machine, tmp_path: Path) -> None:
    machine.path("/etc/systemd/system/probe.service").write_text(UNIT)
    real = sequence(lambda *argv: machine.ssh(*argv))

    units, bin_dir = tmp_path / "units", tmp_path / "bin"
    bin_dir.mkdir()
    install_service_manager(bin_dir, units, tmp_path / "state")
    (units / "probe.service").write_text(UNIT)
    stand_in = sequence(lambda tool, *args: subprocess.run([str(bin_dir / tool), *args], capture_output=True,
                                                           text=True, timeout=60))
    differences = [f"{label}: real systemd {want!r}, the stand-in {got!r}"
                   for (label, want), (_, got) in zip(real, stand_in) if got != want]
    assert not differences, "\n".join(differences)


# User= as the hardened unit has it: who the process is and the environment systemd gives it, for a
# user with a home and a shell (root), one whose shell is nologin (daemon), systemd's own `nobody`;
# and a User= that names no one (a typo in comfyui.user) under Restart=on-failure, as provision's unit.
AS_USER = """[Unit]
Description=Probe of User=

[Service]
User=WHO
ExecStart=/bin/sh -c 'echo "as $$(id -un):$$(id -gn) in $$(pwd) home=$${HOME-unset} user=$$USER logname=$$LOGNAME shell=$${SHELL-unset}"; sleep 30'
Restart=on-failure
RestartSec=30
"""
USERS = {"probe-root": "root", "probe-daemon": "daemon", "probe-nobody": "nobody",
         "probe-no-one": "provision-no-such-user"}
UNITS = {**{unit: AS_USER.replace("User=WHO", f"User={user}") for unit, user in USERS.items()},
         # and an ExecStart that names no program (203/EXEC), the same way
         "probe-no-exec": AS_USER.replace("User=WHO", "User=daemon").replace("ExecStart=/bin/sh",
                                                                           "ExecStart=/bin/provision-no-such-sh")}


def user_sequence(run: Runner, units_dir: str) -> list[tuple[str, object]]:
    seen: list[tuple[str, object]] = []

    def look(label: str, *argv: str) -> None:
        proc = run(*argv)
        seen.append((label, (proc.returncode, proc.stdout.strip())))

    look("daemon-reload", "systemctl", "daemon-reload")
    for unit in UNITS:
        look(f"start {unit}", "systemctl", "start", unit)
    time.sleep(3.0)
    for unit in UNITS:
        look(f"{unit} after 3 s", "systemctl", "show", unit, "--property=ActiveState,SubState")
        journal = run("journalctl", "-u", unit, "-n", "40", "--no-pager").stdout
        shaped = sorted(journal_shape(journal.replace(units_dir + "/", "UNITS/")))
        # What systemd's forked child logs before its exec (`(-such-sh)[PID]: Failed to locate
        # executable ...`): journald files a line under the unit by the sender's cgroup, read from
        # /proc, and a child that is already gone leaves it unfiled, so `journalctl -u` shows these
        # lines in some runs and not in others (1 run in 3 here lacked both). What provision reads
        # of such a start is systemd's own `status=203/EXEC` line, journalled by PID 1 every time.
        seen.append((f"journal of {unit}", [x for x in shaped if not CHILD_LINE.match(x)]))
        seen.append((f"forked child's lines of {unit}", [x for x in shaped if CHILD_LINE.match(x)]))
    for unit in UNITS:
        look(f"stop {unit}", "systemctl", "stop", unit)
    return seen


def test_the_stand_in_runs_user_as_real_systemd_does(machine: Machine, tmp_path: Path) -> None:
    """The hardened unit's User=: the process's user, group, folder and environment (HOME, USER,
    LOGNAME, SHELL as systemd sets or leaves them), a user that does not exist (217/USER, then a
    restart scheduled) and a program that does not exist (203/EXEC), as real systemd runs and
    journals them."""
    for unit, text in UNITS.items():
        machine.path(f"/etc/systemd/system/{unit}.service").write_text(text)
    real = user_sequence(lambda *argv: machine.ssh(*argv), "/etc/systemd/system")

    units, bin_dir = tmp_path / "units", tmp_path / "bin"
    bin_dir.mkdir()
    install_service_manager(bin_dir, units, tmp_path / "state")
    for unit, text in UNITS.items():
        (units / f"{unit}.service").write_text(text)
    stand_in = user_sequence(lambda tool, *args: subprocess.run([str(bin_dir / tool), *args], capture_output=True,
                                                                text=True, timeout=60), str(units))
    # the forked child's lines: real systemd's, where journald filed them (see user_sequence), are
    # the stand-in's
    differences = [f"{label}: real systemd {want!r}, the stand-in {got!r}"
                   for (label, want), (_, got) in zip(real, stand_in)
                   if (got != want if not label.startswith("forked child") else not set(want) <= set(got))]
    assert not differences, "\n".join(differences)

def test_a_host_can_have_a_deploy_user_who_may_sudo(machine: Machine) -> None:
    """What a test of `become` (provision connecting as a user, not root) needs from a host."""
    machine.add_user("deploy")
    assert machine.ssh("id", "-un", user="deploy", check=True).stdout.strip() == "deploy"
    assert machine.ssh("sudo", "-n", "id", "-u", user="deploy", check=True).stdout.strip() == "0"
    assert machine.ssh("sudo", "-n", "true", user="nobody").returncode != 0         # no other login
