"""ComfyUI as a running service: under `comfyui.service: systemd` the unit provision writes for each
instance (installed, enabled, running, listening where the profile says); for every kind of service,
the handler that restarts ComfyUI so it loads what changed and waits until each instance is ready,
the log that says why when it is not, and the node classes it must register.

The handler belongs here, not in the engine: the engine runs whatever handlers the changes
notify, and knows nothing of ComfyUI, systemd or Docker. The unit is written as root (a unit in
/etc/systemd/system and `systemctl` need it): those steps are marked `system`, and a login that is
not root runs them through `become` (ansible_become: sudo); a plan that needs them and cannot
become says so before any change.
"""

from __future__ import annotations

import fnmatch
import posixpath
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone

from provisioner import remote
from provisioner.catalog import models as catalog
from provisioner.catalog.models import NodeRequirement
from provisioner.config.model import Profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Probe, UnitFile, UnitState
from provisioner.resources import units
from provisioner.resources.base import (RESTART, RESTART_COMFYUI, Change, Handler, Note, Put, ResourcePlan,
                                        Run, Step, changes)
from provisioner.resources.units import Instance

name = "service"

LOG_LINES = 40
READY_MARGIN_S = 60.0     # the ready program times itself out; this only guards a lost channel
# A unit provision wrote that died during start-up: Restart=on-failure shows it as `auto-restart`.
DEAD_SUBSTATES = ("failed", "dead", "auto-restart")


def probe(profile: Profile) -> Probe:
    """Who listens on ComfyUI's port(s); under `service: systemd` the unit files provision may have
    written (stale ones too) and their state; for a unit it only restarts, that unit's state."""
    spec = profile.comfyui
    probe = Probe(ports=units.ports(profile))
    if spec.service == "systemd":
        return probe | Probe(unit_files=tuple((spec.unit_dir, g) for g in units.patterns(profile)))
    if spec.restart and spec.restart.systemd:
        return probe | Probe(units=(spec.restart.systemd,))
    return probe


def owned(profile: Profile) -> bool:
    """Does provision run ComfyUI as a unit of its own?"""
    return profile.comfyui.service == "systemd"


def restart_argv(profile: Profile) -> tuple[str, ...] | None:
    if owned(profile):
        return ("systemctl", "restart", profile.comfyui.unit)
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
    unit = spec.unit if owned(profile) else restart.systemd if restart else None
    if unit:
        argv = ("journalctl", "-u", unit, "-n", str(lines), "--no-pager")
        return Run(argv, what=" ".join(argv), timeout=30, on_machine=True, system=True)
    if restart and restart.docker:
        # ComfyUI writes to both streams; 2>&1 keeps its lines in the order it wrote them.
        return Run(("sh", "-c", 'exec docker logs --tail "$1" "$2" 2>&1', "sh", str(lines), restart.docker),
                   what=f"docker logs --tail {lines} {restart.docker}", timeout=30, on_machine=True)
    return None


def ready_step(profile: Profile) -> Run:
    """Wait, on the host, until ComfyUI answers and lists the required nodes. Under systemd a unit
    that failed ends the wait at once (one provision wrote: its SubState, as Restart=on-failure
    keeps it `activating`); in a container, once `docker inspect` says it exited; under a restart
    command, once ComfyUI's processes are gone; with `comfyui.log_file`, once it ends in a
    traceback. The log's last exception line is the reason then."""
    spec = profile.comfyui
    restart = spec.restart
    alive: tuple[str, ...] = ()
    dead: tuple[str, ...] = ()
    unit = spec.unit if owned(profile) else restart.systemd if restart else None
    if owned(profile):
        alive, dead = ("systemctl", "show", "--property=SubState", "--value", spec.unit), DEAD_SUBSTATES
    elif restart and restart.systemd:
        alive, dead = ("systemctl", "is-active", restart.systemd), ("failed", "inactive")
    # Where the reason is read when it died: the log file, else the unit's journal (messages alone).
    journal = ("journalctl", "-u", unit, "-n", str(2 * LOG_LINES), "-o", "cat", "--no-pager") if unit else ()
    # A command's restart has no manager to ask: ComfyUI's own processes, found by its checkout.
    command = bool(restart and restart.command) and not owned(profile)
    # A container's: the wait runs beside it (on the machine), to see it die, and inside it.
    container = restart.docker if restart and restart.docker and not owned(profile) else None
    request = remote.ready_request(url=spec.local_url, nodes=[n.name for n in required_nodes(profile)],
                                   timeout=spec.ready_timeout_s, alive=alive, dead=dead,
                                   root=spec.root if command else None, log_file=spec.log_file or None,
                                   log=() if spec.log_file else journal, container=container)
    return Run(remote.argv("ready"), stdin=request, progress=True, on_machine=bool(container),
               what=f"wait until ComfyUI at {spec.local_host}:{spec.port} is ready",
               timeout=spec.ready_timeout_s + READY_MARGIN_S)


