"""The stand-in ComfyUI's routes: the HTTP side of `comfyui_server.State`, plus the `/ws` upgrade."""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from provisioner.sandbox import comfyui_nodes as nodes, comfyui_ws as ws

FEATURES = {"supports_preview_metadata": True, "max_upload_size": 104857600}  # features.json capture
SERVER_ERROR = b"500 Internal Server Error\n\nServer got itself in trouble"   # aiohttp's, as captured


class Handler(BaseHTTPRequestHandler):
    server_version = "Python/3.11 aiohttp/3.14.5"   # what real ComfyUI answers in `Server:`
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:   # ComfyUI logs no access lines
        pass

    @property
    def state(self) -> Any:
        return self.server.state  # type: ignore[attr-defined]

    # -- answers ---------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload: Any, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json; charset=utf-8")

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    # -- GET -------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        path, query = url.path, dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        st = self.state
        if path == "/ws":
            return self._websocket(query.get("clientId") or uuid.uuid4().hex)
        if path == "/system_stats":
            return self._json(st.system_stats())
        if path == "/object_info":
            return self._json(st.registry())
        if path.startswith("/object_info/"):
            name = urllib.parse.unquote(path[len("/object_info/"):])
            entry = st.registry().get(name)
            return self._json({name: entry} if entry else {})
        if path == "/prompt":
            with st.cond:
                return self._json(st.queue_info())
        if path == "/queue":
            with st.cond:
                running = [st.running] if st.running else []
                return self._json({"queue_running": running, "queue_pending": list(st.pending)})
        if path == "/history":
            with st.cond:
                return self._json(dict(st.history))
        if path.startswith("/history/"):
            with st.cond:
                entry = st.history.get(path[len("/history/"):])
            return self._json({path[len("/history/"):]: entry} if entry else {})
        if path == "/view":
            return self._view(query)
        if path == "/features":
            return self._json(dict(FEATURES))
        if path == "/internal/logs":                    # ComfyUI's console ring buffer, as one text
            return self._json("".join(f"{e['t']} - {e['m']}" for e in st.log_entries()))
        if path == "/internal/logs/raw":
            return self._json({"entries": st.log_entries(), "size": {"cols": 0, "rows": 0}})
        if path == "/models":
            return self._json(nodes.load_capture("extra/models.json"))
        if path.startswith("/models/"):
            return self._json(nodes.list_files(st.executor.models_dir, (path[len("/models/"):],)))
        self._send(404, b"404: Not Found", "text/plain; charset=utf-8")

    def _view(self, query: dict[str, str]) -> None:
        kind = query.get("type", "output")
        base = (self.state.root / kind).resolve()
        target = (base / query.get("subfolder", "") / query.get("filename", "")).resolve()
        if kind not in ("output", "input", "temp") or base not in target.parents or not target.is_file():
            return self._send(404, b"", "application/octet-stream")
        self._send(200, target.read_bytes(), "image/png",
                   {"Content-Disposition": f'filename="{target.name}"'})

    # -- POST ------------------------------------------------------------------------------------
    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        raw = self._body()
        if path == "/upload/image":
            return self._upload(raw)
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            body = None
        if not isinstance(body, dict) or (path == "/prompt" and not isinstance(body.get("prompt", {}), dict)):
            return self._send(500, SERVER_ERROR, "text/plain; charset=utf-8")
        if path == "/prompt":
            status, payload = self.state.post_prompt(body)
            return self._json(payload, status)
        if path == "/free":
            self.state.free({k for k in ("unload_models", "free_memory") if body.get(k)})
            return self._send(200, b"", "application/octet-stream")
        if path == "/interrupt":                         # 0.3.64: only the running prompt, if named
            self.state.interrupt(body.get("prompt_id"))
            return self._send(200, b"", "application/octet-stream")
        if path == "/queue":                             # delete pending items, or clear them all
            self.state.edit_queue(body.get("delete") or (), bool(body.get("clear")))
            return self._send(200, b"", "application/octet-stream")
        self._send(404, b"404: Not Found", "text/plain; charset=utf-8")

    def _upload(self, raw: bytes) -> None:
        """multipart/form-data: `image` (the file), `type`, `subfolder`, `overwrite`, as ComfyUI."""
        head = f"Content-Type: {self.headers.get('Content-Type', '')}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
        fields: dict[str, Any] = {}
        filename = None
        for part in message.iter_parts() if message.is_multipart() else ():
            name = part.get_param("name", header="content-disposition")
            if name == "image":
                filename = part.get_filename()
            fields[str(name)] = part.get_payload(decode=True)
        if not filename or "image" not in fields:
            return self._send(400, b"", "application/octet-stream")
        kind = (fields.get("type") or b"input").decode()
        sub = (fields.get("subfolder") or b"").decode()
        folder = (self.state.root / kind / sub).resolve()
        if kind not in ("input", "temp", "output") or not folder.is_relative_to(self.state.root.resolve()):
            return self._send(400, b"", "application/octet-stream")
        folder.mkdir(parents=True, exist_ok=True)
        name, n = Path(filename).name, 1
        if (fields.get("overwrite") or b"").decode().lower() not in ("true", "1"):
            stem, suffix = Path(name).stem, Path(name).suffix
            while (folder / name).exists():                  # ComfyUI's "name (1).png" rule
                name, n = f"{stem} ({n}){suffix}", n + 1
        (folder / name).write_bytes(fields["image"])
        self._json({"name": name, "subfolder": sub, "type": kind})

    # -- /ws ---------------------------------------------------------------------------------------
    def _websocket(self, sid: str) -> None:
        key = self.headers.get("Sec-WebSocket-Key")
        if not key or "websocket" not in (self.headers.get("Upgrade") or "").lower():
            return self._send(400, b"Expected WebSocket upgrade", "text/plain; charset=utf-8")
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "upgrade")
        self.send_header("Sec-WebSocket-Accept", ws.handshake_accept(key))
        self.end_headers()
        self.wfile.flush()
        st, sock, lock = self.state, self.connection, threading.Lock()
        st.sockets[sid] = (sock, lock)
        self.close_connection = True
        try:
            st.send("status", {"status": st.queue_info(), "sid": sid}, sid)
            while True:
                # rfile: it may already hold bytes the client sent right after its handshake.
                opcode, data = ws.receive(self.rfile.read1)
                if opcode == ws.OP_CLOSE:
                    with lock:
                        sock.sendall(ws.frame(ws.OP_CLOSE, data[:2]))
                    return
                if opcode == ws.OP_PING:
                    with lock:
                        sock.sendall(ws.frame(ws.OP_PONG, data))
                elif opcode == ws.OP_TEXT:
                    msg = json.loads(data or b"{}")
                    if msg.get("type") == "feature_flags":      # ComfyUI answers with its own
                        st.send("feature_flags", dict(FEATURES), sid)
        except ws.ProtocolError:
            with lock:
                sock.sendall(ws.close_frame(ws.PROTOCOL_ERROR))
        except (OSError, ws.Closed, ValueError):
            return
        finally:
            if st.sockets.get(sid, (None,))[0] is sock:
                del st.sockets[sid]
