"""The project's ComfyUI client (verify/comfyui.py) and websocket (verify/ws.py) against real
ComfyUI's aiohttp server: not the codec they share with the stand-in."""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image, ImageChops, ImageOps
from realhost import RealHost, http_json

from provisioner.verify.comfyui import ComfyClient, ImageRef, PromptRejected
from provisioner.verify.ws import WebSocket

pytestmark = pytest.mark.real


def invert_graph(image: str, prefix: str) -> dict:
    return {"1": {"class_type": "LoadImage", "inputs": {"image": image}},
            "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
            "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}}


def test_a_model_free_workflow_runs_through_the_client_and_its_websocket(real_comfyui: RealHost) -> None:
    png = (real_comfyui.comfy / "input" / "example.png").read_bytes()
    heard: list[tuple[str, dict]] = []
    with ComfyClient(real_comfyui.url) as client:
        assert client.listen()                               # aiohttp's 101 and accept key
        upload = client.upload_image("client_in.png", png)
        assert upload == {"name": "client_in.png", "subfolder": "", "type": "input"}
        prompt_id = client.queue_prompt(invert_graph(upload["name"], "client_wf"))
        done = client.wait(prompt_id, 300, on_message=lambda kind, data: heard.append((kind, data)))
        assert client._ws is not None                        # heard through the websocket, no fallback
        out = client.view(done.images[0].filename, done.images[0].subfolder, done.images[0].type)
    assert done.state == "success" and done.error is None
    assert done.images == (ImageRef("client_wf_00001_.png", "", "output"),)
    ours = [kind for kind, data in heard if data.get("prompt_id") == prompt_id]
    assert ours[0] == "execution_start" and {"executing", "executed", "execution_success"} <= set(ours)
    # Its time is ComfyUI's own: execution_start to execution_success in /history.
    messages = dict((kind, data) for kind, data in http_json(f"{real_comfyui.url}/history/{prompt_id}")
                    [prompt_id]["status"]["messages"])
    started, finished = messages["execution_start"]["timestamp"], messages["execution_success"]["timestamp"]
    assert (done.started_ms, done.finished_ms) == (started, finished)
    assert done.seconds == (finished - started) / 1000
    # Real pixels: the output is the input inverted (ComfyUI rounds through float32: off by 1 at most).
    with Image.open(io.BytesIO(png)) as src, Image.open(io.BytesIO(out)) as got:
        diff = ImageChops.difference(ImageOps.invert(src.convert("RGB")), got.convert("RGB"))
        assert got.size == src.size and max(hi for _, hi in diff.getextrema()) <= 1


def test_a_rejected_workflow_names_each_failing_node(real_comfyui: RealHost) -> None:
    graph = {**invert_graph("nope.png", "client_bad"),
             "4": {"class_type": "EmptyImage", "inputs": {"width": 0, "height": 8, "batch_size": 1, "color": 0}},
             "5": {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}}
    with ComfyClient(real_comfyui.url) as client, pytest.raises(PromptRejected) as caught:
        client.queue_prompt(graph)
    err = caught.value
    assert (err.type, err.message) == ("prompt_outputs_failed_validation", "Prompt outputs failed validation")
    assert err.node_lines == (
        "node 1 (LoadImage): custom_validation_failed: image - Invalid image file: nope.png",
        "node 4 (EmptyImage): value_smaller_than_min: width: Value 0 smaller than min of 1",
    )


def test_websocket_frames_from_aiohttp(real_comfyui: RealHost) -> None:
    """The first message real ComfyUI sends on connect: `status` with this client's id as `sid`."""
    host, port = real_comfyui.url.removeprefix("http://").split(":")
    sock = WebSocket.connect(host, int(port), "/ws?clientId=frames-test")
    try:
        first = json.loads(sock.recv(timeout=30))
    finally:
        sock.close()
    assert first["type"] == "status"
    assert first["data"]["sid"] == "frames-test"
    assert set(first["data"]["status"]["exec_info"]) == {"queue_remaining"}
