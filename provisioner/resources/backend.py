"""The nunchaku backend: the release wheel built for the host's torch (minor and CUDA) that its
interpreter accepts (packaging.tags), installed by path with --no-deps and torch held."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from packaging.tags import Tag
from packaging.version import InvalidVersion, Version

from provisioner.catalog import wheels
from provisioner.catalog.gpus import SM121_MIN_BUILD_CUDA
from provisioner.config.model import Profile, WheelSource
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Probe, canonical
from provisioner.facts.snapshots import Dist
from provisioner.facts.parse import is_real_nunchaku
from provisioner.resources import pins, releases, retention, venv
from provisioner.resources.hold import held_install
from provisioner.resources.base import RESTART, Change, Fetch, Note, Push, ResourcePlan, Run, changes
from provisioner.resources.releases import Asset, Lister, Listing

name = "backend"


def wheel_dir(profile: Profile) -> str:
    return profile.comfyui.wheel_dir


def probe(profile: Profile) -> Probe:
    """torch, the CPython tag, the platform and installed distributions are base facts; the wheel
    folder (what it holds: retention.py; its filesystem: the disk check) is not."""
    return Probe(space=(wheel_dir(profile),), listing=(wheel_dir(profile),))


@dataclass(frozen=True)
class Target:
    """The backend wheel this host needs: release, local label, and what its interpreter accepts."""

    version: Version
    torch: wheels.HostTorch
    accepted: tuple[Tag, ...]
    python_tag: str
    platform: str

    @property
    def wheel_version(self) -> Version:
        return wheels.wheel_version(str(self.version), self.torch)

    @property
    def label(self) -> str:
        return wheels.local_label(str(self.version), self.torch)


def _no_wheel(why: str) -> PlanError:
    return PlanError(f"no wheel for this torch: {why}")


def host_target(profile: Profile, facts: Facts) -> Target:
    """The wheel this host needs, or a PlanError saying why none can run there (checked before any
    release is asked, and also on a host that already has one: a wrong build is not converged)."""
    env, venv = facts.env, profile.comfyui.venv
    if not env.exists:
        raise PlanError(f"ComfyUI's venv {venv} does not exist: create it and install torch first")
    if env.error:
        raise PlanError(f"ComfyUI's venv {venv} cannot be read ({env.error})")
    if not env.torch:
        raise PlanError(f"no torch in {venv}: install torch in ComfyUI's venv first "
                        "(the nunchaku wheel is built against one torch major.minor)")
    try:
        version = Version(profile.backend.version)
    except InvalidVersion:
        raise PlanError(f"backend.version {profile.backend.version!r} is not a version (e.g. 1.0.1)") from None
    try:
        torch = wheels.read_torch(env.torch, env.torch_cuda)
    except InvalidVersion:
        raise PlanError(f"torch version {env.torch!r} in {venv} cannot be read") from None
    if problem := wheels.torch_problem(torch):
        raise _no_wheel(problem)
    if env.free_threaded:
        raise _no_wheel(f"{venv}'s python {env.version} is a free-threaded (no-GIL) build; nunchaku "
                        "publishes wheels for the standard CPython 3.10-3.13 only")
    if env.tags is None or not env.tag or not env.platform:
        raise PlanError(f"{venv}'s python has neither pip nor packaging, so it cannot say which wheels it "
                        "accepts (nor install one): install pip in that venv")
    if not profile.backend.allow_nightly_built and (problem := wheels.nightly_problem(str(version), torch)):
        raise _no_wheel(problem)
    if problem := wheels.cuda_problem(str(version), torch):
        raise _no_wheel(problem)
    target = Target(version, torch, wheels.host_tags(env.tags), env.tag, env.platform)
    gpu = facts.gpu
    build = wheels.built_with(str(version), target.label)
    if gpu is not None and tuple(gpu.compute_capability) == (12, 1) and build is not None \
            and int(build.split(".")[0]) < SM121_MIN_BUILD_CUDA:
        raise _no_wheel(f"{gpu.name} (compute capability 12.1) needs a wheel compiled with CUDA >= "
                        f"{SM121_MIN_BUILD_CUDA}.0 (only those carry sm_121 code); nunchaku {version.public}+"
                        f"{target.label} was compiled with CUDA {build}: use a cu130 torch")
    return target


def _describe(listing: Listing) -> str:
    what = listing.error or f"{len(listing.assets)} {listing.source.kind} wheel(s), none for this host"
    return f"{listing.source.kind} {listing.where}: {what}"


def find_wheel(profile: Profile, target: Target,
               lister: Lister = releases.list_wheels) -> tuple[Asset, WheelSource]:
    """The first source, in profile order, offering the exact wheel (this torch minor and CUDA,
    a tag this interpreter accepts); PlanError listing what exists. Never a nearby torch."""
    version = str(target.version)
    filename = wheels.wheel_filename(version, target.torch, target.python_tag, target.platform)
    base_dir = str(Path(profile.file).parent) if profile.file else "."
    tried: list[str] = []
    combos: set[str | None] = set()
    for source in profile.backend.sources:
        listing = lister(source, version, filename, hub=profile.huggingface, base_dir=base_dir)
        by_name = {asset.name: asset for asset in listing.assets}
        name = wheels.best_match(by_name, target.wheel_version, target.accepted)
        if name is not None:
            return by_name[name], source
        combos.update(wheels.wheel_combo(n, version) for n in by_name)
        tried.append(_describe(listing))
    pin = wheels.official_pin(version, target.torch)
    message = (f"no nunchaku {target.version} wheel for torch {target.torch.minor} / {target.python_tag} / "
               f"{target.platform} (+{target.label}, torch {target.torch}; tried "
               f"{'; '.join(tried) or 'no source: backend.sources is empty'})" + (f": {pin}" if pin else ""))
    raise PlanError(message, sorted(c for c in combos if c))


def locked_wheel(profile: Profile, facts: Facts, target: Target) -> tuple[Asset, WheelSource] | None:
    """The wheel the lock pins for this host's environment class (no source is asked), or None
    without a lock. A pin that is not this host's wheel (backend.version moved since) is stale."""
    env = pins.environment(profile, facts)
    if env is None:
        return None
    pin = env.backend
    if pin is None or wheels.best_match([pin.name], target.wheel_version, target.accepted) is None:
        raise pins.stale(profile, f"a nunchaku {target.wheel_version} wheel for {pins.key_of(facts)}", "backend")
    if "://" in pin.url:
        # A wheel on the Hub (a huggingface source) is fetched with the Hub's token, as unlocked.
        hub = pin.url.startswith(profile.huggingface.endpoint.rstrip("/") + "/")
        return Asset(pin.name, pin.url, pin.size, pin.sha256), WheelSource("huggingface" if hub else "mirror", pin.url)
    return Asset(pin.name, "", pin.size, pin.sha256, local_path=pin.url), WheelSource("wheelhouse", pin.url)


