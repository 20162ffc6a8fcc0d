"""Snapshots of what a host runs (stdlib only, Python >= 3.8), run as `python3 -c SOURCE`, request
on stdin, one JSON line out.

What a host runs ("state"): ComfyUI's checkout (commit, origin, tracked modifications) and version,
every folder of custom_nodes/ that ComfyUI loads (git commit, tags, origin, modified files), the
venv's distributions as its own interpreter lists them (version, and for one installed from a file
or URL, where from, with pip's recorded sha256), every file under models/ (size, and sha256 from
the checksum cache when its size and mtime still match: nothing is hashed here), and the contents
of the workflow folders; asked for them (`units`: {"dir", "globs"}), the systemd unit files
provision writes, whole (their launch arguments and environment).

Modes:
  take  read the state and write `DIR/ID.json` (a temporary sibling, then a rename). A distribution
        installed from a wheel file keeps that file in `DIR/wheels/SHA256/NAME` (a hard link where
        the file system allows), so a rollback can reinstall it after the original is gone. Then
        only the newest `keep` snapshots stay (never one named in `protect`), and only the wheels
        they need. With `reuse`, a state equal to the newest snapshot's writes nothing: its id
        is the answer. Answer: {"id", "time", "reused", "pruned": [ids], "wheels": {name: why not kept}}.
        Each distribution pip installed by name records the pip source arguments it came from
        (`sources`: the request's torch index for the torch family, with the build's `{flavour}`
        filled in, the profile's pip settings for the rest), so a rollback asks the same index.
        `venv_known` ({"fingerprint", "listed"}): the venv as the facts program listed it; while the
        venv's fingerprint is still that one, no interpreter starts in it.
        `replaced` names the distributions the run is about to replace or remove: the wheel of each one
        pip installed from an index is fetched from that source (`pip download --no-deps`, pip's
        cache serves it when it can), checked file by file against the RECORD pip wrote when it
        installed it, and kept in the wheel store too, unless a snapshot already keeps it; a
        rollback then reinstalls it from there, whatever the index still serves. One that cannot be
        kept is named in the answer's `warnings`; with `undo_required`, the take fails instead and
        writes nothing (the run changes nothing).
  read  every stored snapshot, oldest first, and with `now` the state as it is: {"snapshots",
        "now", "errors"}; with `check_wheels`, every kept wheel file and its sha256 as read now
        ("kept": {path under DIR: sha256}). Writes nothing.
        A snapshot says whether the state it records was `confirmed` by a run (an `after`
        snapshot, taken once the changes were confirmed, is; one taken before a run is when the
        last run finished, or when it equals a confirmed state), and `mark` adds `verified`.
  mark  {"id", "verified"}: record whether the verification of that snapshot's state passed.
  stage put kept wheels back where they were installed from, each checked against its sha256
        first (`wheels`: [{"kept", "dest", "sha256"}]): a rollback checks what it will install
        before it changes anything. Answer: {"staged": [dest, ...]}.

Ids sort by time: `YYYYMMDD-HHMMSS-mmm` (UTC, milliseconds; bumped by one on a clash).
"""

import base64
import csv
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from urllib.parse import unquote, urlsplit

FORMAT = 1
READ_CAP = 4 << 20          # bytes of a workflow file kept; a bigger one is recorded by its sha256
# How git runs here: the request's "git" (remote.git_request(): config given with -c and the
# environment that neutralise whatever a checkout configures), set by main().
GIT = {"argv": ["git"], "env": dict(os.environ)}
SNAPSHOT_CAP = 64 << 20     # bytes of one stored snapshot read back (one is about 1 MiB)
CACHE_CAP = 64 << 20        # bytes of the checksum cache
VERSION_CAP = 64 << 10      # bytes of comfyui_version.py
CFG_CAP = 64 << 10          # bytes of a venv's pyvenv.cfg
SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# What a distribution is installed from: only such a file is kept (never, say, a key a user's
# direct_url.json points at), and only when anyone on the host may read it anyway.
ARCHIVE_SUFFIXES = (".whl", ".tar.gz", ".tgz", ".zip", ".tar.bz2")
ID_RE = re.compile(r"^\d{8}-\d{6}-\d{3}$")

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

