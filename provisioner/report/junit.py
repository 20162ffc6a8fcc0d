"""junit.xml: one testsuite per host, one testcase per check, for CI test-result viewers."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import asdict

from provisioner.report.model import FleetReport, HostReport
from provisioner.verify.checks import RUNG_OF

# XML 1.0 cannot carry most control characters, even escaped (an ANSI colour code in an error
# string would make the whole file unparseable): they become U+FFFD.
_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _clean(text: object) -> str:
    return _NOT_XML.sub("\ufffd", str(text))


def _element(parent: ET.Element, tag: str, text: str | None = None, **attrs: object) -> ET.Element:
    element = ET.SubElement(parent, tag, {k: _clean(v) for k, v in attrs.items() if v is not None})
    if text:
        element.text = _clean(text)
    return element


def _properties(suite: ET.Element, host: HostReport) -> None:
    props = ET.SubElement(suite, "properties")
    _element(props, "property", name="status", value=host.status)
    _element(props, "property", name="ladder.failed_rung", value=host.ladder.failed or "none")
    facts = asdict(host.facts) if host.facts else {}
    for group, values in (("facts", facts), ("versions", host.versions),
                          ("figures", asdict(host.figures))):
        for key, value in values.items():
            if value is not None:
                _element(props, "property", name=f"{group}.{key}", value=value)


def _suite(root: ET.Element, host: HostReport, report: FleetReport) -> tuple[int, int, int, float]:
    seconds = round(sum(r.seconds_wall for r in host.runs), 3)
    suite = _element(root, "testsuite", name=host.host, timestamp=report.generated_at.rstrip("Z"),
                     hostname=host.host, time=f"{seconds:.3f}")
    _properties(suite, host)
    classname = f"provision.verify.{host.host}"
    failures = errors = skipped = 0
    rollout = host.rollout or {}
    if host.status == "left":
        skipped += 1
        case = _element(suite, "testcase", classname=classname, name="rollout", time="0")
        _element(case, "skipped", message=host.error or host.failures[0])
    elif rollout.get("result") == "rolled_back":
        failures += 1
        case = _element(suite, "testcase", classname=classname, name="rollout", time="0")
        lines = [f"{c['name']}: {c['detail']}" for c in rollout.get("failed_checks") or ()]
        _element(case, "failure", "\n".join(lines), message=str(rollout.get("reason") or "rolled back"),
                 type="rolled_back")
    if host.status != "left" and (host.status == "unreachable" or host.error):
        errors += 1
        name = "reachable" if host.status == "unreachable" else "provision"
        case = _element(suite, "testcase", classname=classname, name=name, time="0")
        message = host.error or host.failures[0]
        _element(case, "error", message, message=message, type=host.status)
    for check in host.checks:
        # The rung in the class name: a CI viewer groups the checks by the ladder's rungs.
        case = _element(suite, "testcase", classname=f"{classname}.{RUNG_OF.get(check.name, 'verification')}",
                        name=check.name, time="0")
        if not check.passed:
            failures += 1
            _element(case, "failure", "\n".join((check.detail, *check.lines)), message=check.detail,
                     type="check")
        else:
            _element(case, "system-out", "\n".join((f"warning: {check.detail}" if check.warning else check.detail,
                                                      *check.lines)))
    if not len(suite.findall("testcase")):
        # a failed host with neither checks nor error still gets a visible, failing case
        errors += 1
        case = _element(suite, "testcase", classname=classname, name="verification", time="0")
        _element(case, "error", host.failures[0], message=host.failures[0], type=host.status)
    lines = [f.line for f in report.fleet_for(host.host)] + [f.line for f in report.flags_for(host.host)]
    if lines:
        _element(suite, "system-out", "\n".join(lines))
    tests = len(suite.findall("testcase"))
    suite.set("tests", str(tests))
    suite.set("failures", str(failures))
    suite.set("errors", str(errors))
    suite.set("skipped", str(skipped))
    return tests, failures, errors, seconds


def render_junit(report: FleetReport) -> bytes:
    """The junit.xml document, UTF-8 with an XML declaration."""
    root = ET.Element("testsuites", {"name": _clean(f"provision verify {report.profile or ''}".strip())})
    totals = [_suite(root, host, report) for host in report.hosts]
    root.set("tests", str(sum(t[0] for t in totals)))
    root.set("failures", str(sum(t[1] for t in totals)))
    root.set("errors", str(sum(t[2] for t in totals)))
    root.set("time", f"{sum(t[3] for t in totals):.3f}")
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
