"""`become` over real OpenSSH with real sudo: unprivileged login users (tests/sudo_users.py) reach a
loopback sshd and run commands as root, or as the service user, through connection/become.py.
What sudo ran is read back from its own log (`Defaults logfile=`)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

import sudo_users
from provisioner import secrets
from provisioner.config.inventory import Host
from provisioner.connection import open_connection
from provisioner.connection.become import BecomeConnection
from provisioner.errors import ConnectError
from provisioner.facts.gather import gather
from provisioner.plan.build import owner_problem
from provisioner.resources.base import Change, Run
from provisioner.config.model import build_profile
from sshd import SshdFleet, SshdHost, processes_with
from sudo_users import PASSWORD, SERVICE, become_users, sudo_log

pytestmark = pytest.mark.skipif(sudo_users.available() is not None, reason=str(sudo_users.available()))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdHost]:
    fleet = SshdFleet(tmp_path_factory.mktemp("sshd-become"))
    (host,) = fleet.add(1)
    yield host
    fleet.stop_all()


@pytest.fixture(scope="module")
def sudo_logfile(server: SshdHost, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    log = tmp_path_factory.mktemp("sudo") / "sudo.log"
    with become_users(server, log):
        yield log


def host_for(server: SshdHost, user: str, **become: object) -> Host:
    return Host(name=f"{user}-host", address="127.0.0.1", port=server.port, user=user,
                key_file=str(server.client_key), **become)  # type: ignore[arg-type]


def becoming(server: SshdHost, user: str, password: str | None = None, as_user: str = "root"):
    conn = open_connection(host_for(server, user), server.options())
    return conn, BecomeConnection(conn, as_user, password)


def test_a_nopasswd_login_runs_as_root_with_stdin_and_output_intact(server: SshdHost, sudo_logfile: Path) -> None:
    conn, root = becoming(server, "prov-nopw")
    with conn:
        assert conn.run(["id", "-un"]).stdout.strip() == "prov-nopw"
        assert root.run(["id", "-un"]).stdout.strip() == "root"
        payload = bytes(range(256)) * 64
        assert root.run(["sh", "-c", "cat | od -An -tx1 | wc -l"], stdin=payload).stdout.strip() == \
            str(len(payload) // 16)
        assert root.run(["sh", "-c", "exit 7"], check=False).exit_code == 7
    assert any("prov-nopw" in e and "USER=root" in e for e in sudo_log(sudo_logfile))


def test_a_timeout_stops_the_root_command_that_sudo_started(server: SshdHost, sudo_logfile: Path) -> None:
    """The supervisor that runs as root owns the command's group: the timeout stops it there,
    where the login user could not have signalled it."""
    conn, root = becoming(server, "prov-nopw")
    with conn:
        started = time.monotonic()
        result = root.run(["sleep", "37.123"], timeout=2, check=False)
        assert result.exit_code == 124 and time.monotonic() - started < 20
    deadline = time.monotonic() + 10
    while processes_with("37.123") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with("37.123") == []


def test_a_password_goes_to_sudo_on_stdin_never_in_argv_and_is_redacted(server: SshdHost,
                                                                      sudo_logfile: Path) -> None:
    secrets.give_become_password(PASSWORD)
    try:
        conn, root = becoming(server, "prov-pw", secrets.become_password(None))
        with conn:
            assert root.run(["id", "-un"]).stdout.strip() == "root"
            assert root.run(["cat"], stdin=b"after the password\n").stdout == "after the password\n"
            shown = [" ".join(argv) for argv in (*conn.stats.history, *root.stats.history)]
        assert not any(PASSWORD in line for line in shown)
        assert PASSWORD not in sudo_logfile.read_text()
        assert secrets.redact(f"sudo said {PASSWORD!r}") == "sudo said '***'"
    finally:
        secrets._become_password.clear()


@pytest.mark.parametrize("user, password, why", [
    ("prov-pw", "not-the-password", "incorrect password attempt"),
    ("prov-pw", None, "a password is required; give the become password (-K/--ask-become-pass"),
    ("prov-nosudo", None, "a password is required"),
    ("prov-nosudo", PASSWORD, "prov-nosudo is not in the sudoers file"),
])
def test_a_login_that_cannot_become_is_told_why_in_one_line(server: SshdHost, sudo_logfile: Path, user: str,
                                                           password: str | None, why: str) -> None:
    conn, root = becoming(server, user, password)
    with conn:
        with pytest.raises(ConnectError) as err:
            root.run(["id", "-un"])
    message = str(err.value)
    assert message.startswith(f"{user}-host: cannot become root with sudo") and why in message, message
    assert "\n" not in message and (password is None or password not in message)


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    with sudo_users.shared_folder() as path:
        yield path


def test_the_facts_say_who_logs_in_who_owns_the_root_and_whom_the_login_becomes(
        server: SshdHost, sudo_logfile: Path, shared_dir: Path) -> None:
    root_dir = shared_dir / "ComfyUI"
    root_dir.mkdir()
    os.chown(root_dir, *sudo_users.ids(SERVICE))
    profile = build_profile({"comfyui": {"root": str(root_dir)}}, name="t", file="/p/t.yaml")
    for user, becomes in (("prov-nopw", "root"), ("prov-nosudo", None)):
        host = replace(host_for(server, user), become=True)
        with open_connection(host, server.options()) as conn:
            login = gather(conn, profile).login
            # the work under the root runs as its owner where sudo lets the login become it
            works_as = conn.owner.run(["id", "-un"]).stdout.strip() if conn.owner else None
        assert (login.user, login.root_owner, login.become) == (user, SERVICE, becomes)
        assert (login.become_error is None) == (becomes is not None)
        assert login.works_as == works_as == (SERVICE if becomes else None)
    with open_connection(host_for(server, "prov-nopw"), server.options()) as conn:   # become off
        login = gather(conn, profile).login
        assert conn.owner is None
    assert login.become is None and login.become_error is None and login.works_as is None


def test_a_login_that_cannot_become_the_roots_owner_is_refused_before_any_change_with_sudos_reason(
        server: SshdHost, sudo_logfile: Path, shared_dir: Path) -> None:
    """prov-rootonly may sudo to root (the unit's steps) but not to prov-comfy, who owns the root:
    the facts say why in sudo's words, and the plan refuses the writes under the root; nothing ran
    as prov-comfy, nor as root for them."""
    root_dir = shared_dir / "ComfyUI"
    root_dir.mkdir()
    os.chown(root_dir, *sudo_users.ids(SERVICE))
    profile = build_profile({"comfyui": {"root": str(root_dir)}}, name="t", file="/p/t.yaml")
    host = replace(host_for(server, "prov-rootonly"), become=True)
    with open_connection(host, server.options()) as conn:
        facts = gather(conn, profile)
        assert conn.owner is None
    login = facts.login
    assert (login.user, login.root_owner, login.become, login.works_as) == ("prov-rootonly", SERVICE, "root", None)
    said = login.works_as_error or ""
    assert said.startswith(f"prov-rootonly-host: cannot become {SERVICE} with sudo: sudo: ") and "\n" not in said, said
    write = Change("model", f"{root_dir}/models/x", "create", "download x", None, None,
                   (Run(("mkdir", "-p", f"{root_dir}/models")),))
    assert owner_problem(profile, facts, [write]) == f"{root_dir} belongs to {SERVICE}, whom provision works there as: {said}"
    assert all(f"USER={SERVICE}" not in e or "COMMAND=/usr/bin/true" in e
               for e in sudo_log(sudo_logfile) if "prov-rootonly" in e)


def test_a_login_that_already_is_the_become_user_needs_no_sudo(server: SshdHost, sudo_logfile: Path,
                                                              shared_dir: Path) -> None:
    profile = build_profile({"comfyui": {"root": str(shared_dir / "ComfyUI")}}, name="t", file="/p/t.yaml")
    host = replace(host_for(server, "prov-nosudo"), become=True, become_user="prov-nosudo")
    with open_connection(host, server.options()) as conn:
        login = gather(conn, profile).login
        assert conn.become is None and login.become is None and login.become_error is None
