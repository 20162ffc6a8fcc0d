"""The stand-in ComfyUI answers as the real ComfyUI 0.3.64 did in the captures (same payloads, same shapes)."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from provisioner.sandbox.comfyui_server import ComfyServer, start_comfyui
from provisioner.verify.comfyui import ComfyClient

REPO = Path(__file__).resolve().parents[1]
CAPTURES = REPO / "provisioner" / "sandbox" / "captures" / "comfyui-0.3.64"
EXTRA = CAPTURES / "extra"


def capture(path: Path) -> object:
    return json.loads(path.read_text())


def request(url: str, method: str = "GET", body: bytes | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, data=body, method=method,
                                 headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def sampler_graph(seed: int = 1) -> dict:
    """A Qwen-Image text-to-image graph: loaders, encoder, KSampler (4 steps), decode, save."""
    return {
        "3": {"class_type": "NunchakuQwenImageDiTLoader",
              "inputs": {"model_name": "m.safetensors", "cpu_offload": "auto"}},
        "9": {"class_type": "KSampler", "inputs": {
            "model": ["3", 0], "seed": seed, "steps": 4, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "beta", "positive": ["7", 0], "negative": ["7", 0], "latent_image": ["10", 0],
            "denoise": 1.0}},
        "5": {"class_type": "CLIPLoader", "inputs": {"clip_name": "te.safetensors", "type": "qwen_image"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "a fox", "clip": ["5", 0]}},
        "10": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 256, "height": 128, "batch_size": 1}},
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["6", 0]}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "pixel_space"}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "sub/run"}},
    }


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ComfyServer]:
    srv = start_comfyui(root=tmp_path / "comfy", models_dir=tmp_path / "models", cold_s=0.2, warm_s=0.1,
                        gpu_state_file=tmp_path / "gpu-state.json")
    for folder, name in (("diffusion_models", "m.safetensors"), ("text_encoders", "te.safetensors")):
        (tmp_path / "models" / folder).mkdir(parents=True)
        (tmp_path / "models" / folder / name).write_bytes(b"x")
    yield srv
    srv.stop()


def test_object_info_is_the_capture_plus_the_plugin_nodes(tmp_path: Path) -> None:
    full = json.loads(__import__("gzip").open(CAPTURES / "object_info.full.json.gz").read())
    without = capture(CAPTURES / "object_info.nunchaku-plugin-without-backend.json")
    for kwargs, extra in (({"plugin": False}, set()),
                          ({"nunchaku_nodes": False}, set(without)),
                          ({}, set(without) | {"NunchakuQwenImageDiTLoader"})):
        srv = start_comfyui(root=tmp_path / str(len(extra)), **kwargs)
        try:
            client = ComfyClient(srv.url)
            info = client.object_info()
            assert set(info) == set(full) | extra
            assert info["KSampler"] == full["KSampler"]
            for name in without:
                if name in info:
                    assert info[name] == without[name]
            assert client.object_info("NunchakuQwenImageDiTLoader") == (
                {} if "NunchakuQwenImageDiTLoader" not in extra
                else {"NunchakuQwenImageDiTLoader": info["NunchakuQwenImageDiTLoader"]})
        finally:
            srv.stop()
    loader = info["NunchakuQwenImageDiTLoader"]
    assert set(loader) == set(full["UNETLoader"])                  # the same keys as a real entry
    assert loader["input"]["required"]["cpu_offload"][0] == ["auto", "enable", "disable"]
    assert loader["input"]["optional"]["num_blocks_on_gpu"][1]["max"] == 60


def test_system_stats_has_the_captured_shape_with_a_cuda_device(server: ComfyServer) -> None:
    real = capture(CAPTURES / "system_stats.json")
    stats = ComfyClient(server.url).system_stats()
    assert set(stats["system"]) == set(real["system"])
    assert set(stats["devices"][0]) == set(real["devices"][0])
    dev = stats["devices"][0]
    assert dev["type"] == "cuda" and dev["name"].startswith("cuda:0 NVIDIA GeForce RTX 3090")
    assert dev["vram_total"] == 24576 * 2**20 and dev["vram_free"] < dev["vram_total"]


@pytest.mark.parametrize("case", ["unknown_node", "missing_input", "bad_value", "no_output",
                                  "no_prompt_key", "model_not_in_list", "loadimage_missing"])
def test_prompt_rejections_match_the_captured_answers(server: ComfyServer, case: str,
                                                     tmp_path: Path) -> None:
    body = (EXTRA / f"prompt.error.{case}.request.json").read_bytes()
    if case == "unknown_node":                  # captured with the plugin but not its backend
        server = start_comfyui(root=tmp_path / "no-backend", nunchaku_nodes=False)
    try:
        status, headers, data = request(server.url + "/prompt", "POST", body)
    finally:
        if case == "unknown_node":
            server.stop()
    assert status == 400 and headers["Content-Type"].startswith("application/json")
    assert json.loads(data) == capture(EXTRA / f"prompt.error.{case}.response.400.json")


def test_models_missing_lists_every_loader_and_malformed_json_is_a_500(server: ComfyServer,
                                                                       tmp_path: Path) -> None:
    empty = start_comfyui(root=tmp_path / "empty", models_dir=tmp_path / "no-models")   # as captured
    try:
        ComfyClient(empty.url).upload_image("fixture_input.png",
                                            (EXTRA / "view.fixture_empty_00001_.png").read_bytes())
        status, _, data = request(empty.url + "/prompt", "POST",
                                  (EXTRA / "prompt.error.models_missing.request.json").read_bytes())
    finally:
        empty.stop()
    assert status == 400
    assert json.loads(data) == capture(EXTRA / "prompt.error.models_missing.response.400.json")
    status, headers, data = request(server.url + "/prompt", "POST", b'{"prompt": {')
    assert (status, data) == (500, (EXTRA / "prompt.error.malformed_json.response.500.txt").read_bytes())
    assert headers["Content-Type"].startswith("text/plain")


def test_a_prompt_runs_history_goes_pending_then_done_and_view_serves_a_png(server: ComfyServer) -> None:
    client = ComfyClient(server.url)
    slow = client.queue_prompt(sampler_graph())                       # cold: 0.3 s at least
    assert client._json("GET", f"/history/{slow}") == capture(EXTRA / "history.pending.json")
    body = (EXTRA / "prompt.ok.request.json").read_bytes()
    status, _, data = request(server.url + "/prompt", "POST", body)
    answer = json.loads(data)
    assert status == 200 and set(answer) == set(capture(EXTRA / "prompt.ok.response.json"))
    assert answer["number"] == 1 and answer["node_errors"] == {}
    pid = answer["prompt_id"]
    done = client.wait(pid, 20)
    entry = client._json("GET", f"/history/{pid}")[pid]
    real_entry = next(iter(capture(EXTRA / "history.ok.json").values()))
    assert set(entry) == set(real_entry) and set(entry["status"]) == set(real_entry["status"])
    assert [m[0] for m in entry["status"]["messages"]] == [m[0] for m in real_entry["status"]["messages"]]
    assert entry["prompt"][3] == {"client_id": "fixture-client-0001"} and entry["prompt"][4] == ["2"]
    assert entry["meta"] == {"2": real_entry["meta"]["2"]}
    assert done.images[0].filename == "fixture_empty_00001_.png"
    status, headers, png = request(server.url + "/view?filename=fixture_empty_00001_.png&subfolder=&type=output")
    assert status == 200 and headers["Content-Type"] == "image/png"
    img = Image.open(io.BytesIO(png))
    assert img.size == (64, 64) and json.loads(img.text["prompt"]) == json.loads(body)["prompt"]
    assert request(server.url + "/view?filename=nope.png&type=output")[:3:2] == (404, b"")
    assert request(server.url + "/view?filename=../../etc/passwd&type=output")[0] == 400    # as ComfyUI


def test_queue_numbers_every_parsed_post_and_shows_busy_items(server: ComfyServer) -> None:
    client = ComfyClient(server.url)
    request(server.url + "/prompt", "POST", (EXTRA / "prompt.error.no_output.request.json").read_bytes())
    first = client.queue_prompt(sampler_graph(1))
    second = client.queue_prompt(sampler_graph(2))
    queue = client.queue()
    busy = capture(EXTRA / "queue.busy.json")
    assert set(queue) == set(busy)
    items = queue["queue_running"] + queue["queue_pending"]
    assert all(len(i) == len(busy["queue_running"][0]) for i in items)
    assert [i[1] for i in items] == [first, second]
    assert [i[0] for i in items] == [1, 2]                           # the rejected post took number 0
    assert client._json("GET", "/prompt") == {"exec_info": {"queue_remaining": 2}}
    client.wait(second, 20)
    assert client.queue() == capture(EXTRA / "queue.idle.json")
    assert client._json("GET", "/prompt") == capture(EXTRA / "prompt.get.idle.json")


def test_websocket_messages_follow_comfyui_order_and_shapes(server: ComfyServer) -> None:
    events: list[tuple[str, dict]] = []
    graph = sampler_graph()
    with ComfyClient(server.url) as client:
        assert client.listen()
        pid = client.queue_prompt(graph)
        done = client.wait(pid, 20, on_message=lambda k, d: events.append((k, d)))
        kinds = [k for k, _ in events]
        assert kinds[0] == "status" and kinds[-1] in ("executing", "status")
        mine = [k for k, d in events if d.get("prompt_id") == pid]
        # The client stops at the `status` that follows success (ComfyUI sends `executing` null after it).
        assert mine[:2] == ["execution_start", "execution_cached"] and mine[-1] == "execution_success"
        assert kinds[-1] == "status" and kinds[-2] == "execution_success"
        progress = [d for k, d in events if k == "progress"]
        assert [p["value"] for p in progress] == [1, 2, 3, 4] and progress[0] == {
            "value": 1, "max": 4, "prompt_id": pid, "node": "9"}
        executed = next(d for k, d in events if k == "executed")
        assert executed["node"] == "12" and executed["output"]["images"][0]["subfolder"] == "sub"
        assert done.seconds is not None and done.seconds >= 0.3             # cold load + 4 steps
        png = client.view(done.images[0].filename, "sub")
        assert Image.open(io.BytesIO(png)).size == (256, 128)
        assert json.loads((server.root.parent / "gpu-state.json").read_text())["memory_used_mib"] > 6000
        # The same prompt again: every node from cache, at once, same image (ComfyUI's behaviour).
        again = client.wait(client.queue_prompt(graph), 20)
        assert set(again.cached_nodes) == set(graph) and again.images == done.images
        assert again.seconds is not None and again.seconds < 0.3           # no cold load, no steps
        client.free(unload_models=True, free_memory=True)
        time.sleep(0.2)
        assert json.loads((server.root.parent / "gpu-state.json").read_text())["memory_used_mib"] == 256
        third = client.wait(client.queue_prompt(graph), 20)
        assert third.cached_nodes == () and third.images[0].filename == "run_00002_.png"


def test_placeholder_model_fails_at_execution_like_the_capture(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "vae").mkdir(parents=True)
    (models / "vae" / "qwen_image_vae.safetensors").write_text("placeholder, not a real model\n")
    srv = start_comfyui(root=tmp_path / "comfy", models_dir=models, check_models=True)
    try:
        client = ComfyClient(srv.url)
        graph = {"1": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"}},
                 "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
                 "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 0]}},
                 "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 0]}},
                 "5": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "x"}}}
        done = client.wait(client.queue_prompt(graph), 10)
        real = next(iter(capture(EXTRA / "history.exec_error.json").values()))
        entry = client._json("GET", f"/history/{done.prompt_id}")[done.prompt_id]
        error = entry["status"]["messages"][-1][1]
        assert entry["status"]["status_str"] == "error" and entry["outputs"] == {}
        assert set(error) == set(real["status"]["messages"][-1][1])
        assert str(done.error) == ("node 1 (VAELoader) failed: safetensors._safetensors_rust."
                                   "SafetensorError: Error while deserializing header: header too large")
    finally:
        srv.stop()


def test_upload_answers_like_the_capture(server: ComfyServer) -> None:
    client = ComfyClient(server.url)
    png = (EXTRA / "view.fixture_empty_00001_.png").read_bytes()
    assert client.upload_image("fixture_input.png", png) == capture(EXTRA / "upload_image.response.json")
    # Without overwrite, the same bytes are that same file (ComfyUI compares hashes), others renamed.
    assert client.upload_image("fixture_input.png", png, overwrite=False)["name"] == "fixture_input.png"
    assert client.upload_image("fixture_input.png", png + b"\0", overwrite=False)["name"] == "fixture_input (1).png"
    assert client.view("fixture_input.png", type="input") == png
    assert "fixture_input.png" in client.object_info("LoadImage")["LoadImage"]["input"]["required"]["image"][0]


def test_cli_runs_as_a_process_without_site_packages_and_stops_on_sigterm(tmp_path: Path) -> None:
    # -S: no site-packages (no Pillow), as under a sandbox host's bare venv python.
    proc = subprocess.Popen([sys.executable, "-S", "-m", "provisioner.sandbox.comfyui_server", "--port", "0",
                             "--root", str(tmp_path), "--no-nunchaku", "--cold-s", "0"],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, text=True)
    try:
        printed: list[str] = []
        while not (line := proc.stdout.readline()).startswith("To see the GUI go to: "):
            assert line, "".join(printed)
            printed.append(line)
        # Start-up logs like ComfyUI's: the plugin says why its loader did not register.
        assert "Node `NunchakuQwenImageDiTLoader` import failed:\n" in printed
        assert "ModuleNotFoundError: No module named 'nunchaku'\n" in printed
        assert printed[-1] == "Starting server\n" or printed[-2] == "Starting server\n"
        client = ComfyClient(line.split(": ", 1)[1].strip())
        assert client.object_info("NunchakuQwenImageDiTLoader") == {}
        assert (tmp_path / "input" / "example.png").is_file()
        done = client.wait(client.queue_prompt(capture(CAPTURES / "prompt.request.json")["prompt"]), 10)
        with Image.open(io.BytesIO(client.view(done.images[0].filename))) as img:
            assert img.size == (64, 64)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == -signal.SIGTERM          # SIGTERM's own action, as real ComfyUI's


def test_two_quick_sigterms_end_it_at_once(tmp_path: Path) -> None:
    """A service manager's SIGTERM to the group and one more to the process, microseconds apart: a
    handler that took a lock would deadlock on the second (it once did, one stop in four), and the
    stop would wait out its timeout."""
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, "-S", "-m", "provisioner.sandbox.comfyui_server", "--port", "0",
                                 "--root", str(tmp_path)], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                                stdout=subprocess.PIPE, text=True)
        try:
            while not (line := proc.stdout.readline()).startswith("To see the GUI go to: "):
                assert line, attempt
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=5) == -signal.SIGTERM, attempt
        finally:
            proc.kill()
            proc.stdout.close()


def test_websocket_answers_feature_flags_sent_right_after_the_handshake(server: ComfyServer) -> None:
    from provisioner.verify import ws

    sock = ws.WebSocket.connect("127.0.0.1", server.port, "/ws?clientId=flags-client")
    try:
        sock.sock.sendall(ws.encode_frame(ws.TEXT, json.dumps(
            {"type": "feature_flags", "data": {"supports_preview_metadata": True}}).encode(), mask=True))
        first, second = json.loads(sock.recv(5)), json.loads(sock.recv(5))
        assert first == {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}},
                                                    "sid": "flags-client"}}
        assert second == {"type": "feature_flags", "data": capture(EXTRA / "features.json")}
    finally:
        sock.close()


def test_websocket_framing_is_the_stand_ins_own_and_reads_client_frames_as_aiohttp(server: ComfyServer) -> None:
    """The client (verify/ws.py) is tested against this framing, not its own. As aiohttp 3.14 (held
    against real ComfyUI in tests/real/): an unmasked client frame is taken; reserved bits end the
    socket with 1002, text that is not UTF-8 with 1007; a close is answered with 1000."""
    import socket
    import struct

    from provisioner.sandbox import comfyui_ws
    from provisioner.verify import ws

    assert comfyui_ws.handshake_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC's example
    sock = ws.WebSocket.connect("127.0.0.1", server.port, "/ws?clientId=unmasked")
    try:
        assert json.loads(sock.recv(5))["type"] == "status"
        sock.sock.sendall(ws.encode_frame(ws.PING, b"bare", mask=False))
        assert ws.read_frame(sock.sock) == (ws.PONG, b"bare")
        sock.sock.sendall(bytes([0xC1, 0x80 | 2]) + b"\0\0\0\0" + b"{}")      # RSV1 set
        opcode, payload = ws.read_frame(sock.sock)
        assert opcode == ws.CLOSE and struct.unpack("!H", payload[:2])[0] == 1002
    finally:
        sock.sock.close()
    sock = ws.WebSocket.connect("127.0.0.1", server.port, "/ws?clientId=utf8")
    try:
        sock.recv(5)
        sock.sock.sendall(ws.encode_frame(ws.TEXT, b"\xff\xfe", mask=True))
        assert ws.read_frame(sock.sock) == (ws.CLOSE, struct.pack("!H", 1007))
    finally:
        sock.sock.close()
    sock = ws.WebSocket.connect("127.0.0.1", server.port, "/ws?clientId=bye")
    try:
        sock.recv(5)
        sock.sock.sendall(ws.encode_frame(ws.CLOSE, struct.pack("!H", 1001) + b"bye", mask=True))
        assert ws.read_frame(sock.sock) == (ws.CLOSE, struct.pack("!H", 1000))
    finally:
        sock.sock.close()
    with socket.create_connection(("127.0.0.1", server.port)) as raw:   # a big frame: 16-bit length
        raw.sendall(b"GET /ws?clientId=big HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        client = ws.WebSocket(raw)
        head = b""
        while b"\r\n\r\n" not in head:
            head += raw.recv(1)
        assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
        client.recv(5)                                               # the status message
        flags = json.dumps({"type": "feature_flags", "data": {"pad": "x" * 300}}).encode()
        raw.sendall(ws.encode_frame(ws.TEXT, flags, mask=True))
        assert json.loads(client.recv(5))["type"] == "feature_flags"
        raw.sendall(ws.encode_frame(ws.PING, b"ping", mask=True))
        assert ws.read_frame(raw) == (ws.PONG, b"ping")


# -- what the real tier checked against real ComfyUI (tests/real/test_real_standin.py), kept here so
# every default run holds the stand-in to it -------------------------------------------------------

def chain(prefix: str, color: int = 0) -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": color}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}}


def test_validation_walks_links_and_converts_values_as_comfyui_does(server: ComfyServer) -> None:
    def post(graph: dict) -> tuple[int, dict]:
        status, _, data = request(server.url + "/prompt", "POST", json.dumps({"prompt": graph}).encode())
        return status, json.loads(data)

    latent = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "v"}}}
    status, answer = post(latent)
    (error,) = answer["node_errors"]["2"]["errors"]
    assert status == 400 and error["type"] == "return_type_mismatch"
    assert error["details"] == "images, received_type(LATENT) mismatch input_type(IMAGE)"
    assert answer["error"]["details"] == "Return type mismatch between linked nodes: " + error["details"]
    status, answer = post({**chain("v"), "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 7],
                                                                                     "filename_prefix": "v"}}})
    (error,) = answer["node_errors"]["3"]["errors"]
    assert (error["type"], error["details"], error["extra_info"]["exception_type"]) == (
        "exception_during_validation", "tuple index out of range", "IndexError")
    status, answer = post({**chain("v"), "2": {"class_type": "ImageInvert", "inputs": {"image": ["99", 0]}}})
    (error,) = answer["node_errors"]["2"]["errors"]                     # reported on the linked node
    assert (error["type"], error["details"], error["extra_info"]["input_name"]) == (
        "exception_during_inner_validation", "'99'", "images")
    cycle = {**chain("v"), "1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}}}
    assert post(cycle) == (400, {"error": {"type": "prompt_outputs_failed_validation", "message":
                                           "Prompt outputs failed validation", "details": "", "extra_info": {}},
                                 "node_errors": {}})
    graph = chain("v")
    graph["1"]["inputs"]["width"] = "32"
    status, answer = post(graph)
    pid = answer["prompt_id"]
    ComfyClient(server.url).wait(pid, 20)
    entry = ComfyClient(server.url)._json("GET", f"/history/{pid}")[pid]
    assert entry["prompt"][2]["1"]["inputs"]["width"] == 32                # stored as converted


def test_websocket_messages_of_a_model_free_prompt_in_comfyuis_order(server: ComfyServer) -> None:
    from provisioner.verify import ws

    def heard(body: dict, client: str) -> list[str]:
        sock = ws.WebSocket.connect("127.0.0.1", server.port, f"/ws?clientId={client}")
        sock.recv(5)
        pid = json.loads(request(server.url + "/prompt", "POST", json.dumps(body).encode())[2])["prompt_id"]
        kinds: list[str] = []
        while True:
            msg = json.loads(sock.recv(10))
            kinds.append(msg["type"])
            if msg["type"] == "status" and msg["data"]["status"]["exec_info"]["queue_remaining"] == 0:
                if "client_id" not in body:
                    break
            if msg["type"] == "executing" and msg["data"]["node"] is None and msg["data"]["prompt_id"] == pid:
                break
        sock.close()
        return kinds

    graph = chain("order", color=5)
    assert heard({"prompt": graph, "client_id": "c1"}, "c1") == [
        "status", "status", "execution_start", "execution_cached", "progress_state", "executing",
        "progress_state", "progress_state", "executing", "progress_state", "progress_state", "executing",
        "executed", "progress_state", "execution_success", "status", "executing"]
    # The same again: all from the cache, the output announced from it. Under another client id:
    # as ComfyUI's, the server drops an id when its old socket's handler ends, even where a new
    # socket took the id meanwhile, so a listener reusing "c1" at once could hear nothing.
    assert heard({"prompt": graph, "client_id": "c3"}, "c3") == [
        "status", "status", "execution_start", "execution_cached", "executed", "progress_state",
        "execution_success", "status", "executing"]
    # Without a client id, a listener hears only the broadcasts.
    assert set(heard({"prompt": chain("order", color=6)}, "c2")) == {"status", "progress_state"}


def test_http_as_aiohttp_answers_it(server: ComfyServer) -> None:
    import socket

    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:   # keep-alive
        sock.sendall(b"GET /prompt HTTP/1.1\r\nHost: x\r\n\r\nHEAD /api/prompt HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"PUT /prompt HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
                     b"POST /free HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    heads = [h.split(b"\r\n") for h in re.findall(rb"HTTP/1\.1 [^\r]*\r\n(?:[^\r]+\r\n)*", got)]
    assert [h[0] for h in heads] == [b"HTTP/1.1 200 OK", b"HTTP/1.1 200 OK", b"HTTP/1.1 405 Method Not Allowed",
                                     b"HTTP/1.1 500 Internal Server Error"]
    assert b"Server: Python/3.11 aiohttp/3.14.5" in heads[0] and b"Allow: GET,HEAD,POST" in heads[2]
    assert b"Connection: close" in heads[3]                             # a body /free cannot read
    status, headers, body = request(server.url + "/nope")
    assert (status, headers.get("Transfer-Encoding"), body) == (404, "chunked", b"")
    req = urllib.request.Request(server.url + "/prompt", data=b"{}", method="POST",
                                 headers={"Origin": "http://elsewhere.example"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=5)
    assert refused.value.code == 403                                     # ComfyUI's cross-origin guard


def test_the_queue_and_the_cache_as_comfyui_keeps_them(server: ComfyServer) -> None:
    client = ComfyClient(server.url)

    def cached(color: int) -> tuple[str, ...]:
        return client.wait(client.queue_prompt(chain("cache", color=color)), 20).cached_nodes

    assert cached(1) == () and cached(1) == ("1", "2", "3") and cached(2) == () and cached(1) == ()
    slow = client.queue_prompt(sampler_graph(9))                          # runs for a while
    pending = [client.queue_prompt(chain("q", color=c)) for c in (7, 8)]
    request(server.url + "/queue", "POST", json.dumps({"delete": [pending[0], slow]}).encode())
    queue = client.queue()
    assert [i[1] for i in queue["queue_running"]] == [slow] and [i[1] for i in queue["queue_pending"]] == [pending[1]]
    client.wait(slow, 20)
    assert client._json("GET", f"/history/{pending[0]}") == {}           # deleted: never run


@pytest.mark.parametrize(("version", "flag", "error"), [
    ("0.4.0", "--loader-error", "AttributeError: 'ModelPatcher' object has no attribute 'pinned'"),
    ("0.23.0", "--dit-import-error",
     "ImportError: cannot import name 'apply_rotary_emb' from 'comfy.ldm.qwen_image.model'"),
])
def test_the_broken_cores_of_2026_as_the_stand_in_serves_them(tmp_path: Path, version: str, flag: str,
                                                              error: str) -> None:
    """A checkout at core 0.4.0 (ModelPatcher.pinned, Comfy-Org/ComfyUI#11235) or 0.23.0 (apply_rotary_emb
    moved, ComfyUI-nunchaku#820) with plugin v1.2.1: the stand-in reports that version and breaks as
    the real pair did: the loader fails when it runs, or is never registered."""
    from provisioner.sandbox import comfyui_process
    from provisioner.sandbox.gitrepo import plugin_tree
    from provisioner.sandbox.host import comfyui_files
    root = tmp_path / "ComfyUI"
    tree = {**comfyui_files(version), **{f"custom_nodes/ComfyUI-nunchaku/{k}": v for k, v in plugin_tree("1.2.1").items()}}
    for rel, text in tree.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    argv = comfyui_process.found_args(root, root / "venv")
    assert argv[argv.index(flag) + 1] == error and argv[argv.index("--comfyui-version") + 1] == version
    other = {"--loader-error", "--dit-import-error"} - {flag}
    assert not other & set(argv)
    srv = start_comfyui(root=root, comfyui_version=version,
                        **{flag.removeprefix("--").replace("-", "_"): error})   # type: ignore[arg-type]
    try:
        client = ComfyClient(srv.url)
        assert client.system_stats()["system"]["comfyui_version"] == version
        registered = "NunchakuQwenImageDiTLoader" in client.object_info()
        assert registered == (flag == "--loader-error")
        if not registered:
            logged = "".join(entry["m"] for entry in srv.state.logs)
            assert "Node `NunchakuQwenImageDiTLoader` import failed:\nTraceback (most recent call last):\n" in logged
            assert f"NunchakuQwenImageDiTLoader\n{error}\n" in logged
    finally:
        srv.stop()


def test_a_stale_pid_file_never_signals_the_process_that_took_its_number(tmp_path: Path) -> None:
    """The stand-in's PID file outlives it; PIDs come round again (pid_max 32768) within minutes of a
    busy suite, and a stop that trusted the number alone signalled whatever process had it then."""
    from provisioner.sandbox import comfyui_process

    bystander = subprocess.Popen(["sleep", "60"])
    try:
        pidfile = tmp_path / comfyui_process.PIDFILE
        pidfile.parent.mkdir(parents=True)
        pidfile.write_text(str(bystander.pid))
        assert comfyui_process.pid(tmp_path) is None
        comfyui_process.stop(tmp_path)
        assert bystander.poll() is None and not pidfile.exists()
    finally:
        bystander.kill()
        bystander.wait()
