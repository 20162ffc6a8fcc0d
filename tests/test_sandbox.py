"""The sandbox plays GPU hosts faithfully: real wheels, real pip, real venvs, real git, real captures."""

from __future__ import annotations

import ast
import base64
import csv
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from provisioner.errors import ProvisionError
from provisioner.sandbox.gitrepo import add_plugin_tag, make_plugin_repo
from provisioner.sandbox.host import (gpu_config, install_nvidia_smi, installed_torch, make_sandbox_host,
                                      make_venv_template, own_scripts, set_vram_used)
from provisioner.sandbox.wheels import (build_impostor_nunchaku, build_nunchaku_wheel,
                                        build_package_wheelhouse, build_torch_wheel, build_torch_wheelhouse, build_wheel,
                                        current_python_tag)

QUERY = "index,name,uuid,memory.total,memory.used,memory.free,driver_version,compute_cap,pci.bus_id"
H100 = Path(__file__).resolve().parents[1] / "provisioner" / "sandbox" / "captures" / "h100-80gb"
METADATA_PY = (
    "import importlib.metadata as m, json, sys\n"
    "print(json.dumps({n: [m.version(n), m.metadata(n)['Summary'], m.metadata(n)['Home-page']]"
    " for n in sys.argv[1:]}))\n"
)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_venv_template(tmp_path_factory.mktemp("tpl") / "venv", torch="2.6.0+cu124")


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheels")
    build_nunchaku_wheel(out / "release", python_tag=current_python_tag())
    build_impostor_nunchaku(out / "pypi")
    build_package_wheelhouse(out / "house")
    return out


def pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args], check=True,
                   capture_output=True)


