"""The stand-in ComfyUI (provisioner/sandbox/comfyui_server.py) held against real ComfyUI v0.3.64:
the same scripted requests to both, the normalised answers compared, for every aspect in which
the two agree. Where they differ (docs/testing.md lists it) the stand-in is what must change."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from realhost import NO_PROXY, RealHost, http_json

from provisioner.sandbox.comfyui_server import ComfyServer, start_comfyui
from provisioner.verify.comfyui import ComfyClient
from provisioner.verify.ws import WebSocket

pytestmark = pytest.mark.real

# The stand-in's node registry is a capture of a later 0.3.64 commit than the v0.3.64 tag: these
# classes moved to ComfyUI's V3 node schema in between (`["COMBO", {"options": [...]}]` for
# `[[...]]`, `display_name`, `deprecated`/`experimental`/`api_node` keys). Every other class the
# stand-in serves but one (below) is byte-for-byte real ComfyUI's.
SCHEMA_DRIFT = frozenset({
    "LatentAdd", "LatentSubtract", "LatentMultiply", "LatentInterpolate", "LatentConcat", "LatentCut",
    "LatentBatch", "LatentBatchSeedBehavior", "LatentApplyOperation", "LatentApplyOperationCFG",
    "LatentOperationTonemapReinhard", "LatentOperationSharpen", "UpscaleModelLoader",
    "ImageUpscaleWithModel", "PorterDuffImageComposite", "SplitImageWithAlpha", "JoinImageWithAlpha",
    "PatchModelAddDownscale", "TripleCLIPLoader", "EmptySD3LatentImage", "CLIPTextEncodeSD3",
    "ControlNetApplySD3", "SkipLayerGuidanceSD3", "CLIPTextEncodeFlux", "FluxGuidance",
    "FluxDisableGuidance", "FluxKontextImageScale", "FluxKontextMultiReferenceLatentMethod", "LoraSave",
    "SkipLayerGuidanceDiT", "SkipLayerGuidanceDiTSimple", "PixverseTemplateNode", "Pikaswaps",
    "MoonvalleyImg2VideoNode", "MoonvalleyTxt2VideoNode", "MoonvalleyVideo2VideoNode", "GeminiImageNode",
})
# The stand-in lists the files of input/ for LoadImage only; LoadImageMask keeps the captured list.
LISTING_DIFFERS = frozenset({"LoadImageMask"})


@pytest.fixture(scope="module")
def standin(real_comfyui: RealHost, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """The stand-in as a host with the plugin but not its backend, its input/ a copy of real
    ComfyUI's (LoadImage lists those files; other tests may have uploaded some)."""
    root = tmp_path_factory.mktemp("standin")
    shutil.copytree(real_comfyui.comfy / "input", root / "input")
    server = start_comfyui(root=root, plugin=True, nunchaku_nodes=False)
    yield server
    server.stop()


@pytest.fixture
def both(real_comfyui: RealHost, standin: ComfyServer) -> dict[str, str]:
    return {"real": real_comfyui.url, "standin": standin.url}


def request(url: str, body: bytes | None = None, content_type: str = "application/json") -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of a GET, or of a POST when `body` is given."""
    req = urllib.request.Request(url, data=body, method="GET" if body is None else "POST")
    if body is not None:
        req.add_header("Content-Type", content_type)
    try:
        with NO_PROXY.open(req, timeout=60) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


def shape(value: Any) -> Any:
    """The structure of a JSON value: mappings keep their keys, everything else its type name."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def test_system_stats_have_the_same_shape(both: dict[str, str]) -> None:
    real, standin = (http_json(both[k] + "/system_stats") for k in ("real", "standin"))
    # The device differs by design (a CPU here, a GPU in the stand-in: null index vs 0), and so
    # do argv and the versions of the packages each side has; the keys are the same.
    assert sorted(real["system"]) == sorted(standin["system"])
    assert sorted(real["devices"][0]) == sorted(standin["devices"][0])
    for key in ("comfyui_version", "required_frontend_version", "os", "embedded_python"):
        assert real["system"][key] == standin["system"][key], key


