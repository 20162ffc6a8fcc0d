"""provision's side of the bench: a profile (the desired state) and an inventory of the sshd hosts."""

from __future__ import annotations

import sys
from pathlib import Path

from bench.hosts import REPO, ToolFleet
from bench.measure import tool_environ
from bench.state import FAMILY, PACKAGES, TEMPLATE, TEMPLATE_DIR, VARIANT, DesiredState
from provisioner.sandbox.world import BACKEND_VERSION, write_yaml


class ProvisionTool:
    name = "provision"

    def __init__(self, fleet: ToolFleet, work: Path, backend_repo_url: str) -> None:
        self.fleet, self.work, self.backend_repo_url = fleet, work, backend_repo_url
        self.profile = work / "profile.yaml"
        self.inventory = work / "inventory.yaml"
        work.mkdir(parents=True, exist_ok=True)
        hosts = {h.name: {"provision": {"comfyui": {"root": str(h.sandbox.comfyui_root)}}}
                 for h in fleet.hosts}
        write_yaml(self.inventory, {"all": {"hosts": hosts}},
                   "Bench hosts: aliases of the fleet's ssh_config; each has its own ComfyUI root.")

    def write(self, state: DesiredState) -> None:
        profile = {
            "inventory": str(self.inventory),
            "hosts": "all",
            "comfyui": {"root": "/opt/ComfyUI", "venv": "venv"},   # the root comes from the inventory
            "plugin": {"repo": f"file://{state.plugin_repo}", "tag": state.plugin_tag},
            "backend": {"version": BACKEND_VERSION,
                        "sources": [{"github": self.backend_repo_url}]},
            "packages": list(PACKAGES),
            "pip": {"no_index": True, "find_links": [str(state.wheelhouse)]},
            "model": {"family": FAMILY, "variant": VARIANT, "precision": "auto"},
            "huggingface": {"endpoint": state.hub_endpoint},
            "workflow": {"template_dir": str(TEMPLATE_DIR), "templates": [TEMPLATE],
                         "seed": state.seed},
        }
        write_yaml(self.profile, profile, "The bench's desired state, as a provision profile.")

    def _argv(self, verb: str, *extra: str) -> list[str]:
        return [sys.executable, "-m", "provisioner", verb, str(self.profile),
                "--ssh-config", str(self.fleet.fleet.ssh_config),
                "--known-hosts", str(self.fleet.fleet.known_hosts),
                "--forks", str(len(self.fleet.hosts)), "--no-color", *extra]

    def apply_argv(self) -> list[str]:
        return self._argv("apply", "--no-verify", "--log-dir", str(self.work / "logs"))

    def plan_argv(self) -> list[str]:
        return self._argv("plan")

    def env(self) -> dict[str, str]:
        return tool_environ(PYTHONPATH=str(REPO), NO_COLOR="1")

    def before_run(self) -> None:
        """Nothing to reset: every provision run opens its own connections."""

    def ok(self, verb: str, code: int) -> bool:
        return code in (0, 2)
