"""A small service manager standing in for systemd on the fast suite's hosts (processes of this
machine, where systemd is not PID 1): `systemctl` and `journalctl` over the unit files provision
installs, as far as provision and the tests use them. Standard library only; installed per host by
tests/sshd.py `install_service_manager`. The real-hosts tier holds it against real systemd
(tests/hosts/test_hosts_standins.py): the same commands, the same answers.

It reads what systemd reads of a unit (`[Service]` ExecStart, ExecStartPost, Environment,
WorkingDirectory, User, Group, Restart, RestartSec; systemd's quoting, `%%` and `$$`, `$VAR` expansion) and is as
unkind as systemd where provision could get it wrong:
- a unit file is loaded by `daemon-reload` only: a start after the file changed runs the OLD
  definition and warns, as systemd does;
- `start` / `restart` return once the process is forked (Type=simple), long before ComfyUI listens;
  an ExecStartPost runs before they return;
- the service gets systemd's environment (its own PATH, no login session), cwd `/` unless
  WorkingDirectory says otherwise, and stdout/stderr in its journal, each line stamped as journald
  stamps it (time, host, the process's name and pid);
- a process that exits non-zero is `failed`, or with Restart=on-failure `activating`/`auto-restart`
  and started again after RestartSec (no start limit: systemd's does not trip at RestartSec=5);
- `enable` links the unit into UNITS/multi-user.target.wants, `is-enabled` and `show` read that link.

State: STATE/NAME/ holds `supervisor` (the pid of the process supervising the unit), `pid` (the main
process), `status` (running | auto-restart | failed | dead), `journal`; STATE/loaded/NAME the
definition loaded by the last daemon-reload.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WANTS = "multi-user.target.wants"
STOP_TIMEOUT_S = 30.0
_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\", '"': '"', "'": "'", "s": " ", "a": "\a", "b": "\b", "f": "\f",
            "r": "\r", "v": "\v"}


# How systemd names an exit status in "Main process exited" (exit_status_to_string: libc, LSB and BSD
# codes; any other is n/a).
EXIT_NAMES = {0: "SUCCESS", 1: "FAILURE", 2: "INVALIDARGUMENT", 3: "NOTIMPLEMENTED", 4: "NOPERMISSION",
              5: "NOTINSTALLED", 6: "NOTCONFIGURED", 7: "NOTRUNNING", 64: "USAGE", 65: "DATAERR", 66: "NOINPUT",
              67: "NOUSER", 68: "NOHOST", 69: "UNAVAILABLE", 70: "SOFTWARE", 71: "OSERR", 72: "OSFILE",
              73: "CANTCREAT", 74: "IOERR", 75: "TEMPFAIL", 76: "PROTOCOL", 77: "NOPERM", 78: "CONFIG",
              203: "EXEC", 217: "USER"}     # and two of systemd's own, for a start that failed in the child
# `systemctl show` prints properties in its own table's order (a service's before the unit's), not
# in the order --property asked for them.
SHOW_ORDER = ("MainPID", "LoadState", "ActiveState", "SubState", "FragmentPath", "UnitFileState")


def exited(code: int) -> str:
    """systemd's words for how a main process ended (`Popen.returncode`: negative for a signal)."""
    if code < 0:
        return f"code=killed, status={-code}/{signal.Signals(-code).name[3:]}"
    return f"code=exited, status={code}/{EXIT_NAMES.get(code, 'n/a')}"


class UnitError(Exception):
    """A unit that systemd would refuse to load, with systemd's kind of message."""


# -- unit files ---------------------------------------------------------------------------------

