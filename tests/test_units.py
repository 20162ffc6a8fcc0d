"""ComfyUI's instances and their systemd units (resources/units.py), the service resource planning
them from facts (pure), and the unit files read back by the service manager standing in for systemd
(tests/service_manager.py, a parser of its own): what provision writes is what systemd would run."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from typing import Any

import pytest
import service_manager

from provisioner.config.model import Profile, build_profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Gpu, Listener, Probe, PythonEnv, UnitFile, Units, UnitState
from provisioner.resources import service, units
from provisioner.resources.base import Put, Run

ROOT = "/opt/ComfyUI"
DIR = "/etc/systemd/system"
GPUS = (Gpu(1, "NVIDIA GeForce RTX 4090", 24564, 24000, 564, (8, 9), "550.120", "GPU-bbbb"),
        Gpu(0, "NVIDIA GeForce RTX 3090", 24576, 24000, 576, (8, 6), "550.120", "GPU-aaaa"))


def profile(**comfyui: Any) -> Profile:
    return build_profile({"comfyui": {"root": ROOT, "service": "systemd", **comfyui}}, name="t", file="/p/t.yaml")


def facts(*, files: tuple[UnitFile, ...] = (), state: dict[str, UnitState] | None = None,
          listeners: dict[int, tuple[Listener, ...]] | None = None, gpus: tuple[Gpu, ...] = GPUS[1:],
          error: str | None = None, writable: bool = True) -> Facts:
    found = {(DIR, "comfyui.service"): tuple(f for f in files if "-gpu" not in f.name),
             (DIR, "comfyui-gpu*.service"): tuple(f for f in files if "-gpu" in f.name)}
    return Facts(host="h", os="Debian 12", arch="x86_64", kernel="6.1", system_python="3.11.2",
                 env=PythonEnv(f"{ROOT}/venv/bin/python", True), gpus=gpus, gpu_error=None if gpus else "no GPU",
                 nvcc=None, disk_path="/opt", disk_free=10**12, comfyui_version="0.3.64",
                 listeners=listeners or {}, units=Units(found, {DIR: writable}, state or {}, error))


RUNNING = UnitState("loaded", "active", "running", 4242, "enabled", f"{DIR}/comfyui.service")


def converged(p: Profile, **kw: Any) -> Facts:
    """A host where the profile's one unit is written as rendered, enabled, running, on loopback."""
    f = facts(**kw)
    (instance,) = units.instances(p, f)
    text = units.render(p, instance)
    return replace(f, units=replace(f.units, files={**f.units.files, (DIR, "comfyui.service"): (
        UnitFile("comfyui.service", f"{DIR}/comfyui.service", text),)}, state={"comfyui.service": RUNNING}),
        listeners=kw.get("listeners") or {8188: (Listener("127.0.0.1", 4242, ("python", "main.py")),)})


def test_the_unit_runs_the_venvs_python_on_main_py_listening_as_the_profile_says() -> None:
    p = profile(listen="127.0.0.1", port=8190, args=["--lowvram", "--preview-method", "auto"])
    (instance,) = units.instances(p, facts())
    assert (instance.unit, instance.port, instance.gpu) == ("comfyui", 8190, GPUS[1])
    text = units.render(p, instance)
    assert text.startswith("# Written by provision for ComfyUI at /opt/ComfyUI")
    assert (f"ExecStart={ROOT}/venv/bin/python {ROOT}/main.py --listen 127.0.0.1 --port 8190 --lowvram "
            "--preview-method auto\n") in text
    assert "Environment=CUDA_VISIBLE_DEVICES=GPU-aaaa\n" in text and f"WorkingDirectory={ROOT}\n" in text
    assert "Restart=on-failure\n" in text and "WantedBy=multi-user.target\n" in text
    assert "CUDA_VISIBLE_DEVICES" not in units.render(p, replace(instance, gpu=None))    # a host with no GPU read


HOSTILE = ["--extra-model-paths-config", "/srv/my models/extra.yaml", "$HOME", "${PATH}", "100%", "%n", 'say "hi"',
           "back\\slash", "it's", ";", "a\tb", "$$", "-"]