# Runs inside the target venv's interpreter: the RECORD pip wrote for each distribution named in
# argv (a wheel about to be kept is checked against it).
RECORD_SNIPPET = r"""
import json, re, sys
from importlib import metadata
asked, out = set(sys.argv[1:]), {}
for dist in metadata.distributions():
    key = re.sub(r"[-_.]+", "-", dist.metadata.get("Name") or "").lower()
    if key in asked and key not in out:
        out[key] = dist.read_text("RECORD")
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


def use_git(spec):
    GIT["argv"] = ["git"] + [x for pair in spec["config"] for x in ("-c", pair)]
    GIT["env"] = dict(os.environ, **spec["env"])


def _git(path, *args):
    return _run(GIT["argv"] + ["-C", path] + list(args), timeout=30.0, env=GIT["env"])


def foreign_owner(path):
    """The owner of a checkout (its folder or its .git) when that is not this user, else None:
    git never reads another user's checkout (its configuration could run commands as this one)."""
    me = os.geteuid()
    for where in (path, os.path.join(path, ".git")):
        try:
            uid = os.stat(where).st_uid
        except OSError:
            continue
        if uid != me:
            return uid
    return None


def checkout(path, untracked=True):
    """A folder's git state: None when absent, {"repo": false} when not a checkout of its own,
    {"repo": false, "owner": uid} when another user's (never read: see foreign_owner)."""
    if not os.path.isdir(path):
        return None
    owner = foreign_owner(path)
    if owner is not None:
        return {"repo": False, "owner": owner}
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
        text = read_capped(os.path.join(root, "comfyui_version.py"), VERSION_CAP).decode("utf-8", "replace")
    except (OSError, ValueError):
        return None
    m = re.search(r"""__version__\s*=\s*['"]([^'"]+)['"]""", text)
    return m.group(1) if m else None


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


def venv_fingerprint(python):
    """What changes whenever the venv's answer can: the interpreter's file (a new Python), the C
    library (its manylinux tags), and the listing time of each site-packages folder (pip adds and
    removes a dist-info folder there for every install, upgrade or removal). None where the venv
    also sees the system's site-packages, which change without it."""
    prefix = os.path.dirname(os.path.dirname(python))
    try:
        cfg = read_capped(os.path.join(prefix, "pyvenv.cfg"), CFG_CAP).decode("utf-8", "replace")
        if re.search(r"^\s*include-system-site-packages\s*=\s*true\s*$", cfg, re.M | re.I):
            return None
        real = os.path.realpath(python)
        st = os.stat(real)
        parts = [real, st.st_size, st.st_mtime_ns, os.confstr("CS_GNU_LIBC_VERSION") or "", cfg]
        for lib in sorted(os.listdir(prefix)):
            if not lib.startswith("lib") or not os.path.isdir(os.path.join(prefix, lib)):
                continue
            for version in sorted(os.listdir(os.path.join(prefix, lib))):
                site = os.path.join(prefix, lib, version, "site-packages")
                if version.startswith("python") and os.path.isdir(site):
                    parts += [site, os.stat(site).st_mtime_ns]
    except (OSError, ValueError):
        return None
    return json.dumps(parts)


def distributions(python, known=None):
    """{canonical name: {name, version, kind[, url, sha256]}}, or (None, why) when unreadable.
    `known` ({"fingerprint", "listed"}): the listing the facts program gave the controller, taken
    while the venv still has that fingerprint (the facts' own test), so no interpreter starts in it."""
    if not os.path.exists(python):
        return None, "%s does not exist" % python
    fingerprint = venv_fingerprint(python) if known else None
    if fingerprint is not None and fingerprint == known.get("fingerprint"):
        listed = known["listed"]
    else:
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
        data = loads_bounded(read_capped(path, CACHE_CAP, follow=False))
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


def _digest(fh):
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def _file_digest(path):
    with open_regular(path, follow=False) as fh:
        return _digest(fh)


def workflow_folder(folder):
    """The regular files directly in a workflow folder (links, FIFOs and devices left out):
    {name: {"text"} | {"sha256", "size"}}, None when absent."""
    if not os.path.isdir(folder):
        return None
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".provision-tmp"):
            continue
        try:
            fh = open_regular(os.path.join(folder, name), follow=False)
        except (OSError, ValueError):
            continue
        with fh:
            size = os.fstat(fh.fileno()).st_size
            if size > READ_CAP:
                out[name] = {"sha256": _digest(fh), "size": size}
                continue
            data = fh.read(READ_CAP + 1)
        try:
            out[name] = {"text": data.decode("utf-8")}
        except UnicodeDecodeError:
            out[name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    return out


def inside(path, root):
    """Whether `path` resolves (links followed) to `root` or below it."""
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip("/") + "/")


