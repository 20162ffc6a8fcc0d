"""The upgrade wave: one plugin tag move on N converged hosts, each verified by a generation.

provision: `apply --verify-gate` (the move, the restart and the wait until ready, then `verify`
with one generation, `verify.warm_runs: 0`, and a rollback of any host it fails). Ansible and
pyinfra: the same tag move (git), ComfyUI's restart when it moved, then one HTTP generation per
host through ComfyUI's API (queue the host's workflow, poll its history until the image is there),
as a user of either would check an upgrade. Every tool has its own N lab hosts (sshd, a stand-in
ComfyUI running, converged by provision beforehand); the tools take turns, and each run moves the
tag to the other one (v1.0.2, then back), so every run is one change.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run alone: `bench`, `provisioner` and the tests' harness importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from bench.cases import failure_lines  # noqa: E402
from bench.hosts import REPO, ToolFleet  # noqa: E402,F401 - puts tests/ on sys.path for lab
from bench.measure import median, run_timed, tool_environ  # noqa: E402
from bench.state import PLUGIN_DIR  # noqa: E402
from bench.tool_ansible import ansible_cfg, ansible_env, close_masters  # noqa: E402
from bench.venvs import tool_venv  # noqa: E402
from lab import Lab, LabHost, open_lab  # noqa: E402

TAGS = ("v1.0.2", "v1.1.0")           # to, then back (v1.1.0 is the base profile's)
WORKFLOW = "workflows/qwen-image-lightning.json"   # the text-to-image one the lab's profile writes

# One generation through ComfyUI's API, run on the host: queue the workflow once ComfyUI answers
# (it was just restarted), then poll the prompt's history until its outputs are there.
GENERATE = """\
import json, sys, time, urllib.request as u
base, workflow = "http://127.0.0.1:" + sys.argv[1], json.load(open(sys.argv[2]))
deadline = time.time() + 600
while True:
    try:
        answer = u.urlopen(u.Request(base + "/prompt", data=json.dumps({"prompt": workflow}).encode(),
                                     headers={"Content-Type": "application/json"}), timeout=10)
        break
    except OSError:
        if time.time() > deadline:
            raise
        time.sleep(0.1)
prompt = json.load(answer)["prompt_id"]
while not json.load(u.urlopen(base + "/history/" + prompt, timeout=10)).get(prompt, {}).get("outputs"):
    if time.time() > deadline:
        raise SystemExit("no image in time")
    time.sleep(0.1)
"""

PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: plugin checkout at its tag
      ansible.builtin.git:
        repo: "file://{{ plugin_repo }}"
        dest: "{{ comfy_root }}/%(plugin_dir)s"
        version: "{{ plugin_tag }}"
      register: plugin
    - name: restart ComfyUI
      ansible.builtin.command:
        argv: "{{ restart }}"
      when: plugin is changed
    - name: one generation through ComfyUI's API
      ansible.builtin.command:
        argv: ["python3", "%(generate)s", "{{ comfy_port }}", "{{ comfy_root }}/%(workflow)s"]
"""

DEPLOY = """\
import json, shlex

from pyinfra import host
from pyinfra.operations import git, server

state = json.load(open(%(state)r))
root = host.data.comfy_root
moved = git.repo(name="plugin checkout at its tag", src="file://" + state["plugin_repo"],
                 dest=root + "/%(plugin_dir)s", branch=state["plugin_tag"], pull=False)
server.shell(name="restart ComfyUI", commands=[shlex.join(host.data.restart)], _if=moved.did_change)
server.shell(name="one generation through ComfyUI's API",
             commands=[shlex.join(["python3", %(generate)r, str(host.data.comfy_port), root + "/%(workflow)s"])])
"""


def _restart(host: LabHost) -> list[str]:
    return list(host.provision_vars()["comfyui"]["restart"]["command"])


class Provision:
    name = "provision"

    def __init__(self, lab: Lab, hosts: list[LabHost], work: Path) -> None:
        self.lab, self.hosts, self.work = lab, hosts, work
        work.mkdir(parents=True, exist_ok=True)

    def move(self, tag: str) -> list[str]:
        self.lab.profile_extra.update(plugin={"tag": tag},   # one generation, as the peers check
                                      verify={"warm_runs": 0, "thresholds": {"warm_seconds": None}})
        self.lab.write()
        return [sys.executable, "-m", "provisioner", "apply", str(self.lab.profile), *self.lab.ssh_args(),
                "--no-color", "--limit", ",".join(h.name for h in self.hosts), "--forks", str(len(self.hosts)),
                "--verify-gate", "--log-dir", str(self.work / "logs")]

    def env(self) -> dict[str, str]:
        return tool_environ(NO_COLOR="1")

    def ok(self, code: int) -> bool:
        return code == 2


