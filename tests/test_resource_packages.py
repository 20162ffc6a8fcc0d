"""packages resource: YAML cases (profile + facts in, change out) and one real pip run."""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import venv
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioner.config.model import build_profile
from provisioner.config.inventory import Host
from provisioner.connection.local import LocalConnection
from provisioner.errors import PlanError
from provisioner.facts.model import Distribution, Facts, Probe, PythonEnv, canonical
from provisioner.resources import packages, snapshot
from provisioner.resources.base import Run

CASES = sorted((Path(__file__).parent / "resources" / "packages").glob("*.yaml"))
# A ComfyUI venv with torch and the backend's requirements met: a case overrides a version, removes
# a package with `name: null`, or starts `bare`.
READY = {"torch": "2.6.0+cu124", "torchvision": "0.21.0+cu124", "accelerate": "1.11.0", "einops": "0.8.1",
         "huggingface-hub": "0.35.3", "protobuf": "6.32.1", "sentencepiece": "0.2.1",
         "transformers": "4.57.1", "diffusers": "0.35.2", "peft": "0.17.1"}


def make_profile(fragment: dict[str, Any], root: str = "/srv/ComfyUI"):
    return build_profile({"comfyui": {"root": root}, **fragment}, name="t", file="/p/profiles/t.yaml")


def make_facts(python: str, distributions: dict[str, str], *, exists: bool = True,
               error: str | None = None, version: str = "3.12.3") -> Facts:
    dists = {canonical(n): Distribution(n, v) for n, v in distributions.items()}
    env = PythonEnv(python=python, exists=exists, version=version if exists else None,
                    distributions=dists, error=error)
    return Facts(host="h", os="Ubuntu 24.04", arch="x86_64", kernel="6.8", system_python="3.12",
                 env=env, gpus=(), gpu_error="no nvidia-smi", nvcc=None, disk_path="/srv",
                 disk_free=10**12, comfyui_version="0.3.64")


def step_view(step: object) -> object:
    assert isinstance(step, Run)
    if step.stdin is not None:                    # the hold program: its request names the file, pip's args follow
        return {"hold": json.loads(step.stdin)["dest"], "pip": [step.argv[0], *step.argv[3:]]}
    return list(step.argv)


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_case(case: Path) -> None:
    data = yaml.safe_load(case.read_text())
    profile = make_profile(data["profile"])
    f = data["facts"]
    installed = {n: v for n, v in {**({} if f.get("bare") else READY), **(f.get("distributions") or {})}.items()
                 if v is not None}
    facts = make_facts(profile.comfyui.python, installed,
                       exists=f.get("venv_exists", True), error=f.get("venv_error"),
                       version=f.get("python", "3.12.3"))
    if "plugin_requirements" in f:     # what the facts program's `git show` read from the checkout
        facts = replace(facts, shown={packages.probe(profile).show[0]: f["plugin_requirements"]})
    if "error" in data:
        with pytest.raises(PlanError) as err:
            packages.plan(profile, facts)
        assert data["error"] in str(err.value)
        assert "\n" not in str(err.value)
        return
    result = packages.plan(profile, facts)
    got = result.changes
    if "notes" in data:
        assert [n.message for n in result.notes] == data["notes"]
    assert len(got) == len(data["expect"])
    for change, want in zip(got, data["expect"]):
        assert change.resource == "packages"
        view = {"key": change.key, "action": change.action, "summary": change.summary,
                "before": dict(change.before or {}), "after": dict(change.after or {}),
                "steps": [step_view(s) for s in change.steps], "notify": sorted(change.notify)}
        for field, value in want.items():
            assert view[field] == value, field
        # One step however many are unmet: the torch family held, then pip, by the venv's own python.
        (run,) = change.steps
        assert isinstance(run, Run) and run.argv[0] == "/srv/ComfyUI/venv/bin/python"
        assert json.loads(run.stdin or b"") == {"dest": "/srv/ComfyUI/.provision/constraints.txt",
                                                "names": ["torch", "torchaudio", "torchvision", "triton"],
                                                "prefixes": ["nvidia-"]}
        assert run.argv[6:8] == ("-c", "/srv/ComfyUI/.provision/constraints.txt")


def test_probe_asks_nothing_beyond_base_facts_for_a_known_plugin_tag() -> None:
    assert packages.probe(make_profile({})) == Probe()
    assert packages.probe(make_profile({"plugin": {"tag": "v1.3.0"}})) == Probe(show=(
        ("/srv/ComfyUI/custom_nodes/ComfyUI-nunchaku", "refs/tags/v1.3.0:requirements.txt"),))


