"""ComfyUI itself, over real sshd hosts: a bare GPU host (no ComfyUI, no venv) brought to a verified
ComfyUI in one apply (the stand-in ComfyUI repository at its tag, a venv with the profile's torch from
the stand-in torch wheelhouse, the unit written, enabled and run by the service manager standing in
for systemd), nothing changed by a second apply, the core moved as one change with one restart, a
ComfyUI listening on every address shown and fixed, one instance per GPU, a torch moved with the
backend wheel following it."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from lab import Lab, LabHost, mtimes, open_lab, tree_state
from sshd import listening, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-core")) as lab:
        yield lab


def managed(lab: Lab, *, gpu: str = "rtx3090", **comfyui: Any) -> LabHost:
    """A bare host whose ComfyUI provision makes: the stand-in ComfyUI at v0.3.64 (or `comfyui`'s
    version), torch 2.6.0 with cuda auto, unless `comfyui` says otherwise."""
    (host,) = lab.add_bare(1, gpu=gpu)
    pinned(lab, host, **comfyui)
    return host


def pinned(lab: Lab, host: LabHost, version: str = "v0.3.64", torch: str = "2.6.0", cuda: str = "auto",
           **comfyui: Any) -> None:
    lab.overlays[host.name] = {"comfyui": {**host.provision_vars()["comfyui"],
                                           **lab.world.core_overrides(version, torch, cuda), **comfyui}}
    lab.write()


def git(host: LabHost, *args: str) -> str:
    return subprocess.run(["git", "-C", str(host.comfy), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def starts(host: LabHost, unit: str = "comfyui") -> int:
    """How many times the service manager started the unit's process."""
    return host.journal(unit).count(f"Started {unit}.service - ")   # systemd names the Description


LOOPBACK_V4 = "0100007F"          # 127.0.0.1 as /proc/net/tcp writes it


