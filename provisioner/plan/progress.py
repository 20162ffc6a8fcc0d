"""What a person sees while an apply runs, and the per-host JSON-lines log of what ran.

Thread-safe: hosts report from their own threads. Every string that leaves this module goes
through `redact` (every form of every secret read, `provisioner.secrets`), so a secret (an HF
token) can reach neither the console nor a log file.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                           TransferSpeedColumn)

from provisioner import secrets

class Reporter:
    """Console lines (one per change as it happens), progress bars, and JSON-lines logs."""

    def __init__(self, console: Console, *, log_dir: Path | None = None, verbose: bool = False,
                 redact: secrets.Redactor | None = None) -> None:
        self.console = console
        self.verbose = verbose
        self.redactor = redact or secrets.Redactor()
        self.log_dir = log_dir
        self._lock = threading.Lock()
        self._progress: Progress | None = None
        self._progress_users = 0

    def redact(self, text: str) -> str:
        """`text` without the secrets this reporter was given or this process has read."""
        return secrets.redact(self.redactor(text))

    def line(self, host: str, message: str, style: str = "") -> None:
        text = escape(self.redact(message))
        with self._lock:
            self.console.print(f"[bold]{escape(host)}[/] [{style}]{text}[/]" if style
                               else f"[bold]{escape(host)}[/] {text}", highlight=False)

    def failure(self, host: str, message: str, error: BaseException, **fields: Any) -> None:
        """A step that failed: one red line, the last lines of a command's stderr dimmed beneath it,
        and in the log all of its stderr (pip's reason is pages above its last line)."""
        self.line(host, f"✗ {message}", "red")
        tail: tuple[str, ...] = getattr(error, "tail", ())
        if len(tail) > 1 or (tail and tail[0].strip() not in message):
            for line in tail:
                self.line(host, f"  │ {line}", "dim")
        self.log(host, "failed", error=str(error), stderr=getattr(error, "stderr", None), **fields)

    def log(self, host: str, event: str, **fields: Any) -> None:
        """Append one JSON record to `<log_dir>/<host>.jsonl`, rotated past LOG_BYTES (below)."""
        if self.log_dir is None:
            return
        record = {"t": round(time.time(), 3), "host": host, "event": event, **fields}
        text = self.redact(json.dumps(record, default=str))
        with self._lock:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            path = self.log_dir / f"{_safe(host)}.jsonl"
            if path.exists() and path.stat().st_size >= LOG_BYTES:
                rotate(path)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(text + "\n")

    @contextmanager
    def transfer(self, host: str, label: str, total: int | None) -> Iterator[Any]:
        """A progress bar for a download or push; yields `update(done, total)`. Only on a terminal:
        in a log or a pipe the per-change lines say enough."""
        if not self.console.is_terminal:
            yield lambda done, total_now=None: None
            return
        with self._lock:
            if self._progress is None:
                self._progress = Progress(
                    TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=self.console,
                    transient=True)
                self._progress.start()
            self._progress_users += 1
            task = self._progress.add_task(escape(f"{host} {label}"), total=total)
        progress = self._progress

        def update(done: int, total_now: int | None = None) -> None:
            progress.update(task, completed=done, total=total_now or total)

        try:
            yield update
        finally:
            with self._lock:
                progress.remove_task(task)
                self._progress_users -= 1
                if self._progress_users == 0:
                    progress.stop()
                    self._progress = None


LOG_BYTES = 8 << 20        # a host's log is rotated once it holds this much ...
LOG_KEEP = 4               # ... into HOST.jsonl.1 (newest) to HOST.jsonl.4: at most 40 MiB per host


def rotate(path: Path, keep: int = LOG_KEEP) -> None:
    """HOST.jsonl -> HOST.jsonl.1 -> ... -> HOST.jsonl.KEEP; the oldest beyond that is removed."""
    path.with_name(f"{path.name}.{keep}").unlink(missing_ok=True)
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.replace(path.with_name(f"{path.name}.{n + 1}"))
    path.replace(path.with_name(f"{path.name}.1"))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "host"
