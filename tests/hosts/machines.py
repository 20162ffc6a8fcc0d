"""Real hosts for the hosts tier: a Debian rootfs booted by `systemd-nspawn` (PID 1 real systemd,
real journald, real sshd on 127.0.0.1:PORT) and a `dockerd` started by hand.

The recipe, measured on this kind of machine (2 cores, root, a hybrid cgroup v1 layout, no system
bus, no machined):
- The rootfs is built once per machine with debootstrap from the mirror apt already uses (read from
  /etc/apt at run time) and cached under `PROVISION_HOSTS_CACHE` (default ~/.cache/provision-hosts),
  in a folder named by a hash of what it holds; it counts once its manifest is written. Each host
  boots a copy of it (`cp -a --reflink=auto`), never the cache itself.
- Before the first boot: hostname, machine id, the units masked that would touch the shared network
  or take port 22, sshd on 127.0.0.1:PORT (key only, the fleet's host key and client key).
- nspawn runs in a cgroup scope of its own (`machine.slice/machine-NAME.scope` in the named systemd
  and the unified hierarchies) with `--register=no --keep-unit`: without a system bus that is what
  boots. The host network is shared, so a port inside is a port here.
- Stop: `systemctl poweroff` over ssh, the nspawn pid awaited (bounded), then TERM/KILL of that pid
  only, and the empty cgroups removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sshd import SshdFleet, SshdHost

SUITE = "bookworm"
# The recipe's packages: systemd as PID 1, sshd, python3 and its venv module, git (checkouts), the
# tools provision's steps call on a host.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "python3-venv", "git",
            "iproute2", "procps", "ca-certificates", "curl", "sudo")
# What would touch the shared network, take port 22 or run timers during a test.
MASKED = ("systemd-networkd.service", "systemd-networkd.socket", "systemd-networkd-wait-online.service",
          "ssh.socket", "apt-daily.timer", "apt-daily-upgrade.timer", "e2scrub_all.timer", "fstrim.timer",
          "getty@tty1.service", "systemd-timesyncd.service")
RECIPE = 1                       # bump when the build steps change in a way the inputs do not show
MANIFEST = "provision-hosts.json"
CGROUP_ROOTS = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))
BOOT_TIMEOUT_S = 60.0            # 1-3 s on an idle machine; CI may be loaded
STOP_TIMEOUT_S = 30.0


def cache_dir() -> Path:
    return Path(os.environ.get("PROVISION_HOSTS_CACHE") or Path.home() / ".cache" / "provision-hosts").resolve()


def unable() -> str | None:
    """Why this machine cannot run the tier, or None."""
    if os.geteuid() != 0:
        return "needs root (systemd-nspawn, cgroups, dockerd)"
    for tool in ("systemd-nspawn", "debootstrap"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install systemd-container debootstrap)"
    if not all(os.access(root, os.W_OK) for root in CGROUP_ROOTS):
        return "needs writable /sys/fs/cgroup/systemd and /sys/fs/cgroup/unified (a hybrid cgroup layout)"
    if apt_mirror() is None:
        return "no Debian mirror in /etc/apt/sources.list.d or /etc/apt/sources.list"
    return None


# -- the rootfs ----------------------------------------------------------------------------------

def apt_mirror() -> str | None:
    """The Debian archive apt uses here (never written into the repository): the first `deb`
    source whose suites are plain release names (not -security, -updates)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources")) + \
        sorted(Path("/etc/apt/sources.list.d").glob("*.list")) + [Path("/etc/apt/sources.list")]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":                         # deb822 stanzas
            for stanza in re.split(r"\n\s*\n", text):
                fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
                suites = fields.get("Suites", "").split()
                if "deb" in fields.get("Types", "").split() and any("-" not in s for s in suites) \
                        and "debian-archive-keyring" in fields.get("Signed-By", "debian-archive-keyring"):
                    return fields["URIs"].split()[0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line).split()
                if len(words) >= 3 and words[0] == "deb" and "-" not in words[2] and "debian" in words[1]:
                    return words[1]
    return None


def rootfs_inputs() -> dict[str, object]:
    """Everything the cached rootfs holds: its key is a hash of this (not of the mirror: any
    mirror of the suite gives the same system)."""
    return {"recipe": RECIPE, "suite": SUITE, "variant": "minbase", "packages": list(PACKAGES),
            "masked": list(MASKED), "machine": platform.machine()}


@contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def rootfs(cache: Path, say: Callable[[str], None] = print) -> Path:
    """The cached base rootfs; built first (debootstrap, 1-3 minutes) when it is not there."""
    inputs = rootfs_inputs()
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    dest = cache / "rootfs" / key
    if (dest / MANIFEST).exists():
        return dest
    with locked(dest.with_suffix(".lock")):
        if (dest / MANIFEST).exists():
            return dest
        mirror = apt_mirror()
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log = dest.with_suffix(".log")
        say(f"building the hosts' Debian rootfs (once per machine, 1-3 minutes): {dest} (log: {log})")
        started = time.monotonic()
        with open(log, "w") as out:
            argv = ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(tmp), str(mirror)]
            if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                tail = log.read_text(errors="replace").strip().splitlines()[-3:]
                raise RuntimeError(f"debootstrap failed: {' | '.join(tail)} (log: {log})")
        _prepare_base(tmp)
        manifest = {**inputs, "build_seconds": round(time.monotonic() - started, 1)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        tmp.rename(dest)                                      # counts from here on
        say(f"built the rootfs in {manifest['build_seconds']} s")
    return dest


def _prepare_base(root: Path) -> None:
    """What every host shares: the masked units, sshd key-only on a port each host sets, no host
    keys of the build (each host gets its own), no package lists."""
    system = root / "etc" / "systemd" / "system"
    for unit in MASKED:
        link = system / unit
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to("/dev/null")
    for key in (root / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()
    (root / "etc" / "ssh" / "sshd_config.d").mkdir(exist_ok=True)
    (root / "etc" / "machine-id").write_text("")              # each host gets its own, before its boot
    shutil.rmtree(root / "var" / "lib" / "apt" / "lists", ignore_errors=True)
    (root / "var" / "lib" / "apt" / "lists" / "partial").mkdir(parents=True)
    shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (root / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True)


# -- a host --------------------------------------------------------------------------------------

@dataclass
class Machine:
    """One booted host: `root` its rootfs (this machine's view of its files), `sshd` its entry in
    the fleet (alias, port, host key; the server itself runs inside)."""

    name: str
    root: Path
    sshd: SshdHost
    binds: Sequence[Path] = ()
    process: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root.with_suffix(".console.log")

    @property
    def scopes(self) -> list[Path]:
        return [root / "machine.slice" / f"machine-{self.name}.scope" for root in CGROUP_ROOTS]

    def path(self, inside: str) -> Path:
        """A path of the host, as this machine sees it."""
        return self.root / inside.lstrip("/")

    def boot(self) -> None:
        """Boot it in its own cgroup scope and wait (bounded) until sshd answers and systemd says
        the system is running."""
        for scope in self.scopes:
            scope.mkdir(parents=True, exist_ok=True)
        procs = " ".join(str(scope / "cgroup.procs") for scope in self.scopes)
        nspawn = ["systemd-nspawn", "-q", "-b", "-D", str(self.root), "-M", self.name, "--register=no",
                  "--keep-unit", "--link-journal=no", "--resolv-conf=copy-host", "--console=read-only",
                  *(f"--bind-ro={path}" for path in self.binds)]
        with open(self.log, "ab") as out:
            # The launching shell moves itself into the scope, then becomes nspawn.
            self.process = subprocess.Popen(
                ["/bin/sh", "-c", f'for p in {procs}; do echo $$ > "$p"; done; exec "$@"', "sh", *nspawn],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name}: systemd-nspawn exited {self.process.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.sshd.port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: sshd did not listen on {self.sshd.port} within "
                                       f"{BOOT_TIMEOUT_S:g} s: {self.log.read_text(errors='replace')[-2000:]}")
                time.sleep(0.1)
        state = self.ssh("systemctl", "is-system-running", "--wait", timeout=max(5.0, deadline - time.monotonic()))
        if state.stdout.strip() != "running":
            failed = self.ssh("systemctl", "--failed", "--no-legend").stdout
            raise RuntimeError(f"{self.name}: system {state.stdout.strip() or state.stderr.strip()}: {failed}")

    def ssh(self, *argv: str, timeout: float = 60.0, check: bool = False,
            user: str = "root") -> subprocess.CompletedProcess[str]:
        """A command on the host through its sshd, as `user` (the system's ssh client, the fleet's
        ssh_config and known_hosts; the user's login shell there reads the line, so it is quoted)."""
        proc = subprocess.run(["ssh", "-F", str(self.sshd.ssh_config), "-o", "BatchMode=yes",
                               "-o", f"UserKnownHostsFile={self.sshd.known_hosts}", "-l", user,
                               "-o", "StrictHostKeyChecking=yes", self.sshd.name, "--", shlex.join(argv)],
                              capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.name}: {' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
        return proc

    def add_user(self, name: str) -> None:
        """A login user who may sudo without a password (as a fleet's deploy user, for `become`),
        logging in with the fleet's client key."""
        authorized = self.sshd.client_key.with_name(self.sshd.client_key.name + ".pub").read_text()
        self.ssh("useradd", "--create-home", "--shell", "/bin/bash", name, check=True)
        self.ssh("install", "-d", "-m", "700", "-o", name, "-g", name, f"/home/{name}/.ssh", check=True)
        self.path(f"/home/{name}/.ssh/authorized_keys").write_text(authorized)
        self.ssh("chown", f"{name}:{name}", f"/home/{name}/.ssh/authorized_keys", check=True)
        self.path(f"/etc/sudoers.d/{name}").write_text(f"{name} ALL=(ALL) NOPASSWD: ALL\n")
        self.path(f"/etc/sudoers.d/{name}").chmod(0o440)

    def leftovers(self) -> list[str]:
        """What an apply started on the host that still runs: its supervisors (`python3 -I -S -c`
        reading their program from stdin) and the commands they ran (git, pip)."""
        rows = self.ssh("ps", "-eo", "args", "--no-headers", check=True).stdout.splitlines()
        return [row for row in rows if "sys.stdin" in row or " -m pip " in row
                or (row.split() or [""])[0].rsplit("/", 1)[-1] == "git"]

    def systemctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.ssh("systemctl", *args)

    def journal(self, unit: str = "comfyui", lines: int = 2000) -> str:
        return self.ssh("journalctl", "-u", unit, "-n", str(lines), "--no-pager").stdout

    def stop(self) -> None:
        """Power off (bounded), then TERM/KILL the nspawn pid only; remove its cgroups."""
        proc = self.process
        if proc is not None and proc.poll() is None:
            try:
                self.ssh("systemctl", "poweroff", "--no-block", timeout=10)
            except subprocess.TimeoutExpired:
                pass
            for sig, wait in ((None, STOP_TIMEOUT_S), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
                if sig is not None:
                    proc.send_signal(sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        self.process = None
        for scope in self.scopes:
            remove_cgroup(scope)
            remove_cgroup(scope.parent)                          # machine.slice, once no host is left
        # nspawn cannot remove its mount-propagation folder when /run is on the root file system.
        propagate = Path("/run/systemd/nspawn/propagate") / self.name
        if propagate.is_dir() and not os.path.ismount(propagate):
            shutil.rmtree(propagate, ignore_errors=True)


def remove_cgroup(path: Path) -> None:
    """Remove a cgroup and the (empty) groups below it, deepest first; one in use stays."""
    if not path.is_dir():
        return
    for sub in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        try:
            sub.rmdir()
        except OSError:
            pass
    try:
        path.rmdir()
    except OSError:
        pass


def make_machine(fleet: SshdFleet, base: Path, hosts_dir: Path, name: str, *,
                 binds: Sequence[Path] = ()) -> Machine:
    """A copy of `base` made into host `name`: its own hostname, machine id, host key (the fleet's,
    in known_hosts) and sshd port; root logs in with the fleet's client key. Not booted yet."""
    (sshd,) = fleet.add(1, names=[name], start=False)
    sshd.user = "root"
    fleet.write_ssh_config()
    root = hosts_dir / name
    shutil.rmtree(root, ignore_errors=True)
    hosts_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", "--reflink=auto", str(base), str(root)], check=True)
    (root / MANIFEST).unlink()
    (root / "etc" / "hostname").write_text(name + "\n")
    subprocess.run(["systemd-machine-id-setup", f"--root={root}"], check=True, capture_output=True)
    ssh = root / "etc" / "ssh"
    shutil.copy(sshd.host_key, ssh / "provision_host_ed25519")
    shutil.copy(sshd.host_key_pub, ssh / "provision_host_ed25519.pub")
    (ssh / "provision_host_ed25519").chmod(0o600)
    (ssh / "sshd_config.d" / "provision-test.conf").write_text("\n".join([
        f"Port {sshd.port}", "ListenAddress 127.0.0.1", "HostKey /etc/ssh/provision_host_ed25519",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "AllowTcpForwarding yes", ""]))
    dot_ssh = root / "root" / ".ssh"
    dot_ssh.mkdir(mode=0o700, exist_ok=True)
    (dot_ssh / "authorized_keys").write_text(fleet.authorized_keys.read_text())
    return Machine(name, root, sshd, binds)


# -- a Docker daemon -----------------------------------------------------------------------------

LABEL = "provision-hosts"        # every container the tier starts carries it


@dataclass
class Dockerd:
    """A dockerd started by hand, with the recipe's flags (no bridge, no iptables: containers use
    `--network host`), its own socket, exec root and cgroup parent, and a data root kept in the cache
    (the images imported from the rootfs stay between runs). `stop()` removes the tier's containers,
    then stops the daemon by its pid and cleans what dockerd 20.10 leaves behind."""

    data_root: Path
    run_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"unix://{self.run_dir / 'docker.sock'}"

    @property
    def cgroup_parent(self) -> str:
        return f"{LABEL}-{os.getpid()}"

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.data_root.mkdir(parents=True, exist_ok=True)
        log = open(self.run_dir / "dockerd.log", "ab")
        self.process = subprocess.Popen(
            ["dockerd", "--pidfile", str(self.run_dir / "dockerd.pid"), "--host", self.host,
             "--data-root", str(self.data_root), "--exec-root", str(self.run_dir / "exec"),
             "--cgroup-parent", self.cgroup_parent, "--storage-driver", "overlay2", "--iptables=false",
             "--ip-forward=false", "--ip-masq=false", "--bridge=none"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + BOOT_TIMEOUT_S
        while self.docker("info", check=False).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                text = (self.run_dir / "dockerd.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"dockerd did not answer within {BOOT_TIMEOUT_S:g} s: {text}")
            time.sleep(0.2)

    def docker(self, *args: str, check: bool = True, timeout: float = 600,
               stdin: object = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["docker", "--host", self.host, *args], capture_output=True, text=True,
                              timeout=timeout, stdin=stdin)          # type: ignore[call-overload]
        if check and proc.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {proc.stderr.strip()[-2000:]}")
        return proc

    def has_image(self, tag: str) -> bool:
        return self.docker("image", "inspect", tag, check=False).returncode == 0

    def import_rootfs(self, rootfs: Path) -> str:
        """The rootfs as an image (no registry: `docker import` of its tar), once per rootfs."""
        tag = f"local/{LABEL}:{rootfs.name}"
        if not self.has_image(tag):
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
            try:
                self.docker("import", "-c", 'CMD ["/bin/bash"]', "-", tag, stdin=tar.stdout)
            finally:
                tar.stdout.close()                                   # type: ignore[union-attr]
                tar.wait()
        return tag

    def stop(self) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.poll() is None:
            ids = self.docker("ps", "-aq", "--filter", f"label={LABEL}", check=False).stdout.split()
            if ids:
                self.docker("rm", "-f", *ids, check=False, timeout=120)
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.process = None
        netns = self.run_dir / "exec" / "netns" / "default"
        if os.path.ismount(netns):
            subprocess.run(["umount", str(netns)], check=False)
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            remove_cgroup(hierarchy / self.cgroup_parent)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def comfyui_image(daemon: Dockerd, base: str, comfyui_repo: Path, wheelhouse: Path, tag: str,
                  torch: Sequence[str], extra: Sequence[str], say: Callable[[str], None] = print) -> str:
    """An image of `base` holding ComfyUI `tag` in /opt/ComfyUI and its venv, built with the
    image's own python3 from `wheelhouse` (offline); made once, named by a hash of its inputs."""
    inputs = {"recipe": RECIPE, "base": base, "comfyui": tag, "wheelhouse": wheelhouse.name,
              "torch": list(torch), "extra": list(extra)}
    image = f"local/{LABEL}-comfyui:{hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]}"
    if daemon.has_image(image):
        return image
    say(f"building the ComfyUI {tag} image (once per machine, a few minutes): {image}")
    started = time.monotonic()
    builder = f"{LABEL}-build-{os.getpid()}"
    pip_install = f"venv/bin/pip install -q --no-index --find-links {wheelhouse}"
    script = "\n".join([
        "set -e", f"git clone -q --no-checkout {comfyui_repo} /opt/ComfyUI", "cd /opt/ComfyUI",
        f"git checkout -q --detach {tag}", "python3 -m venv venv",
        " ".join([pip_install, *(f"'{pin}'" for pin in torch)]),       # the tier's pins: no quote inside
        " ".join([pip_install, "-r requirements.txt", *(f"'{pin}'" for pin in extra)])])
    try:
        daemon.docker("run", "--name", builder, "--label", LABEL, "--network", "none",
                      "-v", f"{comfyui_repo}:{comfyui_repo}:ro", "-v", f"{wheelhouse}:{wheelhouse}:ro",
                      base, "/bin/sh", "-c", script, timeout=1800)
        daemon.docker("commit", "--change", "WORKDIR /opt/ComfyUI", builder, image)
    finally:
        daemon.docker("rm", "-f", builder, check=False)
    say(f"built the ComfyUI image in {time.monotonic() - started:.0f} s")
    return image
