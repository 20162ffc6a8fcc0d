"""Wait on the host until a restarted ComfyUI is ready (stdlib only, Python >= 3.8).

Run as `python3 -c SOURCE` with its request as JSON on stdin:
  {"url": "http://127.0.0.1:8188", "nodes": ["NunchakuQwenImageDiTLoader"], "timeout": 300,
   "alive": ["systemctl", "is-active", "comfyui"], "dead": ["failed", "inactive"], "every": 5,
   "root": "/opt/ComfyUI", "log_file": "/var/log/comfyui.log",
   "log": ["journalctl", "-u", "comfyui", "-n", "80", "-o", "cat", "--no-pager"]}

Ready means: GET /system_stats answers 200, and GET /object_info lists every class of `nodes`.
ComfyUI opens its port only after all custom nodes have loaded, so a first /object_info without
them is final: it fails at once rather than waiting out the timeout. `alive` (optional) is run at
each poll: when its output's first word is one of `dead`, the service has died during start-up.
Without a service manager: `root` (optional) names the checkout whose python processes (their cwd
is it, or they run its main.py) are ComfyUI: once seen, all of them gone means it died; and
`log_file` (optional) whose last line, written since the wait began, ends a Python traceback means
it died of that exception (a custom node that fails to import logs a traceback too, but ComfyUI
goes on: "Cannot import ..." follows it). The reason then quotes the log's last exception line
(`log_file`, or the output of `log`).

In a container (`container`: its name, `source`: this program's text): run beside it, on its
host. The wait itself runs inside it (`docker exec`: its loopback is ComfyUI's, its log file is
there), while `docker inspect` says when the container died (exited, or restarted by its restart
policy); the reason is then the last exception line of its log since the restart (`docker logs`),
else that log's last line (an argument ComfyUI refuses prints no traceback).

Prints JSON lines {"progress": TEXT} while it waits, then exits 0 when ready. Otherwise it prints
the reason as its last stderr line and exits 1 (timeout), 2 (the service died) or 3 (nodes missing).
"""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

POLL_S = 0.5
REQUEST_S = 5.0


def say(text):
    print(json.dumps({"progress": text}), flush=True)


def fail(code, text):
    print(text, file=sys.stderr, flush=True)
    return code


def get(url):
    """(HTTP status, parsed JSON or None); raises OSError when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=REQUEST_S) as resp:
            body = resp.read()
            status = resp.status
    except urllib.error.HTTPError as err:
        return err.code, None
    try:
        return status, json.loads(body.decode("utf-8"))
    except ValueError:
        return status, None


def why(err):
    reason = getattr(err, "reason", None) or err
    text = getattr(reason, "strerror", None) or str(reason) or type(reason).__name__
    return text.lower()


def died(alive, dead):
    """The liveness command's verdict: its first word when that is a dead state, else None."""
    if not alive:
        return None
    try:
        out = subprocess.run(alive, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             timeout=10).stdout.decode("utf-8", "replace").split()
    except (OSError, subprocess.SubprocessError):
        return None
    word = out[0] if out else ""
    return word if word in dead else None


def last_exception(lines):
    """The exception line of the last Python traceback in `lines` (its first unindented line), or None."""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if not starts:
        return None
    return next((line.strip() for line in lines[starts[-1] + 1:] if line.strip() and not line[:1].isspace()),
                None)


def ends_in_traceback(lines):
    """Whether the last line of `lines` is the exception line of a traceback: the process died of it."""
    said = [line for line in lines if line.strip()]
    found = last_exception(said)
    return found is not None and said[-1].strip() == found


