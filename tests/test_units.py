"""ComfyUI's instances and their systemd units (resources/units.py), the service resource planning
them from facts (pure), and the unit files read back by the service manager standing in for systemd
(tests/service_manager.py, a parser of its own): what provision writes is what systemd would run."""

from __future__ import annotations

import json
import os


import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from dataclasses import replace
from typing import Any

import pytest
import service_manager

from provisioner.config.model import Profile, build_profile
from provisioner.errors import PlanError
from provisioner.facts.model import Login, Facts, Gpu, Listener, Probe, PythonEnv, UnitFile, Units, UnitState
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
                 listeners=listeners or {}, units=Units(found, {DIR: writable}, state or {}, error),
                 login=COMFY_ROOT)


# The login is root; ComfyUI's root belongs to its own user, whom the unit runs it as.
COMFY_ROOT = Login(uid=0, user="root", root_owner="comfy", root_owner_uid=1001, root_group="comfy")
COMFY = units.RunAs("comfy", "comfy")


RUNNING = UnitState("loaded", "active", "running", 4242, "enabled", f"{DIR}/comfyui.service")


def converged(p: Profile, **kw: Any) -> Facts:
    """A host where the profile's one unit is written as rendered, enabled, running, on loopback."""
    f = facts(**kw)
    (instance,) = units.instances(p, f)
    text = units.render(p, instance, COMFY)
    return replace(f, units=replace(f.units, files={**f.units.files, (DIR, "comfyui.service"): (
        UnitFile("comfyui.service", f"{DIR}/comfyui.service", text),)}, state={"comfyui.service": RUNNING}),
        listeners=kw.get("listeners") or {8188: (Listener("127.0.0.1", 4242, ("python", "main.py")),)})


def test_the_unit_runs_the_venvs_python_on_main_py_listening_as_the_profile_says() -> None:
    p = profile(listen="127.0.0.1", port=8190, args=["--lowvram", "--preview-method", "auto"])
    (instance,) = units.instances(p, facts())
    assert (instance.unit, instance.port, instance.gpu) == ("comfyui", 8190, GPUS[1])
    text = units.render(p, instance, COMFY)
    assert text.startswith("# Written by provision for ComfyUI at /opt/ComfyUI")
    assert (f"ExecStart={ROOT}/venv/bin/python {ROOT}/main.py --listen 127.0.0.1 --port 8190 --lowvram "
            "--preview-method auto\n") in text
    assert "Environment=CUDA_VISIBLE_DEVICES=GPU-aaaa\n" in text and f"WorkingDirectory={ROOT}\n" in text
    assert "Restart=on-failure\n" in text and "WantedBy=multi-user.target\n" in text
    assert "CUDA_VISIBLE_DEVICES" not in units.render(p, replace(instance, gpu=None), COMFY)    # a host with no GPU read


HOSTILE = ["--extra-model-paths-config", "/srv/my models/extra.yaml", "$HOME", "${PATH}", "100%", "%n", 'say "hi"',
           "back\\slash", "it's", ";", "a\tb", "$$", "-"]


def test_what_provision_writes_systemd_splits_back_into_the_same_argv() -> None:
    """Quoting against the stand-in's own reading of systemd's rules: spaces, quotes, backslashes,
    `$` (variables) and `%` (specifiers) reach ComfyUI as written in the profile."""
    p = build_profile({"comfyui": {"root": "/srv/Comfy UI 100%", "venv": "/srv/v$env/venv", "service": "systemd",
                                   "args": HOSTILE}}, name="t", file="/p/t.yaml")
    (instance,) = units.instances(p, facts())
    parsed = service_manager.parse(units.render(p, instance, COMFY))
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
    with pytest.raises(PlanError, match="which this login cannot write: set ansible_become: true"):
        plan(profile(), facts(writable=False))


