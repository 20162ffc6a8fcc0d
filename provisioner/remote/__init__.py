"""Programs that run ON the host, and the one place their command lines and requests are built.

Each program is a standard-library-only script in Python 3.8 syntax (a host's system python may be
old), sent as `python3 -c SOURCE`: nothing is installed on the host. Requests and secrets go on
stdin, never in argv (`ps` shows argv to every user of the host).

  facts.py   what the host is and has: one round trip, one JSON answer
  fetch.py   resumable, sha256-checked downloads, and verify-only hashing of a file in place
  lock.py    holds the host's apply lock for as long as the controller's channel stays open
  ready.py   waits until a restarted ComfyUI answers and lists the required nodes
  hold.py    writes the constraints file holding a venv's torch family as installed (run by that venv)
  snapshot.py  records what the host runs before a change (and reads the records back)
  supervise.py  runs each of the others, and every other command, in a process group it stops on
             a timeout or when the controller's heartbeat stops; frames the command's output
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Mapping, Sequence
from functools import lru_cache
from importlib import resources

PROGRAMS = ("facts", "fetch", "lock", "ready", "hold", "snapshot", "supervise")
# What `python3 -I -S -c` runs first on a host: the supervisor's source, the first line of stdin.
BOOT = "import sys,json;exec(json.loads(sys.stdin.buffer.readline()))"

# How every git on a host is run, by the programs here and by the resources' steps: it never runs
# what a checkout (or a config file beside it) configures. Config given with -c outranks the
# checkout's own .git/config; the system and global files are not read at all (a container's or a
# login user's ~/.gitconfig is no part of the plan). No `safe.directory`: git refuses a checkout
# another user owns (CVE-2022-24765), so whatever git still runs from a checkout's config (a
# filter driver) runs as that checkout's owner, never as provision's user.
GIT_CONFIG = (
    "core.fsmonitor=false",             # `git status` would run it
    "core.hooksPath=/dev/null",         # no hook of the checkout's (checkout, fetch, stash)
    "core.sshCommand=ssh -o BatchMode=yes",
    "protocol.ext.allow=never",         # an `ext::` origin is a command line
    "credential.helper=",               # an empty value clears the list: no helper runs
    "core.askPass=",
    "core.pager=cat",
    "core.editor=false",
)
GIT_ENV = {"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null", "GIT_TERMINAL_PROMPT": "0",
           "GIT_OPTIONAL_LOCKS": "0", "GIT_SSH_COMMAND": "ssh -o BatchMode=yes", "GIT_ASKPASS": "",
           "SSH_ASKPASS": "", "LC_ALL": "C"}


def git_argv(where: str | None, *args: str) -> tuple[str, ...]:
    """`env ... git -c ... [-C where] ARGS`: the one way a step runs git on a host."""
    return ("env", *(f"{k}={v}" for k, v in GIT_ENV.items()), "git",
            *(x for pair in GIT_CONFIG for x in ("-c", pair)), *(("-C", where) if where else ()), *args)


# A clone beside its final path, checked out, then (given `dest`) renamed into place: an interrupted
# run never leaves a half checkout where ComfyUI looks, and the next run's first command removes
# what one left. One exec, not five; every value is an argument ("$@" is the hardened git), so
# nothing is quoted into the script, and `--` keeps a repo (a snapshot's, read from the host) from
# being read as an option. `git clone` makes the missing parent folders itself.
CLONE = ('set -e; repo=$1 tmp=$2 ref=$3 dest=$4; shift 4; rm -rf "$tmp"; '
         '"$@" clone --quiet --no-checkout -- "$repo" "$tmp"; "$@" -C "$tmp" checkout --quiet --detach "$ref"; '
         'if [ -n "$dest" ]; then mv "$tmp" "$dest"; fi')


def clone_argv(repo: str, tmp: str, ref: str, dest: str | None = None) -> tuple[str, ...]:
    """Clone `repo` into `tmp` (what an earlier run left there removed first), check out `ref`
    detached, then rename `tmp` to `dest` when given (see CLONE)."""
    return ("sh", "-c", CLONE, "sh", repo, tmp, ref, dest or "", *git_argv(None))


def lock_untouched(seen: str | None, previous: str | None) -> bool:
    """Whether no apply held the host's lock between a facts gather that read the lock file's text
    as `seen` (None: no file, or unreadable) and the lock program that found `previous` in it on
    taking the lock (remote/lock.py: each holder writes its own token, `held`, then `released`).
    Only a text that says `released` (or none: never locked) counts: `held` was a holder still at
    work, and an older provision's lock file (its owner alone) says nothing of when it let go."""
    return (previous is not None and (seen or "") == previous
            and (previous == "" or previous.endswith("\nreleased\n")))


