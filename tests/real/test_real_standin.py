"""The stand-in ComfyUI (provisioner/sandbox/comfyui_server.py) held against real ComfyUI v0.3.64:
the same scripted requests to both, the normalised answers compared, aspect by aspect: HTTP,
/prompt validation and numbering, the websocket messages of a prompt (with a client, without one,
cached, interrupted, failed), the queue, /free, the cache, uploads, /view, /history, /internal.
Where the two differ (docs/testing.md lists what stays) the stand-in is what must change.

Both run on this machine's CPU: the stand-in with `cpu=True`, its input/ a copy of real ComfyUI's.
Real ComfyUI is shared with test_real_client.py: every test here uses its own output prefix and
compares queue numbers relative to its own first one.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from realhost import NO_PROXY, RealHost, http_json

from provisioner.sandbox.comfyui_server import ComfyServer, start_comfyui
from provisioner.verify.comfyui import ComfyClient
from provisioner.verify.ws import WebSocket

pytestmark = pytest.mark.real

# Real ComfyUI's venv has torchaudio, the stand-in's node set is the one without it (as on a host
# whose venv lacks it): these are the only classes real ComfyUI registers beyond the stand-in's.
AUDIO_NODES = frozenset({
    "AudioAdjustVolume", "AudioConcat", "AudioEncoderEncode", "AudioEncoderLoader", "AudioMerge",
    "ConditioningStableAudio", "EmptyAudio", "EmptyLatentAudio", "LoadAudio", "PreviewAudio", "RecordAudio",
    "SaveAudio", "SaveAudioMP3", "SaveAudioOpus", "SplitAudioChannels", "TrimAudioDuration", "VAEDecodeAudio",
    "VAEEncodeAudio"})
SIDES = ("real", "standin")


@pytest.fixture(scope="module")
def standin(real_comfyui: RealHost, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComfyServer]:
    """The stand-in as a CPU host with the plugin but not its backend, its input/ a copy of real
    ComfyUI's (LoadImage lists those files; other tests may have uploaded some)."""
    root = tmp_path_factory.mktemp("standin")
    shutil.copytree(real_comfyui.comfy / "input", root / "input")
    server = start_comfyui(root=root, plugin=True, nunchaku_nodes=False, cpu=True)
    yield server
    server.stop()


@pytest.fixture
def both(real_comfyui: RealHost, standin: ComfyServer) -> dict[str, str]:
    return {"real": real_comfyui.url, "standin": standin.url}


def each(both: dict[str, str], fn: Callable[[str], Any]) -> tuple[Any, Any]:
    """`fn(url)` on real ComfyUI, then on the stand-in."""
    return fn(both["real"]), fn(both["standin"])


# -- plumbing ------------------------------------------------------------------------------------

def request(url: str, body: bytes | None = None, content_type: str = "application/json",
            method: str | None = None) -> tuple[int, str, bytes]:
    """(status, Content-Type, body) of a GET, or of a POST when `body` is given."""
    req = urllib.request.Request(url, data=body, method=method or ("GET" if body is None else "POST"))
    if body is not None:
        req.add_header("Content-Type", content_type)
    try:
        with NO_PROXY.open(req, timeout=60) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("Content-Type", ""), err.read()


def raw_http(url: str, data: bytes, wait: float = 1.0) -> bytes:
    """Bytes sent on one connection, everything that came back until it closed or went quiet."""
    host, port = url.removeprefix("http://").split(":")
    got = b""
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(data)
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except socket.timeout:
            pass
    return got


def headers_of(response: bytes) -> list[tuple[str, ...]]:
    """Each response in `response`: its status line and header names (Date's value varies)."""
    found = []
    for head in re.findall(rb"(HTTP/1\.[01] [^\r]*\r\n(?:[^\r]+\r\n)*)\r\n", response):
        lines = head.decode().split("\r\n")
        found.append((lines[0], *(line if line.startswith(("Server", "Connection", "Content-Type"))
                                  else line.split(":")[0] for line in lines[1:] if line)))
    return found


def post_json(url: str, path: str, body: Any) -> Any:
    status, _, data = request(url + path, json.dumps(body).encode())
    assert status == 200, (url, path, data)
    return json.loads(data) if data else None


def listen(url: str, client_id: str) -> WebSocket:
    host, port = url.removeprefix("http://").split(":")
    sock = WebSocket.connect(host, int(port), f"/ws?clientId={client_id}")
    assert json.loads(sock.recv(timeout=30))["type"] == "status"        # the greeting
    return sock


def hear(sock: WebSocket, until: Callable[[dict[str, Any]], bool], timeout: float = 120,
         settle: float = 0.5) -> list[dict[str, Any]]:
    """Messages until one matches `until`, then whatever follows within `settle` seconds."""
    heard: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    done_at: float | None = None
    while True:
        now = time.monotonic()
        limit = (done_at + settle) if done_at is not None else deadline
        if now >= limit:
            break
        try:
            msg = sock.recv(timeout=max(0.05, limit - now))
        except Exception:                                      # noqa: BLE001 - quiet: no more
            if done_at is not None:
                break
            continue
        if isinstance(msg, str):
            heard.append(json.loads(msg))
            if done_at is None and until(heard[-1]):
                done_at = time.monotonic()
    assert done_at is not None, [m["type"] for m in heard]
    return heard


def quiet(sock: WebSocket, seconds: float = 1.0) -> list[dict[str, Any]]:
    """Whatever a socket hears in `seconds`."""
    heard: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            msg = sock.recv(timeout=left)
        except Exception:                                      # noqa: BLE001 - nothing more
            break
        if isinstance(msg, str):
            heard.append(json.loads(msg))
    return heard


