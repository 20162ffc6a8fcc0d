"""The whole exception tree. Only `cli.py` turns these into messages and exit codes.

Every error a user can cause or meet (bad profile, unreachable host, missing wheel) is a
`ProvisionError` whose `str()` is one line that names the place and the fix; anything else that
escapes is a bug and is shown as one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


class ProvisionError(Exception):
    """Base of every expected error. `str(err)` is the one-line message shown to the user."""

    exit_code = 1


@dataclass(frozen=True)
class Problem:
    """One problem found in a config file, located as `file:line:col: key.path: message (hint)`."""

    file: str
    line: int
    col: int
    key: str
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}:{self.col}" if self.line else self.file
        key = f" {self.key}:" if self.key else ""
        hint = f" ({self.hint})" if self.hint else ""
        # One line, whatever a file or key name holds: control characters are shown escaped.
        return _CONTROL.sub(lambda m: repr(m.group())[1:-1], f"{where}:{key} {self.message}{hint}")


MAX_PROBLEMS = 50  # per file: past this it is not a profile with typos, and the first ones say enough


def stopped(file: str) -> Problem:
    """The last line of a list cut at MAX_PROBLEMS."""
    return Problem(file, 0, 0, "", f"stopped after {MAX_PROBLEMS} problems", "fix these, then check again")


class ConfigError(ProvisionError, ValueError):
    """A profile or inventory is malformed; carries every problem found, not only the first."""

    exit_code = 3

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class UsageError(ProvisionError, ValueError):
    """The command line itself is wrong (unknown host pattern, missing file argument)."""

    exit_code = 3


class ConnectError(ProvisionError, ConnectionError):
    """A host could not be reached or authenticated (down, refused, unknown or changed host key)."""


TAIL_LINES = 10     # of a failed command's stderr, shown under its one-line message
_SAYS_ERROR = re.compile(r"^\W*(error|fatal|e)\b", re.I)


class CommandError(ProvisionError):
    """A command on a host failed; carries its `Result` like Invoke's `Failure`.

    `str()` is one line: what ran, how it ended (`exited 1`, `killed by SIGKILL`, `timed out
    after 600s ...`) and the stderr line that says why: the last one that says error, else the
    last one (pip's last line is a "See above for details"). `stderr` is all of it, for the log;
    `tail` its last lines."""

    def __init__(self, host: str, result: object, what: str = "") -> None:
        self.host = host
        self.result = result
        rc = getattr(result, "exit_code", "?")
        signal = getattr(result, "signal", None)
        stopped = getattr(result, "stopped", None)
        self.stderr: str = getattr(result, "stderr", "") or ""
        lines = [line.rstrip() for line in self.stderr.splitlines() if line.strip()]
        self.tail = tuple(lines[-TAIL_LINES:])
        said = [line for line in lines if _SAYS_ERROR.match(line)]
        why = (said or lines or ["(no stderr)"])[-1].strip()
        label = what or " ".join(getattr(result, "argv", ()) or ())[:120]
        how = stopped or (f"killed by {signal}" if signal else f"exited {rc}")
        super().__init__(f"{host}: `{label}` {how}: {why}" if lines or not stopped else f"{host}: `{label}` {how}")


class Interrupted(ProvisionError):
    """The run was stopped (Ctrl-C, SIGTERM): a host that was running, or never started."""

    exit_code = 130


class FactsError(ProvisionError):
    """The facts script ran but its answer could not be read."""


class PlanError(ProvisionError):
    """The desired state cannot be reached on this host (no wheel for its torch, incompatible pair).

    Raised while planning, so it shows in `provision plan`, never halfway through an apply.
    """

    def __init__(self, message: str, alternatives: Sequence[str] = ()) -> None:
        self.alternatives = tuple(alternatives)
        if self.alternatives:
            message = f"{message}; available: {', '.join(self.alternatives)}"
        super().__init__(message)


class ApplyError(ProvisionError):
    """A change ran but the host did not end up as planned (checksum mismatch, lock held)."""


class LockedError(ApplyError):
    """Another apply holds this host's lock."""


class VerifyError(ProvisionError):
    """ComfyUI could not be reached or answered in a way the checks cannot read."""
