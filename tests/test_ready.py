"""remote/ready.py, the host-side wait after a restart, run as the engine runs it (`python3 -c SOURCE`,
request on stdin) against the ComfyUI stand-in; and the restart handler's steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sshd import descendants, free_port, install_docker_standin, wait_until

from provisioner import remote
from provisioner.config.model import build_profile
from provisioner.resources import service
from provisioner.sandbox.comfyui_server import ComfyServer, start_comfyui

LOADER = "NunchakuQwenImageDiTLoader"


def wait(port: int, *, nodes: tuple[str, ...] = (LOADER,), timeout: float = 20, alive: tuple[str, ...] = (),
         dead: tuple[str, ...] = (), env: dict[str, str] | None = None, **watch: Any) -> subprocess.CompletedProcess[str]:
    request = remote.ready_request(url=f"http://127.0.0.1:{port}", nodes=nodes, timeout=timeout, alive=alive,
                                   dead=dead, every=0.5, **watch)
    return subprocess.run(list(remote.argv("ready", python=sys.executable)), input=request.decode(),
                          capture_output=True, text=True, timeout=60, env=env)


def progress(out: str) -> list[str]:
    return [json.loads(line)["progress"] for line in out.splitlines()]


def test_waits_until_comfyui_listens_then_answers_with_the_nodes(tmp_path: Path) -> None:
    port, started = free_port(), list[ComfyServer]()
    later = threading.Thread(target=lambda: started.append(
        start_comfyui(port=port, root=tmp_path, startup_s=1.5)))
    later.start()
    try:
        done = wait(port)
    finally:
        later.join()
        started[0].stop()
    assert done.returncode == 0, done.stderr
    said = progress(done.stdout)
    assert said[0] == f"waiting for ComfyUI at 127.0.0.1:{port} (up to 20 s)"
    assert any(s.startswith("waiting for ComfyUI … ") and s.endswith("(connection refused)") for s in said)
    assert said[-1].startswith("ComfyUI answers after ") and "481 node classes registered" in said[-1]


def test_a_comfyui_without_the_nodes_fails_at_once(tmp_path: Path) -> None:
    srv = start_comfyui(root=tmp_path, nunchaku_nodes=False)
    try:
        done = wait(srv.port, timeout=300, nodes=(LOADER, "NunchakuWheelInstaller"))
    finally:
        srv.stop()
    assert done.returncode == 3
    assert done.stderr.strip().endswith(f"but {LOADER} is not registered (480 node classes listed): a custom "
                                        "node failed to load")


def test_a_dead_service_ends_the_wait_and_a_silent_one_times_out() -> None:
    port = free_port()
    dead = wait(port, timeout=300, alive=(sys.executable, "-c", "print('failed')"), dead=("failed", "inactive"))
    assert dead.returncode == 2
    assert "died during start-up after 0 s" in dead.stderr and "-c print('failed'): failed)" in dead.stderr
    began = time.monotonic()
    silent = wait(port, timeout=1, alive=(sys.executable, "-c", "print('activating')"), dead=("failed",))
    assert silent.returncode == 1 and time.monotonic() - began < 30
    assert silent.stderr.strip() == (f"ComfyUI at 127.0.0.1:{port} did not answer within 1 s (last: connection "
                                     "refused); raise comfyui.ready_timeout_s if it needs longer")


@pytest.mark.parametrize("restart, log", [
    ({"systemd": "comfyui"}, (("journalctl", "-u", "comfyui", "-n", "40", "--no-pager"), True)),
    ({"docker": "comfyui-qwen"}, (("sh", "-c", 'exec docker logs --tail "$1" "$2" 2>&1', "sh", "40",
                                   "comfyui-qwen"), True)),
    ({"command": ["supervisorctl", "restart", "comfyui"]}, None),
])
def test_restart_handler_restarts_waits_and_knows_where_the_log_is(restart: dict, log: tuple | None) -> None:
    profile = build_profile({"comfyui": {"root": "/opt/ComfyUI", "listen": "0.0.0.0", "port": 8190,
                                         "restart": restart, "ready_timeout_s": 120},
                             "verify": {"required_nodes": ["NunchakuTextEncoderLoaderV2", LOADER]}},
                            name="p", file="/p.yaml")
    handler = service.restart_handler(profile)
    restart_step, ready = handler.steps
    assert restart_step.on_machine == ("docker" in restart)
    assert ready.progress and ready.timeout == 180
    assert ready.on_machine == ("docker" in restart)             # beside the container, to see it die
    request = json.loads(ready.stdin or b"")
    assert request.get("container") == restart.get("docker")
    assert request["url"] == "http://127.0.0.1:8190" and request["timeout"] == 120
    assert request["nodes"] == [LOADER, "NunchakuTextEncoderLoaderV2"]
    assert request["alive"] == (["systemctl", "is-active", "comfyui"] if "systemd" in restart else None)
    assert request["root"] == ("/opt/ComfyUI" if "command" in restart else None)
    assert request["log"] == (["journalctl", "-u", "comfyui", "-n", "80", "-o", "cat", "--no-pager"]
                              if "systemd" in restart else None)
    assert [(d.argv, d.on_machine) for d in handler.diagnose] == ([log] if log else [])
    with_file = build_profile({"comfyui": {"root": "/opt/ComfyUI", "restart": restart,
                                           "log_file": "/var/log/comfyui.log"}}, name="p", file="/p.yaml")
    (tail,) = service.restart_handler(with_file).diagnose
    assert tail.argv == ("tail", "-n", "40", "/var/log/comfyui.log") and not tail.on_machine


def test_family_nodes_false_waits_only_for_the_listed_and_the_workflow_nodes() -> None:
    """A model-free smoke workflow on a host without the backend: the family's loader is not waited for."""
    data = {"comfyui": {"root": "/opt/ComfyUI", "restart": {"systemd": "comfyui"}},
            "verify": {"family_nodes": False, "required_nodes": ["ImageInvert"]}}
    profile = build_profile(data, name="p", file="/p.yaml")
    assert [n.name for n in service.required_nodes(profile)] == ["ImageInvert"]
    _, ready = service.restart_handler(profile).steps
    assert json.loads(ready.stdin or b"")["nodes"] == ["ImageInvert"]
    default = build_profile({"comfyui": data["comfyui"]}, name="p", file="/p.yaml")
    assert [n.name for n in service.required_nodes(default)] == [LOADER]