def git_request() -> dict[str, object]:
    """What the facts and snapshot programs run git with (the same config and environment)."""
    return {"config": list(GIT_CONFIG), "env": dict(GIT_ENV)}


@lru_cache(maxsize=None)
def source(program: str) -> str:
    """The text of `remote/<program>.py`, exactly as sent to the host."""
    if program not in PROGRAMS:
        raise ValueError(f"unknown host program {program!r}; one of {', '.join(PROGRAMS)}")
    return resources.files(__name__).joinpath(f"{program}.py").read_text(encoding="utf-8")


def kind(command: Sequence[str]) -> str:
    """What a command is, in a word or two, for accounting: `facts` for a program of this package,
    `pip install` (`pip dry run`), `git clone`, else the program's name."""
    words = list(command)
    if words[1:3] == ["-c", CLONE]:
        return "git clone"
    after = {flag: words[words.index(flag) + 1:] for flag in ("-c", "-m", "git") if flag in words}
    program = {source(p): p for p in PROGRAMS}.get(after["-c"][0]) if after.get("-c") else None
    if program == "hold" and after["-c"][1:]:      # the hold program, then pip with these arguments
        after["-m"] = ["pip", *after["-c"][1:]]
    elif program:
        return program
    if after.get("-m", [""])[0] == "pip":
        if "--dry-run" in words:
            return "pip dry run"
        return " ".join(["pip", *[w for w in after["-m"][1:] if not w.startswith("-")][:1]])
    if "git" in after:
        rest = after["git"]
        while rest[:1] in (["-c"], ["-C"]):
            rest = rest[2:]
        return " ".join(["git", *rest[:1]])
    return posixpath.basename(words[0]) if words else "(nothing)"


def argv(program: str, *args: str, python: str = "python3") -> tuple[str, ...]:
    """`python -c SOURCE ARGS...`: the program travels in argv, its request on stdin. The host's
    system python3 runs it isolated and without `site` (`-I -S`): the programs are stdlib only, and
    a system python's site (its .pth files) costs each start more CPU than most of them use; a
    venv's interpreter (the hold program) needs its site-packages."""
    flags = ("-I", "-S") if python == "python3" else ()
    return (python, *flags, "-c", source(program), *args)


def supervise_request(argv: Sequence[str], *, nonce: str, mode: str = "payload", size: int = 0,
                      env: Mapping[str, str] | None = None, timeout: float | None = None,
                      dead_after: float | None = None, grace: float = 5.0) -> bytes:
    """The supervisor's first two lines of stdin: its own source (BOOT runs it), then its request;
    `size` bytes of the command's stdin follow in "payload" mode. remote/supervise.py says the rest."""
    request = {"argv": list(argv), "env": dict(env or {}), "nonce": nonce, "stdin": mode, "size": size,
               "timeout": timeout, "dead_after": dead_after, "grace": grace}
    return (json.dumps(source("supervise")) + "\n" + json.dumps(request) + "\n").encode()


def fetch_request(*, dest: str, cache: str, url: str | None = None, sha256: str | None = None,
                  size: int | None = None, mode: str = "fetch", token: str | None = None,
                  retries: int = 3, quantization: tuple[str, int] | None = None) -> bytes:
    """The fetch program's stdin. Holds the token when given: never log or store it.
    `quantization`: the (weight dtype, rank) the downloaded safetensors header must declare."""
    payload: dict[str, object] = {"url": url, "dest": dest, "sha256": sha256, "size": size,
                                  "cache": cache, "mode": mode, "retries": retries}
    if quantization:
        payload["quantization"] = {"dtype": quantization[0], "rank": quantization[1]}
    if token:
        payload["token"] = token
    return json.dumps(payload).encode()