def test_a_login_that_is_not_root_installs_the_unit_only_through_become() -> None:
    """The unit's steps are `system` (they need root); a login that cannot become says so in the
    plan, with sudo's own reason; one that can gets the same steps, run as root by the engine."""
    alice = Login(uid=1000, user="alice", root_owner="alice", root_owner_uid=1000)
    refused = replace(alice, become_error="h: cannot become root with sudo: sudo: a password is required; give the "
                                          "become password (-K/--ask-become-pass, or provision_become_password_env)")
    with pytest.raises(PlanError, match="needs root, and alice cannot become root: h: cannot become root with sudo: "
                                        "sudo: a password is required"):
        plan(profile(), replace(facts(), login=refused))
    with pytest.raises(PlanError, match="alice cannot become root: ansible_become is off"):
        plan(profile(), replace(facts(), login=alice))
    (change,) = plan(profile(), replace(facts(writable=False), login=replace(alice, become="root"))).changes
    assert all(getattr(s, "system", False) for s in change.steps)
    handler = plan(profile(), replace(facts(), login=replace(alice, become="root"))).handlers[0]
    assert handler.steps[0].system and not handler.steps[1].system     # restart as root; the wait as alice


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


def test_each_planned_change_says_as_whom_it_runs() -> None:
    from provisioner.plan.build import host_plan
    from provisioner.plan.render import plan_to_json, runs_as

    alice = Login(uid=1000, user="alice", become="root")
    (change,) = plan(profile(), replace(facts(), login=alice)).changes
    assert runs_as(change, alice) == "root (sudo, as alice)"
    assert runs_as(change, Login(uid=0, user="root")) == "root"
    shown = plan_to_json(host_plan(replace(facts(), login=alice), [plan(profile(), replace(facts(), login=alice))]))
    assert [c["as"] for c in shown["changes"]] == ["root (sudo, as alice)"]
    # working as the root's owner: every other change says so; the unit's is still root's
    write = replace(change, steps=(Run(("mkdir", "-p", f"{ROOT}/models")),))
    as_owner = replace(alice, works_as="comfy")
    assert (runs_as(write, as_owner), runs_as(change, as_owner)) == ("comfy (sudo, as alice)", "root (sudo, as alice)")
    assert runs_as(write, alice) == "alice"


def test_the_unit_runs_comfyui_as_the_owner_of_its_root_hardened_and_never_as_root_unasked() -> None:
    p = profile()
    f = facts()
    assert units.run_as(p, f) == COMFY
    assert units.run_as(profile(user="ops"), f) == units.RunAs("ops")           # its group: systemd's default
    (instance,) = units.instances(p, f)
    text = units.render(p, instance, COMFY)
    for line in ("User=comfy", "Group=comfy", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 f"ReadWritePaths={ROOT} -{ROOT}/output -{ROOT}/input -{ROOT}/user -{ROOT}/models",
                 "PrivateTmp=yes", "ProtectHome=read-only", "CacheDirectory=comfyui",
                 "Environment=XDG_CACHE_HOME=/var/cache/comfyui TRITON_CACHE_DIR=/var/cache/comfyui/triton"):
        assert line + "\n" in text, line
    elsewhere = profile(venv="/srv/venvs/comfy")
    assert units.writable_paths(elsewhere)[-1] == "/srv/venvs/comfy"
    as_root = replace(f, login=replace(COMFY_ROOT, root_owner="root", root_owner_uid=0, root_group="root"))
    with pytest.raises(PlanError, match=r"would run ComfyUI as root \(the owner of /opt/ComfyUI\), and with it every "
                                        r"custom node and upload: give ComfyUI a user of its own \(comfyui.user"):
        plan(p, as_root)
    with pytest.raises(PlanError, match=r"as root \(comfyui.user\)"):
        plan(profile(user="root"), f)
    assert "User=root\n" in units.render(p, instance, units.run_as(profile(allow_root=True), as_root))


def test_comfyui_found_running_as_root_is_shown_and_restarted_as_its_user() -> None:
    p = profile()
    f = converged(p, listeners={8188: (Listener("127.0.0.1", 4242, ("python", "main.py"), uid=0),)})
    (change,) = plan(p, f).changes
    assert change.summary == ("restart unit comfyui: ComfyUI runs as root (127.0.0.1 (loopback; pid 4242: python "
                              "main.py)), its unit says comfy")
    assert change.notify == frozenset({"restart-comfyui"})
    ok = converged(p, listeners={8188: (Listener("127.0.0.1", 4242, ("python", "main.py"), uid=1001),)})
    assert plan(p, ok).changes == ()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt-get install systemd)")
