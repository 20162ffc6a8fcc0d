"""The facts script: run on the host by its system `python3 -c`, request on stdin, one JSON answer out.

Standard library only and Python 3.8 syntax: a host's system python may be old. It never hashes
big files, never imports torch, and reports every missing piece as a value; the control side
(`parse.py`) turns the raw answer into `Facts`. Checksum cache format (`<root>/.provision/
checksums.json`): `{"<absolute path>": {"size": int, "mtime_ns": int, "sha256": "<hex>"}}`.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import platform
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

READ_CAP = 1 << 20          # bytes of a `read` probe sent back
LIST_CAP = 4096             # entries of a `listing` probe sent back per folder
MARKER_CAP = 4096           # bytes of one marker file (a `markers` probe), and 64 markers per folder
HEADER_CAP = 100 << 20      # safetensors' own limit on a header
CACHE_CAP = 64 << 20        # bytes of the checksum cache
CFG_CAP = 64 << 10          # bytes of a venv's pyvenv.cfg
# Of a model file's `__metadata__`, what the plan checks (config/comfy_config are large and unused).
HEADER_KEYS = ("quantization_config", "model_class", "format")
# How git runs here: the request's "git" (remote.git_request(): config given with -c and the
# environment that neutralise whatever a checkout configures), set by gather().
GIT = {"argv": None, "env": dict(os.environ)}
NVIDIA_SMI_QUERY = (
    "--query-gpu=index,name,uuid,memory.total,memory.used,memory.free,"
    "driver_version,compute_cap,pci.bus_id"
)

# Runs inside the TARGET venv's interpreter (one subprocess): what pip would see there.
VENV_SNIPPET = r"""
import json, re, sys, sysconfig
out = {"version": "%d.%d.%d" % sys.version_info[:3],
       "tag": {"cpython": "cp", "pypy": "pp"}.get(sys.implementation.name, "py")
              + "%d%d" % sys.version_info[:2],
       "platform": re.sub(r"[-.]", "_", sysconfig.get_platform()),
       "prefix": sys.prefix, "distributions": [], "torch": None, "torch_cuda": None,
       "gil_disabled": bool(sysconfig.get_config_var("Py_GIL_DISABLED")), "tags": None}
try:        # the wheel tags this interpreter accepts, as pip itself decides them
    from pip._vendor.packaging import tags as wheel_tags
except Exception:
    try:
        from packaging import tags as wheel_tags
    except Exception:
        wheel_tags = None
import importlib.util
out["ensurepip"] = all(importlib.util.find_spec(m) is not None for m in ("venv", "ensurepip"))
if wheel_tags is None and out["ensurepip"]:
    try:    # no pip here, but the pip a new venv gets: the wheel ensurepip bundles (a zip import),
            # or, in Debian's and Fedora's builds, the one they keep in WHEEL_PKG_DIR instead
        import glob, os, ensurepip
        folders = [os.path.join(os.path.dirname(ensurepip.__file__), "_bundled"),
                   sysconfig.get_config_var("WHEEL_PKG_DIR") or ""]
        sys.path.insert(0, sorted(w for d in folders if d for w in glob.glob(os.path.join(d, "pip-*.whl")))[-1])
        from pip._vendor.packaging import tags as wheel_tags
    except Exception:
        wheel_tags = None
if wheel_tags is not None:
    out["tags"] = [str(t) for t in wheel_tags.sys_tags()]
