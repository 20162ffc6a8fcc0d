"""Real OpenSSH servers on 127.0.0.1 for tests: own host keys, one client key, ssh_config, known_hosts.

Each call of `SshdFleet.add(...)` starts N `sshd -D` processes on free loopback ports. Every server
has its own ed25519 host key and its own PATH (a per-host bin dir first, so each host can carry its
own `nvidia-smi` or `docker` stand-in); the fleet shares one client key, one `known_hosts` and one
`ssh_config` with a `Host` alias per server, exactly what a user's ~/.ssh would hold.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from provisioner.connection import ConnectOptions
from provisioner.config.inventory import Host

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, comment: str = "provision-test", kind: str = "ed25519") -> None:
    """A fresh passphrase-less key of `kind` (ed25519, rsa) at `path` (and `path`.pub)."""
    for p in (path, path.with_name(path.name + ".pub")):
        p.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)],
                   check=True)


def fingerprint(pub_path: Path) -> str:
    """OpenSSH's `SHA256:...` fingerprint of a public key file."""
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", str(pub_path)],
                         check=True, capture_output=True, text=True).stdout
    return out.split()[1]


@dataclass
class SshdHost:
    """One running sshd; `name` is its alias in the fleet's ssh_config."""

    name: str
    port: int
    dir: Path
    bin_dir: Path
    ssh_config: Path
    known_hosts: Path
    client_key: Path
    user: str = field(default_factory=getpass.getuser)
    process: subprocess.Popen[bytes] | None = None
    key_type: str = "ed25519"

    @property
    def host_key(self) -> Path:
        return self.dir / f"host_{self.key_type}"

    @property
    def host_key_pub(self) -> Path:
        return self.dir / f"host_{self.key_type}.pub"

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    @property
    def config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.host_key_pub)

    @property
    def known_hosts_line(self) -> str:
        kind, blob = self.host_key_pub.read_text().split()[:2]
        return f"[127.0.0.1]:{self.port} {kind} {blob}\n"

    def start(self) -> None:
        """Start sshd and wait until it accepts connections."""
        if self.process and self.process.poll() is None:
            return
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # privilege separation directory
        self.process = subprocess.Popen([SSHD, "-D", "-E", str(self.log), "-f", str(self.config)],
                                        stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd {self.name} exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"sshd {self.name} did not listen on port {self.port}")

    def stop(self) -> None:
        """Stop the listening sshd by its PID (open sessions end when their clients close)."""
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
        self.process = None

    def sessions(self) -> list[int]:
        """The sshd processes serving this server's open connections (children of its listener)."""
        if not self.process or self.process.poll() is not None:
            return []
        return [pid for pid in descendants(self.process.pid) if _comm(pid) == "sshd"]

    @contextmanager
    def frozen(self) -> Iterator[list[int]]:
        """Every open session stopped (SIGSTOP) with its TCP connection open, as a hung host or a
        dropped network looks to the controller; continued at the end. Yields their PIDs."""
        pids = self.sessions()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield pids
        finally:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGCONT)
                except ProcessLookupError:
                    pass

    def replace_host_key(self) -> str:
        """Give the server a new host key (known_hosts keeps the old one); returns the new fingerprint."""
        was_running = self.process is not None
        self.stop()
        keygen(self.host_key, f"host-{self.name}", self.key_type)
        if was_running:
            self.start()
        return self.fingerprint

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_size(self) -> int:
        """A mark to pass as `since=` so counts cover only what happened after it."""
        return self.log.stat().st_size if self.log.exists() else 0

    def log_since(self, since: int = 0) -> str:
        """The log from byte `since` (a `log_size()` mark) on: a byte offset, so sliced before
        decoding (a command line with non-ASCII text in it would shift a character offset)."""
        if not self.log.exists():
            return ""
        with open(self.log, "rb") as fh:
            fh.seek(since)
            return fh.read().decode(errors="replace")

    def count_connections(self, since: int = 0) -> int:
        return self.log_since(since).count("Accepted publickey for ")

    def count_sessions(self, since: int = 0) -> int:
        """Session channels started (exec, subsystem sftp), from sshd's VERBOSE log."""
        return self.log_since(since).count("Starting session: ")

    def wait_counts(self, connections: int, sessions: int, since: int = 0,
                    timeout: float = 20) -> tuple[int, int]:
        """Counts once sshd has logged at least the expected lines (its children log asynchronously,
        late on a loaded machine: the timeout only costs time when a count is wrong)."""
        deadline = time.monotonic() + timeout
        while True:
            got = (self.count_connections(since), self.count_sessions(since))
            if (got[0] >= connections and got[1] >= sessions) or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def host(self, *, via_config: bool = True, **fields: Any) -> Host:
        """An inventory Host for this server: by alias (ssh_config decides) or with explicit fields."""
        if via_config:
            return Host(name=self.name, **fields)
        base: dict[str, Any] = dict(address="127.0.0.1", port=self.port, user=self.user,
                                    key_file=str(self.client_key))
        return Host(name=self.name, **{**base, **fields})

    def options(self, **overrides: Any) -> ConnectOptions:
        base: dict[str, Any] = dict(known_hosts=(str(self.known_hosts),),
                                    ssh_config=str(self.ssh_config), connect_timeout=5)
        return ConnectOptions(**{**base, **overrides})


