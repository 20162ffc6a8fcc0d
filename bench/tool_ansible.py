"""Ansible's side of the bench: the same desired state as a playbook, with ansible-core's fastest settings.

No fact gathering, pipelining (a module runs in one exec, no temp file upload), ControlPersist (one
TCP+auth handshake per host, later tasks multiplex over it), forks = the host count. Every measured
run starts without control masters: each invocation pays its own handshakes, as provision's does.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from bench.hosts import ToolFleet
from bench.measure import tool_environ
from bench.state import BACKEND_PIN, PACKAGES, PLUGIN_DIR, TEMPLATE, TEMPLATE_DIR, WORKFLOW_JSON, DesiredState
from bench.venvs import tool_venv

PLAYBOOK = """\
- hosts: all
  gather_facts: false
  tasks:
    - name: plugin checkout at its tag
      ansible.builtin.git:
        repo: "file://{{ plugin_repo }}"
        dest: "{{ comfy_root }}/%(plugin_dir)s"
        version: "{{ plugin_tag }}"
    - name: backend wheel (pinned, no deps)
      ansible.builtin.pip:
        name: ["%(backend)s"]
        virtualenv: "{{ comfy_root }}/venv"
        extra_args: "--no-index --find-links {{ backend_dir }} --no-deps"
    - name: pinned packages from the wheelhouse
      ansible.builtin.pip:
        name: "{{ packages }}"
        virtualenv: "{{ comfy_root }}/venv"
        extra_args: "--no-index --find-links {{ wheelhouse }}"
    - name: model files, sha256-checked
      ansible.builtin.get_url:
        url: "{{ item.url }}"
        dest: "{{ comfy_root }}/{{ item.dest }}"
        checksum: "sha256:{{ item.sha256 }}"
      loop: "{{ models }}"
      loop_control: {label: "{{ item.dest }}"}
    - name: workflow folder
      ansible.builtin.file:
        path: "{{ comfy_root }}/workflows"
        state: directory
    - name: workflow JSON from the Jinja2 template
      ansible.builtin.template:
        src: "%(template)s"
        dest: "{{ comfy_root }}/%(workflow)s"
"""



def ansible_cfg(forks: int, ssh_config: Path, known_hosts: Path, control_dir: Path) -> str:
    """Ansible at its fastest: no facts, pipelining, one ControlPersist master per host."""
    return "\n".join([
        "[defaults]", "inventory = inventory.json", f"forks = {forks}",
        "gathering = explicit", "host_key_checking = True", "retry_files_enabled = False",
        "interpreter_python = /usr/bin/python3", "deprecation_warnings = False",
        "[ssh_connection]", "pipelining = True",
        f"ssh_args = -F {ssh_config} -o UserKnownHostsFile={known_hosts} "
        "-o ControlMaster=auto -o ControlPersist=60s",
        f"control_path = {control_dir}/%%C", "",
    ])


def ansible_env(work: Path) -> dict[str, str]:
    return tool_environ(ANSIBLE_CONFIG=str(work / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
                        ANSIBLE_HOME=str(work / "home"), ANSIBLE_LOCAL_TEMP=str(work / "tmp"))


def close_masters(hosts: list[str], ssh_config: Path, control_dir: Path) -> None:
    """Close the control masters a previous run left, so the next run pays its own connections."""
    for name in hosts:
        subprocess.run(["ssh", "-F", str(ssh_config), "-o", f"ControlPath={control_dir}/%C", "-O", "exit", name],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class AnsibleTool:
    name = "ansible"

    def __init__(self, fleet: ToolFleet, work: Path) -> None:
        self.fleet, self.work = fleet, work
        self.venv = tool_venv("ansible")
        work.mkdir(parents=True, exist_ok=True)
        self.control_dir = work / "cp"
        self.control_dir.mkdir(exist_ok=True)
        self.playbook = work / "site.yml"
        self.playbook.write_text(PLAYBOOK % {
            "plugin_dir": PLUGIN_DIR, "backend": BACKEND_PIN, "workflow": WORKFLOW_JSON,
            "template": TEMPLATE_DIR / TEMPLATE})
        ssh = fleet.fleet
        inventory = {"all": {"hosts": {h.name: {"comfy_root": str(h.sandbox.comfyui_root)}
                                       for h in fleet.hosts}}}
        (work / "inventory.json").write_text(json.dumps(inventory))  # JSON is YAML
        (work / "ansible.cfg").write_text(ansible_cfg(len(fleet.hosts), ssh.ssh_config, ssh.known_hosts,
                                                      self.control_dir))

    def write(self, state: DesiredState) -> None:
        values = {
            "plugin_repo": str(state.plugin_repo), "plugin_tag": state.plugin_tag,
            "wheelhouse": str(state.wheelhouse), "backend_dir": str(state.backend_dir),
            "packages": list(PACKAGES),
            "models": [{"url": m.url, "dest": m.dest, "sha256": m.sha256} for m in state.models],
            **state.template_vars(),
        }
        (self.work / "state.json").write_text(json.dumps(values, indent=1))

    def _argv(self, *extra: str) -> list[str]:
        return [str(self.venv / "bin" / "ansible-playbook"), "-e", "@state.json", "site.yml", *extra]

    def apply_argv(self) -> list[str]:
        return self._argv()

    def plan_argv(self) -> list[str]:
        return self._argv("--check", "--diff")

    def env(self) -> dict[str, str]:
        return ansible_env(self.work)

    def before_run(self) -> None:
        close_masters([h.name for h in self.fleet.hosts], self.fleet.fleet.ssh_config, self.control_dir)

    def ok(self, verb: str, code: int) -> bool:
        return code == 0

    def snapshot_share(self) -> float | None:
        """It takes no snapshots."""
        return None
