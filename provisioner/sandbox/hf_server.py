"""A local stand-in for the Hugging Face Hub that huggingface_hub and the host fetch script accept.

It speaks the parts of the real protocol they use: `HEAD/GET /{repo}/resolve/{rev}/{path}` (LFS
files answer 302 to a CDN origin with X-Repo-Commit, X-Linked-Etag = "<sha256>", X-Linked-Size),
the CDN serving bytes with Range/206, `POST /api/models/{repo}/paths-info/{rev}`,
`GET /api/models/{repo}/revision/{rev}` and `/tree/{rev}`, and the Hub's `X-Error-Code` errors
(RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo). The CDN is a second listener on another
port: another origin, as on the real Hub, so clients must not forward the Authorization header.
It can throttle, stall (go silent with the connection open) and drop connections mid-body to
exercise resumable downloads and the silence limit.
"""

from __future__ import annotations

import hashlib
import json
import re
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from provisioner.sandbox.http_server import StandInServer

_TEXT_SUFFIXES = (".json", ".md", ".txt", ".yaml", ".yml", ".gitattributes")  # kept in git, not LFS
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)"
                  r"(?:/(?P<kind>paths-info|revision|tree)/(?P<rev>[^/]+)(?:/(?P<path>.*))?)?$")
_CDN = re.compile(r"^/cdn/(?P<sha>[0-9a-f]{64})$")
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")


@dataclass(frozen=True)
class Blob:
    repo: str
    path: str
    data: bytes
    sha256: str
    git_sha1: str                     # git blob oid, the ETag of a non-LFS file
    lfs: bool


@dataclass(frozen=True)
class Logged:
    """One request as the server saw it."""

    origin: str                       # "hub" | "cdn"
    method: str
    path: str
    headers: Mapping[str, str]        # names in Title-Case ("Authorization", "Range"), whatever the client sent
    status: int
    body_bytes: int                   # bytes of body actually written


def _blob(repo: str, path: str, content: bytes | Path) -> Blob:
    data = content.read_bytes() if isinstance(content, Path) else bytes(content)
    git = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    return Blob(repo, path, data, hashlib.sha256(data).hexdigest(), git, not path.endswith(_TEXT_SUFFIXES))


