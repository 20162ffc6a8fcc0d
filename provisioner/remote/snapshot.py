"""Snapshots of what a host runs (stdlib only, Python >= 3.8), run as `python3 -c SOURCE`, request
on stdin, one JSON line out.

What a host runs ("state"): ComfyUI's checkout (commit, origin, tracked modifications) and version,
every folder of custom_nodes/ that ComfyUI loads (git commit, tags, origin, modified files), the
venv's distributions as its own interpreter lists them (version, and for one installed from a file
or URL, where from, with pip's recorded sha256), every file under models/ (size, and sha256 from
the checksum cache when its size and mtime still match: nothing is hashed here), and the contents
of the workflow folders.

Modes:
  take  read the state and write `DIR/ID.json` (a temporary sibling, then a rename). A distribution
        installed from a wheel file keeps that file in `DIR/wheels/SHA256/NAME` (a hard link where
        the file system allows), so a rollback can reinstall it after the original is gone. Then
        only the newest `keep` snapshots stay (never one named in `protect`), and only the wheels
        they need. With `reuse`, a state equal to the newest snapshot's writes nothing: its id
        is the answer. Answer: {"id", "time", "reused", "pruned": [ids], "wheels": {name: why not kept}}.
  read  every stored snapshot, oldest first, and with `now` the state as it is: {"snapshots",
        "now", "errors"}. Writes nothing.

Ids sort by time: `YYYYMMDD-HHMMSS-mmm` (UTC, milliseconds; bumped by one on a clash).
"""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from urllib.parse import unquote, urlsplit

FORMAT = 1
READ_CAP = 4 << 20          # bytes of a workflow file kept; a bigger one is recorded by its sha256
GIT_ENV = dict(os.environ, GIT_OPTIONAL_LOCKS="0", LC_ALL="C", GIT_TERMINAL_PROMPT="0")
ID_RE = re.compile(r"^\d{8}-\d{6}-\d{3}$")

# Runs inside the target venv's interpreter: what pip knows of each distribution.
VENV_SNIPPET = r"""
import json, re
from importlib import metadata
out, seen = [], set()
for dist in metadata.distributions():
    name = dist.metadata.get("Name")
    key = re.sub(r"[-_.]+", "-", name or "").lower()
    if not name or key in seen:
        continue            # first on sys.path wins, as for import and for pip
    seen.add(key)
    try:
        direct = dist.read_text("direct_url.json")
    except Exception:
        direct = None
    out.append({"name": name, "version": dist.metadata.get("Version") or "", "direct_url": direct})
print(json.dumps(out))
"""


def _run(argv, timeout=60.0, **kw):
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, **kw)
    except FileNotFoundError as err:
        return 127, "", str(err)
    except subprocess.TimeoutExpired:
        return 124, "", "timed out after %ss" % timeout
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")


def _git(path, *args):
    return _run(["git", "-c", "safe.directory=*", "-C", path] + list(args), timeout=30.0, env=GIT_ENV)


def checkout(path, untracked=True):
    """A folder's git state: None when absent, {"repo": false} when not a checkout of its own."""
    if not os.path.isdir(path):
        return None
    rc, top, _ = _git(path, "rev-parse", "--show-toplevel")
    if rc != 0 or os.path.realpath(top.strip()) != os.path.realpath(path):
        return {"repo": False}
    rc, head, _ = _git(path, "rev-parse", "--verify", "-q", "HEAD")
    _, tags, _ = _git(path, "tag", "--points-at", "HEAD")
    _, status, _ = _git(path, "status", "--porcelain=v1", "-z",
                        "--untracked-files=" + ("all" if untracked else "no"))
    rc_r, remote, _ = _git(path, "config", "--get", "remote.origin.url")
    dirty, items, i = [], status.split("\0"), 0
    while i < len(items):
        if len(items[i]) > 3:
            dirty.append(items[i][3:])
            if items[i][0] in "RC":
                i += 1              # a rename's second field is its origin
        i += 1
    return {"repo": True, "commit": head.strip() if rc == 0 else None,
            "tags": sorted(t for t in tags.split() if t), "remote": remote.strip() if rc_r == 0 else None,
            "dirty": sorted(dirty)}


def comfyui_version(root):
    try:
        with open(os.path.join(root, "comfyui_version.py")) as fh:
            m = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", fh.read())
            return m.group(1) if m else None
    except OSError:
        return None


def custom_nodes(folder):
    """Every folder ComfyUI would load: not hidden, not `*.disabled`, not __pycache__."""
    out = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return out
    for name in names:
        path = os.path.join(folder, name)
        if name.startswith(".") or name.endswith(".disabled") or name == "__pycache__" \
                or not os.path.isdir(path):
            continue
        out[name] = checkout(path)
    return out