def test_what_provision_writes_systemd_splits_back_into_the_same_argv() -> None:
    """Quoting against the stand-in's own reading of systemd's rules: spaces, quotes, backslashes,
    `$` (variables) and `%` (specifiers) reach ComfyUI as written in the profile."""
    p = build_profile({"comfyui": {"root": "/srv/Comfy UI 100%", "venv": "/srv/v$env/venv", "service": "systemd",
                                   "args": HOSTILE}}, name="t", file="/p/t.yaml")
    (instance,) = units.instances(p, facts())
    parsed = service_manager.parse(units.render(p, instance))
    assert parsed["argv"] == list(units.argv(p, instance))
    assert parsed["argv"][-len(HOSTILE):] == HOSTILE
    assert parsed["cwd"] == "/srv/Comfy UI 100%"
    assert parsed["env"]["CUDA_VISIBLE_DEVICES"] == "GPU-aaaa" and parsed["env"]["PYTHONUNBUFFERED"] == "1"


def test_one_instance_per_gpu_by_index_each_its_port_unit_and_gpu() -> None:
    p = profile(instances="per-gpu", port=8200)
    found = units.instances(p, facts(gpus=GPUS))
    assert [(i.label, i.unit, i.port, i.gpu.uuid if i.gpu else None) for i in found] == [
        ("gpu0", "comfyui-gpu0", 8200, "GPU-aaaa"), ("gpu1", "comfyui-gpu1", 8201, "GPU-bbbb")]
    one = units.instance_profile(p, found[1]).comfyui
    assert (one.port, one.unit, one.gpu, one.instances) == (8201, "comfyui-gpu1", "GPU-bbbb", "single")
    assert units.ports(p) == tuple(range(8200, 8216)) and units.ports(profile()) == (8188,)
    with pytest.raises(PlanError, match=r"per-gpu runs one ComfyUI per GPU, but this host's GPUs could not be read"):
        units.instances(p, facts(gpus=()))


@pytest.mark.parametrize(("listen", "address", "exposed", "said"), [
    ("127.0.0.1", "0.0.0.0", True, "0.0.0.0 (every address"),
    ("127.0.0.1", "::", True, ":: (every address"),
    ("127.0.0.1", "8.8.4.4", True, "8.8.4.4 (a public address"),
    ("127.0.0.1", "10.0.0.7", True, "10.0.0.7 (a network address"),
    ("localhost", "::1", False, ""),
    ("127.0.0.1", "::ffff:127.0.0.1", False, ""),
    ("0.0.0.0", "0.0.0.0", False, ""),          # asked for: not ours to judge
])
def test_who_is_exposed(listen: str, address: str, exposed: bool, said: str) -> None:
    f = facts(listeners={8188: (Listener(address, 77, ("python3", "main.py")),)})
    found = units.exposed(profile(listen=listen), f, 8188)
    assert bool(found) is exposed
    if exposed:
        assert units.describe(found) == f"{said}; pid 77: python3 main.py)"


# -- the service resource, owning its units ---------------------------------------------------------

def plan(p: Profile, f: Facts) -> Any:
    return service.plan(p, f)


def test_probe_asks_for_its_units_and_ports() -> None:
    assert service.probe(profile()) == Probe(ports=(8188,), unit_files=((DIR, "comfyui.service"),
                                                                       (DIR, "comfyui-gpu*.service")))
    restart_only = build_profile({"comfyui": {"root": ROOT, "restart": {"systemd": "comfy"}}}, name="t", file="/p")
    assert service.probe(restart_only) == Probe(ports=(8188,), units=("comfy",))


def test_a_host_without_the_unit_gets_it_written_reloaded_enabled_and_restarted() -> None:
    (change,) = plan(profile(), facts()).changes
    assert (change.action, change.summary) == ("create", f"install unit comfyui ({DIR}/comfyui.service)")
    put, reload, enable = change.steps
    assert isinstance(put, Put) and put.dest == f"{DIR}/comfyui.service"
    assert [reload.argv, enable.argv] == [("systemctl", "daemon-reload"), ("systemctl", "enable", "comfyui.service")]
    assert reload.on_machine and change.notify == frozenset({"restart-comfyui"})
    assert change.before is None and change.after == put.content.decode()       # shown as a diff


