"""The model resource: the DiT, text encoder and VAE files in ComfyUI's models/ folders, sha256-verified.

A file is converged when it has the Hub's size AND the host's checksum cache (keyed by size+mtime)
holds the expected sha256. Right size but nothing cached yet (copied by hand, cache lost) plans a
verify-only Run of the fetch script: it hashes the file once and records it, with no download; a
mismatch fails that step and records the real checksum, so the next plan replaces the file.
Anything else plans a resumable Fetch (an existing `.part` is resumed and counted in the disk check).

The DiT must also be what its name says: its safetensors header (read by the facts program, no
hashing) declares the weight dtype and rank, checked against the variant and the GPU here and
again by the fetch program before a download is renamed into place. Sizes and checksums come from
the profile's lock when it has one (pins.py: no Hub at all), else from the Hub at the catalog's or
the profile's revision, recorded on the control machine (hub.py).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import replace

from provisioner.config.model import Profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, FileState, Probe
from provisioner.facts.snapshots import ModelFile
from provisioner import remote, secrets
from provisioner.catalog import models as catalog
from provisioner.resources import hub, pins
from provisioner.resources.base import (RESTART, Action, Change, Fetch, Note, ResourcePlan, Run, changes,
                                        resumable, size_text)

name = "model"

def _dest(profile: Profile, f: catalog.ModelFile) -> str:
    return posixpath.normpath(f.dest(profile.comfyui.models))


def probe(profile: Profile) -> Probe:
    """Stat every file this profile could need (both precisions under `auto`) and its `.part`, and
    the filesystem each would land on (models/ or a folder in it may be a link to another disk)."""
    m = profile.model
    if m.family is None:
        return Probe()
    try:
        files = catalog.candidate_files(m.family, m.variant, m.precision)
    except PlanError:
        return Probe()  # plan() raises the same error per host, with the valid choices
    dests = [_dest(profile, f) for f in files]
    dits = tuple(_dest(profile, f) for f in files if f.folder == "diffusion_models")
    return Probe(stat=tuple(p for d in dests for p in (d, d + ".part")), headers=dits, space=tuple(dests))


def _check_header(profile: Profile, facts: Facts, sel: catalog.ModelSelection) -> None:
    """The DiT on disk must be what its name says: an fp4 file under an int4 name (renamed by
    hand, a custom quantisation) is refused, never replaced: it may be someone's own work."""
    dest = _dest(profile, sel.dit)
    header = facts.headers.get(dest)
    if header is None or not header.exists:
        return
    why = header.error or catalog.header_mismatch(header.metadata, sel.precision, sel.rank)
    if why:
        gpu = f"{facts.gpu.name} runs {sel.precision}" if facts.gpu else f"model.precision is {sel.precision}"
        raise PlanError(f"{dest}: {why}; {gpu} rank {sel.rank} ({sel.variant}): move the file away and "
                        "apply again to download the right one")


def paths(profile: Profile, facts: Facts) -> tuple[str, ...]:
    """The model files this host's ComfyUI loads (its GPU decides the precision under `auto`)."""
    m = profile.model
    if m.family is None:
        return ()
    try:
        return tuple(_dest(profile, f) for f in catalog.resolve(m.family, m.variant, m.precision, facts.gpu).files)
    except PlanError:
        return ()                 # plan() reports the same error


def plan(profile: Profile, facts: Facts, *, lookup: hub.Lookup | None = None,
         environ: Mapping[str, str] | None = None) -> ResourcePlan:
    """`lookup` (default `hub.file_metadata`) and `environ` (default `os.environ`) are injectable."""
    m, hf = profile.model, profile.huggingface
    if m.family is None:
        return changes()            # model.family: null: no Nunchaku model on these hosts
    sel = catalog.resolve(m.family, m.variant, m.precision, facts.gpu, gpu_error=facts.gpu_error,
                          backend=profile.backend.version)
    if m.repo:                      # validated: official, or third-party opted in at a pinned commit
        sel = replace(sel, dit=replace(sel.dit, repo=m.repo))
    _check_header(profile, facts, sel)
    lookup = lookup or hub.file_metadata
    token = secrets.read(hf.token_env, environ)
    planned: list[Change | None] = []
    for f in sel.files:
        revision = m.revision if (f is sel.dit and m.revision) else f.revision
        pin = pins.model(profile, f.repo, f.path_in_repo, revision or hub.DEFAULT_REF)
        found = hub.locked(hf.endpoint, pin.repo, pin.path, pin.commit, pin.size, pin.sha256) if pin else \
            lookup(hf.endpoint, f.repo, f.path_in_repo, revision, token, token_env=hf.token_env)
        pinned = m.sha256.lower() if (f is sel.dit and m.sha256) else None
        expect = (catalog.WEIGHT_DTYPES[sel.precision], sel.rank) if f is sel.dit else None
        planned.append(_file_change(profile, f, found, pinned, facts, expect))
    notes = [Note(name, text, "info") for text in sel.notes] + _vram_notes(profile, facts, sel)
    return changes(*planned, notes=notes)


