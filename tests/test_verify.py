"""verify_host end to end: the stand-in ComfyUI, reached through the local connection's tunnel, with
the sandbox nvidia-smi shim on PATH reading the stand-in's GPU state file."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from provisioner.config.model import Profile, build_profile
from provisioner.facts.model import Distribution, Facts, PythonEnv
from provisioner.facts.parse import parse_nvidia_smi_csv
from provisioner.connection.local import LocalConnection
from provisioner.config.inventory import Host
from provisioner.sandbox import host as sandbox_host
from provisioner.sandbox.comfyui_server import ComfyServer, start_comfyui
from provisioner.verify.checks import Check, HostVerification
from provisioner.verify.images import check_image
from provisioner.verify.run import verify_host
from provisioner.verify.graph import expected_size, prepare

DIT = "svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-4steps.safetensors"


def t2i_graph(width: int = 512, height: int = 384) -> dict[str, Any]:
    """The text-to-image template's graph (node ids 3/4/9 as in the seed), rendered."""
    return {
        "3": {"class_type": "NunchakuQwenImageDiTLoader", "inputs": {
            "model_name": DIT, "cpu_offload": "disable", "num_blocks_on_gpu": 1, "use_pin_memory": "disable"}},
        "4": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["3", 0], "shift": 1.0}},
        "5": {"class_type": "CLIPLoader", "inputs": {
            "clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image", "device": "default"}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "template prompt", "clip": ["5", 0]}},
        "8": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["5", 0]}},
        "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": 1, "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "beta",
            "positive": ["7", 0], "negative": ["8", 0], "latent_image": ["10", 0], "denoise": 1.0}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["6", 0]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "provision"}},
    }


def edit_graph() -> dict[str, Any]:
    """The image-edit template's shape: LoadImage -> ImageScaleToTotalPixels -> VAEEncode / encoder."""
    g = t2i_graph()
    del g["10"]
    g["13"] = {"class_type": "LoadImage", "inputs": {"image": "example.png"}}
    g["14"] = {"class_type": "ImageScaleToTotalPixels",
               "inputs": {"image": ["13", 0], "upscale_method": "lanczos", "megapixels": 0.25}}
    g["7"] = {"class_type": "TextEncodeQwenImageEditPlus",
              "inputs": {"clip": ["5", 0], "prompt": "make it blue", "vae": ["6", 0], "image1": ["14", 0]}}
    g["15"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["14", 0], "vae": ["6", 0]}}
    g["9"]["inputs"]["latent_image"] = ["15", 0]
    return g


def profile_for(port: int, tmp: Path, comfyui: dict[str, Any] | None = None, plugin: str | None = None,
                **verify: Any) -> Profile:
    data = {"comfyui": {"root": str(tmp / "ComfyUI"), "port": port, **(comfyui or {})},
            "verify": {"prompts": ["a red fox in the snow"], "warm_runs": 2, "seed": 42, "timeout_s": 30,
                       **verify}, **({"plugin": {"name": plugin}} if plugin else {})}
    return build_profile(data, name="test", file=str(tmp / "profile.yaml"))


def host_facts(nunchaku: str | None = "1.0.1+torch2.6", comfyui_gpu: int | str | None = None,
               torch: str = "2.6.0+cu124") -> Facts:
    """The host as the facts script reads it: the GPUs of the nvidia-smi shim on PATH (none without
    one), ComfyUI's venv with this nunchaku (None: not installed)."""
    query = subprocess.run(["nvidia-smi", "--query-gpu=index,name,uuid,memory.total,memory.used,memory.free,"
                            "driver_version,compute_cap,pci.bus_id", "--format=csv,noheader,nounits"],
                           capture_output=True, text=True) if shutil.which("nvidia-smi") else None
    gpus = parse_nvidia_smi_csv(query.stdout) if query else ()
    dists = {"nunchaku": Distribution("nunchaku", nunchaku)} if nunchaku else {}
    env = PythonEnv("/opt/ComfyUI/venv/bin/python", True, "3.11.9", "cp311", "linux_x86_64", torch, "12.4",
                    distributions=dists)
    return Facts("gpu-01", "Ubuntu 24.04", "x86_64", "6.8", "/usr/bin/python3", env, gpus,
                 None if gpus else "nvidia-smi not found", None, "/", 10**12, "0.3.64", comfyui_gpu=comfyui_gpu)