def read_state(req, stored):
    """What the host runs now. Workflow folders: the request's and every stored snapshot's, so a
    folder an older profile used is still compared."""
    folders = list(req.get("workflow_dirs") or [])
    root = req["root"]
    for doc in stored:
        workflows = doc.get("state", {}).get("workflows") if isinstance(doc.get("state"), dict) else None
        for folder in workflows if isinstance(workflows, dict) else {}:
            # A folder a stored snapshot names is read only inside the root: the snapshot may be edited.
            if folder not in folders and isinstance(folder, str) and folder.startswith("/") and inside(folder, root):
                folders.append(folder)
    dists, why = distributions(req["python"], req.get("venv_known"))
    core = checkout(root, untracked=False)
    state = {
        "comfyui": core, "comfyui_version": comfyui_version(root),
        "custom_nodes": custom_nodes(os.path.join(root, "custom_nodes")),
        "distributions": dists, "venv_error": why,
        "models": models(os.path.join(root, "models"), req.get("checksums", "")),
        "workflows": dict((f, workflow_folder(f)) for f in sorted(folders)),
    }
    if req.get("units"):
        state["units"] = unit_files(req["units"]["dir"], req["units"]["globs"])
    return state


def unit_files(folder, globs):
    """{path: text} of the unit files in `folder` whose names match `globs` (the units provision
    writes, with their launch arguments and environment)."""
    out = {}
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return out
    for name in names:
        path = os.path.join(folder, name)
        if not any(fnmatch.fnmatchcase(name, g) for g in globs) or os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as fh:
            data = fh.read(READ_CAP + 1)
        if len(data) <= READ_CAP:
            out[path] = data.decode("utf-8", "replace")
    return out


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
            doc = loads_bounded(read_capped(os.path.join(folder, name), SNAPSHOT_CAP, follow=False))
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
    want = want if isinstance(want, str) and SHA_RE.match(want) else None
    name = os.path.basename(source)
    if not name.endswith(ARCHIVE_SUFFIXES) or name.startswith("."):
        return None, "%s is not a wheel or an archive" % source
    if want:
        kept = os.path.join("wheels", want, name)
        try:
            open_regular(os.path.join(folder, kept), follow=False).close()
            return kept, None
        except (OSError, ValueError):
            pass
    try:
        original = open_regular(source, follow=False)
    except (OSError, ValueError) as err:
        return None, "%s is gone" % source if isinstance(err, FileNotFoundError) else "%s: %s" % (source, err)
    staging = os.path.join(folder, "wheels", ".incoming")
    tmp = os.path.join(staging, "%d-%s" % (os.getpid(), name))
    with original:
        st = os.fstat(original.fileno())
        if not st.st_mode & stat.S_IROTH:
            return None, "%s is not readable by everyone on the host: not kept" % source
        os.makedirs(staging, exist_ok=True)
        if os.path.lexists(tmp):
            os.unlink(tmp)
        try:
            os.link(source, tmp, follow_symlinks=False)     # same file system: no copy, and a replaced
            linked = os.lstat(tmp)                          # original (a rename) leaves this inode as it was
            if (linked.st_ino, linked.st_dev) != (st.st_ino, st.st_dev):
                os.unlink(tmp)                              # swapped since it was opened
                raise OSError("changed while kept")
        except OSError:
            with open(tmp, "wb") as out:
                shutil.copyfileobj(original, out)
            os.chmod(tmp, stat.S_IMODE(st.st_mode))
    got = _file_digest(tmp)
    if want and got != want:
        os.unlink(tmp)
        return None, "%s changed since it was installed (sha256 %s, pip recorded %s)" % (source, got[:12], want[:12])
    kept = os.path.join("wheels", got, name)
    os.makedirs(os.path.dirname(os.path.join(folder, kept)), exist_ok=True)
    os.replace(tmp, os.path.join(folder, kept))
    return kept, None


# pip adds these to a distribution's .dist-info when it installs it: no wheel holds them.
PIP_WRITES = ("INSTALLER", "REQUESTED", "direct_url.json", "RECORD")


