"""model resource: plans against the Hub stand-in (real HTTP through huggingface_hub), then a real
apply of its steps with the host fetch script, read back by the real facts stat code."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
from dataclasses import replace
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

from provisioner import remote
from provisioner.catalog import models as catalog
from provisioner.config.inventory import Host
from provisioner.config.model import build_profile
from provisioner.connection.local import LocalConnection
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, FileState, Gpu, PythonEnv, Space
from provisioner.facts.parse import parse_facts
from provisioner.plan.apply import StepRunner
from provisioner.plan.build import DISK_MARGIN_BYTES, disk_problems
from provisioner.plan.progress import Reporter
from provisioner.remote.facts import stat_files
from provisioner.resources import hub, hub_cache, models
from provisioner.resources.base import RESTART, Fetch, Run
from provisioner.sandbox.hf_server import HfServer, start_hf_server
from provisioner.sandbox.world import safetensors_standin

FAMILY, VARIANT = "qwen-image-edit-2509", "lightning-4step-r128"
RTX3090 = Gpu(0, "NVIDIA GeForce RTX 3090", 24576, 24000, 576, (8, 6), "550.54")
RTX3060 = Gpu(0, "NVIDIA GeForce RTX 3060", 12288, 12000, 288, (8, 6), "550.54")
RTX5090 = Gpu(0, "NVIDIA GeForce RTX 5090", 32607, 32000, 607, (12, 0), "575.51")
TOKEN = "hf_model_token"


def content(f: catalog.ModelFile) -> bytes:
    """A small safetensors stand-in per real file (the real ones are 0.25 to 13 GB); a DiT's header
    declares its precision and rank as upstream's do."""
    precision = "fp4" if f.filename.startswith("svdq-fp4") else "int4" if f.filename.startswith("svdq-") else None
    return safetensors_standin(64_000 + len(f.filename), f.filename, precision=precision,
                               rank=catalog.rank_of(VARIANT) if precision else None)


FILES = catalog.candidate_files(FAMILY, VARIANT, "auto")
SHA = {f.filename: hashlib.sha256(content(f)).hexdigest() for f in FILES}


@pytest.fixture(autouse=True)
def _fresh_hub_cache() -> Iterator[None]:
    hub.clear_cache()  # a later server may get a port an earlier one had
    yield
    hub.clear_cache()


@pytest.fixture
def server() -> Iterator[HfServer]:
    with start_hf_server({(f.repo, f.path_in_repo): content(f) for f in FILES}, token=TOKEN,
                         commits=catalog.PINNED_REVISIONS) as s:
        yield s


def make_profile(endpoint: str, root: str = "/srv/ComfyUI", **sections: Any):
    data = {"comfyui": {"root": root}, "huggingface": {"endpoint": endpoint, "token_env": "T_HF"}, **sections}
    return build_profile(data, name="t", file="/p/profiles/t.yaml")


def make_facts(gpu: Gpu | None = RTX3090, files: dict[str, FileState] | None = None,
               disk_free: int = 10**12) -> Facts:
    return Facts(host="h", os="Ubuntu 24.04", arch="x86_64", kernel="6.8",
                 system_python="3.12.3 /usr/bin/python3", env=PythonEnv("/srv/ComfyUI/venv/bin/python", True),
                 gpus=(gpu,) if gpu else (), gpu_error=None if gpu else "nvidia-smi not found", nvcc=None,
                 disk_path="/srv", disk_free=disk_free, comfyui_version="0.3.64", files=files or {})


def present(profile: Any, sel: catalog.ModelSelection, *, sha: dict[str, str | None] | None = None,
            size_delta: int = 0) -> dict[str, FileState]:
    """Facts for the three files as present, with cached checksums (overridable per file name)."""
    out = {}
    for f in sel.files:
        dest = f.dest(profile.comfyui.models)
        cached = (sha or {}).get(f.filename, SHA[f.filename])
        out[dest] = FileState(dest, True, len(content(f)) + size_delta, 1, cached)
    return out


def plan(profile: Any, facts: Facts, **kw: Any):
    return models.plan(profile, facts, environ=kw.pop("environ", {}), **kw)