class HfServer:
    """A running stand-in. `url` is the Hub endpoint (`HfApi(endpoint=url)`, `HF_ENDPOINT`)."""

    def __init__(self, files: Mapping[tuple[str, str], bytes | Path], gated: Iterable[str],
                 token: str | None, commit: str, commits: Mapping[str, str]) -> None:
        blobs = {key: _blob(*key, content) for key, content in files.items()}
        self.by_sha = {b.sha256: b for b in blobs.values()}
        # repo -> its commits, oldest first, each with the files it holds: old revisions stay
        # downloadable after a re-upload, as on the real Hub.
        self.history: dict[str, list[tuple[str, dict[str, Blob]]]] = {
            repo: [(commits.get(repo, commit), {p: b for (r, p), b in blobs.items() if r == repo})]
            for repo in sorted({r for r, _ in blobs})}
        self.repos = set(self.history)
        self.gated = set(gated)
        self.token = token
        self.commit = commit             # the first commit of every repo not given one in `commits`
        self.requests: list[Logged] = []
        self.throttle_bps: int | None = None   # body bytes per second, None = as fast as possible
        self.honor_range = True                # False: answer 200 with everything, like a naive server
        self.stall_after: int | None = None    # body bytes sent before going silent, connection open,
                                               # as a wedged CDN does; None again lets it go on
        self._drops: list[int] = []            # for the next GETs with a body: bytes sent before hanging up
        self._resets = 0                       # the next requests to the Hub: their connection reset
        self._lock = threading.Lock()
        self.open_sockets: set[socket.socket] = set()   # kept-alive connections, closed by stop()
        self._hub = self._listen("hub")
        self._cdn = self._listen("cdn")
        self.url = f"http://127.0.0.1:{self._hub.server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def _listen(self, origin: str) -> StandInServer:
        server = StandInServer(("127.0.0.1", 0), _Handler)
        server.hf = self  # type: ignore[attr-defined]
        server.origin = origin  # type: ignore[attr-defined]
        # A short poll keeps stop() (shutdown waits for the next poll) fast for tests.
        threading.Thread(target=server.serve_forever, args=(0.05,), name=f"hf-{origin}", daemon=True).start()
        return server

    def commit_of(self, repo: str) -> str:
        """The commit `main` is at now."""
        with self._lock:
            return self.history[repo][-1][0]

    def snapshot(self, repo: str, rev: str) -> tuple[str, dict[str, Blob]] | None:
        """(commit, files) of `main` or of a commit of the repo; None for an unknown revision."""
        with self._lock:
            commits = self.history[repo]
            if rev == "main":
                return commits[-1]
            return next((c for c in commits if c[0] == rev), None)

    def reupload(self, repo: str, path: str, content: bytes) -> str:
        """Upstream replaces a file: a new commit on main; the old one still serves the old bytes."""
        blob = _blob(repo, path, content)
        with self._lock:
            last, files = self.history[repo][-1]
            commit = hashlib.sha1(f"{last} {path} {blob.sha256}".encode()).hexdigest()
            self.history[repo].append((commit, {**files, path: blob}))
            self.by_sha[blob.sha256] = blob
        return commit

    def drop_after(self, nbytes: int, times: int = 1) -> None:
        """Hang up on the next `times` body-carrying GETs after `nbytes` of body each."""
        with self._lock:
            self._drops.extend([nbytes] * times)

    def reset_next(self, times: int = 1) -> None:
        """Reset the connection of each of the next `times` requests to the Hub (not the CDN), a
        new one or one kept alive, as a loaded proxy in front of the real Hub now and then does:
        the client reads ECONNRESET instead of an answer."""
        with self._lock:
            self._resets += times

    def _take_reset(self) -> bool:
        with self._lock:
            if self._resets <= 0:
                return False
            self._resets -= 1
            return True

    def _take_drop(self) -> int | None:
        with self._lock:
            return self._drops.pop(0) if self._drops else None

    def log(self, entry: Logged) -> None:
        with self._lock:
            self.requests.append(entry)

    def cdn_link(self, blob: Blob) -> str:
        # Real CDN links are signed and short-lived; the query only makes it look and behave alike.
        return f"{self.cdn_url}/cdn/{blob.sha256}?X-Amz-Expires=3600&repo={quote(blob.repo, safe='')}"

    def stop(self) -> None:
        for server in (self._hub, self._cdn):
            server.shutdown()
            server.server_close()
        with self._lock:  # a stopped Hub answers nothing, not even on a client's pooled connection
            sockets, self.open_sockets = list(self.open_sockets), set()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> HfServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_hf_server(files: Mapping[tuple[str, str], bytes | Path], *, gated: Iterable[str] = (),
                    token: str | None = None, commit: str | None = None,
                    commits: Mapping[str, str] | None = None) -> HfServer:
    """Serve `files` ({(repo, path_in_repo): bytes or Path}); `gated` repos need `token`.
    Every repo starts at `commit` (default: derived from the files), or at its own in `commits`."""
    if commit is None:
        digest = hashlib.sha1()
        for (repo, path), content in sorted(files.items()):
            data = content.read_bytes() if isinstance(content, Path) else bytes(content)
            digest.update(f"{repo} {path} {hashlib.sha256(data).hexdigest()}\n".encode())
        commit = digest.hexdigest()          # content decides the commit, as on the real Hub
    return HfServer(files, gated, token, commit, commits or {})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hf-standin/1.0"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet: we keep our own log
        pass

    def setup(self) -> None:
        super().setup()
        with self.hf._lock:
            self.hf.open_sockets.add(self.connection)

    def finish(self) -> None:
        with self.hf._lock:
            self.hf.open_sockets.discard(self.connection)
        super().finish()

    @property
    def hf(self) -> HfServer:
        return self.server.hf  # type: ignore[attr-defined]

    def do_HEAD(self) -> None:
        self._dispatch(body=False)

    def do_GET(self) -> None:
        self._dispatch(body=True)

    def do_POST(self) -> None:
        self._dispatch(body=True)

    def _dispatch(self, body: bool) -> None:
        if self.server.origin == "hub" and self.hf._take_reset():  # type: ignore[attr-defined]
            # SO_LINGER 0: the socket's last close sends RST, not FIN; the client reads ECONNRESET.
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            self.rfile.close()
            self.connection.close()
            return
        self._sent = 0
        self._status = 500
        self._commit = ""
        # Read a POST body first, whatever the route answers, so the kept-alive connection stays in sync.
        self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if self.command == "POST" else b""
        path = urlsplit(self.path).path
        try:
            if self.server.origin == "cdn":  # type: ignore[attr-defined]
                m = _CDN.match(path)
                blob = self.hf.by_sha.get(m["sha"]) if m else None
                if blob is None:
                    self._error(404, "EntryNotFound", "Not found on the CDN")
                else:
                    self._serve_bytes(blob, body, {})
            elif m := _RESOLVE.match(path):
                self._resolve(m["repo"], unquote(m["rev"]), unquote(m["path"]), body)
            elif m := _API.match(path):
                self._api(m["kind"] or "revision", m["repo"], unquote(m["rev"] or "main"), unquote(m["path"] or ""))
            else:
                self._error(404, None, "Not Found")
        finally:
            self.hf.log(Logged(self.server.origin, self.command, self.path,  # type: ignore[attr-defined]
                               {k.title(): v for k, v in self.headers.items()}, self._status, self._sent))

    # -- Hub routes -------------------------------------------------------------------------
    def _check_repo(self, repo: str, rev: str) -> dict[str, Blob] | None:
        """The files of `repo` at `rev` (self._commit set), or None after answering the error."""
        if repo not in self.hf.repos:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        auth = self.headers.get("Authorization")
        if auth is not None and self.hf.token is not None and auth != f"Bearer {self.hf.token}":
            self._error(401, None, "Invalid credentials in Authorization header")
            return None
        if repo in self.hf.gated and (self.hf.token is None or auth != f"Bearer {self.hf.token}"):
            self._error(401, "GatedRepo", f"Access to model {repo} is restricted. You must have access to it "
                        "and be authenticated to access it. Please log in.")
            return None
        found = self.hf.snapshot(repo, rev)
        if found is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return None
        self._commit, files = found
        return files

    def _resolve(self, repo: str, rev: str, path: str, body: bool) -> None:
        files = self._check_repo(repo, rev)
        if files is None:
            return
        blob = files.get(path)
        if blob is None:
            self._error(404, "EntryNotFound", f"{path} does not exist on \"{rev}\"")
            return
        if not blob.lfs:  # small git files are served by the Hub itself
            self._serve_bytes(blob, body, {"X-Repo-Commit": self._commit})
            return
        self._status = 302
        self.send_response(302)
        for key, value in {
            "Location": self.hf.cdn_link(blob),
            "X-Repo-Commit": self._commit,
            "X-Linked-Etag": f'"{blob.sha256}"',
            "X-Linked-Size": str(len(blob.data)),
            "ETag": f'"{blob.git_sha1}"',
            "Content-Length": "0",
        }.items():
            self.send_header(key, value)
        self.end_headers()

    def _entry(self, blob: Blob) -> dict[str, object]:
        entry: dict[str, object] = {"type": "file", "oid": blob.git_sha1, "size": len(blob.data), "path": blob.path}
        if blob.lfs:
            entry["lfs"] = {"oid": blob.sha256, "size": len(blob.data), "pointerSize": 134}
        return entry

    def _api(self, kind: str, repo: str, rev: str, path: str) -> None:
        files = self._check_repo(repo, rev)
        if files is None:
            return
        blobs = [b for _, b in sorted(files.items())]
        if kind == "paths-info":
            wanted = set(self._posted_paths())
            self._json([self._entry(b) for b in blobs if b.path in wanted])
        elif kind == "revision":
            self._json({"id": repo, "modelId": repo, "sha": self._commit, "private": False,
                        "gated": "manual" if repo in self.hf.gated else False,
                        "siblings": [{"rfilename": b.path} for b in blobs]})
        else:  # tree: every file under `path` (the stand-in lists recursively)
            prefix = path.rstrip("/") + "/" if path else ""
            self._json([self._entry(b) for b in blobs if b.path.startswith(prefix)])

    def _posted_paths(self) -> list[str]:
        raw = self._body.decode()
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(raw or "{}").get("paths", [])
            return [paths] if isinstance(paths, str) else list(paths)
        return parse_qs(raw).get("paths", [])  # huggingface_hub posts a form: paths=a&paths=b

    # -- bytes ------------------------------------------------------------------------------
    def _serve_bytes(self, blob: Blob, body: bool, extra: Mapping[str, str]) -> None:
        data, total = blob.data, len(blob.data)
        start, end, status = 0, total - 1, 200
        if self.hf.honor_range and (rng := self.headers.get("Range")) is not None:
            m = _RANGE.match(rng.strip())
            if m and (m[1] or m[2]):
                start, end = (int(m[1]), min(int(m[2] or total - 1), total - 1)) if m[1] \
                    else (max(total - int(m[2]), 0), total - 1)
                status = 206
            if not m or start >= total or start > end:
                self._status = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{total}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        self._status = status
        self.send_response(status)
        headers = {"Content-Length": str(end - start + 1),
                   "ETag": f'"{blob.sha256 if blob.lfs else blob.git_sha1}"',
                   "Content-Type": "application/octet-stream", **extra}
        if self.hf.honor_range:             # a naive server neither serves nor announces ranges
            headers["Accept-Ranges"] = "bytes"
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{total}"
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self._write_body(data[start:end + 1])

    def _write_body(self, data: bytes) -> None:
        drop = self.hf._take_drop()
        limit = len(data) if drop is None else min(drop, len(data))
        chunk = 64 * 1024
        began = time.monotonic()
        while self._sent < limit:
            stall = self.hf.stall_after
            if stall is not None and self._sent >= stall:
                if self._peer_left(0.05):
                    self.close_connection = True
                    return
                continue
            piece = data[self._sent:min(self._sent + chunk, limit, stall if stall is not None else limit)]
            self.wfile.write(piece)
            self.wfile.flush()
            self._sent += len(piece)
            if self.hf.throttle_bps:  # sleep until the average rate is back under the cap
                ahead = self._sent / self.hf.throttle_bps - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
        if limit < len(data):  # hang up mid-body: the client sees a short read
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)

    def _peer_left(self, wait: float) -> bool:
        """Whether the client closed its end (readable with nothing to read), waiting up to `wait`."""
        readable, _, _ = select.select([self.connection], [], [], wait)
        try:
            return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def _json(self, payload: object) -> None:
        data = json.dumps(payload).encode()
        self._status = 200
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Repo-Commit", self._commit)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
            self._sent = len(data)

    def _error(self, status: int, code: str | None, message: str) -> None:
        data = json.dumps({"error": message}).encode()
        self._status = status
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if code == "EntryNotFound":
            self.send_header("X-Repo-Commit", self._commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