class Ansible:
    name = "ansible"

    def __init__(self, lab: Lab, hosts: list[LabHost], work: Path) -> None:
        self.work, self.lab, self.hosts = work, lab, hosts
        self.venv = tool_venv("ansible")
        work.mkdir(parents=True, exist_ok=True)
        (work / "generate.py").write_text(GENERATE)
        (work / "site.yml").write_text(PLAYBOOK % {"plugin_dir": PLUGIN_DIR, "workflow": WORKFLOW,
                                                   "generate": work / "generate.py"})
        inventory = {"all": {"hosts": {h.name: {"comfy_root": str(h.comfy), "comfy_port": h.port,
                                                "restart": _restart(h)} for h in hosts}}}
        (work / "inventory.json").write_text(json.dumps(inventory))
        (work / "cp").mkdir(exist_ok=True)
        ssh = lab.fleet
        (work / "ansible.cfg").write_text(ansible_cfg(len(hosts), ssh.ssh_config, ssh.known_hosts, work / "cp"))

    def move(self, tag: str) -> list[str]:
        # each run pays its own connections, as provision's does
        close_masters([h.name for h in self.hosts], self.lab.fleet.ssh_config, self.work / "cp")
        (self.work / "state.json").write_text(json.dumps({"plugin_repo": str(self.lab.world.plugin_repo),
                                                          "plugin_tag": tag}))
        return [str(self.venv / "bin" / "ansible-playbook"), "-e", "@state.json", "site.yml"]

    def env(self) -> dict[str, str]:
        return ansible_env(self.work)

    def ok(self, code: int) -> bool:
        return code == 0


class Pyinfra:
    name = "pyinfra"

    def __init__(self, lab: Lab, hosts: list[LabHost], work: Path) -> None:
        self.work, self.lab, self.hosts = work, lab, hosts
        self.venv = tool_venv("pyinfra")
        work.mkdir(parents=True, exist_ok=True)
        (work / "generate.py").write_text(GENERATE)
        (work / "deploy.py").write_text(DEPLOY % {"state": str(work / "state.json"), "plugin_dir": PLUGIN_DIR,
                                                  "workflow": WORKFLOW, "generate": str(work / "generate.py")})
        ssh = lab.fleet
        inventory = [(h.name, {"ssh_hostname": "127.0.0.1", "ssh_port": h.sshd.port, "ssh_user": h.sshd.user,
                               "ssh_key": str(ssh.client_key), "ssh_known_hosts_file": str(ssh.known_hosts),
                               "ssh_strict_host_key_checking": "yes", "ssh_allow_agent": False,
                               "ssh_look_for_keys": False, "comfy_root": str(h.comfy), "comfy_port": h.port,
                               "restart": _restart(h)})
                     for h in hosts]
        (work / "inventory.py").write_text(f"hosts = {inventory!r}\n")

    def move(self, tag: str) -> list[str]:
        (self.work / "state.json").write_text(json.dumps({"plugin_repo": str(self.lab.world.plugin_repo),
                                                          "plugin_tag": tag}))
        return [str(self.venv / "bin" / "pyinfra"), "inventory.py", "deploy.py", "--no-wait",
                "--parallel", str(len(self.hosts)), "-y"]

    def env(self) -> dict[str, str]:
        return tool_environ(PYINFRA_PROGRESS="off", NO_COLOR="1")

    def ok(self, code: int) -> bool:
        return code == 0


TOOLS = {"provision": Provision, "ansible": Ansible, "pyinfra": Pyinfra}


def measure(root: Path, hosts: int, runs: int, tools: list[str]) -> dict[str, Any]:
    """Median seconds per tool of `runs` tag moves on `hosts` hosts each."""
    with open_lab(root / "lab") as lab:
        fleets = {name: lab.add(hosts) for name in tools}
        code, out = lab.run("apply", "--no-verify", "--forks", str(hosts * len(tools)))
        if code != 2:
            raise RuntimeError(f"converging the wave's hosts failed (exit {code}):\n{out[-3000:]}")
        made = [TOOLS[name](lab, fleets[name], root / name) for name in tools]
        seconds: dict[str, list[float]] = {name: [] for name in tools}
        failures: dict[str, list[str]] = {name: [] for name in tools}
        for i in range(runs):
            tag = TAGS[i % 2]
            for tool in made:
                sample = run_timed(tool.move(tag), cwd=root / tool.name, env=tool.env())
                seconds[tool.name].append(sample.seconds)
                if not tool.ok(sample.returncode):
                    failures[tool.name].append(f"exit {sample.returncode}")
                    print(f"  ! {tool.name} wave failed (exit {sample.returncode}):\n{failure_lines(sample.output)}",
                          file=sys.stderr)
                print(f"  wave     {tool.name:9} {sample.seconds:7.2f} s  -> {tag}", file=sys.stderr, flush=True)
    return {"hosts": hosts, "runs": runs, "seconds": seconds, "failures": failures,
            "median_s": {name: median(values) for name, values in seconds.items()}}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="provision-bench-wave-") as tmp:
        started = time.monotonic()
        print(json.dumps(measure(Path(tmp), int(sys.argv[1]) if len(sys.argv) > 1 else 10, 2,
                                 sys.argv[2].split(",") if len(sys.argv) > 2 else list(TOOLS)), indent=1))
        print(f"{time.monotonic() - started:.0f} s", file=sys.stderr)