def test_probe_stats_every_candidate_and_its_part(server: HfServer) -> None:
    probe = models.probe(make_profile(server.url))
    assert len(probe.stat) == 8 and all(p.startswith("/srv/ComfyUI/models/") for p in probe.stat)
    assert "/srv/ComfyUI/models/diffusion_models/" \
        "svdq-fp4_r128-qwen-image-edit-2509-lightningv2.0-4steps.safetensors.part" in probe.stat
    assert models.probe(make_profile(server.url, model={"family": "flux"})).stat == ()


def test_fresh_host_downloads_three_files_and_restarts_for_the_dit(server: HfServer) -> None:
    profile = make_profile(server.url)
    rp = plan(profile, make_facts())
    dit, te, vae = rp.changes
    assert [c.action for c in rp.changes] == ["create"] * 3 and rp.notes == ()
    assert (dit.key, dit.notify, te.notify, vae.notify) == (
        "/srv/ComfyUI/models/diffusion_models/svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-4steps.safetensors",
        RESTART, frozenset(), frozenset())
    (step,) = dit.steps
    assert isinstance(step, Fetch) and step.dest == dit.key and step.token_env == "T_HF"
    assert step.url == f"{server.url}/nunchaku-ai/nunchaku-qwen-image-edit-2509/resolve/{server.commit}/" \
        "svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-4steps.safetensors"
    assert (step.sha256, step.size) == (SHA[catalog.dit_file(FAMILY, VARIANT, "int4").filename], dit.after["size"])
    assert dit.summary.startswith("download diffusion_models/svdq-int4_r128") and dit.before is None
    assert te.steps[0].url.endswith("/split_files/text_encoders/qwen_2.5_vl_7b_fp8_scaled.safetensors")


def test_converged_with_cached_checksums_plans_nothing(server: HfServer) -> None:
    profile = make_profile(server.url)
    sel = catalog.resolve(FAMILY, VARIANT, "auto", RTX3090)
    assert plan(profile, make_facts(files=present(profile, sel))).changes == ()


def test_right_size_without_cached_checksum_plans_a_verify_only_step(server: HfServer) -> None:
    profile = make_profile(server.url)
    sel = catalog.resolve(FAMILY, VARIANT, "auto", RTX3090)
    (change,) = plan(profile, make_facts(files=present(profile, sel, sha={sel.vae.filename: None}))).changes
    assert (change.action, change.key, change.notify) == ("update", sel.vae.dest(profile.comfyui.models), frozenset())
    assert "checksum not cached" in change.summary and change.before == {"size": len(content(sel.vae)), "sha256": None}
    (run,) = change.steps
    assert isinstance(run, Run) and run.argv == remote.argv("fetch")
    assert b'"mode": "verify"' in (run.stdin or b"") and b"token" not in (run.stdin or b"")


def test_wrong_checksum_or_size_replaces_and_restarts(server: HfServer) -> None:
    profile = make_profile(server.url)
    sel = catalog.resolve(FAMILY, VARIANT, "auto", RTX3090)
    (change,) = plan(profile, make_facts(files=present(profile, sel, sha={sel.text_encoder.filename: "a" * 64}))).changes
    assert change.action == "replace" and "sha256 differs" in change.summary and change.notify == RESTART
    assert change.before == {"size": len(content(sel.text_encoder)), "sha256": "a" * 64}
    assert change.after == {"size": len(content(sel.text_encoder)), "sha256": SHA[sel.text_encoder.filename]}
    changes = plan(profile, make_facts(files=present(profile, sel, size_delta=-7))).changes
    assert [c.action for c in changes] == ["replace"] * 3 and all("size differs" in c.summary for c in changes)


def test_part_file_is_resumed_and_counted_in_the_disk_check(server: HfServer) -> None:
    profile = make_profile(server.url)
    sel = catalog.resolve(FAMILY, VARIANT, "auto", RTX3090)
    dest = sel.dit.dest(profile.comfyui.models)
    total = sum(len(content(f)) for f in sel.files)
    part = {dest + ".part": FileState(dest + ".part", True, 1000, 1)}
    facts = make_facts(files=part, disk_free=DISK_MARGIN_BYTES + total - 1000)   # just enough with the resume
    changes = plan(profile, facts).changes
    assert "resuming at" in changes[0].summary
    assert disk_problems(facts, changes) == {}
    facts = make_facts(disk_free=DISK_MARGIN_BYTES + total - 1)
    (message,) = disk_problems(facts, plan(profile, facts).changes)
    assert "not enough disk at /srv" in message and "GB free" in message