def installed_records(python, keys):
    """{canonical name: the RECORD pip wrote} for the distributions `keys` of the venv."""
    rc, out, err = _run([python, "-I", "-c", RECORD_SNIPPET] + sorted(keys), timeout=120.0)
    try:
        found = json.loads(out)
    except ValueError:
        return {}
    return dict((k, v) for k, v in found.items() if isinstance(v, str))


def _installed_path(member):
    """Where a wheel's member lands, relative to site-packages (None: outside it, as scripts)."""
    top, _, rest = member.partition("/")
    if not top.endswith(".data"):
        return member
    kind, _, path = rest.partition("/")
    return path if kind in ("purelib", "platlib") and path else None


def wheel_problem(path, record):
    """Why the wheel at `path` is not the one pip installed (None: every file it puts in
    site-packages has the sha256 the installed RECORD lists, and the RECORD lists no other)."""
    listed = {}
    for row in csv.reader(record.splitlines()):
        if len(row) >= 2 and row[1].startswith("sha256=") and not row[0].startswith("../") \
                and not (".dist-info/" in row[0] and row[0].rsplit("/", 1)[-1] in PIP_WRITES):
            listed[row[0]] = row[1][len("sha256="):]
    try:
        with zipfile.ZipFile(path) as wheel:
            for info in wheel.infolist():
                where = _installed_path(info.filename)
                if info.is_dir() or where is None or where.endswith(".dist-info/RECORD"):
                    continue
                want = listed.pop(where, None)
                if want is None:
                    return "it holds %s, which the installed one has not" % where
                digest = hashlib.sha256()
                with wheel.open(info) as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        digest.update(chunk)
                if base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode() != want:
                    return "its %s differs from the installed one (RECORD)" % where
    except (OSError, zipfile.BadZipFile, RuntimeError) as err:
        return "not a readable wheel (%s)" % err
    if listed:
        return "it lacks %s, which the installed one has" % sorted(listed)[0]
    return None


def carried(folder, stored, dists):
    """{canonical name: kept file} for each index distribution of `dists` whose wheel an earlier
    snapshot keeps, at the same version, and that is still there: it is not fetched again."""
    out = {}
    for doc in reversed(stored):
        then = (doc.get("state") or {}).get("distributions") if isinstance(doc.get("state"), dict) else None
        for key, path in (doc.get("wheels") or {}).items():
            dist = dists.get(key)
            if key in out or not dist or dist["kind"] != "index" or not isinstance(then, dict) \
                    or then.get(key) != dist or not isinstance(path, str):
                continue
            try:
                open_regular(os.path.join(folder, path), follow=False).close()
            except (OSError, ValueError):
                continue
            out[key] = path
    return out


def _download(python, dest, args, specs, timeout):
    """pip download of `specs` (no dependencies, wheels only) into dest: {spec: why it failed}."""
    base = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
            "--quiet", "--dest", dest] + list(args)
    rc, _, err = _run(base + list(specs), timeout=timeout)
    if rc == 0:
        return {}
    if len(specs) == 1:
        lines = [x.strip() for x in err.splitlines() if x.strip()]
        return {specs[0]: lines[-1] if lines else "pip download exited %d" % rc}
    failed = {}
    for spec in specs:                      # which of them: one at a time
        failed.update(_download(python, dest, args, [spec], timeout))
    return failed


