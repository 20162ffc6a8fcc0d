"""A small client for ComfyUI's HTTP and websocket API, shaped on real ComfyUI 0.3.64 answers.

Every failure a user can meet (nothing listening, a rejected workflow, a missing image) is a
one-line `VerifyError`; `PromptRejected` also keeps ComfyUI's per-node errors, one line per node.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from provisioner.errors import ConnectError, VerifyError
from provisioner.verify.ws import WebSocket, WebSocketClosed

OnMessage = Callable[[str, Mapping[str, Any]], None]
POLL_S = 0.25          # /history polling period when no websocket is open
WS_SILENCE_S = 2.0     # with a websocket, still poll /history after this much silence (lost frames)


def _node_line(node_id: str, entry: Mapping[str, Any]) -> str:
    parts = []
    for err in entry.get("errors", ()):
        details = str(err.get("details") or "")
        name = (err.get("extra_info") or {}).get("input_name")
        # Where details is only the input's name, the message says what is wrong with it.
        text = f"{details}: {err.get('message', '')}" if details == name or not details else details
        parts.append(f"{err.get('type', '?')}: {text.strip(': ')}")
    return f"node {node_id} ({entry.get('class_type', '?')}): " + "; ".join(parts)


class PromptRejected(VerifyError):
    """`POST /prompt` answered 400: the workflow did not validate. `node_lines`: one per failing node."""

    def __init__(self, payload: Mapping[str, Any]) -> None:
        error = payload.get("error") or {}
        if isinstance(error, str):                       # very old servers sent a bare string
            error = {"type": "invalid_prompt", "message": error}
        self.type = str(error.get("type", "unknown"))
        self.message = str(error.get("message", ""))
        self.details = str(error.get("details") or "")
        self.node_errors: Mapping[str, Any] = payload.get("node_errors") or {}
        self.node_lines = tuple(_node_line(k, v) for k, v in sorted(
            self.node_errors.items(), key=lambda kv: (len(kv[0]), kv[0])))
        super().__init__(f"ComfyUI rejected the workflow: {self.headline}"
                         + "".join(f" | {line}" for line in self.node_lines))

    @property
    def headline(self) -> str:
        """ComfyUI's own error, one line: `node_lines` say which node failed and why."""
        return f"{self.type}: {self.message}" + (f" ({self.details})" if self.details else "")


class PromptTimeout(VerifyError):
    """A prompt did not finish in time (it may still be queued or running in ComfyUI)."""


@dataclass(frozen=True)
class ImageRef:
    filename: str
    subfolder: str = ""
    type: str = "output"


@dataclass(frozen=True)
class ExecutionError:
    node_id: str
    node_type: str
    exception_type: str
    exception_message: str

    def __str__(self) -> str:
        msg = self.exception_message.strip().splitlines()
        return (f"node {self.node_id} ({self.node_type}) failed: {self.exception_type}: "
                f"{msg[0] if msg else ''}")


@dataclass(frozen=True)
class PromptHistory:
    """One `/history/{id}` entry: pending (`{}`), success with output images, or error."""

    prompt_id: str
    state: Literal["pending", "success", "error"]
    images: tuple[ImageRef, ...] = ()
    started_ms: int | None = None
    finished_ms: int | None = None
    cached_nodes: tuple[str, ...] = ()
    error: ExecutionError | None = None

    @property
    def seconds(self) -> float | None:
        """ComfyUI's own execution time: execution_start to execution_success/error."""
        if self.started_ms is None or self.finished_ms is None:
            return None
        return (self.finished_ms - self.started_ms) / 1000

    @classmethod
    def parse(cls, prompt_id: str, payload: Mapping[str, Any]) -> PromptHistory:
        entry = payload.get(prompt_id)
        if not entry:
            return cls(prompt_id, "pending")
        status = entry.get("status") or {}
        started = finished = None
        cached: tuple[str, ...] = ()
        error = None
        for kind, data in status.get("messages", ()):
            if kind == "execution_start":
                started = data.get("timestamp")
            elif kind == "execution_cached":
                cached = tuple(str(n) for n in data.get("nodes", ()))
            elif kind in ("execution_success", "execution_error", "execution_interrupted"):
                finished = data.get("timestamp")
            if kind == "execution_error":
                error = ExecutionError(str(data.get("node_id")), str(data.get("node_type")),
                                       str(data.get("exception_type")), str(data.get("exception_message")))
            elif kind == "execution_interrupted":
                error = ExecutionError(str(data.get("node_id")), str(data.get("node_type")),
                                       "interrupted", "execution was interrupted")
        failed = status.get("status_str") == "error" or error is not None
        images = tuple(ImageRef(i["filename"], i.get("subfolder", ""), i.get("type", "output"))
                       for out in (entry.get("outputs") or {}).values() for i in out.get("images", ()))
        return cls(prompt_id, "error" if failed else "success", images, started, finished, cached, error)


