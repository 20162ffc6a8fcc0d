"""report.html: one self-contained page (inline CSS, data-URI thumbnails, no script, no fetch).

Pictures are most of its weight (about 570 KB a host: three thumbnails and three comparison panels
per prompt), so the page carries them for the hosts that need a look (failed, rolled back, flagged,
or a comparison failed: the first PICTURED_MAX of them, failures first) and for one passing host per
GPU class, to show what right looks like; every other host keeps its figures and words. A
1,000-host page is then a few MB, not half a GB (docs/scale.md).
"""

from __future__ import annotations

import base64
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from provisioner.report.model import FleetReport, HostReport

if TYPE_CHECKING:
    from jinja2 import Template

TEMPLATES = Path(__file__).with_name("templates")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PICTURED_MAX = 25       # hosts that need a look whose pictures the page carries


def _seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} s"


def _gib(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} GiB"


def _mib(value: int | None) -> str:
    return "–" if value is None else f"{value / 1024:.2f} GiB"


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}".rstrip("0").rstrip(".")


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@lru_cache(maxsize=1)
def _template() -> Template:
    # Autoescape everywhere: host names, prompts, error strings and details come from hosts and
    # profiles, and the page must stay inert whatever they contain. jinja2 is imported here, not with
    # the package: `provision verify` reads a report folder's report.json before it reaches its hosts.
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True,
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(seconds=_seconds, gib=_gib, mib=_mib, number=_number)
    return env.get_template("report.html.j2")


def prepare() -> None:
    """Compile the page's template now (0.04 s), in a thread while the hosts are verified."""
    _template()


def _thumbnails(host: HostReport) -> list[dict[str, str]]:
    # Only real PNGs become data URIs: anything else would render as a broken image icon.
    return [{"label": label, "src": _data_uri(png)} for label, png in host.thumbnails
            if png.startswith(_PNG_MAGIC)]


def _src(png: bytes) -> str | None:
    return _data_uri(png) if png.startswith(_PNG_MAGIC) else None


def _comparisons(host: HostReport, pictured: bool) -> list[dict[str, object]]:
    """Reference, the host's image, their difference (None: not pictured): failed comparisons first."""
    return [{"agreement": a, "panels": [_src(p) for p in a.panels] if pictured else None}
            for a in sorted(host.agreement, key=lambda a: a.passed)]


def pictured(report: FleetReport) -> set[str]:
    """The hosts whose pictures the page carries (the module's docstring says which and why)."""
    flagged = {f.host for f in (*report.flags, *report.fleet)}
    needing = [h.host for h in report.hosts if h.status != "passed" or h.host in flagged
               or any(not a.passed for a in h.agreement)]
    exemplars: dict[str | None, str] = {}
    for h in report.hosts:
        if h.status == "passed" and (h.thumbnails or h.agreement):
            exemplars.setdefault(h.fingerprint.gpu_class if h.fingerprint else None, h.host)
    return set(needing[:PICTURED_MAX]) | set(exemplars.values())


def render_html(report: FleetReport) -> str:
    """The report.html page: fleet summary, flags, groups, then each host, failures first."""
    groups = {g.gpu_class: g.values for g in report.groups}
    shown = pictured(report)
    hosts = [{"id": f"host-{i}", "report": h, "flags": report.flags_for(h.host), "fleet": report.fleet_for(h.host),
              "group": groups.get(h.fingerprint.gpu_class, {}) if h.fingerprint else {},
              "drifted": {f.field for f in report.fleet_for(h.host) if f.field},
              "fingerprint": h.fingerprint.flat() if h.fingerprint else {}, "pictured": h.host in shown,
              "comparisons": _comparisons(h, h.host in shown),
              "thumbnails": _thumbnails(h) if h.host in shown else []} for i, h in enumerate(report.hosts, 1)]
    left_out = sum(1 for h in report.hosts if h.host not in shown and (h.thumbnails or h.agreement))
    return _template().render(report=report, summary=report.summary, hosts=hosts, pictures_left_out=left_out,
                              pictured_max=PICTURED_MAX)
