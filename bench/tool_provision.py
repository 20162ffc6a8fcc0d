"""provision's side of the bench: a profile (the desired state) and an inventory of the sshd hosts."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from bench.hosts import REPO, ToolFleet
from bench.measure import tool_environ
from bench.state import FAMILY, PACKAGES, TEMPLATE, TEMPLATE_DIR, VARIANT, DesiredState
from provisioner.sandbox.world import BACKEND_VERSION, write_yaml


# A step's description in provision's JSON-lines log (plan/render.describe_step) -> what it is part of.
STEP_KINDS = (("snapshot", re.compile(r"^snapshot ")), ("pip", re.compile(r"^pip ")),
              ("download", re.compile(r"^download ")),
              ("restart", re.compile(r"^(restart|wait until)")),
              ("git", re.compile(r"^(clone|checkout|move the checkout|remove a clone)")))


def step_kind(step: str) -> str:
    return next((name for name, pattern in STEP_KINDS if pattern.search(step)), "other")


def log_records(log_dir: Path, since: dict[str, int] | None = None) -> list[dict]:
    """Every host's JSON-lines records, from the byte offsets in `since` (its log sizes) on."""
    records = []
    for path in sorted(log_dir.glob("*.jsonl")):
        with open(path, "rb") as f:
            f.seek((since or {}).get(path.name, 0))
            records += [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
    return records


def log_sizes(log_dir: Path) -> dict[str, int]:
    return {path.name: path.stat().st_size for path in log_dir.glob("*.jsonl")}


class ProvisionTool:
    name = "provision"

    def __init__(self, fleet: ToolFleet, work: Path, backend_repo_url: str) -> None:
        self.fleet, self.work, self.backend_repo_url = fleet, work, backend_repo_url
        self.profile = work / "profile.yaml"
        self.logs = work / "logs"
        self._marks: dict[str, int] = {}
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
        return self._argv("apply", "--no-verify", "--log-dir", str(self.logs))

    def plan_argv(self) -> list[str]:
        return self._argv("plan")

    def env(self) -> dict[str, str]:
        return tool_environ(PYTHONPATH=str(REPO), NO_COLOR="1")

    def before_run(self) -> None:
        """Nothing to reset (every provision run opens its own connections): mark where its logs end."""
        self._marks = log_sizes(self.logs)

    def snapshot_share(self) -> float | None:
        """The snapshots' seconds over the apply's (every host's, summed) in the last run's logs;
        None when it took none (a no-op)."""
        records = log_records(self.logs, self._marks)
        snapshots = sum(r.get("seconds", 0.0) for r in records
                        if r.get("event") == "step" and step_kind(r.get("step", "")) == "snapshot")
        applied = sum(r.get("seconds", 0.0) for r in records if r.get("event") == "done")
        return snapshots / applied if snapshots and applied else None

    def ok(self, verb: str, code: int) -> bool:
        return code in (0, 2)