class ComfyClient:
    """One ComfyUI at `url` (e.g. the local end of a tunnel). Use as a context manager."""

    def __init__(self, url: str, *, client_id: str | None = None, timeout: float = 30.0,
                 label: str | None = None, lost: Callable[[], str | None] | None = None) -> None:
        self.url = url.rstrip("/")
        self.label = label or self.url     # how messages name it (the host's side of a tunnel)
        # Why the connection under the tunnel is gone (a frozen host): said instead of blaming ComfyUI.
        self.lost = lost or (lambda: None)
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout
        self._ws: WebSocket | None = None

    def __enter__(self) -> ComfyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._ws is not None:
            self._ws.close()
            self._ws = None

    # -- HTTP ---------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json") -> tuple[int, bytes]:
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            if gone := self.lost():
                raise ConnectError(gone) from None
            reason = getattr(err, "reason", None) or err or type(err).__name__
            raise VerifyError(f"ComfyUI at {self.label} does not answer {method} {path}: {reason} "
                              "(is it running and listening on that port?)") from None

    def _json(self, method: str, path: str, payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        status, data = self._request(method, path, body)
        if status != 200:
            raise VerifyError(f"ComfyUI {method} {path} answered HTTP {status}: "
                              f"{data[:200].decode('utf-8', 'replace').strip() or '(empty body)'}")
        try:
            return json.loads(data) if data else None
        except json.JSONDecodeError:
            raise VerifyError(f"ComfyUI {method} {path} answered something that is not JSON: "
                              f"{data[:80]!r}") from None

    def system_stats(self) -> dict[str, Any]:
        return self._json("GET", "/system_stats")

    def object_info(self, node: str | None = None) -> dict[str, Any]:
        """All node classes, or one (`{}` when ComfyUI does not know that class)."""
        return self._json("GET", "/object_info" + (f"/{urllib.parse.quote(node)}" if node else ""))

    def queue(self) -> dict[str, Any]:
        return self._json("GET", "/queue")

    def queued(self, prompt_id: str) -> Literal["running", "pending"] | None:
        """Where a prompt is in ComfyUI's queue; None once it is in neither list."""
        queue = self.queue() or {}
        for state, key in (("running", "queue_running"), ("pending", "queue_pending")):
            if any(len(item) > 1 and item[1] == prompt_id for item in queue.get(key) or ()):
                return state      # type: ignore[return-value]
        return None

    def cancel(self, prompt_id: str, patience: float = 15.0) -> Literal["running", "pending"] | None:
        """Take a prompt out of ComfyUI: delete it while pending, interrupt it while running, until
        the queue no longer holds it. Returns where it still is after `patience` s (None: gone).
        A deleted prompt never reaches /history, so the queue is what confirms it."""
        deadline = time.monotonic() + patience
        while (state := self.queued(prompt_id)) is not None and time.monotonic() < deadline:
            if state == "pending":
                self._json("POST", "/queue", {"delete": [prompt_id]})
            else:                              # 0.3.64 interrupts only the prompt named, if it runs
                self._json("POST", "/interrupt", {"prompt_id": prompt_id})
            time.sleep(POLL_S)
        return state

    def logs(self) -> list[str] | None:
        """ComfyUI's console log (its ring buffer of recent lines), or None when it does not serve it."""
        try:
            raw = self._json("GET", "/internal/logs/raw")
            return "".join(str(e.get("m", "")) for e in raw.get("entries") or ()).splitlines()
        except (VerifyError, AttributeError):
            pass
        try:
            text = self._json("GET", "/internal/logs")
        except VerifyError:
            return None
        return text.splitlines() if isinstance(text, str) else None

    def upload_image(self, name: str, data: bytes, *, overwrite: bool = True) -> dict[str, Any]:
        """`POST /upload/image` into input/; returns `{"name", "subfolder", "type"}`."""
        boundary = uuid.uuid4().hex
        fields = [(f'name="image"; filename="{name}"', "image/png", data),
                  ('name="type"', None, b"input"),
                  ('name="overwrite"', None, b"true" if overwrite else b"false")]
        body = b""
        for disposition, ctype, value in fields:
            body += f"--{boundary}\r\nContent-Disposition: form-data; {disposition}\r\n".encode()
            body += (f"Content-Type: {ctype}\r\n" if ctype else "").encode() + b"\r\n" + value + b"\r\n"
        body += f"--{boundary}--\r\n".encode()
        status, answer = self._request("POST", "/upload/image", body,
                                       f"multipart/form-data; boundary={boundary}")
        try:
            reply = json.loads(answer) if status == 200 else None
        except json.JSONDecodeError:
            reply = None
        if not isinstance(reply, dict):
            raise VerifyError(f"ComfyUI refused the upload of {name}: HTTP {status}")
        return reply

    def queue_prompt(self, graph: Mapping[str, Any], client_id: str | None = None) -> str:
        """Queue an API-format graph; raises `PromptRejected` when ComfyUI does not accept it."""
        body = json.dumps({"prompt": graph, "client_id": client_id or self.client_id}).encode()
        status, data = self._request("POST", "/prompt", body)
        try:
            payload = json.loads(data)
        except json.JSONDecodeError:
            payload = None
        if status == 400 and isinstance(payload, dict):
            raise PromptRejected(payload)
        if status != 200 or not isinstance(payload, dict) or "prompt_id" not in payload:
            raise VerifyError(f"ComfyUI POST /prompt answered HTTP {status}: "
                              f"{data[:200].decode('utf-8', 'replace').strip()}")
        return str(payload["prompt_id"])

    def history(self, prompt_id: str) -> PromptHistory:
        return PromptHistory.parse(prompt_id, self._json("GET", f"/history/{prompt_id}") or {})

    def view(self, filename: str, subfolder: str = "", type: str = "output") -> bytes:
        """The bytes of an image ComfyUI made (`type` output/temp) or was given (input)."""
        query = urllib.parse.urlencode({"filename": filename, "subfolder": subfolder, "type": type})
        status, data = self._request("GET", f"/view?{query}")
        if status != 200:
            raise VerifyError(f"ComfyUI has no {type} image {filename!r}: HTTP {status}")
        return data

    def free(self, *, unload_models: bool = True, free_memory: bool = True) -> None:
        """Ask ComfyUI to unload models / drop caches before its next prompt (applied lazily)."""
        self._json("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})

    # -- progress -----------------------------------------------------------------------------
    def listen(self) -> bool:
        """Open `/ws?clientId=` so `wait` hears progress; False (polling then) when it cannot."""
        if self._ws is not None:
            return True
        parts = urllib.parse.urlsplit(self.url)
        try:
            self._ws = WebSocket.connect(parts.hostname or "127.0.0.1", parts.port or 80,
                                         f"/ws?clientId={self.client_id}", timeout=self.timeout)
        except (OSError, WebSocketClosed):
            return False
        return True

    def wait(self, prompt_id: str, timeout: float, *, on_message: OnMessage | None = None) -> PromptHistory:
        """Block until the prompt is done (success or error); websocket events, /history as fallback.

        The websocket must be open before the prompt is queued to hear all of it (`listen`); the
        history is read first anyway, so a prompt that finished before we listened is not missed.
        """
        deadline = time.monotonic() + timeout
        self.listen()
        while True:
            found = self.history(prompt_id)
            if found.state != "pending":
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise PromptTimeout(f"prompt {prompt_id} did not finish within {timeout:g} s")
            if self._ws is None:
                time.sleep(min(POLL_S, left))
                continue
            self._read_events(prompt_id, min(WS_SILENCE_S, left), on_message)

    def _read_events(self, prompt_id: str, patience: float, on_message: OnMessage | None) -> None:
        """Read websocket messages until this prompt's end is announced or `patience` passes."""
        assert self._ws is not None
        end = time.monotonic() + patience
        while (left := end - time.monotonic()) > 0:
            try:
                raw = self._ws.recv(left)
            except TimeoutError:
                return
            except WebSocketClosed:
                self._ws = None                          # fall back to polling
                return
            if isinstance(raw, bytes):                   # binary preview frames: not needed here
                continue
            try:
                msg = json.loads(raw)
                kind, data = str(msg.get("type", "")), dict(msg.get("data") or {})
            except (ValueError, AttributeError, TypeError):
                continue                                 # not ComfyUI's {type, data}: not ours
            if on_message is not None:
                on_message(kind, data)
            if kind == "status":                         # the queue moved: worth a /history look
                return
            if data.get("prompt_id") != prompt_id:
                continue
            # ComfyUI stores the history just before it sends `executing` with node None.
            if kind == "execution_error" or (kind == "executing" and data.get("node") is None):
                return