# Every fleet still alive, so a failing test can show what its servers said (conftest.py).
LIVE: weakref.WeakSet[SshdFleet] = weakref.WeakSet()

# The sshd log lines that say why a connection ended against provision's wishes.
ENDINGS = re.compile(r"Disconnect|nonexistent|unknown channel|fatal|error|signal|Timeout|refused|kex_|Bad ")


class SshdFleet:
    """All servers of one test (or session); one client key, ssh_config and known_hosts."""

    def __init__(self, root: Path) -> None:
        LIVE.add(self)
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.client_key = root / "id_ed25519"
        self.ssh_config = root / "ssh_config"
        self.known_hosts = root / "known_hosts"
        self.authorized_keys = root / "authorized_keys"
        self.hosts: list[SshdHost] = []
        keygen(self.client_key, "provision-test-client")
        self.authorized_keys.write_text((root / "id_ed25519.pub").read_text())
        self.known_hosts.touch()

    def add(self, n: int = 1, *, names: Sequence[str] | None = None,
            bin_dirs: Sequence[Path | None] | None = None, start: bool = True,
            trusted: bool = True, extra_config: str = "", sftp: str = "internal-sftp",
            key_type: str = "ed25519", env: Mapping[str, str] | None = None) -> list[SshdHost]:
        """Start `n` servers; `bin_dirs[i]` comes first on host i's PATH; `trusted` adds host keys;
        `sftp`: the sftp subsystem (a path: sshd starts it through the user's login shell);
        `key_type`: their host keys' (rsa: the one OpenSSH >= 8.8 verifies only with SHA-2); `env`:
        more variables every session gets (as a host's /etc/environment would give them)."""
        made = []
        for i in range(n):
            name = names[i] if names else f"gpu-{len(self.hosts) + 1:02d}"
            hdir = self.root / name
            hdir.mkdir()
            given = bin_dirs[i] if bin_dirs else None
            bin_dir = Path(given) if given else hdir / "bin"
            bin_dir.mkdir(parents=True, exist_ok=True)
            host = SshdHost(name, free_port(), hdir, bin_dir, self.ssh_config, self.known_hosts,
                            self.client_key, key_type=key_type)
            keygen(host.host_key, f"host-{name}", key_type)
            host.config.write_text(self._sshd_config(host, extra_config, sftp, env or {}))
            self.hosts.append(host)
            made.append(host)
            if trusted:
                with self.known_hosts.open("a") as f:
                    f.write(host.known_hosts_line)
        self.write_ssh_config()
        if start:
            for host in made:
                host.start()
        return made

    def write_ssh_config(self, extra: Mapping[str, str] | None = None) -> None:
        """One `Host` alias per server; `extra` maps a name to more lines (e.g. `ProxyJump gpu-01`)."""
        blocks = []
        for h in self.hosts:
            more = (extra or {}).get(h.name, "")
            blocks.append(f"Host {h.name}\n  HostName 127.0.0.1\n  Port {h.port}\n  User {h.user}\n"
                          f"  IdentityFile {self.client_key}\n{more}")
        self.ssh_config.write_text("\n".join(blocks))

    def _sshd_config(self, host: SshdHost, extra: str, sftp: str = "internal-sftp",
                     env: Mapping[str, str] | None = None) -> str:
        more_env = "".join(f" {key}={value}" for key, value in (env or {}).items())
        return "\n".join([
            f"Port {host.port}", "ListenAddress 127.0.0.1", f"HostKey {host.host_key}",
            f"PidFile {host.dir / 'sshd.pid'}", "LogLevel VERBOSE", "UsePAM no", "StrictModes no",
            "PermitRootLogin prohibit-password", "PubkeyAuthentication yes",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            # The fleet's file for us; a test user's own (tests/test_login_shells.py) for them.
            f"AuthorizedKeysFile {self.authorized_keys} .ssh/authorized_keys", "AllowTcpForwarding yes",
            # SHLVL=1: bash skips ~/.bashrc under sshd (Debian SSH_SOURCE_BASHRC), so every exec
            # sees exactly this PATH and pays no rc-file start-up.
            f"SetEnv PATH={host.bin_dir}:{SYSTEM_PATH} SHLVL=1{more_env}", f"Subsystem sftp {sftp}",
            extra, "",
        ])

    def stop_all(self) -> None:
        for h in self.hosts:
            h.stop()

    def endings(self, last: int = 12) -> str:
        """Each server's last lines that say why a connection ended (for a failed test's report)."""
        parts = []
        for h in self.hosts:
            lines = [line for line in h.log_text().splitlines() if ENDINGS.search(line)]
            if lines:
                parts.append(f"{h.name} ({h.log}):\n  " + "\n  ".join(lines[-last:]))
        return "\n".join(parts)


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    name_end = text.rindex(")")
    return [text[text.index("(") + 1:name_end], *text[name_end + 2:].split()]


