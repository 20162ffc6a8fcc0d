"""The backend resource, case by case (tests/resources/backend/*.yaml), against real HTTP listings.

Each case's release assets are real small wheels served by the GitHub-releases stand-in; the
resource lists them through `releases.list_wheels` exactly as it would list github.com.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging import tags
from packaging.version import Version

from provisioner.catalog import wheels
from provisioner.config.model import BackendSpec, ComfySpec, HubSpec, Profile, WheelSource
from provisioner.errors import PlanError
from provisioner.facts.model import Distribution, Facts, Gpu, PythonEnv
from provisioner.resources import backend, releases
from provisioner.resources.base import Fetch, Push, Put, Run
from provisioner.sandbox.release_server import ReleaseServer, start_release_server
from provisioner.sandbox.wheels import build_impostor_nunchaku, build_nunchaku_wheel_named

CASES = sorted((Path(__file__).parent / "resources" / "backend").glob("*.yaml"))
ROOT = "/srv/comfyui"


def accepted_tags(python_tag: str, platform: str, free_threaded: bool = False) -> tuple[str, ...]:
    """What pip on such an interpreter accepts, made by packaging itself (most specific first):
    manylinux/musllinux variants before the plain `linux_*` tag nunchaku's wheels carry."""
    version = (int(python_tag[2]), int(python_tag[3:]))
    platforms = [platform]
    if platform.startswith("linux_"):
        arch = platform.removeprefix("linux_")
        platforms = [f"manylinux_2_{m}_{arch}" for m in range(39, 16, -1)] + [platform]
    abis = [f"{python_tag}t"] if free_threaded else None
    return tuple(str(t) for t in (*tags.cpython_tags(version, abis, platforms),
                                  *tags.compatible_tags(version, python_tag, platforms)))


def make_facts(env: dict[str, Any], python: str = f"{ROOT}/venv/bin/python", gpu: Gpu | None = None) -> Facts:
    dists = {}
    if env.get("nunchaku"):
        n = env["nunchaku"]
        dists["nunchaku"] = Distribution("nunchaku", str(n["version"]), n.get("summary", ""), n.get("home", ""))
    for name, version in (env.get("installed") or {}).items():
        dists[name] = Distribution(name, str(version))
    tag, platform = env.get("tag"), env.get("platform")
    accepted = None if env.get("no_pip") or not tag else accepted_tags(tag, platform, env.get("free_threaded", False))
    torch = env.get("torch")
    return Facts(
        host="gpu-01", os="Ubuntu 24.04 LTS", arch="x86_64", kernel="6.8.0", system_python="/usr/bin/python3",
        env=PythonEnv(python, True, "3.12.3", tag, platform, str(torch) if torch else None, env.get("torch_cuda"),
                      tags=accepted, free_threaded=env.get("free_threaded", False), distributions=dists),
        gpus=(gpu,) if gpu else (), gpu_error=None, nvcc=None, disk_path=ROOT, disk_free=10**12,
        comfyui_version="0.3.64",
    )


def make_profile(version: str, sources: list[WheelSource], root: str = ROOT, file: str = "",
                 allow_nightly_built: bool = False) -> Profile:
    return Profile(name="t", file=file, inventory=None, hosts="all",
                   comfyui=ComfySpec(root=root, venv=f"{root}/venv"),
                   backend=BackendSpec(version=version, sources=tuple(sources),
                                       allow_nightly_built=allow_nightly_built))


def _wheel(out: Path, version: str, combo: str) -> Path:
    """`torch2.6-cp312-linux_x86_64` or `cu12.8torch2.9-cp312-linux_x86_64`: that release asset."""
    label, tag, platform = re.fullmatch(r"((?:cu[\d.]+)?torch[\d.]+)-(cp\d+)-(\w+)", combo).groups()
    return build_nunchaku_wheel_named(out, f"nunchaku-{Version(version).public}+{label}-{tag}-{tag}-{platform}.whl")


@pytest.fixture(autouse=True)
def _fresh_listing_cache() -> Iterator[None]:
    releases.clear_cache()
    yield
    releases.clear_cache()


@pytest.fixture
def server() -> Iterator[ReleaseServer]:
    srv = start_release_server()
    yield srv
    srv.stop()