def _file_change(profile: Profile, f: catalog.ModelFile, remote_file: hub.RemoteFile, pinned: str | None,
                 facts: Facts, quantization: tuple[str, int] | None = None) -> Change | None:
    """The change for one file (None when converged); `quantization`: the (weight dtype, rank) a
    downloaded DiT's header must declare. The disk check (plan/build.py) counts what it downloads
    on the filesystem it lands on."""
    dest = _dest(profile, f)
    want = pinned or remote_file.sha256
    have = facts.files.get(dest) or FileState(dest, exists=False)
    after = {"size": remote_file.size, "sha256": want}
    if have.exists and have.size == remote_file.size:
        if have.sha256 is not None and (want is None or have.sha256 == want):
            return None
        if have.sha256 is None:
            # The fetch program in verify mode: hashes the file once and records it, no download.
            stdin = remote.fetch_request(dest=dest, cache=profile.comfyui.checksums, sha256=want,
                                         size=remote_file.size, mode="verify")
            run = Run(remote.argv("fetch"), stdin=stdin,
                      what=f"verify sha256 of {f.filename} ({size_text(remote_file.size)})")
            return Change(name, dest, "update", f"verify {f.folder}/{f.filename}: size matches, checksum not "
                          "cached yet (hashed once, no download)", {"size": have.size, "sha256": None}, after,
                          (run,))
    resume = resumable(facts, dest, remote_file.size)
    where = f"{f.repo}@{(remote_file.commit or f.revision or hub.DEFAULT_REF)[:12]}"
    action: Action
    if have.exists:
        action, before = "replace", {"size": have.size, "sha256": have.sha256}
        why = "size differs" if have.size != remote_file.size else "sha256 differs"
        summary = f"replace {f.folder}/{f.filename} ({why}) from {where}"
    else:
        action, before = "create", None
        summary = f"download {f.folder}/{f.filename} ({size_text(remote_file.size)}) from {where}"
    if resume:
        summary += f", resuming at {size_text(resume)}"
    warnings: tuple[str, ...] = ()
    if pinned and remote_file.sha256 and pinned != remote_file.sha256:
        warnings = (f"model.sha256 {pinned[:12]}… differs from the Hub's {remote_file.sha256[:12]}… for {f.filename}: "
                    "the download will fail verification unless the Hub serves the pinned file",)
    spec = profile.huggingface      # the token goes with the download only where it belongs
    step = Fetch(remote_file.url, dest, want, remote_file.size,
                 spec.token_env if spec.sends_token_to(remote_file.url) else None,
                 cache=profile.comfyui.checksums, what=f"download {f.filename} ({size_text(remote_file.size)})",
                 quantization=quantization)
    # ComfyUI keeps loaded weights in memory: a new DiT, or any file replaced in place, needs a restart.
    notify = RESTART if (f.folder == "diffusion_models" or action == "replace") else frozenset()
    return Change(name, dest, action, summary, before, after, (step,), notify, warnings)


def _vram_notes(profile: Profile, facts: Facts, sel: catalog.ModelSelection) -> list[Note]:
    gpu, wf = facts.gpu, profile.workflow
    if gpu is None:
        return []
    vram = gpu.vram_total_gb
    label = f"{gpu.name} has {vram:.1f} GiB VRAM; {sel.variant} ({sel.precision}) needs ~{sel.vram_gb} GiB " \
            "without CPU offload"
    if wf.cpu_offload == "disable" and vram < sel.vram_gb:
        return [Note(name, f"{label}: cpu_offload=disable will likely run out of memory (use auto or enable)")]
    if wf.cpu_offload == "auto" and vram < wf.offload_below_gb:
        return [Note(name, f"{label}: the DiT loader will enable CPU offload (cpu_offload=auto, "
                     f"below {wf.offload_below_gb:g} GiB)", "info")]
    if wf.cpu_offload == "auto" and vram < sel.vram_gb:
        return [Note(name, f"{label}: auto keeps it all on the GPU (>= {wf.offload_below_gb:g} GiB) and may "
                     "run out of memory; set cpu_offload to enable")]
    return []


# --- a snapshot's model files (a rollback) --------------------------------------------------------

def restore(profile: Profile, want: Mapping[str, ModelFile], have: Mapping[str, ModelFile],
            notes: list[Note]) -> list[Change]:
    """Model files are kept: one the snapshot lacks is deleted only under `snapshots.remove_models`;
    one it has that differs or went is reported, never downloaded."""
    found: list[Change] = []
    extra: list[str] = []
    for path in sorted(set(want) | set(have)):
        w, h = want.get(path), have.get(path)
        if w is not None and h is None:
            notes.append(Note(name, f"{path} was there at the snapshot and is gone: a rollback never downloads "
                                    "model files (apply a profile that names it)"))
        elif w is not None and h is not None and (w.size != h.size or (w.sha256 and h.sha256 and w.sha256 != h.sha256)):
            notes.append(Note(name, f"{path} differs from the snapshot's ({h.size} bytes now, {w.size} then): "
                                    "a rollback never downloads model files"))
        elif w is None and h is not None:
            if profile.snapshots.remove_models:
                found.append(Change("model", path, "remove", f"delete {path} (not in the snapshot; "
                                    "snapshots.remove_models is on)", {"size": h.size, "sha256": h.sha256}, None,
                                    (Run(("rm", "-f", path), what=f"delete {path}"),)))
            else:
                extra.append(posixpath.basename(path))
    if extra:
        notes.append(Note(name, f"kept {len(extra)} model file(s) the snapshot lacks ({', '.join(extra[:5])}"
                                f"{' …' if len(extra) > 5 else ''}); snapshots.remove_models: true deletes them", "info"))
    return found