@pytest.fixture
def gpu_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An RTX 3090 nvidia-smi shim first on PATH, reading the state file the stand-in writes."""
    state, bin_dir = tmp_path / "gpu-state.json", tmp_path / "bin"
    bin_dir.mkdir()
    sandbox_host.install_nvidia_smi(bin_dir, sandbox_host.gpu_config("rtx3090", state))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return state


def put_models(comfy_root: Path) -> None:
    """Placeholder files for every model the tests' workflows load: a ComfyUI lists its models/
    folders, and refuses a name that is not there, as the real one does."""
    for folder, names in (("diffusion_models", (DIT, "x.safetensors")),
                          ("text_encoders", ("qwen_2.5_vl_7b_fp8_scaled.safetensors", "te.safetensors")),
                          ("vae", ("qwen_image_vae.safetensors", "vae.safetensors"))):
        (comfy_root / "models" / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (comfy_root / "models" / folder / name).write_bytes(b"x")


@pytest.fixture
def comfy(tmp_path: Path, gpu_state: Path) -> Iterator[Callable[..., ComfyServer]]:
    started: list[ComfyServer] = []
    put_models(tmp_path / "ComfyUI")

    def make(**kw: Any) -> ComfyServer:
        srv = start_comfyui(root=tmp_path / "ComfyUI", gpu_state_file=gpu_state,
                            **{"cold_s": 0.4, "warm_s": 0.1, **kw})
        started.append(srv)
        return srv
    yield make
    for srv in started:
        srv.stop()


def run(srv_port: int, tmp: Path, graph: dict[str, Any] | None = None, image: bytes | None = None,
        facts: Facts | None = None, comfyui: dict[str, Any] | None = None, plugin: str | None = None,
        **verify: Any) -> HostVerification:
    conn = LocalConnection(Host("gpu-01", transport="local"))
    return verify_host(conn, profile_for(srv_port, tmp, comfyui, plugin, **verify), facts or host_facts(),
                       workflow_graph=graph or t2i_graph(), input_image=image, vram_interval_ms=50)


def by_name(result: HostVerification) -> dict[str, Any]:
    return {c.name: c for c in result.checks}


def test_healthy_host_passes_with_timings_vram_and_images(comfy: Callable[..., ComfyServer],
                                                          tmp_path: Path) -> None:
    srv = comfy()
    result = run(srv.port, tmp_path, thresholds={"warm_seconds": 5, "cold_seconds": 10, "vram_gib": 9})
    checks = by_name(result)
    assert result.passed, [c.line for c in result.checks]
    assert list(checks) == ["comfyui_reachable", "device", "nodes_registered", "custom_nodes_imported",
                            "workflow_accepted", "comfyui_ready", "generation", "runs_sampled", "images_ok",
                            "cold_time", "warm_time", "vram_peak"]
    assert result.ladder.failed is None and result.ladder.line == (
        "reachable ✓ > nodes ✓ > workflow ✓ > first_generation ✓ > timed_runs ✓ > images ✓ > agreement ·")
    assert [r.kind for r in result.runs] == ["cold", "warm", "warm"]
    assert [r.seed for r in result.runs] == [42, 43, 44]
    cold, warm = result.runs[0], result.runs[1]
    # ComfyUI's own timestamps: the stand-in's load (0.4 s) only in the cold run. Lower bounds
    # only: a loaded machine makes every run slower, never faster.
    assert cold.seconds_comfy >= 0.4 and warm.seconds_comfy >= 0.1 and cold.seconds_comfy > warm.seconds_comfy
    assert cold.seconds_wall >= cold.seconds_comfy
    assert checks["vram_peak"].value == 7.72                           # 7910 MiB, in GiB
    assert checks["vram_peak"].detail.startswith("VRAM peak 7.72 GiB (nvidia-smi stream of GPU-")
    assert checks["vram_peak"].detail.endswith("0.25 GiB after /free) <= 9 GiB")
    assert result.figures.vram_peak_gib == 7.72 and result.figures.vram_baseline_gib == 0.25
    assert all(srv.state.history[r.prompt_id]["status"]["completed"] for r in result.runs)   # ComfyUI's ids
    assert all(r.image.ok and (r.image.width, r.image.height) == (512, 384) for r in result.runs)
    assert Image.open(io.BytesIO(cold.thumbnail)).size == (256, 192)
    # The kept image was sketched for the agreement while the warm runs went: what it would make itself.
    from provisioner.verify.agreement import sketch, sketch_of
    (kept,) = result.images
    made = sketch(kept.png)
    assert sketch_of(kept) is kept.sketch and kept.sketch.shape == made.shape == (384, 512, 3)
    assert kept.sketch.small.tobytes() == made.small.tobytes() and kept.sketch.small.shape == made.small.shape
    assert kept.sketch.panel == made.panel and kept.sketch.panel.startswith(b"\x89PNG")
    assert result.comfyui_version == "0.3.64" and "RTX 3090" in result.device
    assert checks["device"].detail.startswith("ComfyUI runs on cuda:0 NVIDIA GeForce RTX 3090 : cudaMallocAsync: "
                                              "0: NVIDIA GeForce RTX 3090 GPU-")
    # The graph really carried the profile's prompt and seed: read them back from the PNG ComfyUI wrote.
    saved = sorted((srv.root / "output" / "provision_verify").glob("*.png"))
    embedded = json.loads(Image.open(saved[0]).text["prompt"])
    assert embedded["7"]["inputs"]["text"] == "a red fox in the snow" and embedded["9"]["inputs"]["seed"] == 42
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["passed"] is True and doc["runs"][0]["thumbnail_png_base64"]


def test_plugin_without_backend_fails_nodes_check_with_that_reason(comfy: Callable[..., ComfyServer],
                                                                   tmp_path: Path) -> None:
    result = run(comfy(nunchaku_nodes=False).port, tmp_path, facts=host_facts(nunchaku=None))
    checks = by_name(result)
    assert not result.passed
    assert not checks["nodes_registered"].passed
    assert checks["nodes_registered"].detail == (
        "NunchakuQwenImageDiTLoader is not registered: ComfyUI-nunchaku loaded without its nunchaku backend "
        "(it registered only NunchakuDepthPreprocessor, NunchakuWheelInstaller); install the backend wheel "
        "into ComfyUI's venv and restart; ComfyUI logged: Node `NunchakuQwenImageDiTLoader` import failed: "
        "ModuleNotFoundError: No module named 'nunchaku'")
    # The ladder stops there: no workflow is sent to a ComfyUI without the nodes it needs.
    assert "workflow_accepted" not in checks and result.ladder.failed == "nodes"
    assert result.to_json()["ladder"]["failed_rung"] == "nodes"
    assert result.runs == ()


def test_black_images_fail_the_image_check(comfy: Callable[..., ComfyServer], tmp_path: Path) -> None:
    result = run(comfy(image_mode="black").port, tmp_path, warm_runs=1)
    checks = by_name(result)
    assert checks["generation"].passed and not checks["images_ok"].passed
    assert "2/2 images bad" in checks["images_ok"].detail and "black" in checks["images_ok"].detail
    assert not result.passed


def test_over_the_warm_threshold_fails(comfy: Callable[..., ComfyServer], tmp_path: Path) -> None:
    result = run(comfy(warm_s=0.3).port, tmp_path, warm_runs=1, thresholds={"warm_seconds": 0.05})
    warm = by_name(result)["warm_time"]
    assert not warm.passed and warm.value >= 0.3
    assert warm.detail.startswith("warm median 0.3") and warm.detail.endswith("> 0.05 s")
    assert [c.name for c in result.checks if not c.passed] == ["warm_time"]


def test_comfyui_down_fails_cleanly(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "comfyui.log"
    log.write_text("".join(f"line {i}\n" for i in range(30)) + "RuntimeError: Found no NVIDIA driver\n")
    result = run(port, tmp_path, comfyui={"log_file": str(log)})
    assert [c.name for c in result.checks] == ["comfyui_reachable"]
    assert result.checks[0].lines[-1] == "RuntimeError: Found no NVIDIA driver"     # its log says why
    assert len(result.checks[0].lines) == 15
    assert not result.passed and result.checks[0].detail.startswith(
        f"ComfyUI at 127.0.0.1:{port} on gpu-01 does not answer GET /system_stats: ")
    assert result.to_json()["passed"] is False


def test_node_errors_surface_one_line_per_node(comfy: Callable[..., ComfyServer], tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "diffusion_models").mkdir(parents=True)
    (models / "diffusion_models" / "svdq-int4_r32-qwen-image.safetensors").write_bytes(b"x")
    result = run(comfy(models_dir=models).port, tmp_path)
    accepted = by_name(result)["workflow_accepted"]
    assert not accepted.passed and accepted.detail.startswith("prompt_outputs_failed_validation")
    assert accepted.lines == (
        f"node 3 (NunchakuQwenImageDiTLoader): value_not_in_list: model_name: '{DIT}' not in "
        "['svdq-int4_r32-qwen-image.safetensors']",
        "node 5 (CLIPLoader): value_not_in_list: clip_name: 'qwen_2.5_vl_7b_fp8_scaled.safetensors' not in []",
        "node 6 (VAELoader): value_not_in_list: vae_name: 'qwen_image_vae.safetensors' not in ['pixel_space']",
    )


def test_edit_workflow_uploads_the_input_and_expects_its_scaled_size(comfy: Callable[..., ComfyServer],
                                                                     tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")           # no nvidia-smi: /system_stats alone
    srv = comfy()
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (90, 120, 200)).save(buf, format="PNG")
    result = run(srv.port, tmp_path, graph=edit_graph(), image=buf.getvalue(), warm_runs=0)
    assert result.passed, [c.line for c in result.checks]
    assert (srv.root / "input" / "provision_verify_input.png").read_bytes() == buf.getvalue()
    assert (srv.root / "input" / "example.png").read_bytes() != buf.getvalue()   # left alone
    # 640x480 scaled to 0.25 MP -> 591x443 (ComfyUI rounds), then the VAE's multiple of 8.
    assert (result.runs[0].image.width, result.runs[0].image.height) == (584, 440)
    assert "/system_stats only" in by_name(result)["vram_peak"].detail
    assert by_name(result)["warm_time"].detail == "warm median: not measured"
    # Without an input image the host's own example.png (512x512 in the stand-in) is the input.
    again = run(srv.port, tmp_path, graph=edit_graph(), warm_runs=0)
    assert again.passed and (again.runs[0].image.width, again.runs[0].image.height) == (512, 512)


def test_graph_helpers_set_prompt_seed_prefix_and_predict_size() -> None:
    g = prepare(edit_graph(), prompt="p", seed=9, prefix="a/b")
    assert g["7"]["inputs"]["prompt"] == "p" and g["8"]["inputs"]["text"] == ""
    assert g["9"]["inputs"]["seed"] == 9 and g["12"]["inputs"]["filename_prefix"] == "a/b"
    assert edit_graph()["7"]["inputs"]["prompt"] == "make it blue"          # a copy, not in place
    assert expected_size(t2i_graph(1024, 1024)) == (1024, 1024)
    assert expected_size(edit_graph(), None) is None


def test_image_check_thresholds() -> None:
    def png(img: Image.Image) -> bytes:
        out = io.BytesIO()
        img.save(out, format="PNG")
        return out.getvalue()

    grad = Image.linear_gradient("L").convert("RGB")
    assert check_image(png(grad), (256, 256)).ok
    assert check_image(png(grad), (512, 512)).reasons == ("size 256x256, expected 512x512",)
    assert "uniform" in check_image(png(Image.new("RGB", (64, 64), (128, 128, 128))), None).reasons[0]
    tiled = grad.copy()
    tiled.paste((255, 0, 255), (0, 0, 256, 128))                          # half magenta: NaN tiles
    assert "pure-colour" in check_image(png(tiled), None).reasons[0]
    holes = grad.copy()
    holes.paste((0, 0, 0), (0, 0, 256, 100))
    assert "pure black" in check_image(png(holes), None).reasons[0]
    assert check_image(b"not a png", None).reasons[0].startswith("not a readable image")


def test_the_projects_own_template_verifies(comfy: Callable[..., ComfyServer], tmp_path: Path) -> None:
    from provisioner.resources.workflow import render_text

    values = dict(model_name=DIT, text_encoder="te.safetensors", vae="vae.safetensors", precision="int4",
                  cpu_offload="disable", num_blocks_on_gpu=1, use_pin_memory="disable", steps=4, shift=1.0,
                  cfg=1.0, sampler="euler", scheduler="beta", width=256, height=256, seed=1,
                  prompt="template", image="example.png")
    templates = Path(__file__).resolve().parents[1] / "templates"
    graph = json.loads(render_text(templates, "qwen-image-lightning.json.j2", values))
    result = run(comfy().port, tmp_path, graph=graph, warm_runs=1)
    assert result.passed, [c.line for c in result.checks]
    assert (result.runs[0].image.width, result.runs[0].image.height) == (256, 256)


def test_over_a_real_ssh_tunnel_with_nvidia_smi_on_the_host(comfy: Callable[..., ComfyServer], tmp_path: Path,
                                                            sshd_hosts: Callable[..., list]) -> None:
    from provisioner.connection import open_connection

    srv = comfy()
    (host,) = sshd_hosts(1, bin_dirs=[tmp_path / "bin"])     # the shim installed by gpu_state
    conn = open_connection(host.host(), host.options())
    try:
        result = verify_host(conn, profile_for(srv.port, tmp_path, warm_runs=1), host_facts(),
                             workflow_graph=t2i_graph(), vram_interval_ms=50)
    finally:
        conn.close()
    assert result.passed, [c.line for c in result.checks]
    assert result.host == host.name and len(result.runs) == 2
    assert "nvidia-smi stream of GPU-" in by_name(result)["vram_peak"].detail
    assert by_name(result)["vram_peak"].value == 7.72
    # One long-lived nvidia-smi on the host for all the samples, not one exec per sample.
    streams = [argv for argv in conn.stats.history if "--query-gpu=memory.used" in argv]
    assert len(streams) == 1 and "-lms" in streams[0] and streams[0][-2] == "-i"


# --- each misreport of issue 12, now reported as it is -----------------------------------------

LIBCUDART = "ImportError: libcudart.so.12: cannot open shared object file: No such file or directory"


def test_an_installed_backend_that_fails_to_import_is_quoted_not_reinstalled(comfy: Callable[..., ComfyServer],
                                                                            tmp_path: Path) -> None:
    srv = comfy(nunchaku_nodes=False, backend="1.0.1+torch2.6", backend_error=LIBCUDART)
    nodes = by_name(run(srv.port, tmp_path, facts=host_facts(nunchaku="1.0.1+torch2.6")))["nodes_registered"]
    assert not nodes.passed and "install the backend wheel" not in nodes.detail
    assert nodes.detail == (
        "NunchakuQwenImageDiTLoader is not registered though the nunchaku backend 1.0.1+torch2.6 is installed: "
        "it fails to import (it registered only NunchakuDepthPreprocessor, NunchakuWheelInstaller); ComfyUI "
        f"logged: Node `NunchakuQwenImageDiTLoader` import failed: {LIBCUDART}")


def test_a_plugin_folder_named_as_comfyui_manager_names_it_is_found(comfy: Callable[..., ComfyServer],
                                                                    tmp_path: Path) -> None:
    srv = comfy(nunchaku_nodes=False, plugin_dir="comfyui-nunchaku")
    nodes = by_name(run(srv.port, tmp_path, plugin="comfyui-nunchaku", facts=host_facts(nunchaku=None)))
    assert "loaded without its nunchaku backend" in nodes["nodes_registered"].detail   # not "not loaded"
    healthy = comfy(plugin_dir="comfyui-nunchaku")
    assert run(healthy.port, tmp_path, plugin="comfyui-nunchaku", warm_runs=0).passed


def test_required_nodes_come_from_the_catalog_and_the_profile_and_the_workflow(
        comfy: Callable[..., ComfyServer], tmp_path: Path) -> None:
    srv = comfy()
    result = run(srv.port, tmp_path, warm_runs=0, required_nodes=["NunchakuTextEncoderLoaderV2"])
    assert by_name(result)["nodes_registered"].detail == (
        "NunchakuTextEncoderLoaderV2 is not registered (verify.required_nodes)")
    # Another workflow: every class it uses must be registered, whichever they are.
    graph = t2i_graph()
    graph["4"]["class_type"] = "NunchakuQwenImageLoraLoader"
    nodes = by_name(run(srv.port, tmp_path, graph=graph, warm_runs=0))["nodes_registered"]
    assert nodes.detail == "the workflow uses unregistered node classes: NunchakuQwenImageLoraLoader"
    core_only = {k: v for k, v in t2i_graph().items() if k != "3"}
    core_only["9"]["inputs"]["model"] = ["13", 0]
    core_only["13"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "x.safetensors",
                                                              "weight_dtype": "default"}}
    ok = by_name(run(srv.port, tmp_path, graph=core_only, warm_runs=0))["nodes_registered"]
    assert ok.passed and ok.detail.startswith("NunchakuQwenImageDiTLoader registered with cpu_offload, "
                                              "model_name; the workflow's 9 classes too")


def test_comfyui_on_the_cpu_of_a_gpu_host_fails_the_device_check(comfy: Callable[..., ComfyServer],
                                                                 tmp_path: Path) -> None:
    result = run(comfy(cpu=True).port, tmp_path, warm_runs=0, thresholds={"vram_gib": 9})
    checks = by_name(result)
    assert not checks["device"].passed
    assert checks["device"].detail.startswith("ComfyUI runs on the CPU (cpu) although the host has 0: NVIDIA "
                                              "GeForce RTX 3090 GPU-")
    assert checks["vram_peak"].detail == ("VRAM peak: not measured (not measured: ComfyUI does not run on a "
                                          "GPU)") and not checks["vram_peak"].passed
    assert "0.00 GiB" not in json.dumps(result.to_json()) and result.figures.vram_peak_gib is None
    cpu_torch = by_name(run(comfy(cpu=True).port, tmp_path, warm_runs=0,
                            facts=host_facts(torch="2.6.0+cpu")))["device"]
    assert cpu_torch.detail.endswith("its torch 2.6.0+cpu is a CPU build")


@pytest.fixture
def two_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[dict]]:
    """GPU 0 an A100 busy with 30 GiB of someone else's, GPU 1 an RTX 3090 for ComfyUI."""
    state, bin_dir = tmp_path / "gpu-state-2.json", tmp_path / "bin2"
    bin_dir.mkdir()
    config = sandbox_host.gpu_config("a100-80gb,rtx3090", state)
    config["gpus"][0]["used"] = 30720
    sandbox_host.install_nvidia_smi(bin_dir, config)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return state, config["gpus"]