def dists(python: Path, *names: str) -> dict[str, list[str]]:
    out = subprocess.run([str(python), "-c", METADATA_PY, *names], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def smi(host_env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nvidia-smi", *args], env=host_env, capture_output=True, text=True)


def test_wheel_record_matches_every_file(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path, "Some.Pkg", "1.2+local", {"some_pkg/__init__.py": "x = 1\n"},
                        requires=["peft>=0.17"], summary="s")
    assert wheel.name == "some_pkg-1.2+local-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as zf:
        rows = list(csv.reader(zf.read("some_pkg-1.2+local.dist-info/RECORD").decode().splitlines()))
        assert {r[0] for r in rows} == set(zf.namelist())
        for path, digest, size in rows:
            if path.endswith("RECORD"):
                assert digest == size == ""
                continue
            data = zf.read(path)
            expect = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, int(size)) == (f"sha256={expect}", len(data))
        assert "Requires-Dist: peft>=0.17" in zf.read("some_pkg-1.2+local.dist-info/METADATA").decode()
    assert build_wheel(tmp_path / "again", "Some.Pkg", "1.2+local", {"some_pkg/__init__.py": "x = 1\n"},
                       requires=["peft>=0.17"], summary="s").read_bytes() == wheel.read_bytes()


def test_nunchaku_wheel_is_named_like_the_release_asset(tmp_path: Path) -> None:
    wheel = build_nunchaku_wheel(tmp_path)
    assert wheel.name == "nunchaku-1.0.1+torch2.6-cp312-cp312-linux_x86_64.whl"
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read("nunchaku-1.0.1+torch2.6.dist-info/METADATA").decode()
        assert "Root-Is-Purelib: false" in zf.read("nunchaku-1.0.1+torch2.6.dist-info/WHEEL").decode()
    assert "Version: 1.0.1+torch2.6" in meta
    assert "Home-page: https://github.com/nunchaku-tech/nunchaku" in meta
    assert "Requires-Dist: diffusers>=0.35.1" in meta and "Requires-Dist: torchvision>=0.20" in meta
    assert build_nunchaku_wheel(tmp_path, "1.2.1", "2.9", "cp313", cuda="13.0").name == \
        "nunchaku-1.2.1+cu13.0torch2.9-cp313-cp313-linux_x86_64.whl"
    assert build_nunchaku_wheel(tmp_path, "1.0.1", "2.8", "cp311").name.endswith("+torch2.8-cp311-cp311-linux_x86_64.whl")


def test_torch_version_py_reads_like_real_torch(tmp_path: Path) -> None:
    for version, cuda in (("2.6.0+cu124", "12.4"), ("2.6.0+cpu", None)):
        with zipfile.ZipFile(build_torch_wheel(tmp_path / version, version, cuda)) as zf:
            tree = ast.parse(zf.read("torch/version.py"))
        values = {n.targets[0].id if isinstance(n, ast.Assign) else n.target.id: ast.literal_eval(n.value)
                  for n in tree.body if isinstance(n, (ast.Assign, ast.AnnAssign))}
        assert values["__version__"] == version and values["cuda"] == cuda


def test_wheels_install_offline_with_real_pip(tmp_path: Path, template: Path, wheels: Path) -> None:
    host = make_sandbox_host(tmp_path, gpu="rtx3090", venv_template=template)
    py = host.python
    pip(py, "install", "--no-index", "--find-links", str(wheels / "pypi"), "nunchaku")
    impostor = dists(py, "nunchaku")["nunchaku"]
    assert impostor[0] == "0.16.1" and "segment" in impostor[1]
    pip(py, "install", "--no-index", "--no-deps", "--find-links", str(wheels / "release"),
        "--find-links", str(wheels / "house"), "nunchaku==1.0.1+torch2.6", "diffusers>=0.35", "peft>=0.17")
    found = dists(py, "nunchaku", "diffusers", "peft", "torch")
    assert found["nunchaku"] == ["1.0.1+torch2.6", found["nunchaku"][1], "https://github.com/nunchaku-tech/nunchaku"]
    assert (found["diffusers"][0], found["peft"][0], found["torch"][0]) == ("0.36.0", "0.17.1", "2.6.0+cu124")  # the newest stand-in
    assert "stand-in" in found["diffusers"][1]
    # The compatibility break is reproduced for real: plugin v1.2.0 on core 0.3.64 fails at load time.
    repo = make_plugin_repo(tmp_path / "plugin.git")
    cores = {"0.3.64": host.comfyui_root,
             "0.6.0": make_sandbox_host(tmp_path / "new", comfyui_version="0.6.0", venv_template=template).comfyui_root,
             "0.23.0": make_sandbox_host(tmp_path / "moved", comfyui_version="0.23.0",
                                         venv_template=template).comfyui_root}
    load = ("import importlib, sys; sys.path[:0] = sys.argv[1:]\n"
            "p = importlib.import_module('ComfyUI-nunchaku')\n"
            "p.NODE_CLASS_MAPPINGS['NunchakuQwenImageDiTLoader']().load_model('m.safetensors')\n")
    for tag, core, ok in (("v1.1.0", "0.3.64", True), ("v1.2.0", "0.3.64", False), ("v1.2.0", "0.6.0", True),
                          ("v1.2.0", "0.23.0", False)):
        plugins = tmp_path / f"plugins-{tag}"
        if not plugins.exists():
            subprocess.run(["git", "clone", "-q", "--branch", tag, str(repo), str(plugins / "ComfyUI-nunchaku")],
                           check=True, capture_output=True)
        run = subprocess.run([str(py), "-c", load, str(cores[core]), str(plugins)], capture_output=True, text=True)
        assert (run.returncode == 0) == ok, run.stderr
        if not ok and core == "0.23.0":      # core 0.23 moved the symbol the plugin imports (#820)
            assert "cannot import name 'apply_rotary_emb'" in run.stderr
        elif not ok:
            assert "unexpected keyword argument 'use_additional_t_cond'" in run.stderr


def test_copied_venv_uses_its_own_site_packages(tmp_path: Path, template: Path) -> None:
    host = make_sandbox_host(tmp_path, venv_template=template)
    code = "import sys, torch, torch.version as v; print(sys.prefix); print(torch.__file__); print(v.cuda)"
    prefix, torch_file, cuda = subprocess.run([str(host.python), "-c", code], check=True, capture_output=True,
                                              text=True).stdout.split()
    assert Path(prefix) == host.venv and Path(torch_file).is_relative_to(host.venv) and cuda == "12.4"
    assert not Path(torch_file).is_relative_to(template)


def test_host_torch_differs_from_template(tmp_path: Path, template: Path) -> None:
    none = make_sandbox_host(tmp_path / "cpu-less", torch=None, venv_template=template)
    newer = make_sandbox_host(tmp_path / "newer", torch="2.8.0+cu128", venv_template=template)
    assert installed_torch(none.venv) is None and installed_torch(template) == "2.6.0+cu124"
    version_py = next(newer.venv.glob("lib/python3*/site-packages/torch/version.py")).read_text()
    assert "__version__ = '2.8.0+cu128'" in version_py and "cuda: Optional[str] = '12.8'" in version_py


def test_comfyui_checkout_layout(tmp_path: Path, template: Path) -> None:
    old = make_sandbox_host(tmp_path / "old", venv_template=template)
    new = make_sandbox_host(tmp_path / "new", comfyui_version="0.6.0", venv_template=template)
    comfy = old.comfyui_root
    assert (comfy / "comfyui_version.py").read_text().endswith('__version__ = "0.3.64"\n')
    for rel in ("main.py", "custom_nodes", "user", "input", "output", "models/diffusion_models",
                "models/text_encoders", "models/vae", "models/loras"):
        assert (comfy / rel).exists(), rel
    model = "comfy/ldm/qwen_image/model.py"
    assert "use_additional_t_cond" not in (comfy / model).read_text()
    assert "use_additional_t_cond=False" in (new.comfyui_root / model).read_text()


def test_nvidia_smi_h100_equals_real_capture(tmp_path: Path, template: Path) -> None:
    host = make_sandbox_host(tmp_path, gpu="h100", venv_template=template)
    assert smi(host.env(), f"--query-gpu={QUERY}", "--format=csv,noheader,nounits").stdout == \
        (H100 / "nvidia-smi-query.csv").read_text()
    header = smi(host.env(), "--query-gpu=index,name,memory.total,compute_cap", "--format=csv").stdout
    assert header == (H100 / "nvidia-smi-query-header.csv").read_text()
    plain = smi(host.env()).stdout.splitlines()
    assert plain[1:] == (H100 / "nvidia-smi.txt").read_text().splitlines()[1:]
    assert str(H100) not in (host.bin_dir / "nvidia-smi").read_text()  # the values travel, not the path


@pytest.mark.parametrize("gpu,name,total,cc", [
    ("rtx3090", "NVIDIA GeForce RTX 3090", 24576, "8.6"),
    ("rtx4090", "NVIDIA GeForce RTX 4090", 24564, "8.9"),
    ("a100-80gb", "NVIDIA A100-SXM4-80GB", 81920, "8.0"),
    ("rtx5090", "NVIDIA GeForce RTX 5090", 32607, "12.0"),
])
def test_nvidia_smi_presets_parse_and_follow_vram_state(tmp_path: Path, gpu: str, name: str, total: int,
                                                        cc: str) -> None:
    (tmp_path / "bin").mkdir()
    install_nvidia_smi(tmp_path / "bin", gpu_config(gpu, tmp_path / "gpu-state.json"))
    env = {"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin"}
    index, got_name, uuid, mem_total, used, free, driver, got_cc, bus = \
        smi(env, f"--query-gpu={QUERY}", "--format=csv,noheader,nounits").stdout.strip().split(", ")
    assert (index, got_name, int(mem_total), got_cc) == ("0", name, total, cc)
    assert uuid.startswith("GPU-") and int(used) == 0 and 0 < int(free) < total and driver[:3].isdigit()
    set_vram_used(tmp_path, 7910)
    assert smi(env, "--query-gpu=memory.used", "--format=csv,noheader,nounits").stdout == "7910\n"
    assert int(smi(env, "--query-gpu=memory.free", "--format=csv,noheader,nounits").stdout) == int(free) - 7910
    assert f"7910MiB / {total:>6}MiB" in smi(env).stdout


def test_nvidia_smi_failures(tmp_path: Path, template: Path) -> None:
    broken = make_sandbox_host(tmp_path / "broken", gpu="broken-driver", venv_template=template)
    run = smi(broken.env(), f"--query-gpu={QUERY}", "--format=csv,noheader,nounits")
    assert run.returncode == 9 and run.stdout.startswith("NVIDIA-SMI has failed because it couldn't communicate")
    bad = smi(broken.env() | {"PATH": broken.path}, "-L")
    assert bad.returncode == 9
    ok = make_sandbox_host(tmp_path / "ok", gpu="rtx3090", venv_template=template)
    field = smi(ok.env(), "--query-gpu=name,bogus", "--format=csv")
    assert (field.returncode, field.stdout.strip()) == (2, 'Field "bogus" is not a valid field to query.')
    none = make_sandbox_host(tmp_path / "none", gpu=None, venv_template=template)
    assert shutil.which("nvidia-smi", path=none.path) is None
    with pytest.raises(ProvisionError, match="rtx3090"):
        make_sandbox_host(tmp_path / "typo", gpu="rtx3080", venv_template=template)


def test_plugin_repo_tags_and_trees(tmp_path: Path) -> None:
    repo = make_plugin_repo(tmp_path / "a.git")
    refs = subprocess.run(["git", "-C", str(repo), "for-each-ref", "--format=%(refname:short) %(objecttype)",
                           "refs/tags"], check=True, capture_output=True, text=True).stdout.split("\n")
    assert refs[:4] == ["v1.0.0 commit", "v1.0.2 commit", "v1.1.0 commit", "v1.2.0 commit"]

    def show(rev: str, path: str, where: Path = repo) -> str:
        return subprocess.run(["git", "-C", str(where), "show", f"{rev}:{path}"], check=True, capture_output=True,
                              text=True).stdout

    assert "use_additional_t_cond=" in show("v1.2.0", "nodes/models/qwenimage.py")
    assert "use_additional_t_cond" not in show("v1.1.0", "nodes/models/qwenimage.py")
    assert 'min_nunchaku_version = "1.0.0"' in show("v1.1.0", "__init__.py")
    assert 'version = "1.0.2"' in show("v1.0.2", "pyproject.toml")
    # Each tag's requirements.txt as upstream's (v1.0.0 lists accelerate twice, as upstream does).
    assert show("v1.0.0", "requirements.txt").split()[:3] == ["diffusers>=0.35", "accelerate", "sentencepiece"]
    assert show("v1.2.0", "requirements.txt").split() == [
        "diffusers>=0.35", "transformers>=4.54", "sentencepiece", "protobuf", "huggingface_hub>=0.34", "tomli",
        "peft>=0.17", "accelerate>=1.10", "insightface", "opencv-python", "facexlib", "onnxruntime", "timm"]
    again = make_plugin_repo(tmp_path / "b.git")

    def sha(where: Path, rev: str) -> str:
        return subprocess.run(["git", "-C", str(where), "rev-parse", rev], check=True, capture_output=True,
                              text=True).stdout.strip()

    assert sha(repo, "v1.2.0") == sha(again, "v1.2.0")  # deterministic commits
    new = add_plugin_tag(repo, "v1.2.1")
    assert sha(repo, "v1.2.1") == new == sha(repo, "main") and 'version = "1.2.1"' in show("v1.2.1", "pyproject.toml")
    with pytest.raises(ProvisionError):
        add_plugin_tag(repo, "1.3.0")


def test_current_python_tag() -> None:
    assert current_python_tag() == f"cp{sys.version_info[0]}{sys.version_info[1]}"


def _cpython312() -> str | None:
    found = [shutil.which("python3.12"), *map(str, sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")))]
    return next((p for p in found if p and subprocess.run([p, "-c", ""], capture_output=True).returncode == 0), None)


def test_default_cp312_nunchaku_wheel_installs_into_a_cp312_venv(tmp_path: Path) -> None:
    py312 = _cpython312()
    if py312 is None:
        pytest.skip("needs a CPython 3.12 interpreter")
    venv = tmp_path / "venv312"
    subprocess.run([py312, "-m", "venv", "--without-pip", str(venv)], check=True)  # pip runs from outside
    # --no-deps, as the backend resource installs it: the stand-in carries 1.0.1's real Requires-Dist.
    pip(Path(sys.executable), "--python", str(venv / "bin/python"), "install", "--no-index", "--no-deps",
        str(build_nunchaku_wheel(tmp_path)))
    assert dists(venv / "bin/python", "nunchaku")["nunchaku"][0] == "1.0.1+torch2.6"


def test_copied_venv_scripts_point_at_the_copy(tmp_path: Path) -> None:
    """`venv/bin/pip` of a host made from a template installs into that host, not the template."""
    template = make_venv_template(tmp_path / "template", torch=None)
    host = make_sandbox_host(tmp_path / "h", gpu=None, torch=None, venv_template=template)
    shebang = (host.venv / "bin" / "pip").read_text().splitlines()[0]
    assert str(host.venv) in shebang and str(template) not in shebang


def test_owning_the_scripts_of_a_hard_linked_copy_leaves_the_template_alone(tmp_path: Path) -> None:
    """The real tier's hosts are `cp -al` copies of one cached venv: their scripts are replaced by
    new files, never rewritten through the link (which would point the cache at one host)."""
    template = make_venv_template(tmp_path / "template", torch=None)
    pip = template / "bin" / "pip"
    before = pip.read_bytes()
    subprocess.run(["cp", "-al", str(template), str(tmp_path / "copy")], check=True)
    own_scripts(tmp_path / "copy", template)
    assert pip.read_bytes() == before
    copied = tmp_path / "copy" / "bin" / "pip"
    assert copied.stat().st_ino != pip.stat().st_ino and copied.stat().st_mode == pip.stat().st_mode
    assert str(tmp_path / "copy") in copied.read_text().splitlines()[0]


def test_what_a_host_venv_runs_needs_only_the_standard_library() -> None:
    """A bare host's venv, made by provision, runs the stand-in ComfyUI (main.py imports these) with
    nothing installed: no `packaging`, no numpy. `-S` leaves site-packages out, as that venv has none."""
    repo = Path(__file__).resolve().parents[1]
    modules = ["provisioner.sandbox.comfyui_process", "provisioner.sandbox.comfyui_server",
               "provisioner.sandbox.nvidia_smi"]
    code = f"import sys; sys.path.insert(0, {str(repo)!r}); " + "; ".join(f"import {m}" for m in modules)
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_torch_is_an_index_install_and_only_the_torch_index_serves_its_builds(tmp_path: Path, template: Path) -> None:
    """As in the real world: a venv's torch was installed by name from PyTorch's index (pip keeps no
    direct_url.json for it), and the package wheelhouse serves no `+cuXYZ` torch build; only the
    per-flavour torch wheelhouse does. A rollback that asks the wrong one fails here as it would there."""
    assert not list(template.glob("lib/python3*/site-packages/torch-*.dist-info/direct_url.json"))
    assert list(template.glob("lib/python3*/site-packages/torch-*.dist-info/METADATA"))
    house, torch_index = build_package_wheelhouse(tmp_path / "wheelhouse"), build_torch_wheelhouse(tmp_path / "torch")
    python = str(template / "bin" / "python")

    def download(*args: str) -> int:
        return subprocess.run([python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                               "--dest", str(tmp_path / "got"), "--no-index", *args, "torch==2.6.0+cu124"],
                              capture_output=True).returncode

    assert download("--find-links", str(house)) != 0
    assert download("--find-links", str(house), "--find-links", str(torch_index / "cu124")) == 0
