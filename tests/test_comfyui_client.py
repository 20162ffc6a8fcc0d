"""The ComfyUI client: parsing real captured payloads, and talking to the stand-in over HTTP and /ws."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from provisioner.errors import ConnectError, ProvisionError, VerifyError
from provisioner.sandbox.comfyui_server import ComfyServer, start_comfyui
from provisioner.verify.comfyui import ComfyClient, ImageRef, PromptHistory, PromptRejected

REPO = Path(__file__).resolve().parents[1]
CAPTURES = REPO / "provisioner" / "sandbox" / "captures" / "comfyui-0.3.64"
EXTRA = CAPTURES / "extra"


def load(path: Path) -> dict:
    return json.loads(path.read_text())


# -- captured payloads, parsed directly ----------------------------------------------------------
def test_rejection_renders_one_line_per_node_sorted_by_id() -> None:
    err = PromptRejected(load(EXTRA / "prompt.error.models_missing.response.400.json"))
    assert isinstance(err, VerifyError) and isinstance(err, ProvisionError)
    assert err.type == "prompt_outputs_failed_validation"
    assert err.node_lines == (
        "node 1 (UNETLoader): value_not_in_list: unet_name: "
        "'qwen_image_edit_2509_fp8_e4m3fn.safetensors' not in []",
        "node 2 (CLIPLoader): value_not_in_list: clip_name: 'qwen_2.5_vl_7b_fp8_scaled.safetensors' not in []",
        "node 3 (VAELoader): value_not_in_list: vae_name: 'qwen_image_vae.safetensors' not in ['pixel_space']",
    )
    assert "\n" not in str(err) and str(err).startswith("ComfyUI rejected the workflow: "
                                                        "prompt_outputs_failed_validation")
    assert err.headline == "prompt_outputs_failed_validation: Prompt outputs failed validation"


def test_rejection_lines_for_missing_inputs_and_bad_values_say_what_is_wrong() -> None:
    missing = PromptRejected(load(CAPTURES / "prompt.error.missing_input.json"))
    assert missing.node_lines == ("node 1 (EmptyImage): required_input_missing: color: Required input is "
                                  "missing; required_input_missing: height: Required input is missing; "
                                  "required_input_missing: batch_size: Required input is missing",)
    bad = PromptRejected(load(EXTRA / "prompt.error.bad_value.response.400.json"))
    assert bad.node_lines == ("node 1 (EmptyImage): value_bigger_than_max: width: Value 99999 bigger than "
                              "max of 16384; invalid_input_type: height, abc, invalid literal for int() "
                              "with base 10: 'abc'",)


def test_rejection_without_node_errors_keeps_comfyui_message() -> None:
    err = PromptRejected(load(EXTRA / "prompt.error.unknown_node.response.400.json"))
    assert err.node_lines == ()
    assert str(err) == ("ComfyUI rejected the workflow: invalid_prompt: Cannot execute because node "
                        "NunchakuQwenImageDiTLoader does not exist. (Node ID '#1')")
    assert PromptRejected(load(EXTRA / "prompt.error.no_output.response.400.json")).type == "prompt_no_outputs"


def test_history_ok_pending_and_error_captures() -> None:
    ok = PromptHistory.parse("8888a072-0d88-4dbf-ad1a-ed4edab91b63", load(EXTRA / "history.ok.json"))
    assert ok.state == "success" and ok.error is None
    assert ok.images == (ImageRef("fixture_empty_00001_.png", "", "output"),)
    assert ok.seconds == pytest.approx(0.007)                       # 1795490177366 -> ...373 ms
    pending = PromptHistory.parse("any", load(EXTRA / "history.pending.json"))
    assert pending.state == "pending" and pending.seconds is None
    failed = PromptHistory.parse("3e0ada31-5497-4bbe-b914-e4a6212222db", load(EXTRA / "history.exec_error.json"))
    assert failed.state == "error" and failed.images == () and failed.seconds == pytest.approx(0.004)
    assert str(failed.error) == ("node 3 (VAELoader) failed: safetensors._safetensors_rust.SafetensorError: "
                                 "Error while deserializing header: header too large")
    first = load(CAPTURES / "history.response.json")
    assert PromptHistory.parse(next(iter(first)), first).images[0].filename == "provision_verify_00001_.png"


# -- against the stand-in ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    root = tmp_path_factory.mktemp("comfy")
    for folder, name in (("diffusion_models", "m.safetensors"), ("text_encoders", "te.safetensors")):
        (root / "models" / folder).mkdir(parents=True)              # what the graphs load
        (root / "models" / folder / name).write_bytes(b"x")
    srv = start_comfyui(root=root, cold_s=0.2, warm_s=0.05)
    yield srv
    srv.stop()


def test_reading_endpoints(server: ComfyServer) -> None:
    client = ComfyClient(server.url)
    assert client.system_stats()["system"]["comfyui_version"] == "0.3.64"
    assert client.object_info("NoSuchNode") == {}
    assert "cpu_offload" in client.object_info("NunchakuQwenImageDiTLoader")["NunchakuQwenImageDiTLoader"][
        "input"]["required"]
    assert client.queue() == load(EXTRA / "queue.idle.json")


def test_queue_wait_view_over_the_websocket(server: ComfyServer) -> None:
    graph = {                                  # a sampler, so the run lasts long enough to be heard
        "3": {"class_type": "UNETLoader", "inputs": {"unet_name": "m.safetensors", "weight_dtype": "default"}},
        "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "9": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "seed": 7, "steps": 2, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "beta", "positive": ["7", 0], "negative": ["7", 0], "latent_image": ["10", 0],
            "denoise": 1.0}},
        "5": {"class_type": "CLIPLoader", "inputs": {"clip_name": "te.safetensors", "type": "qwen_image"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["5", 0]}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["6", 0]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "ws"}},
    }
    seen: list[str] = []
    with ComfyClient(server.url) as client:
        assert client.listen()
        done = client.wait(client.queue_prompt(graph), 10, on_message=lambda kind, data: seen.append(kind))
        assert done.state == "success" and done.seconds is not None
        assert "execution_start" in seen and "progress" in seen and "executed" in seen
        png = client.view(done.images[0].filename, done.images[0].subfolder, done.images[0].type)
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        client.free(unload_models=True, free_memory=True)


def test_wait_polls_history_when_no_websocket(server: ComfyServer, monkeypatch: pytest.MonkeyPatch) -> None:
    client = ComfyClient(server.url)
    monkeypatch.setattr(client, "listen", lambda: False)
    graph = load(CAPTURES / "prompt.request.json")["prompt"]
    graph["1"]["inputs"]["color"] = 123                          # not a cached repeat
    done = client.wait(client.queue_prompt(graph), 10)
    assert done.state == "success" and len(done.images) == 1


def test_queue_prompt_raises_prompt_rejected_with_node_lines(server: ComfyServer) -> None:
    graph = {"1": {"class_type": "EmptyImage", "inputs": {"width": 64}},
             "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}
    with pytest.raises(PromptRejected) as info:
        ComfyClient(server.url).queue_prompt(graph)
    assert info.value.node_lines[0].startswith("node 1 (EmptyImage): required_input_missing: height")


def test_missing_image_and_timeout_are_one_line_errors(server: ComfyServer) -> None:
    client = ComfyClient(server.url)
    with pytest.raises(VerifyError, match=r"has no output image 'nope.png': HTTP 404"):
        client.view("nope.png")
    with pytest.raises(VerifyError, match=r"did not finish within 0.2 s"):
        client.wait("never-queued", 0.2)


def test_nothing_listening_is_a_clear_verify_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                                  # closed again: nothing listens
    with pytest.raises(VerifyError) as info:
        ComfyClient(f"http://127.0.0.1:{port}", timeout=2).system_stats()
    assert "does not answer GET /system_stats" in str(info.value) and "\n" not in str(info.value)
    assert ComfyClient(f"http://127.0.0.1:{port}").listen() is False


def test_a_connection_lost_under_the_tunnel_is_named_not_blamed_on_comfyui() -> None:
    """A frozen host: the watchdog aborts the SSH connection, the tunnel's socket is reset, and the
    next request failed with "Connection reset by peer (is it running and listening...?)"."""
    import struct
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def reset_each() -> None:            # what the local end of a tunnel does once its channel is gone
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    threading.Thread(target=reset_each, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    why = "gpu-01: no answer to the heartbeat for 15s: the host stopped responding (frozen, or the network ...)"
    try:
        with pytest.raises(VerifyError, match="is it running"):
            ComfyClient(url, timeout=5).system_stats()
        with pytest.raises(ConnectError) as lost:
            ComfyClient(url, timeout=5, lost=lambda: why).system_stats()
        assert str(lost.value) == why
    finally:
        server.close()
