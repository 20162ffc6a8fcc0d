"""Fleet truth without hosts: fingerprints from real facts and real ComfyUI answers, groups and their
flags, references beside the report, changes since a previous report, report.json version 3."""

from __future__ import annotations

import copy
import functools
import gzip
import io
import json
from pathlib import Path

import jsonschema
import pytest
import numpy as np
from PIL import Image

from provisioner.config.model import AgreementSpec, ClassSpeedSpec, build_profile
from provisioner.report import HostEntry, build_report, from_verification, report_to_json, write_report
from provisioner.report.fleet import judge
from provisioner.report.json_report import SCHEMA_PATH
from provisioner.report.references import NO_STORE, ReferenceStore, agree
from provisioner.verify.agreement import KeyedImage, image_key
from provisioner.verify.checks import Check, Figures, HostVerification, RunResult
from provisioner.verify.fingerprint import Fingerprint, class_slug, fingerprint, gpu_class, launch_args, node_classes
from test_report import RTX3090, RTX4090, WHEN, facts_for

COMFY = Path(__file__).resolve().parents[1] / "provisioner" / "sandbox" / "captures" / "comfyui-0.3.64"
PROFILE = build_profile({"comfyui": {"root": "/opt/ComfyUI", "port": 8188}, "hosts": "gpus"},
                        name="rtx3090", file="profiles/rtx3090.yaml")
GRAPH = {"3": {"class_type": "KSampler", "inputs": {"seed": 42, "steps": 4}}}


@functools.lru_cache(maxsize=1)
def _object_info() -> str:
    with gzip.open(COMFY / "object_info.full.json.gz", "rt") as fh:
        return fh.read()


def object_info() -> dict:
    return json.loads(_object_info())


def stats(argv: list[str] | None = None) -> dict:
    raw = json.loads((COMFY / "system_stats.json").read_text())
    raw["system"]["argv"] = argv or ["main.py", "--listen", "127.0.0.1", "--port", "8188"]
    return raw


def test_fingerprint_from_real_facts_and_real_answers() -> None:
    facts = facts_for("gpu-01", RTX3090)
    fp = fingerprint(facts, PROFILE, stats(), object_info(), GRAPH)
    assert fp.gpu_class == "NVIDIA GeForce RTX 3090 24 GiB" == gpu_class(facts.gpu)
    assert class_slug(fp.gpu_class) == "nvidia-geforce-rtx-3090-24-gib"
    f = fp.fields
    assert (f["gpu"], f["compute_capability"], f["vram"], f["driver"]) == \
        ("NVIDIA GeForce RTX 3090", "8.6", "24.00 GiB", "550.120")
    assert (f["torch"], f["cuda"], f["python"], f["nunchaku"]) == ("2.6.0+cu124", "12.4", "3.11.9", "1.0.1+torch2.6")
    assert f["comfyui_version"] == "0.3.64" and f["launch_args"] == "main.py --listen 127.0.0.1 --port <comfyui.port>"
    assert len(fp.node_classes) == 478 and len(f["object_info"] or "") == 64 and len(f["workflow"] or "") == 64
    assert Fingerprint.from_json(json.loads(json.dumps(fp.to_json()))) == fp
    # Another port than the profile's is a real difference; other flags are too.
    assert launch_args(["main.py", "--port", "8190", "--lowvram"], 8188) == "main.py --port 8190 --lowvram"


def test_the_node_set_hash_ignores_file_lists_and_sees_classes_and_inputs() -> None:
    info = object_info()
    base = node_classes(info)
    more_files = copy.deepcopy(info)
    more_files["LoadImage"]["input"]["required"]["image"][0] = ["example.png", "provision_verify_input.png"]
    assert node_classes(more_files) == base                      # input/ files come and go
    extra = {**info, "ExtraSharpen": {**info["ImageInvert"], "python_module": "custom_nodes.ComfyUI-Extra"}}
    assert set(node_classes(extra)) - set(base) == {"ExtraSharpen"}
    changed = copy.deepcopy(info)
    changed["KSampler"]["input"]["required"]["denoise"][1]["max"] = 2.0
    assert node_classes(changed)["KSampler"] != base["KSampler"]


