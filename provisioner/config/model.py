"""The validated profile as frozen dataclasses: what every later stage reads.

Field meanings and defaults are documented once, in `schemas/profile.schema.json`; this module
only turns an already validated mapping into typed values (defaults repeated here must match the
schema's; `tests/test_config.py` checks that they do).
"""

from __future__ import annotations

import ipaddress
import posixpath
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from provisioner.catalog import tolerances

if TYPE_CHECKING:
    from provisioner.config.lock import Lock

CpuOffload = Literal["auto", "enable", "disable"]
Precision = Literal["auto", "int4", "fp4"]


@dataclass(frozen=True)
class RestartSpec:
    """How ComfyUI is restarted when something it loads changed; exactly one of the three."""

    systemd: str | None = None       # unit name: `systemctl restart UNIT`
    docker: str | None = None        # container name: `docker restart NAME`
    command: tuple[str, ...] = ()    # any argv


@dataclass(frozen=True)
class TorchSpec:
    """The torch a venv provision creates (or moves) runs: release, CUDA build, where it comes from."""

    version: str                      # "2.9" (newest 2.9.x) or "2.9.1"
    cuda: str = "auto"                # "12.8", or auto: the newest build the host's driver runs
    index_url: str | None = "https://download.pytorch.org/whl/{flavour}"
    find_links: tuple[str, ...] = ()  # {flavour} -> cu128


Service = Literal["systemd", "docker"]
Instances = Literal["single", "per-gpu"]


@dataclass(frozen=True)
class ComfySpec:
    root: str                         # ComfyUI checkout on the host (holds main.py, custom_nodes/, models/)
    venv: str                         # absolute path of the venv ComfyUI runs in
    version: str | None = None        # tag or commit of `repo` the checkout is pinned to; None: unmanaged
    repo: str = "https://github.com/Comfy-Org/ComfyUI.git"
    force: bool = False               # may local modifications be stashed, a foreign root moved aside
    torch: TorchSpec | None = None    # None: provision neither creates the venv nor moves its torch
    port: int = 8188
    listen: str = "127.0.0.1"
    args: tuple[str, ...] = ()        # more main.py arguments in the unit provision writes
    restart: RestartSpec | None = None
    service: Service | None = None    # systemd: provision owns the unit; None: run by something else
    unit: str = "comfyui"             # the unit's name (per-gpu: UNIT-gpuN)
    unit_dir: str = "/etc/systemd/system"
    user: str | None = None           # whom the unit runs ComfyUI as; None: the owner of `root`
    allow_root: bool = False          # may that be root (refused otherwise: ComfyUI runs nodes' code)
    instances: Instances = "single"
    ready_timeout_s: float = 300.0    # after a restart: until /system_stats answers and the nodes are listed
    log_file: str | None = None       # ComfyUI's own log; None: the systemd journal or `docker logs`
    gpu: int | str | None = None      # nvidia-smi index or UUID of ComfyUI's GPU; None: the first

    @property
    def python(self) -> str:
        return posixpath.join(self.venv, "bin", "python")

    @property
    def custom_nodes(self) -> str:
        return posixpath.join(self.root, "custom_nodes")

    @property
    def models(self) -> str:
        return posixpath.join(self.root, "models")

    @property
    def state_dir(self) -> str:
        """Where provision keeps its own bookkeeping on the host (checksum cache, lock)."""
        return posixpath.join(self.root, ".provision")

    @property
    def checksums(self) -> str:
        """The host's checksum cache, `{path: {size, mtime_ns, sha256}}` (remote/facts.py reads it,
        remote/fetch.py writes it): a converged host never re-hashes its 12 GB model files."""
        return posixpath.join(self.state_dir, "checksums.json")

    @property
    def lock(self) -> str:
        """The host's apply lock (remote/lock.py holds it); every facts gather reads its text."""
        return posixpath.join(self.state_dir, "lock")

    @property
    def wheel_dir(self) -> str:
        """The backend wheels provision downloads (resources/backend.py), installed from there."""
        return posixpath.join(self.state_dir, "wheels")

    @property
    def url(self) -> str:
        return f"http://{self.listen}:{self.port}"

    @property
    def local_host(self) -> str:
        """Where ComfyUI is reached from its own host: its listen address, loopback when it listens
        on every address."""
        return "127.0.0.1" if self.listen in ("0.0.0.0", "::", "") else self.listen

    @property
    def local_url(self) -> str:
        host = f"[{self.local_host}]" if ":" in self.local_host else self.local_host
        return f"http://{host}:{self.port}"


@dataclass(frozen=True)
class PluginSpec:
    name: str = "ComfyUI-nunchaku"
    repo: str = "https://github.com/nunchaku-ai/ComfyUI-nunchaku.git"
    tag: str = "v1.1.0"
    force: bool = False               # may local modifications be discarded (they are backed up)
    adopt: bool = False               # take over a ComfyUI-Manager or Registry copy at `name` in place


