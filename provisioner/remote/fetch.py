"""Host-side resumable, checksum-verified downloader (stdlib only, Python >= 3.8), run as `python3 -c SOURCE`.

Protocol: one JSON request on stdin {url, dest, sha256, size, cache, mode: "fetch"|"verify", token?,
retries?, timeout_s?, quantization?: {dtype, rank}}. The token travels only on stdin (never argv:
`ps` shows argv) and becomes `Authorization: Bearer`, which is dropped when a redirect leaves the
first origin (the Hub answers 302 to a CDN). Bytes go to `DEST.part`, resumed with `Range: bytes=N-`,
hashed while streaming, checked for size and sha256 (and, given `quantization`, what the model's
safetensors header declares), fsynced and renamed into place; the checksum cache (`{path: {size,
mtime_ns, sha256}}`, the facts script trusts an entry while size and mtime_ns still match) is
updated under a file lock. stdout: `{"done": N, "total": M}` lines (<= 5/s), then one final JSON
line with "ok". A failure also prints one line on stderr and exits 1 (2 for a bad request).
A full disk (ENOSPC, EDQUOT) is not retried: "disk full at DIR: N bytes free, M more needed", and the
`.part` is kept to resume only when the server showed it serves ranges, else removed.
The control side builds the request in `provisioner.remote.fetch_request`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import http.client
import json
import os
import queue
import re
import stat
import struct
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

_CHUNK = 1 << 20
_BUFFERS = 4            # receive buffers, reused: no fresh megabyte (and its page faults) per block
_HEADER_CAP = 100 << 20     # safetensors' own limit on a header
_CACHE_CAP = 64 << 20       # bytes of the checksum cache
_PROGRESS_EVERY_S = 0.2
_PORTS = {"http": 80, "https": 443}


class FetchError(Exception):
    """A one-line reason the file could not be fetched or verified."""


class _Retry(FetchError):
    """A failure the next attempt may get past (a resume the server would not honour)."""


class _DiskFull(FetchError):
    """The disk (or the user's quota) is full: no retry can get past it."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _origin(url):
    parts = urllib.parse.urlsplit(url)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or _PORTS.get(parts.scheme, 0)


class _Redirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects, keeping Range, but never carry the token to another origin (a CDN)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(newurl) != _origin(req.full_url):
            new.remove_header("Authorization")
        return new


class _Progress:
    def __init__(self, total):
        self.total, self.last = total, 0.0

    def __call__(self, done, force=False):
        if os.getppid() != _PARENT:
            # Our parent (sshd's session, or the local provision) is gone: the controller was
            # killed. Stop and keep the .part for the next run to resume; never go on as an orphan.
            raise SystemExit(3)
        now = time.monotonic()
        if force or now - self.last >= _PROGRESS_EVERY_S:
            self.last = now
            _emit({"done": done, "total": self.total})


_PARENT = os.getppid()


def _emit(obj):
    try:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # The controller is gone (killed, connection lost): stop here and keep the .part for the
        # next run to resume, rather than go on as an orphan nobody waits for.
        raise SystemExit(3) from None


class _Hasher:
    """sha256 in a thread of its own, so hashing overlaps receiving and writing (hashlib lets go of
    the GIL): in one thread, hashing 1 GB costs about as long as receiving it. `update(data, done)`
    hands over a block (a few queue at most) and calls `done` once it is hashed."""

    def __init__(self):
        self._sha, self._digest = hashlib.sha256(), None
        self._todo = queue.Queue(maxsize=_BUFFERS)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            item = self._todo.get()
            if item is None:
                return
            data, done = item
            self._sha.update(data)
            if done is not None:
                done()

    def update(self, data, done=None):
        self._todo.put((data, done))

    def hexdigest(self):
        if self._digest is None:
            self._todo.put(None)
            self._thread.join()
            self._digest = self._sha.hexdigest()
        return self._digest


class _Part:
    """The `.part` file and the running sha256 of exactly the bytes it holds."""

    def __init__(self, path):
        self.path = path
        while True:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            # An interrupted run may still be writing this part: wait for it, then make sure the
            # part was not renamed into place (or removed) meanwhile before using it.
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            try:
                if os.fstat(self.fd).st_ino == os.stat(path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(self.fd)
        self.hasher, self.length, self.written = _Hasher(), 0, 0
        self.resumable = False  # the server showed it serves ranges (206, Accept-Ranges: bytes)
        while True:  # bytes from an earlier, interrupted run: hash them once
            block = os.read(self.fd, _CHUNK)
            if not block:
                break
            self.hasher.update(block)
            self.length += len(block)

    def reset(self):
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        self.hasher.hexdigest()     # let the old thread finish
        self.hasher, self.length = _Hasher(), 0

    def write(self, data, done=None):
        """Append `data` (bytes or a view of a receive buffer, `done` called when it may be reused)."""
        view, landed = memoryview(data), 0
        try:
            while landed < len(view):
                landed += os.write(self.fd, view[landed:])
        except OSError as err:
            self._count(view[:landed], done)    # what did land is the file's next bytes: keep it hashed
            if err.errno in _FULL:
                raise _DiskFull(err.strerror) from None
            raise
        self._count(view, done)

    def _count(self, data, done=None):
        self.hasher.update(data, done)
        self.length += len(data)
        self.written += len(data)  # bytes this run transferred, restarts included

    def close(self):
        try:
            os.fsync(self.fd)
        except OSError as err:
            if err.errno not in _FULL:
                raise
            raise _DiskFull(err.strerror) from None
        finally:
            os.close(self.fd)


def _open(req, offset):
    headers = {"User-Agent": "provision-fetch/1", "Accept-Encoding": "identity"}
    if req.get("token"):
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in req["token"]):
            raise FetchError("the token holds a control character; it was not sent")
        headers["Authorization"] = "Bearer " + req["token"]
    if offset:
        headers["Range"] = "bytes=%d-" % offset
    opener = urllib.request.build_opener(_Redirect)
    return opener.open(urllib.request.Request(req["url"], headers=headers), timeout=req.get("timeout_s", 60))


def _attempt(req, part, progress):
    """One GET from `part.length` on. Returns when the server has sent all it will send."""
    offset = part.length
    try:
        resp = _open(req, offset)
    except urllib.error.HTTPError as err:
        if err.code == 416 and part.length == req.get("size"):
            return  # nothing left to send: the part is already complete
        if err.code == 416:
            part.reset()  # the part no longer fits what the server has: start over
            raise _Retry("server refused the resume range; restarting from zero") from None
        raise
    with resp:
        part.resumable = part.resumable or resp.status == 206 or \
            (resp.headers.get("Accept-Ranges") or "").strip().lower() == "bytes"
        if offset and resp.status == 200:
            part.reset()  # the server ignored Range and sends everything: take it from zero
        elif resp.status == 206:
            start = (resp.headers.get("Content-Range") or "").replace("bytes ", "").split("-")[0]
            if start != str(offset):
                part.reset()
                raise _Retry("server answered range %r for a resume at %d; restarting" % (start, offset))
        free = queue.Queue()
        for _ in range(_BUFFERS):
            free.put(bytearray(_CHUNK))
        while True:
            buf = free.get()
            got = resp.readinto(buf)
            if not got:
                return
            part.write(memoryview(buf)[:got], lambda buf=buf: free.put(buf))
            progress(part.length)


def _fetch(req):
    dest, size, want = req["dest"], req.get("size"), req.get("sha256")
    os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
    part = _Part(dest + ".part")
    if part.length == 0 and size is not None and os.path.isfile(dest) and os.path.getsize(dest) == size:
        try:  # an earlier run finished this very file while we waited for its part
            part.close()
            os.unlink(part.path)
            return _verify(req)
        except FetchError:
            part = _Part(dest + ".part")
    if size is not None and part.length > size:
        part.reset()
    resumed_from, progress, last_error, full = part.length, _Progress(size), None, False
    try:
        for attempt in range(int(req.get("retries", 3)) + 1):
            if size is not None and part.length == size:
                break
            mark = part.length
            try:
                _attempt(req, part, progress)
                if size is None or part.length == size:
                    break
                last_error = "connection closed at %d of %d bytes" % (part.length, size)
            except urllib.error.HTTPError as err:
                if err.code in (401, 403):
                    raise FetchError("HTTP %d for %s: gated or private repo; set the token env var "
                                     "(huggingface.token_env)" % (err.code, req["url"])) from None
                if 400 <= err.code < 500 and err.code not in (408, 429):
                    raise FetchError("HTTP %d for %s" % (err.code, req["url"])) from None
                last_error = "HTTP %d" % err.code
            except (OSError, http.client.HTTPException, _Retry) as err:
                last_error = "%s: %s" % (type(err).__name__, err)
            if part.length <= mark:  # no progress this time: back off before the next try
                time.sleep(min(float(req.get("backoff_s", 1.0)) * (attempt + 1), 10.0))
        else:
            raise FetchError("download of %s stopped at %d of %s bytes (%s); run again to resume"
                             % (req["url"], part.length, size, last_error))
        progress(part.length, force=True)
    except _DiskFull:
        full = True
    finally:
        try:
            part.close()
        except _DiskFull:
            full = True
    if full:
        raise _disk_full(dest, part, size)
    digest = part.hasher.hexdigest()
    if (size is not None and part.length != size) or (want and digest != want):
        os.unlink(part.path)
        raise FetchError("checksum mismatch for %s: expected %s bytes sha256 %s, got %d bytes sha256 %s; "
                         "removed the download" % (dest, size, want, part.length, digest))
    wrong = _quantization_mismatch(part.path, req.get("quantization"))
    if wrong:
        os.unlink(part.path)
        raise FetchError("%s: %s; removed the download" % (dest, wrong))
    os.replace(part.path, dest)
    _fsync_dir(os.path.dirname(dest) or ".")
    return _record(req, dest, digest, fetched=part.written, resumed_from=resumed_from)


def _disk_full(dest, part, size):
    """The one-line reason, after removing the `.part` unless the server can resume it."""
    folder = os.path.dirname(os.path.abspath(dest))
    try:
        vfs = os.statvfs(folder)
        free = "%d bytes free" % (vfs.f_bavail * vfs.f_frsize)
    except OSError:
        free = "free space unknown"
    needed = "%d more needed" % (size - part.length) if size is not None else "the file's size unknown"
    if part.resumable and part.length:
        kept = "kept %s (%d bytes) to resume once space is freed" % (part.path, part.length)
    else:
        try:
            os.unlink(part.path)
        except OSError:
            pass
        kept = "removed %s (the server cannot resume it)" % part.path if part.length else \
            "removed %s" % part.path
    return FetchError("disk full at %s: %s, %s; %s" % (folder, free, needed, kept))


# Reading the host's files within bounds. Each host program is sent alone, so this block is the same
# in every one that reads files a user of the host can write (tests/test_untrusted_snapshots.py holds the
# copies equal). A FIFO, a device or a link to one is refused by what the opened file is; a size cap
# and JSON nested at most JSON_DEPTH deep (json itself would fail with a RecursionError deeper).
JSON_DEPTH = 64
_JSON_TOKENS = re.compile(r'"(?:[^"\\]+|\\.)*"|[\[\]{}]', re.S)


def open_regular(path, follow=True):
    """A regular file opened for reading without blocking (a FIFO never hangs the open), checked by
    fstat, not by its name; `follow` False refuses a link too. OSError, or ValueError: not regular."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        if err.errno == errno.ELOOP and not follow:
            raise ValueError("%s is a link, not a file provision wrote" % path) from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("%s is not a regular file" % path)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_capped(path, cap, follow=True):
    """The whole of a regular file of at most `cap` bytes (ValueError past it, unread)."""
    with open_regular(path, follow) as fh:
        if os.fstat(fh.fileno()).st_size > cap:
            raise ValueError("%s holds more than %d bytes" % (path, cap))
        data = fh.read(cap + 1)
    if len(data) > cap:
        raise ValueError("%s holds more than %d bytes" % (path, cap))
    return data


def _no_constant(name):
    raise ValueError("%s is not a JSON number" % name)


def _finite(text):
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("%s is beyond a float" % text[:20])
    return value


def loads_bounded(data):
    """JSON from a host file: nested at most JSON_DEPTH deep, finite numbers only (ValueError)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    level = 0
    for match in _JSON_TOKENS.finditer(text):
        token = match.group()
        if token in ("[", "{"):
            level += 1
            if level > JSON_DEPTH:
                raise ValueError("JSON nested deeper than %d" % JSON_DEPTH)
        elif token in ("]", "}"):
            level -= 1
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite)