def _comm(pid: int) -> str | None:
    stat = _stat(pid)
    return stat[0] if stat else None


def descendants(root: int) -> list[int]:
    """Every process below `root` (this machine's /proc)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            parents[int(entry)] = int(stat[2])
    found, frontier = [], {root}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier}
        found += sorted(frontier)
    return found


def listening(port: int) -> list[str]:
    """The addresses something listens on at `port`, from this machine's /proc/net/tcp{,6}."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for row in Path(table).read_text().splitlines()[1:]:
            cols = row.split()
            if cols[3] == "0A" and int(cols[1].split(":")[1], 16) == port:
                found.append(cols[1].split(":")[0])
    return found


def processes_with(marker: str) -> list[int]:
    """Live processes (not zombies) whose command line holds `marker`: what a test left running
    on the host (every test host is this machine)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        stat = _stat(int(entry))
        if marker.encode() in cmdline and stat is not None and stat[1] not in ("Z", "X"):
            found.append(int(entry))
    return found


def started_through(host: SshdHost, *, but: str = "provisioner.sandbox.comfyui") -> list[int]:
    """Live processes started through `host`'s sshd (its PATH is in their environment), but those
    whose command line holds `but` (a ComfyUI stand-in that a restart started there on purpose):
    what a stopped, timed-out or killed apply must not leave behind on the host."""
    mark = f"PATH={host.bin_dir}:".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
        except OSError:
            continue
        stat = _stat(int(entry))
        if (mark in environ and but.encode() not in cmdline and stat is not None
                and stat[1] not in ("Z", "X")):
            found.append(int(entry))
    return found


def wait_until(predicate: Any, timeout: float, step: float = 0.05) -> float:
    """Seconds until `predicate()` held; AssertionError past `timeout`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout:g}s: {getattr(predicate, '__doc__', None) or predicate}")
        time.sleep(step)
    return time.monotonic() - start


def inventory_for(hosts: Iterable[SshdHost], *, via_config: bool = False,
                  **vars: Any) -> dict[str, Any]:
    """An Ansible-style YAML inventory (as a dict) for these servers; `vars` go under `all.vars`."""
    entries: dict[str, Any] = {}
    for h in hosts:
        entries[h.name] = {} if via_config else {
            "ansible_host": "127.0.0.1", "ansible_port": h.port, "ansible_user": h.user,
            "ansible_ssh_private_key_file": str(h.client_key)}
    inventory: dict[str, Any] = {"all": {"hosts": entries}}
    if vars:
        inventory["all"]["vars"] = dict(vars)
    return inventory


def write_script(path: Path, body: str) -> Path:
    """An executable script (e.g. a per-host `nvidia-smi`)."""
    path.write_text(body)
    path.chmod(0o755)
    return path


