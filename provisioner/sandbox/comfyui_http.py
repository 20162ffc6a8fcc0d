"""The stand-in ComfyUI's routes: the HTTP side of `comfyui_server.State`, plus the `/ws` upgrade.

It answers as ComfyUI 0.3.64's aiohttp server does, checked against the real one by the real tier
(tests/real/test_real_standin.py): HTTP/1.1 with keep-alive (1.0 for a 1.0 request), aiohttp's
headers in its order, every API route also under `/api`, HEAD wherever GET is, 405 with `Allow`
for a known path and another method, and the frontend's static files under everything else (a
missing one: an empty chunked 404). A POST body is read as JSON whatever its Content-Type; one that
is not JSON, or that the route's own code cannot walk (a list where it calls `.get`), is a 500
with aiohttp's text, as there.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import hashlib
import io
import ipaddress
import json
import mimetypes
import os
import re
import socket
import threading
import traceback
import urllib.parse
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from provisioner.sandbox import comfyui_nodes as nodes, comfyui_ws as ws

FEATURES = {"supports_preview_metadata": True, "max_upload_size": 104857600}  # features.json capture
SERVER = "Python/3.11 aiohttp/3.14.5"             # what real ComfyUI answers in `Server:`
SERVER_ERROR = b"500 Internal Server Error\n\nServer got itself in trouble"   # aiohttp's, as captured
JSON = "application/json; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
# The frontend's index.html stands in for the whole static web root (the real one is 64 KB).
INDEX = (b'<!doctype html><html lang="en"><head><meta charset="UTF-8"><title>ComfyUI</title></head>'
         b'<body><div id="vue-app"></div></body></html>\n')
NO_CACHE = {"Cache-Control": "no-cache", "Pragma": "no-cache", "Expires": "0"}
# API routes and their methods; aiohttp adds HEAD to every GET. `{x}` is one path segment.
ROUTES: dict[str, tuple[str, ...]] = {
    "/ws": ("GET",), "/": ("GET",), "/embeddings": ("GET",), "/models": ("GET",), "/models/{x}": ("GET",),
    "/extensions": ("GET",), "/upload/image": ("POST",), "/upload/mask": ("POST",), "/view": ("GET",),
    "/system_stats": ("GET",), "/features": ("GET",), "/prompt": ("GET", "POST"), "/object_info": ("GET",),
    "/object_info/{x}": ("GET",), "/history": ("GET", "POST"), "/history/{x}": ("GET",),
    "/queue": ("GET", "POST"), "/interrupt": ("POST",), "/free": ("POST",),
}
INTERNAL: dict[str, tuple[str, ...]] = {      # a sub-application: no /api alias, no static files
    "/internal/logs": ("GET",), "/internal/logs/raw": ("GET",), "/internal/logs/subscribe": ("PATCH",),
    "/internal/folder_paths": ("GET",), "/internal/files/{x}": ("GET",),
}
FOLDERS = ("output", "input", "temp")


class ServerError(Exception):
    """A request ComfyUI's code cannot take (its body is not JSON, say): aiohttp answers 500."""


