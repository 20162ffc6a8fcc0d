"""One place reads a secret: stripped, refused with a control character inside, and redacted in every
form from every output (console, JSON-lines log, report files, the host's fetch errors)."""

from __future__ import annotations

import html
import io
import json
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from rich.console import Console

from provisioner import remote, secrets
from provisioner.errors import UsageError
from provisioner.plan.progress import Reporter

# Quotes, a backslash, a space, markup and a non-ASCII letter: every encoding changes it.
CANARY = 'hf_Canary"q\'b\\s p&<>é/+=%7'


def test_read_strips_surrounding_whitespace_and_registers() -> None:
    value = secrets.read("T", {"T": "  hf_secretvalue42\n"})
    assert value == "hf_secretvalue42"
    assert secrets.redact("x hf_secretvalue42 y") == "x *** y"
    assert secrets.read("T", {"T": " \n"}) is None
    assert secrets.read("T", {}) is None


@pytest.mark.parametrize("bad", ["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028", "\t"])
def test_a_control_character_inside_is_bad_input_naming_the_variable_not_the_value(bad: str) -> None:
    with pytest.raises(UsageError) as err:
        secrets.read("HF_TOKEN", {"HF_TOKEN": f"hf_left{bad}right"})
    message = str(err.value)
    assert err.value.exit_code == 3
    assert "$HF_TOKEN" in message and "control character" in message and "\n" not in message
    assert "left" not in message and "right" not in message


def test_forms_cover_every_representation() -> None:
    found = secrets.forms(CANARY)
    for form in (CANARY, repr(CANARY)[1:-1], repr(CANARY.encode())[2:-1], json.dumps(CANARY)[1:-1],
                 json.dumps(CANARY, ensure_ascii=False)[1:-1], urllib.parse.quote(CANARY, safe=""),
                 urllib.parse.quote_plus(CANARY), html.escape(CANARY), f"Bearer {CANARY}",
                 json.dumps(repr(CANARY)[1:-1])[1:-1], html.escape(json.dumps(CANARY)[1:-1])):
        assert form in found, form
    assert len(set(map(len, (CANARY, json.dumps(CANARY), urllib.parse.quote(CANARY))))) == 3
    # XML as ElementTree (junit.xml) and Jinja (report.html) escape it: saxutils' forms, held here
    # because provision writes them without importing saxutils.
    from xml.sax.saxutils import escape
    quoted = "t<o>k&e\"n'" + CANARY
    for entities in ({'"': "&quot;"}, {'"': "&#34;", "'": "&#39;"}):
        assert escape(quoted, entities) in secrets.forms(quoted)


def test_redactor_replaces_longest_forms_first() -> None:
    redact = secrets.Redactor([CANARY])
    text = " | ".join([CANARY, json.dumps(CANARY), repr(CANARY), urllib.parse.quote(CANARY, safe=""),
                       json.dumps({"msg": repr(CANARY.encode())})])
    out = redact(text)
    assert "Canary" not in out and out.count("***") == 5
    assert secrets.Redactor(["abc"])("abc") == "abc"          # too short to be a token


def test_the_reporter_redacts_console_and_log(tmp_path: Path) -> None:
    secrets.register(CANARY)
    console_text = io.StringIO()
    reporter = Reporter(Console(file=console_text, no_color=True, width=300), log_dir=tmp_path)
    reporter.line("h", f"failed: {CANARY!r}")
    reporter.log("h", "failed", error=f"server said {json.dumps(CANARY)} and {urllib.parse.quote(CANARY)}")
    for text in (console_text.getvalue(), (tmp_path / "h.jsonl").read_text()):
        assert "Canary" not in text and "***" in text


def test_the_cli_console_and_json_output_are_redacted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from provisioner import cli

    secrets.register(CANARY)
    missing = tmp_path / f"{urllib.parse.quote(CANARY, safe='')}.yaml"
    assert cli.main(["validate", str(missing)]) == 3
    out = capsys.readouterr()
    assert "Canary" not in out.out + out.err and "***" in out.out


def test_the_report_files_are_redacted(tmp_path: Path) -> None:
    from provisioner.errors import ApplyError
    from provisioner.report import build_report, from_exception, write_report

    secrets.register(CANARY)
    entry = from_exception("gpu-01", ApplyError(f"gpu-01: server answered {CANARY!r} / "
                                                f"{json.dumps(CANARY)} / {urllib.parse.quote(CANARY)}"))
    paths = write_report(tmp_path, build_report([entry], profile="p"))
    for path in (paths.json, paths.html, paths.junit):
        text = path.read_text()
        assert "Canary" not in text, path.name
        assert "***" in text, path.name


def test_the_host_downloader_never_sends_nor_quotes_a_token_with_a_control_character(tmp_path: Path) -> None:
    request = remote.fetch_request(url="http://127.0.0.1:9/x", dest=str(tmp_path / "x"), cache="",
                                   token="hf_hostsecret\n")
    proc = subprocess.run([sys.executable, "-c", remote.source("fetch")], input=request,
                          capture_output=True, timeout=60)
    assert proc.returncode == 1
    assert b"control character" in proc.stderr
    assert b"hostsecret" not in proc.stdout + proc.stderr