def restart_handler(profile: Profile, instances: Sequence[Instance] = (), *, first: bool = False) -> Handler:
    """Restart ComfyUI once, by the profile's means (`docker restart` runs beside the container; every
    instance's unit in one `systemctl restart`), then wait until each instance is ready; when that
    fails, its log says why. `instances`: the host's (default: the profile's one). `first`: this
    apply installs the units; when they fail to start, they are stopped and disabled."""
    spec = profile.comfyui
    instances = tuple(instances) or (Instance(None, spec.unit, spec.port, None),)
    if owned(profile):
        each = [units.instance_profile(profile, i) for i in instances]
        every = ("systemctl", "restart", *(i.unit for i in instances))
        diagnose = tuple(step for p in each if (step := log_step(p)) is not None)
        names = " ".join(i.unit for i in instances)
        quiet = (Run(("systemctl", "disable", "--now", *(i.unit for i in instances)), on_machine=True, system=True, timeout=120.0,
                     what=f"stopped and disabled unit {names}: its first start failed (fix the cause, then "
                          "apply again)"),) if first else ()
        return Handler(RESTART_COMFYUI, f"restarted ComfyUI ({' '.join(every)})",
                       (Run(every, what=f"restart ComfyUI: {' '.join(every)}", on_machine=True, system=True),
                        *(ready_step(p) for p in each)), diagnose=diagnose, on_failure=quiet)
    argv = restart_argv(profile)
    if not argv:
        return Handler(RESTART_COMFYUI, "restart ComfyUI",
                       missing="ComfyUI must be restarted to load the changes (no comfyui.restart in "
                               "the profile)")
    restart = spec.restart
    on_machine = bool(restart and restart.docker)
    log = log_step(profile)
    return Handler(RESTART_COMFYUI, f"restarted ComfyUI ({' '.join(argv)})",
                   (Run(argv, what=f"restart ComfyUI: {' '.join(argv)}", on_machine=on_machine,
                        timeout=profile.timeouts.restart_s),
                    ready_step(profile)),
                   diagnose=(log,) if log else ())


def _systemctl(*args: str) -> Run:
    return Run(("systemctl", *args), what=f"systemctl {' '.join(args)}", on_machine=True, timeout=120.0,
               system=True)


def _unit_changes(profile: Profile, facts: Facts, instances: Sequence[Instance],
                  now: datetime | None) -> list[Change]:
    """Each instance's unit written as rendered, enabled, running, listening as the profile says;
    units provision wrote for instances there are no more (a GPU fewer, per-gpu back to single)
    stopped and removed."""
    spec = profile.comfyui
    if facts.units.error:
        raise PlanError(f"comfyui.service systemd: systemd does not answer on this host ({facts.units.error}); "
                        "run ComfyUI another way (comfyui.service null and comfyui.restart)")
    if facts.login.uid not in (None, 0) and facts.login.become is None:
        raise PlanError(f"comfyui.service systemd installs and controls ComfyUI's unit, which needs root, and "
                        f"{facts.login.user} cannot become root: {facts.login.become_error or 'ansible_become is off'}"
                        "; set ansible_become: true (sudo) in the inventory, or connect as root")
    if facts.login.become is None and not facts.units.writable.get(spec.unit_dir, True):
        raise PlanError(f"comfyui.service systemd writes its units into {spec.unit_dir}, which this login cannot "
                        "write: set ansible_become: true (sudo), or set comfyui.unit_dir")
    found: dict[str, UnitFile] = {f.name: f for pattern in units.patterns(profile)
                                  for f in facts.units.files.get((spec.unit_dir, pattern), ())}
    wanted = {i.unit_file for i in instances}
    stale = [f for n, f in sorted(found.items()) if n not in wanted and f.text.startswith(units.HEADER)]
    freed = {facts.units.state.get(f.name, UnitState()).main_pid for f in stale} - {0}
    out = [Change(name, f.path, "remove", f"stop and remove unit {f.name} (no such instance any more)",
                  {"unit": f.path}, None, (_systemctl("disable", "--now", f.name),
                                           Run(("rm", "-f", f.path), what=f"remove {f.path}", system=True),
                                           _systemctl("daemon-reload")))
           for f in stale]
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%d-%H%M%S")
    for instance in instances:
        out += _instance_changes(profile, facts, instance, found.get(instance.unit_file), freed, stamp)
    return out