def test_the_rendered_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd's own reading of the unit: every key known, every value valid, nothing to warn about."""
    root = tmp_path / "Comfy UI 100%"
    (root / "venv" / "bin").mkdir(parents=True)
    python = root / "venv" / "bin" / "python"
    python.symlink_to(sys.executable)
    p = build_profile({"comfyui": {"root": str(root), "service": "systemd", "args": HOSTILE}}, name="t",
                      file="/p/t.yaml")
    (instance,) = units.instances(p, facts())
    unit = tmp_path / "comfyui.service"
    unit.write_text(units.render(p, instance, units.RunAs("daemon", "daemon")))
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="running a unit as another user needs root")
def test_the_test_service_manager_runs_a_unit_as_its_user(tmp_path: Path) -> None:
    """User= and Group= as systemd applies them (tests/service_manager.py), so tests can check who
    runs ComfyUI; a User= naming no one fails the start as systemd's does (217/USER)."""
    import pwd

    out = Path(tempfile.mkdtemp(prefix="provision-unit-user-"))     # where daemon can write (tmp_path is root's)
    out.chmod(0o777)
    units_dir, state = tmp_path / "units", tmp_path / "state"
    for d in (units_dir, state):
        d.mkdir()
    daemon = pwd.getpwnam("daemon")
    (units_dir / "who.service").write_text(
        "[Service]\nUser=daemon\nExecStart=/bin/sh -c 'id -u > %s/uid; id -g > %s/gid; echo $$HOME > %s/home; "
        "exec sleep 30'\n" % (out, out, out))
    (units_dir / "nobody-here.service").write_text("[Service]\nUser=no-such-user-x\nExecStart=/bin/sleep 30\n")
    systemctl = lambda *a: service_manager.main("systemctl", list(a), str(units_dir), str(state))  # noqa: E731
    try:
        assert systemctl("daemon-reload") == 0 and systemctl("start", "who.service") == 0
        deadline = time.monotonic() + 10
        while not (out / "home").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "uid").read_text().strip() == str(daemon.pw_uid)
        assert (out / "gid").read_text().strip() == str(daemon.pw_gid)
        assert (out / "home").read_text().strip() == daemon.pw_dir
        systemctl("start", "nobody-here.service")
        journal = state / "nobody-here.service" / "journal"
        deadline = time.monotonic() + 10
        while not (journal.exists() and "217/USER" in journal.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "nobody-here.service: Main process exited, code=exited, status=217/USER" in journal.read_text()
    finally:
        service_manager.stop_all(str(state))
        shutil.rmtree(out)


def test_a_login_that_does_not_own_the_root_is_refused_before_it_writes_there() -> None:
    from provisioner.plan.build import owner_problem

    p = profile()
    alice = Login(uid=1000, user="alice", root_owner="comfy", root_owner_uid=1001, become="root")
    (unit,) = plan(p, replace(facts(), login=alice)).changes           # system steps only: root's
    assert owner_problem(p, replace(facts(), login=alice), [unit]) is None
    write = replace(unit, steps=(Run(("mkdir", "-p", f"{ROOT}/models")),))
    assert owner_problem(p, replace(facts(), login=replace(alice, become=None)), [write]) == (
        f"{ROOT} belongs to comfy, and provision would write there as alice: set ansible_become: true (sudo) "
        "to work there as comfy, connect as comfy (ansible_user), or give the root to alice")
    assert owner_problem(p, facts(), [write]) is None                                  # root writes anywhere
    assert owner_problem(p, replace(facts(), login=replace(alice, root_owner_uid=1000)), [write]) is None
    # become on: the login works there as the owner, or is refused with sudo's own reason
    assert owner_problem(p, replace(facts(), login=replace(alice, works_as="comfy")), [write]) is None
    said = "h: cannot become comfy with sudo: sudo: a password is required; give the become password"
    assert owner_problem(p, replace(facts(), login=replace(alice, works_as_error=said)), [write]) == (
        f"{ROOT} belongs to comfy, whom provision works there as: {said}")


# -- hostile values: what systemd treats specially in paths and arguments ---------------------------

HOSTILE_WORDS = ["a b", "a\tb", 'a"b', "a'b", "a\\b", "ab\\", "100%", "%h", "$HOME", "${PATH}", "$$", "a;b",
                 "\\\"'$%\\", "--x=a b\\", "=", "#", ";x"]


def _analyze(unit: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("word", HOSTILE_WORDS)
def test_a_hostile_argument_is_read_back_by_the_unit_parser_exactly(word: str) -> None:
    p = profile(args=[word, f"--x={word}"])
    gpu = replace(GPUS[1], name=f"RTX {word}\nExecStartPre=/bin/false", uuid=f"GPU-{word}")
    (instance,) = units.instances(p, facts(gpus=(gpu,)))
    text = units.render(p, instance, COMFY)
    read = service_manager.parse(text)
    assert read["argv"] == list(units.argv(p, instance)) and read["cwd"] == ROOT
    assert read["env"]["CUDA_VISIBLE_DEVICES"] == f"GPU-{word}"              # type: ignore[index]
    assert not any(line.startswith("ExecStartPre") for line in text.splitlines())    # the GPU's name: one line


ROOTS_KEPT = ["/srv/Comfy UI", "/srv/100%", "/srv/$HOME", "/srv/a;b=c", "/srv/x#y", "/srv/é"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
@pytest.mark.parametrize("name", ROOTS_KEPT)
def test_a_rendered_unit_passes_systemd_analyze_verify_and_names_the_real_executable(tmp_path: Any,
                                                                                  name: str) -> None:
    # systemd-analyze checks that ExecStart's executable exists: it reads the path back for us.
    root = tmp_path / "h" / name.lstrip("/").replace("/", "_")
    python = root / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    p = profile(root=str(root), args=HOSTILE_WORDS)
    (instance,) = units.instances(p, facts())
    unit = tmp_path / "comfyui.service"
    unit.write_text(units.render(p, instance, COMFY))
    proc = _analyze(unit)
    assert proc.returncode == 0, proc.stderr
    assert service_manager.parse(unit.read_text())["argv"] == list(units.argv(p, instance))


@pytest.mark.parametrize("name", ROOTS_KEPT)
def test_the_folders_comfyui_may_write_are_read_back_as_its_root(name: str) -> None:
    # ReadWritePaths= is a path list, not a command line: systemd expands no `$` there, so the root
    # "/srv/$HOME" written as `$$HOME` (as in ExecStart=) named a folder that is not there, and
    # ComfyUI could not write its own root under ProtectSystem=strict.
    p = profile(root=name, venv="/opt/venv")
    (instance,) = units.instances(p, facts())
    read = service_manager.parse(units.render(p, instance, COMFY))
    assert read["writable"] == list(units.writable_paths(p)) and read["writable"][0] == name
    assert read["cwd"] == name


@pytest.mark.parametrize(("comfyui", "key"), [
    ({"root": '/srv/a"b'}, "root"), ({"root": "/srv/a'b"}, "root"), ({"root": "/srv/a\\b"}, "root"),
    ({"root": "/srv/ab\\"}, "root"), ({"root": "/srv/ab "}, "root"),
    ({"venv": "/opt/v'env"}, "venv"), ({"venv": 've"nv'}, "venv"), ({"venv": "/opt/venv\\"}, "venv"),
])
def test_paths_systemd_cannot_carry_are_refused_located_and_never_rendered(tmp_path: Any, comfyui: dict[str, str],
                                                                         key: str) -> None:
    from tests.test_cli import run

    body = {"comfyui": {"root": "/srv/ComfyUI", "service": "systemd", **comfyui},
            "workflow": {"template_dir": str(tmp_path)}}
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps(body, indent=1))          # JSON is YAML: the values exactly, quoted
    code, out = run("validate", str(path))
    assert code == 3 and f"comfyui.{key}" in out and f"{path}:" in out and "Traceback" not in out, out
    p = profile(**comfyui)
    with pytest.raises(PlanError, match=f"comfyui.{key}"):
        units.render(p, units.instances(p, facts())[0], COMFY)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_what_the_refused_paths_would_do_to_systemd(tmp_path: Any) -> None:
    # Why they are refused, read from systemd itself: a quote in the executable is refused outright,
    # and a trailing backslash in WorkingDirectory= swallows the next line (here ExecStart=).
    python = tmp_path / "a'b" / "python"
    python.parent.mkdir()
    python.write_text("#!/bin/sh\n")
    python.chmod(0o755)
    quoted = tmp_path / "q.service"
    quoted.write_text(f'[Service]\nExecStart="{python}"\n')
    assert "special characters" in _analyze(quoted).stderr
    swallowed = tmp_path / "s.service"
    swallowed.write_text("[Service]\nWorkingDirectory=/srv/ab\\\nExecStart=/bin/true\n")
    assert "no ExecStart=" in _analyze(swallowed).stderr
    with pytest.raises(service_manager.UnitError, match="no ExecStart"):
        service_manager.parse(swallowed.read_text())
