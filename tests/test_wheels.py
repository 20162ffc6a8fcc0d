"""Which wheel of each real nunchaku release a host gets: every torch 2.5-2.11 build PyTorch
publishes (cu118 ... cu130) x CPython 3.10-3.13 x Linux/Windows, planned by the backend resource from
facts against the real asset names (sandbox/captures/nunchaku-releases/assets.json), no network."""

from __future__ import annotations

import pytest
from packaging import tags

from provisioner.config.model import BackendSpec, ComfySpec, Profile, WheelSource
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, PythonEnv
from provisioner.resources import backend
from provisioner.resources.releases import Asset, Listing
from provisioner.sandbox.world import release_assets

ASSETS = release_assets()
# torch minor -> the CUDA builds PyTorch publishes for it (download.pytorch.org indexes)
TORCH_CUDA = {"2.5": ("11.8", "12.1", "12.4"), "2.6": ("11.8", "12.4", "12.6"), "2.7": ("11.8", "12.6", "12.8"),
              "2.8": ("12.6", "12.8", "12.9"), "2.9": ("12.6", "12.8", "13.0"), "2.10": ("12.6", "12.8", "13.0"),
              "2.11": ("12.6", "12.8", "13.0")}
PYTHONS = ("cp310", "cp311", "cp312", "cp313")
PLATFORMS = ("linux_x86_64", "win_amd64")


def expected(release: str, torch: str, cuda: str, py: str, platform: str) -> str:
    """The oracle, written from the release matrices (FACTS: release-build.yaml at each tag), not
    from the code under test: a file name, "cuda" (built with another CUDA major) or "none"."""
    if release == "1.2.1":
        built = {"12.8": ("2.8", "2.9", "2.10", "2.11"), "13.0": ("2.9", "2.10", "2.11")}
        return (f"nunchaku-1.2.1+cu{cuda}torch{torch}-{py}-{py}-{platform}.whl"
                if torch in built.get(cuda, ()) else "none")
    if release == "1.0.1":
        cuda_of = {"2.5": "12.4", "2.6": "12.4", "2.7": "12.8", "2.8": "12.8", "2.10": "12.8"}
        exists = torch in cuda_of and not (torch == "2.5" and py == "cp313")
    else:   # 1.1.0, 1.2.0: Windows got 2.9 and "pre" (2.11) only
        cuda_of = {"2.7": "12.8", "2.8": "12.8", "2.9": "13.0", "2.11": "13.0"}
        exists = torch in cuda_of and (platform != "win_amd64" or torch in ("2.9", "2.11"))
    if torch in cuda_of and cuda_of[torch].split(".")[0] != cuda.split(".")[0]:
        return "cuda"
    return f"nunchaku-{release}+torch{torch}-{py}-{py}-{platform}.whl" if exists else "none"


def facts(torch: str, cuda: str, py: str, platform: str) -> Facts:
    version = (3, int(py[3:]))
    plats = [platform] if platform == "win_amd64" else [f"manylinux_2_{m}_x86_64" for m in (35, 28, 17)] + [platform]
    accepted = tuple(str(t) for t in (*tags.cpython_tags(version, None, plats), *tags.compatible_tags(version, py, plats)))
    env = PythonEnv("/srv/ComfyUI/venv/bin/python", True, f"3.{version[1]}.4", py, platform,
                    f"{torch}.1+cu{cuda.replace('.', '')}", cuda, tags=accepted)
    return Facts("gpu", "Ubuntu 24.04", "x86_64", "6.8", "3.12", env, (), "no GPU needed here", None, "/srv", 10**12,
                 "0.3.64")


def profile(release: str, allow_nightly_built: bool = True) -> Profile:
    """The oracle's profile takes the nightly-built wheels (backend.allow_nightly_built), so every
    asset a release publishes is reachable; without the opt-in they are refused (test below)."""
    return Profile(name="t", file="", inventory=None, hosts="all",
                   comfyui=ComfySpec(root="/srv/ComfyUI", venv="/srv/ComfyUI/venv"),
                   backend=BackendSpec(release, (WheelSource("github", "https://github.com/nunchaku-ai/nunchaku"),),
                                       allow_nightly_built))