def _quantization_mismatch(path, expect):
    """Why a downloaded model is not the SVDQuant file it should be, from its safetensors header
    (8-byte little-endian length, then JSON; `__metadata__.quantization_config` is a JSON string
    with weight.dtype and rank, rank 32 when absent), or None. expect: {"dtype", "rank"} or None."""
    if not expect:
        return None
    try:
        with open_regular(path) as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length > min(_HEADER_CAP, os.fstat(fh.fileno()).st_size - 8):
                return "not a safetensors file (header length %d)" % length
            meta = loads_bounded(fh.read(length)).get("__metadata__") or {}
            config = json.loads(meta["quantization_config"])
            got = (config["weight"]["dtype"], int(config.get("rank", 32)))
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error):
        return "its safetensors header declares no readable quantization_config"
    if got != (expect["dtype"], expect["rank"]):
        return "its header declares %s rank %d weights, expected %s rank %d" % (
            got[0], got[1], expect["dtype"], expect["rank"])
    return None


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _verify(req):
    dest, size, want = req["dest"], req.get("size"), req.get("sha256")
    try:
        before = os.stat(dest)
    except OSError as err:
        raise FetchError("cannot verify %s: %s" % (dest, err.strerror)) from None
    if size is not None and before.st_size != size:
        raise FetchError("%s has %d bytes, expected %d; plan again to replace it" % (dest, before.st_size, size))
    hasher, done, progress = hashlib.sha256(), 0, _Progress(before.st_size)
    with open(dest, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            hasher.update(block)
            done += len(block)
            progress(done)
    after = os.stat(dest)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise FetchError("%s changed while it was hashed; run again" % dest)
    digest = hasher.hexdigest()
    result = _record(req, dest, digest, fetched=0, resumed_from=0)  # recorded even when wrong: the next plan replaces it
    if want and digest != want:
        raise FetchError("checksum mismatch for %s: expected sha256 %s, got %s; recorded, so the next "
                         "plan replaces it" % (dest, want, digest))
    return result


def _record(req, dest, digest, fetched, resumed_from):
    st = os.stat(dest)
    cache = req.get("cache")
    if cache:
        _update_cache(cache, os.path.normpath(dest), {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest})
    return {"ok": True, "mode": req.get("mode", "fetch"), "dest": dest, "size": st.st_size, "sha256": digest,
            "fetched": fetched, "resumed_from": resumed_from}


def _update_cache(cache, key, entry):
    """Read-modify-write under an exclusive lock, replaced atomically: concurrent writers lose nothing."""
    os.makedirs(os.path.dirname(cache) or ".", exist_ok=True)
    with open(cache + ".lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            entries = loads_bounded(read_capped(cache, _CACHE_CAP, follow=False))
            entries = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):
            entries = {}
        entries[key] = entry
        # Named as every temporary sibling provision makes: a later apply removes one left by a kill.
        tmp = os.path.join(os.path.dirname(cache), ".%s.%d.provision-tmp" % (os.path.basename(cache), os.getpid()))
        with open(tmp, "w") as fh:
            json.dump(entries, fh, indent=1, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, cache)


def _scrub(message, token):
    """The message without the token, raw or quoted (an error may quote a header it refused)."""
    if not token:
        return message
    for form in sorted({token, repr(token)[1:-1], repr(token.encode("utf-8"))[2:-1],
                        json.dumps(token)[1:-1]}, key=len, reverse=True):
        message = message.replace(form, "***")
    return message


def main():
    try:
        req = json.loads(sys.stdin.read())
        mode = req.get("mode", "fetch")
        if mode not in ("fetch", "verify") or not req.get("dest") or (mode == "fetch" and not req.get("url")):
            raise ValueError("need dest, mode fetch|verify, and url for fetch")
    except ValueError as err:
        sys.stderr.write("fetch: bad request on stdin: %s\n" % err)
        return 2
    try:
        _emit(_verify(req) if mode == "verify" else _fetch(req))
        return 0
    except (FetchError, OSError, ValueError, http.client.HTTPException) as err:
        message = str(err) if isinstance(err, FetchError) else "%s: %s" % (type(err).__name__, err)
        if isinstance(err, OSError) and err.errno in _FULL:    # creating the folder or the .part
            message = "disk full at %s: %s" % (err.filename or os.path.dirname(req["dest"]), err.strerror)
        message = _scrub(message, req.get("token"))
        _emit({"ok": False, "error": message})
        sys.stderr.write("fetch: %s\n" % message)
        return 1


if __name__ == "__main__":
    sys.exit(main())
