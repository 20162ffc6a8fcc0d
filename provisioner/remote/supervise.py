"""Runs one command on the host for the controller, and ends it when the controller is gone
(stdlib only, Python >= 3.8). Every command provision runs on a host runs under this program.

The login shell runs `/bin/sh -c '... exec python3 -I -S -c BOOT'` (connection/base.py); BOOT executes
the first line of stdin, this source as a JSON string. The second line is the request:

  {"argv": [...], "env": {...}, "nonce": "...", "stdin": "payload" | "hold" | "relay", "size": N,
   "timeout": SECONDS or null, "dead_after": SECONDS or null, "grace": SECONDS}

After it come `size` bytes for the command's stdin ("payload" mode), then the controller's
heartbeat: any byte at all, at least once every `dead_after` seconds.

provision's own programs (`python3 -I -S -c SOURCE ARGS`, this interpreter) run in a fork of this
process rather than a new interpreter (`Forked`); anything else is started as it is.

The command runs in a process group of its own, and the whole group is stopped (SIGTERM, then
SIGKILL `grace` seconds later) when
  - `timeout` seconds have passed;
  - no byte came from the controller for `dead_after` seconds: it died, froze, or the network
    between us is down (TCP alone would notice only after many minutes);
  - in "payload" mode, stdin ends before the command does: the controller stopped it (Ctrl-C, a
    step that printed nothing for too long), or its connection closed;
  - this program gets SIGTERM, SIGHUP or SIGINT.
In "hold" mode (a lock holder: nothing is forwarded) and "relay" mode (every byte after the
request goes to the command: a `docker exec` with its own supervisor inside), the end of stdin
closes the command's stdin and gives the group `grace` seconds to end by itself.

On stdout and on stderr, the command's output lies between two markers, so nothing a login
shell's rc file prints before or after can be taken for it:

  \\x1eprovision NONCE start\\n ...the command's output... \\x1eprovision NONCE end {STATUS}\\n

STATUS is JSON: {"exit": N} or {"signal": "SIGKILL"}, and why it was stopped: {"timeout": S} or
{"stopped": REASON}; "cpu" is the CPU seconds of this program and of everything it waited for (the
command and its children): what the command cost the host. This program exits with the command's
code, 128+N for a signal, 124 for a timeout.
"""

import json
import os
import queue
import resource
import signal
import subprocess
import sys
import threading
import time

CHUNK = 65536


def marker(nonce, what):
    return ("\x1eprovision %s %s" % (nonce, what)).encode()


def signal_name(number):
    try:
        return signal.Signals(number).name
    except ValueError:
        return "signal %d" % number


class Controller:
    """What comes from the controller on stdin: the payload, the heartbeat, the end."""

    def __init__(self, stdin, mode, size, forward):
        self.stdin, self.mode, self.left, self.forward = stdin, mode, size, forward
        self.heard = time.monotonic()
        self.ended = None               # monotonic time stdin ended
        self.wake = threading.Event()

    def listen(self):
        while True:
            try:
                data = self.stdin.read1(CHUNK)
            except (OSError, ValueError):
                data = b""
            if not data:
                break
            self.heard = time.monotonic()
            if self.mode == "relay":
                self.forward(data)
            elif self.left:
                part = data[:self.left]
                self.left -= len(part)
                self.forward(part)
                if not self.left:
                    self.forward(None)      # the whole payload is there: the command's stdin ends
        self.ended = time.monotonic()
        if self.mode != "payload" or self.left:
            self.forward(None)
        self.wake.set()


def forwarder(pipe):
    """A writer to the command's stdin that never blocks the listener (it may read slowly)."""
    items = queue.Queue()

    def write():
        broken = pipe is None
        while True:
            item = items.get()
            if item is None:
                break
            if not broken:
                try:
                    pipe.write(item)
                    pipe.flush()
                except (OSError, ValueError):
                    broken = True       # it stopped reading its stdin: the rest is dropped
        if pipe is not None:
            try:
                pipe.close()
            except (OSError, ValueError):
                pass

    threading.Thread(target=write, daemon=True).start()
    return items.put