def lister(source: WheelSource, version: str, filename: str, **_: object) -> Listing:
    """The release as GitHub lists it, from the captured names (the HTTP path is tested elsewhere)."""
    return Listing(source, f"v{version}", tuple(Asset(n, f"https://example.invalid/{n}") for n in ASSETS[version]))


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("release", sorted(ASSETS))
def test_every_release_torch_cuda_python(release: str, platform: str) -> None:
    wrong = []
    seen = set()
    for torch, cudas in TORCH_CUDA.items():
        for cuda in cudas:
            for py in PYTHONS:
                want = expected(release, torch, cuda, py, platform)
                try:
                    (change,) = backend.plan(profile(release), facts(torch, cuda, py, platform), lister=lister).changes
                    got = change.after["wheel"]
                except PlanError as err:
                    got = "cuda" if "was compiled with CUDA" in str(err) else "none"
                    assert str(err).startswith("no "), err
                if got != want:
                    wrong.append(f"torch {torch} cu{cuda} {py}: got {got}, expected {want}")
                seen.add(got)
    assert not wrong, "\n".join(wrong)
    # Every name the release publishes for this platform is reachable from some host.
    assert {n for n in ASSETS[release] if n.endswith(f"{platform}.whl")} <= seen


@pytest.mark.parametrize(("release", "torch", "cuda", "py", "wheel"), [
    ("1.0.1", "2.6", "12.4", "cp312", "nunchaku-1.0.1+torch2.6-cp312-cp312-linux_x86_64.whl"),
    ("1.0.1", "2.9", "12.8", "cp312", None),          # 1.0.1 has no +torch2.9 (its "2.9" is +torch2.10)
    ("1.1.0", "2.9", "13.0", "cp313", "nunchaku-1.1.0+torch2.9-cp313-cp313-linux_x86_64.whl"),
    ("1.2.0", "2.11", "13.0", "cp312", "nunchaku-1.2.0+torch2.11-cp312-cp312-linux_x86_64.whl"),
    ("1.2.1", "2.11", "13.0", "cp313", "nunchaku-1.2.1+cu13.0torch2.11-cp313-cp313-linux_x86_64.whl"),
    ("1.2.1", "2.8", "13.0", "cp312", None),          # no +cu13.0torch2.8 (excluded from the matrix)
    ("1.2.1", "2.7", "12.8", "cp312", None),          # never the nearest lower torch
])
def test_spot_checks(release: str, torch: str, cuda: str, py: str, wheel: str | None) -> None:
    plan = lambda: backend.plan(profile(release), facts(torch, cuda, py, "linux_x86_64"), lister=lister)  # noqa: E731
    if wheel:
        assert plan().changes[0].after["wheel"] == wheel
    else:
        with pytest.raises(PlanError, match=rf"^no nunchaku {release} wheel for torch {torch} / {py} / linux_x86_64"):
            plan()


# Upstream's nightly-built wheels: 1.0.1's "2.9" published as +torch2.10, the "pre" of 1.1.0-1.2.1 as torch2.11.
@pytest.mark.parametrize(("release", "torch", "cuda", "pin"), [
    ("1.0.1", "2.10", "12.8", 'comfyui.torch {version: "2.8", cuda: "12.8"}'),
    ("1.2.0", "2.11", "13.0", 'comfyui.torch {version: "2.9", cuda: "13.0"}'),
    ("1.2.1", "2.11", "12.8", 'comfyui.torch {version: "2.10", cuda: "12.8"}'),
])
def test_nightly_built_wheels_need_the_opt_in(release: str, torch: str, cuda: str, pin: str) -> None:
    with pytest.raises(PlanError) as err:
        backend.plan(profile(release, allow_nightly_built=False), facts(torch, cuda, "cp312", "linux_x86_64"),
                     lister=lister)
    assert "compiled against a torch nightly" in str(err.value) and "backend.allow_nightly_built: true" in str(err.value)
    assert f"pin {pin}, the nearest build with an official wheel" in str(err.value)