from importlib import metadata
seen = set()
for dist in metadata.distributions():
    md = dist.metadata
    name = md.get("Name")
    key = re.sub(r"[-_.]+", "-", name or "").lower()
    if not name or key in seen:
        continue            # first on sys.path wins, as for import
    seen.add(key)
    home = md.get("Home-page") or ""
    if not home or home == "UNKNOWN":
        urls = md.get_all("Project-URL") or []
        home = urls[0].split(",", 1)[-1].strip() if urls else ""
    summary = md.get("Summary") or ""
    entry = {"name": name, "version": md.get("Version") or "",
             "summary": "" if summary == "UNKNOWN" else summary, "home": home}
    try:    # where pip installed it from (a file, a URL): what the snapshot program records
        direct = dist.read_text("direct_url.json")
    except Exception:
        direct = None
    if direct:
        entry["direct_url"] = direct
    out["distributions"].append(entry)
    if key == "torch":
        out["torch"] = md.get("Version")
        try:        # torch/version.py says `cuda: Optional[str] = '12.4'`; never import torch
            text = dist.locate_file("torch/version.py").read_text()
            m = re.search(r"^cuda\s*(?::[^=\n]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
            out["torch_cuda"] = m.group(1) if m else None
            # The dist metadata may drop the local label (2.11.0); torch.__version__ has it (+cu130).
            m = re.search(r"^__version__\s*(?::[^=\n]*)?=\s*['\"]([^'\"]+)['\"]", text, re.M)
            out["torch"] = m.group(1) if m else out["torch"]
        except OSError:
            pass
print(json.dumps(out))
"""


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


def _run(argv, timeout=30.0, **kw):
    """(exit code, stdout, stderr) of argv; a missing binary or a hang is a value, not a crash."""
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=timeout, **kw)
    except FileNotFoundError as err:
        return 127, "", str(err)
    except subprocess.TimeoutExpired:
        return 124, "", "timed out after %ss: %s" % (timeout, " ".join(argv[:2]))
    return (proc.returncode, proc.stdout.decode("utf-8", "replace"),
            proc.stderr.decode("utf-8", "replace"))


def os_name():
    try:
        with open("/etc/os-release") as fh:
            for line in fh:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip("\"'")
    except OSError:
        pass
    return platform.system()


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


def venv(python, known=None):
    """The interpreter at `python` (a venv's, or a name on PATH like python3) as it reports itself;
    or, when `known` (the fingerprint of the answer the controller already holds) still matches,
    just that: the controller reuses its answer, and the host starts no interpreter."""
    if os.sep not in python:
        python = shutil.which(python) or python
    if not os.path.exists(python):
        if os.path.islink(python):     # the venv is there but its base interpreter was removed
            return {"python": python, "exists": True,
                    "error": "links to %s, which does not exist" % os.readlink(python)}
        return {"python": python, "exists": False}
    fingerprint = venv_fingerprint(python)
    if known is not None and fingerprint == known:
        return {"python": python, "exists": True, "fingerprint": fingerprint, "unchanged": True}
    rc, out, err = _run([python, "-I", "-c", VENV_SNIPPET], timeout=60.0)
    try:
        return {"python": python, "exists": True, "info": loads_bounded(out), "fingerprint": fingerprint}
    except ValueError:
        lines = [x for x in (err or out).strip().splitlines() if x.strip()]
        why = lines[-1] if lines else "exited %d with no output" % rc
        return {"python": python, "exists": True, "error": why}


def nvidia_smi():
    binary = shutil.which("nvidia-smi")
    if not binary:
        return {"found": False}
    rc, out, err = _run([binary, NVIDIA_SMI_QUERY, "--format=csv,noheader,nounits"], timeout=20.0)
    return {"found": True, "exit_code": rc, "stdout": out, "stderr": err}


def nvcc():
    # Non-interactive ssh rarely has CUDA on PATH: also look where the CUDA toolkit installs.
    binary = shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc",) if os.access(p, os.X_OK)), None)
    if not binary:
        return None
    rc, out, err = _run([binary, "--version"], timeout=20.0)
    return out if rc == 0 else None


def mem_total_kb():
    """Host RAM (MemTotal of /proc/meminfo, kB); None where there is no /proc/meminfo."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def disk(root):
    found = space(root)
    return {"path": found["dir"], "free": found["free"], "dev": found["dev"]}


def space(path):
    """The filesystem a file at `path` would land on: the nearest existing folder at or above it
    (links followed, as a write would follow them: models/ may be a link to another disk), that
    filesystem's device number and the bytes free there for an unprivileged writer."""
    folder = os.path.abspath(path)
    while not os.path.isdir(folder) and folder != os.path.dirname(folder):
        folder = os.path.dirname(folder)
    st, vfs = os.stat(folder), os.statvfs(folder)
    return {"dir": folder, "dev": st.st_dev, "free": vfs.f_bavail * vfs.f_frsize}


def listing(path):
    """A folder's entries (not followed: a link is a link) with size and mtime; None when absent."""
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return None
    out = []
    for name in names[:LIST_CAP]:
        try:
            st = os.lstat(os.path.join(path, name))
        except OSError:
            continue                # removed while we looked
        kind = ("link" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode)
                else "file" if stat.S_ISREG(st.st_mode) else "other")
        out.append({"name": name, "kind": kind, "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def markers(path):
    """The small marker files of a folder (not hidden: a hidden one is a write in progress)."""
    out = {}
    try:
        names = sorted(n for n in os.listdir(path) if not n.startswith("."))
    except OSError:
        return out
    for name in names[:64]:
        try:
            with open_regular(os.path.join(path, name), follow=False) as fh:
                out[name] = fh.read(MARKER_CAP).decode("utf-8", "replace")
        except (OSError, ValueError):
            continue                # gone, or a FIFO, a device, a link: not a marker provision wrote
    return out


def _project_name(folder):
    """The `[project]` name of a folder's pyproject.toml (no tomllib before Python 3.11)."""
    try:
        with open(os.path.join(folder, "pyproject.toml"), "rb") as fh:
            text = fh.read(READ_CAP).decode("utf-8", "replace")
    except OSError:
        return None
    section = re.search(r"^\[project\][ \t]*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
    found = section and re.search(r"^name\s*=\s*[\"']([^\"'\n]+)[\"']", section.group(1), re.M)
    return found.group(1).strip() if found else None


def node_packs(folder):
    """Every node pack of a custom_nodes folder, as ComfyUI and ComfyUI-Manager see them: each
    folder ComfyUI imports, each it skips for its `.disabled` suffix, and each ComfyUI-Manager
    disabled by moving it into `.disabled/`. For each: its origin URL, its pyproject.toml name and
    whether it holds the Comfy Registry's `.tracking` file. None when the folder is absent."""
    if not os.path.isdir(folder):
        return None
    out = []
    for where, moved_aside in ((folder, False), (os.path.join(folder, ".disabled"), True)):
        try:
            names = sorted(os.listdir(where))[:LIST_CAP]
        except OSError:
            continue
        for name in names:
            path = os.path.join(where, name)
            if name in ("__pycache__", ".disabled") or not os.path.isdir(path):
                continue
            origin = None
            if os.path.lexists(os.path.join(path, ".git")):
                rc, url, _ = _git(path, "config", "--get", "remote.origin.url", timeout=30.0)
                origin = url.strip() if rc == 0 and url.strip() else None
            out.append({"name": name, "path": path,
                        "enabled": not (moved_aside or name.endswith(".disabled")),
                        "origin": origin, "project": _project_name(path),
                        "registry": os.path.isfile(os.path.join(path, ".tracking"))})
    return out


def stat_files(paths, cache_path):
    try:
        cache = loads_bounded(read_capped(cache_path, CACHE_CAP, follow=False))
        cache = cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        cache = {}
    out = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            out[path] = {"exists": False}
            continue
        entry = cache.get(path)
        sha = None
        if (isinstance(entry, dict) and entry.get("size") == st.st_size
                and entry.get("mtime_ns") == st.st_mtime_ns):
            sha = entry.get("sha256")
        out[path] = {"exists": True, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    return out


def read_files(paths):
    out = {}
    for path in paths:
        try:
            with open_regular(path) as fh:
                out[path] = fh.read(READ_CAP).decode("utf-8", "replace")
        except (OSError, ValueError):
            out[path] = None
    return out


def grep_files(pairs):
    out = []
    for path, needle in pairs:
        want, found, tail = needle.encode("utf-8"), False, b""
        try:
            with open_regular(path) as fh:
                # Streamed with an overlap so a needle across two chunks is still found.
                for chunk in iter(lambda: fh.read(1 << 16), b""):
                    if want in tail + chunk:
                        found = True
                        break
                    tail = chunk[-len(want):] if want else b""
        except (OSError, ValueError):
            found = False
        out.append([path, needle, found])
    return out


def use_git(spec):
    GIT["argv"] = ["git"] + [x for pair in spec["config"] for x in ("-c", pair)]
    GIT["env"] = dict(os.environ, **spec["env"])


def _git(path, *args, **kw):
    return _run(_git_argv() + ["-C", path] + list(args), env=GIT["env"], **kw)


def _git_argv():
    if GIT["argv"] is None:     # never a git without the neutralising config
        raise ValueError("the request has no git_command")
    return GIT["argv"]


def foreign_owner(path):
    """Why git must not read the checkout at path as this user (its folder or its .git belongs to
    another: git would refuse it, and reading it anyway would run that user's configuration as
    this one), or None."""
    me = os.geteuid()
    for where in (path, os.path.join(path, ".git")):
        try:
            uid = os.stat(where).st_uid
        except OSError:
            continue
        if uid != me:
            return "%s is owned by %s, not by %s, who runs provision there: git never reads a " \
                   "checkout of another user's (its configuration could run commands)" % (
                       where, user_name(uid), user_name(me))
    return None


def login(root):
    """Who runs this program, and who owns ComfyUI's root (None when there is no root yet)."""
    me = os.geteuid()
    try:
        owner = os.stat(root).st_uid
    except OSError:
        owner = None
    return {"uid": me, "user": _name_of(me), "root_owner_uid": owner,
            "root_owner": _name_of(owner) if owner is not None else None,
            "root_group": _group_of(owner) if owner is not None else None}


def _group_of(uid):
    """The primary group's name of a user (what its unit's Group= says)."""
    try:
        import grp
        import pwd
        return grp.getgrgid(pwd.getpwuid(uid).pw_gid).gr_name
    except (ImportError, KeyError):
        return None


def _name_of(uid):
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (ImportError, KeyError):
        return str(uid)


def user_name(uid):
    try:
        import pwd
        return "%s (uid %d)" % (pwd.getpwuid(uid).pw_name, uid)
    except (ImportError, KeyError):
        return "uid %d" % uid


def git_checkout(path):
    if not os.path.isdir(path):
        return {"exists": False}

    def git(*args):
        return _git(path, *args, timeout=30.0)

    if shutil.which("git", path=GIT["env"].get("PATH")) is None:
        return {"exists": True, "is_repo": False, "error": "git is not installed (not on PATH)"}
    foreign = foreign_owner(path)
    if foreign:
        return {"exists": True, "is_repo": False, "error": foreign, "foreign": True}
    rc, top, err = git("rev-parse", "--show-toplevel")
    if rc != 0 and (rc != 128 or os.path.lexists(os.path.join(path, ".git"))):
        # git itself failed, or a checkout's .git is there and git cannot read it: never call
        # that "not a git checkout" (a forced plan would move a working plugin aside).
        lines = [x.strip() for x in (err or top).splitlines() if x.strip()]
        return {"exists": True, "is_repo": False,
                "error": "git exited %d: %s" % (rc, lines[-1] if lines else "no output")}
    if rc != 0 or os.path.realpath(top.strip()) != os.path.realpath(path):
        # Not a checkout itself (a plain folder inside ComfyUI's own checkout is not the plugin's).
        try:
            entries = sorted(os.listdir(path))[:50]
        except OSError:
            entries = []
        return {"exists": True, "is_repo": False, "error": err.strip() if rc not in (0, 128) else None,
                "entries": entries}
    rc, head, _ = git("rev-parse", "--verify", "-q", "HEAD")
    rc_b, branch, _ = git("symbolic-ref", "-q", "--short", "HEAD")
    _, tags, _ = git("tag", "--points-at", "HEAD")
    _, status, _ = git("status", "--porcelain=v1", "-z")
    rc_r, remote, _ = git("config", "--get", "remote.origin.url")
    dirty, untracked, items = [], [], status.split("\0")
    i = 0
    while i < len(items):
        item = items[i]
        if len(item) > 3:
            dirty.append(item[3:])
            if item[:2] == "??":
                untracked.append(item[3:])
            if item[0] in "RC":
                i += 1                  # a rename's second field is its origin path
        i += 1
    return {"exists": True, "is_repo": True, "head": head.strip() if rc == 0 else None,
            "tags": sorted(t for t in tags.split() if t),
            "branch": branch.strip() if rc_b == 0 else None, "dirty": dirty, "untracked": untracked,
            "remote": remote.strip() if rc_r == 0 else None}


def git_show(items):
    """[path, "refs/tags/T:file", text or None]: a file of a commit the checkout already has."""
    out = []
    for path, spec in items:
        text = None
        if os.path.isdir(path) and not foreign_owner(path):
            # cat-file, not show: show may run a textconv driver the checkout configures
            rc, stdout, _ = _git(path, "cat-file", "blob", spec, timeout=30.0)
            text = stdout if rc == 0 else None
        out.append([path, spec, text])
    return out


def remote_tags(items):
    """[path, repo, tag, answer]: asks the repository for its tags only when the checkout at path
    lacks `tag` (a converged host costs no network); answer {"local": true} | {"tags": [...]} |
    {"error": "..."}."""
    out = []
    for path, repo, tag in items:
        if os.path.isdir(path) and not foreign_owner(path) and _git(path, "rev-parse", "-q", "--verify",
                                        "refs/tags/%s^{commit}" % tag, timeout=30.0)[0] == 0:
            out.append([path, repo, tag, {"local": True}])
            continue
        rc, stdout, err = _run(_git_argv() + ["ls-remote", "--tags", "--refs", "--", repo], timeout=30.0,
                               env=GIT["env"])
        if rc != 0:
            lines = [x.strip() for x in (err or stdout).splitlines() if x.strip()]
            answer = {"error": lines[-1] if lines else "git ls-remote exited %d" % rc}
        else:
            names = [line.split("refs/tags/", 1)[1] for line in stdout.splitlines() if "refs/tags/" in line]
            answer = {"tags": sorted(names)}
        out.append([path, repo, tag, answer])
    return out


def safetensors_header(path):
    """The `__metadata__` of a safetensors file (8-byte little-endian length, then a JSON object)
    without reading its tensors: {"metadata": {...}} | {"exists": false} | {"error": "..."}."""
    try:
        with open_regular(path) as fh:
            size = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                return {"error": "not a safetensors file (%d bytes: too short for a header)" % len(head)}
            (length,) = struct.unpack("<Q", head)
            if length > min(HEADER_CAP, size - 8):
                return {"error": "not a safetensors file (header length %d, file %d bytes)" % (length, size)}
            header = loads_bounded(fh.read(length))
    except FileNotFoundError:
        return {"exists": False}
    except (OSError, ValueError) as err:        # UnicodeDecodeError and JSON errors are ValueErrors
        return {"error": "not a safetensors header (%s)" % type(err).__name__}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    return {"metadata": dict((k, v) for k, v in meta.items() if k in HEADER_KEYS and isinstance(v, str))}


def _address(hex_addr):
    """/proc/net/tcp{,6}'s local address: 4-byte words in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(words) == 4:
        return socket.inet_ntop(socket.AF_INET, words)
    return socket.inet_ntop(socket.AF_INET6, words)


def _socket_owners(inodes):
    """inode -> pid of the processes holding those sockets (those we may read: all, as root)."""
    owners, want = {}, set("socket:[%s]" % i for i in inodes)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir("/proc/%s/fd" % pid):
                link = os.readlink("/proc/%s/fd/%s" % (pid, fd))
                if link in want:
                    owners[link[8:-1]] = int(pid)
        except OSError:
            continue
    return owners


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as fh:
            args = [a.decode("utf-8", "replace") for a in fh.read(1 << 16).split(b"\0") if a]
    except OSError:
        return None
    return [a[:300] for a in args[:40]]     # enough to say what it is, bounded


def listeners(ports):
    """{port: [{"address", "pid", "cmdline", "uid"}]} of the TCP sockets listening on these ports
    (uid: the socket's owner, which /proc/net/tcp says even of another user's process)."""
    wanted, found = set(int(p) for p in ports), []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as fh:
                rows = fh.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) < 10 or cols[3] != "0A":          # 0A: LISTEN
                continue
            addr, _, port = cols[1].partition(":")
            if int(port, 16) in wanted:
                found.append((int(port, 16), _address(addr), cols[9], int(cols[7])))
    owners = _socket_owners(set(inode for _, _, inode, _ in found)) if found else {}
    out = {}
    for port, address, inode, uid in found:
        pid = owners.get(inode)
        out.setdefault(str(port), []).append({"address": address, "pid": pid, "uid": uid,
                                              "cmdline": _cmdline(pid) if pid else None})
    return out


UNIT_PROPERTIES = ("LoadState", "ActiveState", "SubState", "MainPID", "UnitFileState", "FragmentPath")


def units(req):
    """Unit files matching each (dir, glob) with their text, whether we may write there, and systemd's
    view of those units and of the named ones: {"files": [[dir, glob, [{name, path, text}]]],
    "writable": {dir: bool}, "state": {name: {Property: value}}, "error": why systemctl cannot answer}."""
    files, names, writable = [], list(req.get("names") or []), {}
    for folder, pattern in req.get("files") or []:
        existing = folder
        while not os.path.isdir(existing) and existing != os.path.dirname(existing):
            existing = os.path.dirname(existing)
        writable[folder] = os.access(existing, os.W_OK)
        try:
            listed = sorted(n for n in os.listdir(folder) if fnmatch.fnmatchcase(n, pattern))
        except OSError:
            listed = []
        found = []
        for name in listed:
            path = os.path.join(folder, name)
            text = read_files([path])[path]
            if text is not None:
                found.append({"name": name, "path": path, "text": text})
                names.append(name)
        files.append([folder, pattern, found])
    out = {"files": files, "writable": writable, "state": {}, "error": None}
    if not names and not files:
        return out
    systemctl = shutil.which("systemctl")
    if not systemctl:
        out["error"] = "systemctl not found"
        return out
    if not names:               # no unit yet: does systemd answer at all (not PID 1 in a container)?
        rc, stdout, err = _run([systemctl, "show", "--property=Version"], timeout=20.0)
        if rc != 0:
            lines = [x.strip() for x in (err or stdout).splitlines() if x.strip()]
            out["error"] = lines[-1] if lines else "systemctl show exited %d" % rc
    for name in dict.fromkeys(names):
        argv = [systemctl, "show", "--no-pager"] + ["--property=" + p for p in UNIT_PROPERTIES] + ["--", name]
        rc, stdout, err = _run(argv, timeout=20.0)
        if rc != 0:
            lines = [x.strip() for x in (err or stdout).splitlines() if x.strip()]
            out["error"] = lines[-1] if lines else "systemctl show exited %d" % rc
            break
        out["state"][name] = dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
    return out


def http_status(url):
    """The status a GET of `url` answers (ComfyUI's own, on this host), or None where nothing
    answers: refused, timed out, not HTTP. A plain http URL is asked over a socket: urllib.request
    would first import http.client, email and ssl, about a quarter of this program's CPU."""
    if not url.startswith("http://"):
        return _urllib_status(url)
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
        target = (parts.path or "/") + ("?" + parts.query if parts.query else "")
        with socket.create_connection((parts.hostname, parts.port or 80), timeout=2.0) as sock:
            sock.sendall(("GET %s HTTP/1.0\r\nHost: %s\r\nConnection: close\r\n\r\n"
                          % (target, parts.netloc.rpartition("@")[2])).encode("latin-1"))
            head = b""
            while b"\r\n" not in head and len(head) < 4096:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                head += chunk
    except (OSError, ValueError, UnicodeError):
        return None
    match = re.match(rb"HTTP/\d(?:\.\d)? (\d{3})(?:[ \r])", head)
    return int(match.group(1)) if match else None


def _urllib_status(url):
    # Imported here, in the job's thread, and only for an https URL: urllib.request (http.client,
    # email, ssl) is half the script's import time.
    import urllib.error
    import urllib.request

    # No proxies: the URL is the host's own ComfyUI, never something behind a corporate proxy.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, method="GET"), timeout=2.0) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except Exception:           # refused, timeout, bad URL: nothing answers there
        return None


def gather(req):
    started = time.monotonic()
    if "git_command" in req:
        use_git(req["git_command"])
    jobs = {
        "env": lambda: venv(req["python"], req.get("venv_known")),
        "nvidia_smi": nvidia_smi,
        "nvcc": nvcc,
        "git": lambda: {p: git_checkout(p) for p in req.get("git", [])},
        "http": lambda: {u: http_status(u) for u in req.get("http", [])},
        "disk": lambda: disk(req["root"]),
        "mem_total_kb": mem_total_kb,
        "stat": lambda: stat_files(req.get("stat", []), req.get("checksums", "")),
        "read": lambda: read_files(req.get("read", [])),
        "grep": lambda: grep_files(req.get("grep", [])),
        "show": lambda: git_show(req.get("show", [])),
        "remote_tags": lambda: remote_tags(req.get("remote_tags", [])),
        "headers": lambda: dict((p, safetensors_header(p)) for p in req.get("headers", [])),
        "interpreters": lambda: dict((p, venv(p)) for p in req.get("interpreters", [])),
        "listeners": lambda: listeners(req.get("ports", [])),
        "units": lambda: units(req.get("units") or {}),
        "space": lambda: dict((p, space(p)) for p in req.get("space", [])),
        "listing": lambda: dict((p, listing(p)) for p in req.get("listing", [])),
        "markers": lambda: dict((p, markers(p)) for p in req.get("markers", [])),
        "login": lambda: login(req["root"]),
        "node_packs": lambda: dict((p, node_packs(p)) for p in req.get("node_packs", [])),
    }
    answer = {"version": 1, "root": req["root"], "os": os_name(), "arch": platform.machine(),
              "kernel": platform.release(),
              "system_python": "%s %s" % (platform.python_version(), sys.executable),
              "errors": []}
    # Independent and mostly waiting (subprocesses, HTTP): run side by side, total = slowest.
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        futures = {key: pool.submit(fn) for key, fn in jobs.items()}
        for key, future in futures.items():
            try:
                answer[key] = future.result()
            except Exception as err:    # one broken section must not hide the others
                answer[key] = None
                answer["errors"].append("%s: %s: %s" % (key, type(err).__name__, err))
    answer["elapsed_s"] = round(time.monotonic() - started, 4)
    return answer


def main():
    try:
        answer = gather(json.loads(sys.stdin.read()))
    except Exception as err:
        answer = {"fatal": "%s: %s" % (type(err).__name__, err)}
    sys.stdout.write(json.dumps(answer))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