@pytest.mark.parametrize("case_file", CASES, ids=[c.stem for c in CASES])
def test_case(case_file: Path, server: ReleaseServer, tmp_path: Path) -> None:
    case = yaml.safe_load(case_file.read_text())
    version = str(case.get("version", "1.0.1"))
    for key, combos in (case.get("releases") or {}).items():
        owner, repo, tag = key.split("/")
        for combo in combos:
            server.add(owner, repo, tag, _wheel(tmp_path / key, version_of_tag(tag), combo))
    house = tmp_path / "wheelhouse"
    for combo in case.get("wheelhouse") or ():
        _wheel(house, version, combo)
    subst = {"{server}": server.url, "{wheelhouse}": str(house)}

    def fill(text: str) -> str:
        for k, v in subst.items():
            text = text.replace(k, v)
        return text

    sources = [WheelSource(kind, fill(value)) for s in case["sources"] for kind, value in s.items()]
    profile = make_profile(version, sources, allow_nightly_built=case.get("allow_nightly_built", False))
    g = case.get("gpu")
    facts = make_facts(case["env"], gpu=Gpu(0, g["name"], 24576, 24000, 576, tuple(g["cc"]), "580.95") if g else None)
    expect = case["expect"]

    if "error" in expect:
        with pytest.raises(PlanError) as err:
            backend.plan(profile, facts)
        assert fill(expect["error"]) in str(err.value) and "\n" not in str(err.value)
        if "alternatives" in expect:
            assert list(err.value.alternatives) == expect["alternatives"]
        if expect.get("asks_no_source"):
            assert server.requests == []        # decided from the host and the catalog alone
        return
    result = backend.plan(profile, facts)
    if expect.get("converged"):
        assert result.changes == ()
        assert server.requests == []            # a converged host costs no release lookup
        return
    (change,) = result.changes
    assert change.action == expect["action"]
    assert change.notify == frozenset({"restart-comfyui"})
    assert [_kind(s) for s in change.steps] == expect["steps"]
    get, install = change.steps[0], change.steps[-1]
    wheel = expect.get("wheel") or Path(get.dest).name
    assert get.dest == f"{ROOT}/.provision/wheels/{wheel}"
    constraints = f"{ROOT}/.provision/constraints.txt"
    # The hold program writes the constraints file, then runs pip with these arguments itself.
    assert isinstance(install, Run) and json.loads(install.stdin or b"")["dest"] == constraints
    assert install.argv[0] == f"{ROOT}/venv/bin/python" and install.argv[3:] == (
        "install", "--disable-pip-version-check", "--no-warn-conflicts", "-c", constraints,
        "--no-deps", "--no-index", "--only-binary=:all:", get.dest)
    assert list(change.warnings) == expect.get("warnings", [])
    if "url" in expect:
        assert get.url == fill(expect["url"])
    if "source" in expect:
        assert change.after["from"].startswith(expect["source"])
    if "before" in expect:
        assert change.before == {"nunchaku": str(expect["before"])}
    if isinstance(get, Fetch):
        # The checksum is GitHub's own asset digest, so the host verifies what it downloaded.
        with urllib.request.urlopen(get.url.replace("+", "%2B")) as resp:
            data = resp.read()
        assert get.size == len(data)
        assert get.sha256 in (None, hashlib.sha256(data).hexdigest())
        if change.after["from"].startswith("github"):
            assert get.sha256 is not None
    else:
        assert Path(get.src).read_bytes()[:2] == b"PK"
        assert get.sha256 == releases.file_sha256(get.src)


def version_of_tag(tag: str) -> str:
    """The version a release tag holds: `v0.3.1dev20250609` -> `0.3.1.dev20250609`."""
    return re.sub(r"(\d)dev", r"\1.dev", tag.removeprefix("v"))


def _kind(step: object) -> str:
    if isinstance(step, Fetch):
        return "fetch"
    if isinstance(step, Push):
        return "push"
    assert isinstance(step, Run)
    return "uninstall" if "uninstall" in step.argv else "install"


def test_every_change_says_no_pip_resolution_for_nunchaku(server: ReleaseServer, tmp_path: Path) -> None:
    server.add("nunchaku-tech", "nunchaku", "v1.0.1", _wheel(tmp_path, "1.0.1", "torch2.6-cp312-linux_x86_64"))
    profile = make_profile("1.0.1", [WheelSource("github", server.repo_url("nunchaku-tech", "nunchaku"))])
    result = backend.plan(profile, make_facts({"torch": "2.6.0+cu124", "tag": "cp312", "platform": "linux_x86_64"}))
    for step in result.changes[0].steps:
        if isinstance(step, Run):
            assert "nunchaku" not in step.argv[4:] or step.argv[3] == "uninstall"   # never by name
    assert any("--no-deps" in n.message for n in result.notes)