def test_object_info_entries_are_real_comfyuis(both: dict[str, str]) -> None:
    real, standin = (http_json(both[k] + "/object_info") for k in ("real", "standin"))
    assert set(standin) <= set(real), sorted(set(standin) - set(real))
    compared = sorted(set(standin) - SCHEMA_DRIFT - LISTING_DIFFERS)
    assert {k: real[k] for k in compared} == {k: standin[k] for k in compared}
    # The plugin without its backend: both register exactly its two backend-free nodes.
    for info in (real, standin):
        assert sorted(k for k, v in info.items() if v["python_module"] == "custom_nodes.ComfyUI-nunchaku") == \
            ["NunchakuDepthPreprocessor", "NunchakuWheelInstaller"]
    for name in ("NunchakuQwenImageDiTLoader", "NunchakuWheelInstaller"):
        assert http_json(f"{both['real']}/object_info/{name}") == http_json(f"{both['standin']}/object_info/{name}")


def image_graph(**overrides: Any) -> dict[str, Any]:
    """EmptyImage -> SaveImage, with `overrides` merged into EmptyImage's inputs."""
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0, **overrides}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "held_err"}}}


def without(graph: dict[str, Any], node: str, key: str) -> dict[str, Any]:
    """A copy of `graph` without the node's `key` (class_type) or input `key`."""
    copy = json.loads(json.dumps(graph))
    where = copy[node] if key in copy[node] else copy[node]["inputs"]
    del where[key]
    return copy


