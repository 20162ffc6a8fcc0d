"""The fleet verification report: report.json, report.html and junit.xml in one directory."""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from provisioner import secrets
from provisioner.config import bounded
from provisioner.errors import ProvisionError

if TYPE_CHECKING:
    from provisioner.report.adapt import from_exception, from_verification, versions_from
    from provisioner.report.compare import read_previous, read_previous_file, with_comparison
    from provisioner.report.files import write_atomic
    from provisioner.report.html import render_html
    from provisioner.report.json_report import dumps, report_to_json
    from provisioner.report.junit import render_junit
    from provisioner.report.model import (
        REPORT_VERSION,
        Flag,
        FleetReport,
        HostEntry,
        HostReport,
        Summary,
        build_report,
    )

# The names this package offers, each loaded from its module on first use (PEP 562): `provision
# verify --report DIR` reads the file names below before it reaches a host, and the rest (the
# verification's checks, Pillow, XML) loads while the hosts are verified.
_FROM = {name: module for module, names in (
    ("adapt", ("from_exception", "from_verification", "versions_from")),
    ("compare", ("read_previous", "read_previous_file", "with_comparison")),
    ("files", ("write_atomic",)),
    ("html", ("render_html",)),
    ("json_report", ("dumps", "report_to_json")),
    ("junit", ("render_junit",)),
    ("model", ("REPORT_VERSION", "Flag", "FleetReport", "HostEntry", "HostReport", "Summary", "build_report")),
) for name in names}


def __getattr__(name: str) -> Any:
    module = _FROM.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


JSON_NAME, PREVIOUS_NAME, HTML_NAME, JUNIT_NAME = "report.json", "report.previous.json", "report.html", "junit.xml"


@dataclass(frozen=True)
class ReportPaths:
    directory: Path
    json: Path
    html: Path
    junit: Path
    previous: Path | None              # report.previous.json, when there was a report before
    report: FleetReport                # as written: with its comparison flags

    @property
    def regressions(self) -> tuple[Flag, ...]:
        return self.report.regressions

    @property
    def improvements(self) -> tuple[Flag, ...]:
        return self.report.improvements


def write_report(directory: str | os.PathLike[str], report: FleetReport, *, compared: bool = False) -> ReportPaths:
    """Write report.json, report.html, junit.xml into `directory` (created), compared with the
    report.json already there (unless `compared`: the report was compared with another already),
    which is kept as report.previous.json."""
    from provisioner.report.compare import read_previous, with_comparison
    from provisioner.report.files import write_atomic
    from provisioner.report.html import render_html
    from provisioner.report.json_report import dumps
    from provisioner.report.junit import render_junit

    where = Path(directory)
    try:
        where.mkdir(parents=True, exist_ok=True)
        current = where / JSON_NAME
        before = bounded.read_regular(current, bounded.REPORT_CAP) if os.path.lexists(current) else None
        if not compared:
            previous, note = read_previous(before) if before is not None else (None, None)
            report = with_comparison(report, previous, note)
        # No secret read in this run reaches a report (an error quoting a server's answer).
        documents = [(where / JSON_NAME, secrets.redact(dumps(report)).encode()),
                     (where / HTML_NAME, secrets.redact(render_html(report)).encode()),
                     (where / JUNIT_NAME, secrets.redact(render_junit(report).decode()).encode())]
        if before is not None:
            write_atomic(where / PREVIOUS_NAME, before)
        for path, data in documents:
            write_atomic(path, data)
    except ValueError as err:           # the report.json there: a FIFO, a device, too big
        raise ProvisionError(f"cannot read {where / JSON_NAME}: {err} (move it away)") from None
    except OSError as err:
        raise ProvisionError(f"cannot write the report to {where}: {err.strerror or err} "
                             "(choose a writable --report directory)") from None
    return ReportPaths(where, where / JSON_NAME, where / HTML_NAME, where / JUNIT_NAME,
                       where / PREVIOUS_NAME if before is not None else None, report)


__all__ = [
    "REPORT_VERSION", "Flag", "FleetReport", "HostEntry", "HostReport", "ReportPaths", "Summary",
    "build_report", "dumps", "from_exception", "from_verification", "read_previous", "read_previous_file",
    "render_html", "render_junit", "report_to_json", "versions_from", "with_comparison",
    "write_report",
]