def test_sources_are_asked_once_per_run(server: ReleaseServer, tmp_path: Path) -> None:
    server.add("nunchaku-tech", "nunchaku", "v1.0.1", _wheel(tmp_path, "1.0.1", "torch2.6-cp312-linux_x86_64"))
    profile = make_profile("1.0.1", [WheelSource("github", server.repo_url("nunchaku-tech", "nunchaku"))])
    for host_tag in ("cp312", "cp312", "cp312"):
        backend.plan(profile, make_facts({"torch": "2.6.0+cu124", "tag": host_tag, "platform": "linux_x86_64"}))
    assert len(server.paths("GET")) == 1


def test_missing_venv_and_bad_version_are_one_line_errors() -> None:
    profile = make_profile("1.0.1", [])
    facts = make_facts({"torch": "2.6.0+cu124", "tag": "cp312", "platform": "linux_x86_64"})
    gone = Facts(**{**facts.__dict__, "env": PythonEnv(facts.env.python, False)})
    with pytest.raises(PlanError, match="does not exist: create it and install torch first"):
        backend.plan(profile, gone)
    with pytest.raises(PlanError, match=r"backend.version 'latest' is not a version"):
        backend.plan(make_profile("latest", []), facts)
    with pytest.raises(PlanError, match="no source: backend.sources is empty"):
        backend.plan(profile, facts)


def test_planned_steps_install_the_wheel_into_a_real_venv(server: ReleaseServer, tmp_path: Path) -> None:
    """Run the plan's steps for real (Fetch done here with urllib) into a venv holding the impostor;
    afterwards the real backend is installed and the plan is empty."""
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    server.add("nunchaku-tech", "nunchaku", "v1.0.1", _wheel(tmp_path / "rel", "1.0.1", f"torch2.6-{tag}-linux_x86_64"))
    root = tmp_path / "comfy"
    # With pip: the install step is the hold program, which runs the venv's own pip, as on a host.
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    impostor = build_impostor_nunchaku(tmp_path / "imp")
    py = str(root / "venv" / "bin" / "python")
    subprocess.run([py, "-m", "pip", "install", "-q", "--no-deps", str(impostor)], check=True)
    profile = make_profile("1.0.1", [WheelSource("github", server.repo_url("nunchaku-tech", "nunchaku"))],
                           root=str(root))
    before = make_facts({"torch": "2.6.0+cu124", "tag": tag, "platform": "linux_x86_64",
                         "nunchaku": _installed(py)}, python=py)
    (change,) = backend.plan(profile, before).changes
    assert change.action == "replace"
    for step in change.steps:
        if isinstance(step, Fetch):
            Path(step.dest).parent.mkdir(parents=True)
            with urllib.request.urlopen(step.url.replace("+", "%2B")) as resp:
                Path(step.dest).write_bytes(resp.read())
        elif isinstance(step, Put):
            Path(step.dest).write_bytes(step.content)
        else:
            subprocess.run(step.argv, input=step.stdin, check=True, capture_output=True)
    after = make_facts({"torch": "2.6.0+cu124", "tag": tag, "platform": "linux_x86_64",
                        "nunchaku": _installed(py)}, python=py)
    assert after.env.distributions["nunchaku"].version == "1.0.1+torch2.6"
    assert backend.plan(profile, after).changes == ()


def _installed(py: str) -> dict[str, str] | None:
    code = ("import importlib.metadata as m, json\n"
            "try:\n d = m.distribution('nunchaku')\n"
            " print(json.dumps({'version': d.version, 'summary': d.metadata['Summary'] or '',"
            " 'home': d.metadata['Home-page'] or ''}))\n"
            "except m.PackageNotFoundError:\n print('null')\n")
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, check=True).stdout
    return yaml.safe_load(out)


@pytest.mark.parametrize(("version", "tag"), [("1.0.1", "v1.0.1"), ("0.3.1.dev20250609", "v0.3.1dev20250609"),
                                              ("0.3.1dev20250609", "v0.3.1dev20250609"), ("1.0", "v1.0")])
def test_release_tag(version: str, tag: str) -> None:
    assert wheels.release_tag(version) == tag


@pytest.mark.parametrize(("repo", "api"), [
    ("https://github.com/nunchaku-tech/nunchaku", "https://api.github.com/repos/nunchaku-tech/nunchaku"),
    ("https://github.com/nunchaku-tech/nunchaku.git/", "https://api.github.com/repos/nunchaku-tech/nunchaku"),
    ("https://ghe.example.org/ml/nunchaku", "https://ghe.example.org/api/v3/repos/ml/nunchaku"),
])
def test_github_api_url(repo: str, api: str) -> None:
    assert releases.github_api_url(repo, "v1.0.1") == f"{api}/releases/tags/v1.0.1"