def test_disk_too_small_names_need_and_free(server: HfServer) -> None:
    facts = make_facts(disk_free=500_000_000)
    problems = disk_problems(facts, plan(make_profile(server.url), facts).changes)
    assert list(problems.values()) == [["model"]]
    assert re.search(r"need 0\.\d MB \(\+1\.1 GB margin\), 500\.0 MB free.*model.variant", next(iter(problems)))


def test_the_disk_check_measures_the_filesystem_each_file_lands_on(server: HfServer) -> None:
    """models/ a link to another, fuller disk: the root's free space says nothing about it."""
    profile = make_profile(server.url)
    models_dir = profile.comfyui.models
    plenty, small = Space("/srv", 1, 10**13), Space(models_dir + "/diffusion_models", 2, DISK_MARGIN_BYTES + 100_000)
    probed = {p: small for p in models.probe(profile).space}
    facts = replace(make_facts(disk_free=10**13), space=probed, disk_dev=1)
    assert models.probe(profile).space and all(p.startswith(models_dir) for p in probed)
    problems = disk_problems(facts, plan(profile, facts).changes)
    (message,) = problems
    assert message.startswith(f"not enough disk at {models_dir}/diffusion_models: the model files need 0.2 MB")
    # The text encoder on the root's filesystem: only the files on the small one count there.
    sel = catalog.resolve(FAMILY, VARIANT, "auto", RTX3090)
    on_root = {**probed, sel.text_encoder.dest(models_dir): plenty}
    facts = replace(facts, space=on_root)
    (message,) = disk_problems(facts, plan(profile, facts).changes)
    assert "need 0.1 MB" in message
    assert disk_problems(replace(facts, space={p: plenty for p in probed}), plan(profile, facts).changes) == {}


def test_blackwell_gets_fp4_files_and_refuses_int4(server: HfServer) -> None:
    changes = plan(make_profile(server.url), make_facts(RTX5090)).changes
    assert "svdq-fp4_r128-qwen-image-edit-2509-lightningv2.0-4steps" in changes[0].key
    with pytest.raises(PlanError, match=r"RTX 5090 \(compute capability 12\.0\) runs nunchaku.s fp4 models only.*fp4 or auto"):
        plan(make_profile(server.url, model={"precision": "int4"}), make_facts(RTX5090))


@pytest.mark.parametrize(("gpu", "offload", "level", "text"), [
    (RTX3060, "disable", "warning", "cpu_offload=disable will likely run out of memory"),
    (RTX3060, "auto", "info", "will enable CPU offload"),
    (RTX3060, "enable", None, None),
    (RTX3090, "disable", None, None),
    (None, "auto", "info", "the pinned int4 files are used unchecked"),   # no GPU: only a pinned precision
])
def test_vram_notes(server: HfServer, gpu: Gpu | None, offload: str, level: str | None, text: str | None) -> None:
    model = {} if gpu else {"precision": "int4"}
    notes = plan(make_profile(server.url, workflow={"cpu_offload": offload}, model=model), make_facts(gpu)).notes
    if level is None:
        assert notes == ()
    else:
        (note,) = notes
        assert (note.resource, note.level) == ("model", level) and text in note.message


def test_pinned_sha256_overrides_the_hub_for_the_dit(server: HfServer) -> None:
    pinned = "b" * 64
    profile = make_profile(server.url, model={"sha256": pinned})
    sel = catalog.resolve(FAMILY, VARIANT, "auto", RTX3090)
    (change,) = plan(profile, make_facts(files=present(profile, sel))).changes   # Hub's sha cached, pin differs
    assert change.action == "replace" and change.steps[0].sha256 == pinned
    assert "differs from the Hub's" in change.warnings[0]
    assert plan(profile, make_facts(files=present(profile, sel, sha={sel.dit.filename: pinned}))).changes == ()


def test_hub_lookups_are_memoised(server: HfServer) -> None:
    profile = make_profile(server.url)
    plan(profile, make_facts())
    seen = len(server.requests)
    plan(profile, make_facts())
    assert len(server.requests) == seen == 3