def test_a_converged_unit_plans_nothing_a_disabled_one_is_enabled_a_stopped_one_started() -> None:
    p = profile()
    assert plan(p, converged(p)).changes == ()
    disabled = converged(p)
    disabled = replace(disabled, units=replace(disabled.units, state={"comfyui.service": replace(RUNNING, enabled="disabled")}))
    (change,) = plan(p, disabled).changes
    assert change.summary == "enable unit comfyui (it is disabled)" and not change.notify
    stopped = replace(converged(p), listeners={})
    stopped = replace(stopped, units=replace(stopped.units, state={"comfyui.service": replace(
        RUNNING, active="failed", sub="failed", main_pid=0)}))
    (change,) = plan(p, stopped).changes
    assert change.summary == "start unit comfyui (it is failed)" and change.steps == ()
    assert change.notify == frozenset({"restart-comfyui"})


def test_the_units_own_comfyui_on_every_address_is_restarted_into_loopback() -> None:
    p = profile()
    f = converged(p, listeners={8188: (Listener("0.0.0.0", 4242, ("python", "main.py", "--listen", "0.0.0.0")),)})
    (change,) = plan(p, f).changes
    assert change.summary == ("restart unit comfyui: ComfyUI listens on 0.0.0.0 (every address; pid 4242: python "
                              "main.py --listen 0.0.0.0), its unit says 127.0.0.1")
    assert change.notify == frozenset({"restart-comfyui"})


def test_a_unit_not_written_by_provision_is_replaced_with_a_copy_kept_and_the_exposure_said() -> None:
    by_hand = UnitFile("comfyui.service", f"{DIR}/comfyui.service",
                       "[Service]\nExecStart=/usr/bin/python3 main.py --listen 0.0.0.0\n")
    f = facts(files=(by_hand,), state={"comfyui.service": RUNNING},
              listeners={8188: (Listener("0.0.0.0", 4242, ("python3", "main.py")),)})
    (change,) = service.plan(profile(), f, now=__import__("datetime").datetime(2026, 1, 2, 3, 4, 5)).changes
    assert change.summary == (f"rewrite unit comfyui ({DIR}/comfyui.service); ComfyUI listens on 0.0.0.0 (every "
                              "address; pid 4242: python3 main.py), the profile says 127.0.0.1")
    mkdir, copy = change.steps[:2]
    assert copy.argv == ("cp", "-p", f"{DIR}/comfyui.service", f"{ROOT}/.provision/units/comfyui.service.20260102-030405")
    assert change.warnings == (f"{DIR}/comfyui.service was not written by provision: it is replaced (a copy is kept "
                               f"at {ROOT}/.provision/units/comfyui.service.20260102-030405)",)
    assert change.before == by_hand.text


def test_another_process_on_the_port_stops_the_plan() -> None:
    f = facts(listeners={8188: (Listener("127.0.0.1", 999, ("python", "main.py")),)})
    with pytest.raises(PlanError, match=r"^port 8188 is held by 127.0.0.1 \(loopback; pid 999: python main.py\), not by "
                                        r"unit comfyui, which cannot start while it does: stop that process"):
        plan(profile(), f)


def test_units_of_instances_gone_are_stopped_and_removed_foreign_ones_left() -> None:
    p = profile()
    stale = UnitFile("comfyui-gpu1.service", f"{DIR}/comfyui-gpu1.service", "# Written by provision for ...\n")
    foreign = UnitFile("comfyui-gpu9.service", f"{DIR}/comfyui-gpu9.service", "[Service]\nExecStart=/bin/true\n")
    f = converged(p)
    f = replace(f, units=replace(f.units, files={**f.units.files, (DIR, "comfyui-gpu*.service"): (stale, foreign)}))
    (change,) = plan(p, f).changes
    assert (change.action, change.summary) == ("remove", "stop and remove unit comfyui-gpu1.service (no such instance "
                                                         "any more)")
    assert [s.argv for s in change.steps if isinstance(s, Run)] == [
        ("systemctl", "disable", "--now", "comfyui-gpu1.service"), ("rm", "-f", f"{DIR}/comfyui-gpu1.service"),
        ("systemctl", "daemon-reload")]


