"""ComfyUI as a running service: the handler that restarts it so it loads what changed.

The handler belongs here, not in the engine: the engine runs whatever handlers the changes
notify, and knows nothing of ComfyUI, systemd or Docker.
"""

from __future__ import annotations

from provisioner.config.model import Profile
from provisioner.facts.model import Facts, Probe
from provisioner.resources.base import RESTART_COMFYUI, Handler, ResourcePlan, Run, changes

name = "service"


def probe(profile: Profile) -> Probe:
    return Probe()


def restart_argv(profile: Profile) -> tuple[str, ...] | None:
    restart = profile.comfyui.restart
    if restart is None:
        return None
    if restart.systemd:
        return ("systemctl", "restart", restart.systemd)
    if restart.docker:
        return ("docker", "restart", restart.docker)
    return restart.command or None


def restart_handler(profile: Profile) -> Handler:
    """Restart ComfyUI once, by the profile's means; `docker restart` runs beside the container."""
    argv = restart_argv(profile)
    if not argv:
        return Handler(RESTART_COMFYUI, "restart ComfyUI",
                       missing="ComfyUI must be restarted to load the changes (no comfyui.restart in "
                               "the profile)")
    restart = profile.comfyui.restart
    on_machine = bool(restart and restart.docker)
    return Handler(RESTART_COMFYUI, f"restarted ComfyUI ({' '.join(argv)})",
                   (Run(argv, what=f"restart ComfyUI: {' '.join(argv)}", on_machine=on_machine),))


def plan(profile: Profile, facts: Facts) -> ResourcePlan:
    return changes(handlers=[restart_handler(profile)])
