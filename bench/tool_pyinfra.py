"""pyinfra's side of the bench: the same desired state as a deploy file; `--no-wait`, parallel = hosts."""

from __future__ import annotations

import json
from pathlib import Path

from bench.hosts import ToolFleet
from bench.measure import tool_environ
from bench.state import BACKEND_PIN, PACKAGES, PLUGIN_DIR, TEMPLATE, TEMPLATE_DIR, WORKFLOW_JSON, DesiredState
from bench.venvs import tool_venv

DEPLOY = """\
import json

from pyinfra import host
from pyinfra.operations import files, git, pip

state = json.load(open(%(state)r))
root = host.data.comfy_root
venv = root + "/venv"

git.repo(name="plugin checkout at its tag", src="file://" + state["plugin_repo"],
         dest=root + "/%(plugin_dir)s", branch=state["plugin_tag"], pull=False)
pip.packages(name="backend wheel (pinned, no deps)", packages=[%(backend)r], virtualenv=venv,
             extra_install_args="--no-index --find-links " + state["backend_dir"] + " --no-deps")
pip.packages(name="pinned packages from the wheelhouse", packages=state["packages"], virtualenv=venv,
             extra_install_args="--no-index --find-links " + state["wheelhouse"])
for model in state["models"]:
    files.download(name="model file " + model["dest"], src=model["url"],
                   dest=root + "/" + model["dest"], sha256sum=model["sha256"])
files.directory(name="workflow folder", path=root + "/workflows")
files.template(name="workflow JSON from the Jinja2 template", src=%(template)r,
               dest=root + "/%(workflow)s", **state["template_vars"])
"""


class PyinfraTool:
    name = "pyinfra"

    def __init__(self, fleet: ToolFleet, work: Path) -> None:
        self.fleet, self.work = fleet, work
        self.venv = tool_venv("pyinfra")
        work.mkdir(parents=True, exist_ok=True)
        self.state_file = work / "state.json"
        (work / "deploy.py").write_text(DEPLOY % {
            "state": str(self.state_file), "plugin_dir": PLUGIN_DIR, "backend": BACKEND_PIN,
            "template": str(TEMPLATE_DIR / TEMPLATE), "workflow": WORKFLOW_JSON})
        ssh = fleet.fleet
        hosts = [(h.name, {"ssh_hostname": "127.0.0.1", "ssh_port": h.sshd.port, "ssh_user": h.sshd.user,
                           "ssh_key": str(ssh.client_key), "ssh_known_hosts_file": str(ssh.known_hosts),
                           "ssh_strict_host_key_checking": "yes", "ssh_allow_agent": False,
                           "ssh_look_for_keys": False, "comfy_root": str(h.sandbox.comfyui_root)})
                 for h in fleet.hosts]
        (work / "inventory.py").write_text(f"hosts = {hosts!r}\n")

    def write(self, state: DesiredState) -> None:
        values = {
            "plugin_repo": str(state.plugin_repo), "plugin_tag": state.plugin_tag,
            "wheelhouse": str(state.wheelhouse), "backend_dir": str(state.backend_dir),
            "packages": list(PACKAGES),
            "models": [{"url": m.url, "dest": m.dest, "sha256": m.sha256} for m in state.models],
            "template_vars": state.template_vars(),
        }
        self.state_file.write_text(json.dumps(values, indent=1))

    def _argv(self, *extra: str) -> list[str]:
        return [str(self.venv / "bin" / "pyinfra"), "inventory.py", "deploy.py", "--no-wait",
                "--parallel", str(len(self.fleet.hosts)), *extra]

    def apply_argv(self) -> list[str]:
        return self._argv("-y")   # -y: execute at once (without it, pyinfra asks first)

    def plan_argv(self) -> list[str]:
        return self._argv("--dry", "--diff")   # without -y: change detection, then stop

    def env(self) -> dict[str, str]:
        return tool_environ(PYINFRA_PROGRESS="off", NO_COLOR="1")

    def before_run(self) -> None:
        """Nothing to reset: pyinfra opens its connections (paramiko) in each run."""

    def ok(self, verb: str, code: int) -> bool:
        return code == 0

    def snapshot_share(self) -> float | None:
        """It takes no snapshots."""
        return None