def fp(host: str, **fields: str) -> Fingerprint:
    values = {"gpu": "NVIDIA GeForce RTX 3090", "driver": "550.120", "torch": "2.6.0+cu124", "object_info": "a" * 64}
    values.update(fields)
    return Fingerprint("NVIDIA GeForce RTX 3090 24 GiB", values, {"models/x.safetensors": "b" * 64},
                       {"KSampler": "k1", **({"ExtraSharpen": "e1"} if values["object_info"] == "c" * 64 else {})})


def figures(warm: float, vram: float = 7.7) -> Figures:
    return Figures(cold_s=90.0, warm_median_s=warm, warm_max_s=warm, vram_peak_gib=vram)


def test_drift_flags_only_the_host_that_differs_from_its_groups_majority() -> None:
    members = [("a", fp("a"), figures(4.0)), ("b", fp("b"), figures(4.1)),
               ("c", fp("c", driver="535.183", object_info="c" * 64), figures(4.0)), ("d", fp("d"), figures(3.9))]
    (group,), flags = judge(members, "rtx3090", ClassSpeedSpec())
    assert group.hosts == ("a", "b", "c", "d") and group.values["driver"] == "550.120" and group.warm_median_s == 4.0
    assert [(f.host, f.kind, f.field) for f in flags] == [("c", "drift", "driver"), ("c", "drift", "object_info")]
    assert flags[0].message == "driver 535.183, its group has 550.120 (3 of 4 hosts)"
    assert flags[1].message == "node set differs from its group's (3 of 4 hosts): + ExtraSharpen"
    # Two hosts that disagree: no majority, both are flagged.
    _, split = judge([("a", fp("a"), figures(4.0)), ("b", fp("b", torch="2.7.0+cu128"), figures(4.0))],
                     None, ClassSpeedSpec())
    assert {f.host for f in split} == {"a", "b"} and "its group is split" in split[0].message


def test_class_speed_against_the_other_hosts_of_the_class() -> None:
    members = [(n, fp(n), figures(w, v)) for n, w, v in
               [("a", 4.0, 7.7), ("b", 4.1, 7.7), ("c", 6.2, 7.7), ("d", 4.0, 9.1), ("e", 4.9, 7.7)]]
    _, flags = judge(members, None, ClassSpeedSpec())
    assert [(f.host, f.kind) for f in flags] == [("c", "class_slower"), ("d", "class_more_vram")]
    assert flags[0].message == "warm median 6.20 s, its class 4.05 s (median of 4 hosts, +53%)"
    assert (flags[0].expected, flags[0].actual) == (4.05, 6.2)
    # e is 21 % slower: under the 25 % bar, not flagged; with a 10 % bar it is.
    _, strict = judge(members, None, ClassSpeedSpec(slower_factor=1.1, slower_min_s=0.5))
    assert ("e", "class_slower") in [(f.host, f.kind) for f in strict]


