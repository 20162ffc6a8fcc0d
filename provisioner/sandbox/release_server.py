"""A local stand-in for GitHub releases: download redirects, ranged object bytes, the releases API, org renames."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from provisioner.sandbox.http_server import StandInServer

Key = tuple[str, str, str]                       # (owner, repo, tag)
# Real history: mit-han-lab -> nunchaku-tech -> nunchaku-ai, old URLs answer 301.
DEFAULT_RENAMES = {"mit-han-lab": "nunchaku-tech"}
_NOT_FOUND = {"message": "Not Found", "documentation_url": "https://docs.github.com/rest", "status": "404"}
_STAMP = "2025-10-01T00:00:00Z"


@dataclass(frozen=True)
class Logged:
    method: str
    path: str
    status: int
    range: str | None = None


@dataclass(frozen=True)
class _Object:
    id: int
    path: Path
    size: int
    sha256: str


class ReleaseServer:
    """Serves `assets` laid out like github.com; `.requests` logs every request (method, path, status)."""

    def __init__(self, assets: Mapping[Key, Sequence[Path]], renames: Mapping[str, str]) -> None:
        self.renames = dict(renames)
        self.requests: list[Logged] = []
        self._releases: dict[Key, dict[str, _Object]] = {}
        self._objects: dict[int, _Object] = {}
        self._lock = threading.Lock()
        for key, paths in assets.items():
            for path in paths:
                self.add(*key, Path(path))
        self._httpd = StandInServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def add(self, owner: str, repo: str, tag: str, path: Path) -> None:
        """Upload one more asset to a release (created on first use)."""
        data = Path(path).read_bytes()
        with self._lock:
            obj = _Object(len(self._objects) + 1, Path(path), len(data), hashlib.sha256(data).hexdigest())
            self._objects[obj.id] = obj
            self._releases.setdefault((owner, repo, tag), {})[Path(path).name] = obj

    def repo_url(self, owner: str, repo: str) -> str:
        return f"{self.url}/{owner}/{repo}"

    def paths(self, method: str | None = None) -> list[str]:
        return [r.path for r in self.requests if method is None or r.method == method]

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> ReleaseServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def release_json(self, owner: str, repo: str, tag: str) -> dict | None:
        """The body of GET /repos/{owner}/{repo}/releases/tags/{tag}, shaped like GitHub's."""
        with self._lock:
            objects = self._releases.get((owner, repo, tag))
            if objects is None:
                return None
            objects = dict(objects)
        api = f"{self.url}/api/v3/repos/{owner}/{repo}"
        rid = int(hashlib.sha256(f"{owner}/{repo}/{tag}".encode()).hexdigest()[:7], 16)
        return {
            "url": f"{api}/releases/{rid}", "html_url": f"{self.repo_url(owner, repo)}/releases/tag/{tag}",
            "assets_url": f"{api}/releases/{rid}/assets", "id": rid, "tag_name": tag, "name": tag,
            "target_commitish": "main", "draft": False, "prerelease": "dev" in tag,
            "created_at": _STAMP, "published_at": _STAMP, "body": "",
            "assets": [{
                "url": f"{api}/releases/assets/{o.id}", "id": o.id, "name": name, "label": "",
                "content_type": "application/octet-stream", "state": "uploaded", "size": o.size,
                "digest": f"sha256:{o.sha256}", "download_count": 0,
                "created_at": _STAMP, "updated_at": _STAMP,
                "browser_download_url": f"{self.repo_url(owner, repo)}/releases/download/{tag}/{name}",
            } for name, o in sorted(objects.items())],
        }

    def lookup(self, owner: str, repo: str, tag: str, name: str) -> _Object | None:
        with self._lock:
            return self._releases.get((owner, repo, tag), {}).get(name)

    def object(self, oid: int) -> _Object | None:
        with self._lock:
            return self._objects.get(oid)


