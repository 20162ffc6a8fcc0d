"""Facts: parser on real captures and data cases; the script run for real against a ComfyUI-like tree."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest
from rich.console import Console

from provisioner.config.model import ComfySpec, Profile
from provisioner.config.inventory import Host
from provisioner.connection.base import LOGIN_LINE, Result
from provisioner.connection.local import LocalConnection
from provisioner.errors import FactsError
from provisioner.facts import (
    Distribution,
    Probe,
    base_probe,
    facts_to_json,
    gather,
    is_real_nunchaku,
    parse_facts,
    parse_nvidia_smi_csv,
    render_facts,
)
from provisioner import remote
from provisioner.facts.gather import facts_argv, read_answer
from provisioner.facts.parse import parse_gpus
from provisioner.remote.facts import VENV_SNIPPET

REPO = Path(__file__).resolve().parents[1]
H100 = REPO / "provisioner" / "sandbox" / "captures" / "h100-80gb"
CASES = sorted((Path(__file__).parent / "facts").glob("*.json"))


# --- parser: real captures --------------------------------------------------------------------

def test_real_h100_capture_parses() -> None:
    (gpu,) = parse_nvidia_smi_csv((H100 / "nvidia-smi-query.csv").read_text())
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert (gpu.vram_total_mib, gpu.vram_used_mib, gpu.vram_free_mib) == (81559, 0, 81079)
    assert gpu.compute_capability == (9, 0) and gpu.precision is None   # nunchaku refuses sm_90
    assert gpu.driver == "580.159.04"
    assert gpu.uuid == "GPU-4428ace9-bc98-9d4b-7bb0-0403ec9177c0"
    assert gpu.pci_bus_id == "00000000:00:06.0"


def test_header_and_unit_capture_gives_no_gpu_rows() -> None:
    # The capture with a header and units has 4 columns: not our query's rows, so nothing is invented.
    assert parse_nvidia_smi_csv((H100 / "nvidia-smi-query-header.csv").read_text()) == ()


def test_real_nvcc_capture_version() -> None:
    text = (H100 / "host-facts.txt").read_text()
    nvcc = text[text.index("nvcc: NVIDIA"):text.index("Linux vm")]
    from provisioner.facts.parse import parse_nvcc
    assert parse_nvcc(nvcc) == "13.0.88"


def test_driver_failure_is_no_gpu_with_reason() -> None:
    msg = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
           "Make sure that the latest NVIDIA driver is installed and running.")
    gpus, why = parse_gpus({"found": True, "exit_code": 9, "stdout": msg + "\n", "stderr": ""})
    assert gpus == () and why == msg


# --- parser: data cases (raw answer in -> parsed fields out) ----------------------------------

def _subset(expected: object, actual: object, where: str = "") -> None:
    if isinstance(expected, dict):
        assert isinstance(actual, dict), where
        for key, value in expected.items():
            assert key in actual, f"{where}.{key} missing"
            _subset(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list) and expected and isinstance(expected[0], dict):
        assert isinstance(actual, list) and len(actual) == len(expected), where
        for i, (e, a) in enumerate(zip(expected, actual)):
            _subset(e, a, f"{where}[{i}]")
    else:
        assert actual == expected, f"{where}: {actual!r} != {expected!r}"


@pytest.mark.parametrize("path", CASES, ids=[p.stem for p in CASES])
def test_data_case(path: Path) -> None:
    case = json.loads(path.read_text())
    if "error" in case:
        with pytest.raises(FactsError, match="^case-host: ") as err:
            parse_facts("case-host", case["answer"])
        assert case["error"] in str(err.value) and "\n" not in str(err.value)
        return
    out = facts_to_json(parse_facts("case-host", case["answer"]))
    assert json.loads(json.dumps(out)) == out           # JSON-able as is
    _subset(case["expected"], out)


def test_json_keys_are_stable() -> None:
    answer = json.loads((Path(__file__).parent / "facts" / "h100-real-backend.json").read_text())["answer"]
    a = json.dumps(facts_to_json(parse_facts("h", answer)))
    answer["git"] = dict(reversed(list(answer["git"].items())))
    assert json.dumps(facts_to_json(parse_facts("h", answer))) == a


@pytest.mark.parametrize("dist, real", [
    (Distribution("nunchaku", "1.0.1+torch2.6"), True),
    (Distribution("nunchaku", "1.2.1+cu13.0torch2.11"), True),       # 1.2.1 names the CUDA too
    (Distribution("nunchaku", "1.0.1", home="https://github.com/mit-han-lab/nunchaku"), True),
    (Distribution("Nunchaku", "1.0.1", summary="see github.com/nunchaku-ai/nunchaku"), True),
    (Distribution("nunchaku", "0.16.1", summary="Optimally partition data into piece-wise linear segments"), False),
    (Distribution("nunchaku", "0.16.1+local"), False),
    (Distribution("comfyui-nunchaku", "1.1.0+torch2.6"), False),
])
def test_is_real_nunchaku(dist: Distribution, real: bool) -> None:
    assert is_real_nunchaku(dist) is real


# --- the script itself ------------------------------------------------------------------------

def test_script_is_python38_stdlib_only() -> None:
    # The venv snippet may ask the venv's own pip (or packaging) which wheel tags it accepts:
    # optional, inside a try, so a venv without either still answers.
    for source, optional in ((remote.source("facts"), set()), (VENV_SNIPPET, {"pip", "packaging"})):
        tree = ast.parse(source, feature_version=(3, 8))
        guarded = {id(n) for t in ast.walk(tree) if isinstance(t, ast.Try) for b in t.body for n in ast.walk(b)}
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                top = name.split(".")[0]
                assert top in sys.stdlib_module_names or (top in optional and id(node) in guarded), name


class SubprocessConnection(LocalConnection):
    """The local transport, its supervisor started as sshd starts it: the login line, by sh, in a
    chosen environment (a hermetic PATH)."""

    launcher = ("/bin/sh", "-c", LOGIN_LINE)

    def __init__(self, env: Mapping[str, str], name: str = "local") -> None:
        super().__init__(Host(name=name, transport="local"))
        self.env = dict(env)


def _git(cwd: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid",
           "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True,
                          text=True).stdout.strip()


def _repo(path: Path, files: Mapping[str, str], tag: str | None = None) -> str:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (path / name).write_text(text)
    _git(path, "init", "-q", "-b", "main")
    _git(path, "add", ".")
    _git(path, "commit", "-q", "-m", "init")
    if tag:
        _git(path, "tag", tag)
    return _git(path, "rev-parse", "HEAD")


def _dist_info(site: Path, name: str, version: str, **headers: str) -> None:
    info = site / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    extra = "".join(f"{k.replace('_', '-')}: {v}\n" for k, v in headers.items())
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n{extra}\n")


def _exe(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


class _Stats(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.send_response(200 if self.path == "/system_stats" else 404)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory):
    """A ComfyUI-like tree with a real venv, real checkouts, fake GPU tools and a live HTTP port."""
    tmp = tmp_path_factory.mktemp("host")
    root = tmp / "ComfyUI"
    _repo(root, {"main.py": "", "comfyui_version.py": '__version__ = "0.3.64"\n'})
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True)
    (site,) = (root / "venv" / "lib").glob("python3*/site-packages")
    _dist_info(site, "torch", "2.6.0+cu124", Summary="Tensors and Dynamic neural networks")
    (site / "torch").mkdir()
    # Importing this torch would leave a mark: the script must read version.py, never import.
    (site / "torch" / "__init__.py").write_text(f"open({str(tmp / 'imported')!r}, 'w')\n")
    (site / "torch" / "version.py").write_text(
        "from typing import Optional\n__version__ = '2.6.0+cu124'\ndebug = False\n"
        "cuda: Optional[str] = '12.4'\ngit_version = 'abc'\nhip: Optional[str] = None\n")
    _dist_info(site, "nunchaku", "1.0.1+torch2.6", Home_page="https://github.com/nunchaku-tech/nunchaku")
    _dist_info(site, "diffusers", "0.35.1", Project_URL="Repository, https://github.com/huggingface/diffusers")
    plugin = root / "custom_nodes" / "ComfyUI-nunchaku"
    head = _repo(plugin, {"__init__.py": "# v1.1.0\n", "README.md": "x\n"}, tag="v1.1.0")
    _git(plugin, "remote", "add", "origin", "https://github.com/nunchaku-ai/ComfyUI-nunchaku.git")
    (plugin / "__init__.py").write_text("# edited by hand\n")
    (root / "custom_nodes" / "plain").mkdir()
    models = root / "models" / "diffusion_models"
    models.mkdir(parents=True)
    fresh, stale = models / "fresh.safetensors", models / "stale.safetensors"
    fresh.write_bytes(b"\0" * 4096)
    stale.write_bytes(b"\1" * 4096)
    cache = {str(p): {"size": p.stat().st_size, "mtime_ns": p.stat().st_mtime_ns,
                      "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in (fresh, stale)}
    (root / ".provision").mkdir()
    (root / ".provision" / "checksums.json").write_text(json.dumps(cache))
    stale.write_bytes(b"\1" * 5000)      # changed since it was hashed: its cached sum is void
    # A hermetic PATH: only what the script may use, plus the fake GPU tools.
    bare, tools = tmp / "bare", tmp / "bin"
    bare.mkdir(), tools.mkdir()
    # python3 on PATH may be a shim (pyenv) needing more of PATH: link the interpreter it runs.
    python3 = subprocess.run(["python3", "-c", "import sys; print(sys.executable)"], check=True,
                             capture_output=True, text=True).stdout.strip()
    for name, target in (("sh", shutil.which("sh")), ("git", shutil.which("git")), ("python3", python3)):
        for d in (bare, tools):
            (d / name).symlink_to(target)
    _exe(tools / "nvidia-smi", f"#!/bin/sh\n[ \"$1\" = --query-gpu=index,name,uuid,memory.total,"
         f"memory.used,memory.free,driver_version,compute_cap,pci.bus_id ] || exit 2\n"
         f"exec {shutil.which('cat')} {H100 / 'nvidia-smi-query.csv'}\n")
    host_facts = (H100 / "host-facts.txt").read_text()
    (tmp / "nvcc.txt").write_text(host_facts[host_facts.index("nvcc:"):host_facts.index("Linux vm")])
    _exe(tools / "nvcc", f"#!/bin/sh\nexec {shutil.which('cat')} {tmp / 'nvcc.txt'}\n")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stats)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    profile = Profile(name="t", file="t.yaml", inventory=None, hosts="all",
                      comfyui=ComfySpec(root=str(root), venv=str(root / "venv"),
                                        port=server.server_address[1]))
    yield dict(tmp=tmp, root=root, plugin=plugin, head=head, fresh=fresh, stale=stale, cache=cache,
               tools=tools, bare=bare, profile=profile)
    server.shutdown()


def _conn(path: Path | str) -> SubprocessConnection:
    return SubprocessConnection({"PATH": str(path), "LANG": "C.UTF-8"})


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_script_on_a_real_tree(host: dict) -> None:
    root, plugin, fresh, stale = host["root"], host["plugin"], host["fresh"], host["stale"]
    dead = f"http://127.0.0.1:{_closed_port()}/"
    probe = Probe(stat=(str(fresh), str(stale), str(root / "nope")),
                  read=(str(plugin / "README.md"), str(root / "nope")),
                  grep=((str(plugin / "__init__.py"), "edited"), (str(plugin / "README.md"), "edited"),
                        (str(root / "nope"), "x")),
                  git=(str(plugin), str(root / "custom_nodes" / "plain"), str(root / "custom_nodes" / "gone")),
                  http=(dead,))
    conn = _conn(host["tools"])
    facts = gather(conn, host["profile"], probe)
    assert conn.stats.execs == 1 and conn.stats.history[0][:4] == ("python3", "-I", "-S", "-c")

    env = facts.env
    assert env.exists and env.error is None
    assert env.version == "%d.%d.%d" % sys.version_info[:3]
    assert env.tag == "cp%d%d" % sys.version_info[:2] and env.platform.startswith("linux_")
    assert (env.torch, env.torch_cuda) == ("2.6.0+cu124", "12.4")
    assert not (host["tmp"] / "imported").exists()
    assert env.version_of("Diffusers") == "0.35.1"
    assert env.distributions["diffusers"].home == "https://github.com/huggingface/diffusers"
    assert is_real_nunchaku(env.distributions["nunchaku"])

    (gpu,) = facts.gpus
    assert gpu.name == "NVIDIA H100 80GB HBM3" and gpu.compute_capability == (9, 0)
    assert facts.gpu_error is None and facts.nvcc == "13.0.88"
    assert facts.comfyui_version == "0.3.64"
    assert Path(facts.disk_path) == root and facts.disk_free > 0
    with open("/proc/meminfo") as fh:                   # this machine's RAM, as the host script read it
        kb = next(int(line.split()[1]) for line in fh if line.startswith("MemTotal:"))
    assert facts.ram_total_mib == kb // 1024 and facts_to_json(facts)["ram_total_mib"] == kb // 1024
    assert facts.arch and facts.kernel and facts.system_python and 0 < facts.elapsed_s < 30
    assert facts.errors == ()

    assert facts.files[str(fresh)].sha256 == host["cache"][str(fresh)]["sha256"]
    assert facts.files[str(stale)].exists and facts.files[str(stale)].size == 5000
    assert facts.files[str(stale)].sha256 is None
    assert not facts.files[str(root / "nope")].exists
    assert facts.files[str(root / "venv")].exists            # base probe

    assert facts.contents[str(plugin / "README.md")] == "x\n"
    assert facts.contents[str(root / "nope")] is None
    assert facts.greps == {(str(plugin / "__init__.py"), "edited"): True,
                           (str(plugin / "README.md"), "edited"): False, (str(root / "nope"), "x"): False}

    checkout = facts.git[str(plugin)]
    assert checkout.is_repo and checkout.head == host["head"] and checkout.tags == ("v1.1.0",)
    assert checkout.branch == "main" and checkout.dirty == ("__init__.py",)
    assert checkout.remote == "https://github.com/nunchaku-ai/ComfyUI-nunchaku.git"
    plain = facts.git[str(root / "custom_nodes" / "plain")]
    assert plain.exists and not plain.is_repo and plain.head is None   # not ComfyUI's own repo
    assert not facts.git[str(root / "custom_nodes" / "gone")].exists
    assert facts.git[str(root)].is_repo and facts.git[str(root)].dirty   # venv/, .provision/, models/

    assert facts.http[host["profile"].comfyui.url + "/system_stats"] == 200
    assert facts.http[dead] is None


def test_the_comfyui_probe_reads_the_status_line_of_what_answers() -> None:
    """The facts program asks a plain http URL over a socket (no urllib: its imports were a quarter
    of the program's CPU) and must still tell a status, nothing listening, and a port that does not
    speak HTTP apart; an https URL still goes through urllib."""
    from provisioner.remote.facts import http_status

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stats)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    garbage = socket.socket()
    garbage.bind(("127.0.0.1", 0))
    garbage.listen()

    def babble() -> None:
        conn, _ = garbage.accept()
        with conn:
            conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    threading.Thread(target=babble, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert http_status(base + "/system_stats") == 200
        assert http_status(base + "/system_stats?x=1") == 404       # the query travels: another path
        assert http_status(base + "/") == 404
        assert http_status(f"http://127.0.0.1:{garbage.getsockname()[1]}/system_stats") is None
        assert http_status(f"http://127.0.0.1:{_closed_port()}/system_stats") is None
        assert http_status(f"https://127.0.0.1:{_closed_port()}/system_stats") is None
    finally:
        server.shutdown()
        garbage.close()


def test_an_unchanged_venv_is_answered_from_the_controllers_record(host: dict, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The venv's own python runs once; later runs send its fingerprint and the host answers
    "unchanged" (no interpreter started); an install or removal in site-packages is seen at once."""
    from provisioner.facts import venv_record

    raw: list[dict] = []
    merge = venv_record.merge
    monkeypatch.setattr(venv_record, "merge", lambda *a: raw.append(a[2]) or merge(*a))
    profile = dataclasses.replace(host["profile"], comfyui=dataclasses.replace(
        host["profile"].comfyui, venv=str(tmp_path / "venv")))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    (site,) = (tmp_path / "venv" / "lib").glob("python3*/site-packages")
    _dist_info(site, "diffusers", "0.35.1")
    first = gather(_conn(host["tools"]), profile)
    again = gather(_conn(host["tools"]), profile)
    assert "info" in raw[0] and raw[1].get("unchanged") is True
    assert again.env == first.env and again.env.distributions["diffusers"].version == "0.35.1"
    _dist_info(site, "peft", "0.17.1")
    changed = gather(_conn(host["tools"]), profile)
    assert "info" in raw[2] and "peft" in changed.env.distributions
    (tmp_path / "venv" / "pyvenv.cfg").write_text(
        (tmp_path / "venv" / "pyvenv.cfg").read_text().replace("= false", "= true"))
    gather(_conn(host["tools"]), profile)
    gather(_conn(host["tools"]), profile)
    assert "info" in raw[4]             # a venv that sees the system's packages is always asked


def test_detached_head_and_tags(host: dict) -> None:
    plugin = host["plugin"]
    _git(plugin, "checkout", "-q", "--detach", "v1.1.0")
    try:
        facts = gather(_conn(host["tools"]), host["profile"], Probe(git=(str(plugin),)))
    finally:
        _git(plugin, "checkout", "-q", "main")
    assert facts.git[str(plugin)].branch is None and facts.git[str(plugin)].tags == ("v1.1.0",)


def test_bare_host_is_facts_not_crashes(host: dict, tmp_path: Path) -> None:
    root = tmp_path / "srv" / "ComfyUI"               # nothing there yet
    profile = Profile(name="t", file="t.yaml", inventory=None, hosts="all",
                      comfyui=ComfySpec(root=str(root), venv=str(root / "venv"), port=_closed_port()))
    facts = gather(_conn(host["bare"]), profile, Probe(git=(str(root / "custom_nodes" / "x"),)))
    assert not facts.env.exists and facts.env.torch is None
    assert facts.gpus == () and facts.gpu_error == "nvidia-smi not found"
    assert facts.comfyui_version is None and Path(facts.disk_path) == tmp_path
    assert not facts.git[str(root)].exists and not facts.git[str(root / "custom_nodes" / "x")].exists
    assert set(facts.http.values()) == {None}


def test_broken_venv_and_driver_failure(host: dict, tmp_path: Path) -> None:
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    _exe(venv / "python", "#!/bin/sh\necho 'python: error while loading shared libraries: "
         "libpython3.10.so.1.0: cannot open shared object file' >&2\nexit 127\n")
    tools = tmp_path / "bin"
    shutil.copytree(host["bare"], tools, symlinks=True)
    _exe(tools / "nvidia-smi", "#!/bin/sh\necho \"NVIDIA-SMI has failed because it couldn't communicate"
         " with the NVIDIA driver. Make sure that the latest NVIDIA driver is installed and running.\"\n"
         "echo\nexit 9\n")
    profile = Profile(name="t", file="t.yaml", inventory=None, hosts="all",
                      comfyui=ComfySpec(root=str(tmp_path), venv=str(tmp_path / "venv"), port=_closed_port()))
    facts = gather(_conn(tools), profile)
    assert facts.env.exists and "libpython3.10.so.1.0" in facts.env.error
    assert facts.gpus == () and facts.gpu_error.startswith("NVIDIA-SMI has failed")


def test_dangling_venv_interpreter(host: dict, tmp_path: Path) -> None:
    (tmp_path / "venv" / "bin").mkdir(parents=True)
    (tmp_path / "venv" / "bin" / "python").symlink_to("/nonexistent/python3.10")
    profile = Profile(name="t", file="t.yaml", inventory=None, hosts="all",
                      comfyui=ComfySpec(root=str(tmp_path), venv=str(tmp_path / "venv"), port=_closed_port()))
    env = gather(_conn(host["bare"]), profile).env
    assert env.exists and "/nonexistent/python3.10" in env.error


def test_no_python3_is_a_clear_error(host: dict, tmp_path: Path) -> None:
    (tmp_path / "sh").symlink_to(shutil.which("sh"))
    conn = _conn(tmp_path)
    with pytest.raises(FactsError, match=r"^local: no python3 on the host; .*install it") as err:
        gather(conn, host["profile"])
    assert "\n" not in str(err.value) and conn.stats.execs == 1


def test_garbled_answer_names_stderr(host: dict, tmp_path: Path) -> None:
    # A `python3` that is not one (a python 2 or a wrapper): stdout is no JSON.
    (tmp_path / "sh").symlink_to(shutil.which("sh"))
    _exe(tmp_path / "python3", "#!/bin/sh\necho 'Python 2.7.18'\necho 'SyntaxError: invalid syntax' >&2\nexit 1\n")
    with pytest.raises(FactsError, match=r"answered no JSON \(exit 1\): SyntaxError: invalid syntax$"):
        gather(_conn(tmp_path), host["profile"])


def test_traceback_reports_its_last_line() -> None:
    result = Result(("sh",), 1, "", 'Traceback (most recent call last):\n  File "<string>", line 3\n'
                    "MemoryError: out of memory\n")
    with pytest.raises(FactsError, match="no JSON \\(exit 1\\): MemoryError: out of memory$"):
        read_answer("h", result)


def test_argv_is_a_list_carrying_the_source() -> None:
    assert facts_argv() == ["python3", "-I", "-S", "-c", remote.source("facts")]


def test_base_probe(host: dict) -> None:
    profile = host["profile"]
    probe = base_probe(profile)
    root = profile.comfyui.root
    assert probe.git == (root,) and profile.comfyui.venv in probe.stat
    assert f"{root}/comfyui_version.py" in probe.read
    assert probe.http == (f"http://127.0.0.1:{profile.comfyui.port}/system_stats",)


# --- rendering --------------------------------------------------------------------------------

def test_render_tables_and_unreachable() -> None:
    by_host: dict[str, object] = {}
    for name in ("h100-real-backend", "pypi-impostor", "bare-host"):
        answer = json.loads((Path(__file__).parent / "facts" / f"{name}.json").read_text())["answer"]
        by_host[name] = parse_facts(name, answer)
    by_host["down"] = FactsError("down: ssh: connect to host 10.0.0.9 port 22: Connection refused")
    out = io.StringIO()
    render_facts(by_host, Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    for needle in ("NVIDIA H100 80GB HBM3, 79.6 GiB total, 79.2 GiB free, compute 9.0",
                   "2.11.0+cu130 (CUDA 13.0)", "cp312", "580.159.04", "0.3.64, answers HTTP 200",
                   "1.0.1+torch2.11", "PyPI impostor 0.16.1", "0.35.2", "0.21.0", "v1.1.0 @ 4d2d4c5e0b, clean",
                   "none: nvidia-smi not found", "not answering", "64.0 GiB at /opt/ComfyUI",
                   "checkout ComfyUI-nunchaku", "unreachable", "Connection refused"):
        assert needle in text, needle


def test_what_comfyui_itself_needs_python3_listeners_units_untracked(host: dict, tmp_path: Path) -> None:
    """The host's python3 as a venv would be made from it, who listens where (this process's HTTP
    server on loopback, a socket on every IPv6 address), unit files and systemd's view of them (the
    service manager standing in for systemd), untracked files apart from modified ones."""
    from sshd import install_service_manager

    tools = tmp_path / "bin"
    shutil.copytree(host["tools"], tools, symlinks=True)
    units_dir = tmp_path / "units"
    install_service_manager(tools, units_dir, tmp_path / "state")
    (units_dir / "comfyui.service").write_text("[Service]\nExecStart=/bin/true\n")
    (units_dir / "other.service").write_text("[Service]\nExecStart=/bin/true\n")
    everywhere = socket.socket(socket.AF_INET6)
    everywhere.bind(("::", 0))
    everywhere.listen()
    served, wild, closed = host["profile"].comfyui.port, everywhere.getsockname()[1], _closed_port()
    root = host["root"]
    (root / "main.py").write_text("# changed\n")
    try:
        facts = gather(_conn(tools), host["profile"], Probe(
            interpreters=("python3",), ports=(served, wild, closed), unit_files=((str(units_dir), "comfyui*.service"),),
            units=("gone.service",), git=(str(root / "custom_nodes" / "plain"),)))
    finally:
        everywhere.close()
        _git(root, "checkout", "main.py")
    python3 = facts.interpreters["python3"]
    assert python3.exists and python3.ensurepip and python3.tag == "cp%d%d" % sys.version_info[:2]
    assert python3.tags and python3.python == str(tools / "python3")
    (mine,) = facts.listeners[served]
    assert (mine.address, mine.pid) == ("127.0.0.1", os.getpid()) and mine.cmdline and "pytest" in " ".join(mine.cmdline)
    assert [x.address for x in facts.listeners[wild]] == ["::"] and closed not in facts.listeners
    (found,) = facts.units.files[(str(units_dir), "comfyui*.service")]
    assert (found.name, found.text) == ("comfyui.service", "[Service]\nExecStart=/bin/true\n")
    assert facts.units.writable == {str(units_dir): True} and facts.units.error is None
    state = facts.units.state
    assert (state["comfyui.service"].load, state["comfyui.service"].enabled) == ("not-found", "disabled")
    assert state["gone.service"].load == "not-found" and state["gone.service"].main_pid == 0
    checkout = facts.git[str(root)]
    assert "main.py" in checkout.dirty and "main.py" not in checkout.untracked
    assert {"venv/", ".provision/"} <= set(checkout.untracked)
    assert facts.git[str(root / "custom_nodes" / "plain")].entries == ()
    assert facts_to_json(facts)["listeners"][str(wild)] == [{"address": "::", "pid": os.getpid(), "uid": os.getuid(),
                                                             "cmdline": list(mine.cmdline)}]
    assert mine.uid == os.getuid()          # whom ComfyUI runs as, from /proc/net/tcp


def test_no_systemctl_is_said_when_units_are_asked_for(host: dict, tmp_path: Path) -> None:
    facts = gather(_conn(host["tools"]), host["profile"], Probe(unit_files=((str(tmp_path), "comfyui.service"),)))
    assert facts.units.error == "systemctl not found" and facts.units.files == {(str(tmp_path), "comfyui.service"): ()}


def test_space_listing_and_markers_on_a_real_tree(host: dict, tmp_path: Path, small_fs) -> None:
    """`space` follows links as a write would (models/ on another disk), `listing` does not follow
    them and says what each entry is, `markers` reads small files but not hidden ones (a write in
    progress)."""
    root = tmp_path / "ComfyUI"
    other = small_fs(8 << 20)
    (root / "custom_nodes" / "pack").mkdir(parents=True)
    (root / "custom_nodes" / ".x.abcd.provision-tmp").write_bytes(b"12345")
    (root / "custom_nodes" / "link").symlink_to(other)
    (root / "models").symlink_to(other)
    owed = root / ".provision" / "owed"
    owed.mkdir(parents=True)
    (owed / "restart-comfyui").write_text('{"since": "2026-01-02T03:04:05Z"}\n')
    (owed / ".restart-comfyui.ab12.provision-tmp").write_text("half")
    dit = str(root / "models" / "diffusion_models" / "m.safetensors")
    profile = Profile(name="t", file="t.yaml", inventory=None, hosts="all",
                      comfyui=ComfySpec(root=str(root), venv=str(root / "venv"), port=_closed_port()))
    probe = Probe(space=(dit, str(root / "custom_nodes")), listing=(str(root / "custom_nodes"), str(root / "gone")),
                  markers=(str(owed), str(root / "gone")))
    facts = gather(_conn(host["bare"]), profile, probe)
    on_other, on_root = facts.space_for(dit), facts.space_for(str(root / "custom_nodes" / "pack"))
    assert on_other.dir == str(root / "models") and on_other.dev == os.stat(other).st_dev
    assert on_other.dev != on_root.dev == facts.disk_dev == os.stat(root).st_dev
    assert 7 << 20 < on_other.free <= 8 << 20
    assert facts.space_for("/elsewhere/x").dir == facts.disk_path
    entries = {e.name: e for e in facts.listings[str(root / "custom_nodes")] or ()}
    assert {n: e.kind for n, e in entries.items()} == {".x.abcd.provision-tmp": "file", "link": "link", "pack": "dir"}
    assert entries[".x.abcd.provision-tmp"].size == 5 and entries["pack"].mtime_ns > 0
    assert facts.listings[str(root / "gone")] is None
    assert facts.markers == {str(owed): {"restart-comfyui": '{"since": "2026-01-02T03:04:05Z"}\n'}, str(root / "gone"): {}}
    assert json.dumps(facts_to_json(facts))


def test_the_facts_say_who_provision_is_on_the_host_and_who_owns_comfyuis_root() -> None:
    from rich.console import Console

    from provisioner.facts.render import host_table

    answer = json.loads((Path(__file__).parent / "facts" / "h100-real-backend.json").read_text())["answer"]
    answer["login"] = {"uid": 1000, "user": "admin", "root_owner_uid": 1001, "root_owner": "comfy",
                       "root_group": "comfy"}
    facts = parse_facts("h", answer)
    facts = dataclasses.replace(facts, login=dataclasses.replace(facts.login, become="root"))
    assert facts_to_json(facts)["login"] == {"uid": 1000, "user": "admin", "root_owner": "comfy",
                                             "root_owner_uid": 1001, "root_group": "comfy", "become": "root",
                                             "become_error": None, "works_as": None, "works_as_error": None}
    console = Console(record=True, width=200)
    console.print(host_table(facts))
    assert "admin (uid 1000), becomes root; ComfyUI's root is comfy's" in console.export_text()
    console = Console(record=True, width=200)
    console.print(host_table(dataclasses.replace(facts, login=dataclasses.replace(facts.login, works_as="comfy"))))
    assert "admin (uid 1000), becomes root; ComfyUI's root is comfy's, worked in as comfy (sudo)" in console.export_text()


def test_a_venv_record_deep_or_a_fifo_is_no_record(tmp_path: Path) -> None:
    # The controller's record of a venv's answer: 5000 `[` deep was a RecursionError in every plan.
    from provisioner.facts import venv_record

    record = venv_record._file("h", "/srv/venv/bin/python")
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text("[" * 5000 + "]" * 5000)
    assert venv_record.recorded("h", "/srv/venv/bin/python") is None
    record.unlink()
    os.mkfifo(record)
    assert venv_record.recorded("h", "/srv/venv/bin/python") is None
    record.unlink()