@dataclass(frozen=True)
class WheelSource:
    """One place the backend wheel may come from; tried in profile order."""

    kind: Literal["github", "mirror", "huggingface", "wheelhouse"]
    # github: repository URL (https://github.com/OWNER/REPO; another host is treated as GitHub
    # Enterprise, API under /api/v3); mirror: URL template with {version} {tag} {filename};
    # huggingface: repo id holding wheels; wheelhouse: directory on the control machine
    value: str = ""


@dataclass(frozen=True)
class BackendSpec:
    version: str = "1.0.1"
    sources: tuple[WheelSource, ...] = (
        WheelSource("github", "https://github.com/nunchaku-tech/nunchaku"),
    )
    allow_nightly_built: bool = False   # take a wheel upstream compiled against a torch nightly


@dataclass(frozen=True)
class PipSpec:
    """Where the host's pip finds packages (a private index or wheelhouse for air-gapped fleets)."""

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False            # only find_links: a fully offline host

    def args(self) -> tuple[str, ...]:
        out: list[str] = ["--no-index"] if self.no_index else []
        if self.index_url:
            out += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            out += ["--extra-index-url", url]
        for link in self.find_links:
            out += ["--find-links", link]
        return tuple(out)


@dataclass(frozen=True)
class ModelSpec:
    family: str | None = "qwen-image-edit-2509"   # None: no Nunchaku model on these hosts
    variant: str = "lightning-4step-r128"
    precision: Precision = "auto"     # auto: catalog/gpus.py (int4 on 7.5-8.9, fp4 on 12.x)
    sha256: str | None = None         # overrides the Hub's LFS checksum for the main model file
    revision: str | None = None       # Hub revision (a commit) of the DiT's repo; None: main, as first resolved
    repo: str | None = None           # the DiT's Hub repo; None: the catalog's official one for the family
    third_party: bool = False         # the opt-in a repo other than the official one needs


@dataclass(frozen=True)
class HubSpec:
    endpoint: str = "https://huggingface.co"
    token_env: str = "HF_TOKEN"       # name of the control machine's env var holding the token
    token_env_allowlist: tuple[str, ...] = ()   # names allowed as token_env without TOKEN in them
    allow_insecure: bool = False      # the token may go over http to a non-loopback endpoint

    def sends_token_to(self, url: str) -> bool:
        """Whether the token may go with a request to `url`: only to the configured endpoint's
        origin, and only over https there (http: a loopback endpoint, or `allow_insecure`)."""
        want, got = urlsplit(self.endpoint), urlsplit(url)
        same = (got.scheme, got.netloc.lower()) == (want.scheme, want.netloc.lower())
        return same and (got.scheme == "https" or self.allow_insecure or loopback(got.hostname))


def loopback(hostname: str | None) -> bool:
    if hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(hostname or "").is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WorkflowSpec:
    templates: tuple[str, ...] = ("qwen-image-edit-lightning.json.j2",)
    template_dir: str = "../templates"  # on the control machine; relative to the profile file
    cpu_offload: CpuOffload = "auto"
    offload_below_gb: float = 15.0    # `auto` enables offload below this much VRAM (the plugin's rule)
    num_blocks_on_gpu: int = 1
    use_pin_memory: bool = False
    steps: int | None = None          # None: the variant's own step count
    shift: float = 1.0
    cfg: float = 1.0
    sampler: str = "euler"
    scheduler: str = "beta"
    width: int = 1024
    height: int = 1024
    seed: int = 42
    prompt: str = "a red fox in the snow, photograph"
    dest: str = "workflows"           # API-format JSON goes here, relative to the ComfyUI root


@dataclass(frozen=True)
class Thresholds:
    warm_seconds: float | None = None
    cold_seconds: float | None = None
    vram_gib: float | None = None     # GiB, like every VRAM figure


@dataclass(frozen=True)
class AgreementSpec:
    """How closely a host's images must agree with its GPU class's reference (catalog/tolerances.py)."""

    psnr_min_db: float = tolerances.PSNR_MIN_DB
    ssim_min: float = tolerances.SSIM_MIN


@dataclass(frozen=True)
class ClassSpeedSpec:
    """A host is flagged past BOTH bars against its GPU class's median."""

    slower_factor: float = 1.25
    slower_min_s: float = 0.5
    vram_factor: float = 1.1
    vram_min_gib: float = 0.5


# Keys renamed, by their path: still read, into the new name (a profile may not give both).
OLD_NAMES: Mapping[tuple[str, ...], str] = {("verify", "thresholds", "vram_gb"): "vram_gib"}


@dataclass(frozen=True)
class VerifySpec:
    prompts: tuple[str, ...] = ("a red fox in the snow, photograph",)
    warm_runs: int = 2
    seed: int = 42
    timeout_s: float = 600.0
    family_nodes: bool = True              # require the model family's nodes from the catalog
    required_nodes: tuple[str, ...] = ()   # beside the model family's loader and the workflow's classes
    allow_exposed: bool = False            # may ComfyUI listen beyond loopback while comfyui.listen says loopback
    thresholds: Thresholds = Thresholds()
    agreement: AgreementSpec = AgreementSpec()
    class_speed: ClassSpeedSpec = ClassSpeedSpec()