def wait_listening(port: int, timeout: float = 30.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while not (found := listening(port)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def test_bare_host_to_verified_comfyui_in_one_apply_and_a_second_apply_changes_nothing(lab: Lab) -> None:
    host = managed(lab)
    code, out = lab.run("plan", "--limit", host.name)
    assert code == 2, out
    assert f"+ core clone ComfyUI v0.3.64 into {host.comfy}" in out
    assert (f"+ venv create {host.comfy}/venv with python3 3." in out
            and "torch 2.6.0+cu124; pip install -r requirements.txt of ComfyUI v0.3.64" in out)
    assert "comfyui.torch.cuda auto: the newest torch 2.6 build driver 550.120 runs (12.6 needs >= 560.28.03)" in out
    assert f"+ service install unit comfyui ({host.unit_dir}/comfyui.service)" in out
    assert "ComfyUI v0.3.64 is not on the host yet: the plugin and the model family are judged from its version" in out
    assert not host.comfy.exists() and not (host.unit_dir / "comfyui.service").exists()   # plan touches nothing

    code, out = lab.run("apply", "--limit", host.name)
    assert code == 2, out
    assert "1 changed, 0 unchanged, 0 failed" in out
    assert git(host, "describe", "--tags", "--exact-match") == "v0.3.64" and not git(host, "status", "--porcelain",
                                                                                       "--untracked-files=no")
    assert next(host.comfy.glob("venv/lib/python3*/site-packages/torch-2.6.0+cu124.dist-info"))
    assert (host.comfy / "venv" / "lib").exists() and "comfyui-frontend-package==1.27.10" in subprocess.run(
        [str(host.sandbox.python), "-m", "pip", "freeze"], capture_output=True, text=True).stdout
    unit = (host.unit_dir / "comfyui.service").read_text()
    assert unit.startswith("# Written by provision") and f"--listen 127.0.0.1 --port {host.port}" in unit
    assert "Environment=CUDA_VISIBLE_DEVICES=GPU-" in unit
    assert (host.unit_dir / "multi-user.target.wants" / "comfyui.service").is_symlink()
    assert host.systemctl("is-active", "comfyui").stdout.strip() == "active"
    assert [a.startswith(LOOPBACK_V4) for a in listening(host.port)] == [True]
    assert "handler: restarted ComfyUI (systemctl restart comfyui)" in out
    for check in ("comfyui_reachable", "device", "nodes_registered", "generation", "images_ok"):
        assert f"{host.name} PASS {check}" in out
    assert starts(host) == 1

    roots = (host.comfy, host.unit_dir)
    before = [tree_state(r) for r in roots], [mtimes(r) for r in roots]
    since = host.sshd.log_size()
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 0, out
    assert "0 changed, 1 unchanged, 0 failed" in out
    assert ([tree_state(r) for r in roots], [mtimes(r) for r in roots]) == before
    assert host.sshd.wait_counts(1, 1, since=since) == (1, 1)     # one connection, one exec
    assert starts(host) == 1                                       # not restarted


def test_moving_the_core_is_one_change_and_one_restart(lab: Lab) -> None:
    host = managed(lab, version="v0.3.60")
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    assert git(host, "describe", "--tags") == "v0.3.60" and starts(host) == 1
    pinned(lab, host, version="v0.3.64")

    code, out = lab.run("plan", "--limit", host.name)
    assert code == 2, out
    assert "1 to change (1 change)" in out
    assert ("~ core checkout ComfyUI v0.3.60 -> v0.3.64; pip install comfyui-frontend-package==1.27.10 "
            "(have 1.26.13)") in out
    assert "fetch tags" not in out            # the checkout has the tag: no network

    code, out = lab.run("apply", "--limit", host.name)
    assert code == 2, out
    assert git(host, "describe", "--tags") == "v0.3.64"
    assert starts(host) == 2                                       # one restart
    assert f"{host.name} PASS comfyui_reachable: ComfyUI 0.3.64 answers" in out
    assert lab.run("plan", "--limit", host.name)[0] == 0


def test_the_pair_is_checked_at_the_core_the_plan_leads_to(lab: Lab) -> None:
    """The plugin needs comfy/ldm/qwen_image, which the stand-in 0.3.48 does not have: refused in the
    plan, from the v0.3.48 tag's own files (the checkout holds the tag), before either moves."""
    host = managed(lab, version="v0.3.60")
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    pinned(lab, host, version="v0.3.48")
    head = git(host, "rev-parse", "HEAD")
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 1, out
    assert "ComfyUI-nunchaku v1.1.0 builds Qwen-Image on ComfyUI core's comfy/ldm/qwen_image, which this host's " \
           "ComfyUI 0.3.48 does not have" in out
    assert git(host, "rev-parse", "HEAD") == head and starts(host) == 1


def test_a_comfyui_listening_on_every_address_is_shown_and_fixed(lab: Lab) -> None:
    """The seed's host: ComfyUI run by a unit written by hand, `--listen 0.0.0.0`. Restarting that unit
    only, provision says what to fix; owning it (service: systemd), it rewrites and restarts it."""
    (host,) = lab.add(1)
    by_hand = host.under_systemd(listen="0.0.0.0")
    lab.overlays[host.name] = {"comfyui": by_hand}
    lab.write()
    assert wait_listening(host.port) == ["00000000"]               # 0.0.0.0
    code, out = lab.run("plan", "--limit", host.name)
    assert code == 2, out                                          # (the lab host lacks the plugin)
    assert (f"warning service: ComfyUI on port {host.port} listens on 0.0.0.0 (every address; pid ") in out
    assert (f"set --listen 127.0.0.1 in unit comfyui ({host.unit_dir}/comfyui.service), or set comfyui.service: "
            "systemd so that provision writes and restarts the unit") in out

    lab.overlays[host.name] = {"comfyui": {"root": str(host.comfy), "port": host.port, "restart": None,
                                           "service": "systemd", "unit_dir": str(host.unit_dir),
                                           "allow_root": True}}
    lab.write()
    code, out = lab.run("plan", "--limit", host.name, "-v")
    assert code == 2, out
    assert (f"~ service rewrite unit comfyui ({host.unit_dir}/comfyui.service); ComfyUI listens on 0.0.0.0 "
            "(every address; pid ") in out
    assert "the profile says 127.0.0.1" in out and f"+ExecStart={host.comfy}/venv/bin/python" in out
    assert "was not written by provision: it is replaced (a copy is kept at" in out
    code, out = lab.run("apply", "--limit", host.name)
    assert code == 2, out
    assert [a.startswith(LOOPBACK_V4) for a in listening(host.port)] == [True]
    assert f"{host.name} PASS generation" in out
    kept = list((host.comfy / ".provision" / "units").glob("comfyui.service.*"))
    assert len(kept) == 1 and "--listen 0.0.0.0" in kept[0].read_text()
    assert lab.run("plan", "--limit", host.name)[0] == 0


def test_one_instance_per_gpu_each_restarted_verified_and_reported(lab: Lab, tmp_path: Path) -> None:
    host = managed(lab, gpu="rtx3090,rtx4090", instances="per-gpu")
    code, out = lab.run("apply", "--limit", host.name, "--report", str(tmp_path / "report"))
    assert code == 2, out
    uuids = []
    for index, port in ((0, host.port), (1, host.port + 1)):
        unit = (host.unit_dir / f"comfyui-gpu{index}.service").read_text()
        uuid = re.search(r"CUDA_VISIBLE_DEVICES=(GPU-[0-9a-f-]+)", unit)[1]     # type: ignore[index]
        uuids.append(uuid)
        assert f"--port {port}" in unit and starts(host, f"comfyui-gpu{index}") == 1
        assert f"{host.name}/gpu{index} PASS device: ComfyUI runs on cuda:0 NVIDIA GeForce " in out
        assert uuid in out.split(f"{host.name}/gpu{index} PASS device:")[1].splitlines()[0]
    assert uuids[0] != uuids[1] and not (host.unit_dir / "comfyui.service").exists()
    assert "handler: restarted ComfyUI (systemctl restart comfyui-gpu0 comfyui-gpu1)" in out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert sorted(h["host"] for h in report["hosts"]) == [f"{host.name}/gpu0", f"{host.name}/gpu1"]
    assert all(h["status"] == "passed" for h in report["hosts"])
    assert lab.run("plan", "--limit", host.name)[0] == 0

    # Back to one instance: the per-gpu units provision wrote are stopped and removed.
    pinned(lab, host)
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    assert "- service stop and remove unit comfyui-gpu1.service (no such instance any more)" in out
    assert sorted(p.name for p in host.unit_dir.glob("*.service")) == ["comfyui.service"]
    assert lab.run("plan", "--limit", host.name)[0] == 0


def test_moving_torch_moves_the_backend_wheel_with_it(lab: Lab) -> None:
    """An RTX 5090 host (driver 570.133.07): cuda auto picks cu126 for torch 2.6, cu128 for 2.8."""
    host = managed(lab, gpu="rtx5090")
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    assert next(host.comfy.glob("venv/lib/python3*/site-packages/torch-2.6.0+cu126.dist-info"))
    pinned(lab, host, torch="2.8.0")
    code, out = lab.run("plan", "--limit", host.name)
    assert code == 2, out
    assert "~ venv torch 2.6.0+cu126 -> 2.8.0+cu128 (the backend wheel is chosen for it)" in out
    assert "comfyui.torch.cuda auto: the newest torch 2.8 build driver 570.133.07 runs (12.9 needs >= " in out
    assert "~ backend nunchaku 1.0.1+torch2.6 -> 1.0.1+torch2.8" in out
    assert "1 to change (2 changes)" in out                         # the rest of the venv stays
    code, out = lab.run("apply", "--limit", host.name)
    assert code == 2, out
    assert next(host.comfy.glob("venv/lib/python3*/site-packages/torch-2.8.0+cu128.dist-info"))
    assert next(host.comfy.glob("venv/lib/python3*/site-packages/nunchaku-1.0.1+torch2.8.dist-info"))
    assert f"{host.name} PASS nodes_registered" in out
    assert lab.run("plan", "--limit", host.name)[0] == 0


def test_a_first_start_that_fails_stops_and_disables_the_unit_it_installed(lab: Lab) -> None:
    """A bare host whose ComfyUI dies at its first start: the wait ends at once with the journal's
    exception, and the unit this apply installed is stopped and disabled (not left restarting)."""
    from provisioner.sandbox import comfyui_process

    host = managed(lab)
    comfyui_process.set_host_args(host.comfy, ("--die-at-start", "ModuleNotFoundError: No module named 'av'"))
    code, out = lab.run("apply", "--limit", host.name, "--no-verify", "--json")
    assert code == 1, out
    assert ": ModuleNotFoundError: No module named 'av' (systemctl show --property=SubState --value comfyui: " in out
    said = "stopped and disabled unit comfyui: its first start failed (fix the cause, then apply again)"
    assert said in out
    row = json.loads(out[out.index('{\n  "summary"'):out.index("\n}\n") + 2])["hosts"][0]
    assert said in row["detail"]
    assert host.systemctl("is-active", "comfyui").stdout.strip() in ("inactive", "failed")
    assert not (host.unit_dir / "multi-user.target.wants" / "comfyui.service").exists()
    started = starts(host)
    time.sleep(12)                                # Restart=on-failure would have started it again by now
    assert starts(host) == started


def test_an_apply_killed_inside_the_cores_checkout_is_finished_by_the_next(lab: Lab) -> None:
    """git writes the files before it moves HEAD: a kill in between leaves tracked files at the new
    version under the old HEAD. Without a record of the killed apply they are local modifications;
    with the owed restart it recorded naming the core's change, the next apply finishes the checkout,
    leaving the user's untracked files alone, and restarts ComfyUI once."""
    host = managed(lab, version="v0.3.60")
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    pinned(lab, host, version="v0.3.64")
    moved = [line.split("\t") for line in git(host, "diff", "--name-status", "v0.3.60", "v0.3.64").splitlines()]
    assert moved
    for status, path in moved[:max(1, len(moved) // 2)]:          # the files git wrote before the kill
        target = host.comfy / path
        if status == "D":
            target.unlink()
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(subprocess.run(["git", "-C", str(host.comfy), "show", f"v0.3.64:{path}"],
                                              check=True, capture_output=True).stdout)
    (host.comfy / "notes.txt").write_text("the user's own\n")
    assert git(host, "describe", "--tags") == "v0.3.60" and git(host, "status", "--porcelain")

    code, out = lab.run("plan", "--limit", host.name)
    assert code not in (0, 2) and "has local modifications" in out, out     # no record: refused as before

    owed = host.comfy / ".provision" / "owed"
    owed.mkdir(parents=True, exist_ok=True)
    (owed / "restart-comfyui").write_text(json.dumps({
        "handler": "restart-comfyui", "since": "2026-12-07T10:00:00Z", "by": "controller pid 1",
        "change": "core: checkout ComfyUI v0.3.60 -> v0.3.64; pip install comfyui-frontend-package==1.27.10"}) + "\n")
    code, out = lab.run("plan", "--limit", host.name)
    assert code == 2 and "finish the checkout an interrupted apply left half done" in out, out
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    assert git(host, "describe", "--tags", "--exact-match") == "v0.3.64"
    assert not git(host, "status", "--porcelain", "--untracked-files=no")     # clean: HEAD's files
    assert "?? notes.txt" in git(host, "status", "--porcelain").splitlines()
    assert (host.comfy / "notes.txt").read_text() == "the user's own\n"
    assert not (owed / "restart-comfyui").exists() and starts(host) == 2     # the owed restart, once
    assert lab.run("plan", "--limit", host.name)[0] == 0


def test_a_run_records_its_own_change_over_an_earlier_runs_owed_restart(lab: Lab) -> None:
    """An earlier interrupted run's owed restart names its change (the plugin's); an apply that
    then moves the core records the core's change in its place before it starts, so a kill inside
    that checkout is one the next apply finishes. Killed in the core's change, the next converges."""
    host = managed(lab, version="v0.3.60")
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    pinned(lab, host, version="v0.3.64")
    marker = host.comfy / ".provision" / "owed" / "restart-comfyui"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"handler": "restart-comfyui", "since": "2026-12-07T10:00:00Z",
                                  "change": "plugin: clone ComfyUI-nunchaku v1.1.0 into custom_nodes"}) + "\n")
    proc = lab.spawn("apply", "--limit", host.name, "--no-verify")
    try:
        wait_until(lambda: marker.exists() and '"core: checkout ComfyUI v0.3.60 -> v0.3.64' in marker.read_text(), 60)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    assert git(host, "describe", "--tags", "--exact-match") == "v0.3.64"
    assert not git(host, "status", "--porcelain", "--untracked-files=no")
    assert not marker.exists() and lab.run("plan", "--limit", host.name)[0] == 0
