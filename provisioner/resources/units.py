"""The ComfyUI instances of a host and the systemd unit each runs as (pure: no host I/O).

One instance normally; with `comfyui.instances: per-gpu` one per GPU, each seeing only its GPU
(CUDA_VISIBLE_DEVICES by UUID: CUDA numbers GPUs fastest first, nvidia-smi by PCI bus, a UUID is
the same for both) on its own port (`comfyui.port` + its position), all sharing one checkout, venv
and models. `instance_profile` is the profile as one instance sees it: what the restart wait, the
verification and the report of that instance read.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from provisioner.config.model import Profile
from provisioner.config.semantic import unit_path_problems
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Gpu, Listener

HEADER = "# Written by provision"          # the first words of every unit provision writes
MAX_GPUS = 16                              # ports probed above comfyui.port for per-gpu instances
SUFFIX = ".service"


@dataclass(frozen=True)
class Instance:
    label: str | None                      # "gpu0" for per-gpu instances, None for the only one
    unit: str                              # "comfyui", "comfyui-gpu0"
    port: int
    gpu: Gpu | None                        # the GPU it is given (CUDA_VISIBLE_DEVICES); None: no GPU read

    @property
    def unit_file(self) -> str:
        return self.unit + SUFFIX


def instances(profile: Profile, facts: Facts) -> tuple[Instance, ...]:
    spec = profile.comfyui
    if spec.instances != "per-gpu":
        return (Instance(None, spec.unit, spec.port, facts.gpu),)
    if not facts.gpus:
        raise PlanError(f"comfyui.instances per-gpu runs one ComfyUI per GPU, but this host's GPUs could not be "
                        f"read ({facts.gpu_error}): fix nvidia-smi, or use instances: single")
    gpus = sorted(facts.gpus, key=lambda g: g.index)[:MAX_GPUS]
    return tuple(Instance(f"gpu{g.index}", f"{spec.unit}-gpu{g.index}", spec.port + i, g) for i, g in enumerate(gpus))


def instance_profile(profile: Profile, instance: Instance) -> Profile:
    """The profile as this instance sees it: its port, its unit, its GPU."""
    spec = profile.comfyui
    gpu = instance.gpu.uuid if instance.gpu is not None and instance.gpu.uuid else spec.gpu
    return replace(profile, comfyui=replace(spec, port=instance.port, unit=instance.unit, gpu=gpu,
                                            instances="single"))


def ports(profile: Profile) -> tuple[int, ...]:
    """The ports the facts program looks at: the instance's, or every per-gpu instance's possible one."""
    spec = profile.comfyui
    count = MAX_GPUS if spec.instances == "per-gpu" else 1
    return tuple(p for p in range(spec.port, spec.port + count) if p <= 65535)


def patterns(profile: Profile) -> tuple[str, str]:
    """Globs of the unit files provision may have written for this profile (to find stale ones too)."""
    unit = profile.comfyui.unit
    return unit + SUFFIX, f"{unit}-gpu*{SUFFIX}"


# -- the unit file ------------------------------------------------------------------------------

_PLAIN = re.compile(r"^[A-Za-z0-9_@+=:,./-]+$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _specifiers(text: str) -> str:
    """systemd expands `%x` specifiers in these settings: a literal % is written %%."""
    return text.replace("%", "%%")


def _word(text: str) -> str:
    """One word as systemd's unquoting reads it back: bare when plain, else in double quotes with
    C escapes (a backslash, a quote, a trailing backslash all come back as written)."""
    if _PLAIN.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_arg(arg: str) -> str:
    """One argument of ExecStart: `%` and `$` literal (systemd expands `$NAME` in arguments)."""
    return _word(_specifiers(arg).replace("$", "$$"))


def quote_path(path: str) -> str:
    """A path of a path-list setting (ReadWritePaths=): quoted and `%` literal, but `$` as written:
    systemd expands variables only in command lines, so a `$$` here would stay two."""
    return _word(_specifiers(path))


def quote_exec(path: str) -> str:
    """ExecStart's executable: systemd expands no variable there (a `$$` would stay two), and refuses
    one named with a quote or a backslash, which the profile's validation refuses first."""
    return _word(_specifiers(path))


def _assignment(name: str, value: str) -> str:
    """An Environment= word: systemd expands no variable in it."""
    return _word(_specifiers(f"{name}={value}"))


def _line(text: str) -> str:
    """A free-text setting (Description=) on one line: a control character or a trailing
    backslash would end it early or join the next line to it."""
    return _CONTROL.sub(" ", text).rstrip("\\ ")


