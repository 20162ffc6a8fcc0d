"""What a host runs, as `remote/snapshot.py` records it: typed snapshots, and the host's stored
snapshots (and its state now) read back in one round trip."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from provisioner import remote
from provisioner.config import bounded
from provisioner.config.model import Profile
from provisioner.connection.base import Connection
from provisioner.errors import FactsError
from provisioner.facts import snapshot_check

READ_TIMEOUT_S = 180.0      # the venv's interpreter lists its distributions; git reads each checkout


@dataclass(frozen=True)
class Checkout:
    """A folder's git state; `repo` False: a plain folder (its files are not recorded), or another
    user's checkout (`owner`, its uid), which the host's git never reads."""

    repo: bool
    commit: str | None = None
    remote: str | None = None
    tags: tuple[str, ...] = ()
    dirty: tuple[str, ...] = ()                  # modified and untracked files (tracked only for the core)
    owner: int | None = None


@dataclass(frozen=True)
class Dist:
    """One distribution of the venv; `kind`: index, file (a wheel or archive file), url, dir or vcs."""

    name: str
    version: str
    kind: str = "index"
    url: str | None = None
    sha256: str | None = None                    # pip's record of the file it installed

    @property
    def path(self) -> str | None:
        """The file a `file` distribution was installed from, on the host."""
        if self.kind != "file" or not self.url:
            return None
        return unquote(urlsplit(self.url).path)

    @property
    def shown(self) -> str:
        where = posixpath.basename(self.path) if self.path else self.url
        return f"{self.version} ({self.kind} {where})" if self.kind != "index" else self.version


@dataclass(frozen=True)
class ModelFile:
    size: int
    sha256: str | None = None                    # from the checksum cache; None: never hashed


@dataclass(frozen=True)
class WorkflowFile:
    text: str | None = None                      # the content; None when too big or not text
    sha256: str | None = None
    size: int = 0


@dataclass(frozen=True)
class HostState:
    """What a host runs. `distributions` is None when the venv could not be read (`venv_error`)."""

    comfyui: Checkout | None
    comfyui_version: str | None
    custom_nodes: Mapping[str, Checkout | None]
    distributions: Mapping[str, Dist] | None
    models: Mapping[str, ModelFile]
    workflows: Mapping[str, Mapping[str, WorkflowFile] | None]   # folder -> its files, None: absent
    venv_error: str | None = None
    units: Mapping[str, str] | None = None       # unit file -> its text; None: not recorded (no systemd unit)


@dataclass(frozen=True)
class Snapshot:
    id: str
    time: str                                    # ISO 8601 UTC
    taken: str                                   # "before apply", "after apply", "before rollback", ...
    state: HostState
    profile: str | None = None                   # the name of the profile of the run that took it
    profile_data: Mapping[str, Any] | None = field(default=None, compare=False, repr=False)
    wheels: Mapping[str, str] = field(default_factory=dict)   # canonical name -> kept file, absolute
    unkept: Mapping[str, str] = field(default_factory=dict)   # canonical name -> why it was not kept
    # canonical name -> the pip source arguments an index distribution was installed with (None:
    # a snapshot older than that record)
    sources: Mapping[str, tuple[str, ...]] | None = field(default=None, compare=False)
    confirmed: bool | None = None                # a run confirmed the state it records (None: not recorded)
    verified: bool | None = None                 # its verification passed (None: none ran, or not recorded)


@dataclass(frozen=True)
class HostSnapshots:
    """A host's snapshots, oldest first, and what it runs now (when asked)."""

    host: str
    snapshots: tuple[Snapshot, ...]
    now: HostState | None = None
    errors: tuple[str, ...] = ()                 # files in the folder that are no readable snapshot
    kept: Mapping[str, str] | None = None        # kept wheel file (absolute) -> its sha256 now, when asked

    def find(self, ident: str) -> Snapshot | None:
        """The snapshot of this id, or the only one it is the start of."""
        exact = [s for s in self.snapshots if s.id == ident]
        starts = [s for s in self.snapshots if s.id.startswith(ident)]
        return exact[0] if exact else starts[0] if len(starts) == 1 else None


def folder(profile: Profile) -> str:
    return posixpath.join(profile.comfyui.state_dir, "snapshots")


def _checkout(raw: Any) -> Checkout | None:
    if not isinstance(raw, Mapping):
        return None
    owner = raw.get("owner")
    return Checkout(bool(raw.get("repo")), raw.get("commit"), raw.get("remote"), tuple(raw.get("tags") or ()),
                    tuple(raw.get("dirty") or ()), owner if isinstance(owner, int) else None)