LOAD_MISSING = {"1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
                "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "held_err"}}}
# Bodies POSTed to /prompt on which real ComfyUI and the stand-in answer the same bytes of JSON
# (or the same 500 text), apart from `prompt_id` and `number`.
BAD_PROMPTS: dict[str, bytes] = {name: json.dumps(body).encode() if not isinstance(body, bytes) else body
                                 for name, body in {
    "above max": {"prompt": image_graph(width=100000)},
    "below min": {"prompt": image_graph(width=0)},
    "not an int": {"prompt": image_graph(width="wide")},
    "int as a string is taken": {"prompt": image_graph(width="64")},
    "missing input": {"prompt": without(image_graph(), "1", "height")},
    "unknown input is ignored": {"prompt": image_graph(sharpness=3)},
    "combo not in list": {"prompt": {**image_graph(), "3": {"class_type": "ImageScale", "inputs": {
        "image": ["1", 0], "upscale_method": "sideways", "width": 32, "height": 32, "crop": "disabled"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}},
    "missing image file": {"prompt": LOAD_MISSING},
    "one output bad, one good": {"prompt": {**LOAD_MISSING, "3": image_graph()["1"],
                                            "4": {"class_type": "SaveImage", "inputs": {
                                                "images": ["3", 0], "filename_prefix": "held_err"}}}},
    "unused bad node is ignored": {"prompt": {**image_graph(), "9": {"class_type": "EmptyImage",
                                                                     "inputs": {"width": 0}}}},
    "unknown class": {"prompt": {**image_graph(), "3": {"class_type": "NoSuchNode", "inputs": {}}}},
    "no class_type": {"prompt": without(image_graph(), "2", "class_type")},
    "node is a string": {"prompt": {**image_graph(), "3": "ImageInvert"}},
    "no output node": {"prompt": {"1": image_graph()["1"]}},
    "empty prompt": {"prompt": {}},
    "no prompt key": {"client_id": "held"},
    "prompt is null": {"prompt": None},
    "prompt is a string": {"prompt": "EmptyImage"},
    "malformed JSON": b'{"prompt": {',
}.items()}


def normalised_answer(status: int, ctype: str, body: bytes) -> Any:
    if not ctype.startswith("application/json"):
        return status, ctype, body.decode()
    payload = json.loads(body)
    if isinstance(payload, dict):
        payload.pop("prompt_id", None)
        payload["number"] = "N" if "number" in payload else None
    return status, ctype, payload


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_prompt_validation_answers_are_the_same(both: dict[str, str], case: str) -> None:
    real, standin = (normalised_answer(*request(both[k] + "/prompt", BAD_PROMPTS[case])) for k in ("real", "standin"))
    assert real == standin


def test_text_plain_prompt_is_taken_by_both(both: dict[str, str]) -> None:
    body = json.dumps({"prompt": image_graph()}).encode()
    answers = [normalised_answer(*request(both[k] + "/prompt", body, "text/plain")) for k in ("real", "standin")]
    assert answers[0] == answers[1] and answers[0][0] == 200


def run_recorded(url: str, png: bytes, prefix: str) -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
    """Upload, queue LoadImage -> ImageInvert -> SaveImage with a websocket listening, read it to
    the end of the prompt; (prompt_id, messages heard, the /history entry)."""
    client_id = uuid.uuid4().hex
    with ComfyClient(url, client_id=client_id) as client:
        upload = client.upload_image("held_in.png", png)
        host, port = url.removeprefix("http://").split(":")
        sock = WebSocket.connect(host, int(port), f"/ws?clientId={client_id}")
        try:
            graph = {"1": {"class_type": "LoadImage", "inputs": {"image": upload["name"]}},
                     "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                     "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": prefix}}}
            prompt_id = client.queue_prompt(graph)
            heard: list[dict[str, Any]] = []
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                msg = sock.recv(timeout=max(0.1, deadline - time.monotonic()))
                if isinstance(msg, str):
                    heard.append(json.loads(msg))
                    data = heard[-1].get("data") or {}
                    if heard[-1]["type"] == "executing" and data.get("node") is None \
                            and data.get("prompt_id") == prompt_id:
                        break
        finally:
            sock.close()
        return prompt_id, heard, http_json(f"{url}/history/{prompt_id}")[prompt_id]


def scrub(value: Any, prompt_id: str) -> Any:
    """Timestamps and the prompt id out of a JSON value, so two runs compare."""
    if isinstance(value, dict):
        return {k: ("T" if k == "timestamp" else scrub(v, prompt_id)) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, prompt_id) for v in value]
    return "P" if value == prompt_id else value


@pytest.fixture(scope="module")
def workflow_runs(real_comfyui: RealHost, standin: ComfyServer) -> dict[str, tuple[str, list, dict]]:
    png = (real_comfyui.comfy / "input" / "example.png").read_bytes()
    return {"real": run_recorded(real_comfyui.url, png, "held_wf"),
            "standin": run_recorded(standin.url, png, "held_wf")}


def test_history_entries_are_the_same(workflow_runs: dict[str, tuple[str, list, dict]]) -> None:
    real, standin = (scrub(entry, pid) for pid, _, entry in (workflow_runs["real"], workflow_runs["standin"]))
    assert real["status"]["status_str"] == "success"
    real["prompt"][0] = standin["prompt"][0] = "N"          # queue numbers: other tests ran before
    real["prompt"][3].pop("client_id"), standin["prompt"][3].pop("client_id")
    assert real == standin


# Real ComfyUI sends `status` when the prompt is queued and again when the worker takes it, and
# after success before the final `executing`; `progress_state` for every node. The stand-in does
# neither the same way yet (docs/testing.md, differences), so these two are left out.
NOT_COMPARED = ("status", "progress_state")


def test_websocket_messages_of_a_prompt_are_the_same(workflow_runs: dict[str, tuple[str, list, dict]]) -> None:
    real, standin = ([scrub(m, pid) for m in heard
                      if m["type"] not in NOT_COMPARED and (m.get("data") or {}).get("prompt_id") == pid]
                     for pid, heard, _ in (workflow_runs["real"], workflow_runs["standin"]))
    assert [m["type"] for m in real] == ["execution_start", "execution_cached", "executing", "executing",
                                         "executing", "executed", "execution_success", "executing"]
    assert real == standin