def test_no_systemd_or_no_right_to_write_the_unit_is_a_plan_error() -> None:
    with pytest.raises(PlanError, match=r"systemd does not answer on this host \(System has not been booted"):
        plan(profile(), facts(error="System has not been booted with systemd as init system (PID 1). Can't operate."))
    with pytest.raises(PlanError, match="which this login cannot write: connect as root"):
        plan(profile(), facts(writable=False))


def test_restart_handler_restarts_every_instance_and_waits_for_each() -> None:
    p = profile(instances="per-gpu", port=8200, ready_timeout_s=90)
    handler = service.plan(p, facts(gpus=GPUS)).handlers[0]
    restart, *ready = handler.steps
    assert restart.argv == ("systemctl", "restart", "comfyui-gpu0", "comfyui-gpu1") and restart.on_machine
    requests = [json.loads(r.stdin or b"") for r in ready]
    assert [r["url"] for r in requests] == ["http://127.0.0.1:8200", "http://127.0.0.1:8201"]
    assert requests[1]["alive"] == ["systemctl", "show", "--property=SubState", "--value", "comfyui-gpu1"]
    assert requests[1]["dead"] == ["failed", "dead", "auto-restart"] and requests[1]["timeout"] == 90
    assert [d.argv[:3] for d in handler.diagnose] == [("journalctl", "-u", "comfyui-gpu0"),
                                                      ("journalctl", "-u", "comfyui-gpu1")]


@pytest.mark.parametrize(("restart", "where"), [
    ({"systemd": "comfy"}, "in unit comfy (/lib/systemd/system/comfy.service)"),
    ({"docker": "comfyui-qwen"}, "in the command of container comfyui-qwen"),
    ({"command": ["supervisorctl", "restart", "comfyui"]}, "where ComfyUI is started"),
])
def test_a_service_provision_does_not_own_is_told_what_to_fix(restart: dict, where: str) -> None:
    p = build_profile({"comfyui": {"root": ROOT, "restart": restart}}, name="t", file="/p")
    f = facts(listeners={8188: (Listener("::", 31, None),)},
              state={"comfy": UnitState(path="/lib/systemd/system/comfy.service")})
    result = service.plan(p, f)
    assert result.changes == ()
    (note,) = result.notes
    assert note.level == "warning" and note.message == (
        f"ComfyUI on port 8188 listens on :: (every address; pid 31): anyone who reaches this host can use it, and the "
        f"profile says 127.0.0.1. provision does not own how it is started: set --listen 127.0.0.1 {where}, or set "
        "comfyui.service: systemd so that provision writes and restarts the unit")


# -- the service manager itself ---------------------------------------------------------------------

def test_the_stand_in_runs_the_loaded_definition_fails_and_restarts_as_systemd_does(tmp_path: Any) -> None:
    units_dir, state = tmp_path / "units", tmp_path / "state"
    units_dir.mkdir()
    m = service_manager.Manager(str(units_dir), str(state))
    unit = units_dir / "t.service"
    flag = tmp_path / "ran"
    unit.write_text(f"[Service]\nExecStart={sys.executable} -c \"open('{flag}', 'w').write('one')\"\n")
    assert m.start("t.service") == 5                     # not loaded before a daemon-reload
    m.daemon_reload()
    assert m.start("t.service") == 0
    _wait(lambda: m.status("t.service") == "dead")
    assert flag.read_text() == "one" and m.show("t.service")["ActiveState"] == "inactive"
    unit.write_text(f"[Service]\nExecStart={sys.executable} -c \"import sys; sys.exit(3)\"\n")
    assert m.start("t.service") == 0                     # the old definition still: no reload yet
    _wait(lambda: m.status("t.service") == "dead")
    m.daemon_reload()
    m.start("t.service")
    _wait(lambda: m.status("t.service") == "failed")
    assert m.show("t.service")["ActiveState"] == "failed"
    assert "status=3/NOTIMPLEMENTED" in (state / "t.service" / "journal").read_text()   # systemd's name of 3
    unit.write_text(unit.read_text() + "Restart=on-failure\nRestartSec=30\n")
    m.daemon_reload()
    m.start("t.service")
    _wait(lambda: m.status("t.service") == "auto-restart")
    assert m.show("t.service")["ActiveState"] == "activating"
    m.stop("t.service")
    assert m.status("t.service") == "dead"


def _wait(predicate: Any, timeout: float = 20.0) -> None:
    import time
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