def ended(prompt_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda m: m["type"] == "executing" and (m.get("data") or {}).get("node") is None \
        and m["data"].get("prompt_id") == prompt_id


def idle(m: dict[str, Any]) -> bool:
    return m["type"] == "status" and m["data"]["status"]["exec_info"]["queue_remaining"] == 0


def scrub(value: Any, ids: dict[str, str]) -> Any:
    """Timestamps and ids out of a JSON value, so two runs compare: each id becomes its label."""
    if isinstance(value, dict):
        return {k: ("T" if k == "timestamp" else scrub(v, ids)) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, ids) for v in value]
    return ids.get(value, value) if isinstance(value, str) else value


def history(url: str, prompt_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while not (entry := http_json(f"{url}/history/{prompt_id}")) and time.monotonic() < deadline:
        time.sleep(0.1)
    return entry.get(prompt_id, {})


def chain(prefix: str, *, color: int = 0, size: int = 64, batch: int = 1, inverts: int = 1) -> dict[str, Any]:
    """EmptyImage -> ImageInvert x `inverts` -> SaveImage: model-free, as slow as it is big."""
    graph: dict[str, Any] = {"1": {"class_type": "EmptyImage", "inputs": {
        "width": size, "height": size, "batch_size": batch, "color": color}}}
    for i in range(inverts):
        graph[str(i + 2)] = {"class_type": "ImageInvert", "inputs": {"image": [str(i + 1), 0]}}
    graph[str(inverts + 2)] = {"class_type": "SaveImage", "inputs": {"images": [str(inverts + 1), 0],
                                                                    "filename_prefix": prefix}}
    return graph


def unique() -> int:
    """A colour no other test used: a graph of it is in nobody's cache."""
    return uuid.uuid4().int % 0xFFFFFF


# -- HTTP ----------------------------------------------------------------------------------------

def test_system_stats_are_the_same_on_a_cpu(both: dict[str, str]) -> None:
    real, standin = each(both, lambda url: http_json(url + "/system_stats"))
    assert sorted(real["system"]) == sorted(standin["system"])
    for key in ("os", "comfyui_version", "required_frontend_version", "installed_templates_version",
                "required_templates_version", "embedded_python", "ram_total"):
        assert real["system"][key] == standin["system"][key], key
    # The device is this machine's RAM, as `main.py --cpu` reports it.
    for stats in (real, standin):
        (dev,) = stats["devices"]
        assert (dev["name"], dev["type"], dev["index"]) == ("cpu", "cpu", None)
        assert dev["vram_total"] == dev["torch_vram_total"] == stats["system"]["ram_total"]
        assert abs(dev["vram_free"] - stats["system"]["ram_free"]) < 2**30
    # The command line as started (real ComfyUI's service adds --disable-auto-launch).
    assert real["system"]["argv"][:5] == standin["system"]["argv"][:5] == ["main.py", "--cpu", "--listen",
                                                                            "127.0.0.1", "--port"]


def test_object_info_entries_are_real_comfyuis(both: dict[str, str]) -> None:
    real, standin = each(both, lambda url: http_json(url + "/object_info"))
    assert set(standin) <= set(real) and set(real) - set(standin) <= AUDIO_NODES
    shared = sorted(standin)
    assert {k: real[k] for k in shared} == {k: standin[k] for k in shared}
    # The plugin without its backend: both register exactly its two backend-free nodes.
    for info in (real, standin):
        assert sorted(k for k, v in info.items() if v["python_module"] == "custom_nodes.ComfyUI-nunchaku") == \
            ["NunchakuDepthPreprocessor", "NunchakuWheelInstaller"]
    for name in ("NunchakuQwenImageDiTLoader", "NunchakuWheelInstaller", "LoadImage", "NoSuchNode"):
        assert http_json(f"{both['real']}/object_info/{name}") == http_json(f"{both['standin']}/object_info/{name}")


HTTP_CASES = {
    "unknown path: static 404": ("GET", "/nonexistent", None),
    "/api alias": ("GET", "/api/prompt", None),
    "no /api for /internal": ("GET", "/api/internal/logs", None),
    "internal unknown": ("GET", "/internal/nonexistent", None),
    "HEAD": ("HEAD", "/prompt", None),
    "405, Allow": ("PUT", "/prompt", b"{}"),
    "405 on a static path": ("POST", "/nonexistent", b"{}"),
    "GET of a POST route": ("GET", "/free", None),
    "object_info/ empty": ("GET", "/object_info/", None),
    "index": ("GET", "/", None),
    "features": ("GET", "/features", None),
    "embeddings": ("GET", "/embeddings", None),
    "extensions": ("GET", "/extensions", None),
    "models": ("GET", "/models", None),
    "models of a folder": ("GET", "/models/checkpoints", None),
    "models of nothing": ("GET", "/models/nope", None),
    "history of nothing": ("GET", "/history/does-not-exist", None),
    "history, bad max_items": ("GET", "/history?max_items=x", None),
    "internal files": ("GET", "/internal/files/input", None),
    "internal files, bad type": ("GET", "/internal/files/bogus", None),
    "free, empty body": ("POST", "/free", b""),
    "free, not JSON": ("POST", "/free", b"{"),
    "free, a list": ("POST", "/free", b"[]"),
    "free, nothing": ("POST", "/free", b"{}"),
    "queue, a list": ("POST", "/queue", b"[]"),
    "queue, a number": ("POST", "/queue", b"5"),
    "queue, empty body": ("POST", "/queue", b""),
    "history, clear false": ("POST", "/history", b'{"clear": false}'),
    "history, a number": ("POST", "/history", b"5"),
    "interrupt, empty body": ("POST", "/interrupt", b""),
    "interrupt, a list": ("POST", "/interrupt", b"[]"),
    "interrupt, not running": ("POST", "/interrupt", b'{"prompt_id": "nobody"}'),
    "prompt, empty body": ("POST", "/prompt", b""),
    "prompt, not UTF-8": ("POST", "/prompt", b'{"prompt": "\xff"}'),
    "subscribe, empty": ("PATCH", "/internal/logs/subscribe", b""),
    "another origin": ("POST", "/prompt", b"{}", {"Origin": "http://evil.example"}),
    "another origin, GET": ("GET", "/prompt", None, {"Origin": "http://localhost:1", "Host": "127.0.0.1:1"}),
    "the same origin": ("GET", "/prompt", None, {"Origin": "http://localhost:1", "Host": "localhost:1"}),
    "OPTIONS anywhere": ("OPTIONS", "/anything", None),
    "a range of a file": ("GET", "/view?filename=example.png&type=input", None, {"Range": "bytes=0-9"}),
    "the end of a file": ("GET", "/view?filename=example.png&type=input", None, {"Range": "bytes=-5"}),
    "a range past the end": ("GET", "/view?filename=example.png&type=input", None, {"Range": "bytes=99999-"}),
    "a history entry without sensitive keys": ("GET", "/history/held-sensitive", None),
}
# Bodies that differ by design, compared apart: the frontend's index, files listed by mtime, a
# history entry (its prompt id, number and timestamps).
VARYING = ("/", "/internal/files/input", "/extensions", "/history/held-sensitive")


@pytest.mark.parametrize("case", sorted(HTTP_CASES))
def test_http_answers_are_the_same(both: dict[str, str], case: str) -> None:
    method, path, body, *more = HTTP_CASES[case]
    headers = {**({"Content-Type": "application/json"} if body is not None else {}), **(more[0] if more else {})}

    def ask(url: str) -> tuple[int, dict[str, str], bytes]:
        host, port = url.removeprefix("http://").split(":")
        if path == "/history/held-sensitive" and not http_json(url + path):
            graph = image_graph(color=unique())
            post_json(url, "/prompt", {"prompt": graph, "prompt_id": "held-sensitive", "extra_data": {
                "auth_token_comfy_org": "secret", "api_key_comfy_org": "secret", "kept": 1}})
            history(url, "held-sensitive")
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        keep = ("Content-Type", "Content-Length", "Transfer-Encoding", "Allow", "Connection", "Server",
                "Content-Range", "Accept-Ranges", "Content-Disposition")
        return resp.status, {k: v for k, v in resp.getheaders() if k in keep}, data

    real, standin = each(both, ask)
    if path in VARYING:                      # the index is the frontend's; files listed by mtime
        real[1].pop("Content-Length", None), standin[1].pop("Content-Length", None)
        assert real[:2] == standin[:2]
        if path == "/":
            assert real[2][:40] == standin[2][:40] == b'<!doctype html><html lang="en"><head><me'
        elif path.startswith("/history/"):
            entries = [json.loads(answer[2])["held-sensitive"]["prompt"][3] for answer in (real, standin)]
            assert entries[0] == entries[1] == {"kept": 1}
        else:
            assert sorted(json.loads(real[2])) == sorted(json.loads(standin[2]))
    else:
        assert real == standin


def test_http_11_keeps_the_connection_and_answers_10_as_10(both: dict[str, str]) -> None:
    two = b"GET /prompt HTTP/1.1\r\nHost: x\r\n\r\nGET /prompt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    real, standin = each(both, lambda url: headers_of(raw_http(url, two)))
    assert real == standin and len(real) == 2 and real[0][0] == "HTTP/1.1 200 OK"
    assert "Server: Python/3.11 aiohttp/3.14.5" in real[0] and "Connection: close" in real[1]
    real, standin = each(both, lambda url: headers_of(raw_http(url, b"GET /prompt HTTP/1.0\r\n\r\n")))
    assert real == standin and real[0][0] == "HTTP/1.0 200 OK"
    # An exception in a route is a 500 that closes the connection.
    bad = b"POST /free HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n[]"
    real, standin = each(both, lambda url: headers_of(raw_http(url, bad)))
    assert real == standin and "Connection: close" in real[0]
    upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n"                 # /ws without the upgrade headers
    real, standin = each(both, lambda url: raw_http(url, upgrade).split(b"\r\n\r\n", 1)[1])
    assert real == standin


# -- /prompt: validation and numbering --------------------------------------------------------------

def image_graph(**overrides: Any) -> dict[str, Any]:
    """EmptyImage -> SaveImage, with `overrides` merged into EmptyImage's inputs."""
    return {"1": {"class_type": "EmptyImage",
                  "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0, **overrides}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "held_err"}}}


def without(graph: dict[str, Any], node: str, key: str) -> dict[str, Any]:
    """A copy of `graph` without the node's `key` (class_type, inputs) or input `key`."""
    copy = json.loads(json.dumps(graph))
    where = copy[node] if key in copy[node] else copy[node]["inputs"]
    del where[key]
    return copy


def save(images: Any, **more: Any) -> dict[str, Any]:
    return {"class_type": "SaveImage", "inputs": {"images": images, **more}}


LOAD_MISSING = {"1": {"class_type": "LoadImage", "inputs": {"image": "nope.png"}},
                "2": save(["1", 0], filename_prefix="held_err")}
# Bodies POSTed to /prompt on which real ComfyUI and the stand-in answer the same bytes of JSON
# (or the same 500 text), apart from `prompt_id`, `number`, tracebacks and ordering (below).
BAD_PROMPTS: dict[str, bytes] = {name: json.dumps(body).encode() if not isinstance(body, bytes) else body
                                 for name, body in {
    "above max": {"prompt": image_graph(width=100000)},
    "below min": {"prompt": image_graph(width=0)},
    "not an int": {"prompt": image_graph(width="wide")},
    "int as a string is taken": {"prompt": image_graph(width="64")},
    "a float string is not an int": {"prompt": image_graph(width="64.5")},
    "null for an int": {"prompt": image_graph(width=None)},
    "a __value__ wrapper is unwrapped": {"prompt": image_graph(width={"__value__": 32})},
    "missing input": {"prompt": without(image_graph(), "1", "height")},
    "unknown input is ignored": {"prompt": image_graph(sharpness=3)},
    "combo not in list": {"prompt": {**image_graph(), "3": {"class_type": "ImageScale", "inputs": {
        "image": ["1", 0], "upscale_method": "sideways", "width": 32, "height": 32, "crop": "disabled"}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}},
    "a long combo list is not quoted": {"prompt": {
        "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 1, "cfg": 1.0, "sampler_name": "nope",
                                                   "scheduler": "normal", "denoise": 1.0}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0]}},
        "2": save(["4", 0], filename_prefix="held_err")}},
    "a V3 COMBO is not checked in 0.3.64": {"prompt": {**image_graph(), "3": {"class_type": "ImageQuantize", "inputs": {
        "image": ["1", 0], "colors": 4, "dither": "sideways"}}, "4": {"class_type": "PreviewImage",
                                                                      "inputs": {"images": ["3", 0]}}}},
    "missing image file": {"prompt": LOAD_MISSING},
    "LoadImage without its image": {"prompt": {"1": {"class_type": "LoadImage", "inputs": {}},
                                               "2": save(["1", 0], filename_prefix="held_err")}},
    "one output bad, one good": {"prompt": {**LOAD_MISSING, "3": image_graph()["1"],
                                            "4": save(["3", 0], filename_prefix="held_err")}},
    "unused bad node is ignored": {"prompt": {**image_graph(), "9": {"class_type": "EmptyImage",
                                                                     "inputs": {"width": 0}}}},
    "the output's own error is in the details": {"prompt": {"2": save(["1", 0]), "1": image_graph()["1"]}},
    "link of the wrong type": {"prompt": {"1": {"class_type": "EmptyLatentImage", "inputs": {
        "width": 64, "height": 64, "batch_size": 1}}, "2": save(["1", 0], filename_prefix="held_err")}},
    "link slot out of range": {"prompt": {**image_graph(), "2": save(["1", 5], filename_prefix="held_err")}},
    "link slot not a number": {"prompt": {**image_graph(), "2": save(["1", "x"], filename_prefix="held_err")}},
    "link slot -1 is the last": {"prompt": {**image_graph(), "2": save(["1", -1], filename_prefix="held_err")}},
    "link to no node, from the output": {"prompt": {"2": save(["99", 0], filename_prefix="held_err")}},
    "link to no node, inside": {"prompt": {**image_graph(), "3": {"class_type": "ImageInvert", "inputs": {
        "image": ["99", 0]}}, "2": save(["3", 0], filename_prefix="held_err")}},
    "link of one item": {"prompt": {**image_graph(), "2": save(["1"], filename_prefix="held_err")}},
    "a cycle": {"prompt": {"1": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
                           "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                           "3": save(["1", 0], filename_prefix="held_err")}},
    "a node without inputs": {"prompt": {**image_graph(), "2": {"class_type": "SaveImage"}}},
    "an inner node without inputs": {"prompt": {"1": {"class_type": "EmptyImage"}, "2": save(["1", 0])}},
    "unknown class": {"prompt": {**image_graph(), "3": {"class_type": "NoSuchNode", "inputs": {}}}},
    "no class_type": {"prompt": without(image_graph(), "2", "class_type")},
    "node is a string": {"prompt": {**image_graph(), "3": "ImageInvert"}},
    "node is a number": {"prompt": {**image_graph(), "3": 5}},
    "no output node": {"prompt": {"1": image_graph()["1"]}},
    "empty prompt": {"prompt": {}},
    "prompt is a list": {"prompt": []},
    "prompt is a list of one": {"prompt": [1]},
    "no prompt key": {"client_id": "held"},
    "body is a list": [],
    "body is a string": "prompt",
    "body is a number": 5,
    "prompt is null": {"prompt": None},
    "prompt is a string": {"prompt": "EmptyImage"},
    "a number that is not one": {"prompt": image_graph(), "number": "x"},
    "malformed JSON": b'{"prompt": {',
    "empty body": b"",
}.items()}


def normalised_answer(status: int, ctype: str, body: bytes) -> Any:
    """Without prompt_id and number; tracebacks (their files and lines are each server's own) as a
    marker; lists ComfyUI builds from sets (a node's errors, an error's dependent outputs) sorted."""
    if not ctype.startswith("application/json"):
        return status, ctype, body.decode()
    payload = json.loads(body)
    if isinstance(payload, dict):
        payload.pop("prompt_id", None)
        payload["number"] = "N" if "number" in payload else None
        for entry in (payload.get("node_errors") or {}).values():
            entry["dependent_outputs"].sort()
            for error in entry["errors"]:
                info = error["extra_info"]
                if "traceback" in info:
                    assert info["traceback"] and all(isinstance(x, str) for x in info["traceback"])
                    info["traceback"] = "TB"
            entry["errors"].sort(key=json.dumps)
    return status, ctype, payload


@pytest.mark.parametrize("case", sorted(BAD_PROMPTS))
def test_prompt_validation_answers_are_the_same(both: dict[str, str], case: str) -> None:
    real, standin = each(both, lambda url: normalised_answer(*request(url + "/prompt", BAD_PROMPTS[case])))
    assert real == standin


def test_text_plain_prompt_is_taken_by_both(both: dict[str, str]) -> None:
    body = json.dumps({"prompt": image_graph()}).encode()
    answers = each(both, lambda url: normalised_answer(*request(url + "/prompt", body, "text/plain")))
    assert answers[0] == answers[1] and answers[0][0] == 200


def test_queue_numbers_count_every_body_that_parses(both: dict[str, str]) -> None:
    """Every parsed body advances the counter, even one that is then refused; an explicit number
    does not, and is not negated by `front`; a body that does not parse takes none."""
    graph = image_graph(color=unique())

    def numbers(url: str) -> list[Any]:
        answers = []
        for body in ({"prompt": graph}, [], {"prompt": graph, "number": 7, "front": True}, b"{",
                     {"prompt": graph, "number": "x"}, {"prompt": None}, {"prompt": graph, "front": True},
                     {"prompt": graph}):
            status, _, data = request(url + "/prompt", body if isinstance(body, bytes) else json.dumps(body).encode())
            answers.append(json.loads(data)["number"] if status == 200 else status)
        base = answers[0]
        return [answers[2]] + [(n - base if n >= 0 else n + base) if i in (0, 6, 7) else n
                               for i, n in enumerate(answers) if i != 2]

    real, standin = each(both, numbers)
    assert real == standin == [7.0, 0, 400, 500, 500, 500, -3, 4]


def test_the_queued_graph_is_the_validated_one(both: dict[str, str]) -> None:
    """ComfyUI stores values as it converted them, takes a null prompt_id as "None", keeps a
    null client_id, and runs only the outputs `partial_execution_targets` names."""
    color = unique()
    graph = {**image_graph(width="64", height=64.7, color=color), "3": {"class_type": "PreviewImage",
                                                                          "inputs": {"images": ["1", 0]}}}

    def queued(url: str) -> Any:
        post_json(url, "/history", {"delete": ["None"]})
        answer = post_json(url, "/prompt", {"prompt": graph, "prompt_id": None, "client_id": None,
                                            "partial_execution_targets": ["2"]})
        entry = history(url, "None")
        return answer["prompt_id"], entry["prompt"][2:], sorted(entry["outputs"])

    real, standin = each(both, queued)
    assert real == standin
    assert real[0] == "None" and real[1][0]["1"]["inputs"]["width"] == 64 == real[1][0]["1"]["inputs"]["height"]
    assert real[1][1:] == [{"client_id": None}, ["2"]] and real[2] == ["2"]


# -- the websocket and the execution ---------------------------------------------------------------

def run_recorded(url: str, graph: dict[str, Any], with_client: bool = True) -> tuple[str, list[dict[str, Any]]]:
    """Queue `graph` while a socket listens (the prompt's client unless `with_client` is False);
    (prompt_id, every message that socket heard)."""
    client = uuid.uuid4().hex
    sock = listen(url, client)
    try:
        body: dict[str, Any] = {"prompt": graph, **({"client_id": client} if with_client else {})}
        prompt_id = post_json(url, "/prompt", body)["prompt_id"]
        heard = hear(sock, ended(prompt_id) if with_client else idle)
    finally:
        sock.close()
    return prompt_id, heard


def test_websocket_messages_of_a_prompt_are_the_same(both: dict[str, str]) -> None:
    """Every message, in order: status when queued and when taken, progress_state for each node
    as it starts and finishes, executing, executed, success, status, executing null; the same
    prompt again: all cached, its output announced from the cache."""
    color = unique()

    def runs(url: str) -> list[Any]:
        first, heard = run_recorded(url, chain("held_ws", color=color))
        again, heard_again = run_recorded(url, chain("held_ws", color=color))
        entry = history(url, first)
        entry["prompt"][0] = "N"                               # queue numbers: other tests ran before
        entry["prompt"][3].pop("client_id")
        return [scrub(heard, {first: "P"}), scrub(heard_again, {again: "P"}), scrub(entry, {first: "P"})]

    real, standin = each(both, runs)
    for r, s in zip(real[:2], standin[:2]):
        for m in r + s:                                      # output file names: each server's counter
            if m["type"] == "executed":
                m["data"]["output"]["images"][0]["filename"] = "F"
    real[2]["outputs"]["3"]["images"][0]["filename"] = standin[2]["outputs"]["3"]["images"][0]["filename"] = "F"
    assert [m["type"] for m in real[0]] == [
        "status", "status", "execution_start", "execution_cached", "progress_state", "executing", "progress_state",
        "progress_state", "executing", "progress_state", "progress_state", "executing", "executed", "progress_state",
        "execution_success", "status", "executing"]
    assert [m["type"] for m in real[1]] == ["status", "status", "execution_start", "execution_cached", "executed",
                                            "progress_state", "execution_success", "status", "executing"]
    assert real == standin


def test_a_prompt_without_client_id_is_heard_only_in_its_broadcasts(both: dict[str, str]) -> None:
    color = unique()

    def heard(url: str) -> list[dict[str, Any]]:
        prompt_id, messages = run_recorded(url, chain("held_nc", color=color), with_client=False)
        return scrub(messages, {prompt_id: "P"})

    real, standin = each(both, heard)
    assert {m["type"] for m in real} == {"status", "progress_state"}
    assert real == standin


def test_only_the_last_prompts_outputs_are_cached(both: dict[str, str]) -> None:
    """ComfyUI's classic cache keeps what the last prompt used: A, B, then A again recomputes A."""
    a, b = unique(), unique()

    def cached(url: str) -> list[list[str]]:
        found = []
        for color in (a, a, b, a):
            pid, _ = run_recorded(url, chain("held_cache", color=color))
            messages = dict(history(url, pid)["status"]["messages"])
            found.append(messages["execution_cached"]["nodes"])
        return found

    real, standin = each(both, cached)
    assert real == standin == [[], ["1", "2", "3"], [], []]


def test_free_is_applied_by_the_worker_as_comfyui_does(both: dict[str, str]) -> None:
    """unload_models alone keeps the cache; free_memory drops it; flags are the truthy keys only."""
    color = unique()

    def cached_after(url: str) -> list[Any]:
        found = []
        for free in (None, {"unload_models": True}, {"free_memory": False, "unload_models": 0},
                     {"free_memory": True}, {}):
            if free is not None:
                post_json(url, "/free", free)
                time.sleep(0.5)                             # applied by the idle worker at once
            pid, _ = run_recorded(url, chain("held_free", color=color))
            found.append(dict(history(url, pid)["status"]["messages"])["execution_cached"]["nodes"])
        return found

    real, standin = each(both, cached_after)
    assert real == standin == [[], ["1", "2", "3"], ["1", "2", "3"], [], ["1", "2", "3"]]


# 2 x 4096 x 4096: ComfyUI on this CPU takes 1.5 s to make it, 0.2 to 0.6 s to invert it.
BIG = {"size": 4096, "batch": 2}


def test_an_interrupt_lands_when_the_next_node_starts(both: dict[str, str]) -> None:
    def interrupted(url: str) -> Any:
        listener = uuid.uuid4().hex
        sock = listen(url, listener)
        try:
            graph = chain("held_int", color=unique(), inverts=2, **BIG)
            pid = post_json(url, "/prompt", {"prompt": graph, "client_id": listener})["prompt_id"]
            hear(sock, lambda m: m["type"] == "executing" and m["data"].get("node") == "1", settle=0)
            post_json(url, "/interrupt", {"prompt_id": pid})     # while node 1 runs
            heard = hear(sock, ended(pid))
        finally:
            sock.close()
        entry = history(url, pid)
        note = next(m["data"] for m in heard if m["type"] == "execution_interrupted")
        note["executed"] = sorted(note["executed"])
        return (scrub(note, {pid: "P"}), [m["type"] for m in heard][-3:], entry["status"]["status_str"],
                entry["status"]["completed"], [m[0] for m in entry["status"]["messages"]], entry["outputs"])

    real, standin = each(both, interrupted)
    assert real == standin
    assert real[0] == {"prompt_id": "P", "node_id": "2", "node_type": "ImageInvert", "executed": ["1"],
                       "timestamp": "T"}
    assert real[1:] == (["execution_interrupted", "status", "executing"], "error", False,
                        ["execution_start", "execution_cached", "execution_interrupted"], {})


def test_an_interrupt_for_another_prompt_changes_nothing(both: dict[str, str]) -> None:
    def run(url: str) -> Any:
        pid = post_json(url, "/prompt", {"prompt": chain("held_int2", color=unique(), **BIG)})["prompt_id"]
        time.sleep(0.3)
        post_json(url, "/interrupt", {"prompt_id": "not-this-one"})
        return history(url, pid)["status"]["status_str"]

    assert each(both, run) == ("success", "success")


def test_the_queue_deletes_pending_items_and_keeps_the_running_one(both: dict[str, str]) -> None:
    """While A runs, B, C and D wait; deleting B and the running A (a no-op for A), C, then D,
    then clearing an empty queue: one `status` per removal, two when the last one goes, one for
    the clear; what was deleted never reaches /history."""
    def run(url: str) -> Any:
        sock = listen(url, uuid.uuid4().hex)
        try:
            ids = {}
            for label in "ABCD":
                graph = chain(f"held_q{label}", color=unique(), **(BIG if label == "A" else {}))
                ids[post_json(url, "/prompt", {"prompt": graph})["prompt_id"]] = label
            queue = http_json(url + "/queue")
            pending = [ids[item[1]] for item in queue["queue_pending"]]
            running = [ids[item[1]] for item in queue["queue_running"]]
            by_label = {v: k for k, v in ids.items()}
            post_json(url, "/queue", {"delete": [by_label["B"], by_label["A"]]})
            post_json(url, "/queue", {"delete": [by_label["C"]]})
            post_json(url, "/queue", {"delete": [by_label["D"]]})       # the last pending one
            post_json(url, "/queue", {"clear": True})                    # nothing left to clear
            heard = hear(sock, idle)
        finally:
            sock.close()
        remaining = [m["data"]["status"]["exec_info"]["queue_remaining"] for m in heard if m["type"] == "status"]
        fates = {label: (history(url, pid, timeout=0 if label != "A" else 120) or {}).get("status", {}).get(
            "status_str") for pid, label in ids.items()}
        return running, pending, remaining, fates

    real, standin = each(both, run)
    assert real == standin
    running, pending, remaining, fates = real
    assert running == ["A"] and pending == ["B", "C", "D"]
    assert remaining == [1, 1, 2, 3, 4, 3, 2, 1, 1, 1, 0]
    assert fates == {"A": "success", "B": None, "C": None, "D": None}


def test_a_node_that_fails_gives_the_same_error(both: dict[str, str]) -> None:
    """A file that is not an image passes validation (it exists) and fails in LoadImage."""
    def failed(url: str) -> Any:
        with ComfyClient(url) as client:
            name = client.upload_image("held_not_an_image.png", b"not a picture\n")["name"]
        graph = {"1": {"class_type": "LoadImage", "inputs": {"image": name}},
                 "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
                 "3": save(["2", 0], filename_prefix="held_fail")}
        pid, heard = run_recorded(url, graph)
        error = next(m["data"] for m in heard if m["type"] == "execution_error")
        assert error["traceback"] and all(isinstance(x, str) for x in error["traceback"])
        error["traceback"] = "TB"
        error["current_outputs"] = sorted(error["current_outputs"])
        # PIL names the file by its path: each server's own input/ folder.
        error["exception_message"] = re.sub(r"'/\S+/input/", "'INPUT/", error["exception_message"])
        entry = history(url, pid)
        return (scrub(error, {pid: "P"}), [m["type"] for m in heard][-4:],
                entry["status"]["status_str"], entry["outputs"])

    real, standin = each(both, failed)
    assert real == standin
    assert real[0]["exception_message"] == "cannot identify image file 'INPUT/held_not_an_image.png'\n"
    assert real[0]["exception_type"] == "PIL.UnidentifiedImageError"


def test_a_socket_that_comes_back_hears_the_running_node(both: dict[str, str]) -> None:
    def back(url: str) -> Any:
        client = uuid.uuid4().hex
        sock = listen(url, client)
        graph = chain("held_back", color=unique(), **BIG)
        pid = post_json(url, "/prompt", {"prompt": graph, "client_id": client})["prompt_id"]
        hear(sock, lambda m: m["type"] == "executing" and m["data"].get("node") == "1", settle=0)
        sock.close()
        host, port = url.removeprefix("http://").split(":")
        again = WebSocket.connect(host, int(port), f"/ws?clientId={client}")
        try:
            first = [json.loads(again.recv(timeout=30)) for _ in range(2)]
            hear(again, ended(pid))
        finally:
            again.close()
        return scrub(first, {client: "C"})

    real, standin = each(both, back)
    assert real == standin
    assert real[1] == {"type": "executing", "data": {"node": "1"}}


def test_a_second_socket_of_one_client_takes_its_messages_and_loses_them_when_the_first_closes(
        both: dict[str, str]) -> None:
    def sockets(url: str) -> Any:
        client = uuid.uuid4().hex
        first, second = listen(url, client), listen(url, client)
        color = unique()
        pid = post_json(url, "/prompt", {"prompt": chain("held_two", color=color), "client_id": client})["prompt_id"]
        heard_second = [m["type"] for m in hear(second, ended(pid))]
        heard_first = [m["type"] for m in quiet(first)]
        first.close()
        time.sleep(0.3)
        pid = post_json(url, "/prompt", {"prompt": chain("held_two", color=color + 1), "client_id": client})["prompt_id"]
        history(url, pid)
        try:
            late = second.recv(timeout=1)
        except Exception:                                      # noqa: BLE001 - nothing came
            late = None
        second.close()
        return heard_first, heard_second, late

    real, standin = each(both, sockets)
    assert real == standin
    # The first socket was replaced: it hears nothing at all, not even broadcasts.
    assert real[0] == [] and "execution_success" in real[1] and real[2] is None


def test_feature_flags_are_answered_only_as_the_first_message(both: dict[str, str]) -> None:
    from provisioner.verify import ws

    flags = json.dumps({"type": "feature_flags", "data": {"supports_preview_metadata": True}}).encode()

    def answers(url: str) -> list[Any]:
        out = []
        for before in ([], [b'{"type": "hello"}']):
            sock = listen(url, uuid.uuid4().hex)
            for text in [*before, flags]:
                sock.sock.sendall(ws.encode_frame(ws.TEXT, text, mask=True))
            try:
                out.append(json.loads(sock.recv(timeout=1)))
            except Exception:                                  # noqa: BLE001 - no answer
                out.append(None)
            sock.close()
        return out

    real, standin = each(both, answers)
    assert real == standin and real[0]["type"] == "feature_flags" and real[1] is None


# -- uploads, /view, /history, /internal -------------------------------------------------------------

def upload(url: str, fields: dict[str, Any], filename: str = "held_up.png") -> tuple[int, Any]:
    """POST /upload/image, multipart: `image` is a file unless given as a plain value."""
    boundary = "heldboundary"
    parts = []
    for name, value in fields.items():
        if name == "image" and isinstance(value, bytes):
            head = f'Content-Disposition: form-data; name="image"; filename="{filename}"\r\nContent-Type: image/png'
        else:
            head = f'Content-Disposition: form-data; name="{name}"'
        body = value if isinstance(value, bytes) else str(value).encode()
        parts.append(f"--{boundary}\r\n{head}\r\n\r\n".encode() + body + b"\r\n")
    data = b"".join(parts) + f"--{boundary}--\r\n".encode()
    status, ctype, answer = request(url + "/upload/image", data, f"multipart/form-data; boundary={boundary}")
    return status, json.loads(answer) if ctype.startswith("application/json") else answer.decode()


def test_uploads_are_named_and_refused_alike(both: dict[str, str]) -> None:
    png = bytes(range(256))
    tag = uuid.uuid4().hex[:8]

    def uploads(url: str) -> list[Any]:
        return [upload(url, {"image": png}, f"held_{tag}.png"),
                upload(url, {"image": png}, f"held_{tag}.png"),                       # same bytes: same file
                upload(url, {"image": png + b"!"}, f"held_{tag}.png"),                # other bytes: renamed
                upload(url, {"image": png + b"?", "overwrite": "true"}, f"held_{tag}.png"),
                upload(url, {"image": png, "subfolder": f"held_{tag}"}, "in_sub.png"),
                upload(url, {"image": png, "type": "temp"}, f"held_{tag}.png"),
                upload(url, {"image": png}, "../held_evil.png"),
                upload(url, {"image": png, "subfolder": "../.."}, f"held_{tag}.png"),
                upload(url, {"image": png, "type": "bogus"}),
                upload(url, {"image": "not a file"}),
                upload(url, {"subfolder": "x"})]

    real, standin = each(both, uploads)
    assert real == standin
    assert [r[1]["name"] if r[0] == 200 else r[0] for r in real] == [
        f"held_{tag}.png", f"held_{tag}.png", f"held_{tag} (1).png", f"held_{tag}.png", "in_sub.png",
        f"held_{tag}.png", 400, 400, 500, 500, 400]


VIEWS = ["filename=example.png&type=input", "filename=nope.png", "filename=../x.png", "filename=/etc/passwd",
         "filename=example.png&type=bogus", "filename=example.png&type=input&subfolder=..", "",
         "filename=", "filename=example.png%20%5Binput%5D", "filename=example.png&type=input&subfolder=3d",
         "filename=example.png&type=input&channel=rgb", "filename=example.png&type=input&channel=a",
         "filename=example.png&type=input&preview=jpeg;50", "filename=example.png&type=input&preview=webp"]


def test_view_answers_alike(both: dict[str, str]) -> None:
    from io import BytesIO

    from PIL import Image

    def views(url: str) -> list[Any]:
        out = []
        for query in VIEWS:
            status, ctype, body = request(f"{url}/view?{query}")
            size = Image.open(BytesIO(body)).size if status == 200 else len(body)
            out.append((query, status, ctype, size))
        return out

    real, standin = each(both, views)
    assert real == standin
    assert [s for _, s, _, _ in real] == [200, 404, 400, 400, 400, 403, 404, 400, 200, 404, 200, 200, 200, 200]


def test_history_pages_and_deletes_alike(both: dict[str, str]) -> None:
    """/history?max_items=N is the last N, with offset=M the N from M; POST /history deletes."""
    def pages(url: str) -> list[Any]:
        for _ in range(3):
            run_recorded(url, chain("held_hist", color=unique()))
        keys = list(http_json(url + "/history"))
        out = [list(http_json(f"{url}/history?max_items=2")) == keys[-2:],
               list(http_json(f"{url}/history?max_items=2&offset=1")) == keys[1:3],
               list(http_json(f"{url}/history?offset={len(keys) - 1}")) == keys[-1:],
               list(http_json(f"{url}/history?max_items=0")) == []]
        post_json(url, "/history", {"delete": [keys[-1], "nobody"]})
        out.append(list(http_json(url + "/history")) == keys[:-1])
        return out

    real, standin = each(both, pages)
    assert real == standin == [True] * 5


def test_internal_logs_and_their_subscription_alike(both: dict[str, str]) -> None:
    def logs(url: str) -> Any:
        text = http_json(url + "/internal/logs")
        raw = http_json(url + "/internal/logs/raw")
        client = uuid.uuid4().hex
        sock = listen(url, client)
        try:
            status, _, _ = request(url + "/internal/logs/subscribe",
                                   json.dumps({"clientId": client, "enabled": True}).encode(), method="PATCH")
            request(url + "/prompt", b"{")                     # logs "got prompt", then the error
            heard = hear(sock, lambda m: m["type"] == "logs" and any(
                "got prompt" in e["m"] for e in m["data"]["entries"]), timeout=30)
        finally:
            sock.close()
        logged = next(m for m in heard if m["type"] == "logs")
        return (isinstance(text, str), len(raw["entries"]) <= 300, sorted(raw), raw["size"],
                sorted(raw["entries"][0]), status, sorted(logged["data"]), sorted(logged["data"]["entries"][0]))

    # A ring buffer of 300 writes: after the tests before this one, real ComfyUI's start-up lines
    # (the plugin's import failures) have dropped out; test_real_verify.py reads them right after a start.
    real, standin = each(both, logs)
    assert real == standin
    assert real[:2] == (True, True) and real[3] == {"cols": 80, "rows": 24}


def test_folder_paths_list_the_same_folders(both: dict[str, str]) -> None:
    real, standin = each(both, lambda url: {k: len(v) for k, v in http_json(url + "/internal/folder_paths").items()})
    assert real == standin


def client_frame(first: int, payload: bytes, masked: bool = True) -> bytes:
    """A client frame with any first byte (FIN, RSV bits, opcode), masked or not."""
    key = bytes((1, 2, 3, 4)) if masked else b""
    body = bytes(b ^ key[i % 4] for i, b in enumerate(payload)) if masked else payload
    return bytes([first, (0x80 if masked else 0) | len(payload)]) + key + body


FRAMES = {                                  # what the client sends after the greeting
    "ping": client_frame(0x89, b"held"),
    "ping, unmasked": client_frame(0x89, b"held", masked=False),
    "feature_flags, unmasked": client_frame(0x81, b'{"type": "feature_flags", "data": {}}', masked=False),
    "reserved bit": client_frame(0xC1, b'{"type": "x"}'),
    "unknown opcode": client_frame(0x83, b"x"),
    "fragmented ping": client_frame(0x09, b"x"),
    "text not UTF-8": client_frame(0x81, b"\xff\xfe"),
    "binary, ignored": client_frame(0x82, b"abc"),
    "close 1000": client_frame(0x88, b"\x03\xe8"),
    "close 1001 with a reason": client_frame(0x88, b"\x03\xe9bye"),
    "close with an invalid code": client_frame(0x88, b"\x00\x01"),
}


def test_websocket_framing_answers_alike(both: dict[str, str]) -> None:
    """Each frame on a fresh socket: the server's first frame back (read with the client's own
    reader) and what follows it (b"": the connection ended), or None when it says nothing."""
    from provisioner.verify import ws

    def answers(url: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, data in FRAMES.items():
            sock = listen(url, uuid.uuid4().hex)
            sock.sock.sendall(data)
            sock.sock.settimeout(0.8)
            try:
                frame = ws.read_frame(sock.sock)
                try:
                    after: Any = sock.sock.recv(1)
                except OSError:
                    after = None
                out[name] = (frame, after)
            except OSError:
                out[name] = None
            sock.sock.close()
        return out

    real, standin = each(both, answers)
    assert real == standin
    assert real["ping, unmasked"] == ((ws.PONG, b"held"), None)          # aiohttp takes unmasked frames
    assert real["reserved bit"] == ((ws.CLOSE, b"\x03\xea"), b"")         # 1002, then the end
    assert real["text not UTF-8"] == ((ws.CLOSE, b"\x03\xef"), b"")       # 1007
    assert real["close 1001 with a reason"] == ((ws.CLOSE, b"\x03\xe8"), b"") and real["binary, ignored"] is None
