"""Command line: parse arguments, call `commands`, map errors to messages and exit codes.

Exit codes (Terraform's detailed exit code, Ansible's vocabulary):
  0  ok, nothing changed or pending      2  changes pending (plan) or made (apply)
  1  a host failed or a check failed     3  bad input (profile, inventory, arguments)
130  stopped by Ctrl-C or SIGTERM (each host: done, interrupted or not started)
"""

from __future__ import annotations

import argparse
import gc
import io
import math
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import NoReturn, TextIO, cast

from provisioner import __version__

EXIT_OK, EXIT_FAILED, EXIT_CHANGED, EXIT_BAD_INPUT = 0, 1, 2, 3


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as bad input: one line, exit 3 (argparse's own
    exit 2 means "changes" here)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"error: {self.prog}: {message}{self._nearest(message)} (see `{self.prog} --help`)\n")

    def _options(self) -> list[str]:
        """Every option string of this parser and of its verbs' parsers."""
        found: list[str] = []
        for action in self._actions:
            found += [o for o in action.option_strings if o.startswith("--")]
            if isinstance(action, argparse._SubParsersAction):
                found += [o for sub in action.choices.values() for o in sub._options()]
        return sorted(set(found))

    def _nearest(self, message: str) -> str:
        """`; did you mean ...?` for a mistyped verb, choice or option (difflib: argparse's own
        suggest_on_error is Python 3.14's)."""
        import difflib
        import re

        if m := re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message):
            wrong, known = m[1], re.findall(r"'([^']*)'", m[2]) or m[2].split(", ")
        elif m := re.search(r"unrecognized arguments: (.*)", message):
            wrong = next((w.split("=", 1)[0] for w in m[1].split() if w.startswith("--")), "")
            known = self._options()
        else:
            return ""
        near = difflib.get_close_matches(wrong, known, n=1, cutoff=0.6) if wrong else []
        return f"; did you mean `{near[0]}`?" if near else ""


# Argument types: each refuses a value that cannot mean anything, with the reason.

def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: give at least 1")
    return value


# A snapshot id (`YYYYMMDD-HHMMSS-mmm`, remote/snapshot.py) or its start.
_SNAPSHOT_ID = re.compile(r"\d{1,8}|\d{8}-\d{0,6}|\d{8}-\d{6}-\d{0,3}")


def _snapshot_id(text: str) -> str:
    if not _SNAPSHOT_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a snapshot id (YYYYMMDD-HHMMSS-mmm, or its start, "
                                         "as `provision history` lists them)")
    return text


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _seconds(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} seconds: give a time above 0")
    return value


def _wait(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} seconds: give 0 (do not wait) or more")
    return value


def _percentage(text: str) -> float:
    value = _number(text.removesuffix("%"))
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text} is not a percentage from 0 to 100")
    return value