def fetch_wheels(folder, python, dists, sources, timeout):
    """Keep the wheel of each index distribution of `dists` ({key: dist}): fetched from the source
    it was installed from, checked against its installed RECORD, moved into the store.
    ({key: kept file}, {key: why not})."""
    kept, why = {}, {}
    if not dists:
        return kept, why
    incoming = os.path.join(folder, "wheels", ".incoming", "%d-download" % os.getpid())
    shutil.rmtree(incoming, ignore_errors=True)
    os.makedirs(incoming)
    try:
        by_source = {}
        for key, dist in sorted(dists.items()):
            by_source.setdefault(tuple(sources.get(key) or ()), []).append(key)
        records = installed_records(python, list(dists))
        for args, keys in sorted(by_source.items()):
            wanted = dict(("%s==%s" % (dists[k]["name"], dists[k]["version"]), k) for k in keys)
            for spec, reason in _download(python, incoming, args, list(wanted), timeout).items():
                why[wanted[spec]] = "%s: %s" % (" ".join(args) or "pip's index", reason)
        for name in sorted(os.listdir(incoming)):
            key = re.sub(r"[-_.]+", "-", name.split("-", 1)[0]).lower()
            path = os.path.join(incoming, name)
            if key not in dists or key in why or not name.endswith(".whl"):
                continue
            problem = wheel_problem(path, records[key]) if key in records else "pip wrote no RECORD for it"
            if problem:
                why[key] = "the wheel its source serves is not the one installed: %s" % problem
                continue
            kept[key] = os.path.join("wheels", _file_digest(path), unquote(name))
            os.makedirs(os.path.dirname(os.path.join(folder, kept[key])), exist_ok=True)
            os.replace(path, os.path.join(folder, kept[key]))
        for key in dists:
            if key not in kept and key not in why:
                why[key] = "its source served no wheel of it"
    finally:
        shutil.rmtree(incoming, ignore_errors=True)
    return kept, why


def keep_replaced(folder, req, stored, state, kept, why):
    """The wheels of what the run replaces (`replaced`) that are neither file-installed (kept above)
    nor kept by an earlier snapshot, fetched and checked; then the lines that say what could not
    be kept, or ValueError when `undo_required`."""
    dists = state["distributions"] or {}
    sources = index_sources(dists, req["sources"]) if req.get("sources") is not None else {}
    wanted = dict((k, dists[k]) for k in req.get("replaced") or ()
                  if k in dists and dists[k]["kind"] == "index" and k not in kept)
    got, failed = fetch_wheels(folder, req["python"], wanted, sources, float(req.get("pip_timeout") or 900))
    kept.update(got)
    why.update(failed)
    # One installed from a URL comes back from that URL, checked against the sha256 pip recorded.
    lost = ["%s %s (%s)" % (dists[k]["name"], dists[k]["version"], why[k] if k in why else
                            "installed from a %s" % dists[k]["kind"]) for k in req.get("replaced") or ()
            if k in dists and k not in kept and dists[k]["kind"] != "url"]
    if lost and req.get("undo_required"):
        raise ValueError("this change could not be undone exactly: the wheel of %s could not be kept; nothing was "
                         "changed (the verify gate changes only what it can restore): make its source serve it "
                         "again, or apply this host without the gate" % "; ".join(lost))
    return ["a rollback of this run cannot reinstall %s: its wheel could not be kept" % x for x in lost]


def new_id(folder, now):
    ms = int(now * 1000)
    while True:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(ms // 1000)) + "-%03d" % (ms % 1000)
        if not os.path.exists(os.path.join(folder, stamp + ".json")):
            return stamp, ms
        ms += 1


def prune(folder, keep, protect, current, docs):
    """Keep the newest `keep` of `docs` (every stored snapshot, oldest first, the one just written
    included: read once per take) and the protected ones, then only the wheels they need."""
    spare = set(protect) | {current}
    ordered = sorted(d["id"] for d in docs)
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
    """Remove what a take killed mid-write left behind (ID.json.PID.tmp, wheels/.incoming/PID-NAME,
    its downloads in wheels/.incoming/PID-download/), once the process that wrote it is gone."""
    incoming = os.path.join(folder, "wheels", ".incoming")
    found = [(os.path.join(folder, n), n[:-len(".tmp")].rsplit(".", 1)[-1])
             for n in (os.listdir(folder) if os.path.isdir(folder) else []) if n.endswith(".tmp")]
    found += [(os.path.join(incoming, n), n.split("-", 1)[0])
              for n in (os.listdir(incoming) if os.path.isdir(incoming) else [])]
    for path, writer in found:
        if _gone(writer):
            try:
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)     # a killed take's downloads
                else:
                    os.unlink(path)
            except OSError:
                pass                    # removed meanwhile: left for a person


def flavour_of(version):
    """The build label of a version (`2.6.0+cu124` -> `cu124`), or None."""
    return version.split("+", 1)[1] if "+" in version else None