def test_comfyui_gpu_picks_the_gpu_that_is_checked_sampled_and_reported(
        two_gpus: tuple[Path, list[dict]], tmp_path: Path) -> None:
    state, gpus = two_gpus
    put_models(tmp_path / "ComfyUI")
    srv = start_comfyui(root=tmp_path / "ComfyUI", gpu_state_file=state, gpu_uuid=gpus[1]["uuid"],
                        gpu_name=gpus[1]["name"], cold_s=0.3, warm_s=0.1)
    try:
        chosen = run(srv.port, tmp_path, warm_runs=1, comfyui={"gpu": gpus[1]["uuid"]},
                     facts=host_facts(comfyui_gpu=gpus[1]["uuid"]))
        first = run(srv.port, tmp_path, warm_runs=0)                 # no comfyui.gpu: the A100
    finally:
        srv.stop()
    assert chosen.passed, [c.line for c in chosen.checks]
    assert by_name(chosen)["vram_peak"].value == 7.72 and gpus[1]["uuid"] in by_name(chosen)["vram_peak"].detail
    device = by_name(first)["device"]
    assert not device.passed and device.detail.startswith(
        f"ComfyUI runs on cuda:0 NVIDIA GeForce RTX 3090 : cudaMallocAsync, not on 0: NVIDIA A100-SXM4-80GB "
        f"{gpus[0]['uuid']} (the first nvidia-smi lists): give ComfyUI CUDA_VISIBLE_DEVICES={gpus[0]['uuid']}")
    assert by_name(first)["vram_peak"].value == 30.0                # what that GPU holds, someone else's