@dataclass(frozen=True)
class TimeoutSpec:
    """Seconds each kind of remote step may take before its process group is stopped on the host."""

    facts_s: float = 120.0
    command_s: float = 600.0          # any step without a limit of its own
    pip_s: float = 1800.0
    git_s: float = 900.0              # clone, fetch
    restart_s: float = 300.0          # the restart command; the wait for ComfyUI is ready_timeout_s
    download_stall_s: float = 300.0   # a download without progress; one that progresses has no limit


@dataclass(frozen=True)
class SnapshotSpec:
    keep: int = 20                    # newest snapshots kept per host
    remove_models: bool = False       # may a rollback delete model files the snapshot lacks


@dataclass(frozen=True)
class RolloutSpec:
    verify_gate: bool = False         # verify each host after its change; roll back and stop on failure
    canary: int | None = None         # hosts in the first batch


@dataclass(frozen=True)
class Profile:
    name: str
    file: str
    inventory: str | None
    hosts: str                        # Ansible-style pattern: group, host, glob, `a:b`, `!c`
    comfyui: ComfySpec
    plugin: PluginSpec = PluginSpec()
    backend: BackendSpec = BackendSpec()
    packages: tuple[str, ...] = ("diffusers>=0.35", "peft>=0.17")
    pip: PipSpec = PipSpec()
    model: ModelSpec = ModelSpec()
    huggingface: HubSpec = HubSpec()
    workflow: WorkflowSpec = WorkflowSpec()
    verify: VerifySpec = VerifySpec()
    timeouts: TimeoutSpec = TimeoutSpec()
    snapshots: SnapshotSpec = SnapshotSpec()
    rollout: RolloutSpec = RolloutSpec()
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)
    # The lock beside the profile (config/lock.py) that plan and apply converge to; None: upstream's
    # names (tags, the Hub's main, torch releases, package floors) are resolved at each plan.
    lock: Lock | None = field(default=None, compare=False, repr=False)


def _pick(cls: type, data: Mapping[str, Any] | None, **nested: Any) -> Any:
    """Build dataclass `cls` from the keys of `data` it knows; `nested` overrides built values."""
    data = dict(data or {})
    names = cls.__dataclass_fields__  # type: ignore[attr-defined]
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
    kwargs.update({k: v for k, v in nested.items() if v is not None})
    return cls(**kwargs)


def _wheel_source(item: str | Mapping[str, str]) -> WheelSource:
    if isinstance(item, str):                 # bare "github"
        return WheelSource(item, BackendSpec.sources[0].value if item == "github" else "")  # type: ignore[arg-type]
    ((kind, value),) = item.items()
    return WheelSource(kind, value)  # type: ignore[arg-type]


def _renamed(data: Mapping[str, Any] | None, path: tuple[str, ...]) -> dict[str, Any]:
    """`data` with the old names of OLD_NAMES read into their new ones."""
    out = dict(data or {})
    for old_path, new in OLD_NAMES.items():
        if old_path[:-1] == path and old_path[-1] in out:
            out.setdefault(new, out.pop(old_path[-1]))
    return out


def build_profile(data: Mapping[str, Any], *, name: str, file: str) -> Profile:
    """Turn a validated, merged profile mapping into a `Profile`. Paths stay POSIX: they are the host's."""
    comfy = dict(data["comfyui"])
    venv = comfy.get("venv", "venv")
    comfy["venv"] = posixpath.normpath(posixpath.join(comfy["root"], venv))
    restart = comfy.pop("restart", None)
    torch = comfy.pop("torch", None)
    comfy["unit"] = comfy.get("unit", ComfySpec.unit).removesuffix(".service")
    backend = data.get("backend") or {}
    sources = tuple(_wheel_source(s) for s in backend.get("sources", ())) or None
    verify = data.get("verify") or {}
    return Profile(
        name=name,
        file=file,
        inventory=data.get("inventory"),
        hosts=data.get("hosts", "all"),
        comfyui=_pick(ComfySpec, comfy, restart=_pick(RestartSpec, restart) if restart else None,
                      torch=_pick(TorchSpec, torch) if torch else None),
        plugin=_pick(PluginSpec, data.get("plugin")),
        backend=_pick(BackendSpec, backend, sources=sources),
        packages=tuple(data.get("packages", Profile.packages)),
        pip=_pick(PipSpec, data.get("pip")),
        model=_pick(ModelSpec, data.get("model")),
        huggingface=_pick(HubSpec, data.get("huggingface")),
        workflow=_pick(WorkflowSpec, data.get("workflow")),
        verify=_pick(VerifySpec, verify, thresholds=_pick(Thresholds, _renamed(
            verify.get("thresholds"), ("verify", "thresholds"))),
            agreement=_pick(AgreementSpec, verify.get("agreement")),
            class_speed=_pick(ClassSpeedSpec, verify.get("class_speed"))),
        timeouts=_pick(TimeoutSpec, data.get("timeouts")),
        snapshots=_pick(SnapshotSpec, data.get("snapshots")),
        rollout=_pick(RolloutSpec, data.get("rollout")),
        raw=data,
    )