def test_injected_lookup_gets_the_profile_endpoint_and_token() -> None:
    calls = []

    def lookup(endpoint: str, repo: str, path: str, revision: str, token: str | None, **kw: Any) -> hub.RemoteFile:
        calls.append((endpoint, repo, revision, token, kw))
        return hub.RemoteFile(f"{endpoint}/{repo}/resolve/{revision}/{path}", 10, "c" * 64, None)

    rp = models.plan(make_profile("https://hub.example"), make_facts(), lookup=lookup, environ={"T_HF": TOKEN})
    assert len(rp.changes) == 3 and rp.changes[0].summary.endswith("@main")
    assert {c[0] for c in calls} == {"https://hub.example"} and {c[3] for c in calls} == {TOKEN}
    assert calls[0][4] == {"token_env": "T_HF"}


def test_hub_errors_are_one_line_plan_errors(tmp_path: Path) -> None:
    te = catalog.TEXT_ENCODER
    only_dit = {(f.repo, f.path_in_repo): content(f) for f in FILES if f.folder == "diffusion_models"}
    with start_hf_server(only_dit) as s:
        with pytest.raises(PlanError) as err:
            plan(make_profile(s.url), make_facts())
    assert str(err.value) == f"model repo {te.repo} not found at {s.url} (if it is private, set T_HF)"

    everything = {(f.repo, f.path_in_repo): content(f) for f in FILES} | {(te.repo, "other"): b"x"}
    del everything[(te.repo, te.path_in_repo)]
    with start_hf_server(everything, gated={catalog.VAE.repo}, token=TOKEN, commits=catalog.PINNED_REVISIONS) as s:
        with pytest.raises(PlanError, match=f"^gated repo {te.repo} at .*: set T_HF to a token"):
            plan(make_profile(s.url), make_facts())
        with pytest.raises(PlanError, match=f"^model file {te.path_in_repo} not found in repo {te.repo} at rev {te.revision}$"):
            plan(make_profile(s.url), make_facts(), environ={"T_HF": TOKEN})
        url = s.url
    hub.clear_cache()
    with pytest.raises(PlanError, match=f"^Hub unreachable at {url}: ConnectError"):
        plan(make_profile(url), make_facts())


def test_a_connection_the_hub_resets_is_tried_once_more(server: HfServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reset connection (a loaded proxy in front of the Hub; once in CI, the stand-in on a loaded
    machine) costs the plan one more try, not the host; two in a row are the Hub's failure, named."""
    monkeypatch.setattr(hub, "RETRY_AFTER_S", 0.01)
    server.reset_next(2)
    with pytest.raises(PlanError, match=f"^Hub unreachable at {server.url}: .*[Rr]eset"):
        plan(make_profile(server.url), make_facts(), environ={"T_HF": TOKEN})
    assert server._resets == 0                                  # both taken: it did try again
    hub.clear_cache()
    server.reset_next(1)
    result = plan(make_profile(server.url), make_facts(), environ={"T_HF": TOKEN})
    assert [c.action for c in result.changes] == ["create"] * 3      # the DiT, the text encoder, the VAE
    assert server._resets == 0


def test_apply_then_plan_again_is_converged(server: HfServer, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Run the planned steps for real (the engine's step runner, fetch program over HTTP, token on
    stdin), read the files back with the facts script's own stat code, plan again: nothing left."""
    profile = make_profile(server.url, root=str(tmp_path / "ComfyUI"))
    cache = profile.comfyui.checksums
    monkeypatch.setenv("T_HF", TOKEN)
    run_step = StepRunner(LocalConnection(Host("local", transport="local")),
                          Reporter(Console(file=io.StringIO())))
    probe = models.probe(profile)
    gather = lambda: {p: FileState(p, **raw) for p, raw in stat_files(probe.stat, cache).items()}  # noqa: E731
    first = plan(profile, make_facts(files=gather()))
    assert [c.action for c in first.changes] == ["create"] * 3
    for change in first.changes:
        run_step(change.steps[0])
    assert plan(profile, make_facts(files=gather())).changes == ()

    # Lose the checksum cache: the files are still right, so only a verify (no download) is planned.
    Path(cache).unlink()
    changes = plan(profile, make_facts(files=gather())).changes
    assert [c.action for c in changes] == ["update"] * 3 and all(isinstance(c.steps[0], Run) for c in changes)
    cdn_before = sum(r.origin == "cdn" for r in server.requests)
    for change in changes:
        step = change.steps[0]
        assert subprocess.run(step.argv, input=step.stdin, capture_output=True, timeout=60).returncode == 0
    assert sum(r.origin == "cdn" for r in server.requests) == cdn_before
    assert plan(profile, make_facts(files=gather())).changes == ()


def test_parallel_plans_ask_the_hub_once_per_file(server: HfServer) -> None:
    """Hosts plan in parallel threads; the Hub is asked once per file, not once per host."""
    from concurrent.futures import ThreadPoolExecutor

    before = len(server.requests)
    repo, path = FILES[0].repo, FILES[0].path_in_repo
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda _: hub.file_metadata(server.url, repo, path), range(8)))
    assert len({r.sha256 for r in results}) == 1
    heads = [r for r in server.requests[before:] if r.origin == "hub"]
    assert len(heads) == 1