def parse_state(raw: Mapping[str, Any]) -> HostState:
    dists = raw.get("distributions")
    return HostState(
        comfyui=_checkout(raw.get("comfyui")),
        comfyui_version=raw.get("comfyui_version"),
        custom_nodes={name: _checkout(c) for name, c in (raw.get("custom_nodes") or {}).items()},
        distributions=None if dists is None else {
            key: Dist(d["name"], d["version"], d.get("kind", "index"), d.get("url"), d.get("sha256"))
            for key, d in dists.items()},
        models={path: ModelFile(int(m.get("size", 0)), m.get("sha256")) for path, m in (raw.get("models") or {}).items()},
        workflows={f: None if files is None else {
            name: WorkflowFile(w.get("text"), w.get("sha256"), int(w.get("size", 0))) for name, w in files.items()}
            for f, files in (raw.get("workflows") or {}).items()},
        venv_error=raw.get("venv_error"),
        units=None if not isinstance(raw.get("units"), Mapping) else {
            str(k): str(v) for k, v in raw["units"].items()},
    )


def parse_snapshot(raw: Mapping[str, Any], where: str) -> Snapshot:
    profile: Mapping[str, Any] = raw["profile"] if isinstance(raw.get("profile"), Mapping) else {}
    return Snapshot(
        id=str(raw["id"]), time=str(raw.get("time", "")), taken=str(raw.get("taken", "")),
        state=parse_state(raw.get("state") or {}),
        profile=profile.get("name"), profile_data=profile.get("data"),
        wheels={k: posixpath.join(where, v) for k, v in (raw.get("wheels") or {}).items()},
        unkept=dict(raw.get("unkept") or {}),
        confirmed=raw["confirmed"] if isinstance(raw.get("confirmed"), bool) else None,
        verified=raw["verified"] if isinstance(raw.get("verified"), bool) else None,
        sources=None if not isinstance(raw.get("sources"), Mapping) else {
            str(k): tuple(str(a) for a in v) for k, v in raw["sources"].items() if isinstance(v, list)},
    )


def read_snapshots(conn: Connection, profile: Profile, *, now: bool = False, check_wheels: bool = False,
                   units: tuple[str, tuple[str, ...]] | None = None) -> HostSnapshots:
    """One exec: every snapshot stored on the host and, with `now`, what it runs now (with `units`,
    (folder, name globs), its unit files too); with `check_wheels`, the sha256 of every kept wheel
    as the host reads it now. Each stored snapshot is checked first (`snapshot_check`): one that is
    not what provision wrote, or names a path outside its place, is listed with the reason among
    `errors`, never planned from."""
    where = folder(profile)
    spec = profile.comfyui
    request = remote.snapshot_request(mode="read", folder=where, root=spec.root, python=spec.python,
                                      checksums=spec.checksums, workflow_dirs=workflow_dirs(profile), now=now,
                                      check_wheels=check_wheels, units=units)
    result = conn.run(remote.argv("snapshot"), stdin=request, timeout=READ_TIMEOUT_S, check=False)
    try:
        answer = bounded.loads(result.stdout.strip().splitlines()[-1])
        docs, errors = list(answer["snapshots"]), [str(e)[:300] for e in answer.get("errors") or ()]
        raw_now = answer.get("now")
        kept = None if answer.get("kept") is None else {
            posixpath.join(where, str(k)): str(v) for k, v in answer["kept"].items()}
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        lines = [x for x in result.stderr.splitlines() if x.strip()]
        why = lines[-1].strip() if lines else f"exit {result.exit_code}, no answer"
        raise FactsError(f"{conn.name}: could not read the snapshots in {where}: {why}") from None
    places = snapshot_check.Places.of(profile)
    snapshots = []
    for doc in docs:
        why = snapshot_check.problem(doc, places)
        if why is None:
            snapshots.append(parse_snapshot(doc, where))
        else:
            name = doc.get("id") if isinstance(doc, Mapping) and isinstance(doc.get("id"), str) else "a snapshot"
            errors.append(f"{name[:40]}.json: {why} (edited on the host? it is not used)")
    state = None
    if raw_now is not None:
        why = snapshot_check.state_problem(raw_now, places)
        if why is not None:
            raise FactsError(f"{conn.name}: what the host runs now cannot be read safely: {why}")
        state = parse_state(raw_now)
    return HostSnapshots(conn.name, tuple(snapshots), state, tuple(errors), kept)


def workflow_dirs(profile: Profile) -> tuple[str, ...]:
    """The workflow folder this profile writes into (the snapshot program adds the folders that
    earlier snapshots recorded)."""
    return (posixpath.normpath(posixpath.join(profile.comfyui.root, profile.workflow.dest)),)