def ready_request(*, url: str, nodes: Sequence[str], timeout: float, alive: Sequence[str] = (),
                  dead: Sequence[str] = (), every: float = 5.0, root: str | None = None,
                  log_file: str | None = None, log: Sequence[str] = (), container: str | None = None) -> bytes:
    """The ready program's stdin: what to poll, which node classes must be listed, for how long,
    how to tell that the service died (`alive` printing one of `dead`; the processes of checkout
    `root` gone; `log_file` ending in a traceback; `container` no longer running) and where its log
    says why (`log_file`, `log`, the container's). With `container` it runs beside it and sends
    itself (its source) inside."""
    request: dict[str, object] = {"url": url, "nodes": list(nodes), "timeout": timeout,
                                  "alive": list(alive) or None, "dead": list(dead), "every": every, "root": root,
                                  "log_file": log_file, "log": list(log) or None}
    if container:
        request.update(container=container, source=source("ready"))
    return json.dumps(request).encode()


def hold_request(*, dest: str, names: Sequence[str], prefixes: Sequence[str]) -> bytes:
    """The hold program's stdin: where the constraints file goes and which distributions it holds."""
    return json.dumps({"dest": dest, "names": list(names), "prefixes": list(prefixes)}).encode()


def snapshot_request(*, mode: str, folder: str, root: str, python: str, checksums: str,
                     workflow_dirs: Sequence[str], taken: str = "", profile: object = None, keep: int = 1,
                     protect: Sequence[str] = (), reuse: bool = False, now: bool = False,
                     sources: object = None, check_wheels: bool = False, confirmed: bool = False,
                     units: tuple[str, Sequence[str]] | None = None, replaced: Sequence[str] = (),
                     undo_required: bool = False, pip_timeout: float = 900.0,
                     venv_known: Mapping[str, object] | None = None) -> bytes:
    """The snapshot program's stdin: `take` (what the snapshot is of, how many to keep, which ones
    pruning must spare, whether an unchanged state reuses the newest, the pip sources each index
    distribution is recorded with, the distributions the run replaces, whose wheels it keeps, and
    whether one it cannot keep fails the take) or `read` (with `now`: the state as it is, too; with
    `check_wheels`: the kept wheels' sha256 as read now). `venv_known` ({"fingerprint", "listed"}):
    the venv's listing as the facts gave it, used while the venv still has that fingerprint."""
    payload: dict[str, object] = {"mode": mode, "dir": folder, "root": root, "python": python,
                                  "checksums": checksums, "workflow_dirs": list(workflow_dirs),
                                  "git": git_request()}
    if units is not None:                   # (unit folder, name globs): the unit files are part of the state
        payload["units"] = {"dir": units[0], "globs": list(units[1])}
    if venv_known is not None:
        payload["venv_known"] = dict(venv_known)
    if mode == "take":
        payload.update(taken=taken, profile=profile, keep=keep, protect=list(protect), reuse=reuse,
                       sources=sources, confirmed=confirmed, replaced=sorted(replaced), undo_required=undo_required,
                       pip_timeout=pip_timeout)
    else:
        payload.update(now=now, check_wheels=check_wheels)
    return json.dumps(payload, default=str).encode()


def mark_request(folder: str, ident: str, verified: bool) -> bytes:
    """The snapshot program's `mark`: whether the verification of snapshot `ident` passed."""
    return json.dumps({"mode": "mark", "dir": folder, "id": ident, "verified": verified}).encode()


def stage_request(folder: str, wheels: Sequence[tuple[str, str, str, str]]) -> bytes:
    """The snapshot program's `stage`: each (kept file, where it goes, sha256, the folder it must go
    into, never through a link below it) put back, checked."""
    return json.dumps({"mode": "stage", "dir": folder,
                       "wheels": [{"kept": k, "dest": d, "sha256": s, "within": w} for k, d, s, w in wheels]}).encode()