def _instance_changes(profile: Profile, facts: Facts, instance: Instance, have: UnitFile | None,
                      freed: set[int], stamp: str) -> list[Change]:
    spec = profile.comfyui
    who = units.run_as(profile, facts)
    text, path = units.render(profile, instance, who), units.path(profile, instance)
    state = facts.units.state.get(instance.unit_file, UnitState())
    holders = facts.listeners.get(instance.port, ())
    foreign = [x for x in holders if x.pid and x.pid != state.main_pid and x.pid not in freed]
    if foreign:
        raise PlanError(f"port {instance.port} is held by {units.describe(foreign)}, not by unit {instance.unit}, "
                        f"which cannot start while it does: stop that process (or choose another comfyui.port)")
    exposed = units.exposed(profile, facts, instance.port)
    listens = f"; ComfyUI listens on {units.describe(exposed)}, the profile says {spec.listen}" if exposed else ""
    as_root = [x for x in holders if x.uid == 0] if who.user != "root" else []
    if as_root:
        listens += f"; ComfyUI runs as root ({units.describe(as_root)}), its unit says {who.user}"
    if have is None or have.text != text:
        steps: list[Step] = []
        warnings: list[str] = []
        if have is not None and not have.text.startswith(units.HEADER):
            backup = posixpath.join(spec.state_dir, "units", f"{instance.unit_file}.{stamp}")
            steps += [Run(("mkdir", "-p", posixpath.dirname(backup)), what="create the units backup folder",
                          on_machine=True),
                      # as the login (a unit file is world-readable): the copy under the root is its owner's
                      Run(("cp", "-p", path, backup), what=f"back up {path} to {backup}", on_machine=True)]
            warnings.append(f"{path} was not written by provision: it is replaced (a copy is kept at {backup})")
        steps += [Put(path, text.encode(), what=f"write {path}", system=True), _systemctl("daemon-reload"),
                  _systemctl("enable", instance.unit_file)]
        verb = "install" if have is None else "rewrite"
        return [Change(name, path, "create" if have is None else "update",
                       f"{verb} unit {instance.unit} ({path}){listens}", have.text if have else None, text,
                       tuple(steps), notify=RESTART, warnings=tuple(warnings))]
    out = []
    if state.enabled != "enabled":
        out.append(Change(name, path, "update", f"enable unit {instance.unit} (it is {state.enabled or 'unknown'})",
                          {"enabled": state.enabled}, {"enabled": "enabled"}, (_systemctl("enable", instance.unit_file),)))
    if as_root and not exposed:
        # The unit says User= as the profile does: what runs was started before it said so.
        out.append(Change(name, f"{path}:user", "update",
                          f"restart unit {instance.unit}: ComfyUI runs as root ({units.describe(as_root)}), its "
                          f"unit says {who.user}", {"user": "root"}, {"user": who.user},
                          (_systemctl("daemon-reload"),), notify=RESTART))
    if exposed:
        # The unit says --listen as the profile does: what listens was started before it said so.
        out.append(Change(name, f"{path}:listen", "update",
                          f"restart unit {instance.unit}: ComfyUI listens on {units.describe(exposed)}, its unit "
                          f"says {spec.listen}", {"listen": [x.address for x in exposed]}, {"listen": spec.listen},
                          (_systemctl("daemon-reload"),), notify=RESTART))
    elif state.active != "active":
        out.append(Change(name, f"{path}:running", "update",
                          f"start unit {instance.unit} (it is {state.active or 'not loaded'})",
                          {"active": state.active or None}, {"active": "active"}, (), notify=RESTART))
    return out