def header_facts(*paths: str) -> dict:
    """The real facts program's `headers` answer for these files (as a host gathers it)."""
    request = {"root": "/nonexistent", "python": "/nonexistent/python", "headers": list(paths)}
    out = subprocess.run(remote.argv("facts"), input=json.dumps(request), capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return parse_facts("h", json.loads(out)).headers


def test_fp4_file_under_the_int4_name_on_an_ada_host_is_refused(server: HfServer, tmp_path: Path) -> None:
    """A file is what its header says, not what its name says: an fp4 DiT renamed to the int4 name
    on an RTX 4090 (Ada, int4 only) is a plan error naming the file, never silently replaced."""
    rtx4090 = Gpu(0, "NVIDIA GeForce RTX 4090", 24564, 24000, 564, (8, 9), "550.120")
    profile = make_profile(server.url, root=str(tmp_path / "ComfyUI"))
    sel = catalog.resolve(FAMILY, VARIANT, "auto", rtx4090)
    dest = Path(sel.dit.dest(profile.comfyui.models))
    dest.parent.mkdir(parents=True)
    dest.write_bytes(content(catalog.dit_file(FAMILY, VARIANT, "fp4")))
    assert models.probe(profile).headers == (str(dest), str(dest).replace("svdq-int4", "svdq-fp4"))
    headers = header_facts(*models.probe(profile).headers)
    assert headers[str(dest)].metadata["model_class"] == "NunchakuQwenImageTransformer2DModel"
    facts = replace(make_facts(rtx4090, files=present(profile, sel)), headers=headers)
    with pytest.raises(PlanError) as err:
        plan(profile, facts)
    assert str(err.value) == (f"{dest}: its header declares fp4_e2m1_all rank 128 weights (quantization_config), "
                              "not int4 rank 128; NVIDIA GeForce RTX 4090 runs int4 rank 128 (lightning-4step-r128): "
                              "move the file away and apply again to download the right one")
    dest.write_bytes(content(sel.dit))                       # the real int4 file: fine
    facts = replace(facts, headers=header_facts(str(dest)))
    assert plan(profile, facts).changes == ()


@pytest.mark.parametrize(("data", "error"), [
    (b"<!DOCTYPE html><html>Access denied</html>", "not a safetensors file"),
    (b"\x10\x00", "not a safetensors file (2 bytes: too short for a header)"),
    (b"\x08\x00\x00\x00\x00\x00\x00\x00not-json", "not a safetensors header (JSONDecodeError)"),
])
def test_a_dit_that_is_not_safetensors_is_refused(server: HfServer, tmp_path: Path, data: bytes, error: str) -> None:
    profile = make_profile(server.url, root=str(tmp_path / "ComfyUI"))
    sel = catalog.resolve(FAMILY, VARIANT, "auto", RTX3090)
    dest = Path(sel.dit.dest(profile.comfyui.models))
    dest.parent.mkdir(parents=True)
    dest.write_bytes(data)
    facts = replace(make_facts(), headers=header_facts(str(dest)))
    with pytest.raises(PlanError, match=f"^{re.escape(str(dest))}: .*{re.escape(error)}"):
        plan(profile, facts)


# --- the control machine's record of the Hub ---------------------------------------------------

def test_converged_host_plans_with_the_hub_down(server: HfServer) -> None:
    """The Hub's answers are recorded on the control machine: planning a converged host again asks
    nothing, even with the Hub gone."""
    profile = make_profile(server.url)
    sel = catalog.resolve(FAMILY, VARIANT, "auto", RTX3090)
    assert plan(profile, make_facts(files=present(profile, sel))).changes == ()
    recorded = json.loads(hub_cache.path().read_text())
    (ref,) = recorded["refs"].items()
    assert ref[0] == f"{server.url} {sel.dit.repo} main" and ref[1]["commit"] == server.commit
    assert recorded["files"][f"{server.url} {sel.vae.repo} {catalog.VAE.revision} {sel.vae.path_in_repo}"] == \
        {"size": len(content(sel.vae)), "sha256": SHA[sel.vae.filename]}
    server.stop()
    hub.clear_cache()                                    # a new run: only the record on disk remains
    assert plan(profile, make_facts(files=present(profile, sel))).changes == ()
    fresh = plan(profile, make_facts())                 # a new host still gets its downloads planned
    assert [c.action for c in fresh.changes] == ["create"] * 3
    assert fresh.changes[0].steps[0].url.endswith(f"/resolve/{server.commit}/{sel.dit.path_in_repo}")


def test_an_upstream_reupload_downloads_nothing_until_asked(server: HfServer) -> None:
    profile = make_profile(server.url)
    sel = catalog.resolve(FAMILY, VARIANT, "auto", RTX3090)
    converged = make_facts(files=present(profile, sel))
    assert plan(profile, converged).changes == ()
    before = len(server.requests)
    new = server.reupload(sel.dit.repo, sel.dit.path_in_repo, content(sel.dit) + b"re-quantised")
    hub.clear_cache()
    assert plan(profile, converged).changes == () and len(server.requests) == before   # the Hub is not even asked

    hub_cache.forget_refs()                              # `provision plan --refresh-hub`
    hub.clear_cache()
    (change,) = plan(profile, converged).changes
    assert change.action == "replace" and change.steps[0].url.endswith(f"/resolve/{new}/{sel.dit.path_in_repo}")
    hub.clear_cache()
    assert plan(profile, converged).changes == (change,)  # recorded: the next run decides the same

    # A profile pinning the old commit keeps the fleet on it, whatever main is.
    pinned = make_profile(server.url, model={"revision": server.commit})
    assert plan(pinned, converged).changes == ()


def test_pinned_revision_is_asked_at_that_commit(server: HfServer) -> None:
    old = server.commit
    sel = catalog.resolve(FAMILY, VARIANT, "auto", RTX3090)
    server.reupload(sel.dit.repo, sel.dit.path_in_repo, b"a newer upload")
    (dit, _, _) = plan(make_profile(server.url, model={"revision": old}), make_facts()).changes
    assert dit.steps[0].url.endswith(f"/resolve/{old}/{sel.dit.path_in_repo}")
    assert dit.after == {"size": len(content(sel.dit)), "sha256": SHA[sel.dit.filename]}
    with pytest.raises(PlanError, match=f"^revision 'v0.0.0' not found in repo {sel.dit.repo}"):
        hub.clear_cache()
        plan(make_profile(server.url, model={"revision": "v0.0.0"}), make_facts())


@pytest.mark.parametrize("variant", ["lightning-251115-4step-r128", "lightning-251115-8step-r32"])
def test_the_lightning_251115_set_plans_and_downloads_from_its_folder(tmp_path: Path, variant: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The 2509 repository's second Lightning set lives in `lightning-251115/` (upstream's example
    workflow uses it since 2025-11-16): asked at that path, downloaded for real by the fetch program
    to models/diffusion_models/ under the file's own name, then converged."""
    rank, steps = catalog.rank_of(variant), int(variant.split("-")[2][0])
    files = catalog.candidate_files(FAMILY, variant, "auto")
    blobs = {(f.repo, f.path_in_repo): safetensors_standin(
        64_000, f.filename, precision=("fp4" if "svdq-fp4" in f.filename else "int4") if "svdq-" in f.filename else None,
        rank=rank if "svdq-" in f.filename else None) for f in files}
    name = f"svdq-int4_r{rank}-qwen-image-edit-2509-lightning-{steps}steps-251115.safetensors"
    assert ("nunchaku-ai/nunchaku-qwen-image-edit-2509", f"lightning-251115/{name}") in blobs
    with start_hf_server(blobs, token=TOKEN, commits=catalog.PINNED_REVISIONS) as hub_server:
        profile = make_profile(hub_server.url, root=str(tmp_path / "ComfyUI"), model={"variant": variant})
        monkeypatch.setenv("T_HF", TOKEN)
        run_step = StepRunner(LocalConnection(Host("local", transport="local")), Reporter(Console(file=io.StringIO())))
        probe = models.probe(profile)
        gather = lambda: {p: FileState(p, **raw) for p, raw in stat_files(probe.stat, profile.comfyui.checksums).items()}  # noqa: E731
        dit, *_ = first = plan(profile, make_facts(files=gather())).changes
        assert dit.steps[0].url.endswith(f"/resolve/{hub_server.commit}/lightning-251115/{name}")
        assert dit.key == f"{tmp_path}/ComfyUI/models/diffusion_models/{name}"
        for change in first:
            run_step(change.steps[0])
        assert (tmp_path / "ComfyUI" / "models" / "diffusion_models" / name).is_file()
        assert plan(profile, make_facts(files=gather())).changes == ()
    sel = catalog.resolve(FAMILY, variant, "auto", RTX3090)
    assert (sel.steps, sel.rank, sel.cfg, sel.lightning) == (steps, rank, 1.0, True)


THIRD = "someone/qwen-image-edit-2509-svdq"          # a third party publishing the catalog's file names
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_a_third_party_repository_needs_the_opt_in_and_a_pinned_commit(tmp_path: Path) -> None:
    """model.repo other than the family's official repository: refused by validation unless
    model.third_party and a model.revision commit say it is on purpose and fixed."""
    from provisioner.config import validate_files
    cases = {
        "no-opt-in.yaml": ({"repo": THIRD, "revision": COMMIT},
                           ["model.repo: 'someone/qwen-image-edit-2509-svdq' is not the official repository of "
                            "qwen-image-edit-2509 (nunchaku-ai/nunchaku-qwen-image-edit-2509) (set model.third_party: "
                            "true to take third-party weights)"]),
        "no-commit.yaml": ({"repo": THIRD, "third_party": True, "revision": "main"},
                           ["model.revision: third-party repository 'someone/qwen-image-edit-2509-svdq' without a "
                            "pinned commit (pin model.revision to a commit (40 hex digits) of that repository)"]),
        "ok.yaml": ({"repo": THIRD, "third_party": True, "revision": COMMIT}, []),
        "official.yaml": ({"repo": "nunchaku-ai/nunchaku-qwen-image-edit-2509"}, []),
    }
    templates = str(Path(__file__).resolve().parents[1] / "templates")
    for name, (model, expected) in cases.items():
        (tmp_path / name).write_text(yaml.safe_dump({"comfyui": {"root": "/srv/ComfyUI"}, "model": model,
                                                     "workflow": {"template_dir": templates}}))
        found = [str(p).split(": ", 1)[1] for p in validate_files([tmp_path / name])]   # after "FILE:LINE:COL"
        assert found == expected, (name, found)


def test_a_third_party_dit_is_asked_of_its_repository_at_the_pinned_commit(server: HfServer) -> None:
    blobs = {(THIRD if f.repo == catalog.official_repo(FAMILY) else f.repo, f.path_in_repo): content(f)
             for f in FILES}
    with start_hf_server(blobs, token=TOKEN, commits={THIRD: COMMIT, **catalog.PINNED_REVISIONS}) as third:
        profile = make_profile(third.url, model={"repo": THIRD, "third_party": True, "revision": COMMIT})
        dit, te, _ = plan(profile, make_facts()).changes
        assert dit.steps[0].url == f"{third.url}/{THIRD}/resolve/{COMMIT}/" \
            "svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-4steps.safetensors"
        assert te.steps[0].url.startswith(f"{third.url}/Comfy-Org/Qwen-Image_ComfyUI/resolve/")