def argv(profile: Profile, instance: Instance) -> tuple[str, ...]:
    """The command the unit runs: the venv's python, main.py, where it listens, the profile's extras."""
    spec = profile.comfyui
    return (spec.python, posixpath.join(spec.root, "main.py"), "--listen", spec.listen, "--port",
            str(instance.port), *spec.args)


def environment(instance: Instance) -> tuple[tuple[str, str], ...]:
    env: list[tuple[str, str]] = [("PYTHONUNBUFFERED", "1")]     # its log reaches the journal as it writes it
    if instance.gpu is not None and instance.gpu.uuid:
        env.append(("CUDA_VISIBLE_DEVICES", instance.gpu.uuid))
    return tuple(env)


@dataclass(frozen=True)
class RunAs:
    """Whom the unit runs ComfyUI as: `group` None leaves it to the user's primary group."""

    user: str
    group: str | None = None


def run_as(profile: Profile, facts: Facts) -> RunAs:
    """`comfyui.user`, else the owner of the root (else the login, which will create it); root only
    where the profile allows it: ComfyUI runs every custom node's code and accepts uploads."""
    spec, login = profile.comfyui, facts.login
    if spec.user:
        who = RunAs(spec.user, login.root_group if spec.user == login.root_owner else None)
    elif login.root_owner:
        who = RunAs(login.root_owner, login.root_group)
    else:
        who = RunAs(login.user or "root")
    if who.user == "root" and not spec.allow_root:
        whose = "comfyui.user" if spec.user else f"the owner of {spec.root}"
        raise PlanError(f"comfyui.service systemd would run ComfyUI as root ({whose}), and with it every custom "
                        f"node and upload: give ComfyUI a user of its own (comfyui.user, owning {spec.root}), "
                        "or set comfyui.allow_root: true")
    return who


def writable_paths(profile: Profile) -> tuple[str, ...]:
    """What ComfyUI may write under ProtectSystem=strict: its root, and its output, input, user and
    models folders and its venv where they lie elsewhere (a link to another disk; `-`: may be absent)."""
    spec = profile.comfyui
    inside = tuple(posixpath.join(spec.root, d) for d in ("output", "input", "user", "models"))
    venv = () if spec.venv.startswith(spec.root.rstrip("/") + "/") else (spec.venv,)
    return (spec.root, *(f"-{p}" for p in inside), *venv)


def hardening(profile: Profile, instance: Instance, who: RunAs) -> list[str]:
    """The [Service] lines that keep ComfyUI to itself: its own user, no privilege gained, the
    system read-only but for its own folders, its own /tmp, home folders read-only, and a cache of
    its own (torch, triton and the Hub write to ~/.cache: read-only under ProtectHome)."""
    cache = f"/var/cache/{instance.unit}"
    return [
        _specifiers(f"User={who.user}"),
        *([_specifiers(f"Group={who.group}")] if who.group else []),
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=" + " ".join(quote_path(p) for p in writable_paths(profile)),
        "PrivateTmp=yes",
        "ProtectHome=read-only",
        f"CacheDirectory={instance.unit}",
        f"Environment={_assignment('XDG_CACHE_HOME', cache)} {_assignment('TRITON_CACHE_DIR', cache + '/triton')}",
    ]