def _direct(raw):
    """pip's direct_url.json as (kind, url, sha256): index, file, url, dir or vcs."""
    if not raw:
        return "index", None, None
    try:
        info = json.loads(raw)
    except ValueError:
        return "index", None, None
    url = info.get("url")
    if "vcs_info" in info:
        return "vcs", url, None
    if "dir_info" in info:
        return "dir", url, None
    archive = info.get("archive_info") or {}
    sha = (archive.get("hashes") or {}).get("sha256")
    if not sha and str(archive.get("hash", "")).startswith("sha256="):
        sha = archive["hash"][len("sha256="):]
    return ("file" if str(url).startswith("file:") else "url"), url, sha


def distributions(python):
    """{canonical name: {name, version, kind[, url, sha256]}}, or (None, why) when unreadable."""
    if not os.path.exists(python):
        return None, "%s does not exist" % python
    rc, out, err = _run([python, "-I", "-c", VENV_SNIPPET], timeout=120.0)
    try:
        listed = json.loads(out)
    except ValueError:
        lines = [x for x in (err or out).strip().splitlines() if x.strip()]
        return None, lines[-1] if lines else "exited %d with no output" % rc
    dists = {}
    for item in listed:
        key = re.sub(r"[-_.]+", "-", item["name"]).lower()
        kind, url, sha = _direct(item.get("direct_url"))
        entry = {"name": item["name"], "version": item["version"], "kind": kind}
        if url:
            entry["url"] = url
        if sha:
            entry["sha256"] = sha
        dists[key] = entry
    return dists, None


def _cache(path):
    try:
        with open(path) as fh:
            data = json.load(fh)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


# ComfyUI's checkout holds an empty `put_checkpoints_here` (and the like) in each model folder: no model.
PLACEHOLDER = re.compile(r"^put_\w+_here$")


def models(folder, cache_path):
    """Every file under models/ (links not followed, downloads in progress left out, ComfyUI's own
    placeholders too): size, and the cached sha256 when the file is still the one that was hashed."""
    cache, out = _cache(cache_path), {}
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(top, name)
            if name.endswith(".part") or os.path.islink(path) or PLACEHOLDER.match(name):
                continue
            try:
                st = os.stat(path)
            except OSError:
                continue
            entry = cache.get(path)
            sha = None
            if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
                sha = entry.get("sha256")
            out[path] = {"size": st.st_size, "sha256": sha}
    return out