def _match(table: dict[str, tuple[str, ...]], path: str) -> tuple[str, str | None] | None:
    """(route, its `{x}` segment) for a path, or None."""
    if path in table:
        return path, None
    for route in table:
        if route.endswith("/{x}") and path.startswith(route[:-3]):
            rest = path[len(route) - 3:]
            if re.fullmatch(r"[^/]+", rest):
                return route, urllib.parse.unquote(rest)
    return None


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:   # ComfyUI logs no access lines
        pass

    def version_string(self) -> str:
        return SERVER

    @property
    def state(self) -> Any:
        return self.server.state  # type: ignore[attr-defined]

    # -- answers ---------------------------------------------------------------------------------
    def _head(self, status: int, headers: dict[str, str]) -> None:
        """aiohttp's status line (the request's HTTP version) and headers, in its order."""
        if self.request_version == "HTTP/1.0":
            self.protocol_version = "HTTP/1.0"
            self.close_connection = True
        self.send_response_only(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Date", self.date_time_string())
        self.send_header("Server", SERVER)
        if self.close_connection and self.request_version != "HTTP/1.0":
            self.send_header("Connection", "close")
        self.end_headers()

    def _send(self, status: int, body: bytes = b"", ctype: str | None = None,
              extra: dict[str, str] | None = None) -> None:
        """A body with its length; an empty answer has no Content-Type, as web.Response()."""
        headers = {**({"Content-Type": ctype} if ctype else {}), **(extra or {}), "Content-Length": str(len(body))}
        self._head(status, headers)
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, payload: Any, status: int = 200) -> None:
        self._send(status, json.dumps(payload).encode(), JSON)

    def _not_found(self) -> None:
        """A static file that is not there: an empty chunked 404."""
        if self.request_version == "HTTP/1.0":
            return self._send(404, b"", "application/octet-stream")
        self._head(404, {"Transfer-Encoding": "chunked", "Content-Type": "application/octet-stream"})
        if self.command != "HEAD":
            self.wfile.write(b"0\r\n\r\n")

    def _file(self, path: Path, ctype: str, extra: dict[str, str] | None = None) -> None:
        """As aiohttp's FileResponse: Etag from mtime and size, Last-Modified, Accept-Ranges, and
        a `Range: bytes=A-B` answered with 206 and that part (416 when it lies outside)."""
        data, st = path.read_bytes(), path.stat()
        headers = {**(extra or {}), "Etag": f'"{st.st_mtime_ns:x}-{st.st_size:x}"',
                   "Last-Modified": email.utils.formatdate(st.st_mtime, usegmt=True), "Accept-Ranges": "bytes"}
        wanted = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if not wanted or wanted.groups() == ("", ""):
            return self._send(200, data, ctype, headers)
        first, last = wanted.groups()
        start = int(first) if first else max(0, len(data) - int(last))
        end = min(len(data) - 1, int(last)) if first and last else len(data) - 1
        if start >= len(data) or start > end:           # aiohttp: an empty chunked 416
            self._head(416, {**(extra or {}), "Content-Type": ctype, "Content-Range": f"bytes */{len(data)}",
                             "Transfer-Encoding": "chunked"})
            if self.command != "HEAD":
                self.wfile.write(b"0\r\n\r\n")
            return None
        self._send(206, data[start:end + 1], ctype, {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"})

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _request_json(self, raw: bytes) -> Any:
        """aiohttp's `await request.json()`: any JSON value; anything else raises."""
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ServerError(str(err)) from None

    # -- dispatch --------------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_OPTIONS(self) -> None:
        self._body()
        if not self._cross_origin():
            self._send(200)                            # ComfyUI's middleware answers any OPTIONS

    def _cross_origin(self) -> bool:
        """ComfyUI's guard against a web page posting to a local ComfyUI: with a loopback Host,
        an Origin of another host is a 403. True when it answered so."""
        host, origin = self.headers.get("Host"), self.headers.get("Origin")
        if host is None or origin is None:
            return False
        parsed, ours = urllib.parse.urlparse(origin), urllib.parse.urlsplit("//" + host.lower())
        host_domain = ours.hostname if parsed.port is None else host.lower()
        origin_domain = parsed.hostname if ours.port is None else parsed.netloc.lower()
        if _loopback(ours.hostname) and host_domain and origin_domain and host_domain != origin_domain:
            self.state.log(f"WARNING: request with non matching host and origin {host_domain} != "
                           f"{origin_domain}, returning 403")
            self._send(403)
            return True
        return False

    def _dispatch(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        path, query = url.path, dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        raw = self._body() if method in ("POST", "PATCH", "PUT", "DELETE") else b""
        if self._cross_origin():
            return
        internal = path == "/internal" or path.startswith("/internal/")
        table = INTERNAL if internal else ROUTES
        found = _match(table, path) or (None if internal or not path.startswith("/api/")
                                        else _match(ROUTES, path[len("/api"):]))
        if found is not None and found[0] == "/" and path != "/":
            found = None                               # /api/ is not an alias of the index
        routed = set(table[found[0]]) if found else set()
        routed |= {"HEAD"} if "GET" in routed else set()
        static = set() if internal else {"GET", "HEAD"}   # the web root answers GET and HEAD anywhere
        if method not in routed | static:
            if internal and found is None:
                return self._send(404, b"404: Not Found", TEXT)
            return self._send(405, b"405: Method Not Allowed", TEXT, {"Allow": ",".join(sorted(routed | static))})
        if found is None or method not in routed:
            return self._static(path)
        route, segment = found
        verb = "get" if method == "HEAD" else method.lower()
        handler: Callable[..., None] = getattr(self, f"_{verb}" + re.sub(r"\W+", "_", route).rstrip("_").lower())
        try:
            handler(segment, query, raw)
        except Exception:                              # noqa: BLE001 - as aiohttp: any exception is a 500
            self.state.log(f"Error handling request\n{traceback.format_exc()}")
            self.close_connection = True               # and aiohttp closes that connection
            self._send(500, SERVER_ERROR, TEXT)

    def _static(self, path: str) -> None:
        if path == "/index.html":
            return self._send(200, INDEX, "text/html", self._index_headers())
        self._not_found()

    def _index_headers(self) -> dict[str, str]:
        return {"Etag": f'"{hashlib.sha256(INDEX).hexdigest()[:16]}-{len(INDEX):x}"',
                "Last-Modified": email.utils.formatdate(0, usegmt=True), "Accept-Ranges": "bytes"}

    # -- GET routes ------------------------------------------------------------------------------
    def _get(self, segment: None, query: dict[str, str], raw: bytes) -> None:           # "/"
        self._send(200, INDEX, "text/html", {**NO_CACHE, **self._index_headers()})

    def _get_ws(self, segment: None, query: dict[str, str], raw: bytes) -> None:
        self._websocket(query.get("clientId") or uuid.uuid4().hex)

    def _get_system_stats(self, *_: Any) -> None:
        self._json(self.state.system_stats())

    def _get_features(self, *_: Any) -> None:
        self._json(dict(FEATURES))

    def _get_embeddings(self, *_: Any) -> None:
        found = nodes.list_in(nodes.folder_paths(self.state.root, self.state.executor.models_dir)["embeddings"])
        self._json([os.path.splitext(name)[0] for name in found])

    def _get_extensions(self, *_: Any) -> None:
        self._json(nodes.load_capture("extra/extensions.json"))

    def _get_models(self, *_: Any) -> None:
        self._json(list(nodes.folder_paths(self.state.root, self.state.executor.models_dir)))

    def _get_models_x(self, folder: str, *_: Any) -> None:
        paths = nodes.folder_paths(self.state.root, self.state.executor.models_dir)
        if folder not in paths:
            return self._send(404)
        self._json(nodes.list_in(paths[folder]))

    def _get_object_info(self, *_: Any) -> None:
        self._json(self.state.object_info())

    def _get_object_info_x(self, name: str, *_: Any) -> None:
        self._json(self.state.object_info(name))

    def _get_prompt(self, *_: Any) -> None:
        with self.state.cond:
            self._json(self.state.queue_info())

    def _get_queue(self, *_: Any) -> None:
        st = self.state
        with st.cond:
            running = [st.running] if st.running else []
            self._json({"queue_running": running, "queue_pending": list(st.pending)})

    def _get_history(self, segment: None, query: dict[str, str], raw: bytes) -> None:
        max_items = int(query["max_items"]) if "max_items" in query else None
        offset = int(query["offset"]) if "offset" in query else -1
        self._json(self.state.get_history(max_items=max_items, offset=offset))

    def _get_history_x(self, prompt_id: str, *_: Any) -> None:
        self._json(self.state.get_history(prompt_id))

    def _get_view(self, segment: None, query: dict[str, str], raw: bytes) -> None:
        """As ComfyUI's /view: 400 for `..` or a leading `/` in the name or an unknown type, 403
        for a subfolder out of its folder, 404 for a missing file; `channel` and `preview`."""
        if "filename" not in query:
            return self._send(404)
        name, folder = nodes.annotated(query["filename"])
        if not name or name[0] == "/" or ".." in name:
            return self._send(400)
        if folder is None:
            kind = query.get("type", "output")
            folder = kind if kind in FOLDERS else None
        if folder is None:
            return self._send(400)
        base = os.path.abspath(self.state.root / folder)
        where = base
        if "subfolder" in query:
            where = os.path.join(base, query["subfolder"])
            if os.path.commonpath((os.path.abspath(where), base)) != base:
                return self._send(403)
        target = Path(where) / os.path.basename(name)
        if not target.is_file():
            return self._send(404)
        disposition = {"Content-Disposition": f'filename="{target.name}"'}
        if "preview" in query or query.get("channel", "rgba") != "rgba":
            return self._send(200, *self._converted(target, query), disposition)
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype in ("text/html", "text/html-sandboxed", "application/xhtml+xml", "text/javascript", "text/css"):
            ctype = "application/octet-stream"          # ComfyUI forces those to download
        self._file(target, ctype, disposition)

    @staticmethod
    def _converted(target: Path, query: dict[str, str]) -> tuple[bytes, str]:
        """/view's `preview=webp;90` or `preview=jpeg;Q` and `channel=rgb|a`, through Pillow."""
        from PIL import Image

        out = io.BytesIO()
        with Image.open(target) as img:
            if "preview" in query:
                spec = query["preview"].split(";")
                fmt = spec[0] if spec[0] in ("webp", "jpeg") and "a" not in query.get("channel", "") else "webp"
                quality = int(spec[-1]) if spec[-1].isdigit() else 90
                picture = img.convert("RGB") if fmt == "jpeg" or query.get("channel") == "rgb" else img
                picture.save(out, format=fmt, quality=quality)
                return out.getvalue(), f"image/{fmt}"
            if query["channel"] == "rgb":
                img.convert("RGB").save(out, format="PNG")
            else:
                alpha = img.getchannel("A") if img.mode == "RGBA" else Image.new("L", img.size, 255)
                mask = Image.new("RGBA", img.size)
                mask.putalpha(alpha)
                mask.save(out, format="PNG")
        return out.getvalue(), "image/png"

    # -- /internal -------------------------------------------------------------------------------
    def _get_internal_logs(self, *_: Any) -> None:     # ComfyUI's console ring buffer, as one text
        self._json("".join(f"{e['t']} - {e['m']}" for e in self.state.log_entries()))

    def _get_internal_logs_raw(self, *_: Any) -> None:
        self._json({"entries": self.state.log_entries(), "size": {"cols": 80, "rows": 24}})  # no terminal

    def _patch_internal_logs_subscribe(self, segment: None, query: dict[str, str], raw: bytes) -> None:
        body = self._request_json(raw)
        client_id, enabled = body["clientId"], body["enabled"]
        with self.state.cond:
            (self.state.subscribers.add if enabled else self.state.subscribers.discard)(client_id)
        self._send(200)

    def _get_internal_folder_paths(self, *_: Any) -> None:
        self._json({k: [str(p) for p in v] for k, v in
                    nodes.folder_paths(self.state.root, self.state.executor.models_dir).items()})

    def _get_internal_files_x(self, kind: str, *_: Any) -> None:
        if kind not in FOLDERS:
            return self._json({"error": "Invalid directory type"}, 400)
        folder = self.state.root / kind
        files = sorted((p for p in folder.iterdir() if p.is_file()), key=lambda p: -p.stat().st_mtime) \
            if folder.is_dir() else []
        self._json([p.name for p in files])

    # -- POST routes -----------------------------------------------------------------------------
    def _post_prompt(self, segment: None, query: dict[str, str], raw: bytes) -> None:
        self.state.log("got prompt")                   # before the body is even read, as ComfyUI
        status, payload = self.state.post_prompt(self._request_json(raw))
        self._json(payload, status)

    def _post_free(self, segment: None, query: dict[str, str], raw: bytes) -> None:
        self.state.free(self._request_json(raw))
        self._send(200)

    def _post_interrupt(self, segment: None, query: dict[str, str], raw: bytes) -> None:
        try:                                           # ComfyUI takes a body that is not JSON as {}
            body = self._request_json(raw)
        except ServerError:
            body = {}
        self.state.interrupt(body)
        self._send(200)

    def _post_queue(self, segment: None, query: dict[str, str], raw: bytes) -> None:
        self.state.edit_queue(self._request_json(raw))
        self._send(200)

    def _post_history(self, segment: None, query: dict[str, str], raw: bytes) -> None:
        self.state.edit_history(self._request_json(raw))
        self._send(200)

    def _post_upload_image(self, segment: None, query: dict[str, str], raw: bytes) -> None:
        self._upload(raw)

    def _post_upload_mask(self, segment: None, query: dict[str, str], raw: bytes) -> None:
        self._upload(raw)

    def _upload(self, raw: bytes) -> None:
        """multipart/form-data: `image` (the file), `type`, `subfolder`, `overwrite`, as ComfyUI:
        a name that leaves the folder is a 400, an unknown type a 500; without overwrite, the same
        name with the same bytes is that file again, other bytes get `name (1).png`."""
        head = f"Content-Type: {self.headers.get('Content-Type', '')}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
        fields: dict[str, Any] = {}
        filename = None
        for part in message.iter_parts() if message.is_multipart() else ():
            name = part.get_param("name", header="content-disposition")
            if name == "image":
                filename = part.get_filename()
            fields[str(name)] = part.get_payload(decode=True)
        kind = fields["type"].decode() if "type" in fields else "input"
        if kind not in FOLDERS:
            raise ServerError(f"upload type {kind!r}")    # ComfyUI: UnboundLocalError, a 500
        if filename is None and fields.get("image"):
            raise ServerError("image is a plain field")   # ComfyUI reads its .file: a 500
        if not filename:
            return self._send(400)
        base = os.path.abspath(self.state.root / kind)
        sub = (fields.get("subfolder") or b"").decode()
        folder = os.path.join(base, os.path.normpath(sub))
        path = os.path.abspath(os.path.join(folder, filename))
        if os.path.commonpath((base, path)) != base:
            return self._send(400)
        os.makedirs(folder, exist_ok=True)
        data: bytes = fields["image"]
        stem, suffix = os.path.splitext(filename)
        duplicate, n = False, 1
        if (fields.get("overwrite") or b"").decode() not in ("true", "1"):
            while os.path.exists(path):
                if Path(path).read_bytes() == data:       # ComfyUI compares content hashes
                    duplicate = True
                    break
                filename = f"{stem} ({n}){suffix}"
                path, n = os.path.join(folder, filename), n + 1
        if not duplicate:
            Path(path).write_bytes(data)
        self._json({"name": filename, "subfolder": sub, "type": kind})

    # -- /ws ---------------------------------------------------------------------------------------
    def _websocket(self, sid: str) -> None:
        key = self.headers.get("Sec-WebSocket-Key")
        upgrade = self.headers.get("Upgrade")
        if not upgrade or upgrade.lower() != "websocket" or not key:
            return self._send(400, f'No WebSocket UPGRADE hdr: {upgrade}\n Can "Upgrade" only to '
                                   f'"WebSocket".'.encode(), TEXT)
        self._head(101, {"Upgrade": "websocket", "Connection": "upgrade",
                         "Sec-WebSocket-Accept": ws.handshake_accept(key)})
        self.wfile.flush()
        st, sock, lock = self.state, self.connection, threading.Lock()
        st.sockets[sid] = (sock, lock)                  # a second socket with this id replaces the first
        self.close_connection = True
        try:
            with lock:
                sock.sendall(_frame("status", {"status": st.queue_info(), "sid": sid}))
                if st.client_id == sid and st.last_node is not None:   # back while its prompt runs
                    sock.sendall(_frame("executing", {"node": st.last_node}))
            first = True
            while True:
                # rfile: it may already hold bytes the client sent right after its handshake.
                opcode, data = ws.receive(self.rfile.read1)
                if opcode == ws.OP_CLOSE:                   # aiohttp answers 1000, whatever the code
                    with lock:
                        sock.sendall(ws.close_frame(ws.NORMAL))
                    return
                if opcode == ws.OP_PING:
                    with lock:
                        sock.sendall(ws.frame(ws.OP_PONG, data))
                elif opcode == ws.OP_TEXT:
                    try:
                        msg = json.loads(data)
                    except ValueError:
                        continue                       # ComfyUI logs it and reads on
                    if not isinstance(msg, dict):
                        continue                       # so does its `.get` on anything else
                    if first and msg.get("type") == "feature_flags":
                        st.send("feature_flags", dict(FEATURES), sid)   # only as the first message
                    first = False
        except ws.ProtocolError as err:
            with lock:
                sock.sendall(ws.close_frame(err.code))
        except (OSError, ws.Closed):
            return
        finally:
            st.sockets.pop(sid, None)                  # as ComfyUI: even when another socket took the id


def _loopback(host: str | None) -> bool:
    """Whether a host name or address is this machine's loopback (every address it resolves to)."""
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in found)


def _frame(event: str, data: Any) -> bytes:
    return ws.frame(ws.OP_TEXT, json.dumps({"type": event, "data": data}).encode())