def test_the_vram_stream_stops_without_waiting_for_its_next_sample(gpu_state: Path) -> None:
    """Leaving the stream lets nvidia-smi go at once: not at its next sample, an interval later
    (0.15-0.2 s of every verification at the default 200 ms; 3 s here)."""
    import time

    from provisioner.verify.run import VramStream

    sandbox_host.set_vram_used(gpu_state, 1234)
    conn = LocalConnection(Host("gpu-01", transport="local"))
    with VramStream(conn, None, 3000) as vram:
        deadline = time.monotonic() + 10
        while not vram.samples and time.monotonic() < deadline:
            time.sleep(0.02)
        left = time.monotonic()
    took = time.monotonic() - left
    assert [mib for _, mib in vram.samples] == [1234] and vram.error is None
    assert took < 1.5, took


def test_a_cuda_error_that_poisons_comfyui_says_a_restart_is_needed(comfy: Callable[..., ComfyServer],
                                                                    tmp_path: Path) -> None:
    later = by_name(run(comfy(poison_after=1).port, tmp_path, comfyui={"restart": {"systemd": "comfyui"}}))
    assert later["comfyui_reachable"].passed and later["comfyui_ready"].passed     # it was ready, once
    assert not later["generation"].passed
    assert later["generation"].detail == (
        "warm run of 'a red fox in the snow': node 9 (KSampler) failed: RuntimeError: CUDA error: an illegal "
        "memory access was encountered: this CUDA error poisons ComfyUI's process, every later generation "
        "fails until it restarts: restart `systemctl restart comfyui`")
    at_once = by_name(run(comfy(poison_after=0).port, tmp_path))
    assert at_once["comfyui_reachable"].passed                       # alive: answers its API
    assert not at_once["comfyui_ready"].passed                       # but not ready
    assert at_once["comfyui_ready"].detail.startswith("no generation completed: cold run of 'a red fox in "
                                                      "the snow': node 9 (KSampler) failed: RuntimeError: CUDA")