def render(profile: Profile, instance: Instance, who: RunAs) -> str:
    """The unit file. Restart=on-failure brings a crashed ComfyUI back; the restart wait tells such a
    death during start-up from a start-up (its SubState is `auto-restart`, not `running`). `who`:
    `run_as`, which refuses root unless the profile allows it."""
    spec = profile.comfyui
    problems = [f"comfyui.{key[-1]} {message}" for key, message, _ in unit_path_problems(spec.root, spec.venv)]
    if problems:
        raise PlanError(f"{problems[0]} (fix the profile)")
    where = f"port {instance.port}"
    if instance.gpu is not None:
        where += f", GPU {instance.gpu.index} {instance.gpu.name}"
    lines = [
        _line(f"{HEADER} for ComfyUI at {spec.root}: the next apply rewrites it; change the profile instead."),
        "[Unit]",
        _line(_specifiers(f"Description=ComfyUI at {spec.root} ({where})")),
        "Wants=network-online.target",
        "After=network-online.target",
        "",
        "[Service]",
        "Type=simple",
        *hardening(profile, instance, who),
        _specifiers(f"WorkingDirectory={spec.root}"),
        *(f"Environment={_assignment(k, v)}" for k, v in environment(instance)),
        "ExecStart=" + " ".join([quote_exec(spec.python), *(quote_arg(a) for a in argv(profile, instance)[1:])]),
        "Restart=on-failure",
        "RestartSec=5",
        "TimeoutStopSec=30",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


# The settings of a unit `render` writes, by (section, key): those with a fixed value, those checked
# against the host (`recorded_problem`), and those free to differ between runs (launch arguments,
# paths, environment: whatever they say runs as ComfyUI's user). Nothing else.
_FIXED = {("Unit", "Wants"): "network-online.target", ("Unit", "After"): "network-online.target",
          ("Service", "Type"): "simple", ("Service", "NoNewPrivileges"): "yes",
          ("Service", "ProtectSystem"): "strict", ("Service", "PrivateTmp"): "yes",
          ("Service", "ProtectHome"): "read-only", ("Service", "Restart"): "on-failure",
          ("Service", "RestartSec"): "5", ("Service", "TimeoutStopSec"): "30",
          ("Install", "WantedBy"): "multi-user.target"}
_CHECKED = {("Service", "User"), ("Service", "Group"), ("Service", "CacheDirectory"), ("Service", "ExecStart")}
_FREE = {("Unit", "Description"), ("Service", "ReadWritePaths"), ("Service", "WorkingDirectory"),
         ("Service", "Environment")}
_EXEC_PREFIXES = "@-:+!|"                  # ExecStart= prefixes that change how (and as whom) it runs


def recorded_problem(text: str, unit_file: str, who: RunAs | None, allow_root: bool) -> str | None:
    """Why a unit text a snapshot recorded is not one `render` writes, or None. A rollback writes it
    back as root and systemd runs it: an edited one could otherwise run anything as root (no
    `User=`, `User=root`, another user, `ExecStart=+…`, `ExecStartPre=`, a `CacheDirectory=` of
    another program's). `who`: whom the unit must run ComfyUI as on this host (None: not known, then
    only never root unless allowed)."""
    lines = text.split("\n")
    if not lines[0].startswith(HEADER):
        return "it does not start with provision's header"
    section, seen = "", {}                 # type: ignore[var-annotated]
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if raw.rstrip().endswith("\\"):
            return f"line {number} ends in a backslash (systemd joins the next line to it)"
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, eq, value = (part.strip() for part in line.partition("="))
        if not eq or ((section, key) not in _FIXED and (section, key) not in _CHECKED and (section, key) not in _FREE):
            return f"line {number} ({line[:60]!r}) is no setting provision writes"
        seen.setdefault((section, key), []).append(value)
    for where, values in seen.items():
        if len(values) > 1 and where != ("Service", "Environment"):
            return f"{where[1]}= is set {len(values)} times"
    for where, value in _FIXED.items():
        if seen.get(where) != [value]:
            return f"{where[1]}= is not {value}"
    user, group = (seen.get(("Service", k), [None])[0] for k in ("User", "Group"))
    if user is None:
        return "it has no User= (systemd would run ComfyUI as root)"
    if who is not None and (user != _specifiers(who.user) or group not in (None, _specifiers(who.group or ""))):
        return f"it runs ComfyUI as {user}{':' + group if group else ''}, not as {who.user} (whom the unit runs it as here)"
    if not allow_root and ({user, group} & {"root", "0"}):
        return "it runs ComfyUI as root, which comfyui.allow_root does not allow"
    if seen.get(("Service", "CacheDirectory")) != [unit_file.removesuffix(SUFFIX)]:
        return f"CacheDirectory= is not {unit_file.removesuffix(SUFFIX)}"
    start = seen.get(("Service", "ExecStart"), [""])[0]
    if not start.startswith(("/", '"/')) or start[0] in _EXEC_PREFIXES:
        return "ExecStart= does not start with an absolute executable"
    return None


def path(profile: Profile, instance: Instance) -> str:
    return posixpath.join(profile.comfyui.unit_dir, instance.unit_file)


# -- who listens --------------------------------------------------------------------------------

def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def loopback(address: str) -> bool:
    ip = _ip(address)
    return address == "localhost" if ip is None else ip.is_loopback


def exposed(profile: Profile, facts: Facts, port: int) -> tuple[Listener, ...]:
    """The sockets on `port` reachable from other machines while the profile says loopback."""
    if not loopback(profile.comfyui.listen):
        return ()
    return tuple(x for x in facts.listeners.get(port, ()) if not loopback(x.address))


def describe(listeners: Sequence[Listener]) -> str:
    """`0.0.0.0 (every address; pid 812: python main.py --listen 0.0.0.0)`."""
    out = []
    for x in listeners:
        ip = _ip(x.address)
        what = ("an address" if ip is None else "every address" if ip.is_unspecified else "loopback"
                if ip.is_loopback else "a public address" if ip.is_global else "a network address")
        who = (f"; pid {x.pid}" + (f": {' '.join(x.cmdline)[:160]}" if x.cmdline else "")) if x.pid else ""
        out.append(f"{x.address} ({what}{who})")
    return ", ".join(out)
