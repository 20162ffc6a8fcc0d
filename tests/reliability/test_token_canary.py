"""A token canary in every form: an HF token that holds quotes, a backslash, a space and markup (so
that its repr, JSON, URL and HTML forms all differ from it), read with the trailing newline
`$(cat token)` leaves, used by a real plan, apply and verify against a gated Hub stand-in. The
host's ComfyUI is unkind: it logs the same token, in each form, in the error its plugin raises
at import (read back by verification through /internal/logs) and in the error it dies with at
start (read back by the restart's diagnosis from its journal). None of those forms may appear in
the console (plain and --json), the JSON-lines logs, report.json, report.html, junit.xml, the
sshd log (commands run on the host) or any file provision wrote on the host.
"""

from __future__ import annotations

import html
import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from bounded import Tally
from lab import Lab, LabHost, open_lab

pytestmark = pytest.mark.reliability

CORE = "CANARYq7Zt3"                          # letters and digits survive every encoding
CANARY = f'hf_{CORE}"q\'b\\s p&<>/+=%7x'
FORMS = {"raw": CANARY, "repr": repr(CANARY)[1:-1], "bytes repr": repr(CANARY.encode())[2:-1],
         "JSON": json.dumps(CANARY)[1:-1], "URL": urllib.parse.quote(CANARY, safe=""),
         "URL form": urllib.parse.quote_plus(CANARY), "HTML": html.escape(CANARY)}
SPREAD = " | ".join(f"{k}={v}" for k, v in FORMS.items())      # what the unkind ComfyUI logs


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-canary"), hub_token=CANARY) as lab:
        yield lab


def leaks(text: str) -> list[str]:
    """The forms of the canary in `text` (its letters and digits alone count: a form not listed)."""
    found = [name for name, form in FORMS.items() if form in text]
    return found or (["letters and digits"] if CORE in text else [])


def host_files(host: LabHost) -> dict[str, str]:
    """Every file on the host but the stand-ins' own (ComfyUI's log, which the unkind ComfyUI wrote
    the token into itself, and the systemd stand-in's journal of it)."""
    out = {}
    for path in host.sandbox.root.rglob("*"):
        rel = path.relative_to(host.sandbox.root)
        if not path.is_file() or ".provision-sandbox" in rel.parts or rel.parts[0] == "systemd" \
                or path.stat().st_size > 5_000_000:
            continue
        out[str(path.relative_to(host.sandbox.root))] = path.read_bytes().decode("utf-8", "replace")
    return out


def test_the_token_canary_never_leaves_in_any_form(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_TOKEN", CANARY + "\n")
    imports, dies = lab.add(2)
    imports.comfyui_args("--no-nunchaku", "--backend-error", f"RuntimeError: the Hub refused HF_TOKEN {SPREAD}")
    lab.overlays[dies.name] = {"comfyui": dies.under_systemd()}
    dies.comfyui_args("--die-at-start", f"RuntimeError: bad token {SPREAD}")
    lab.write()
    report, logs = tmp_path / "report", tmp_path / "logs"

    outputs: dict[str, str] = {}
    for n, argv in enumerate([("plan",), ("plan", "--json"),
                              ("apply", "--report", str(report), "-v"), ("apply", "--json", "--report", str(report)),
                              ("verify", "--report", str(report)), ("verify", "--json", "--report", str(report))]):
        # Each its own process, as a user runs them: nothing known to redact but what it read.
        proc = lab.spawn(*argv, log_dir=logs if argv[0] == "apply" else None)
        out, _ = proc.communicate(timeout=300)
        outputs[f"console of {' '.join(argv[:2])} ({n})"] = out
        assert proc.returncode in (0, 1, 2), out
    apply_out = next(v for k, v in outputs.items() if k.startswith("console of apply --report"))
    # Each unkind path did carry the error that quoted the token this far, redacted:
    assert "handler restart-comfyui failed" in apply_out and "bad token raw=***" in apply_out, apply_out
    assert "the Hub refused HF_TOKEN raw=***" in (report / "report.json").read_text()
    assert any(r.headers.get("Authorization") == f"Bearer {CANARY}" for r in lab.world.hub.requests)

    texts = dict(outputs)
    texts |= {f"log {p.name}": p.read_text() for p in logs.iterdir()}
    texts |= {f"report {p.name}": p.read_text() for p in report.iterdir() if p.is_file()}
    for host in (imports, dies):
        texts[f"sshd log of {host.name}"] = host.sshd.log_text()
        texts |= {f"{host.name}:{k}": v for k, v in host_files(host).items()}
    tally = Tally("token canary", bounded=False)
    for where, text in sorted(texts.items()):
        found = leaks(text)
        tally.add(not found, f"{where}: {', '.join(found)}")
    tally.extra["forms"] = len(FORMS)
    with capsys.disabled():
        print(f"\n{tally.line()} (outputs checked: console, --json, JSON-lines logs, report.json, report.html, "
              "junit.xml, sshd logs, host files)")
    assert not tally.failures, "\n".join(tally.failures)
    assert {"report report.json", "report report.html", "report junit.xml"} <= set(texts)