def split(line: str) -> list[str]:
    """Words of a setting as systemd splits them: whitespace-separated, "…" and '…' quoting with
    C escapes inside, a backslash escaping outside."""
    words: list[str] = []
    word: str | None = None
    quote: str | None = None
    i = 0
    while i < len(line):
        c = line[i]
        if quote is not None:
            if c == "\\" and i + 1 < len(line):
                word = (word or "") + _ESCAPES.get(line[i + 1], line[i + 1])
                i += 1
            elif c == quote:
                quote = None
            else:
                word = (word or "") + c
        elif c.isspace():
            if word is not None:
                words.append(word)
                word = None
        elif c in "\"'" and word is None:
            quote, word = c, ""
        elif c == "\\" and i + 1 < len(line):
            word = (word or "") + line[i + 1]
            i += 1
        else:
            word = (word or "") + c
        i += 1
    if quote is not None:
        raise UnitError(f"unbalanced quoting in {line!r}")
    if word is not None:
        words.append(word)
    return words


def specifiers(text: str) -> str:
    """`%%` is a literal %; provision writes no other specifier, so any other is refused."""
    def one(m: re.Match[str]) -> str:
        if m.group(1) == "%":
            return "%"
        raise UnitError(f"unsupported specifier %{m.group(1)} in {text!r}")
    return re.sub(r"%(.)", one, text)


def expand(word: str, env: dict[str, str]) -> str:
    """ExecStart's variables: `$$` is a literal $, ${NAME} and $NAME the unit's environment (or "")."""
    return re.sub(r"\$(\$|\{(\w+)\}|(\w+))",
                  lambda m: "$" if m.group(1) == "$" else env.get(m.group(2) or m.group(3), ""), word)


def _logical_lines(text: str) -> list[str]:
    """The unit's settings as systemd reads them: stripped, comments dropped, and a line ending in a
    backslash joined to the next with a space (so a value ending in one swallows the next line)."""
    out: list[str] = []
    pending: str | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if pending is None and (not line or line[0] in "#;"):
            continue
        if pending is not None:
            line = pending + " " + line
        if line.endswith("\\"):
            pending = line[:-1]
            continue
        pending = None
        out.append(line)
    if pending is not None:
        out.append(pending)
    return out