def read_tail(path, size=65536):
    """The last lines of a file (None when it cannot be read) and its size."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            fh.seek(max(0, end - size))
            return fh.read().decode("utf-8", "replace").splitlines(), end
    except OSError:
        return None, -1


def log_lines(request):
    if request.get("log_file"):
        return read_tail(request["log_file"])[0] or []
    if request.get("log"):
        try:
            return subprocess.run(request["log"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  timeout=30).stdout.decode("utf-8", "replace").splitlines()
        except (OSError, subprocess.SubprocessError):
            return []
    return []


def _ancestors():
    pid, out = os.getpid(), set()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            with open("/proc/%d/stat" % pid) as fh:
                pid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return out


def comfyui_pids(root, skip):
    """Live python processes of the checkout `root`: their cwd is it, or they run its main.py (not
    any python naming a path under it: provision's own lock holder does)."""
    found = set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit() or int(name) in skip:
            continue
        try:
            with open("/proc/%s/cmdline" % name, "rb") as fh:
                argv = [a.decode("utf-8", "replace") for a in fh.read().split(b"\0") if a]
            with open("/proc/%s/stat" % name) as fh:
                zombie = fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
            cwd = os.readlink("/proc/%s/cwd" % name)
        except (OSError, IndexError):
            continue
        if zombie or not argv or not os.path.basename(argv[0]).startswith("python"):
            continue
        if cwd == root or root + "/main.py" in argv[1:]:
            found.add(int(name))
    return found


class Watch(object):
    """What says ComfyUI died while it starts, without a service manager to ask."""

    def __init__(self, request):
        self.root = (request.get("root") or "").rstrip("/") or None
        self.log_file = request.get("log_file")
        self.skip = _ancestors()
        self.seen = set()
        self.log_at_start = read_tail(self.log_file)[1] if self.log_file else -1
        self.crashed_polls = 0

    def died(self):
        """Why ComfyUI is known dead, or None."""
        now = comfyui_pids(self.root, self.skip) if self.root else None
        if self.log_file:
            lines, size = read_tail(self.log_file)
            # A traceback written since the wait began; or one already there while nothing of
            # ComfyUI runs (it died before the first look).
            fresh = size != self.log_at_start or (now == set() and not self.seen)
            crashed = lines is not None and fresh and ends_in_traceback(lines)
            # Twice in a row: a traceback being written is not yet followed by what comes after it.
            self.crashed_polls = self.crashed_polls + 1 if crashed else 0
            if self.crashed_polls >= 2:
                return "its log %s ends in a traceback" % self.log_file
        if now is not None:
            if self.seen and not now:
                return "its process%s (pid %s) exited" % (
                    "es" if len(self.seen) > 1 else "", ", ".join(str(p) for p in sorted(self.seen)))
            self.seen |= now
        return None


INSPECT = "{{.State.Status}} {{.State.ExitCode}} {{.RestartCount}} {{.State.StartedAt}}"


def container_state(name):
    """(status, exit code, restarts, started at) as `docker inspect` says, or None."""
    try:
        out = subprocess.run(["docker", "inspect", "-f", INSPECT, name], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, timeout=30).stdout.decode("utf-8", "replace").split()
    except (OSError, subprocess.SubprocessError):
        return None
    return (out[0], out[1], int(out[2]), out[3]) if len(out) == 4 and out[2].isdigit() else None


def container_died(name, first):
    """Why the container is known dead since `first` (its state when the wait began), or None."""
    now = container_state(name)
    if now is None:
        return None
    if now[0] in ("exited", "dead"):
        return "container %s exited with code %s" % (name, now[1])
    if now[0] == "restarting" or (first is not None and now[2] > first[2]):
        return "container %s exited with code %s, and its restart policy restarted it" % (name, now[1])
    return None


def container_log(name, since):
    argv = ["docker", "logs"] + (["--since", since] if since else []) + ["--tail", "200", name]
    try:
        out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return out.decode("utf-8", "replace").splitlines()


def beside(request):
    """The wait inside the container, watched from beside it (the module docstring says why)."""
    name = request["container"]
    started = time.monotonic()
    first = container_state(name)
    inner = dict(request, container=None, source=None, held=True)
    proc = subprocess.Popen(["docker", "exec", "-i", name, "python3", "-c", request["source"]],
                            stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write((json.dumps(inner) + "\n").encode())
    proc.stdin.flush()                  # kept open: when this program goes, the one inside goes too
    said = []
    reader = threading.Thread(target=lambda: said.append(proc.stderr.read()))
    reader.start()
    verdict = None
    while proc.poll() is None and not verdict:
        verdict = container_died(name, first)
        time.sleep(POLL_S)
    if proc.returncode != 0:            # the exec dies with the container: ask once more
        verdict = verdict or container_died(name, first)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    reader.join()
    if not verdict:
        sys.stderr.write(b"".join(said).decode("utf-8", "replace"))
        return proc.returncode
    lines = [line for line in container_log(name, first[3] if first else None) if line.strip()]
    cause = last_exception(lines) or (lines[-1].strip() if lines else None)
    return fail(2, died_text(time.monotonic() - started, cause, verdict))


def died_text(elapsed, cause, verdict):
    return "ComfyUI died during start-up after %.0f s%s (%s)" % (elapsed, ": " + cause if cause else "", verdict)


def leave_with_stdin():
    """Run by `beside`: stdin stays open while the program beside the container runs."""
    sys.stdin.read()
    os._exit(1)


def main():
    request = json.loads(sys.stdin.readline())
    if request.get("container"):
        return beside(request)
    if request.get("held"):
        threading.Thread(target=leave_with_stdin, daemon=True).start()
    base = request["url"].rstrip("/")
    where = base.split("://", 1)[-1]
    nodes = list(request.get("nodes") or ())
    timeout = float(request.get("timeout", 300))
    every = float(request.get("every", 5))
    alive, dead = request.get("alive"), set(request.get("dead") or ())
    watch = Watch(request)
    started = time.monotonic()
    said = started
    state = "not polled yet"
    say("waiting for ComfyUI at %s (up to %g s)" % (where, timeout))
    while True:
        elapsed = time.monotonic() - started
        try:
            status, stats = get(base + "/system_stats")
            state = "answers HTTP %d" % status if status != 200 else "answers"
        except OSError as err:
            status, stats, state = None, None, why(err)
        if status == 200 and isinstance(stats, dict):
            try:
                status, info = get(base + "/object_info")
            except OSError as err:
                status, info, state = None, None, "GET /object_info: " + why(err)
            if status == 200 and isinstance(info, dict):
                missing = [n for n in nodes if n not in info]
                if missing:
                    return fail(3, "ComfyUI at %s answers after %.0f s, but %s %s not registered (%d node "
                                   "classes listed): a custom node failed to load" % (
                                       where, elapsed, ", ".join(missing),
                                       "is" if len(missing) == 1 else "are", len(info)))
                say("ComfyUI answers after %.0f s, %d node classes registered" % (elapsed, len(info)))
                return 0
        verdict = died(alive, dead)
        verdict = verdict and "%s: %s" % (" ".join(alive), verdict) or watch.died()
        if verdict:
            return fail(2, died_text(elapsed, last_exception(log_lines(request)), verdict))
        if elapsed >= timeout:
            return fail(1, "ComfyUI at %s did not answer within %g s (last: %s); raise "
                           "comfyui.ready_timeout_s if it needs longer" % (where, timeout, state))
        if time.monotonic() - said >= every:
            said = time.monotonic()
            say("waiting for ComfyUI \u2026 %.0f s (%s)" % (elapsed, state))
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main())
