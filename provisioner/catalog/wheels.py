"""How nunchaku's release wheels are named and tagged upstream (no I/O)."""

from __future__ import annotations

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version


def release_tag(version: str) -> str:
    """GitHub tag of a backend version: `1.0.1` -> `v1.0.1`; dev builds drop the dot: `v0.3.1dev20250609`."""
    v = Version(version)
    if v.dev is not None:
        return f"v{v.base_version}dev{v.dev}"
    return f"v{v.public}"


def wheel_filename(version: str, torch_mm: str, python_tag: str, platform: str) -> str:
    """`nunchaku-1.0.1+torch2.6-cp312-cp312-linux_x86_64.whl`: the name upstream releases use."""
    return f"nunchaku-{Version(version).public}+torch{torch_mm}-{python_tag}-{python_tag}-{platform}.whl"


def wheel_combo(name: str, version: str) -> str | None:
    """`torch2.8/cp312/linux_x86_64` for a nunchaku wheel of `version`, None for anything else."""
    try:
        dist, ver, _build, tags = parse_wheel_filename(name)
    except (InvalidWheelFilename, InvalidVersion):
        return None
    if dist != canonicalize_name("nunchaku") or ver.public != Version(version).public:
        return None
    tag = min(tags, key=str)
    return f"{ver.local or 'no torch label'}/{tag.interpreter}/{tag.platform}"