def test_default_profile_packages_are_the_seed_floors() -> None:
    reqs = packages.requirements(make_profile({}))
    assert [str(r) for r in reqs] == ["diffusers>=0.35", "peft>=0.17"]


# --- one real pip run: a real venv, a local index, the argv through the one quoting edge -------

def _wheel(folder: Path, version: str) -> Path:
    """A minimal valid pure-Python wheel of `demo-pkg` (what setuptools would produce)."""
    dist_info = f"demo_pkg-{version}.dist-info"
    files = {
        "demo_pkg/__init__.py": f"VERSION = {version!r}\n".encode(),
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: demo-pkg\nVersion: {version}\n".encode(),
        f"{dist_info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    path = folder / f"demo_pkg-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return path


def _installed(python: str) -> dict[str, str]:
    code = ("import json, importlib.metadata as m; "
            "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))")
    return json.loads(subprocess.run([python, "-c", code], capture_output=True, text=True,
                                     check=True).stdout)


def test_real_pip_install_converges_and_floor_survives_the_shell(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ComfyUI"
    venv.create(root / "venv", with_pip=True)
    wheels, index = tmp_path / "wheels", tmp_path / "empty-index"
    wheels.mkdir(), index.mkdir()
    _wheel(wheels, "1.0"), _wheel(wheels, "2.0")
    # A backend release the catalog does not know adds no Requires-Dist: demo-pkg alone is planned.
    profile = make_profile({"packages": ["demo-pkg>=2.0"], "backend": {"version": "9.9.9"},
                            "pip": {"index_url": index.as_uri(), "find_links": [str(wheels)]}},
                           root=str(root))
    python = profile.comfyui.python
    # An old version first, as a host that ran the seed's script would have.
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-index", "--find-links", str(wheels),
                    "demo-pkg==1.0"], check=True, capture_output=True)

    facts = make_facts(python, _installed(python))
    (change,) = packages.plan(profile, facts).changes
    assert change.before == {"demo-pkg": "1.0"}
    (step,) = change.steps
    conn = LocalConnection(Host(name="here", transport="local"))
    # As a host runs it, through the login line and the supervisor: `>=2.0` must stay a specifier,
    # not become a redirection to a file `=2.0`.
    monkeypatch.chdir(tmp_path)
    conn.run(step.argv, stdin=step.stdin)                       # on the host, by the venv's own python
    assert (root / ".provision" / "constraints.txt").read_text().splitlines()[1:] == []   # no torch here
    assert not (tmp_path / "=2.0").exists()

    after = _installed(python)
    assert after["demo-pkg"] == "2.0"
    assert packages.plan(profile, make_facts(python, after)).changes == ()


def test_a_change_that_replaces_installed_versions_has_the_snapshot_before_it_keep_their_wheels() -> None:
    """Said in the plan, before anything changes: the snapshot before the change keeps the wheels of
    what it replaces (fetched from the index they came from, checked), and under the verify gate one
    it cannot keep stops the host. Adding a package replaces nothing."""
    profile = make_profile({"backend": {"version": "1.2.1"}, "plugin": {"tag": "v1.2.1"},
                            "pip": {"index_url": "https://pkgs.example/simple"}})
    facts = make_facts(profile.comfyui.python, {**READY, "diffusers": "0.35.2"})
    (change,) = packages.plan(profile, facts).changes
    assert change.replaces == {"diffusers"} and change.warnings == ()
    before = snapshot.before_apply(profile, facts, [change], undo_required=True)
    (note,) = before.notes
    assert note.message.startswith("before the changes, the snapshot keeps the wheels of diffusers 0.35.2, which "
                                   "they replace") and "stops this host, unchanged (--verify-gate)" in note.message
    (take,) = before.prelude
    request = json.loads(take.stdin)
    assert request["replaced"] == ["diffusers"] and request["undo_required"] is True
    assert request["sources"]["pip"] == ["--index-url", "https://pkgs.example/simple"]   # where it is fetched from
    bare = make_facts(profile.comfyui.python, {n: v for n, v in READY.items() if n != "diffusers"})
    (added,) = packages.plan(profile, bare).changes
    assert added.replaces == frozenset()
    assert snapshot.before_apply(profile, bare, [added]).notes == ()
