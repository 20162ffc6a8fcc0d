"""The facts script's raw JSON answer into typed `Facts`, and `Facts` back into stable JSON."""

from __future__ import annotations

import dataclasses
import posixpath
import re
from collections.abc import Mapping
from typing import Any

from provisioner.errors import FactsError
from provisioner.facts.model import (
    Login,
    Distribution,
    Entry,
    Facts,
    FileState,
    GitCheckout,
    NodePack,
    Gpu,
    Listener,
    ModelHeader,
    PythonEnv,
    RemoteTags,
    UnitFile,
    Units,
    UnitState,
    Space,
    canonical,
)

ANSWER_VERSION = 1
# GitHub organisations the real backend has lived under (old URLs redirect to the newest).
_NUNCHAKU_ORGS = ("nunchaku-tech", "mit-han-lab", "nunchaku-ai")


def is_real_nunchaku(dist: Distribution) -> bool:
    """The SVDQuant backend, not PyPI's unrelated `nunchaku` 0.16.1 (data segmentation).

    Real wheels carry a `+torchX.Y` (from 1.2.1 `+cuX.YtorchA.B`) local version label, or name
    their GitHub organisation in Home-page / Project-URL / Summary; the impostor does neither.
    """
    if canonical(dist.name) != "nunchaku":
        return False
    if re.match(r"(cu[\d.]+)?torch\d", dist.version.partition("+")[2]):
        return True
    text = f"{dist.home} {dist.summary}".lower()
    return any(org in text for org in _NUNCHAKU_ORGS)


def describe_nunchaku(env: PythonEnv) -> str:
    """One line for tables and reports: the backend version, the impostor, or its absence."""
    dist = env.distributions.get("nunchaku")
    if dist is None:
        return "not installed"
    return dist.version if is_real_nunchaku(dist) else f"PyPI impostor {dist.version}"


def _mib(value: str) -> int:
    # `[N/A]` / `[Not Supported]` (MIG slices, some drivers) mean unknown: 0, never a crash.
    digits = re.match(r"\s*(\d+)", value)
    return int(digits.group(1)) if digits else 0


def _capability(value: str) -> tuple[int, int]:
    m = re.match(r"\s*(\d+)\.(\d+)", value)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def parse_nvidia_smi_csv(text: str) -> tuple[Gpu, ...]:
    """Rows of `--query-gpu=index,name,uuid,memory.total,memory.used,memory.free,driver_version,
    compute_cap,pci.bus_id --format=csv,noheader,nounits`; lines that are not such rows are skipped."""
    gpus = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 9 or not fields[0].isdigit():
            continue
        # The name is the only free-text column: whatever lies between index and the last 7.
        name = ", ".join(fields[1:-7])
        uuid, total, used, free, driver, cap, bus = fields[-7:]
        gpus.append(Gpu(
            index=int(fields[0]), name=name, vram_total_mib=_mib(total), vram_free_mib=_mib(free),
            vram_used_mib=_mib(used), compute_capability=_capability(cap), driver=driver,
            uuid=uuid, pci_bus_id=bus,
        ))
    return tuple(gpus)


def parse_gpus(raw: Mapping[str, Any] | None) -> tuple[tuple[Gpu, ...], str | None]:
    """The script's `nvidia_smi` section: the GPUs, or none and why."""
    if not raw or not raw.get("found"):
        return (), "nvidia-smi not found"
    stdout, stderr = raw.get("stdout") or "", raw.get("stderr") or ""
    gpus = parse_nvidia_smi_csv(stdout) if raw.get("exit_code") == 0 else ()
    if gpus:
        return gpus, None
    # "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver..." (stdout)
    lines = [x.strip() for x in (stdout + "\n" + stderr).splitlines() if x.strip()]
    why = lines[0] if lines else f"nvidia-smi exited {raw.get('exit_code')} and listed no GPU"
    return (), why


def parse_nvcc(text: str | None) -> str | None:
    """`nvcc --version` -> "13.0.88" (the V number), or the release when no V number is printed."""
    if not text:
        return None
    m = re.search(r"release\s+([\d.]+),\s*V([\d.]+)", text) or re.search(r"release\s+([\d.]+)", text)
    return (m.group(m.lastindex or 1)) if m else None


