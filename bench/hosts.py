"""The bench's hosts: one set of sandbox GPU hosts behind real sshd servers per tool, reset at will."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for extra in (REPO, REPO / "tests"):  # the provisioner package and the real-sshd harness
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from provisioner.sandbox.host import SandboxHost, make_sandbox_host  # noqa: E402
from provisioner.sandbox.world import World  # noqa: E402
from sshd import SshdFleet, SshdHost  # noqa: E402


@dataclass(frozen=True)
class BenchHost:
    """A sandbox host (ComfyUI tree + venv + nvidia-smi) reached through its own sshd."""

    sandbox: SandboxHost
    sshd: SshdHost

    @property
    def name(self) -> str:
        return self.sshd.name


@dataclass
class ToolFleet:
    """The hosts one tool works on; `fleet` holds their ssh_config, known_hosts and client key."""

    tool: str
    root: Path
    fleet: SshdFleet
    hosts: list[BenchHost]
    world: World

    def reset(self) -> None:
        """Back to the state before a first converge: a fresh ComfyUI tree and venv on every host."""
        for h in self.hosts:
            _fresh_sandbox(h.sandbox.root, self.world)

    def log_marks(self) -> list[int]:
        return [h.sshd.log_size() for h in self.hosts]

    def counts(self, marks: Sequence[int]) -> tuple[float, float]:
        """Mean SSH connections and session channels (exec/sftp) per host since `marks`.

        A connection is a client port that authenticated or opened a session: sshd's monitor and
        session processes log separately, so under load one line can land after the other.
        """
        previous = None
        for _ in range(20):   # until two reads 0.2 s apart agree: the children log asynchronously
            time.sleep(0.2)
            now = [_log_counts(h.sshd.log, m) for h, m in zip(self.hosts, marks)]
            if now == previous:
                break
            previous = now
        n = len(self.hosts)
        return sum(c for c, _ in now) / n, sum(s for _, s in now) / n

    def stop(self) -> None:
        self.fleet.stop_all()


_ACCEPTED = re.compile(r"^Accepted publickey for \S+ from \S+ port (\d+)", re.M)
_SESSION = re.compile(r"^Starting session: .* port (\d+) id \d+\r?$", re.M)


def _log_counts(log: Path, mark: int) -> tuple[int, int]:
    """(connections, sessions) in an sshd VERBOSE log after byte offset `mark`."""
    with open(log, "rb") as f:
        f.seek(mark)
        text = f.read().decode(errors="replace")
    sessions = _SESSION.findall(text)
    return len(set(_ACCEPTED.findall(text)) | set(sessions)), len(sessions)


def _fresh_sandbox(root: Path, world: World) -> SandboxHost:
    if root.exists():
        shutil.rmtree(root)
    host = make_sandbox_host(root, gpu="rtx3090", torch="2.6.0+cu124",
                             venv_template=world.venv_template)
    return host


def make_tool_fleet(tool: str, n: int, root: Path, world: World) -> ToolFleet:
    """`n` sandbox hosts for `tool`, each behind an sshd whose PATH starts with the host's bin dir."""
    root.mkdir(parents=True, exist_ok=True)
    names = [f"{tool[:4]}-{i + 1:02d}" for i in range(n)]
    sandboxes = [_fresh_sandbox(root / "hosts" / name, world) for name in names]
    fleet = SshdFleet(root / "sshd")
    servers = fleet.add(n, names=names, bin_dirs=[s.bin_dir for s in sandboxes])
    hosts = [BenchHost(s, h) for s, h in zip(sandboxes, servers)]
    return ToolFleet(tool, root, fleet, hosts, world)


def ssh_argv(fleet: ToolFleet, host: BenchHost, *command: str) -> list[str]:
    """OpenSSH client argv for `host` with the fleet's config (strict host keys, no agent)."""
    return ["ssh", "-F", str(fleet.fleet.ssh_config), "-o", f"UserKnownHostsFile={fleet.fleet.known_hosts}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", host.name, *command]


def floor_seconds(fleet: ToolFleet) -> float:
    """Wall time of `ssh host true` on every host of the fleet, all in parallel."""
    started = time.perf_counter()
    procs = [subprocess.Popen(ssh_argv(fleet, h, "true"), stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for h in fleet.hosts]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"ssh floor failed: {err.decode(errors='replace').strip()}")
    return time.perf_counter() - started