def index_sources(dists, spec):
    """{canonical name: pip source arguments} for each distribution installed by name: the torch
    index of `spec["torch"]` for the torch family (`spec["held"]`, names starting with
    `spec["held_prefix"]`), its `{flavour}` that of the build (torch's for the nvidia-* libraries,
    which carry none), else `spec["pip"]`."""
    out = {}
    torch = (dists or {}).get("torch")
    for key, dist in sorted((dists or {}).items()):
        if dist["kind"] != "index":
            continue
        flavour = flavour_of(dist["version"]) or (flavour_of(torch["version"]) if torch else None)
        held = key in (spec.get("held") or ()) or key.startswith(spec.get("held_prefix") or "\0")
        if held and spec.get("torch") is not None and flavour:
            out[key] = [a.replace("{flavour}", flavour) for a in spec["torch"]]
        else:
            out[key] = list(spec.get("pip") or ())
    return out


def is_confirmed(stored, state):
    """Whether a state found before a run is one a run confirmed: the host as provision first found
    it, as the last run left it (that run ended with its `after` snapshot), or equal to a state a
    run confirmed. What a run that did not finish left is not."""
    if not stored or str(stored[-1].get("taken", "")).startswith("after"):
        return True
    return any(doc.get("confirmed") and doc.get("state") == state for doc in stored)


def _own_folder(req):
    """The snapshots folder, refused (OSError) when it, or a folder above it in the root, is a link
    leading out of the root: a take would write, and its pruning delete, wherever that points."""
    folder = req["dir"]
    for path in (folder, os.path.join(folder, "wheels")):
        if os.path.lexists(path) and not inside(path, req["root"]):
            raise OSError("%s resolves to %s, outside %s: remove the link" % (path, os.path.realpath(path),
                                                                                req["root"]))
    return folder