def main():
    stdin = sys.stdin.buffer
    request = json.loads(stdin.readline().decode("utf-8"))
    nonce, argv = request["nonce"], request["argv"]
    mode = request.get("stdin") or "payload"
    size = int(request.get("size") or 0)
    timeout, dead_after = request.get("timeout"), request.get("dead_after")
    grace = float(request.get("grace") or 5)
    out, err = sys.stdout.buffer, sys.stderr.buffer
    for stream in (out, err):
        stream.write(marker(nonce, "start\n"))
        stream.flush()

    got_signal = []

    def on_signal(number, _frame):
        # Only a list append: the handler runs between any two bytecodes of the main thread, so one
        # that took a lock (Event.set) would deadlock when the loop below held it. The loop polls.
        got_signal.append(signal_name(number))

    for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(number, on_signal)   # before the command starts: no signal finds it unguarded
    env = dict(os.environ)
    env.update(request.get("env") or {})
    piped = mode != "payload" or size > 0
    try:
        if own_program(argv, env):
            child = Forked(argv, env, piped)
        else:
            child = subprocess.Popen(argv, stdin=subprocess.PIPE if piped else subprocess.DEVNULL, env=env,
                                     start_new_session=True)     # its own group: stopped as a whole
    except OSError as error:
        err.write(("%s: %s\n" % (argv[0], error.strerror)).encode())
        return finish(out, err, nonce, {"exit": 127 if isinstance(error, FileNotFoundError) else 126})
    ctl = Controller(stdin, mode, size, forwarder(child.stdin))
    threading.Thread(target=ctl.listen, daemon=True).start()

    def wait_child():
        child.wait()
        ctl.wake.set()

    threading.Thread(target=wait_child, daemon=True).start()

    started = time.monotonic()
    status, stopping_since, killed = {}, None, False
    while child.poll() is None:
        now = time.monotonic()
        if stopping_since is None:
            why = None
            if timeout is not None and now - started >= timeout:
                status["timeout"] = timeout
                why = ""
            elif got_signal:
                why = "the supervisor got %s" % got_signal[0]
            elif ctl.ended is not None and mode == "payload":
                why = "the controller closed its end"
            elif ctl.ended is not None and now - ctl.ended >= grace:
                why = "still running %gs after its stdin ended" % grace
            elif ctl.ended is None and dead_after and now - ctl.heard >= dead_after:
                why = "no heartbeat from the controller for %gs" % dead_after
            if why is not None:
                if why:
                    status["stopped"] = why
                stopping_since = now
                kill_group(child.pid, signal.SIGTERM)
        elif not killed and now - stopping_since >= grace:
            kill_group(child.pid, signal.SIGKILL)
            killed = True
        ctl.wake.wait(0.2)
        ctl.wake.clear()
    if stopping_since is not None:
        kill_group(child.pid, signal.SIGKILL)   # what is left of the group: pip's or git's children
    code = child.returncode
    if code < 0:
        status["signal"] = signal_name(-code)
    else:
        status["exit"] = code
    return finish(out, err, nonce, status)


def own_program(argv, env):
    """`argv` runs one of provision's host programs (`python3 -I -S -c SOURCE ARGS`) with the very
    interpreter this program is, started the same way."""
    if len(argv) < 5 or list(argv[1:4]) != ["-I", "-S", "-c"] or not (sys.flags.isolated and sys.flags.no_site):
        return False
    found = argv[0]
    if os.sep not in found:
        found = next((os.path.join(d, found) for d in env.get("PATH", os.defpath).split(os.pathsep)
                      if os.access(os.path.join(d or ".", found), os.X_OK)), None)
    return found is not None and os.path.realpath(found) == os.path.realpath(sys.executable)


class Forked:
    """One of provision's host programs, run in a fork of this process instead of a new interpreter:
    no second start and no second import of what both use (json, subprocess, threading), about 25 ms
    of the host's CPU per program (facts, fetch, snapshot, lock...). To the loop in main() it is a
    Popen: its own session, the request's environment, stdin a pipe or /dev/null, the exit code or
    the signal a new `python3 -I -S -c` would end with. Forked before any thread of this one starts."""

    def __init__(self, argv, env, piped):
        read_end, write_end = os.pipe() if piped else (os.open(os.devnull, os.O_RDONLY), None)
        self.pid = os.fork()
        if self.pid == 0:
            if write_end is not None:
                os.close(write_end)
            run_in_child(argv, env, read_end)       # never returns
        os.close(read_end)
        self.stdin = os.fdopen(write_end, "wb") if write_end is not None else None
        self.returncode = None

    def wait(self):
        _, status = os.waitpid(self.pid, 0)         # only wait_child() calls it: one reaper
        self.returncode = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.returncode

    def poll(self):
        return self.returncode


def run_in_child(argv, env, stdin_fd):
    """The forked child: become what `python3 -I -S -c SOURCE ARGS` would be, run SOURCE, exit."""
    code = 1
    try:
        os.setsid()                                 # its own group: stopped as a whole
        os.dup2(stdin_fd, 0)
        os.close(stdin_fd)
        for number in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(env)
        sys.argv = ["-c"] + list(argv[5:])
        sys.stdin = open(0, encoding=sys.stdin.encoding, errors=sys.stdin.errors, closefd=False)
        try:
            exec(compile(argv[4], "<string>", "exec"), {"__name__": "__main__"})
            code = 0
        except SystemExit as stop:            # sys.exit(N), sys.exit(), sys.exit("why"): as Python
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            if stop.code is not None and not isinstance(stop.code, int):
                print(stop.code, file=sys.stderr)
        except BaseException:
            import traceback
            traceback.print_exc()
        for thread in threading.enumerate():        # as the interpreter's own exit would
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code & 0xFF)


def kill_group(pgid, number):
    try:
        os.killpg(pgid, number)
    except OSError:
        pass                            # already gone


def finish(out, err, nonce, status):
    status["cpu"] = round(sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                                 resource.getrusage(resource.RUSAGE_CHILDREN))), 3)
    line = marker(nonce, "end ") + json.dumps(status, sort_keys=True).encode() + b"\n"
    for stream in (out, err):
        try:
            stream.write(line)
            stream.flush()
        except OSError:
            pass                        # nobody is listening any more
    if "timeout" in status:
        code = 124
    elif "signal" in status:
        code = 128 + getattr(signal, status["signal"], 0) if status["signal"].startswith("SIG") else 255
    else:
        code = status["exit"]
    # os._exit: a daemon thread may still block reading stdin, which would stall the interpreter's
    # own shutdown.
    os._exit(code)


if __name__ == "__main__":
    main()
