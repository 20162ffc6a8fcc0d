"""Shapes shared by every resource: steps (what to do), changes (why, and before/after), handlers.

A resource is pure: `probe(profile)` says what the facts script must look at, and
`plan(profile, facts)` returns the Changes that would converge the host, or nothing when it is
already there, and the handlers its changes may notify. Neither touches the host;
`plan/apply.py` executes the steps.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from provisioner.config.model import Profile
from provisioner.facts.model import Facts, Probe


@dataclass(frozen=True)
class Run:
    """Run an argv on the host. `stdin` carries secrets and payloads (never argv: `ps` shows it)."""

    argv: tuple[str, ...]
    stdin: bytes | None = None
    what: str = ""                   # one-line description for the console and the log
    timeout: float | None = None
    on_machine: bool = False         # on the machine itself, beside ComfyUI's container, not in it
    progress: bool = False           # stdout lines {"progress": TEXT} are shown as they come
    answer: str = ""                 # keep its last stdout line (JSON) in the outcome under this name
    system: bool = False             # needs root (a unit, systemctl): runs as the become user


@dataclass(frozen=True)
class Put:
    """Write small content (a rendered workflow) to a host path atomically, making its folder
    first when it is missing (every connection's put does: no step of its own)."""

    dest: str
    content: bytes
    mode: int = 0o644
    what: str = ""
    system: bool = False             # needs root (a unit file): written as the become user


@dataclass(frozen=True)
class Push:
    """Copy a file of the control machine to the host atomically (a wheel from a local wheelhouse)."""

    src: str
    dest: str
    sha256: str | None = None
    what: str = ""


@dataclass(frozen=True)
class Fetch:
    """The host downloads a URL itself: resumable (`dest.part` + Range), checksum-verified, renamed
    into place only when complete, and recorded in the host's checksum cache."""

    url: str
    dest: str
    sha256: str | None = None
    size: int | None = None
    token_env: str | None = None     # control-machine env var holding a bearer token, sent on stdin
    cache: str = ""                  # the host's checksum cache the verified sha256 is recorded in
    what: str = ""
    quantization: tuple[str, int] | None = None   # (weight dtype, rank) a model's header must declare


Step = Run | Put | Push | Fetch

Action = Literal["create", "update", "replace", "remove"]


@dataclass(frozen=True)
class Change:
    """One difference between the profile and a host, and the steps that remove it."""

    resource: str                    # "plugin", "backend", "packages", "model", "workflow"
    key: str                         # what inside the resource: a path, a distribution name
    action: Action
    summary: str                     # one line: "checkout ComfyUI-nunchaku v1.0.0 -> v1.1.0"
    before: Mapping[str, object] | str | None
    after: Mapping[str, object] | str | None   # str: text shown as a unified diff (workflow JSON)
    steps: tuple[Step, ...]
    notify: frozenset[str] = frozenset()        # handlers to run once at the end ("restart-comfyui")
    warnings: tuple[str, ...] = ()
    # A dry run of the change, run at plan time (pip's `--dry-run --report`): plan/preview.py puts
    # what it would do into before/after and `data`. Only changes that install into the venv have one.
    preview: Run | None = None
    data: Mapping[str, object] = field(default_factory=dict)   # what the preview found: {"pip": {name: [old, new]}}
    # The installed distributions (canonical names) it replaces or removes: the snapshot before the
    # changes keeps their wheels, so a rollback does not depend on what their sources still serve.
    replaces: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Note:
    """Something the plan should say that is not a change (VRAM needs offload, data would be lost)."""

    resource: str
    message: str
    level: Literal["info", "warning"] = "warning"


@dataclass(frozen=True)
class Handler:
    """Work done once, after the changes, when any applied change notified it by `name`.

    `missing` says why it cannot run on this host (no steps): the apply warns instead.
    `diagnose` runs only when a step failed: its output (a service's last log lines) is shown
    and kept with the failure, so the failure says why, not only that. `on_failure` runs after it:
    what leaves the host quiet (a unit this apply installed, whose first start failed, is stopped
    and disabled rather than left restarting every few seconds); its steps' `what` says so.
    """

    name: str
    what: str                        # "restart ComfyUI (docker restart comfyui-qwen)"
    steps: tuple[Step, ...] = ()
    missing: str = ""
    diagnose: tuple[Run, ...] = ()
    on_failure: tuple[Run, ...] = ()


@dataclass(frozen=True)
class ResourcePlan:
    """`prelude` runs once under the lock before the first change, and an apply whose prelude fails
    changes nothing; `postlude` runs once after the changes were confirmed. Neither runs when
    nothing differs."""

    changes: tuple[Change, ...] = ()
    notes: tuple[Note, ...] = ()
    handlers: tuple[Handler, ...] = ()
    prelude: tuple[Step, ...] = ()
    postlude: tuple[Step, ...] = ()


class Resource(Protocol):
    name: str

    def probe(self, profile: Profile) -> Probe: ...

    def plan(self, profile: Profile, facts: Facts) -> ResourcePlan:
        """Pure: compare desired with facts. Raises `PlanError` when the host cannot be converged."""
        ...


# How every pip install on a host starts: no version check (hosts are often offline), and no scan
# of the whole venv for conflicts once installed, a fifth of an install's CPU whose warning went
# nowhere (a step's output is shown only when it fails; the plan made again to confirm the apply
# judges what the venv must hold).
PIP_INSTALL = ("install", "--disable-pip-version-check", "--no-warn-conflicts")


def pip_install(python: str, *args: str) -> tuple[str, ...]:
    """`python -m pip install ...` as every pip install on a host starts (`PIP_INSTALL`)."""
    return (python, "-m", "pip", *PIP_INSTALL, *args)


def changes(*items: Change | None, notes: Sequence[Note] = (),
            handlers: Sequence[Handler] = ()) -> ResourcePlan:
    """Build a ResourcePlan from optional changes (None = already converged)."""
    return ResourcePlan(tuple(c for c in items if c is not None), tuple(notes), tuple(handlers))


def size_text(nbytes: int) -> str:
    """12.1 GB, 524.5 MB: model files range from a VAE of hundreds of MB to a DiT of 12 GB."""
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"


def resumable(facts: Facts, dest: str, size: int | None) -> int:
    """Bytes of `dest` an interrupted download left in `dest.part` (stat-probed), which the fetch
    program resumes from: 0 when there is none or it is longer than the file."""
    part = facts.files.get(dest + ".part")
    return part.size if part and part.exists and size is not None and part.size <= size else 0


RESTART_COMFYUI = "restart-comfyui"
RESTART = frozenset({RESTART_COMFYUI})   # what a change that ComfyUI must reload notifies