def _exposure_notes(profile: Profile, facts: Facts, instance: Instance) -> list[Note]:
    """ComfyUI exposed to the network by a service provision does not own: say what to fix."""
    found = units.exposed(profile, facts, instance.port)
    if not found:
        return []
    spec, restart = profile.comfyui, profile.comfyui.restart
    if restart and restart.systemd:
        state = facts.units.state.get(restart.systemd, UnitState())
        where = f"in unit {restart.systemd}" + (f" ({state.path})" if state.path else "")
    elif restart and restart.docker:
        where = f"in the command of container {restart.docker}"
    else:
        where = "where ComfyUI is started"
    return [Note(name, f"ComfyUI on port {instance.port} listens on {units.describe(found)}: anyone who reaches this "
                       f"host can use it, and the profile says {spec.listen}. provision does not own how it is "
                       f"started: set --listen {spec.listen} {where}, or set comfyui.service: systemd so that "
                       "provision writes and restarts the unit")]


def recorded_units(profile: Profile) -> tuple[str, tuple[str, ...]] | None:
    """Where snapshots read the units provision writes, (folder, name globs); None when it writes none."""
    return (profile.comfyui.unit_dir, units.patterns(profile)) if owned(profile) else None


def restore_units(profile: Profile, want: Mapping[str, str] | None,
                  have: Mapping[str, str] | None, facts: Facts | None = None) -> tuple[list[Change], list[Note]]:
    """The unit files as a snapshot recorded them (their launch arguments and environment): written
    back like `plan` writes them (then daemon-reload, enable), one it lacks disabled and removed;
    ComfyUI is restarted with them. Every path must be a unit file of `comfyui.unit_dir`, and every
    text one `units.render` writes, running ComfyUI as whom the unit runs it as on this host (with
    `facts`): it is written as root."""
    if want is None:
        notes = [Note(name, "the snapshot recorded no systemd units: the units are left as they are")] \
            if have else []
        return [], notes
    folder = profile.comfyui.unit_dir
    globs = units.patterns(profile)
    out: list[Change] = []
    for path in sorted(set(want) | set(have or {})):
        unit = posixpath.basename(path)
        if posixpath.dirname(path) != folder or not any(fnmatch.fnmatchcase(unit, g) for g in globs):
            raise PlanError(f"the snapshot names unit file {path!r}, which is not one of provision's units in "
                            f"{folder} ({', '.join(globs)}): it is not restored; --to an older snapshot, or remove it")
        text, now = want.get(path), (have or {}).get(path)
        if text == now:
            continue
        if text is not None:
            who = units.run_as(profile, facts) if facts is not None else None
            why = units.recorded_problem(text, unit, who, profile.comfyui.allow_root)
            if why is not None:
                raise PlanError(f"the snapshot's unit file {path} is not one provision writes ({why}; edited on "
                                "the host?): it is not restored; --to an older snapshot, or remove it")
        if text is None:
            out.append(Change(name, path, "remove", f"stop and remove unit {unit} (not in the snapshot)",
                              now, None, (_systemctl("disable", "--now", unit), Run(("rm", "-f", path),
                                          what=f"remove {path}", on_machine=True), _systemctl("daemon-reload"))))
            continue
        out.append(Change(name, path, "create" if now is None else "update",
                          f"{'install' if now is None else 'rewrite'} unit {unit} as in the snapshot", now, text,
                          (Put(path, text.encode(), what=f"write {path}"), _systemctl("daemon-reload"),
                           _systemctl("enable", unit)), notify=RESTART))
    return out, []


def plan(profile: Profile, facts: Facts, *, now: datetime | None = None) -> ResourcePlan:
    chosen = profile.comfyui.gpu
    if chosen is not None and facts.gpus and facts.gpu is None:
        listed = "; ".join(f"{g.index}: {g.name} {g.uuid}" for g in facts.gpus)
        raise PlanError(f"comfyui.gpu {chosen!r} is not a GPU of this host (nvidia-smi lists {listed}); "
                        "give one of those UUIDs")
    instances = units.instances(profile, facts)
    if owned(profile):
        found = {f.name for pattern in units.patterns(profile)
                 for f in facts.units.files.get((profile.comfyui.unit_dir, pattern), ())}
        first = not any(i.unit_file in found for i in instances)     # a bootstrap: no unit of ours yet
        return changes(*_unit_changes(profile, facts, instances, now),
                       handlers=[restart_handler(profile, instances, first=first)])
    handler = restart_handler(profile, instances)
    return changes(notes=_exposure_notes(profile, facts, instances[0]), handlers=[handler])
