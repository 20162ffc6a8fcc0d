"""sshd runs every command through the user's login shell. Users whose login shell is sh, bash,
dash, zsh, fish, tcsh or csh, whose rc files print to stdout and stderr, get exactly the same
commands, output, facts and locks: the one login line reads the same in every shell, and whatever
an rc file prints lies outside the supervisor's frame.

The server starts its sftp subsystem as stock Debian's does (`/usr/lib/openssh/sftp-server`, through
the login shell, whose rc file then prints into the SFTP stream): files still arrive whole.

The test users are made with useradd, which needs root (CI runs as root); otherwise these tests
are skipped, saying so.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.config.inventory import Host
from provisioner.config.model import ComfySpec, Profile
from provisioner.connection import open_connection
from provisioner.facts.gather import gather
from sshd import SshdFleet, SshdHost

PRINT_ARGV = "import sys, json; print(json.dumps(sys.argv[1:]))"
# What each shell reads for a non-interactive `-c` as well, and how it prints on both streams.
RC_FILES = {
    "zsh": (".zshenv", 'echo "hello from .zshenv"; echo "warning from .zshenv" >&2\n'),
    "fish": (".config/fish/config.fish", 'echo "hello from config.fish"; echo "warning from config.fish" >&2\n'),
    "tcsh": (".tcshrc", 'echo "hello from .tcshrc"\necho "warning from .tcshrc" > /dev/stderr\n'),
    "csh": (".cshrc", 'echo "hello from .cshrc"\necho "warning from .cshrc" > /dev/stderr\n'),
}
SHELLS = ["sh", "bash", "dash", "zsh", "fish", "tcsh", "csh"]
HOSTILE = ["it's", 'say "hi"', "!!", "!$", "a!b", "back\\slash", "\\'", "line1\nline2", "$HOME", "`id`",
           "$(id)", "%s %d", "{a,b}", "*", "~", "#not a comment", "a;b|c&d", "tab\there", "ünï©ode", "", "-n"]


def shell_path(shell: str) -> str | None:
    return shutil.which(shell)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SshdHost]:
    if not os.path.exists("/usr/sbin/sshd"):
        pytest.skip("needs OpenSSH server (apt-get install openssh-server)")
    fleet = SshdFleet(tmp_path_factory.mktemp("sshd-shells"))
    sftp = "/usr/lib/openssh/sftp-server"
    (host,) = fleet.add(1, sftp=sftp if os.path.exists(sftp) else "internal-sftp")
    yield host
    fleet.stop_all()


@pytest.fixture(scope="module")
def users(server: SshdHost) -> Iterator[dict[str, str]]:
    """shell → the name of a user whose login shell it is (made here, removed at the end)."""
    if os.geteuid() != 0:
        pytest.skip("making test users with other login shells needs root (useradd); CI runs as root")
    made: dict[str, str] = {}
    key = server.client_key.with_name(server.client_key.name + ".pub").read_text()
    try:
        for shell in SHELLS:
            path = shell_path(shell)
            if path is None:
                continue
            name = f"provision-{shell}"
            subprocess.run(["userdel", "-r", name], capture_output=True)   # left by an interrupted run
            # "*": no password, yet not locked (sshd refuses a locked account)
            subprocess.run(["useradd", "-m", "-s", path, "-p", "*", name], check=True, capture_output=True)
            made[shell] = name
            entry = pwd.getpwnam(name)
            home = Path(entry.pw_dir)
            files = {".ssh/authorized_keys": key}
            if shell in RC_FILES:
                rc, text = RC_FILES[shell]
                files[rc] = text
            for rel, text in files.items():
                path_in_home = home / rel
                path_in_home.parent.mkdir(parents=True, exist_ok=True)
                path_in_home.write_text(text)
            subprocess.run(["chown", "-R", f"{name}:{name}", str(home)], check=True)
        yield made
    finally:
        for name in made.values():
            subprocess.run(["userdel", "-r", name], capture_output=True)


def connect_as(server: SshdHost, user: str):
    return open_connection(Host(name=f"{user}-host", address="127.0.0.1", port=server.port, user=user,
                                key_file=str(server.client_key)), server.options())


@pytest.mark.parametrize("shell", SHELLS)
def test_commands_run_the_same_under_every_login_shell(server: SshdHost, users: dict[str, str],
                                                       shell: str) -> None:
    if shell not in users:
        pytest.skip(f"{shell} is not installed (.ci/system-deps installs zsh, fish and tcsh)")
    with connect_as(server, users[shell]) as conn:
        login = conn.run(["sh", "-c", 'getent passwd "$(id -un)" | cut -d: -f7']).stdout.strip()
        assert os.path.basename(os.path.realpath(login)) == os.path.basename(os.path.realpath(shell_path(shell)))
        r = conn.run(["python3", "-c", PRINT_ARGV, *HOSTILE])
        assert json.loads(r.stdout) == HOSTILE                      # and nothing the rc file printed
        r = conn.run(["sh", "-c", 'printf %s "$X"; cat; echo oops >&2; exit 7'], env={"X": "a'b!c\\d\ne"},
                     stdin=b"in\x00put!", check=False)
        assert (r.exit_code, r.stdout, r.stderr) == (7, "a'b!c\\d\nein\x00put!", "oops\n")
        home = pwd.getpwnam(users[shell]).pw_dir
        with conn.hold(["flock", "-n", f"{home}/lock", "sh", "-c", "echo locked; cat >/dev/null"]) as lines:
            assert next(lines) == "locked"
        content = bytes(range(256)) * 300
        execs = conn.stats.execs
        conn.put(content, f"{home}/put/a file", mode=0o600)
        # A quiet shell leaves SFTP alone; a talkative one garbles it, and the file goes through stdin.
        chatty = shell in RC_FILES and "internal-sftp" not in server.config.read_text()
        assert (conn.stats.execs > execs) == chatty
        assert Path(home, "put", "a file").read_bytes() == content
        assert Path(home, "put", "a file").stat().st_mode & 0o777 == 0o600
        assert os.listdir(f"{home}/put") == ["a file"]


@pytest.mark.parametrize("shell", SHELLS)
def test_facts_parse_whatever_the_rc_files_print(server: SshdHost, users: dict[str, str], shell: str) -> None:
    if shell not in users:
        pytest.skip(f"{shell} is not installed (.ci/system-deps installs zsh, fish and tcsh)")
    home = pwd.getpwnam(users[shell]).pw_dir
    with socket.socket() as s:                      # a port nothing listens on: ComfyUI is down
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    root = f"{home}/ComfyUI"
    profile = Profile(name="t", file="t.yaml", inventory=None, hosts="all",
                      comfyui=ComfySpec(root=root, venv=f"{root}/venv", port=port))
    with connect_as(server, users[shell]) as conn:
        facts = gather(conn, profile)
        assert conn.stats.execs == 1
    assert facts.system_python and not facts.files[root].exists and facts.disk_free > 0