def _serial(text: str) -> int | str:
    from provisioner.plan.fleet import parse_serial  # only when given: --help stays light

    try:
        return parse_serial(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _changing(p: argparse.ArgumentParser) -> None:
    """The options of the verbs that change hosts (apply, rollback): batches, the lock, logs, verification."""
    p.add_argument("--serial", type=_serial, help="rolling batches: a host count or a percentage (30%%)")
    p.add_argument("--max-fail-percentage", type=_percentage, help="stop starting batches past this share of failed hosts")
    p.add_argument("--lock-timeout", type=_wait, default=300.0, help="seconds to wait for another apply's lock")
    p.add_argument("--log-dir", default=".provision/logs", help="per-host JSON-lines logs (default .provision/logs)")
    p.add_argument("--no-verify", action="store_true", help="skip the verification generations")
    p.add_argument("--report", metavar="DIR", help="write the verification report to DIR")
    _references(p)


def _references(p: argparse.ArgumentParser) -> None:
    p.add_argument("--references", metavar="DIR", help="a job slice: read the GPU classes' reference images "
                   "from DIR (shared by the slices), never write them, and keep this slice's hosts in --report DIR "
                   "for `provision report merge`")


def _common(parser: argparse.ArgumentParser, *, profile: str = "required") -> None:
    if profile == "required":
        parser.add_argument("profile", help="profile YAML (desired state), e.g. profiles/rtx3090.yaml")
    elif profile == "optional":
        parser.add_argument("profile", nargs="?", help="profile YAML (optional: ComfyUI paths)")
    parser.add_argument("-i", "--inventory", help="inventory: Ansible YAML or INI, `ansible-inventory --list` JSON, or an executable "
                        "inventory script (default: the profile's `inventory`)")
    parser.add_argument("-l", "--limit", help="restrict to hosts matching an Ansible pattern (gpu-*:!gpu-03)")
    parser.add_argument("-f", "--forks", type=_count, default=10, help="hosts handled in parallel (default 10)")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser.add_argument("--no-color", action="store_true", help="no colours (also: NO_COLOR=1)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="show steps; -vv: tracebacks")
    parser.add_argument("--list-hosts", action="store_true",
                        help="list the hosts this command would target (hosts, --limit) and stop; none is contacted")
    ssh = parser.add_argument_group("ssh")
    ssh.add_argument("--ssh-config", help="ssh_config file (default ~/.ssh/config)")
    ssh.add_argument("--known-hosts", action="append", help="known_hosts file (repeatable; default ~/.ssh/known_hosts)")
    ssh.add_argument("--accept-new-host-keys", action="store_true",
                     help="trust and record unknown host keys (like StrictHostKeyChecking=accept-new); "
                          "a changed key is always refused")
    ssh.add_argument("-K", "--ask-become-pass", action="store_true",
                     help="ask for the sudo password of hosts with ansible_become (a prompt; or the first line "
                          "of stdin when it is not a terminal); never in argv, never in logs")
    ssh.add_argument("--connect-timeout", type=_seconds, default=10.0, help="seconds (default 10)")
    ssh.add_argument("--heartbeat", type=_seconds, default=5.0, metavar="SECONDS",
                     help="seconds between heartbeats to each host; a host that answers none of 3 is taken "
                          "as gone, and a host's commands stop when 3 of ours do not arrive (default 5)")


LOCK_HELP = ("the lock to converge to (default: PROFILE.lock.yaml beside the profile, when there is one; "
             "written by `provision lock`)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="provision",
        description="Converge GPU hosts to ComfyUI + Nunchaku INT4/FP4 Qwen-Image, then prove it.")
    parser.add_argument("--version", action="version", version=f"provision {__version__}")
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    refresh = ("ask the Hub again which commit each unpinned model repo's main is now (recorded on the "
               "control machine at first use, so an upstream re-upload changes nothing until asked)")
    p = verbs.add_parser("plan", help="show what would change on each host; touches nothing")
    _common(p)
    p.add_argument("--refresh-hub", action="store_true", help=refresh)
    p.add_argument("--out", metavar="PLAN", help="save the plan, with each host's facts, for `provision apply PLAN`")

    p.add_argument("--lock", metavar="FILE", help=LOCK_HELP)

    p = verbs.add_parser("lock", help="resolve every name upstream can move and write PROFILE.lock.yaml")
    _common(p)
    p.add_argument("--update", nargs="*", metavar="KEY", help="move the lock to what upstream serves now: all "
                   "of it, or only the parts named (core, plugin, models, torch, backend, packages); shows the diff")
    p.add_argument("--lock", metavar="FILE", help="the lock to write (default: beside the profile)")

    p = verbs.add_parser("apply", help="change only what differs, then verify (or: apply a plan saved by plan --out)")
    _common(p)
    p.add_argument("--lock", metavar="FILE", help=LOCK_HELP)
    p.add_argument("--check", action="store_true", help="behave as plan: change nothing")
    p.add_argument("--refresh-hub", action="store_true", help=refresh)
    _changing(p)
    p.add_argument("--verify-gate", action="store_true",
                   help="verify each host right after its change; roll back a host that fails to the snapshot "
                        "taken before it, and stop the rollout after its batch (also: rollout.verify_gate)")
    p.add_argument("--canary", type=_count, metavar="N",
                   help="the first batch: N hosts, before the --serial batches (also: rollout.canary)")

    p = verbs.add_parser("rollback", help="restore the snapshot taken before the last apply (or --to ID)")
    _common(p)
    p.add_argument("--to", metavar="ID", type=_snapshot_id, help="the snapshot to restore: an id `provision history` lists, or "
                   "its start (default: the one taken before the last apply on each host)")
    p.add_argument("--check", action="store_true", help="show what the rollback would change; change nothing")
    _changing(p)

    p = verbs.add_parser("history", help="each host's snapshots and what changed between them")
    _common(p)

    p = verbs.add_parser("verify", help="run verification generations and write the fleet report")
    _common(p)
    p.add_argument("--report", metavar="DIR", help="write report.json, report.html, junit.xml to DIR; "
                   "DIR/references/ keeps each GPU class's reference images")
    p.add_argument("--compare", metavar="OLD_REPORT", help="compare with this report.json (default: the one in "
                   "--report DIR): regressions, and what changed in each host's fingerprint")
    p.add_argument("--promote-reference", metavar="HOST", help="make HOST's images of this run the references "
                   "of its GPU class (needs --report DIR; HOST must pass every other check)")
    _references(p)

    p = verbs.add_parser("report", help="fleet reports: merge the reports of job slices into one")
    kinds = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    m = kinds.add_parser("merge", help="judge the hosts of several slices' --report folders as one fleet")
    m.add_argument("dirs", nargs="+", metavar="DIR", help="the --report folder of each slice (run with --references)")
    m.add_argument("--out", required=True, metavar="DIR", help="write the fleet's report.json, report.html, "
                   "junit.xml here (compared with the report already there)")
    m.add_argument("--references", metavar="DIR", help="the references the slices read, which the merge "
                   "completes (default: DIR/references under --out)")
    m.add_argument("--no-color", action="store_true", help="no colours (also: NO_COLOR=1)")

    p = verbs.add_parser("facts", help="what each host is: GPU, VRAM, torch, python, disk, installed state")
    _common(p, profile="optional")

    p = verbs.add_parser("validate", help="check profiles and inventories; no host contacted")
    p.add_argument("files", nargs="+", help="profile or inventory YAML files")
    p.add_argument("--json", action="store_true", help="the problems as JSON on stdout (file, line, col, key, message)")
    p.add_argument("--no-color", action="store_true")

    p = verbs.add_parser("catalog", help="what the catalog knows of upstream (core, plugin and backend releases, "
                         "the GPU rule, model files), each fact with its source and the day it was checked")
    p.add_argument("topic", nargs="?", choices=("core", "break", "plugin", "backend", "gpu", "model"),
                   help="only these facts")
    p.add_argument("--json", action="store_true", help="the facts as JSON on stdout")
    p.add_argument("--no-color", action="store_true")

    p = verbs.add_parser("schema", help="print the JSON Schema of profiles, inventories or lock files")
    p.add_argument("kind", nargs="?", default="profile", choices=("profile", "inventory", "lock"))
    p.add_argument("--markdown", action="store_true", help="the reference table of docs/ instead")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except BrokenPipeError:  # `provision --help | head`
        return _reader_left()
    from rich.console import Console
    from rich.markup import escape

    from provisioner import commands
    from provisioner.errors import ProvisionError

    no_color = bool(getattr(args, "no_color", False) or os.environ.get("NO_COLOR"))
    # Human output goes to stderr when --json owns stdout. No emoji codes: `a:b:!c` is a host
    # pattern, not `a🅱!c`.
    stream = (lambda: sys.stderr) if getattr(args, "json", False) else (lambda: sys.stdout)
    console = Console(file=cast(TextIO, _Redacting(stream)), no_color=no_color, highlight=False, emoji=False,
                      soft_wrap=True)
    try:
        with _terminate_as_interrupt():
            verb = commands.list_hosts if getattr(args, "list_hosts", False) else getattr(commands, args.verb)
            code = verb(args, console)
        sys.stdout.flush()  # a reader that left early is met here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _reader_left()
    except ProvisionError as err:
        for line in str(err).splitlines():
            console.print(f"[red]error:[/] {escape(line)}", highlight=False)  # `[/x]` is data
        return err.exit_code
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: hosts keep what finished; run the same command again to converge")
        return commands.EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - a bug: say so plainly, keep the traceback for -vv
        if getattr(args, "verbose", 0) >= 2:
            traceback.print_exc()
        console.print(f"[red]internal error:[/] {type(err).__name__}: {escape(str(err))} (a bug in "
                      "provision; run with -vv for the traceback)", highlight=False)
        return EXIT_FAILED


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM stops a run as Ctrl-C does (plan/fleet.py), not by killing it mid-step."""
    if threading.current_thread() is not threading.main_thread():
        yield                           # only the main thread may set a handler
        return
    from provisioner.plan.fleet import Terminated

    def terminated(_signal: int, _frame: object) -> None:
        raise Terminated()

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)
class _Redacting(io.TextIOBase):
    """The console's stream, through `secrets.redact`: no line shown (a plan error quoting a
    server's answer, a host's stderr) can carry a token. Soft wrap keeps a token on one line."""

    def __init__(self, stream: Callable[[], TextIO]) -> None:
        self._stream = stream           # looked up at each write: tests redirect sys.stdout

    def write(self, text: str) -> int:
        from provisioner import secrets

        self._stream().write(secrets.redact(text))
        return len(text)

    def flush(self) -> None:
        self._stream().flush()

    def isatty(self) -> bool:
        return self._stream().isatty()

    def fileno(self) -> int:
        return self._stream().fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._stream(), "encoding", None) or "utf-8"


def _reader_left() -> int:
    """stdout's reader closed the pipe (`provision schema profile | head`): it had all it wanted,
    which is no failure. stdout goes to /dev/null so the interpreter's last flush cannot fail."""
    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # not a real file (tests capture stdout in memory)
        pass
    return EXIT_OK


def run() -> NoReturn:
    """The `provision` command (and `python -m provisioner`): main(), then exit."""
    code = main()
    # Nothing left is garbage: the interpreter's teardown then skips a last collection over every
    # object of ~1000 modules (about 40 ms of a no-op run). Objects are still released and finalised.
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