def test_wheel_names_and_combos() -> None:
    torch28 = wheels.read_torch("2.8.0+cu128", None)
    name = wheels.wheel_filename("1.0.1", torch28, "cp312", "linux_x86_64")
    assert name == "nunchaku-1.0.1+torch2.8-cp312-cp312-linux_x86_64.whl"
    assert wheels.wheel_combo(name, "1.0.1") == "torch2.8/cp312/linux_x86_64"
    # From 1.2.1 the label carries torch.version.cuda (setup.py: "1.2.0+cu12.4torch2.4" format).
    name = wheels.wheel_filename("1.2.1", torch28, "cp312", "linux_x86_64")
    assert name == "nunchaku-1.2.1+cu12.8torch2.8-cp312-cp312-linux_x86_64.whl"
    assert wheels.wheel_combo(name, "1.2.1") == "cu12.8torch2.8/cp312/linux_x86_64"
    assert wheels.wheel_combo(name, "1.0.0") is None
    assert wheels.wheel_combo("nunchaku-1.0.1.tar.gz", "1.0.1") is None
    assert wheels.wheel_combo("diffusers-0.35.2-py3-none-any.whl", "0.35.2") is None


def test_unreachable_source_is_a_listing_error_not_an_exception() -> None:
    import socket

    with socket.socket() as s:              # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    source = WheelSource("github", f"http://127.0.0.1:{port}/nunchaku-tech/nunchaku")
    listing = releases.list_wheels(source, "1.0.1", "x.whl")
    assert listing.assets == () and listing.error.startswith("unreachable")


def test_listing_keeps_only_nunchaku_wheels_of_the_version(server: ReleaseServer, tmp_path: Path) -> None:
    from provisioner.sandbox.wheels import build_wheel

    server.add("o", "r", "v1.0.1", _wheel(tmp_path / "a", "1.0.1", "torch2.6-cp312-linux_x86_64"))
    server.add("o", "r", "v1.0.1", _wheel(tmp_path / "b", "1.0.0", "torch2.6-cp312-linux_x86_64"))
    server.add("o", "r", "v1.0.1", build_wheel(tmp_path / "c", "other", "1.0.1", {"other/__init__.py": ""}))
    listing = releases.list_wheels(WheelSource("github", server.repo_url("o", "r")), "1.0.1", "x.whl")
    assert [a.name for a in listing.assets] == ["nunchaku-1.0.1+torch2.6-cp312-cp312-linux_x86_64.whl"]
    assert listing.where == f"{server.url}/api/v3/repos/o/r/releases/tags/v1.0.1"


def test_huggingface_listing_speaks_the_hub_tree_api(tmp_path: Path) -> None:
    """A Hub repo holding wheels (like nunchaku-tech/nunchaku), listed with HfApi against the Hub
    stand-in; the host fetches `{endpoint}/{repo}/resolve/main/{path}`, checked by the LFS sha256."""
    from provisioner.sandbox.hf_server import start_hf_server

    wheel = _wheel(tmp_path, "1.0.1", "torch2.8-cp312-linux_x86_64")
    other = _wheel(tmp_path / "o", "1.0.1", "torch2.6-cp312-linux_x86_64")
    files = {("nunchaku-tech/nunchaku", f"v1.0.1/{wheel.name}"): wheel,
             ("nunchaku-tech/nunchaku", f"v1.0.1/{other.name}"): other,
             ("nunchaku-tech/nunchaku", "README.md"): b"# wheels\n"}
    with start_hf_server(files) as hub:
        profile = make_profile("1.0.1", [WheelSource("huggingface", "nobody/missing"),
                                         WheelSource("huggingface", "nunchaku-tech/nunchaku")])
        profile = Profile(**{**profile.__dict__, "huggingface": HubSpec(endpoint=hub.url, token_env="NO_SUCH_ENV")})
        (change,) = backend.plan(profile, make_facts({"torch": "2.8.0+cu128", "tag": "cp312",
                                                      "platform": "linux_x86_64"})).changes
        fetch = change.steps[0]
        with urllib.request.urlopen(fetch.url) as resp:       # Hub -> 302 -> CDN bytes
            data = resp.read()
    assert fetch.url == f"{hub.url}/nunchaku-tech/nunchaku/resolve/main/v1.0.1/{wheel.name.replace('+', '%2B')}"
    assert data == wheel.read_bytes()
    assert (fetch.sha256, fetch.size) == (hashlib.sha256(data).hexdigest(), len(data))
    assert fetch.token_env == "NO_SUCH_ENV"