_DOWNLOAD = re.compile(r"^/([^/]+)/([^/]+)/releases/download/([^/]+)/([^/]+)$")
_API_TAG = re.compile(r"^/api/v3/repos/([^/]+)/([^/]+)/releases/tags/([^/]+)$")
_OBJECT = re.compile(r"^/objects/(\d+)$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


def _handler(server: ReleaseServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:   # the request log replaces stderr noise
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        def _route(self, body: bool) -> None:
            url = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(url.path)
            renamed = self._renamed(url.path)      # raw: keep the client's own escaping
            if renamed:
                return self._redirect(301, server.url + renamed + (f"?{url.query}" if url.query else ""))
            if m := _DOWNLOAD.match(path):
                obj = server.lookup(*m.groups())
                if obj is None:
                    return self._send(404, b"Not Found", "text/plain", body)
                # GitHub answers 302 to a signed, expiring object URL on another host.
                query = urllib.parse.urlencode({"filename": m.group(4), "response-content-disposition":
                                                f"attachment; filename={m.group(4)}", "sig": obj.sha256[:16]})
                return self._redirect(302, f"{server.url}/objects/{obj.id}?{query}")
            if m := _API_TAG.match(path):
                release = server.release_json(*m.groups())
                if release is None:
                    return self._json(404, _NOT_FOUND, body)
                return self._json(200, release, body)
            if m := _OBJECT.match(path):
                obj = server.object(int(m.group(1)))
                if obj is None:
                    return self._send(404, b"Not Found", "text/plain", body)
                return self._bytes(obj, body)
            if path.startswith("/api/"):
                return self._json(404, _NOT_FOUND, body)
            return self._send(404, b"Not Found", "text/plain", body)

        def _renamed(self, path: str) -> str | None:
            parts = path.split("/")
            api = path.startswith("/api/v3/repos/")
            i = 4 if api else 1
            if len(parts) > i and parts[i] in server.renames:
                parts[i] = server.renames[parts[i]]
                return "/".join(parts)
            return None

        def _bytes(self, obj: _Object, body: bool) -> None:
            data = obj.path.read_bytes()
            header = self.headers.get("Range")
            start, end, status = 0, len(data) - 1, 200
            if header:
                m = _RANGE.match(header.strip())
                if not m or (m.group(1) == "" and m.group(2) == ""):
                    return self._unsatisfiable(len(data), header, body)
                if m.group(1) == "":                          # bytes=-N: the last N bytes
                    start = max(0, len(data) - int(m.group(2)))
                else:
                    start = int(m.group(1))
                    end = min(end, int(m.group(2))) if m.group(2) else end
                if start >= len(data) or start > end:
                    return self._unsatisfiable(len(data), header, body)
                status = 206
            chunk = data[start:end + 1]
            self._log(status, header)
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(chunk)))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"0x{obj.sha256[:16].upper()}"')
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
            self.end_headers()
            if body:
                self.wfile.write(chunk)

        def _unsatisfiable(self, size: int, header: str, body: bool) -> None:
            self._log(416, header)
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _redirect(self, status: int, location: str) -> None:
            self._log(status)
            self.send_response(status)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def _json(self, status: int, payload: object, body: bool) -> None:
            self._send(status, json.dumps(payload, indent=2).encode(), "application/json; charset=utf-8", body)

        def _send(self, status: int, data: bytes, ctype: str, body: bool) -> None:
            self._log(status)
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

        def _log(self, status: int, rng: str | None = None) -> None:
            # Logged before answering: a client that got its answer always finds it in the log.
            with server._lock:
                server.requests.append(Logged(self.command, self.path, status, rng))

    return Handler


def start_release_server(assets: Mapping[Key, Sequence[Path]] | None = None,
                         renames: Mapping[str, str] = DEFAULT_RENAMES) -> ReleaseServer:
    """Start serving on 127.0.0.1 (a free port). `assets[(owner, repo, tag)]` are the files of that
    release, served under their own names; `renames` maps an old owner to the one it redirects to."""
    return ReleaseServer(assets or {}, renames)
