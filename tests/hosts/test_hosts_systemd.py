"""Provision against REAL systemd: one Debian host booted by systemd-nspawn (PID 1 systemd 252,
journald, its own sshd on 127.0.0.1), with no ComfyUI at all, taken through a fleet host's life in
order: one apply makes the real ComfyUI (cloned at v0.3.60, a venv made with the host's python3
from the real wheelhouse), writes provision's unit, which real systemd enables and starts bound to
127.0.0.1, and verification passes; a second apply changes nothing; v0.3.64 is one change and one
restart; a rollback puts v0.3.60 back; an apply killed inside the move's `git checkout` converges
when run again; a ComfyUI that dies while starting ends the readiness wait at once with real
journalctl's lines; two GPUs (the sandbox's nvidia-smi inside the host) get a unit each; a deploy
user with become gets the hardened unit, which real systemd runs as that user. The tests share the host and run
in file order: each starts from where the one before left it (a from-nothing apply costs minutes).
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import upstream
from lab import Lab, service_port
from machines import Machine
from realhost import TEMPLATES
from sshd import listening

from provisioner.sandbox.host import gpu_config, install_nvidia_smi
from provisioner.sandbox.wheels import build_package_wheelhouse

pytestmark = pytest.mark.hosts
ROOT = "/opt/ComfyUI"
UNIT = "/etc/systemd/system/comfyui.service"
# nunchaku 1.2.1's Requires-Dist that ComfyUI does not bring: stand-ins, as in the real tier.
STAND_INS = ("diffusers", "peft", "accelerate", "protobuf")
STARTED = "Started comfyui.service - "     # systemd names the Description after it


@dataclass
class SystemdHost:
    """A lab host on a booted machine: ComfyUI under `ROOT`, provision's own unit, on CPU."""

    machine: Machine
    port: int
    comfyui_repo: Path
    wheels: Path                  # the real wheelhouse
    stand_ins: Path

    @property
    def name(self) -> str:
        return self.machine.sshd.name

    @property
    def sshd(self) -> Any:
        return self.machine.sshd

    def provision_vars(self) -> dict[str, Any]:
        # The host's root is root's (provision logs in as root and clones it): said explicitly, so the
        # hardened unit runs under real systemd as root here.
        return {"comfyui": {"root": ROOT, "port": self.port, "restart": None, "service": "systemd",
                            "args": ["--cpu", "--disable-auto-launch"], "allow_root": True}}

    def overlay(self, version: str) -> dict[str, Any]:
        """ComfyUI `version` from the real repository, its venv from the real wheelhouse, offline."""
        return {
            "comfyui": {**self.provision_vars()["comfyui"], "version": version, "repo": str(self.comfyui_repo),
                        "torch": {"version": "2.9.1", "cuda": "12.8", "index_url": None,
                                  "find_links": [str(self.wheels)]},
                        "ready_timeout_s": 600},
            "pip": {"no_index": True, "find_links": [str(self.wheels), str(self.stand_ins)]},
            "packages": ["diffusers>=0.35", "peft>=0.17", "accelerate>=1.10", "requests"],  # 0.3.64 imports requests
            "workflow": {"template_dir": str(TEMPLATES), "templates": ["invert.json.j2"]},
            "verify": {"family_nodes": False, "warm_runs": 1},
        }

    def stop(self) -> None:
        self.machine.stop()

    def git(self, *args: str) -> str:
        return self.machine.ssh("git", "-C", ROOT, *args, check=True).stdout.strip()

    def starts(self, unit: str = "comfyui") -> int:
        return self.machine.journal(unit).count(STARTED.replace("comfyui", unit))