CRASH = ["Traceback (most recent call last):", '  File "/opt/ComfyUI/main.py", line 147, in <module>',
         "    import execution", "ModuleNotFoundError: No module named 'av'"]
BROKEN_PACK = ["Traceback (most recent call last):", '  File "/opt/ComfyUI/nodes.py", line 2131, in load_custom_node',
               "ImportError: cannot import name 'x'",
               "Cannot import /opt/ComfyUI/custom_nodes/broken module for custom nodes: cannot import name 'x'"]


def test_a_restart_commands_comfyui_that_exits_ends_the_wait_with_its_logs_exception(tmp_path: Path) -> None:
    """No service manager: ComfyUI's python process (its cwd the checkout) is seen, then gone; the
    reason is the last exception line of comfyui.log_file, never "raise ready_timeout_s"."""
    root, log = tmp_path / "ComfyUI", tmp_path / "comfyui.log"
    root.mkdir()
    log.write_text("an older run\n")
    script = f"import time; time.sleep(2); open({str(log)!r}, 'a').write('starting\\n')"
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root)
    began = time.monotonic()
    try:
        done = wait(free_port(), timeout=300, root=str(root), log_file=str(log))
    finally:
        proc.wait()
    assert done.returncode == 2 and time.monotonic() - began < 30
    assert done.stderr.strip().endswith(f"(its process (pid {proc.pid}) exited)")
    assert "raise comfyui.ready_timeout_s" not in done.stderr


def test_a_new_traceback_at_the_end_of_the_log_ends_the_wait_and_a_broken_pack_does_not(tmp_path: Path) -> None:
    log = tmp_path / "comfyui.log"
    log.write_text("\n".join(CRASH) + "\n")            # an old crash: not this start's
    threading.Timer(1.0, lambda: log.write_text("\n".join(BROKEN_PACK) + "\n")).start()
    quiet = wait(free_port(), timeout=4, log_file=str(log))
    assert quiet.returncode == 1 and "did not answer within 4 s" in quiet.stderr
    threading.Timer(1.0, lambda: log.write_text("Total VRAM 24 GiB\n" + "\n".join(CRASH) + "\n")).start()
    dead = wait(free_port(), timeout=300, log_file=str(log))
    assert dead.returncode == 2
    assert dead.stderr.strip().startswith("ComfyUI died during start-up after ")
    assert dead.stderr.strip().endswith(f": ModuleNotFoundError: No module named 'av' (its log {log} ends in a traceback)")