def parse_comfyui_version(version_py: str | None, pyproject: str | None = None) -> str | None:
    """`__version__ = "0.3.64"` from comfyui_version.py; older checkouts: pyproject's `version`."""
    for text, pattern in ((version_py, r"^__version__\s*=\s*['\"]([^'\"]+)"),
                          (pyproject, r"^version\s*=\s*['\"]([^'\"]+)")):
        m = re.search(pattern, text or "", re.M)
        if m:
            return m.group(1)
    return None


def _env(raw: Mapping[str, Any]) -> PythonEnv:
    info = raw.get("info")
    if not info:
        return PythonEnv(python=raw["python"], exists=bool(raw.get("exists")), error=raw.get("error"))
    dists: dict[str, Distribution] = {}
    for d in info.get("distributions", ()):
        dist = Distribution(d["name"], d.get("version", ""), d.get("summary", ""), d.get("home", ""),
                            tuple(d.get("requires") or ()), d.get("direct_url"))
        dists.setdefault(canonical(dist.name), dist)
    return PythonEnv(
        python=raw["python"], exists=True, version=info.get("version"), tag=info.get("tag"),
        platform=info.get("platform"), torch=info.get("torch"), torch_cuda=info.get("torch_cuda"),
        tags=tuple(info["tags"]) if info.get("tags") is not None else None,
        free_threaded=bool(info.get("gil_disabled")), distributions=dict(sorted(dists.items())),
        ensurepip=bool(info.get("ensurepip")),
        fingerprint=raw.get("fingerprint") if isinstance(raw.get("fingerprint"), str) else None,
    )


def _git(path: str, raw: Mapping[str, Any]) -> GitCheckout:
    return GitCheckout(
        path=path, exists=bool(raw.get("exists")), is_repo=bool(raw.get("is_repo")),
        head=raw.get("head"), tags=tuple(raw.get("tags") or ()), branch=raw.get("branch"),
        dirty=tuple(raw.get("dirty") or ()), untracked=tuple(raw.get("untracked") or ()),
        entries=tuple(raw.get("entries") or ()), remote=raw.get("remote"), error=raw.get("error"),
        foreign=bool(raw.get("foreign")),
    )


def _file(path: str, raw: Mapping[str, Any]) -> FileState:
    if not raw.get("exists"):
        return FileState(path, False)
    return FileState(path, True, int(raw["size"]), int(raw["mtime_ns"]), raw.get("sha256"))


def _remote_tags(raw: Mapping[str, Any]) -> RemoteTags:
    tags = raw.get("tags")
    return RemoteTags(bool(raw.get("local")), tuple(tags) if tags is not None else None, raw.get("error"))


def _header(path: str, raw: Mapping[str, Any]) -> ModelHeader:
    if raw.get("exists") is False:
        return ModelHeader(path, False)
    return ModelHeader(path, True, dict(raw.get("metadata") or {}), raw.get("error"))


def _listeners(raw: Mapping[str, Any]) -> dict[int, tuple[Listener, ...]]:
    return {int(port): tuple(Listener(x["address"], x.get("pid"), tuple(x["cmdline"]) if x.get("cmdline") else None,
                                      x.get("uid")) for x in found) for port, found in raw.items()}


def _units(raw: Mapping[str, Any]) -> Units:
    def state(props: Mapping[str, str]) -> UnitState:
        pid = props.get("MainPID", "0")
        return UnitState(props.get("LoadState", ""), props.get("ActiveState", ""), props.get("SubState", ""),
                         int(pid) if pid.isdigit() else 0, props.get("UnitFileState", ""),
                         props.get("FragmentPath", ""))

    return Units(files={(folder, pattern): tuple(UnitFile(f["name"], f["path"], f["text"]) for f in found)
                        for folder, pattern, found in raw.get("files") or ()},
                 writable={folder: bool(ok) for folder, ok in (raw.get("writable") or {}).items()},
                 state={name: state(props) for name, props in (raw.get("state") or {}).items()},
                 error=raw.get("error"))


def _login(raw: Mapping[str, Any]) -> Login:
    return Login(uid=raw.get("uid"), user=raw.get("user"), root_owner=raw.get("root_owner"),
                 root_owner_uid=raw.get("root_owner_uid"), root_group=raw.get("root_group"))