def _file_digest(path):
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def workflow_folder(folder):
    """The files directly in a workflow folder: {name: {"text"} | {"sha256", "size"}}, None when absent."""
    if not os.path.isdir(folder):
        return None
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or os.path.islink(path) or name.endswith(".provision-tmp"):
            continue
        size = os.path.getsize(path)
        if size > READ_CAP:
            out[name] = {"sha256": _file_digest(path), "size": size}
            continue
        with open(path, "rb") as fh:
            data = fh.read()
        try:
            out[name] = {"text": data.decode("utf-8")}
        except UnicodeDecodeError:
            out[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": size}
    return out


def read_state(req, stored):
    """What the host runs now. Workflow folders: the request's and every stored snapshot's, so a
    folder an older profile used is still compared."""
    folders = list(req.get("workflow_dirs") or [])
    for doc in stored:
        for folder in (doc.get("state") or {}).get("workflows") or {}:
            if folder not in folders:
                folders.append(folder)
    root = req["root"]
    dists, why = distributions(req["python"])
    core = checkout(root, untracked=False)
    return {
        "comfyui": core, "comfyui_version": comfyui_version(root),
        "custom_nodes": custom_nodes(os.path.join(root, "custom_nodes")),
        "distributions": dists, "venv_error": why,
        "models": models(os.path.join(root, "models"), req.get("checksums", "")),
        "workflows": dict((f, workflow_folder(f)) for f in sorted(folders)),
    }


def stored_snapshots(folder):
    """(documents oldest first, errors): files that are not snapshots of this format are reported."""
    docs, errors = [], []
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return docs, errors
    for name in names:
        if not name.endswith(".json") or not ID_RE.match(name[:-5]):
            continue
        try:
            with open(os.path.join(folder, name)) as fh:
                doc = json.load(fh)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("id") != name[:-5]:
                raise ValueError("not a snapshot of format %d" % FORMAT)
        except (OSError, ValueError) as err:
            errors.append("%s: %s" % (name, err))
            continue
        docs.append(doc)
    docs.sort(key=lambda d: d["id"])
    return docs, errors


def _write_atomic(path, data):
    tmp = "%s.%d.tmp" % (path, os.getpid())     # its writer in its name: sweep() knows a dead one's
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _url_path(url):
    return unquote(urlsplit(url).path)


def keep_wheel(folder, dist):
    """Keep the file a distribution was installed from: (path relative to folder, None) or (None, why)."""
    source = _url_path(dist["url"])
    want = dist.get("sha256")
    name = os.path.basename(source)
    if want:
        kept = os.path.join("wheels", want, name)
        if os.path.isfile(os.path.join(folder, kept)):
            return kept, None
    if not os.path.isfile(source):
        return None, "%s is gone" % source
    staging = os.path.join(folder, "wheels", ".incoming")
    os.makedirs(staging, exist_ok=True)
    tmp = os.path.join(staging, "%d-%s" % (os.getpid(), name))
    if os.path.lexists(tmp):
        os.unlink(tmp)
    try:
        os.link(source, tmp)            # same file system: no copy, and a replaced original (a
    except OSError:                     # rename) leaves this inode as it was
        shutil.copyfile(source, tmp)
    got = _file_digest(tmp)
    if want and got != want:
        os.unlink(tmp)
        return None, "%s changed since it was installed (sha256 %s, pip recorded %s)" % (source, got[:12], want[:12])
    kept = os.path.join("wheels", got, name)
    os.makedirs(os.path.dirname(os.path.join(folder, kept)), exist_ok=True)
    os.replace(tmp, os.path.join(folder, kept))
    return kept, None


def new_id(folder, now):
    ms = int(now * 1000)
    while True:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(ms // 1000)) + "-%03d" % (ms % 1000)
        if not os.path.exists(os.path.join(folder, stamp + ".json")):
            return stamp, ms
        ms += 1


def prune(folder, keep, protect, current):
    """Keep the newest `keep` snapshots (and the protected ones), then only the wheels they need."""
    docs, _ = stored_snapshots(folder)
    spare = set(protect) | {current}
    ordered = [d["id"] for d in docs]
    removed = [i for i in ordered[:max(0, len(ordered) - keep)] if i not in spare]
    for ident in removed:
        os.unlink(os.path.join(folder, ident + ".json"))
    needed = set()
    for doc in docs:
        if doc["id"] not in removed:
            needed.update(v for v in (doc.get("wheels") or {}).values() if isinstance(v, str))
    wheels = os.path.join(folder, "wheels")
    for sha in (os.listdir(wheels) if os.path.isdir(wheels) else []):
        held = os.path.join(wheels, sha)
        if sha == ".incoming" or not os.path.isdir(held):
            continue
        if not any(os.path.join("wheels", sha, f) in needed for f in os.listdir(held)):
            shutil.rmtree(held, ignore_errors=True)
    return removed


def _gone(pid_text):
    """Whether the process a temporary file names as its writer has ended (no pid: an old name)."""
    if not pid_text.isdigit():
        return True
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:
        pass                            # EPERM: another user's process, running
    return False


def sweep(folder):
    """Remove what a take killed mid-write left behind (ID.json.PID.tmp, wheels/.incoming/PID-NAME),
    once the process that wrote it is gone."""
    incoming = os.path.join(folder, "wheels", ".incoming")
    found = [(os.path.join(folder, n), n[:-len(".tmp")].rsplit(".", 1)[-1])
             for n in (os.listdir(folder) if os.path.isdir(folder) else []) if n.endswith(".tmp")]
    found += [(os.path.join(incoming, n), n.split("-", 1)[0])
              for n in (os.listdir(incoming) if os.path.isdir(incoming) else [])]
    for path, writer in found:
        if _gone(writer):
            try:
                os.unlink(path)
            except OSError:
                pass                    # removed meanwhile, or not a file: left for a person


def take(req):
    folder = req["dir"]
    os.makedirs(folder, exist_ok=True)
    sweep(folder)
    stored, _ = stored_snapshots(folder)
    state = read_state(req, stored)
    if req.get("reuse") and stored and stored[-1].get("state") == state:
        return {"id": stored[-1]["id"], "time": stored[-1]["time"], "reused": True, "pruned": [], "wheels": {}}
    ident, ms = new_id(folder, time.time())
    kept, why = {}, {}
    for key, dist in sorted((state["distributions"] or {}).items()):
        if dist["kind"] != "file":
            continue
        path, reason = keep_wheel(folder, dist)
        if path:
            kept[key] = path
        else:
            why[key] = reason
    try:
        os.rmdir(os.path.join(folder, "wheels", ".incoming"))
    except OSError:
        pass                            # not there, or another take's file is in it
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + ".%03dZ" % (ms % 1000)
    doc = {"format": FORMAT, "id": ident, "time": when, "taken": req.get("taken") or "",
           "profile": req.get("profile"), "state": state, "wheels": kept, "unkept": why}
    _write_atomic(os.path.join(folder, ident + ".json"),
                  json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"))
    removed = prune(folder, int(req.get("keep") or 1), req.get("protect") or [], ident)
    return {"id": ident, "time": when, "reused": False, "pruned": removed, "wheels": why}


def read(req):
    stored, errors = stored_snapshots(req["dir"])
    return {"snapshots": stored, "errors": errors, "now": read_state(req, stored) if req.get("now") else None}


def main():
    try:
        req = json.loads(sys.stdin.read())
        mode = req["mode"]
    except (ValueError, KeyError) as err:
        sys.stderr.write("bad request: %s\n" % err)
        return 2
    try:
        answer = take(req) if mode == "take" else read(req)
    except OSError as err:
        sys.stderr.write("snapshot %s failed: %s\n" % (mode, err))
        return 1
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