def _get_steps(profile: Profile, asset: Asset, source: WheelSource) -> tuple[str, Fetch | Push]:
    dest = posixpath.join(wheel_dir(profile), asset.name)
    if asset.local_path:
        sha = asset.sha256 or releases.file_sha256(asset.local_path)
        return dest, Push(asset.local_path, dest, sha, what=f"push {asset.name} from the wheelhouse")
    hub = profile.huggingface
    token = hub.token_env if source.kind == "huggingface" and hub.sends_token_to(asset.url) else None
    return dest, Fetch(asset.url, dest, asset.sha256, asset.size, token_env=token,
                       cache=profile.comfyui.checksums, what=f"download {asset.name}")


def refetch(profile: Profile, dist: Dist, lister: Lister = releases.list_wheels) -> Fetch | Push | None:
    """The step that gets a backend wheel file a rollback needs again, from the first source in
    profile order that offers that very file, back to the path it was installed from and checked
    against the sha256 pip recorded; None when no source offers it (or it is no nunchaku wheel)."""
    path, filename = dist.path, posixpath.basename(dist.path or "")
    if not path or not dist.sha256 or canonical(dist.name) != "nunchaku":
        return None
    version = str(Version(dist.version).public)
    base_dir = str(Path(profile.file).parent) if profile.file else "."
    for source in profile.backend.sources:
        listing = lister(source, version, filename, hub=profile.huggingface, base_dir=base_dir)
        for asset in listing.assets:
            if asset.name != filename or (asset.sha256 and asset.sha256 != dist.sha256):
                continue
            if asset.local_path:
                return Push(asset.local_path, path, dist.sha256, what=f"push {filename} again from the wheelhouse")
            token = profile.huggingface.token_env if source.kind == "huggingface" else None
            return Fetch(asset.url, path, dist.sha256, asset.size, token_env=token, cache=profile.comfyui.checksums,
                         what=f"download {filename} again (its kept copy is gone)")
    return None