def test_a_generation_that_times_out_is_interrupted_and_removed_from_the_queue(
        comfy: Callable[..., ComfyServer], tmp_path: Path) -> None:
    srv = comfy(cold_s=30)
    result = run(srv.port, tmp_path, timeout_s=1)
    assert by_name(result)["generation"].detail == ("cold run of 'a red fox in the snow' did not finish within "
                                                    "1 s; interrupted and removed from ComfyUI's queue")
    with srv.state.cond:
        assert srv.state.running is None and srv.state.pending == []
    (entry,) = srv.state.history.values()
    assert entry["status"]["messages"][-1][0] == "execution_interrupted"


def test_the_cold_run_is_cold_after_free_and_the_baseline_is_taken_after_it(comfy: Callable[..., ComfyServer],
                                                                            tmp_path: Path) -> None:
    srv = comfy(cold_s=0.5, unload_s=1.0)
    run(srv.port, tmp_path, warm_runs=0)                             # models now loaded
    again = run(srv.port, tmp_path, warm_runs=1)
    cold, warm = again.runs
    assert cold.seconds_comfy >= 0.5 > warm.seconds_comfy            # loaded again: really cold
    assert again.figures.vram_baseline_gib == 0.25                   # measured once memory was released


def test_the_node_list_is_read_while_free_takes_effect(comfy: Callable[..., ComfyServer], tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """/free first, then /object_info while ComfyUI unloads, then the polls until it has: the node
    list costs the verification no time of its own; the nodes are still checked."""
    from provisioner.verify import comfyui

    calls: list[str] = []
    for name in ("free", "object_info", "system_stats", "queue_prompt"):
        def wrapped(self: comfyui.ComfyClient, *a: Any, _orig: Any = getattr(comfyui.ComfyClient, name),
                    _name: str = name, **k: Any) -> Any:
            calls.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(comfyui.ComfyClient, name, wrapped)
    srv = comfy(unload_s=0.5)
    run(srv.port, tmp_path, warm_runs=0)                             # models loaded: the next /free unloads
    calls.clear()
    conn = LocalConnection(Host("gpu-01", transport="local"))
    # The caller's own work (`provision verify` loads the judgement's modules) goes there too.
    result = verify_host(conn, profile_for(srv.port, tmp_path, None, None, warm_runs=0), host_facts(),
                         workflow_graph=t2i_graph(), vram_interval_ms=50, while_freeing=lambda: calls.append("caller"))
    assert result.passed and by_name(result)["nodes_registered"].passed, [c.line for c in result.checks]
    assert calls[:4] == ["system_stats", "free", "object_info", "caller"]
    polls = calls[4:calls.index("queue_prompt")]
    assert len(polls) >= 2 and set(polls) == {"system_stats"}       # it was still unloading after the list
    assert result.figures.vram_baseline_gib == 0.25


def record_calls(monkeypatch: pytest.MonkeyPatch, calls: list[str], names: tuple[str, ...]) -> None:
    from provisioner.verify import comfyui

    for name in names:
        def wrapped(self: comfyui.ComfyClient, *a: Any, _orig: Any = getattr(comfyui.ComfyClient, name),
                    _name: str = name, **k: Any) -> Any:
            calls.append(_name)
            return _orig(self, *a, **k)
        monkeypatch.setattr(comfyui.ComfyClient, name, wrapped)


def test_each_image_is_fetched_while_the_next_run_generates(comfy: Callable[..., ComfyServer], tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's /system_stats reading comes before the next run is queued (its VRAM is its own);
    its image after, while ComfyUI generates; every image is still fetched and checked."""
    calls: list[str] = []
    record_calls(monkeypatch, calls, ("queue_prompt", "wait", "system_stats", "view"))
    srv = comfy()
    result = run(srv.port, tmp_path, warm_runs=2)
    assert result.passed, [c.line for c in result.checks]
    runs = calls[calls.index("queue_prompt"):]
    assert runs == ["queue_prompt", "wait", "system_stats", "queue_prompt", "view", "wait", "system_stats",
                    "queue_prompt", "view", "wait", "system_stats", "view"]
    assert [r.seed for r in result.runs] == [42, 43, 44] and all(r.image.ok for r in result.runs)
    assert [c.name for c in result.checks][:6] == ["comfyui_reachable", "device", "nodes_registered",
                                                   "custom_nodes_imported", "workflow_accepted", "comfyui_ready"]
    saved = sorted(p.name for p in (srv.root / "output" / "provision_verify").glob("*.png"))
    assert [name.split("_")[0] for name in saved] == ["00-cold", "01-warm", "02-warm"]


def test_an_image_that_cannot_be_fetched_takes_the_queued_run_out_of_comfyui(
        comfy: Callable[..., ComfyServer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from provisioner.errors import VerifyError
    from provisioner.verify import comfyui

    cancelled: list[str] = []
    queued: list[str] = []
    real_queue, real_cancel = comfyui.ComfyClient.queue_prompt, comfyui.ComfyClient.cancel

    def queue(self: comfyui.ComfyClient, *a: Any, **k: Any) -> str:
        queued.append(real_queue(self, *a, **k))
        return queued[-1]

    def cancel(self: comfyui.ComfyClient, prompt_id: str, *a: Any, **k: Any) -> Any:
        cancelled.append(prompt_id)
        return real_cancel(self, prompt_id, *a, **k)

    def view(self: comfyui.ComfyClient, filename: str, *a: Any, **k: Any) -> bytes:
        raise VerifyError(f"GET /view?filename={filename}: 404")

    srv = comfy(warm_s=2.0)
    monkeypatch.setattr(comfyui.ComfyClient, "queue_prompt", queue)
    monkeypatch.setattr(comfyui.ComfyClient, "cancel", cancel)
    monkeypatch.setattr(comfyui.ComfyClient, "view", view)
    result = run(srv.port, tmp_path, warm_runs=1)
    assert not result.passed and result.runs == ()
    assert by_name(result)["verification"].detail.startswith("GET /view?filename=")
    assert len(queued) == 2 and cancelled == [queued[1]]           # the warm run, queued meanwhile
    assert srv.state.history.get(queued[1]) is None or not srv.state.history[queued[1]]["status"]["completed"]


def test_console_table_and_checks_show_the_same_gib(comfy: Callable[..., ComfyServer], tmp_path: Path) -> None:
    from rich.console import Console

    from provisioner.verify.render import render_verification

    result = run(comfy().port, tmp_path, warm_runs=1)
    console = Console(record=True, width=200)
    render_verification({"gpu-01": (host_facts(), result)}, console)
    text = console.export_text()
    table, lines = text.split("gpu-01 PASS", 1)
    assert "7.72 GiB" in table and "VRAM peak 7.72 GiB" in lines and " GB" not in text


def sampler_custom_graph() -> dict[str, Any]:
    """The text-to-image graph sampled by SamplerCustom (KSamplerSelect + BasicScheduler), as the GPU
    run found it: its seed is SamplerCustom.noise_seed, which no KSampler rule reaches."""
    g = t2i_graph(256, 256)
    g["9"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["4", 0], "add_noise": True, "noise_seed": 1, "cfg": 1.0, "positive": ["7", 0],
        "negative": ["8", 0], "sampler": ["16", 0], "sigmas": ["17", 0], "latent_image": ["10", 0]}}
    g["16"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    g["17"] = {"class_type": "BasicScheduler", "inputs": {"model": ["4", 0], "scheduler": "simple", "steps": 4,
                                                         "denoise": 1.0}}
    return g


def test_a_samplercustom_workflow_gets_distinct_seeds_and_no_cached_warm_run(
        comfy: Callable[..., ComfyServer], tmp_path: Path) -> None:
    """Every input named seed or noise_seed gets the run's seed: the warm runs really sample (ComfyUI's
    cached_nodes never covers the graph), and each PNG carries its own noise_seed."""
    srv = comfy()
    result = run(srv.port, tmp_path, graph=sampler_custom_graph(), warm_runs=3)
    checks = by_name(result)
    assert result.passed, [c.line for c in result.checks]
    assert [r.seed for r in result.runs] == [42, 43, 44, 45]
    assert checks["runs_sampled"].detail == "seeds 42, 43, 44, 45; no run was served from ComfyUI's cache"
    saved = sorted((srv.root / "output" / "provision_verify").glob("*.png"))
    sent = [json.loads(Image.open(p).text["prompt"])["9"]["inputs"]["noise_seed"] for p in saved]
    assert sent == [42, 43, 44, 45]
    for r in result.runs:                      # ComfyUI ran the sampler each time
        history = srv.state.history[r.prompt_id]["status"]["messages"]
        cached = next(m[1]["nodes"] for m in history if m[0] == "execution_cached")
        assert "9" not in cached
    assert all(r.seconds_comfy >= 0.1 for r in result.runs[1:])
    assert expected_size(sampler_custom_graph()) == (256, 256)


def test_a_warm_run_served_from_the_cache_fails_instead_of_passing_fast(comfy: Callable[..., ComfyServer],
                                                                       tmp_path: Path) -> None:
    """A sampler whose seed provision cannot reach (here: a link to a node without one): every warm run
    is the cold one again, and ComfyUI answers it from its cache. That is a failure, not a 0.01 s pass."""
    graph = sampler_custom_graph()
    graph["9"]["inputs"]["noise_seed"] = ["18", 0]
    graph["18"] = {"class_type": "PrimitiveInt", "inputs": {"value": 7}}
    srv = comfy()
    result = run(srv.port, tmp_path, graph=graph, warm_runs=2)
    checks = by_name(result)
    assert not result.passed and result.ladder.failed == "timed_runs"
    assert checks["comfyui_ready"].passed and "generation" not in checks
    # The first warm run, or the second when ComfyUI applied the cold start's /free only after the
    # cold run (it does so between prompts) and so sampled the first warm one again.
    assert re.match(r"warm run of 'a red fox in the snow' \(seed 4[34]\) was served from ComfyUI's cache in ",
                    checks["runs_sampled"].detail)
    assert checks["runs_sampled"].detail.endswith(f"all {len(graph) - 1} computing nodes cached, nothing sampled; the workflow "
                                                  "has no seed input provision can set (an input named seed or "
                                                  "noise_seed)")
    assert len(result.runs) in (1, 2)


def test_the_broken_cores_fail_at_their_rung_in_the_plugins_own_words(comfy: Callable[..., ComfyServer],
                                                                      tmp_path: Path) -> None:
    """The stand-in at core 0.23.0 (apply_rotary_emb moved: the DiT loader never registers) stops the
    ladder at nodes, quoting the import failure; at core 0.4.0 (ModelPatcher.pinned) the loader
    registers and the first generation fails."""
    moved = run(comfy(comfyui_version="0.23.0", dit_import_error="ImportError: cannot import name "
                      "'apply_rotary_emb' from 'comfy.ldm.qwen_image.model'").port, tmp_path)
    assert moved.comfyui_version == "0.23.0" and moved.ladder.failed == "nodes"
    assert by_name(moved)["nodes_registered"].detail.endswith(
        "ComfyUI logged: Node `NunchakuQwenImageDiTLoader` import failed: ImportError: cannot import name "
        "'apply_rotary_emb' from 'comfy.ldm.qwen_image.model'")
    pinned = run(comfy(comfyui_version="0.4.0",
                       loader_error="AttributeError: 'ModelPatcher' object has no attribute 'pinned'").port,
                 tmp_path)
    assert pinned.comfyui_version == "0.4.0" and pinned.ladder.failed == "first_generation"
    assert "'ModelPatcher' object has no attribute 'pinned'" in by_name(pinned)["comfyui_ready"].detail
    # The newest core (v0.47.1, apply_rotary_emb back since PR #14364): reported as such, every rung climbed.
    newest = run(comfy(comfyui_version="0.47.1").port, tmp_path)
    assert newest.comfyui_version == "0.47.1" and newest.passed and newest.ladder.failed is None
    assert [r for r, state in newest.ladder.states if state != "passed"] == ["agreement"]   # judged per fleet


def test_the_console_names_the_rung_a_host_stopped_at(comfy: Callable[..., ComfyServer], tmp_path: Path) -> None:
    from rich.console import Console

    from provisioner.verify.render import render_verification

    result = run(comfy(nunchaku_nodes=False).port, tmp_path, facts=host_facts(nunchaku=None))
    console = Console(record=True, width=200)
    assert render_verification({"gpu-01": (host_facts(nunchaku=None), result)}, console) is True
    text = console.export_text()
    assert "failed at nodes" in text
    assert "gpu-01 ladder: reachable ✓ > nodes ✗ > workflow · > first_generation · > timed_runs · > images · " \
           "> agreement ·" in text


COMFYUI_LOG = [
    "Traceback (most recent call last):",
    '  File "/opt/ComfyUI/nodes.py", line 2131, in load_custom_node',
    "ModuleNotFoundError: No module named 'cv2'",
    "Cannot import /opt/ComfyUI/custom_nodes/was-node-suite module for custom nodes: No module named 'cv2'",
    "",
    "Import times for custom nodes:",
    "   0.0 seconds: /opt/ComfyUI/custom_nodes/websocket_image_save.py",
    "   0.0 seconds (IMPORT FAILED): /opt/ComfyUI/custom_nodes/was-node-suite",
    "   0.3 seconds (IMPORT FAILED): /opt/ComfyUI/custom_nodes/other",
    "   1.2 seconds: /opt/ComfyUI/custom_nodes/ComfyUI-nunchaku",
]


def test_every_custom_node_that_failed_to_import_is_one_warning_row() -> None:
    from provisioner.verify.checks import custom_node_imports

    check = custom_node_imports(COMFYUI_LOG)
    assert check is not None and check.passed and check.warning and check.mark == "WARN"
    assert check.detail == ("2 custom nodes failed to import, ComfyUI runs without them: "
                            "/opt/ComfyUI/custom_nodes/was-node-suite, /opt/ComfyUI/custom_nodes/other")
    assert check.lines == ("/opt/ComfyUI/custom_nodes/was-node-suite: No module named 'cv2'",
                           "/opt/ComfyUI/custom_nodes/other: see ComfyUI log")
    assert Check.from_json(check.to_json()) == check
    clean = custom_node_imports([line for line in COMFYUI_LOG if "IMPORT FAILED" not in line])
    assert clean is not None and clean.passed and not clean.warning
    assert custom_node_imports(["Starting server"]) is None      # no import times: nothing to say
