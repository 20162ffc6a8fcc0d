"""`become`, as Ansible's inventories say it: run a command as another user through `sudo`.

The login user's supervisor starts `sudo -u USER /bin/sh -c LAUNCH` in relay mode, so a second
supervisor runs as USER and runs the command (the docker transport's shape): it owns the command's
process group, so its timeout and the controller's heartbeat stop the command even where the login
user could not signal it (a root process). The password, when sudo wants one, is the first line
of sudo's stdin (`-S`, with `-k` so a cached credential never leaves it to the supervisor), never
an argument; without one, `sudo -n` fails at once rather than waiting for a prompt.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from contextlib import AbstractContextManager

from provisioner import remote
from provisioner.connection import supervised
from provisioner.connection.base import LAUNCH, Connection, Frame, Heartbeat, Held, Pipe, Result, Stats
from provisioner.connection.supervised import GRACE_S
from provisioner.errors import ConnectError

METHODS = ("sudo",)


def sudo_argv(user: str, password: bool, argv: Sequence[str]) -> tuple[str, ...]:
    """`sudo` running argv as `user`: reading the password from stdin, or never prompting."""
    flags = ("-S", "-k", "-p", "") if password else ("-n",)
    return ("sudo", *flags, "-u", user, "--", *argv)


class BecomeConnection(supervised.Relayed):
    """Runs argv as `user` on the host `inner` reaches, through sudo (see the module's text)."""

    become: Connection | None = None
    owner: Connection | None = None
    # Who runs sudo here, as the facts read the login before they were read as `user` (set by
    # facts/gather.py on the connection it runs the root's work through; its type is the facts').
    login: object = None

    def __init__(self, inner: Connection, user: str, password: str | None) -> None:
        self.name = inner.name
        self.inner = inner
        self.user = user
        self._password = password
        self.stats = Stats(connects=inner.stats.connects)
        self._checked: str | None = None
        self._lock = threading.Lock()

    @property
    def machine(self) -> Connection:
        return self

    @property
    def heartbeat(self) -> Heartbeat:
        return self.inner.heartbeat

    def check(self) -> None:
        """Can the login user become `user`? Raises a one-line ConnectError saying why not (no
        sudo, not in sudoers, a password needed or wrong); asked once per connection."""
        with self._lock:
            if self._checked == "yes":
                return
            if self._checked is None:
                stdin = (self._password + "\n").encode() if self._password is not None else None
                result = self.inner.run(sudo_argv(self.user, self._password is not None, ("true",)),
                                        stdin=stdin, timeout=30, check=False)
                self._checked = "yes" if result.ok else why_not(self.name, self.user, result,
                                                                 self._password is not None)
            if self._checked != "yes":
                raise ConnectError(self._checked)

    def to(self, user: str) -> BecomeConnection:
        """The same login becoming `user` instead, with the same password (never seen outside)."""
        return BecomeConnection(self.inner, user, self._password)

    def launch(self, argv: Sequence[str]) -> tuple[Pipe, tuple[Frame, ...]]:
        """The supervisor running as `user`, through the login user's in relay mode."""
        self.check()
        self.stats.execs += 1
        self.stats.history.append(tuple(argv))
        exec_argv = sudo_argv(self.user, self._password is not None, ("/bin/sh", "-c", LAUNCH))
        pipe, outer = self.inner.launch(exec_argv)
        relay = Frame()
        try:
            pipe.send(remote.supervise_request(exec_argv, nonce=relay.nonce, mode="relay",
                                               dead_after=self.heartbeat.dead_after, grace=GRACE_S))
            if self._password is not None:
                pipe.send((self._password + "\n").encode())     # sudo -S reads it first
        except OSError:
            pass                        # the inner connection is gone: driving the pipe says why
        return pipe, (relay, *outer)

    def tunnel(self, remote_port: int, remote_host: str = "127.0.0.1") -> AbstractContextManager[int]:
        return self.inner.tunnel(remote_port, remote_host)

    def hold(self, argv: Sequence[str]) -> AbstractContextManager[Held]:
        return supervised.hold(self, argv)

    def lost(self) -> str | None:
        return self.inner.lost()

    def abort(self, reason: str) -> None:
        self.inner.abort(reason)

    def close(self) -> None:
        pass                            # the inner connection is its owner's to close


def why_not(host: str, user: str, result: Result, password: bool) -> str:
    """sudo's refusal in one line, with the fix."""
    said = [x.strip() for x in result.stderr.splitlines() if x.strip()]
    last = said[-1] if said else f"exit {result.exit_code}"
    if result.exit_code == 127 or "not found" in last:
        fix = "install sudo on the host"
    elif "password is required" in last or "a terminal is required" in last:
        fix = ("give the become password (-K/--ask-become-pass, or provision_become_password_env), or "
               f"let the login run commands as {user} in the host's sudoers")
    elif "incorrect password" in last or "Sorry, try again" in " ".join(said):
        fix = "the become password is wrong"
    elif "not in the sudoers" in last or "not allowed" in last:
        fix = f"allow it in the host's sudoers to run commands as {user}"
    else:
        fix = "check the host's sudo set-up"
    return f"{host}: cannot become {user} with sudo{' (password given)' if password else ''}: {last}; {fix}"
