"""How a failed command is told: one line naming what ran and how it ended (its exit code, the signal
that killed it, or the timeout that stopped it) and the stderr line that says why; its last lines
beneath on the console; all of its stderr in the JSON-lines log."""

from __future__ import annotations

import io
import json
from pathlib import Path

from rich.console import Console

from provisioner.connection.base import Result
from provisioner.errors import TAIL_LINES, CommandError
from provisioner.plan.progress import Reporter

# What pip prints when a package's build fails: the reason is pages above its last line.
PIP_FAILURE = """Collecting broken-pkg==1.0
  Downloading broken-pkg-1.0.tar.gz (2.1 kB)
  Preparing metadata (setup.py): started
  error: subprocess-exited-with-error

  \u00d7 python setup.py egg_info did not run successfully.
  \u2502 exit code: 1
  \u2570\u2500> [3 lines of output]
      Traceback (most recent call last):
        File "<string>", line 2, in <module>
      ModuleNotFoundError: No module named 'torch'
      [end of output]

  note: This error originates from a subprocess, and is likely not a problem with pip.
error: metadata-generation-failed

\u00d7 Encountered error while generating package metadata.
\u2570\u2500> See above for output.

note: This is an issue with the package mentioned above, not pip.
hint: See above for details.
"""


def test_the_line_that_says_error_not_the_last_one() -> None:
    err = CommandError("gpu-01", Result(("pip", "install", "broken-pkg"), 1, "", PIP_FAILURE), "pip install broken-pkg")
    assert str(err) == "gpu-01: `pip install broken-pkg` exited 1: error: metadata-generation-failed"
    assert err.stderr == PIP_FAILURE
    assert len(err.tail) == TAIL_LINES and err.tail[-1] == "hint: See above for details."
    plain = CommandError("h", Result(("git", "clone"), 128, "", "Cloning into 'x'...\nfatal: repository 'x' not found\n"))
    assert str(plain) == "h: `git clone` exited 128: fatal: repository 'x' not found"
    last = CommandError("h", Result(("x",), 2, "", "one\ntwo\n"))
    assert str(last) == "h: `x` exited 2: two"


def test_signals_and_timeouts_are_named_not_numbered() -> None:
    killed = CommandError("h", Result(("pip", "install", "x"), 137, "", "Collecting x\n", signal="SIGKILL"))
    assert str(killed) == "h: `pip install x` killed by SIGKILL: Collecting x"
    stopped = CommandError("h", Result(("git", "clone", "u"), 124, "", "", stopped="timed out after 900s (its "
                                       "process group was stopped)"))
    assert str(stopped) == "h: `git clone u` timed out after 900s (its process group was stopped)"


def test_the_console_shows_the_tail_and_the_log_keeps_all_of_it(tmp_path: Path) -> None:
    out = io.StringIO()
    reporter = Reporter(Console(file=out, no_color=True, width=200), log_dir=tmp_path)
    err = CommandError("gpu-01", Result(("pip",), 1, "", PIP_FAILURE), "pip install broken-pkg")
    reporter.failure("gpu-01", f"packages: {err}", err, resource="packages")
    lines = out.getvalue().splitlines()
    assert lines[0] == "gpu-01 \u2717 packages: gpu-01: `pip install broken-pkg` exited 1: error: metadata-generation-failed"
    assert [line.split("\u2502 ", 1)[1] for line in lines[1:]] == list(err.tail)     # the last 10, indented
    (record,) = [json.loads(line) for line in (tmp_path / "gpu-01.jsonl").read_text().splitlines()]
    assert record["event"] == "failed" and record["resource"] == "packages"
    assert record["stderr"] == PIP_FAILURE                                           # every line of it
    assert "ModuleNotFoundError: No module named 'torch'" in record["stderr"]


def test_a_one_line_stderr_is_not_repeated_beneath(tmp_path: Path) -> None:
    out = io.StringIO()
    reporter = Reporter(Console(file=out, no_color=True, width=200))
    err = CommandError("h", Result(("x",), 1, "", "boom\n"))
    reporter.failure("h", str(err), err)
    assert out.getvalue() == "h \u2717 h: `x` exited 1: boom\n"