def plan(profile: Profile, facts: Facts, *, lister: Lister = releases.list_wheels) -> ResourcePlan:
    """Install `nunchaku {version}+{label}` from a wheel file, replacing PyPI's impostor or another build,
    for the torch the venv will run (a venv created or a torch moved in the same apply included)."""
    facts = venv.planned(profile, facts)
    env = facts.env
    target = host_target(profile, facts)
    desired = str(target.wheel_version)
    current = env.distributions.get("nunchaku")
    real = current is not None and is_real_nunchaku(current)
    held = facts.listings.get(wheel_dir(profile))
    if current is not None and real and _same(current.version, desired):
        # Converged: what an earlier version or a killed transfer left in the wheel folder goes.
        leftovers = retention.stale_wheels(held, "nunchaku", target.wheel_version) + retention.temps(held)
        return changes(retention.cleanup(name, wheel_dir(profile), leftovers,
                                         "wheels the installed backend does not use"))
    asset, source = locked_wheel(profile, facts, target) or find_wheel(profile, target, lister)
    dest, get = _get_steps(profile, asset, source)
    python = profile.comfyui.python
    steps: list = [get]
    if current is not None and not real:
        # PyPI's `nunchaku` (data segmentation) shares the import name: remove it explicitly.
        steps.append(Run((python, "-m", "pip", "uninstall", "-y", "nunchaku"),
                         what=f"uninstall PyPI's unrelated nunchaku {current.version}",
                         timeout=profile.timeouts.pip_s))
    # By file path only (pip never asks an index for `nunchaku`), binary only, --no-deps and the
    # torch family held: nothing can swap torch under the wheel; the packages resource owns the
    # wheel's Requires-Dist.
    steps.append(held_install(profile, "--no-deps", "--no-index", "--only-binary=:all:", dest,
                              what=f"pip install {asset.name}", timeout=profile.timeouts.pip_s))
    # Installed: the wheels it replaces, and any a killed transfer left, are of no more use.
    leftovers = [n for n in retention.stale_wheels(held, "nunchaku", target.wheel_version) + retention.temps(held)
                 if n != asset.name]
    if leftovers:
        steps.append(retention.remove_step(wheel_dir(profile), leftovers, "remove the wheels no longer installed"))
    if current is None:
        action, before = "create", None
    elif real:
        action, before = "update", {"nunchaku": current.version}
    else:
        action, before = "replace", {"nunchaku": f"{current.version} (PyPI's unrelated package)"}
    warnings: tuple[str, ...] = ()
    if wheels.nightly_built(str(target.version), target.torch):
        warnings = (f"nunchaku {desired} was compiled against a torch {target.torch.minor} nightly (upstream's "
                    f"\"pre\" build), not the stable torch {target.torch}: import errors are possible",)
    change = Change(
        resource=name, key="nunchaku", action=action,  # type: ignore[arg-type]
        summary=f"nunchaku {before['nunchaku'] if before else '(none)'} -> {desired}",
        before=before, after={"nunchaku": desired, "wheel": asset.name, "from": f"{source.kind} {source.value}"},
        steps=tuple(steps), notify=RESTART, warnings=warnings,
        replaces=frozenset({"nunchaku"}) if current is not None else frozenset(),
    )
    note = Note(name, "nunchaku is installed with --no-deps: its requirements (diffusers, transformers, "
                      "peft, accelerate) come from the packages resource", level="info")
    return changes(change, notes=[note])


def _same(installed: str, desired: str) -> bool:
    try:
        return Version(installed) == Version(desired)
    except InvalidVersion:
        return False


def unused_wheels(profile: Profile, dists: Mapping[str, Dist], facts: Facts | None) -> Change | None:
    """The backend wheels in provision's wheel folder that a restored venv (`dists`) does not use
    (what the apply being undone downloaded), removed as `plan` removes those it replaces."""
    held = facts.listings.get(wheel_dir(profile)) if facts else None
    installed = dists.get("nunchaku")
    try:
        keep = Version(installed.version) if installed else None
    except InvalidVersion:
        return None
    used = {posixpath.basename(d.path) for d in dists.values() if d.path}
    stale = [n for n in retention.stale_wheels(held, "nunchaku", keep) if n not in used]
    return retention.cleanup(name, wheel_dir(profile), stale, "wheels the restored backend does not use")
