"""Wait on the host until a restarted ComfyUI is ready (stdlib only, Python >= 3.8).

Run as `python3 -c SOURCE` with its request as JSON on stdin:
  {"url": "http://127.0.0.1:8188", "nodes": ["NunchakuQwenImageDiTLoader"], "timeout": 300,
   "alive": ["systemctl", "is-active", "comfyui"], "dead": ["failed", "inactive"], "every": 5}

Ready means: GET /system_stats answers 200, and GET /object_info lists every class of `nodes`.
ComfyUI opens its port only after all custom nodes have loaded, so a first /object_info without
them is final: it fails at once rather than waiting out the timeout. `alive` (optional) is run at
each poll: when its output's first word is one of `dead`, the service has died during start-up.

Prints JSON lines {"progress": TEXT} while it waits, then exits 0 when ready. Otherwise it prints
the reason as its last stderr line and exits 1 (timeout), 2 (the service died) or 3 (nodes missing).
"""

import json
import subprocess
import sys
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


def main():
    request = json.loads(sys.stdin.read())
    base = request["url"].rstrip("/")
    where = base.split("://", 1)[-1]
    nodes = list(request.get("nodes") or ())
    timeout = float(request.get("timeout", 300))
    every = float(request.get("every", 5))
    alive, dead = request.get("alive"), set(request.get("dead") or ())
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
        if verdict:
            return fail(2, "ComfyUI's service stopped during start-up after %.0f s (%s: %s)" % (
                elapsed, " ".join(alive), verdict))
        if elapsed >= timeout:
            return fail(1, "ComfyUI at %s did not answer within %g s (last: %s); raise "
                           "comfyui.ready_timeout_s if it needs longer" % (where, timeout, state))
        if time.monotonic() - said >= every:
            said = time.monotonic()
            say("waiting for ComfyUI \u2026 %.0f s (%s)" % (elapsed, state))
        time.sleep(POLL_S)


if __name__ == "__main__":
    sys.exit(main())