def take(req):
    folder = _own_folder(req)
    os.makedirs(folder, exist_ok=True)
    if not inside(folder, req["root"]):             # made through a link above it
        raise OSError("%s resolves outside %s: remove the link" % (folder, req["root"]))
    sweep(folder)
    stored, _ = stored_snapshots(folder)
    state = read_state(req, stored)
    if req.get("reuse") and stored and stored[-1].get("state") == state:
        newest = stored[-1]
        kept, why = dict(newest.get("wheels") or {}), dict(newest.get("unkept") or {})
        kept.update(carried(folder, stored, state["distributions"] or {}))
        warnings = keep_replaced(folder, req, stored, state, kept, why)
        if (req.get("confirmed") and not newest.get("confirmed")) or kept != newest.get("wheels", {}):
            # the run confirmed the state its `before` recorded; or it keeps more of its wheels now
            newest.update(confirmed=bool(newest.get("confirmed") or req.get("confirmed")), wheels=kept, unkept=why)
            _write_atomic(os.path.join(folder, newest["id"] + ".json"),
                          json.dumps(newest, indent=1, sort_keys=True).encode("utf-8"))
        return {"id": newest["id"], "time": newest["time"], "reused": True, "pruned": [], "wheels": {},
                "warnings": warnings}
    kept, why = {}, {}
    for key, dist in sorted((state["distributions"] or {}).items()):
        if dist["kind"] != "file":
            continue
        path, reason = keep_wheel(folder, dist)
        if path:
            kept[key] = path
        else:
            why[key] = reason
    kept.update(carried(folder, stored, state["distributions"] or {}))
    warnings = keep_replaced(folder, req, stored, state, kept, why)
    ident, ms = new_id(folder, time.time())
    try:
        os.rmdir(os.path.join(folder, "wheels", ".incoming"))
    except OSError:
        pass                            # not there, or another take's file is in it
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + ".%03dZ" % (ms % 1000)
    doc = {"format": FORMAT, "id": ident, "time": when, "taken": req.get("taken") or "",
           "profile": req.get("profile"), "state": state, "wheels": kept, "unkept": why,
           "confirmed": bool(req.get("confirmed")) or is_confirmed(stored, state)}
    if req.get("sources") is not None:
        doc["sources"] = index_sources(state["distributions"], req["sources"])
    _write_atomic(os.path.join(folder, ident + ".json"),
                  json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"))
    removed = prune(folder, int(req.get("keep") or 1), req.get("protect") or [], ident, stored + [doc])
    return {"id": ident, "time": when, "reused": False, "pruned": removed, "wheels": why, "warnings": warnings}


def read(req):
    stored, errors = stored_snapshots(_own_folder(req))
    answer = {"snapshots": stored, "errors": errors, "now": read_state(req, stored) if req.get("now") else None}
    if req.get("check_wheels"):
        answer["kept"] = kept_wheels(req["dir"])
    return answer


def kept_wheels(folder):
    """{wheels/SHA/NAME: sha256 as read now} for every regular file in the wheel store."""
    out, wheels = {}, os.path.join(folder, "wheels")
    for sha in sorted(os.listdir(wheels) if os.path.isdir(wheels) else []):
        held = os.path.join(wheels, sha)
        if sha == ".incoming" or os.path.islink(held) or not os.path.isdir(held):
            continue
        for name in sorted(os.listdir(held)):
            path = os.path.join(held, name)
            if os.path.isfile(path) and not os.path.islink(path):
                out[os.path.join("wheels", sha, name)] = _file_digest(path)
    return out


def mark(req):
    """Record on snapshot `id` whether the verification of the state it records passed."""
    path = os.path.join(req["dir"], req["id"] + ".json")
    if not ID_RE.match(req["id"]):
        raise ValueError("%r is not a snapshot id" % req["id"])
    doc = loads_bounded(read_capped(path, SNAPSHOT_CAP, follow=False))
    if not isinstance(doc, dict) or doc.get("id") != req["id"]:
        raise ValueError("%s is not the snapshot %s" % (path, req["id"]))
    doc["verified"] = bool(req["verified"])
    _write_atomic(path, json.dumps(doc, indent=1, sort_keys=True).encode("utf-8"))
    return {"id": req["id"], "verified": doc["verified"]}


def _no_link_below(dest, within):
    """Refuse (ValueError) a `dest` that is not lexically in the folder `within`, or whose folder
    is reached through a link below `within` (a link put in the wheel folder would lead the copy out
    of it); `within` itself may be reached through links (a root on another disk)."""
    top = os.path.normpath(within)
    parent = os.path.dirname(dest)
    if os.path.normpath(dest) != dest or not (parent == top or parent.startswith(top.rstrip("/") + "/")):
        raise ValueError("%s is not in %s" % (dest, top))
    if os.path.realpath(parent) != os.path.normpath(os.path.join(os.path.realpath(top), os.path.relpath(parent, top))):
        raise ValueError("%s lies behind a link (%s), outside %s: remove the link" % (dest, os.path.realpath(parent),
                                                                                      top))


def _copy_new(source, tmp):
    """Copy into a new file `tmp`, never through a link or a file put there before."""
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with open(source, "rb") as original, os.fdopen(fd, "wb") as out:
        shutil.copyfileobj(original, out)


def stage(req):
    """Each kept wheel copied to where it was installed from (a temporary sibling, checked, then
    renamed); one already there with its sha256 is left. Each goes only into the folder the request
    names for it (`within`), never through a link below that folder. Raises ValueError naming what
    is wrong."""
    folder = os.path.realpath(req["dir"])
    done = []
    for item in req.get("wheels") or []:
        kept, dest, want = item["kept"], item["dest"], item["sha256"]
        _no_link_below(dest, item["within"])
        if os.path.isfile(dest) and _file_digest(dest) == want:
            done.append(dest)
            continue
        if not os.path.realpath(kept).startswith(os.path.join(folder, "wheels") + os.sep):
            raise ValueError("%s is not in the wheel store %s" % (kept, os.path.join(folder, "wheels")))
        if not os.path.isfile(kept):
            raise ValueError("the kept wheel %s is gone" % kept)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        _no_link_below(dest, item["within"])
        tmp = "%s.%d.provision-tmp" % (dest, os.getpid())
        _copy_new(kept, tmp)
        got = _file_digest(tmp)
        if got != want:
            os.unlink(tmp)
            raise ValueError("the kept wheel %s has sha256 %s, the snapshot recorded %s" % (kept, got, want))
        os.replace(tmp, dest)
        done.append(dest)
    return {"staged": done}


def main():
    try:
        req = json.loads(sys.stdin.read())
        mode = req["mode"]
        if mode not in ("stage", "mark"):         # the only modes that read checkouts
            use_git(req["git"])
    except (ValueError, KeyError) as err:
        sys.stderr.write("bad request: %s\n" % err)
        return 2
    try:
        answer = {"take": take, "stage": stage, "mark": mark}.get(mode, read)(req)
    except (OSError, ValueError) as err:
        sys.stderr.write("snapshot %s failed: %s\n" % (mode, err))
        return 1
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
