"""Real unprivileged login users with real sudo, for the become tests (tests run as root).

`become_users(server, log)` makes, idempotently (an interrupted run's leftovers are removed first),
and removes at the end:

  prov-nopw      logs in with the fleet's key; sudo to anyone without a password (NOPASSWD)
  prov-pw        logs in with the fleet's key; sudo with its password (PASSWORD)
  prov-nosudo    logs in with the fleet's key; has a password (PASSWORD) but no sudo at all
  prov-rootonly  logs in with the fleet's key; sudo to root alone without a password (not to prov-comfy)
  prov-comfy     the service user that owns ComfyUI roots; cannot log in

and one sudoers drop-in (checked with `visudo -c` before it is put in place) that logs every sudo
of these users to `log` (`Defaults logfile=`): what ran as whom.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sshd import SshdHost

PASSWORD = "correct-horse-battery-staple"
LOGINS = ("prov-nopw", "prov-pw", "prov-nosudo", "prov-rootonly")
SERVICE = "prov-comfy"
DROP_IN = Path("/etc/sudoers.d/provision-test-become")


def available() -> str | None:
    """Why these users cannot be made here, or None."""
    if os.geteuid() != 0:
        return "making login users and sudoers needs root (CI runs as root)"
    missing = [p for p in ("sudo", "useradd", "visudo", "chpasswd") if shutil.which(p) is None]
    return f"needs {', '.join(missing)} (apt-get install sudo)" if missing else None


def _remove() -> None:
    DROP_IN.unlink(missing_ok=True)
    for name in (*LOGINS, SERVICE):
        subprocess.run(["userdel", "-r", name], capture_output=True)


@contextmanager
def become_users(server: SshdHost, log: Path) -> Iterator[dict[str, str]]:
    """The users above (name -> home); the drop-in logs to `log`."""
    _remove()
    key = server.client_key.with_name(server.client_key.name + ".pub").read_text()
    homes: dict[str, str] = {}
    try:
        for name in LOGINS:
            # "*": no password, yet not locked (sshd refuses a locked account)
            subprocess.run(["useradd", "-m", "-s", "/bin/sh", "-p", "*", name], check=True, capture_output=True)
            home = Path(pwd.getpwnam(name).pw_dir)
            (home / ".ssh").mkdir(exist_ok=True)
            (home / ".ssh" / "authorized_keys").write_text(key)
            subprocess.run(["chown", "-R", f"{name}:{name}", str(home)], check=True)
            homes[name] = str(home)
        subprocess.run(["chpasswd"], input=f"prov-pw:{PASSWORD}\nprov-nosudo:{PASSWORD}\n", text=True, check=True)
        subprocess.run(["useradd", "-M", "-r", "-s", "/usr/sbin/nologin", SERVICE], check=True, capture_output=True)
        log.touch()
        # !secure_path: a command run through sudo finds what the login finds first on its PATH (the
        # test hosts' stand-in systemctl), as it finds the real one on a real host.
        text = (f"Defaults:prov-nopw,prov-pw,prov-rootonly logfile={log}, !syslog, log_host, !secure_path\n"
                "prov-nopw ALL=(ALL:ALL) NOPASSWD: ALL\n"
                "prov-pw ALL=(ALL:ALL) ALL\n"
                "prov-rootonly ALL=(root) NOPASSWD: ALL\n")
        staged = log.with_name("sudoers.staged")
        staged.write_text(text)
        subprocess.run(["visudo", "-c", "-q", "-f", str(staged)], check=True)
        staged.chmod(0o440)
        shutil.move(str(staged), DROP_IN)
        yield homes
    finally:
        _remove()


def sudo_log(log: Path) -> list[str]:
    """Each logged sudo, as one line: `USER : ... ; USER=TARGET ; COMMAND=...` (sudo wraps long
    entries over several indented lines)."""
    entries: list[str] = []
    for line in log.read_text().splitlines():
        if line.startswith((" ", "\t")) and entries:
            entries[-1] += " " + line.strip()
        elif line.strip():
            entries.append(line.strip())
    return entries


def ids(name: str) -> tuple[int, int]:
    """A user's uid and primary gid."""
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


@contextmanager
def shared_folder() -> Iterator[Path]:
    """A folder every test user can reach (pytest's own tmp_path is root's alone), removed after."""
    path = Path(tempfile.mkdtemp(prefix="provision-become-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)
