"""After a restart, apply waits until ComfyUI is ready, over real sshd hosts whose ComfyUI runs as a
systemd unit (the seed's own setup; `systemctl` and `journalctl` are the service-manager stand-in
here, held against real systemd by the real-hosts tier, which runs these cases under it too). Like the real commands, the restart returns before ComfyUI listens: verification passes once
ComfyUI is ready, and a ComfyUI that never comes back, or dies while starting, fails its host with
the last lines of its log."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import Lab, LabHost, open_lab

pytestmark = pytest.mark.slow

NO_DRIVER = ("RuntimeError: Found no NVIDIA driver on your system. Please check that you have an NVIDIA "
             "GPU and installed a driver from http://www.nvidia.com/Download/index.aspx")


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-ready")) as lab:
        yield lab


def systemd_host(lab: Lab, *comfyui_args: str, probe: Path | None = None, **comfyui: object) -> LabHost:
    """A lab host whose ComfyUI runs as unit `comfyui`; `probe` records whether anything listened
    on its port right after `systemctl restart` returned."""
    (host,) = lab.add(1)
    host.comfyui_args(*comfyui_args)
    then = "" if probe is None else (
        f"{sys.executable} -c 'import socket; s = socket.socket(); "
        f"print(\"open\" if s.connect_ex((\"127.0.0.1\", {host.port})) == 0 else \"closed\")' > {probe}")
    lab.overlays[host.name] = {"comfyui": {**host.under_systemd(then=then), **comfyui}}
    lab.write()
    return host


def test_restart_returns_before_comfyui_listens_and_verification_passes_once_it_is_ready(lab: Lab) -> None:
    probe = lab.root / "port-at-restart"
    host = systemd_host(lab, "--startup-s", "6", probe=probe)
    code, out = lab.run("apply", "--limit", host.name)
    assert code == 2, out
    assert probe.read_text() == "closed\n"                    # the restart returned before it listened
    assert f"{host.name} waiting for ComfyUI at 127.0.0.1:{host.port} (up to 300 s)" in out
    assert f"{host.name} waiting for ComfyUI … " in out        # it said, while it waited, that it waits
    assert "handler: restarted ComfyUI (systemctl restart comfyui)" in out
    for check in ("comfyui_reachable", "nodes_registered", "generation", "images_ok"):
        assert f"{host.name} PASS {check}" in out
    assert "1 host: 1 changed, 0 unchanged, 0 failed" in out


def test_comfyui_that_never_comes_back_fails_its_host_with_its_log(lab: Lab) -> None:
    host = systemd_host(lab, "--hang-at-start", ready_timeout_s=3)
    code, out = lab.run("apply", "--limit", host.name, "--json")
    assert code == 1, out
    assert f"ComfyUI at 127.0.0.1:{host.port} did not answer within 3 s (last: connection refused)" in out
    assert "raise comfyui.ready_timeout_s" in out
    assert "journalctl -u comfyui -n 40 --no-pager:" in out
    assert "Nunchaku version: 1.0.1+torch2.6" in out           # its log, up to where it hangs
    assert "not verified: the apply failed" in out
    row = json.loads(out[out.index('{\n  "summary"'):out.index("\n}\n") + 2])["hosts"][0]
    assert row["status"] == "failed" and "did not answer within 3 s" in row["detail"]
    assert any("ComfyUI-nunchaku Initialization" in line for line in row["log"])


def test_comfyui_that_dies_while_starting_is_reported_with_its_log_not_as_refused(lab: Lab) -> None:
    host = systemd_host(lab, "--die-at-start", NO_DRIVER, ready_timeout_s=600)
    code, out = lab.run("apply", "--limit", host.name)
    assert code == 1, out
    assert "ComfyUI died during start-up after" in out
    assert f": {NO_DRIVER} (systemctl is-active comfyui: failed)" in out    # the journal's exception line
    assert "did not answer within" not in out                 # not waited out, not "connection refused"
    assert NO_DRIVER in out                                    # the journal's last lines say why
    assert "Traceback (most recent call last):" in out


@pytest.mark.parametrize("log_file", [True, False])
def test_a_restart_commands_comfyui_that_crashes_is_not_waited_out_and_its_exception_is_the_reason(
        lab: Lab, tmp_path: Path, log_file: bool) -> None:
    """No service manager (`comfyui.restart.command`): ComfyUI dies 3 s after the restart; the wait
    ends there, not after ready_timeout_s, and the log's exception line is the reason in the console,
    the JSON rows, report.json, report.html and junit.xml."""
    import time
    from provisioner.sandbox import comfyui_process

    (host,) = lab.add(1)
    host.comfyui_args("--startup-s", "3", "--die-at-start", "ModuleNotFoundError: No module named 'av'")
    log = {"log_file": str(host.comfy / comfyui_process.LOGFILE)} if log_file else {}
    lab.overlays[host.name] = {"comfyui": {**host.provision_vars()["comfyui"], "ready_timeout_s": 300, **log}}
    lab.write()
    report = tmp_path / "report"
    began = time.monotonic()
    code, out = lab.run("apply", "--limit", host.name, "--json", "--report", str(report))
    assert code == 1, out
    assert time.monotonic() - began < 120
    assert "did not answer within" not in out and "raise comfyui.ready_timeout_s" not in out
    assert "ComfyUI died during start-up after " in out
    if not log_file:            # nothing says where its log is: its process is what is known
        assert "(its process" in out and ") exited)" in out
        return
    assert ": ModuleNotFoundError: No module named 'av' (" in out
    row = json.loads(out[out.index('{\n  "summary"'):out.index("\n}\n") + 2])["hosts"][0]
    assert row["status"] == "failed" and "No module named 'av'" in row["detail"]
    doc = json.loads((report / "report.json").read_text())
    assert "No module named 'av'" in json.dumps(doc["hosts"])
    assert "No module named &#39;av&#39;" in (report / "report.html").read_text() or \
        "No module named 'av'" in (report / "report.html").read_text()
    assert "No module named &apos;av&apos;" in (report / "junit.xml").read_text() or \
        "No module named 'av'" in (report / "junit.xml").read_text()