def test_a_dead_unit_names_the_exception_its_journal_ends_with(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    journal.write_text("\n".join(["Started comfyui.", *CRASH, "comfyui.service: Main process exited, code=exited"]))
    dead = wait(free_port(), timeout=300, alive=(sys.executable, "-c", "print('failed')"), dead=("failed",),
                log=("cat", str(journal)))
    assert dead.returncode == 2
    assert ": ModuleNotFoundError: No module named 'av' (" in dead.stderr


def test_a_crash_before_the_first_look_is_found_in_the_log_when_nothing_of_comfyui_runs(tmp_path: Path) -> None:
    root, log = tmp_path / "ComfyUI", tmp_path / "comfyui.log"
    root.mkdir()
    log.write_text("\n".join(CRASH) + "\n")
    began = time.monotonic()
    dead = wait(free_port(), timeout=300, root=str(root), log_file=str(log))
    assert dead.returncode == 2 and time.monotonic() - began < 30
    assert "No module named 'av'" in dead.stderr


def docker_host(tmp_path: Path, state: str | None, log: list[str]) -> tuple[Path, dict[str, str]]:
    """The docker stand-in on PATH with container `c` (`state`: what `docker inspect` says of it)."""
    containers, bin_dir = tmp_path / "containers", tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    install_docker_standin(bin_dir, containers, {"c": None})
    if state:
        (containers / "c" / "state").write_text(state + "\n")
    (containers / "c" / "log").write_text("\n".join(log) + "\n")
    return containers / "c", {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


def test_a_container_that_exits_ends_the_wait_with_the_exception_of_its_log(tmp_path: Path) -> None:
    """The wait runs inside the container (`docker exec`); beside it, `docker inspect` says the
    container exited: the reason is its log's last exception line, within seconds."""
    container, env = docker_host(tmp_path, None, ["To see the GUI go to: http://127.0.0.1:8188"])

    def crash() -> None:
        (container / "log").write_text("\n".join(["Total VRAM 24 GiB", *CRASH]) + "\n")
        (container / "state").write_text("exited 1 0 2026-12-07T12:00:00Z\n")
    threading.Timer(1.5, crash).start()
    began = time.monotonic()
    dead = wait(free_port(), timeout=300, container="c", env=env)
    assert dead.returncode == 2 and time.monotonic() - began < 30
    assert dead.stderr.strip().startswith("ComfyUI died during start-up after ")
    assert dead.stderr.strip().endswith(": ModuleNotFoundError: No module named 'av' (container c exited with code 1)")
    assert progress(dead.stdout)[0].startswith("waiting for ComfyUI at 127.0.0.1:")   # said inside, shown here


def test_a_container_dead_before_the_wait_and_one_its_policy_restarts(tmp_path: Path) -> None:
    """An argument ComfyUI refuses prints no traceback: its log's last line is the reason."""
    refused = ["usage: main.py [-h] [--listen [IP]]", "main.py: error: unrecognized arguments: --bogus"]
    _, env = docker_host(tmp_path / "a", "exited 2 0 2026-12-07T12:00:00Z", refused)
    dead = wait(free_port(), timeout=300, container="c", env=env)
    assert dead.returncode == 2
    assert dead.stderr.strip().endswith(": main.py: error: unrecognized arguments: --bogus (container c exited "
                                        "with code 2)")
    _, env = docker_host(tmp_path / "b", "restarting 1 3 2026-12-07T12:00:00Z", CRASH)
    dead = wait(free_port(), timeout=300, container="c", env=env)
    assert dead.returncode == 2 and "its restart policy restarted it" in dead.stderr


def test_a_running_container_is_waited_for_inside(tmp_path: Path) -> None:
    _, env = docker_host(tmp_path, None, [])
    srv = start_comfyui(root=tmp_path / "root")
    try:
        done = wait(srv.port, container="c", env=env)
    finally:
        srv.stop()
    assert done.returncode == 0, done.stderr
    assert progress(done.stdout)[-1].startswith("ComfyUI answers after ")


def test_the_wait_inside_ends_when_the_one_beside_the_container_is_killed(tmp_path: Path) -> None:
    """`docker exec` leaves what it runs going when its client is killed: the wait inside ends
    when its stdin does (the supervisor stops the one beside it when the controller goes)."""
    _, env = docker_host(tmp_path, None, [])
    request = remote.ready_request(url=f"http://127.0.0.1:{free_port()}", nodes=(LOADER,), timeout=300,
                                   container="c")
    outer = subprocess.Popen(list(remote.argv("ready", python=sys.executable)), stdin=subprocess.PIPE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    outer.stdin.write(request)                                   # type: ignore[union-attr]
    outer.stdin.close()                                          # type: ignore[union-attr]

    def waiting_inside() -> list[int]:
        """The wait the stand-in `docker exec` runs (it execs the command itself)."""
        found = []
        for pid in descendants(outer.pid):
            try:
                if b"-c\0" + remote.source("ready").encode()[:40] in Path(f"/proc/{pid}/cmdline").read_bytes():
                    found.append(pid)
            except OSError:
                pass                    # gone since it was listed
        return found
    seen: list[int] = []

    def one_waiting_inside() -> bool:
        """Exactly one: a process it forks shares its command line until that one execs."""
        seen[:] = waiting_inside()
        return len(seen) == 1
    try:
        wait_until(one_waiting_inside, 20)
        (inner,) = seen
    finally:
        outer.kill()
        outer.wait()
    wait_until(lambda: not Path(f"/proc/{inner}").exists() or Path(f"/proc/{inner}/stat").read_text().split()[2] == "Z",
               10)