DOCKER_STANDIN = '''#!{python}
# Stand-in for the Docker CLI + daemon (there is no Docker daemon on the test machine).
# Implements exactly what provision uses:
#   docker exec -i [-e K=V]... NAME cmd...   runs cmd in {root}/NAME with the container's env
#   docker inspect -f FORMAT NAME            prints {root}/NAME/ip (empty: host networking); for a
#                                            FORMAT of .State: {root}/NAME/state (default: running)
#   docker restart NAME                      runs {root}/NAME/on-restart if there is one
#   docker logs [--since T] --tail N NAME    the last N lines of {root}/NAME/log (T is not read)
#   docker stop -t N NAME                    writes {root}/NAME/state: exited
#   docker exec of a container whose state is not running fails as Docker's does
import hashlib, os, socket, subprocess, sys
root = {root!r}
args = sys.argv[1:]


def state(cdir):
    """`Status ExitCode RestartCount StartedAt`, as the test wrote it."""
    path = os.path.join(cdir, "state")
    return open(path).read().strip() if os.path.exists(path) else "running 0 0 2026-12-07T12:00:00Z"


if os.environ.get("DOCKER_STANDIN_CONTAINER"):  # a container has no docker CLI of its host
    sys.exit("sh: 1: docker: not found (inside container " + os.environ["DOCKER_STANDIN_CONTAINER"] + ")")
if args[:1] == ["inspect"] and len(args) == 4 and args[1] == "-f":
    cdir = os.path.join(root, args[3])
    if not os.path.isdir(cdir):
        sys.exit(f"Error: No such object: {{args[3]}}")
    if ".State" in args[2]:
        print(state(cdir))
        sys.exit(0)
    ip = os.path.join(cdir, "ip")
    print(open(ip).read().strip() if os.path.exists(ip) else "")
    sys.exit(0)
if args[:1] == ["restart"] and len(args) == 2:
    cdir = os.path.join(root, args[1])
    if not os.path.isdir(cdir):
        sys.exit(f"Error response from daemon: No such container: {{args[1]}}")
    hook = os.path.join(cdir, "on-restart")
    if os.path.exists(hook):
        subprocess.run([hook], check=True)
    print(args[1])
    sys.exit(0)
if args[:1] == ["stop"] and len(args) == 4 and args[1] == "-t":
    cdir = os.path.join(root, args[3])
    if not os.path.isdir(cdir):
        sys.exit(f"Error response from daemon: No such container: {{args[3]}}")
    started = state(cdir).split()[3]
    with open(os.path.join(cdir, "state"), "w") as fh:
        fh.write("exited 143 0 " + started + "\\n")
    print(args[3])
    sys.exit(0)
if args[:2] == ["logs", "--since"]:
    args = args[:1] + args[3:]
if args[:2] == ["logs", "--tail"] and len(args) == 4:
    log = os.path.join(root, args[3], "log")
    if not os.path.isdir(os.path.join(root, args[3])):
        sys.exit(f"Error response from daemon: No such container: {{args[3]}}")
    lines = open(log, errors="replace").read().splitlines() if os.path.exists(log) else []
    print("\\n".join(lines[-int(args[2]):]))
    sys.exit(0)
if args[:1] != ["exec"]:
    sys.exit(f"docker stand-in: unsupported command {{args!r}}")
args, interactive, env = args[1:], False, {{}}
while args and args[0].startswith("-"):
    if args[0] == "-i":
        interactive, args = True, args[1:]
    elif args[0] == "-e":
        key, _, value = args[1].partition("=")
        env[key], args = value, args[2:]
    else:
        sys.exit(f"docker stand-in: unsupported option {{args[0]}}")
name, cmd = args[0], args[1:]
cdir = os.path.join(root, name)
if not os.path.isdir(cdir):
    sys.exit(f"Error response from daemon: No such container: {{name}}")
if state(cdir).split()[0] != "running":  # Docker names it by its id
    ident = hashlib.sha256(name.encode()).hexdigest()
    sys.exit(f"Error response from daemon: Container {{ident}} is not running")
if not interactive:
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.chdir(cdir)
# A container on the host's network has the host's name (its own only on a network of its own).
hostname = socket.gethostname() if not os.path.exists(os.path.join(cdir, "ip")) else name
base = {{"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOSTNAME": hostname, "HOME": cdir,
        "DOCKER_STANDIN_CONTAINER": name}}
try:
    os.execvpe(cmd[0], cmd, {{**base, **env}})
except FileNotFoundError:  # as Docker 20.10 says it: on stdout, exit 126
    print(f'OCI runtime exec failed: exec failed: unable to start container process: exec: "{{cmd[0]}}": '
          "executable file not found in $PATH: unknown")
    sys.exit(126)
'''


def install_docker_standin(bin_dir: Path, root: Path, containers: Mapping[str, str | None]) -> Path:
    """Write the `docker` stand-in into `bin_dir`; `containers` maps a name to its IP (None: host net)."""
    for name, ip in containers.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        if ip is not None:
            (root / name / "ip").write_text(ip + "\n")
    return write_script(bin_dir / "docker", DOCKER_STANDIN.format(python=sys.executable,
                                                                 root=str(root)))


SERVICE_MANAGER = """#!{python}
# systemctl / journalctl of this host: tests/service_manager.py over the unit files in {units!r}.
import os, sys
sys.path.insert(0, {tests!r})
from service_manager import main
sys.exit(main(os.path.basename(sys.argv[0]), sys.argv[1:], {units!r}, {state!r}))
"""


def install_service_manager(bin_dir: Path, units: Path, state: Path) -> None:
    """`systemctl` and `journalctl` for a host without systemd as PID 1: tests/service_manager.py,
    reading the unit files written into `units` (the profile's `comfyui.unit_dir`), keeping its
    state (running units, journals) in `state`."""
    units.mkdir(parents=True, exist_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    text = SERVICE_MANAGER.format(python=sys.executable, tests=str(Path(__file__).parent), units=str(units),
                                  state=str(state))
    for tool in ("systemctl", "journalctl"):
        write_script(bin_dir / tool, text)


__all__ = ["SshdFleet", "SshdHost", "inventory_for", "install_docker_standin", "install_service_manager",
           "write_script", "descendants", "processes_with", "started_through", "wait_until",
           "keygen", "fingerprint", "free_port"]