def parse_facts(host_name: str, answer: Mapping[str, Any], comfyui_gpu: int | str | None = None) -> Facts:
    """Typed `Facts` from the script's answer; an answer the script could not have sent -> FactsError.
    `comfyui_gpu` (the profile's `comfyui.gpu`) says which GPU is ComfyUI's."""
    if "fatal" in answer:
        raise FactsError(f"{host_name}: the facts script failed on the host: {answer['fatal']}")
    if answer.get("version") != ANSWER_VERSION:
        raise FactsError(f"{host_name}: facts answer version {answer.get('version')!r}, expected "
                         f"{ANSWER_VERSION} (control and host script out of step: reinstall provision)")
    try:
        root = answer["root"]
        gpus, gpu_error = parse_gpus(answer.get("nvidia_smi"))
        contents = dict(answer.get("read") or {})
        disk = answer.get("disk") or {"path": root, "free": 0}
        return Facts(
            host=host_name, os=answer["os"], arch=answer["arch"], kernel=answer["kernel"],
            system_python=answer["system_python"],
            env=_env(answer.get("env") or {"python": "", "exists": False, "error": "not gathered"}),
            gpus=gpus, gpu_error=gpu_error, nvcc=parse_nvcc(answer.get("nvcc")),
            disk_path=disk["path"], disk_free=int(disk["free"]),
            comfyui_version=parse_comfyui_version(
                contents.get(posixpath.join(root, "comfyui_version.py")),
                contents.get(posixpath.join(root, "pyproject.toml"))),
            git={p: _git(p, g) for p, g in (answer.get("git") or {}).items()},
            files={p: _file(p, f) for p, f in (answer.get("stat") or {}).items()},
            contents=contents,
            greps={(p, n): bool(found) for p, n, found in answer.get("grep") or ()},
            http=dict(answer.get("http") or {}),
            shown={(p, spec): text for p, spec, text in answer.get("show") or ()},
            remote_tags={(p, repo, tag): _remote_tags(got) for p, repo, tag, got in answer.get("remote_tags") or ()},
            headers={p: _header(p, h) for p, h in (answer.get("headers") or {}).items()},
            elapsed_s=float(answer.get("elapsed_s", 0.0)),
            errors=tuple(answer.get("errors") or ()),
            comfyui_gpu=comfyui_gpu,
            ram_total_mib=answer["mem_total_kb"] // 1024 if isinstance(answer.get("mem_total_kb"), int) else None,
            interpreters={p: _env(e) for p, e in (answer.get("interpreters") or {}).items()},
            listeners=_listeners(answer.get("listeners") or {}),
            units=_units(answer.get("units") or {}),
            disk_dev=int(disk.get("dev", -1)),
            space={p: Space(str(v["dir"]), int(v["dev"]), int(v["free"])) for p, v in (answer.get("space") or {}).items()},
            login=_login(answer.get("login") or {}),
            listings={p: None if v is None else tuple(Entry(str(e["name"]), str(e["kind"]), int(e["size"]),
                                                            int(e["mtime_ns"])) for e in v)
                      for p, v in (answer.get("listing") or {}).items()},
            markers={p: {str(k): str(t) for k, t in (v or {}).items()} for p, v in (answer.get("markers") or {}).items()},
            node_packs={p: None if v is None else tuple(
                NodePack(str(n["name"]), str(n["path"]), bool(n["enabled"]), n.get("origin"), n.get("project"),
                         bool(n.get("registry"))) for n in v)
                for p, v in (answer.get("node_packs") or {}).items()},
        )
    except (KeyError, TypeError, ValueError) as err:
        raise FactsError(f"{host_name}: malformed facts answer ({type(err).__name__}: {err})") from None


def _gpu(g: Gpu) -> dict[str, Any]:
    return {"index": g.index, "name": g.name, "uuid": g.uuid, "pci_bus_id": g.pci_bus_id,
            "vram_total_mib": g.vram_total_mib, "vram_used_mib": g.vram_used_mib,
            "vram_free_mib": g.vram_free_mib, "compute_capability": list(g.compute_capability),
            "driver": g.driver}