def png(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(out, format="PNG")
    return out.getvalue()


def scene(noise: float = 0.0, seed: int = 0) -> np.ndarray:
    y, x = np.mgrid[0:128, 0:128].astype(np.float32)
    base = np.stack([60 + x, 90 + y / 2, 200 - y], -1)
    return np.clip(base + np.random.default_rng(seed).normal(0, noise, base.shape), 0, 255).astype(np.uint8)


KEY = image_key("a fox", 42, GRAPH)


def host(name: str, image: np.ndarray, passed: bool = True, gpu: str = "NVIDIA GeForce RTX 3090 24 GiB") -> HostVerification:
    return HostVerification(name, (Check("generation", passed, "ran"),), (), "0.3.64",
                            fingerprint=Fingerprint(gpu, {}), images=(KeyedImage(KEY, "a fox", 42, png(image)),))


def test_without_a_store_the_check_says_so() -> None:
    out = agree({"a": host("a", scene())}, None, {}, now="t")
    assert out.verifications["a"].checks[-1] == Check("image_agreement", True, NO_STORE)


def test_the_first_run_makes_the_reference_from_the_classs_consensus_then_it_is_kept(tmp_path: Path) -> None:
    store = ReferenceStore(tmp_path)
    hosts = {"a-noisy": host("a-noisy", scene(40, 1)), "b": host("b", scene(1, 2)), "c": host("c", scene(1, 3)),
             "d-failed": host("d-failed", scene(), passed=False)}
    out = agree(hosts, store, {}, now="2026-11-24T10:00:00Z")
    index = json.loads((tmp_path / "references" / "index.json").read_text())["references"]
    (entry,) = index.values()
    assert entry["host"] in ("b", "c") and entry["file"] == f"nvidia-geforce-rtx-3090-24-gib/{KEY}.png"
    result = {n: v.checks[-1] for n, v in out.verifications.items()}
    assert not result["a-noisy"].passed and result["b"].passed and result["c"].passed
    assert out.notes == (f"reference for NVIDIA GeForce RTX 3090 24 GiB, 'a fox' seed 42: made from {entry['host']}'s image",)
    # The next run compares with it and makes none: even a lone noisy host fails against it.
    again = agree({"a-noisy": host("a-noisy", scene(40, 1))}, ReferenceStore(tmp_path), {}, now="later")
    assert not again.verifications["a-noisy"].checks[-1].passed and again.notes == ()
    # A looser floor from the host's profile lets it pass.
    loose = agree({"a-noisy": host("a-noisy", scene(40, 1))}, ReferenceStore(tmp_path),
                  {"a-noisy": AgreementSpec(psnr_min_db=10, ssim_min=0.0)}, now="later")
    assert loose.verifications["a-noisy"].checks[-1].passed


def test_each_host_is_judged_as_alone_whoever_made_the_reference_or_its_panel(tmp_path: Path) -> None:
    """The reference's panel is made once for all its hosts, and the host it was made from is not
    decoded again: every figure and panel is what a comparison of that host alone gives."""
    from provisioner.report.references import Reference
    from provisioner.verify.agreement import compare, decode

    hosts = {"b": host("b", scene(1, 2)), "c": host("c", scene(1, 3)), "d": host("d", scene(9, 4))}
    out = agree(hosts, ReferenceStore(tmp_path), {}, now="t")
    (entry,) = json.loads((tmp_path / "references" / "index.json").read_text())["references"].values()
    made = Reference.from_json(entry)
    reference = decode((tmp_path / "references" / entry["file"]).read_bytes())
    for name, ver in hosts.items():
        (alone,) = [compare(reference, decode(ver.images[0].png), AgreementSpec(), key=KEY, prompt="a fox", seed=42,
                            source=made)]
        assert out.verifications[name].agreement == (alone,), name
    maker = out.verifications[entry["host"]].agreement[0]
    assert maker.detail == "identical pixels" and maker.panels[0] == maker.panels[1]


def test_images_sketched_during_their_verification_are_judged_as_the_bare_ones(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A verification sketches each kept image (shape, small copy, panel) while it runs: the fleet's
    judgement then decodes no image to choose the reference, nor the reference itself when every
    holder has its very bytes; the outcome is the one the bare images get."""
    from dataclasses import replace

    from provisioner.report import references
    from provisioner.verify.agreement import sketch

    def sketched(ver: HostVerification) -> HostVerification:
        return replace(ver, images=tuple(replace(i, sketch=sketch(i.png)) for i in ver.images))

    decoded: list[int] = []
    real_decode = references.decode
    monkeypatch.setattr(references, "decode", lambda png: decoded.append(len(png)) or real_decode(png))
    fleets = [{"b": host("b", scene(1, 2)), "c": host("c", scene(1, 3)), "d": host("d", scene(9, 4)),
               "x": host("x", scene(40), passed=False)},
              {"solo": host("solo", scene(1, 2))}]
    for n, hosts in enumerate(fleets):
        bare = agree(hosts, ReferenceStore(tmp_path / f"bare{n}"), {}, now="t")
        decoded.clear()
        quick = agree({k: sketched(v) for k, v in hosts.items()}, ReferenceStore(tmp_path / f"sketched{n}"), {}, now="t")
        assert quick.notes == bare.notes and quick.problems == bare.problems
        assert {k: v.agreement for k, v in quick.verifications.items()} == \
            {k: v.agreement for k, v in bare.verifications.items()}
        assert {k: v.checks for k, v in quick.verifications.items()} == {k: v.checks for k, v in bare.verifications.items()}
        # Decoded: each host that differs from the reference, and the reference once for them.
        assert len(decoded) == (1 + len(hosts) - 1 if len(hosts) > 1 else 0)
    # A later run against the kept reference: a host with other bytes decodes it and itself.
    decoded.clear()
    again = agree({"e": sketched(host("e", scene(1, 5)))}, ReferenceStore(tmp_path / "sketched0"), {}, now="t2")
    assert again.verifications["e"].checks[-1].passed and len(decoded) == 2


def test_promotion_replaces_the_reference_and_refuses_a_failed_host(tmp_path: Path) -> None:
    agree({"b": host("b", scene(1, 2))}, ReferenceStore(tmp_path), {}, now="t1")
    refused = agree({"x": host("x", scene(40), passed=False)}, ReferenceStore(tmp_path), {}, now="t2", promote="x")
    assert refused.problems == ("x's images were not promoted: it failed verification (generation: ran)",)
    done = agree({"n": host("n", scene(30, 9)), "b": host("b", scene(1, 2))}, ReferenceStore(tmp_path), {},
                 now="t3", promote="n")
    (entry,) = json.loads((tmp_path / "references" / "index.json").read_text())["references"].values()
    assert (entry["host"], entry["promoted"], entry["created_at"]) == ("n", True, "t3")
    assert done.verifications["n"].checks[-1].passed and not done.verifications["b"].checks[-1].passed
    # Another GPU class keeps its own references.
    other = agree({"z": host("z", scene(40), gpu="NVIDIA GeForce RTX 4090 24 GiB")}, ReferenceStore(tmp_path), {}, now="t4")
    assert other.verifications["z"].checks[-1].passed and len(ReferenceStore(tmp_path).entries()) == 2


def entry(name: str, row: str, agreement_store: Path | None = None, warm: float = 4.0, **fields: str) -> HostEntry:
    facts = facts_for(name, row)
    run = RunResult("a fox", "warm", 43, "p", warm, warm, 7900, None)
    ver = HostVerification(name, (Check("generation", True, "ran"),), (run,), "0.3.64",
                           fingerprint=fingerprint(facts, PROFILE, stats(), object_info(), {**GRAPH, **fields}))
    return from_verification(name, facts, ver, profile=PROFILE)


def test_report_json_v3_and_changes_since_the_previous_report(tmp_path: Path) -> None:
    first = build_report([entry("gpu-01", RTX3090), entry("gpu-02", RTX3090), entry("gpu-03", RTX4090, warm=9.0)],
                         profile="rtx3090", generated_at=WHEN)
    doc = report_to_json(first)
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()), cls=jsonschema.Draft202012Validator)
    assert [g["gpu_class"] for g in doc["groups"]] == ["NVIDIA GeForce RTX 3090 24 GiB", "NVIDIA GeForce RTX 4090 24 GiB"]
    assert doc["fleet"] == [] and list(doc["node_sets"]) == [doc["hosts"][0]["fingerprint"]["object_info"]]
    assert "node_classes" not in doc["hosts"][0]["fingerprint"]
    write_report(tmp_path, first)
    # gpu-01's workflow changed; gpu-03 is alone in its class now and slower than it was there.
    second = build_report([entry("gpu-01", RTX3090, **{"9": {"class_type": "SaveImage"}}), entry("gpu-02", RTX3090),
                           entry("gpu-04", RTX4090, warm=14.0)], profile="rtx3090", generated_at=WHEN)
    paths = write_report(tmp_path, second)
    (change,) = paths.report.changes
    assert (change.host, change.field, change.kind) == ("gpu-01", "workflow", "changed")
    assert [(f.host, f.kind) for f in paths.report.fleet] == [("gpu-01", "drift"), ("gpu-02", "drift"),
                                                             ("gpu-04", "class_slower")]   # a group of 2, split
    assert "its class in the previous report (2026-11-24T10:00:00Z) 9.00 s" in paths.report.fleet[2].message
    doc = json.loads(paths.json.read_text())
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()), cls=jsonschema.Draft202012Validator)
    assert doc["summary"]["changes"] == 1 and doc["changes"][0]["field"] == "workflow"
    assert doc["summary"]["flagged"] == 3
    html = paths.html.read_text()
    assert "CHANGED" in html and "CLASS SLOWER" in html and "Groups: hosts that should be identical" in html


def test_a_version_2_report_is_still_compared_without_fingerprints(tmp_path: Path) -> None:
    report = build_report([entry("gpu-01", RTX3090)], profile="rtx3090", generated_at=WHEN)
    old = report_to_json(report)
    old["version"] = 2
    for h in old["hosts"]:
        del h["fingerprint"], h["agreement"]
    (tmp_path / "report.json").write_text(json.dumps(old))
    paths = write_report(tmp_path, report)
    assert paths.report.comparison_note is None and paths.report.changes == ()
