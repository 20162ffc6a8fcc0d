"""Facts: what a host is and has, as typed values parsed from the one facts round trip.

A missing piece (no GPU, no torch, no venv, no checkout) is a value (`None`, `exists=False`),
never an exception: planning decides what it means.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from provisioner.catalog.compat import PLUGIN_PROJECT
from provisioner.catalog.gpus import precision_for


@dataclass(frozen=True)
class Probe:
    """What the resources need to see beyond the base facts. Merged into one script run."""

    stat: tuple[str, ...] = ()                  # files: size, mtime, cached sha256
    read: tuple[str, ...] = ()                  # small text files: whole content
    grep: tuple[tuple[str, str], ...] = ()      # (path, needle): does the file contain it
    git: tuple[str, ...] = ()                   # checkouts: HEAD, tags at HEAD, dirty files, remote
    http: tuple[str, ...] = ()                  # URLs: HTTP status, or None when nothing answers
    show: tuple[tuple[str, str], ...] = ()      # (checkout, "refs/tags/T:file"): that file's text at T
    remote_tags: tuple[tuple[str, str, str], ...] = ()  # (checkout, repo, tag): repo's tags if checkout lacks tag
    headers: tuple[str, ...] = ()               # safetensors files: their header's __metadata__
    interpreters: tuple[str, ...] = ()          # pythons (a path, or a name on PATH): as the venv is read
    ports: tuple[int, ...] = ()                 # TCP ports: who listens on them, on which address
    unit_files: tuple[tuple[str, str], ...] = ()  # (dir, glob): systemd unit files there, and their state
    units: tuple[str, ...] = ()                 # systemd units: their state (`systemctl show`)
    space: tuple[str, ...] = ()                 # destinations: the filesystem they land on, its free bytes
    listing: tuple[str, ...] = ()               # folders: each entry's name, kind, size, mtime
    markers: tuple[str, ...] = ()               # folders of small marker files: each one's text
    node_packs: tuple[str, ...] = ()            # custom_nodes folders: every node pack, enabled or not

    def __or__(self, other: Probe) -> Probe:
        def merged(a: tuple, b: tuple) -> tuple:
            return tuple(dict.fromkeys(a + b))
        return Probe(*(merged(getattr(self, f), getattr(other, f)) for f in self.__dataclass_fields__))


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    vram_total_mib: int
    vram_free_mib: int
    vram_used_mib: int
    compute_capability: tuple[int, int]
    driver: str
    uuid: str = ""
    pci_bus_id: str = ""

    @property
    def vram_total_gb(self) -> float:
        return self.vram_total_mib / 1024

    @property
    def precision(self) -> str | None:
        """The models nunchaku runs here (`int4`, `fp4`), or None: it runs none (H100, B200)."""
        return precision_for(self.compute_capability)


@dataclass(frozen=True)
class Distribution:
    name: str
    version: str
    summary: str = ""
    home: str = ""                               # Home-page / first Project-URL
    requires: tuple[str, ...] = ()               # Requires-Dist (read for nunchaku only)
    direct_url: str | None = None                # pip's direct_url.json, as written (installed from a file or URL)


@dataclass(frozen=True)
class PythonEnv:
    """The target venv (ComfyUI's), as its own interpreter reports it."""

    python: str
    exists: bool
    version: str | None = None                   # "3.12.3"
    tag: str | None = None                       # "cp312"
    platform: str | None = None                  # "linux_x86_64" (wheel platform tag)
    torch: str | None = None                     # "2.6.0+cu124"
    torch_cuda: str | None = None                # "12.4"
    tags: tuple[str, ...] | None = None          # wheel tags the interpreter accepts, best first (None: no pip)
    free_threaded: bool = False                  # a no-GIL build (cp313t): its wheels are another ABI
    ensurepip: bool = False                      # it can create venvs (venv and ensurepip importable)
    distributions: Mapping[str, Distribution] = field(default_factory=dict)  # by canonical name
    error: str | None = None                     # why it could not be read, when exists but broken
    fingerprint: str | None = None               # what changes when its answer can (remote/facts.py)

    def version_of(self, name: str) -> str | None:
        dist = self.distributions.get(canonical(name))
        return dist.version if dist else None


@dataclass(frozen=True)
class GitCheckout:
    path: str
    exists: bool
    is_repo: bool = False
    head: str | None = None
    tags: tuple[str, ...] = ()                   # tags pointing at HEAD
    branch: str | None = None                    # None when detached
    dirty: tuple[str, ...] = ()                  # `git status --porcelain` paths
    remote: str | None = None                    # origin URL
    error: str | None = None                     # why it could not be read (git missing), not "not a repo"
    untracked: tuple[str, ...] = ()              # of `dirty`, the untracked ones (`??`)
    entries: tuple[str, ...] = ()                # a folder that is no checkout: what it holds (50 at most)
    foreign: bool = False                        # another user's: never read by git (`error` says whose)


@dataclass(frozen=True)
class FileState:
    path: str
    exists: bool
    size: int = 0
    mtime_ns: int = 0
    sha256: str | None = None                    # from the host's checksum cache, only if size+mtime match


@dataclass(frozen=True)
class RemoteTags:
    """What the host's git knows of a repository's tags: the checkout has the wanted one (`local`),
    or the repository's whole list (`tags`), or why it could not be asked (`error`)."""

    local: bool = False
    tags: tuple[str, ...] | None = None
    error: str | None = None


@dataclass(frozen=True)
class ModelHeader:
    """A safetensors file's header `__metadata__` (the keys the plan checks), read without hashing."""

    path: str
    exists: bool
    metadata: Mapping[str, str] = field(default_factory=dict)
    error: str | None = None                     # not a safetensors file (truncated, an HTML page)


@dataclass(frozen=True)
class Listener:
    """A TCP socket listening on a port: its address, and the process holding it when readable."""

    address: str                                 # "127.0.0.1", "0.0.0.0", "::"
    pid: int | None = None
    cmdline: tuple[str, ...] | None = None
    uid: int | None = None                       # the socket's owner (0: ComfyUI runs as root)


@dataclass(frozen=True)
class UnitFile:
    name: str                                    # "comfyui.service"
    path: str
    text: str


@dataclass(frozen=True)
class UnitState:
    """systemd's view of a unit (`systemctl show`)."""

    load: str = ""                               # loaded | not-found
    active: str = ""                             # active | inactive | failed | activating
    sub: str = ""                                # running | dead | failed | auto-restart
    main_pid: int = 0
    enabled: str = ""                            # UnitFileState: enabled | disabled | ...
    path: str = ""                               # FragmentPath: the file systemd loaded it from


@dataclass(frozen=True)
class Units:
    files: Mapping[tuple[str, str], tuple[UnitFile, ...]] = field(default_factory=dict)
    writable: Mapping[str, bool] = field(default_factory=dict)    # may the login write unit files there
    state: Mapping[str, UnitState] = field(default_factory=dict)
    error: str | None = None                     # why systemctl could not answer (no systemd)


@dataclass(frozen=True)
class Space:
    """Where a file would land: the nearest existing folder (links followed), its filesystem's
    device number (one number per filesystem) and the bytes free there."""

    dir: str
    dev: int
    free: int


@dataclass(frozen=True)
class Entry:
    """One entry of a listed folder (links not followed)."""

    name: str
    kind: str                                    # "file", "dir", "link", "other"
    size: int = 0
    mtime_ns: int = 0


@dataclass(frozen=True)
class Login:
    """Who provision is on the host, who owns ComfyUI's root, and whom it can become.
    `become`: the user steps marked `system` run as (ansible_become), None when off or refused
    (`become_error` says why: no sudo, a password needed or wrong, not in sudoers). `works_as`: the
    root's owner, whom every other step runs as through sudo when the login is neither root nor
    that owner (ansible_become on); None when the login does that work itself, or when it cannot
    become the owner (`works_as_error` says why, in sudo's words)."""

    uid: int | None = None
    user: str | None = None
    root_owner: str | None = None                # the owner of comfyui.root; None: no root yet
    root_owner_uid: int | None = None
    root_group: str | None = None                # the primary group of the root's owner
    become: str | None = None
    become_error: str | None = None
    works_as: str | None = None
    works_as_error: str | None = None


@dataclass(frozen=True)
class NodePack:
    """A folder of custom_nodes/ (or of its `.disabled/`): what says where it came from."""

    name: str
    path: str
    enabled: bool                                # ComfyUI imports it: no `.disabled` suffix, not in `.disabled/`
    origin: str | None = None                    # its git origin URL
    project: str | None = None                   # its pyproject.toml `[project]` name
    registry: bool = False                       # a Comfy Registry install (its `.tracking` file)

    def copy_of(self, repo: str, project: str = PLUGIN_PROJECT) -> str | None:
        """Why this folder is the node pack `repo` holds, named `project` (its origin, its
        pyproject.toml name, or a Registry install named after it, as ComfyUI-Manager names them),
        or None: it is not. A mirror may call the repository anything: the name is the pack's own."""
        if same_repo(self.origin, repo):
            return f"origin {self.origin}"
        names = {canonical(repo_name(repo)), canonical(project)}
        if self.project and canonical(self.project) in names:
            return f"pyproject.toml name {self.project}"
        # Registry folders are named by their id, disabled ones `id@version` under `.disabled/`.
        folder = self.name.removesuffix(".disabled").split("@")[0]
        if self.registry and canonical(folder) in names:
            return "Comfy Registry install (.tracking)"
        return None


@dataclass(frozen=True)
class Facts:
    host: str
    os: str                                      # PRETTY_NAME from os-release, or platform.system()
    arch: str                                    # uname -m
    kernel: str
    system_python: str                           # the interpreter that ran the facts script
    env: PythonEnv
    gpus: tuple[Gpu, ...]
    gpu_error: str | None                        # why there are no GPUs (no nvidia-smi, driver error)
    nvcc: str | None                             # CUDA compiler version, when present
    disk_path: str                               # nearest existing dir at or above the ComfyUI root
    disk_free: int                               # bytes
    comfyui_version: str | None
    git: Mapping[str, GitCheckout] = field(default_factory=dict)
    files: Mapping[str, FileState] = field(default_factory=dict)
    contents: Mapping[str, str | None] = field(default_factory=dict)
    greps: Mapping[tuple[str, str], bool] = field(default_factory=dict)
    http: Mapping[str, int | None] = field(default_factory=dict)
    shown: Mapping[tuple[str, str], str | None] = field(default_factory=dict)
    remote_tags: Mapping[tuple[str, str, str], RemoteTags] = field(default_factory=dict)
    headers: Mapping[str, ModelHeader] = field(default_factory=dict)
    elapsed_s: float = 0.0                       # time the script took on the host
    errors: tuple[str, ...] = ()                 # script sections that failed on the host (a bug there)
    comfyui_gpu: int | str | None = None         # the profile's `comfyui.gpu`: which GPU is ComfyUI's
    ram_total_mib: int | None = None             # host RAM (MemTotal), None when the host did not say
    interpreters: Mapping[str, PythonEnv] = field(default_factory=dict)   # as probed: "python3" -> it
    listeners: Mapping[int, tuple[Listener, ...]] = field(default_factory=dict)
    units: Units = Units()
    disk_dev: int = -1                           # the filesystem of disk_path (st_dev); -1: not said
    space: Mapping[str, Space] = field(default_factory=dict)
    listings: Mapping[str, tuple[Entry, ...] | None] = field(default_factory=dict)   # None: no such folder
    markers: Mapping[str, Mapping[str, str]] = field(default_factory=dict)            # folder -> name -> text
    login: Login = Login()
    node_packs: Mapping[str, tuple[NodePack, ...] | None] = field(default_factory=dict)  # None: no such folder

    def space_for(self, path: str) -> Space:
        """The filesystem `path` lands on, from the `space` probe of it or of a folder above it;
        else the ComfyUI root's."""
        at = posixpath.normpath(path)
        while at not in self.space:
            if posixpath.dirname(at) == at:
                return Space(self.disk_path, self.disk_dev, self.disk_free)
            at = posixpath.dirname(at)
        return self.space[at]

    @property
    def gpu(self) -> Gpu | None:
        """The GPU ComfyUI uses, the one every figure and choice is about: the one `comfyui.gpu`
        names, else the first; None when there is none, or none of that name."""
        return select_gpu(self.gpus, self.comfyui_gpu)


def select_gpu(gpus: tuple[Gpu, ...], selector: int | str | None) -> Gpu | None:
    """The GPU a UUID or an nvidia-smi index names (None: the first). By UUID is the sure way:
    nvidia-smi numbers GPUs in PCI bus order, CUDA fastest first."""
    if selector is None:
        return gpus[0] if gpus else None
    if isinstance(selector, str):
        return next((g for g in gpus if g.uuid.lower() == selector.lower()), None)
    return next((g for g in gpus if g.index == selector), None)


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _repo_ident(url: str) -> str:
    url = url.strip().rstrip("/").removesuffix(".git")
    m = (re.match(r"^[\w.+-]+://(?:[^@/]+@)?([^/:]+)(?::\d+)?/(.*)$", url)
         or re.match(r"^(?:[^@/]+@)?([^/:]{2,}):(?!/)(.*)$", url))
    return f"{m[1].lower()}/{m[2]}" if m else url


def same_repo(a: str | None, b: str) -> bool:
    """One repository written two ways (`.git`, trailing slash, https vs scp-like ssh)."""
    return a is not None and _repo_ident(a) == _repo_ident(b)


def repo_name(url: str) -> str:
    """The repository's own name: `ComfyUI-nunchaku` of `https://github.com/o/ComfyUI-nunchaku.git`."""
    return posixpath.basename(_repo_ident(url).rstrip("/")) or url
