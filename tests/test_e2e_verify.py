"""`provision verify` and `apply`'s verification over real sshd hosts running the ComfyUI stand-in:
each kind of broken host fails with its own reason, and the report is written and renders."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import Lab, LabHost, open_lab

from provisioner.sandbox import comfyui_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, dict[str, LabHost]]]:
    with open_lab(tmp_path_factory.mktemp("lab-verify")) as lab:
        healthy, no_backend, down = lab.add(3)
        (black,) = lab.add(1, comfyui_args=("--image-mode", "black"))
        (slow,) = lab.add(1)
        lab.overlays[slow.name] = {"verify": {"thresholds": {"warm_seconds": 0.05}}}
        lab.write()
        code, out = lab.run("apply", "--no-verify")
        assert code == 2, out
        # The plugin without its backend: uninstall it and restart, as a broken upgrade would leave it.
        subprocess.run([str(no_backend.sandbox.python), "-m", "pip", "uninstall", "-q", "-y", "nunchaku"],
                       check=True)
        comfyui_process.restart(no_backend.comfy, wait=True)
        comfyui_process.stop(down.comfy)
        yield lab, {"healthy": healthy, "no_backend": no_backend, "down": down, "black": black, "slow": slow}


def failures(report: dict, host: LabHost) -> list[str]:
    (entry,) = [h for h in report["hosts"] if h["host"] == host.name]
    return [c["name"] for c in entry["checks"] if not c["passed"]] if entry["status"] != "unreachable" else ["?"]


def test_each_host_passes_or_fails_for_its_own_reason(fleet, tmp_path: Path) -> None:
    lab, hosts = fleet
    code, out = lab.run("verify", "--report", str(tmp_path))
    assert code == 1, out
    report = json.loads((tmp_path / "report.json").read_text())
    status = {h["host"]: h["status"] for h in report["hosts"]}
    assert status[hosts["healthy"].name] == "passed"
    assert {status[hosts[k].name] for k in ("no_backend", "down", "black", "slow")} == {"failed"}
    assert failures(report, hosts["healthy"]) == []
    assert "nodes_registered" in failures(report, hosts["no_backend"])
    assert "comfyui_reachable" in failures(report, hosts["down"])
    assert "images_ok" in failures(report, hosts["black"])
    assert failures(report, hosts["slow"]) == ["warm_time"]
    assert f"{hosts['healthy'].name} PASS vram_peak" in out
    assert f"{hosts['no_backend'].name} FAIL nodes_registered" in out
    junit = (tmp_path / "junit.xml").read_text()
    assert junit.count("<testsuite ") == 5 and "<failure" in junit


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (make test installs it)")
def test_report_renders_in_chromium(fleet, tmp_path: Path) -> None:
    lab, hosts = fleet
    lab.run("verify", "--report", str(tmp_path))
    html = tmp_path / "report.html"
    dom = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          html.as_uri()], capture_output=True, text=True, timeout=120).stdout
    for host in hosts.values():
        assert host.name in dom
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1280,1600", html.as_uri()], capture_output=True, timeout=120)
    assert shot.stat().st_size > 20_000


def test_apply_runs_verification_and_fails_on_a_broken_host(fleet) -> None:
    lab, hosts = fleet
    code, out = lab.run("apply", "--limit", f"{hosts['healthy'].name}:{hosts['black'].name}")
    assert code == 1, out
    assert "0 changed, 2 unchanged, 0 failed" in out
    assert f"{hosts['black'].name} FAIL images_ok" in out
    code, out = lab.run("apply", "--limit", hosts["healthy"].name)
    assert code == 0, out


def test_verify_json_is_the_report_document(fleet) -> None:
    lab, hosts = fleet
    code, out = lab.run("verify", "--limit", hosts["healthy"].name, "--json")
    assert code == 0, out
    doc = json.loads(out[out.index("{"):])
    assert [h["host"] for h in doc["hosts"]] == [hosts["healthy"].name]
    assert doc["hosts"][0]["status"] == "passed"


def test_facts_that_cannot_be_gathered_fail_the_host_as_before(fleet, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Verify gathers the facts while it reaches ComfyUI; when gathering fails, the host fails with
    that error (not a verification built on nothing), and the other hosts are verified."""
    import sys

    from provisioner.errors import FactsError

    gather_module = sys.modules["provisioner.facts.gather"]    # the package exports the function
    lab, hosts = fleet
    real = gather_module.gather
    broken = hosts["healthy"].name

    def gather(conn, profile, probe):  # type: ignore[no-untyped-def]
        if conn.name == broken:
            raise FactsError(f"{broken}: the facts script answered no JSON (exit 1): boom")
        return real(conn, profile, probe)

    monkeypatch.setattr(gather_module, "gather", gather)
    code, out = lab.run("verify", "--report", str(tmp_path), "--limit", f"{broken},{hosts['slow'].name}")
    assert code == 1, out
    assert "answered no JSON (exit 1): boom" in out
    report = json.loads((tmp_path / "report.json").read_text())
    status = {h["host"]: h["status"] for h in report["hosts"]}
    assert status[hosts["slow"].name] == "failed" and status[broken] != "passed"


def test_a_broken_pack_is_a_warning_row_and_an_exposed_comfyui_a_failure_unless_allowed(fleet, tmp_path: Path) -> None:
    """ComfyUI logs `(IMPORT FAILED)` for a pack it could not import and goes on: verify names it in
    a warning row (console, report.json, report.html, junit.xml); ComfyUI on 0.0.0.0 while the profile
    says loopback fails `listen_address`, unless verify.allow_exposed."""
    lab, hosts = fleet
    (host,) = lab.add(1)
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    broken = host.comfy / "custom_nodes" / "ComfyUI-Broken"
    broken.mkdir()
    (broken / "__init__.py").write_text("NODE_CLASS_MAPPINGS = {\n")
    host.comfyui_args("--listen", "0.0.0.0")
    comfyui_process.restart(host.comfy, wait=True)
    try:
        code, out = lab.run("verify", "--limit", host.name, "--report", str(tmp_path))
        assert code == 1, out
        assert (f"{host.name} WARN custom_nodes_imported: 1 custom node failed to import, ComfyUI runs without it: "
                f"{broken}") in out
        assert f"{broken}: '{{' was never closed (__init__.py, line 1)" in out
        assert f"{host.name} FAIL listen_address: ComfyUI listens on 0.0.0.0 (every address" in out
        assert "set verify.allow_exposed: true if that is meant" in out
        (entry,) = json.loads((tmp_path / "report.json").read_text())["hosts"]
        rows = {c["name"]: c for c in entry["checks"]}
        assert rows["custom_nodes_imported"]["passed"] and rows["custom_nodes_imported"]["warning"]
        assert not rows["listen_address"]["passed"] and entry["status"] == "failed"
        assert "warning: 1 custom node failed to import" in (tmp_path / "junit.xml").read_text()
        assert ">WARN</td>" in (tmp_path / "report.html").read_text()

        lab.overlays[host.name] = {"verify": {"allow_exposed": True}}
        lab.write()
        code, out = lab.run("verify", "--limit", host.name)
        assert code == 0, out
        assert f"{host.name} WARN listen_address: ComfyUI listens on 0.0.0.0 (every address" in out
    finally:
        lab.overlays.pop(host.name, None)
        lab.write()
