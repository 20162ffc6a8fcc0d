"""Job slices and one fleet report.

AWX (job slicing) and `--limit` split a fleet into slices that run the same verification apart. A
slice run with `--references DIR` reads the GPU classes' references from DIR, never writes them,
and keeps in its report folder what the fleet's judgement needs (`SLICE_DIR/slice/`): every host's
entry as it stood before the fleet was judged (facts, checks, runs, fingerprint, rollout), the
images it kept for the comparison, and its profile's agreement floors. `provision report merge`
reads the slices and judges them as one run over every host would: the references (made from the
whole fleet when a class has none), image agreement, groups, drift and class-speed flags, the
comparison with the previous report; the same code as a single run, so the same judgements.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from provisioner.config.model import AgreementSpec, ClassSpeedSpec
from provisioner.errors import ProvisionError, UsageError
from provisioner.report.adapt import from_verification
from provisioner.report.files import write_atomic
from provisioner.report.model import HostEntry
from provisioner.report.references import Outcome, ReferenceStore, agree
from provisioner.verify.kept import KeyedImage
from provisioner.verify.checks import HostVerification

FOLDER, FILE, VERSION = "slice", "entries.json", 1


@dataclass(frozen=True)
class Slice:
    """What one slice (or a whole run) hands the fleet's judgement."""

    profile: str | None
    class_speed: ClassSpeedSpec
    entries: tuple[HostEntry, ...]                       # before the fleet's judgement
    images: Mapping[str, tuple[KeyedImage, ...]]         # host -> the images it kept
    agreement: Mapping[str, AgreementSpec]               # host -> its profile's floors


def judge(part: Slice, store: ReferenceStore | None, *, now: str,
          promote: str | None = None) -> tuple[list[HostEntry], Outcome]:
    """Every verified host's images against its class's references (`references.agree`), and its
    entry again with that check: what a run over exactly these hosts reports."""
    verified = {e.host: replace(HostVerification.from_json(e.verification), images=part.images.get(e.host, ()))
                for e in part.entries if e.verification is not None}
    outcome = agree(verified, store, part.agreement, now=now, promote=promote)
    entries = [e if e.host not in verified else
               replace(from_verification(e.host, e.facts, outcome.verifications[e.host], error=e.error,
                                         unreachable=e.status == "unreachable", rollout=e.rollout),
                       versions=e.versions)
               for e in part.entries]
    return entries, outcome


def write_slice(report_dir: str | os.PathLike[str], part: Slice) -> None:
    """`report_dir/slice/`: entries.json and images/HOST/KEY.png."""
    root = Path(report_dir) / FOLDER
    hosts = []
    try:
        for entry in part.entries:
            kept = []
            for image in part.images.get(entry.host, ()):
                name = f"images/{entry.host.replace('/', '_')}/{image.key}.png"
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                write_atomic(root / name, image.png)
                kept.append({"key": image.key, "prompt": image.prompt, "seed": image.seed, "file": name})
            spec = part.agreement.get(entry.host)
            hosts.append({**asdict(entry), "thumbnails": [], "images": kept,
                          "agreement": None if spec is None else asdict(spec)})
        document = {"version": VERSION, "profile": part.profile, "class_speed": asdict(part.class_speed),
                    "hosts": hosts}
        root.mkdir(parents=True, exist_ok=True)
        write_atomic(root / FILE, (json.dumps(document, indent=1, ensure_ascii=False) + "\n").encode())
    except OSError as err:
        raise ProvisionError(f"cannot write the slice to {root}: {err.strerror or err} "
                             "(choose a writable --report directory)") from None


def read_slices(dirs: Iterable[str | os.PathLike[str]]) -> Slice:
    """The slices' hosts as one; bad input (a folder that is no slice, a host in two slices, two
    profiles) is a UsageError naming the folder."""
    profile: str | None = None
    class_speed: ClassSpeedSpec | None = None
    entries: list[HostEntry] = []
    images: dict[str, tuple[KeyedImage, ...]] = {}
    floors: dict[str, AgreementSpec] = {}
    seen: dict[str, str] = {}
    for directory in dirs:
        root = Path(directory) / FOLDER
        document = _read(root / FILE, directory)
        if class_speed is None:
            profile, class_speed = document.get("profile"), ClassSpeedSpec(**document["class_speed"])
        elif document.get("profile") != profile or ClassSpeedSpec(**document["class_speed"]) != class_speed:
            raise UsageError(f"{directory}: a slice of profile {document.get('profile')!r}, the others are of "
                             f"{profile!r} (with the same verify.class_speed); merge the slices of one run")
        for raw in document["hosts"]:
            host = str(raw["host"])
            if host in seen:
                raise UsageError(f"{directory}: host {host!r} is in slice {seen[host]} too; slices are "
                                 "disjoint (--limit) parts of one fleet")
            seen[host] = str(directory)
            fields = {k: raw.get(k) for k in ("host", "status", "error", "facts", "versions", "verification",
                                              "rollout")}
            entries.append(HostEntry(**{**fields, "versions": fields["versions"] or {}}))
            images[host] = tuple(KeyedImage(str(i["key"]), str(i["prompt"]), int(i["seed"]),
                                            _png(root / str(i["file"]), directory)) for i in raw.get("images") or ())
            if raw.get("agreement"):
                floors[host] = AgreementSpec(**raw["agreement"])
    if class_speed is None:
        raise UsageError("report merge: no slice given; name the --report folders of the slices")
    return Slice(profile, class_speed, tuple(entries), images, floors)


def _read(path: Path, directory: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{directory}: no {FOLDER}/{FILE}; run each slice with --report DIR --references "
                         "SHARED_DIR so that it keeps what the merge judges") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UsageError(f"{path}: cannot be read ({err}); run that slice again") from None
    if not isinstance(document, dict) or document.get("version") != VERSION or \
            not isinstance(document.get("hosts"), list) or not isinstance(document.get("class_speed"), dict):
        raise UsageError(f"{path}: not a slice this version writes (version {VERSION}); run that slice again")
    return document


def _png(path: Path, directory: str | os.PathLike[str]) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise UsageError(f"{directory}: the kept image {path} cannot be read ({err.strerror or err}); "
                         "run that slice again") from None