@pytest.fixture(scope="module")
def host(hosts_lab: Lab, boot: Callable[[str], Machine], comfyui_repo: Path, real_wheelhouse: Path,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[SystemdHost]:
    stand_ins = build_package_wheelhouse(tmp_path_factory.mktemp("stand-ins"), STAND_INS)
    made = SystemdHost(boot("sd"), service_port(), comfyui_repo, real_wheelhouse, stand_ins)
    hosts_lab.attach(made)
    hosts_lab.overlays[made.name] = made.overlay("v0.3.60")
    hosts_lab.write()
    yield made
    made.stop()


def run(lab: Lab, verb: str, host: SystemdHost, *args: str) -> tuple[int, str]:
    return lab.run(verb, "--limit", host.name, *args)


def mtime(machine: Machine, path: str) -> int:
    return machine.path(path).stat().st_mtime_ns


def test_a_bare_host_gets_a_verified_comfyui_service_in_one_apply(
        hosts_lab: Lab, host: SystemdHost, comfyui_repo: Path) -> None:
    machine = host.machine
    assert not machine.path(ROOT).exists()
    code, out = run(hosts_lab, "apply", host)
    assert code == 2, out
    assert "1 changed, 0 unchanged, 0 failed" in out
    assert host.git("rev-parse", "HEAD") == upstream.git("-C", str(comfyui_repo), "rev-parse", "v0.3.60^{commit}")
    torch = machine.ssh(f"{ROOT}/venv/bin/python", "-c", "import torch; print(torch.__version__, torch.version.cuda)",
                        check=True).stdout.split()
    assert torch == ["2.9.1+cu128", "12.8"]
    # Real systemd loaded provision's unit, enabled it and runs it.
    assert machine.systemctl("is-enabled", "comfyui").stdout.strip() == "enabled"
    shown = dict(line.split("=", 1) for line in machine.systemctl(
        "show", "comfyui", "--property=ActiveState,SubState,FragmentPath,MainPID,NeedDaemonReload").stdout.split())
    assert shown["ActiveState"] == "active" and shown["SubState"] == "running", shown
    assert shown["FragmentPath"] == UNIT and shown["NeedDaemonReload"] == "no", shown
    assert listening(host.port) == ["0100007F"]                                 # 127.0.0.1 only
    cmdline = machine.ssh("cat", f"/proc/{shown['MainPID']}/cmdline", check=True).stdout.split("\0")
    assert cmdline[:2] == [f"{ROOT}/venv/bin/python", f"{ROOT}/main.py"], cmdline
    for check in ("comfyui_reachable", "nodes_registered", "workflow_accepted", "generation", "images_ok"):
        assert f"{host.name} PASS {check}" in out
    assert host.starts() == 1
    verify = machine.ssh("systemd-analyze", "verify", UNIT)                    # systemd's own lint of the unit
    assert verify.returncode == 0 and "comfyui" not in verify.stdout + verify.stderr, verify


def test_a_second_apply_changes_nothing(hosts_lab: Lab, host: SystemdHost) -> None:
    machine = host.machine
    stamps = [mtime(machine, p) for p in (UNIT, f"{ROOT}/venv/bin", f"{ROOT}/main.py")]
    pid = machine.systemctl("show", "comfyui", "--property=MainPID", "--value").stdout.strip()
    code, out = run(hosts_lab, "apply", host, "--no-verify")
    assert code == 0, out
    assert "0 changed, 1 unchanged, 0 failed" in out
    assert [mtime(machine, p) for p in (UNIT, f"{ROOT}/venv/bin", f"{ROOT}/main.py")] == stamps
    assert machine.systemctl("show", "comfyui", "--property=MainPID", "--value").stdout.strip() == pid
    assert host.starts() == 1


def test_a_core_move_is_one_change_and_one_restart(hosts_lab: Lab, host: SystemdHost) -> None:
    hosts_lab.overlays[host.name] = host.overlay("v0.3.64")
    hosts_lab.write()
    code, out = run(hosts_lab, "plan", host)
    assert code == 2, out
    assert "1 host: 1 to change (1 change)" in out
    assert "~ core checkout ComfyUI v0.3.60 -> v0.3.64; pip install comfyui-frontend-package==1.27.10" in out
    code, out = run(hosts_lab, "apply", host)
    assert code == 2, out
    assert "handler: restarted ComfyUI (systemctl restart comfyui)" in out
    assert host.starts() == 2
    assert f"{host.name} PASS comfyui_reachable: ComfyUI 0.3.64 answers" in out
    assert f"{host.name} PASS generation" in out
    assert run(hosts_lab, "plan", host)[0] == 0


def test_a_rollback_puts_the_core_back_and_restarts_once(hosts_lab: Lab, host: SystemdHost,
                                                         comfyui_repo: Path) -> None:
    code, out = run(hosts_lab, "rollback", host, "--check")
    assert code == 2, out
    assert "v0.3.64 -> v0.3.60" in out, out
    code, out = run(hosts_lab, "rollback", host)
    assert code == 2, out
    assert host.git("rev-parse", "HEAD") == upstream.git("-C", str(comfyui_repo), "rev-parse", "v0.3.60^{commit}")
    assert host.starts() == 3
    assert f"{host.name} PASS comfyui_reachable: ComfyUI 0.3.60 answers" in out
    assert run(hosts_lab, "rollback", host, "--check")[0] == 0
    code, out = run(hosts_lab, "plan", host)                  # the profile still says v0.3.64
    assert code == 2 and "~ core checkout ComfyUI v0.3.60 -> v0.3.64" in out, out


def stopped_checkout(scope: str) -> int | None:
    """The pid of a stopped process (state T) in the cgroup `scope` (a booted host's: its
    processes are this machine's too) whose argv is a `git ... checkout ... --detach`, if one is
    stopped now. Every process is looked at afresh on each call: a process's argv changes when it
    execs (provision's `env VAR=... git` becomes the git script; the script's forks carry its argv
    until they exec), so a pid judged by its argv once, when first seen, may be the wrong one."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
                continue
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if b"checkout" in argv and b"--detach" in argv and scope in Path(f"/proc/{entry}/cgroup").read_text():
                return int(entry)
        except OSError:
            continue                        # gone meanwhile
    return None


def test_an_apply_killed_inside_the_cores_checkout_converges_when_run_again(
        hosts_lab: Lab, host: SystemdHost, comfyui_repo: Path, tmp_path: Path) -> None:
    """Killed inside the core's `git checkout`: the host's `git` is a script for the test that, for
    the core's checkout, first writes v0.3.64's files into the tree without moving HEAD (`git
    checkout COMMIT -- .`: what a checkout killed halfway leaves) and then stops itself before the
    real checkout; the apply is killed there and the stopped git gets the SIGTERM its supervisor
    sends. (Letting the real checkout run in slices of a millisecond until files were written raced
    it: under load a slice outlasted the whole checkout, 3 runs in 5.) The next apply finishes that
    checkout (its owed restart names the core's change) and performs the restart the killed one
    owed, exactly once."""
    old = upstream.git("-C", str(comfyui_repo), "rev-parse", "v0.3.60^{commit}")
    diff = upstream.git("-C", str(comfyui_repo), "diff", "--name-only", "--diff-filter=MD", "v0.3.60", "v0.3.64")
    moved = [p for p in diff.split() if p.endswith(".py")]          # text, and in v0.3.60
    before = {p: upstream.git("-C", str(comfyui_repo), "show", f"v0.3.60:{p}") for p in moved}
    marker = host.machine.path(f"{ROOT}/.provision/owed/restart-comfyui")

    def written() -> bool:
        """Whether git has written a file of v0.3.64 (read as this machine sees the host's files)."""
        for p in moved:
            path = host.machine.path(f"{ROOT}/{p}")
            if not path.exists() or path.read_text(errors="replace").strip() != before[p]:
                return True
        return False

    # git's own binary stays in its exec path; /usr/bin/git becomes a script that half does the
    # core's checkout, then stops (this host is a copy booted for the tier: restored below).
    system_git = host.machine.path("/usr/bin/git")
    kept = system_git.with_name("git.test-kept")
    os.replace(system_git, kept)
    system_git.write_text("#!/bin/sh\n"
                          'echo "$$ $(id -un) PATH=$PATH $*" >> /var/tmp/git-calls\n'
                          # No space between the words' patterns: provision runs `... -C ROOT checkout
                          # --quiet --detach TAG`, and a pattern `*" -C ROOT "*" checkout "*` would need two
                          # spaces between ROOT and checkout, so it never matched and the real checkout ran.
                          f'case " $* " in *" -C {ROOT} "*"checkout "*"--detach "*)\n'
                          '  for commit; do :; done\n'
                          f'  /usr/lib/git-core/git -c core.hooksPath=/dev/null -C {ROOT} checkout --quiet "$commit" -- . '
                          '&& kill -STOP $$ ;;\n'
                          'esac\n'
                          'exec /usr/lib/git-core/git "$@"\n')
    system_git.chmod(0o755)
    proc = hosts_lab.spawn("apply", "--limit", host.name, "--no-verify", log_dir=tmp_path)
    try:
        deadline = time.monotonic() + 300
        while not (marker.exists() and "core: " in marker.read_text()):     # the step before the checkout
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.01)
        scope = f"/machine-{host.machine.name}.scope"
        while (git := stopped_checkout(scope)) is None:     # the script above, once it has stopped itself
            if proc.poll() is not None:
                calls = host.machine.path("/var/tmp/git-calls")
                raise AssertionError("the apply ended and no git checkout stopped: git calls: "
                                     f"{calls.read_text() if calls.exists() else 'none'}; {proc.communicate()[0]}")
            assert time.monotonic() < deadline, "no git checkout stopped"
            time.sleep(0.01)
        assert written(), "the half-done checkout wrote none of v0.3.64's files"
        head = host.machine.path(f"{ROOT}/.git/HEAD").read_text().strip()
        assert head == old, "git moved HEAD before it could be stopped inside its checkout"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        os.kill(git, signal.SIGTERM)                        # as its supervisor does: git removes its locks
        os.kill(git, signal.SIGCONT)
    finally:
        os.replace(kept, system_git)
        if proc.poll() is None:
            proc.kill()
    # Nothing it started goes on running on the host: its supervisors stop what they ran.
    deadline = time.monotonic() + 30
    while left := host.machine.leftovers():
        assert time.monotonic() < deadline, left
        time.sleep(0.5)
    assert host.git("rev-parse", "HEAD") == old and host.git("status", "--porcelain", "--untracked-files=no")
    code, out = run(hosts_lab, "plan", host)
    assert code == 2 and "finish the checkout an interrupted apply left half done" in out, out
    code, out = run(hosts_lab, "apply", host, "--lock-timeout", "30")
    assert code == 2, out
    assert host.git("rev-parse", "HEAD") == upstream.git("-C", str(comfyui_repo), "rev-parse", "v0.3.64^{commit}")
    assert not host.git("status", "--porcelain", "--untracked-files=no")
    assert host.starts() == 4
    assert f"{host.name} PASS comfyui_reachable: ComfyUI 0.3.64 answers" in out
    assert not host.machine.ssh("ls", f"{ROOT}/.provision/owed").stdout.strip()
    assert run(hosts_lab, "plan", host)[0] == 0


DYING_NODE = "import os, sys\nprint('dying-node: this ComfyUI exits while it starts', flush=True)\nos._exit(3)\n"


def test_a_comfyui_that_dies_while_starting_ends_the_wait_with_its_journal(hosts_lab: Lab, host: SystemdHost) -> None:
    """A custom node that ends the process while ComfyUI imports it: systemd's Restart=on-failure
    keeps the unit `activating` (auto-restart) and the readiness wait says so at once."""
    node = host.machine.path(f"{ROOT}/custom_nodes/dying_node")
    node.mkdir()
    (node / "__init__.py").write_text(DYING_NODE)
    hosts_lab.overlays[host.name]["comfyui"]["args"] = ["--cpu", "--disable-auto-launch", "--verbose", "INFO"]
    hosts_lab.write()
    try:
        started = time.monotonic()
        code, out = run(hosts_lab, "apply", host, "--no-verify")
        took = time.monotonic() - started
        assert code == 1, out
        assert "ComfyUI died during start-up after" in out
        assert "auto-restart" in out, out
        assert "did not answer within" not in out
        assert "journalctl -u comfyui -n 40 --no-pager:" in out
        assert "dying-node: this ComfyUI exits while it starts" in out                  # real journald's lines
        assert "comfyui.service: Main process exited, code=exited, status=3/NOTIMPLEMENTED" in out
        assert took < 300, took                                                            # not the 600 s wait
    finally:
        shutil.rmtree(node)
    code, out = run(hosts_lab, "apply", host, "--no-verify")
    assert code == 2, out
    assert machine_state(host.machine) == ("active", "running")


def machine_state(machine: Machine, unit: str = "comfyui") -> tuple[str, str]:
    shown = machine.systemctl("show", unit, "--property=ActiveState,SubState").stdout.split()
    values = dict(line.split("=", 1) for line in shown)
    return values["ActiveState"], values["SubState"]


def test_per_gpu_instances_are_units_of_real_systemd(hosts_lab: Lab, host: SystemdHost) -> None:
    """Two GPUs (the sandbox's nvidia-smi inside the host, driver 570): a unit per GPU, each with
    CUDA_VISIBLE_DEVICES set to its GPU's UUID and its own port, started by systemd and waited for
    on its own; back to one instance removes them. On CPU: verification, which would fail the
    device check of a GPU host, is left out."""
    machine = host.machine
    config = gpu_config("rtx4090,rtx4090", Path("/var/lib/gpu-state.json"))
    for card in config["gpus"]:
        card.update(driver="570.133.07", cuda="12.8")
    script = install_nvidia_smi(machine.path("/usr/local/bin"), config, python="/usr/bin/python3")
    comfyui = hosts_lab.overlays[host.name]["comfyui"]
    comfyui["args"] = ["--cpu", "--disable-auto-launch"]
    comfyui["instances"] = "per-gpu"
    hosts_lab.write()
    try:
        code, out = run(hosts_lab, "apply", host, "--no-verify")
        assert code == 2, out
        assert "handler: restarted ComfyUI (systemctl restart comfyui-gpu0 comfyui-gpu1)" in out
        uuids = [card["uuid"] for card in config["gpus"]]
        for index in (0, 1):
            unit = f"comfyui-gpu{index}"
            assert machine_state(machine, unit) == ("active", "running")
            env = machine.systemctl("show", unit, "--property=Environment", "--value").stdout
            assert f"CUDA_VISIBLE_DEVICES={uuids[index]}" in env, env
            assert listening(host.port + index) == ["0100007F"]
            assert machine.systemctl("is-enabled", unit).stdout.strip() == "enabled"
        assert machine.systemctl("is-active", "comfyui").stdout.strip() == "inactive"
        assert run(hosts_lab, "plan", host)[0] == 0
    finally:
        comfyui["instances"] = "single"
        hosts_lab.write()
    code, out = run(hosts_lab, "apply", host, "--no-verify")
    assert code == 2, out
    assert "- service stop and remove unit comfyui-gpu1.service (no such instance any more)" in out
    assert not machine.path("/etc/systemd/system/comfyui-gpu1.service").exists()
    assert machine.systemctl("is-active", "comfyui-gpu1").stdout.strip() == "inactive"
    script.unlink()


def test_comfyui_runs_as_its_own_user_under_real_systemd(hosts_lab: Lab, host: SystemdHost) -> None:
    """Least privilege on a real host: the fleet's deploy user logs in (not root) and owns ComfyUI's
    root; only the unit's steps escalate (sudo, ansible_become); real systemd runs ComfyUI as that
    user under the hardened unit (ProtectSystem=strict with the root writable, PrivateTmp,
    ProtectHome=read-only, NoNewPrivileges), and its generations pass."""
    machine = host.machine
    machine.add_user("deploy")
    machine.ssh("chown", "-R", "deploy:deploy", ROOT, check=True)
    comfyui = hosts_lab.overlays[host.name]["comfyui"]
    comfyui["allow_root"] = False
    hosts_lab.host_vars[host.name] = {"ansible_user": "deploy", "ansible_become": True}
    hosts_lab.write()
    try:
        code, out = run(hosts_lab, "plan", host)
        assert code == 2, out
        assert "(as root (sudo, as deploy))" in out and "ComfyUI runs as root" in out, out
        code, out = run(hosts_lab, "apply", host)
        assert code == 2, out
        assert f"{host.name} PASS generation" in out, out
        shown = dict(line.split("=", 1) for line in machine.systemctl(
            "show", "comfyui", "--property=User,MainPID,ActiveState,SubState").stdout.split())
        assert (shown["User"], shown["ActiveState"], shown["SubState"]) == ("deploy", "active", "running"), shown
        assert machine.ssh("ps", "-o", "user=", "-p", shown["MainPID"], check=True).stdout.strip() == "deploy"
        unit = machine.path(UNIT).read_text()
        for line in ("User=deploy", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                     "ProtectHome=read-only"):
            assert line + "\n" in unit, unit
        verify = machine.ssh("systemd-analyze", "verify", UNIT)
        assert verify.returncode == 0 and "comfyui" not in verify.stdout + verify.stderr, verify
        security = machine.ssh("systemd-analyze", "security", "comfyui", "--no-pager")
        print("systemd-analyze security comfyui:", (security.stdout.strip().splitlines() or ["-"])[-1])
        assert machine.ssh("find", ROOT, "!", "-user", "deploy", "-print", "-quit",
                           check=True).stdout.strip() == ""     # every file under the root stays deploy's
        assert run(hosts_lab, "plan", host)[0] == 0
    finally:
        hosts_lab.host_vars.pop(host.name, None)
        comfyui["allow_root"] = True
        hosts_lab.write()