def parse(text: str) -> dict[str, object]:
    """The [Service] settings that run the unit, as systemd reads them."""
    section, service, env = "", {}, {}                       # type: ignore[var-annotated]
    posts: list[list[str]] = []
    for line in _logical_lines(text):
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        if "=" not in line:
            raise UnitError(f"not an assignment: {line!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        if section == "Unit" and key == "Description":
            service["description"] = specifiers(value)
        if section != "Service":
            continue
        if key == "Environment":
            for word in split(specifiers(value)):
                name, _, val = word.partition("=")
                env[name] = val
        elif key in ("ExecStart", "ExecStartPost"):
            argv = split(specifiers(value))
            if not argv or not argv[0].startswith("/"):
                raise UnitError(f"{key}= must start with an absolute path: {value!r}")
            if key == "ExecStart":
                service["argv"] = argv
            else:
                posts.append(argv)
        elif key == "WorkingDirectory":
            service["cwd"] = specifiers(value)
        elif key == "ReadWritePaths":
            # A path list: quoting and specifiers, no variable (systemd expands those in command lines only).
            service["writable"] = [*service.get("writable", []), *split(specifiers(value))]  # type: ignore[misc]
        elif key in ("Restart", "RestartSec", "Type", "TimeoutStopSec"):
            service[key] = value
        elif key in ("User", "Group"):
            service[key.lower()] = specifiers(value)
    if "argv" not in service:
        raise UnitError("no ExecStart=")
    if service.get("Type", "simple") != "simple":
        raise UnitError(f"Type={service['Type']}: the stand-in runs Type=simple only")
    env_all = {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", **env}
    service["env"] = env_all
    # systemd expands no variable in the executable itself, only in its arguments.
    service["argv"] = [w if i == 0 else expand(w, env_all)                # type: ignore[union-attr]
                       for i, w in enumerate(service["argv"])]            # type: ignore[arg-type]
    service["posts"] = [[w if i == 0 else expand(w, env_all) for i, w in enumerate(argv)] for argv in posts]
    return service


# -- the manager --------------------------------------------------------------------------------

class Manager:
    def __init__(self, units: str, state: str) -> None:
        self.units, self.state = units, state

    def name(self, unit: str) -> str:
        return unit if "." in unit else unit + ".service"

    def dir(self, name: str) -> str:
        path = os.path.join(self.state, name)
        os.makedirs(path, exist_ok=True)
        return path

    def loaded(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.state, "loaded", name)) as fh:
                return fh.read()
        except OSError:
            return None

    def on_disk(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.units, name)) as fh:
                return fh.read()
        except OSError:
            return None

    def read(self, name: str, what: str, default: str = "") -> str:
        try:
            with open(os.path.join(self.state, name, what)) as fh:
                return fh.read().strip()
        except OSError:
            return default

    def journal(self, name: str, line: str, ident: str = "systemd[1]") -> None:
        """A journal line as `journalctl` shows it: time, host, who said it (systemd itself, or the
        service's process by its name and pid), the message."""
        with open(os.path.join(self.dir(name), "journal"), "a") as fh:
            fh.write(f"{time.strftime('%b %d %H:%M:%S')} {socket.gethostname()} {ident}: {line}\n")

    def alive(self, pid: str) -> bool:
        if not pid.isdigit():
            return False
        try:
            with open(f"/proc/{pid}/stat") as fh:
                return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except OSError:
            return False

    def status(self, name: str) -> str:
        """running | auto-restart | failed | dead; a supervisor that is gone left its last word."""
        status = self.read(name, "status", "dead")
        if status in ("running", "auto-restart") and not self.alive(self.read(name, "supervisor")):
            return "dead"
        return status

    # verbs

    def daemon_reload(self) -> int:
        folder = os.path.join(self.state, "loaded")
        os.makedirs(folder, exist_ok=True)
        on_disk = {n for n in os.listdir(self.units) if n.endswith(".service")} if os.path.isdir(self.units) else set()
        for name in os.listdir(folder):
            if name not in on_disk:
                os.unlink(os.path.join(folder, name))
        for name in on_disk:
            text = self.on_disk(name) or ""
            with open(os.path.join(folder, name), "w") as fh:
                fh.write(text)
            for number, kind, who in special_users(text):
                self.journal(name, f"{os.path.join(self.units, name)}:{number}: Special {kind} {who} configured, "
                                   "this is not safe!")
        return 0

    def enable(self, names: list[str]) -> int:
        for name in names:
            path = os.path.join(self.units, name)
            if not os.path.exists(path):
                print(f"Failed to enable unit: Unit file {name} does not exist.", file=sys.stderr)
                return 1
            link = os.path.join(self.units, WANTS, name)
            if not os.path.islink(link):
                os.makedirs(os.path.dirname(link), exist_ok=True)
                os.symlink(path, link)
                print(f"Created symlink {link} \u2192 {path}.", file=sys.stderr)
        return 0

    def disable(self, names: list[str], now: bool) -> int:
        for name in names:
            link = os.path.join(self.units, WANTS, name)
            if os.path.islink(link):
                os.unlink(link)
                print(f"Removed \"{link}\".", file=sys.stderr)
            if now:
                self.stop(name)
        return 0

    def start(self, name: str) -> int:
        text = self.loaded(name)
        if text is None:
            print(f"Failed to start {name}: Unit {name} not found.", file=sys.stderr)
            return 5
        if self.on_disk(name) != text:
            print(f"Warning: The unit file, source configuration file or drop-ins of {name} changed on disk. "
                  "Run 'systemctl daemon-reload' to reload units.", file=sys.stderr)
        if self.status(name) in ("running", "auto-restart"):
            return 0
        try:
            service = parse(text)
        except UnitError as err:
            print(f"Failed to start {name}: Unit {name} has a bad unit file setting ({err}).", file=sys.stderr)
            return 1
        folder = self.dir(name)
        with open(os.path.join(folder, "service.json"), "w") as fh:
            json.dump(service, fh)
        for stale in ("pid", "supervisor", "stopping"):
            try:
                os.unlink(os.path.join(folder, stale))
            except OSError:
                pass
        with open(os.path.join(folder, "status"), "w") as fh:
            fh.write("running\n")
        supervisor = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--supervise", self.units,
                                       self.state, name], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        with open(os.path.join(folder, "supervisor"), "w") as fh:
            fh.write(str(supervisor.pid))
        deadline = time.monotonic() + 10
        while not self.read(name, "pid") and supervisor.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)                                   # forked: Type=simple counts it started
        for argv in service["posts"]:                          # type: ignore[attr-defined]
            subprocess.run(argv, env=service["env"], cwd=service.get("cwd") or "/",  # type: ignore[arg-type]
                           stdin=subprocess.DEVNULL, **credentials(service))   # type: ignore[arg-type]
        return 0

    def stop(self, name: str) -> int:
        supervisor = self.read(name, "supervisor")
        if not self.alive(supervisor):
            return 0
        with open(os.path.join(self.dir(name), "stopping"), "w") as fh:
            fh.write("1")
        try:
            os.killpg(int(supervisor), signal.SIGTERM)
        except ProcessLookupError:
            return 0
        if self.gone(supervisor, STOP_TIMEOUT_S):
            return 0
        # As systemd: SIGKILL once TimeoutStopSec is out, and the stop returns only when the process
        # is gone, so a restart never finds the old one still dying (and skips its start).
        self.journal(name, f"{name}: State 'stop-sigterm' timed out. Killing.")
        self.journal(name, f"{name}: Killing process {self.read(name, 'pid') or supervisor} with signal SIGKILL.")
        try:
            os.killpg(int(supervisor), signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.gone(supervisor, STOP_TIMEOUT_S)
        self.journal(name, f"{name}: Failed with result 'timeout'.")
        with open(os.path.join(self.dir(name), "status"), "w") as fh:
            fh.write("failed\n")
        return 0

    def gone(self, pid: str, within: float) -> bool:
        """Whether the process `pid` ends within `within` seconds."""
        deadline = time.monotonic() + within
        while self.alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.alive(pid)

    def show(self, name: str) -> dict[str, str]:
        status = self.status(name)
        active = {"running": "active", "auto-restart": "activating", "failed": "failed"}.get(status, "inactive")
        pid = self.read(name, "pid")
        loaded = self.loaded(name) is not None
        enabled = os.path.islink(os.path.join(self.units, WANTS, name))
        return {"LoadState": "loaded" if loaded else "not-found", "ActiveState": active, "SubState": status,
                "MainPID": pid if status == "running" and self.alive(pid) else "0",
                "UnitFileState": ("enabled" if enabled else "disabled") if self.on_disk(name) is not None else "",
                "FragmentPath": os.path.join(self.units, name) if loaded else ""}


# Shells systemd takes for "no login" (is_nologin_shell): it sets no SHELL= for a user who has one.
NOLOGIN_SHELLS = ("/bin/nologin", "/sbin/nologin", "/usr/bin/nologin", "/usr/sbin/nologin", "/bin/false",
                  "/usr/bin/false", "/bin/true", "/usr/bin/true")
NOBODY = 65534


def credentials(service: dict[str, object]) -> dict[str, object]:
    """User= and Group= as systemd applies them: the user's uid, its primary group unless Group=
    says another, its supplementary groups, and USER, LOGNAME, HOME and SHELL as systemd 252 sets
    them (get_user_creds with USER_CREDS_CLEAN): no HOME for an empty or `/` home, no SHELL for a
    nologin shell, neither for `nobody` (whose record systemd makes up itself), root's HOME /root.
    A user that does not exist raises KeyError: the start fails with systemd's 217/USER."""
    user = service.get("user")
    if not user:
        return {}
    import grp
    import pwd
    entry = pwd.getpwnam(str(user))
    group = service.get("group") or grp.getgrgid(entry.pw_gid).gr_name
    env = service["env"]
    assert isinstance(env, dict)
    env.update(USER=entry.pw_name, LOGNAME=entry.pw_name)
    home: str | None = entry.pw_dir
    shell: str | None = entry.pw_shell
    if entry.pw_uid == 0:
        home = "/root"
    elif entry.pw_uid == NOBODY:
        home = shell = None
    if not home or home == "/" or not home.startswith("/"):
        home = None
    if not shell or not shell.startswith("/") or shell in NOLOGIN_SHELLS:
        shell = None
    env.update({k: v for k, v in (("HOME", home), ("SHELL", shell)) if v})
    return {"user": entry.pw_uid, "group": grp.getgrnam(str(group)).gr_gid,
            "extra_groups": os.getgrouplist(entry.pw_name, entry.pw_gid)}


def special_users(text: str) -> list[tuple[int, str, str]]:
    """User=/Group= lines naming systemd's `nobody` or `nogroup` (line number, kind, name), which
    systemd warns about each time it loads the unit."""
    found = []
    for number, raw in enumerate(text.splitlines(), 1):
        key, _, value = raw.strip().partition("=")
        if key in ("User", "Group") and value.strip() in (("nobody", str(NOBODY)) if key == "User"
                                                          else ("nogroup", str(NOBODY))):
            found.append((number, "user" if key == "User" else "group", value.strip()))
    return found


def supervise(manager: Manager, name: str) -> None:
    """Run the unit's process; on Restart=on-failure start it again after RestartSec when it fails."""
    folder = manager.dir(name)
    with open(os.path.join(folder, "service.json")) as fh:
        service = json.load(fh)
    described = f" - {service['description']}" if service.get("description") else ""
    child: list[subprocess.Popen[bytes]] = []

    def status(word: str) -> None:
        with open(os.path.join(folder, "status"), "w") as fh:
            fh.write(word + "\n")

    def term(*_: object) -> None:
        if child and child[0].poll() is None:
            return            # the group's SIGTERM reached the process too (once, as systemd sends it):
                              # its wait below returns when it ends, and sees `stopping`
        manager.journal(name, f"Stopped {name}{described}.")  # between two starts (auto-restart)
        status("dead")
        os._exit(0)
    signal.signal(signal.SIGTERM, term)
    restarts = 0
    while True:
        manager.journal(name, f"Started {name}{described}.")
        # As systemd: the start succeeded once forked; a User= naming no one (217/USER) or a program
        # that is not there (203/EXEC) is the main process exiting with that code, journalled and
        # restarted like any other failure.
        try:
            proc = subprocess.Popen(service["argv"], env=service["env"], cwd=service.get("cwd") or "/",
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    **credentials(service))
        except KeyError:             # User=/Group= names no one
            code = 217
        except OSError as err:       # the child says why, under its name: `(` the path's last 8 chars `)`
            path = str(service["argv"][0])                                     # type: ignore[index]
            child_ident = f"({os.path.basename(path)[-8:]})[{os.getpid()}]"
            why = "Failed to locate executable" if err.errno == errno.ENOENT else "Failed to execute"
            manager.journal(name, f"{name}: {why} {path}: {err.strerror}", child_ident)
            manager.journal(name, f"{name}: Failed at step EXEC spawning {path}: {err.strerror}", child_ident)
            code = 203
        else:
            child[:] = [proc]
            with open(os.path.join(folder, "pid"), "w") as fh:
                fh.write(str(proc.pid))
            ident = f"{os.path.basename(service['argv'][0])}[{proc.pid}]"    # as journald names it
            for raw in proc.stdout:                                           # type: ignore[union-attr]
                manager.journal(name, raw.decode("utf-8", "replace").rstrip("\n"), ident)
            code = proc.wait()
        if os.path.exists(os.path.join(folder, "stopping")):
            os.unlink(os.path.join(folder, "stopping"))
            manager.journal(name, f"Stopped {name}{described}.")
            status("dead")
            return
        if code == 0:
            manager.journal(name, f"{name}: Deactivated successfully.")
            status("dead")
            return
        manager.journal(name, f"{name}: Main process exited, {exited(code)}")
        manager.journal(name, f"{name}: Failed with result '{'signal' if code < 0 else 'exit-code'}'.")
        if service.get("Restart") not in ("on-failure", "always"):
            status("failed")
            return
        status("auto-restart")
        restarts += 1
        time.sleep(float(service.get("RestartSec", "0.1") or 0.1))
        manager.journal(name, f"{name}: Scheduled restart job, restart counter is at {restarts}.")
        status("running")


def main(tool: str, args: list[str], units: str, state: str) -> int:
    manager = Manager(units, state)
    if tool == "journalctl":
        bare = args[-3:-1] == ["-o", "cat"]     # the message alone, without time, host and who said it
        if bare:
            args = args[:-3] + args[-1:]
        if len(args) == 5 and args[0] == "-u" and args[2] == "-n" and args[4] == "--no-pager":
            name = manager.name(args[1])
            try:
                with open(os.path.join(state, name, "journal"), errors="replace") as fh:
                    lines = fh.read().splitlines()
            except OSError:
                lines = []
            for line in lines[-int(args[3]):]:
                print(line.split(": ", 1)[1] if bare and ": " in line else line)
            if not lines:
                print("-- No entries --")
            return 0
        print(f"journalctl stand-in: unsupported arguments {args!r}", file=sys.stderr)
        return 2
    verb, rest = (args[0], args[1:]) if args else ("", [])
    names = [manager.name(a) for a in rest if not a.startswith("-")]
    if verb == "daemon-reload":
        return manager.daemon_reload()
    if verb == "enable":
        return manager.enable(names)
    if verb == "disable":
        return manager.disable(names, "--now" in rest)
    if verb in ("start", "stop", "restart"):
        code = 0
        for name in names:
            if verb in ("stop", "restart"):
                manager.stop(name)
            if verb in ("start", "restart"):
                code = manager.start(name) or code
        return code
    if verb == "is-active":
        state_word = manager.show(names[0])["ActiveState"]
        print(state_word)
        return 0 if state_word == "active" else 3
    if verb == "is-enabled":
        word = manager.show(names[0])["UnitFileState"]
        if not word:
            print(f"Failed to get unit file state for {names[0]}: No such file or directory", file=sys.stderr)
            return 1
        print(word)
        return 0 if word == "enabled" else 1
    if verb == "show":
        wanted = [a.split("=", 1)[1] for a in rest if a.startswith("--property=")]
        wanted = [p for w in wanted for p in w.split(",")]
        value_only = "--value" in rest
        if not names:
            print("stand-in" if value_only else "Version=stand-in")
            return 0
        for i, name in enumerate(names):
            props = manager.show(name)
            if i:
                print()
            for key in sorted(wanted or list(props), key=lambda k: SHOW_ORDER.index(k) if k in SHOW_ORDER else 99):
                print(props.get(key, "") if value_only else f"{key}={props.get(key, '')}")
        return 0
    print(f"systemctl stand-in: unsupported arguments {args!r}", file=sys.stderr)
    return 2


if __name__ == "__main__" and sys.argv[1:2] == ["--supervise"]:
    supervise(Manager(sys.argv[2], sys.argv[3]), sys.argv[4])


def stop_all(state: str) -> None:
    """Stop every unit's process group (a test host's teardown)."""
    manager = Manager("/nonexistent", state)
    for name in os.listdir(state) if os.path.isdir(state) else ():
        if name != "loaded":
            manager.stop(name)