def facts_to_json(facts: Facts) -> dict[str, Any]:
    """JSON-able, stable keys (mappings sorted): `provision facts --json` and reports."""
    env = facts.env
    nunchaku = env.distributions.get("nunchaku")
    return {
        "host": facts.host, "os": facts.os, "arch": facts.arch, "kernel": facts.kernel,
        "system_python": facts.system_python,
        "login": dataclasses.asdict(facts.login),
        "env": {
            "python": env.python, "exists": env.exists, "version": env.version, "tag": env.tag,
            "platform": env.platform, "torch": env.torch, "torch_cuda": env.torch_cuda,
            "error": env.error, "free_threaded": env.free_threaded,
            # The full list is ~900 tags: its most specific one says enough to a reader.
            "wheel_tag": env.tags[0] if env.tags else None,
            "nunchaku": None if nunchaku is None else {
                "version": nunchaku.version, "real": is_real_nunchaku(nunchaku)},
            "distributions": {k: {"name": d.name, "version": d.version, "summary": d.summary,
                                  "home": d.home} for k, d in sorted(env.distributions.items())},
        },
        "gpus": [_gpu(g) for g in facts.gpus],
        "comfyui_gpu": facts.comfyui_gpu,
        "gpu": None if facts.gpu is None else _gpu(facts.gpu),       # ComfyUI's, of those
        "gpu_error": facts.gpu_error, "nvcc": facts.nvcc,
        "disk": {"path": facts.disk_path, "free": facts.disk_free, "dev": facts.disk_dev},
        "ram_total_mib": facts.ram_total_mib,
        "comfyui_version": facts.comfyui_version,
        "git": {p: {"exists": g.exists, "is_repo": g.is_repo, "head": g.head, "tags": list(g.tags),
                    "branch": g.branch, "dirty": list(g.dirty), "untracked": list(g.untracked),
                    "entries": list(g.entries),
                    "remote": g.remote, "error": g.error, "foreign": g.foreign}
                for p, g in sorted(facts.git.items())},
        "files": {p: {"exists": f.exists, "size": f.size, "mtime_ns": f.mtime_ns, "sha256": f.sha256}
                  for p, f in sorted(facts.files.items())},
        "contents": dict(sorted(facts.contents.items())),
        "greps": [{"path": p, "needle": n, "found": v} for (p, n), v in sorted(facts.greps.items())],
        "http": dict(sorted(facts.http.items())),
        "remote_tags": [{"path": p, "repo": r, "tag": t, "local": v.local, "tags": v.tags, "error": v.error}
                        for (p, r, t), v in sorted(facts.remote_tags.items())],
        "headers": {p: {"exists": h.exists, "metadata": dict(h.metadata), "error": h.error}
                    for p, h in sorted(facts.headers.items())},
        "interpreters": {p: {"python": e.python, "exists": e.exists, "version": e.version, "tag": e.tag,
                             "platform": e.platform, "ensurepip": e.ensurepip, "error": e.error}
                         for p, e in sorted(facts.interpreters.items())},
        "listeners": {str(port): [{"address": x.address, "pid": x.pid, "uid": x.uid,
                                   "cmdline": list(x.cmdline) if x.cmdline else None} for x in found]
                      for port, found in sorted(facts.listeners.items())},
        "units": {"files": [{"dir": d, "glob": g, "found": [{"name": f.name, "path": f.path} for f in found]}
                            for (d, g), found in sorted(facts.units.files.items())],
                  "writable": dict(sorted(facts.units.writable.items())),
                  "state": {n: {"load": s.load, "active": s.active, "sub": s.sub, "main_pid": s.main_pid,
                                "enabled": s.enabled, "path": s.path}
                            for n, s in sorted(facts.units.state.items())},
                  "error": facts.units.error},
        "space": {p: {"dir": v.dir, "dev": v.dev, "free": v.free} for p, v in sorted(facts.space.items())},
        "listings": {p: None if v is None else [{"name": e.name, "kind": e.kind, "size": e.size,
                                                  "mtime_ns": e.mtime_ns} for e in v]
                     for p, v in sorted(facts.listings.items())},
        "markers": {p: dict(sorted(v.items())) for p, v in sorted(facts.markers.items())},
        "node_packs": {p: None if v is None else [{"name": n.name, "path": n.path, "enabled": n.enabled,
                                                    "origin": n.origin, "project": n.project,
                                                    "registry": n.registry} for n in v]
                       for p, v in sorted(facts.node_packs.items())},
        "elapsed_s": facts.elapsed_s,
        "errors": list(facts.errors),
    }
