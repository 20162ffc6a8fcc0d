"""The nunchaku backend: the prebuilt wheel matching the host's torch, CPython tag and platform."""

from __future__ import annotations

import posixpath
from pathlib import Path

from packaging.utils import parse_wheel_filename
from packaging.version import InvalidVersion, Version

from provisioner.catalog import wheels
from provisioner.config.model import Profile, WheelSource
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Probe, PythonEnv
from provisioner.facts.parse import is_real_nunchaku
from provisioner.resources import releases
from provisioner.resources.base import RESTART, Change, Fetch, Note, Push, ResourcePlan, Run, changes
from provisioner.resources.releases import Asset, Lister, Listing

name = "backend"


def probe(profile: Profile) -> Probe:
    """torch, the CPython tag, the platform and installed distributions are base facts."""
    return Probe()


def _host_target(profile: Profile, env: PythonEnv) -> tuple[Version, str]:
    """(backend version, torch major.minor), or a PlanError saying what the venv lacks."""
    venv = profile.comfyui.venv
    if not env.exists:
        raise PlanError(f"ComfyUI's venv {venv} does not exist: create it and install torch first")
    if env.error:
        raise PlanError(f"ComfyUI's venv {venv} cannot be read ({env.error})")
    if not env.torch:
        raise PlanError(f"no torch in {venv}: install torch in ComfyUI's venv first "
                        "(the nunchaku wheel is built against one torch major.minor)")
    if not env.tag or not env.platform:
        raise PlanError(f"{venv}'s python did not report its wheel tag and platform")
    try:
        version = Version(profile.backend.version)
    except InvalidVersion:
        raise PlanError(f"backend.version {profile.backend.version!r} is not a version (e.g. 1.0.1)") from None
    try:
        torch = Version(env.torch)
    except InvalidVersion:
        raise PlanError(f"torch version {env.torch!r} in {venv} cannot be read") from None
    return version, f"{torch.major}.{torch.minor}"


def _matches(asset: Asset, want: Version, python_tag: str, platform: str) -> bool:
    _, ver, _, tags = parse_wheel_filename(asset.name)
    return ver == want and any(t.interpreter == python_tag and t.platform == platform for t in tags)


def _describe(listing: Listing) -> str:
    what = listing.error or f"{len(listing.assets)} {listing.source.kind} wheel(s), none for this host"
    return f"{listing.source.kind} {listing.where}: {what}"


def find_wheel(profile: Profile, version: Version, torch_mm: str, python_tag: str, platform: str,
               lister: Lister = releases.list_wheels) -> tuple[Asset, WheelSource]:
    """The first source, in profile order, offering the exact wheel; PlanError listing what exists."""
    want = Version(f"{version.public}+torch{torch_mm}")
    filename = wheels.wheel_filename(str(version), torch_mm, python_tag, platform)
    base_dir = str(Path(profile.file).parent) if profile.file else "."
    tried, combos = [], set()
    for source in profile.backend.sources:
        listing = lister(source, str(version), filename, hub=profile.huggingface, base_dir=base_dir)
        for asset in listing.assets:
            if _matches(asset, want, python_tag, platform):
                return asset, source
            combos.add(wheels.wheel_combo(asset.name, str(version)))
        tried.append(_describe(listing))
    message = (f"no nunchaku {version} wheel for torch {torch_mm} / {python_tag} / {platform} "
               f"(tried {'; '.join(tried) or 'no source: backend.sources is empty'})")
    raise PlanError(message, sorted(c for c in combos if c))


def _get_steps(profile: Profile, asset: Asset, source: WheelSource) -> tuple[str, Fetch | Push]:
    dest = posixpath.join(profile.comfyui.state_dir, "wheels", asset.name)
    if asset.local_path:
        sha = asset.sha256 or releases.file_sha256(asset.local_path)
        return dest, Push(asset.local_path, dest, sha, what=f"push {asset.name} from the wheelhouse")
    token = profile.huggingface.token_env if source.kind == "huggingface" else None
    return dest, Fetch(asset.url, dest, asset.sha256, asset.size, token_env=token,
                       cache=profile.comfyui.checksums, what=f"download {asset.name}")


def plan(profile: Profile, facts: Facts, *, lister: Lister = releases.list_wheels) -> ResourcePlan:
    """Install `nunchaku {version}+torch{M.m}` from a wheel file, replacing PyPI's impostor or another build."""
    env = facts.env
    version, torch_mm = _host_target(profile, env)
    desired = f"{version.public}+torch{torch_mm}"
    current = env.distributions.get("nunchaku")
    real = current is not None and is_real_nunchaku(current)
    if current is not None and real and _same(current.version, desired):
        return changes()
    asset, source = find_wheel(profile, version, torch_mm, env.tag or "", env.platform or "", lister)
    dest, get = _get_steps(profile, asset, source)
    python = profile.comfyui.python
    steps: list = [get]
    if current is not None and not real:
        # PyPI's `nunchaku` (data segmentation) shares the import name: remove it explicitly.
        steps.append(Run((python, "-m", "pip", "uninstall", "-y", "nunchaku"),
                         what=f"uninstall PyPI's unrelated nunchaku {current.version}"))
    # By file path only (pip never asks an index for `nunchaku`), binary only, and --no-deps: a
    # resolver run could swap torch under the wheel; the packages resource owns the dependencies.
    steps.append(Run((python, "-m", "pip", "install", "--no-deps", "--no-index", "--only-binary=:all:",
                      "--disable-pip-version-check", dest), what=f"pip install {asset.name}"))
    if current is None:
        action, before = "create", None
    elif real:
        action, before = "update", {"nunchaku": current.version}
    else:
        action, before = "replace", {"nunchaku": f"{current.version} (PyPI's unrelated package)"}
    change = Change(
        resource=name, key="nunchaku", action=action,  # type: ignore[arg-type]
        summary=f"nunchaku {before['nunchaku'] if before else '(none)'} -> {desired}",
        before=before, after={"nunchaku": desired, "wheel": asset.name, "from": f"{source.kind} {source.value}"},
        steps=tuple(steps), notify=RESTART,
    )
    note = Note(name, "nunchaku is installed with --no-deps: its requirements (diffusers, transformers, "
                      "peft, accelerate) come from the packages resource", level="info")
    return changes(change, notes=[note])


def _same(installed: str, desired: str) -> bool:
    try:
        return Version(installed) == Version(desired)
    except InvalidVersion:
        return False
