"""ComfyUI as a running service: the handler that restarts it so it loads what changed and waits
until it is ready, the log that says why when it is not, and the node classes it must register.

The handler belongs here, not in the engine: the engine runs whatever handlers the changes
notify, and knows nothing of ComfyUI, systemd or Docker.
"""

from __future__ import annotations

from provisioner import remote
from provisioner.catalog import models as catalog
from provisioner.catalog.models import NodeRequirement
from provisioner.config.model import Profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Probe
from provisioner.resources.base import RESTART_COMFYUI, Handler, ResourcePlan, Run, changes

name = "service"

LOG_LINES = 40
READY_MARGIN_S = 60.0     # the ready program times itself out; this only guards a lost channel


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


def required_nodes(profile: Profile) -> tuple[NodeRequirement, ...]:
    """What ComfyUI must register: the model family's loader (with the inputs the workflows set)
    unless `verify.family_nodes` is false, then the profile's `verify.required_nodes`."""
    family = profile.model.family
    family_nodes = catalog.required_nodes(family) if family and profile.verify.family_nodes else ()
    known = {n.name for n in family_nodes}
    return family_nodes + tuple(NodeRequirement(n, plugin=False) for n in profile.verify.required_nodes
                          if n not in known)


def log_step(profile: Profile, lines: int = LOG_LINES) -> Run | None:
    """How to read ComfyUI's last log lines: the profile's log file, else its systemd unit's
    journal or its container's log (both on the machine itself); None when nothing says where."""
    spec = profile.comfyui
    restart = spec.restart
    if spec.log_file:
        return Run(("tail", "-n", str(lines), spec.log_file), what=f"tail -n {lines} {spec.log_file}",
                   timeout=30)
    if restart and restart.systemd:
        argv = ("journalctl", "-u", restart.systemd, "-n", str(lines), "--no-pager")
        return Run(argv, what=" ".join(argv), timeout=30, on_machine=True)
    if restart and restart.docker:
        # ComfyUI writes to both streams; 2>&1 keeps its lines in the order it wrote them.
        return Run(("sh", "-c", 'exec docker logs --tail "$1" "$2" 2>&1', "sh", str(lines), restart.docker),
                   what=f"docker logs --tail {lines} {restart.docker}", timeout=30, on_machine=True)
    return None


def ready_step(profile: Profile) -> Run:
    """Wait, on the host, until ComfyUI answers and lists the required nodes. Under systemd a unit
    that failed ends the wait at once; in a container the wait dies with the container."""
    spec = profile.comfyui
    restart = spec.restart
    alive: tuple[str, ...] = ("systemctl", "is-active", restart.systemd) if restart and restart.systemd else ()
    request = remote.ready_request(url=spec.local_url, nodes=[n.name for n in required_nodes(profile)],
                                   timeout=spec.ready_timeout_s, alive=alive,
                                   dead=("failed", "inactive") if alive else ())
    return Run(remote.argv("ready"), stdin=request, progress=True,
               what=f"wait until ComfyUI at {spec.local_host}:{spec.port} is ready",
               timeout=spec.ready_timeout_s + READY_MARGIN_S)


def restart_handler(profile: Profile) -> Handler:
    """Restart ComfyUI once, by the profile's means (`docker restart` runs beside the container),
    then wait until it is ready; when either fails, its log says why."""
    argv = restart_argv(profile)
    if not argv:
        return Handler(RESTART_COMFYUI, "restart ComfyUI",
                       missing="ComfyUI must be restarted to load the changes (no comfyui.restart in "
                               "the profile)")
    restart = profile.comfyui.restart
    on_machine = bool(restart and restart.docker)
    log = log_step(profile)
    return Handler(RESTART_COMFYUI, f"restarted ComfyUI ({' '.join(argv)})",
                   (Run(argv, what=f"restart ComfyUI: {' '.join(argv)}", on_machine=on_machine,
                        timeout=profile.timeouts.restart_s),
                    ready_step(profile)),
                   diagnose=(log,) if log else ())


def plan(profile: Profile, facts: Facts) -> ResourcePlan:
    chosen = profile.comfyui.gpu
    if chosen is not None and facts.gpus and facts.gpu is None:
        listed = "; ".join(f"{g.index}: {g.name} {g.uuid}" for g in facts.gpus)
        raise PlanError(f"comfyui.gpu {chosen!r} is not a GPU of this host (nvidia-smi lists {listed}); "
                        "give one of those UUIDs")
    return changes(handlers=[restart_handler(profile)])
