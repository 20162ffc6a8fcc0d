"""Fleet report: built from real verify/facts shapes, checked against its schema, JUnit, regressions, escaping."""

from __future__ import annotations

import copy
import io
import json
import re
import xml.etree.ElementTree as ET
from functools import lru_cache
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path

import jsonschema
import pytest
from PIL import Image, ImageDraw

from provisioner.catalog import models as catalog
from provisioner.config.model import Thresholds, build_profile
from provisioner.errors import ConnectError, ProvisionError
from provisioner.facts import parse_facts
from provisioner.report import (
    HostEntry,
    build_report,
    from_exception,
    from_verification,
    read_previous,
    render_html,
    render_junit,
    report_to_json,
    write_report,
)
from provisioner.report import html
from provisioner.report.json_report import SCHEMA_PATH
from provisioner.verify import checks
from provisioner.verify.checks import Check, HostVerification, RunResult
from provisioner.verify.images import check_image, thumbnail

REPO = Path(__file__).resolve().parents[1]
COMFY = REPO / "provisioner" / "sandbox" / "captures" / "comfyui-0.3.64"
FACTS_CASE = Path(__file__).parent / "facts" / "h100-real-backend.json"
THRESHOLDS = Thresholds(warm_seconds=10.0, cold_seconds=180.0, vram_gib=12.0)
PROMPT = "a red fox in the snow, photograph"
PROFILE = build_profile({"comfyui": {"root": "/opt/ComfyUI"}, "hosts": "gpus"},
                        name="rtx3090", file="profiles/rtx3090.yaml")
WHEN = datetime(2026, 11, 24, 10, 0, tzinfo=timezone.utc)


# --- realistic hosts, built with the real facts parser and verify's own checks ----------------

def facts_for(host: str, gpu_row: str, torch: str = "2.6.0+cu124", nunchaku: str = "1.0.1+torch2.6"):
    answer = copy.deepcopy(json.loads(FACTS_CASE.read_text())["answer"])
    answer["nvidia_smi"]["stdout"] = gpu_row + "\n"
    info = answer["env"]["info"]
    info.update(version="3.11.9", tag="cp311", torch=torch, torch_cuda=torch.partition("+cu")[2][:2] + "."
                + torch.partition("+cu")[2][2:])
    for dist in info["distributions"]:
        dist["version"] = {"torch": torch, "nunchaku": nunchaku}.get(dist["name"], dist["version"])
        if dist["name"] == "nunchaku" and "+torch" not in nunchaku:      # PyPI's unrelated package
            dist.update(home="", summary="Optimally partition data into piece-wise linear segments")
    return parse_facts(host, answer)


# nvidia-smi --query-gpu rows (the facts script's query), as these cards print them
RTX3090 = ("0, NVIDIA GeForce RTX 3090, GPU-5b1c0e2a-3f4d-4e5f-8a9b-0c1d2e3f4a5b, 24576, 310, 24266, "
           "550.120, 8.6, 00000000:01:00.0")
RTX4090 = ("0, NVIDIA GeForce RTX 4090, GPU-7c2d1f3b-4a5e-4f60-9bac-1d2e3f4a5b6c, 24564, 280, 24284, "
           "560.35.03, 8.9, 00000000:41:00.0")
A4000 = ("0, NVIDIA RTX A4000, GPU-8d3e2a4c-5b6f-4071-8cbd-2e3f4a5b6c7d, 16376, 200, 16176, "
         "550.120, 8.6, 00000000:21:00.0")


@lru_cache(maxsize=None)
def picture(seed: int, black: bool = False) -> bytes:
    """A smooth synthetic photo-like PNG (sky, snow, an orange fox shape), or an all-black one."""
    img = Image.new("RGB", (1024, 1024), (0, 0, 0))
    if not black:
        draw = ImageDraw.Draw(img)
        for y in range(1024):
            shade = 150 + y * 90 // 1024
            draw.line([(0, y), (1023, y)], fill=(shade - 40, shade - 10 + seed % 20, shade + 20))
        draw.rectangle([0, 700, 1023, 1023], fill=(236, 240, 246))
        x = 300 + (seed * 37) % 300
        draw.ellipse([x, 520, x + 360, 760], fill=(205, 92, 30))
        draw.ellipse([x + 280, 450, x + 430, 580], fill=(215, 100, 36))
        draw.polygon([(x - 160, 640), (x + 10, 600), (x + 10, 680)], fill=(190, 85, 28))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


@lru_cache(maxsize=None)
def run(kind: str, seed: int, seconds: float, vram_mib: int, black: bool = False) -> RunResult:
    png = picture(seed, black)
    return RunResult(PROMPT, kind, seed, f"pid-{seed}", seconds, seconds + 0.31, vram_mib,  # type: ignore[arg-type]
                     check_image(png, (1024, 1024)), thumbnail(png, 96))


def stats(name: str, total_gib: int) -> dict:
    total = total_gib << 30
    return {"system": {"comfyui_version": "0.3.64"},
            "devices": [{"name": f"cuda:0 {name} : cudaMallocAsync", "type": "cuda",
                         "vram_total": total, "vram_free": total - (310 << 20)}]}


def verified(host: str, gpu: str, runs: list[RunResult]) -> HostVerification:
    peak = max(r.vram_peak_mib or 0 for r in runs)
    figures = HostVerification(host, (), tuple(runs), vram_peak_mib=peak, vram_baseline_mib=310).figures
    found = [checks.reachable(stats(gpu, 24), "127.0.0.1:8188"),
             Check("device", True, f"ComfyUI runs on cuda:0 {gpu} : cudaMallocAsync"),
             Check("nodes_registered", True, "NunchakuQwenImageDiTLoader registered with cpu_offload"),
             Check("workflow_accepted", True, "9 nodes validated by ComfyUI"),
             Check("comfyui_ready", True, "a first generation completed"),
             Check("generation", True, f"{len(runs)} runs (1 cold) of 1 prompt(s) completed", float(len(runs)))]
    found += checks.judge(runs, figures, THRESHOLDS, "nvidia-smi stream and /system_stats")
    return HostVerification(host, tuple(found), tuple(runs), "0.3.64", f"cuda:0 {gpu}", peak, 310)


def fleet_entries(host_names: dict[str, str] | None = None, warm: float = 4.02,
                  vram: int = 8090) -> list[HostEntry]:
    """The five hosts of the brief; `host_names` renames them (hostile names, for escaping tests)."""
    n = {k: k for k in ("gpu-3090-a", "gpu-3090-nonodes", "gpu-4090-black", "gpu-a4000-slow", "gpu-offline")}
    n.update(host_names or {})
    healthy = verified(n["gpu-3090-a"], "NVIDIA GeForce RTX 3090",
                       [run("cold", 42, 98.4, vram), run("warm", 43, warm, vram - 12),
                        run("warm", 44, warm + 0.07, vram - 5)])
    # ComfyUI-nunchaku loaded without its backend: the real /object_info of that state.
    object_info = json.loads((COMFY / "object_info.nunchaku-plugin-without-backend.json").read_text())
    no_nodes = HostVerification(n["gpu-3090-nonodes"], (
        checks.reachable(stats("NVIDIA GeForce RTX 3090", 24), "127.0.0.1:8188"),
        checks.nodes(object_info, {"3": {"class_type": "NunchakuQwenImageDiTLoader"}},
                     catalog.required_nodes("qwen-image-edit-2509"), "custom_nodes.ComfyUI-nunchaku",
                     "PyPI's unrelated nunchaku 0.16.1", lambda node: None),
        Check("workflow_accepted", False, "invalid_prompt: Cannot execute because node "
              "NunchakuQwenImageDiTLoader does not exist."),
    ), (), "0.3.64", "cuda:0 NVIDIA GeForce RTX 3090")
    black = verified(n["gpu-4090-black"], "NVIDIA GeForce RTX 4090",
                     [run("cold", 42, 61.0, 8200, black=True), run("warm", 43, 2.9, 8190, black=True),
                      run("warm", 44, 2.95, 8190, black=True)])
    slow = verified(n["gpu-a4000-slow"], "NVIDIA RTX A4000",
                    [run("cold", 42, 150.2, 9800), run("warm", 43, 21.7, 9790), run("warm", 44, 22.4, 9795)])
    return [
        from_verification(n["gpu-3090-a"], facts_for(n["gpu-3090-a"], RTX3090), healthy, profile=PROFILE),
        from_verification(n["gpu-3090-nonodes"], facts_for(n["gpu-3090-nonodes"], RTX3090, nunchaku="0.16.1"),
                          no_nodes, profile=PROFILE),
        from_verification(n["gpu-4090-black"], facts_for(n["gpu-4090-black"], RTX4090), black, profile=PROFILE),
        from_verification(n["gpu-a4000-slow"], facts_for(n["gpu-a4000-slow"], A4000), slow, profile=PROFILE),
        from_exception(n["gpu-offline"], ConnectError(
            f"{n['gpu-offline']}: ssh: connect to host 10.20.0.9 port 22: Connection timed out "
            "(is the host up? check the inventory address)")),
    ]


def fleet_report(**kw: object):
    return build_report(fleet_entries(**kw), profile="rtx3090", generated_at=WHEN)  # type: ignore[arg-type]


# --- model and report.json ---------------------------------------------------------------------

def test_statuses_order_and_failures() -> None:
    report = fleet_report()
    order = [(h.host, h.status) for h in report.hosts]
    assert order == [("gpu-3090-nonodes", "failed"), ("gpu-4090-black", "failed"),
                     ("gpu-a4000-slow", "failed"), ("gpu-offline", "unreachable"), ("gpu-3090-a", "passed")]
    by = {h.host: h for h in report.hosts}
    assert by["gpu-3090-a"].failures == ()
    assert by["gpu-3090-nonodes"].failures[0].startswith(
        "nodes_registered: NunchakuQwenImageDiTLoader is not registered: ComfyUI's venv holds PyPI's "
        "unrelated nunchaku 0.16.1, not the backend (it registered only NunchakuDepthPreprocessor, "
        "NunchakuWheelInstaller)")
    assert any(f.startswith("images_ok: 3/3 images bad") and "black" in f for f in by["gpu-4090-black"].failures)
    assert by["gpu-a4000-slow"].failures == ("warm_time: warm median 22.05 s (2 runs) > 10 s",)
    assert "Connection timed out" in by["gpu-offline"].failures[0]
    assert all("\n" not in f for h in report.hosts for f in h.failures)


def test_figures_facts_and_versions() -> None:
    host = {h.host: h for h in fleet_report().hosts}["gpu-3090-a"]
    assert host.figures.cold_s == 98.4 and host.figures.warm_median_s == pytest.approx(4.055)
    assert host.figures.warm_max_s == pytest.approx(4.09)
    assert host.figures.vram_peak_gib == 7.9 and host.figures.vram_baseline_gib == 0.3
    assert [(r.seed, r.prompt_id) for r in host.runs] == [(42, "pid-42"), (43, "pid-43"), (44, "pid-44")]
    f = host.facts
    assert (f.gpu, f.vram_total_mib, f.compute_capability, f.driver) == \
        ("NVIDIA GeForce RTX 3090", 24576, "8.6", "550.120")
    assert (f.torch, f.cuda, f.python_tag) == ("2.6.0+cu124", "12.4", "cp311")
    assert dict(host.versions) == {"plugin": "v1.1.0", "backend": "1.0.1+torch2.6", "diffusers": "0.35.2",
                                   "peft": "0.21.0", "model_variant": "lightning-4step-r128",
                                   "precision": "int4 (auto)", "comfyui": "0.3.64"}
    impostor = {h.host: h for h in fleet_report().hosts}["gpu-3090-nonodes"]
    assert impostor.versions["backend"] == "PyPI impostor 0.16.1"
    assert len(host.thumbnails) == 3 and all(png.startswith(b"\x89PNG") for _, png in host.thumbnails)


def test_summary() -> None:
    s = fleet_report().summary
    assert (s.hosts, s.passed, s.failed, s.unreachable) == (5, 1, 3, 1)
    assert s.fastest_warm.host == "gpu-4090-black" and s.slowest_warm.host == "gpu-a4000-slow"
    assert s.max_vram.host == "gpu-a4000-slow" and s.max_vram.value == pytest.approx(9.57, abs=0.01)


def test_report_json_matches_its_schema() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    doc = report_to_json(fleet_report())
    jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)
    assert doc["version"] == 4 and doc["generated_at"] == "2026-11-24T10:00:00Z"
    assert doc["summary"]["max_vram_gib"]["host"] == "gpu-a4000-slow"
    black = next(h for h in doc["hosts"] if h["host"] == "gpu-4090-black")
    assert black["runs"][0]["image"]["ok"] is False and "black" in black["runs"][0]["image"]["reasons"][0]
    assert (black["runs"][1]["seed"], black["runs"][1]["prompt_id"]) == (43, "pid-43")
    assert black["figures"]["vram_peak_gib"] == 8.01                  # 8200 MiB, in GiB like every figure
    assert "thumbnail" not in json.dumps(doc)         # pictures live in report.html only


def test_schema_rejects_what_it_documents_as_wrong() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    doc = report_to_json(fleet_report())
    doc["hosts"][0]["status"] = "ok"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema, cls=jsonschema.Draft202012Validator)


def test_docs_describe_every_schema_field() -> None:
    doc = (REPO / "docs" / "report-schema.md").read_text()

    def names(node: dict) -> set[str]:
        found = set(node.get("properties", {}))
        for child in list(node.get("properties", {}).values()) + list(node.get("$defs", {}).values()):
            found |= names(child)
            for key in ("items",):
                if isinstance(child.get(key), dict):
                    found |= names(child[key])
            for alt in child.get("oneOf", ()):
                found |= names(alt)
        return found

    missing = sorted(n for n in names(json.loads(SCHEMA_PATH.read_text())) if f"`{n}`" not in doc)
    assert not missing, f"docs/report-schema.md does not describe {missing}"


def test_bad_entries_are_one_line_errors() -> None:
    with pytest.raises(ProvisionError, match="status 'ok'; use passed, failed, unreachable or left"):
        HostEntry("h", "ok")  # type: ignore[arg-type]
    with pytest.raises(ProvisionError, match="'h' is listed twice"):
        build_report([HostEntry("h", "passed"), HostEntry("h", "failed", "x")])


def test_passed_status_with_a_failed_check_is_shown_failed() -> None:
    ver = {"checks": [{"name": "images_ok", "passed": False, "detail": "1/3 images bad"}], "runs": []}
    (host,) = build_report([HostEntry("h", "passed", verification=ver)]).hosts
    assert host.status == "failed" and host.failures == ("images_ok: 1/3 images bad",)


def test_nan_figures_become_null() -> None:
    ver = {"checks": [{"name": "vram_peak", "passed": True, "detail": "?", "value": float("nan")}],
           "runs": [{"prompt": "p", "kind": "warm", "seconds_comfy": float("inf"), "seconds_wall": 3.0,
                     "vram_peak_mib": None, "image": None}]}
    doc = report_to_json(build_report([HostEntry("h", "passed", verification=ver)]))
    assert doc["hosts"][0]["checks"][0]["value"] is None and doc["hosts"][0]["figures"]["warm_median_s"] == 3.0


# --- junit.xml ---------------------------------------------------------------------------------

def test_junit_suites_cases_failures_and_errors() -> None:
    root = ET.fromstring(render_junit(fleet_report()))
    assert root.tag == "testsuites" and root.get("tests") == str(sum(
        int(s.get("tests")) for s in root.findall("testsuite")))
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert set(suites) == {"gpu-3090-a", "gpu-3090-nonodes", "gpu-4090-black", "gpu-a4000-slow", "gpu-offline"}
    ok = suites["gpu-3090-a"]
    assert (ok.get("tests"), ok.get("failures"), ok.get("errors")) == ("10", "0", "0")
    assert [c.get("name") for c in ok.findall("testcase")][:3] == ["comfyui_reachable", "device", "nodes_registered"]
    slow = suites["gpu-a4000-slow"]
    (failure,) = slow.findall("testcase/failure")
    assert failure.get("message") == "warm median 22.05 s (2 runs) > 10 s"
    offline = suites["gpu-offline"]
    assert offline.get("errors") == "1" and offline.find("testcase").get("name") == "reachable"
    assert "Connection timed out" in offline.find("testcase/error").get("message")
    props = {p.get("name"): p.get("value") for p in ok.findall("properties/property")}
    assert props["facts.gpu"] == "NVIDIA GeForce RTX 3090" and props["versions.plugin"] == "v1.1.0"
    assert props["figures.vram_peak_gib"] == "7.9"                    # GiB, named so, like everywhere
    assert root.get("failures") == "4" and root.get("errors") == "1"


def test_junit_escapes_and_drops_control_characters() -> None:
    evil = 'gpu-<b>&"\x1b[31m'
    report = build_report([HostEntry(evil, "unreachable", 'ssh: "<refused>" & \x00gone\x1b[0m')])
    data = render_junit(report)
    root = ET.fromstring(data)                       # parses: escaped, no raw control bytes
    assert b"\x1b" not in data and b"\x00" not in data
    assert root.find("testsuite").get("name") == 'gpu-<b>&"\ufffd[31m'
    assert root.find("testsuite/testcase/error").text == 'ssh: "<refused>" & \ufffdgone\ufffd[0m'


# --- comparison with the previous report -------------------------------------------------------

def test_regressions_between_two_reports(tmp_path: Path) -> None:
    first = write_report(tmp_path / "reports", fleet_report())
    assert first.previous is None and first.regressions == () and first.report.comparison_note == "no previous report"
    # The healthy host got slower and hungrier, the offline one came back, the slow one went away.
    entries = fleet_entries(warm=6.1, vram=8700)
    entries = [e for e in entries if e.host != "gpu-offline"] + [
        HostEntry("gpu-offline", "passed", versions={"plugin": "v1.1.0"},
                  verification={"passed": True, "checks": [{"name": "comfyui_reachable", "passed": True,
                                                            "detail": "ok"}], "runs": []})]
    black = next(e for e in entries if e.host == "gpu-4090-black")
    entries[entries.index(black)] = HostEntry("gpu-4090-black", "unreachable", "ssh: No route to host")
    second = write_report(tmp_path / "reports", build_report(entries, profile="rtx3090"))
    lines = sorted(f.line for f in second.regressions)
    assert lines == [
        "gpu-3090-a: REGRESSION VRAM peak 8.50 GiB, was 7.90 GiB (+8%)",
        "gpu-3090-a: REGRESSION warm median 6.13 s, was 4.05 s (+51%)",
        "gpu-4090-black: REGRESSION now unreachable (was failed): ssh: No route to host",
    ]
    assert [f.kind for f in second.improvements] == ["reachable"]
    previous = json.loads((tmp_path / "reports" / "report.previous.json").read_text())
    assert previous["generated_at"] == "2026-11-24T10:00:00Z"
    doc = json.loads(second.json.read_text())
    assert doc["comparison"]["baseline"] == "2026-11-24T10:00:00Z"
    assert {r["kind"] for r in doc["regressions"]} == {"slower", "more_vram", "unreachable"}
    assert "REGRESSION" in second.html.read_text() and "was 4.05 s" in second.html.read_text()


def test_a_version_1_report_is_still_compared_its_gb_figures_read_as_gib(tmp_path: Path) -> None:
    old = report_to_json(fleet_report())
    old["version"] = 1
    for host in old["hosts"]:
        host["figures"]["vram_peak_gb"] = host["figures"].pop("vram_peak_gib")
    (tmp_path / "report.json").write_text(json.dumps(old))
    paths = write_report(tmp_path, build_report(fleet_entries(vram=8700), profile="rtx3090"))
    assert paths.report.baseline == "2026-11-24T10:00:00Z"
    assert [f.line for f in paths.regressions] == ["gpu-3090-a: REGRESSION VRAM peak 8.50 GiB, was 7.90 GiB (+8%)"]


def test_new_check_failure_and_fix(tmp_path: Path) -> None:
    def entry(images_ok: bool, warm: float) -> HostEntry:
        ver = {"checks": [{"name": "images_ok", "passed": images_ok, "detail": "3 images" if images_ok else
                           "1/3 images bad; black"}],
               "runs": [{"prompt": "p", "kind": "warm", "seconds_comfy": warm, "seconds_wall": warm + 0.2,
                         "vram_peak_mib": 8000, "image": None}]}
        return HostEntry("h", "passed" if images_ok else "failed", verification=ver)

    write_report(tmp_path, build_report([entry(True, 4.0)]))
    # +0.4 s is over 20 % but under the +0.5 s floor: not "slower".
    broke = write_report(tmp_path, build_report([entry(False, 4.4)]))
    assert [(f.kind, f.message) for f in broke.regressions] == [
        ("new_failure", "images_ok now fails: 1/3 images bad; black")]
    fixed = write_report(tmp_path, build_report([entry(True, 4.4)]))
    assert [f.kind for f in fixed.improvements] == ["fixed"] and fixed.regressions == ()


def test_unreadable_or_foreign_previous_is_noted_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text("{not json")
    paths = write_report(tmp_path, fleet_report())
    assert "not JSON" in paths.report.comparison_note and paths.regressions == ()
    assert (tmp_path / "report.previous.json").read_text() == "{not json"
    assert read_previous(b'{"version": 99, "hosts": []}')[1] == \
        "previous report.json is version 99, this is 4: not compared"


def test_write_is_atomic_and_complete(tmp_path: Path) -> None:
    paths = write_report(tmp_path / "a" / "b", fleet_report())
    names = sorted(p.name for p in paths.directory.iterdir())
    assert names == ["junit.xml", "report.html", "report.json"]      # no temp files left behind
    assert json.loads(paths.json.read_text())["summary"]["hosts"] == 5


def test_unwritable_directory_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ProvisionError, match=r"^cannot write the report to .*file/r: .*--report directory\)$"):
        write_report(tmp_path / "file" / "r", fleet_report())


# --- report.html -------------------------------------------------------------------------------

class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_html_is_self_contained_and_failures_come_first() -> None:
    page = render_html(fleet_report())
    parsed = _Collect()
    parsed.feed(page)
    assert "script" not in parsed.tags and "link" not in parsed.tags
    sources = [v for k, v in parsed.attrs if k in ("src", "href")]
    assert sources and all(v.startswith(("data:image/png;base64,", "#")) for v in sources)
    assert not re.search(r"https?://", page.replace("http://127.0.0.1:8188", ""))  # nothing to fetch
    text = " ".join(parsed.text)
    sections = [m.group(1) for m in re.finditer(r'<h2>([^<]+)</h2>', page)]
    assert sections == ["gpu-3090-nonodes", "gpu-4090-black", "gpu-a4000-slow", "gpu-offline", "gpu-3090-a"]
    for needle in ("NVIDIA GeForce RTX 3090", "int4 (auto)", "PyPI impostor 0.16.1", "98.40 s", "7.90 GiB",
                   "warm median 22.05 s (2 runs) > 10 s", "Connection timed out"):
        assert needle in text, needle
    assert sum(v.startswith("data:image/png") for v in sources) == 9   # 3 runs x 3 verified hosts


def test_a_large_fleet_s_page_carries_pictures_only_where_they_tell_something() -> None:
    """Pictures are most of the page; 60 healthy hosts of one class and 30 failing ones get the
    first PICTURED_MAX failing hosts' pictures and one healthy host's, and every host's figures."""
    healthy = [run("cold", 42, 98.4, 8090), run("warm", 43, 4.02, 8078), run("warm", 44, 4.09, 8085)]
    black = [run("cold", 42, 98.4, 8090, True), run("warm", 43, 4.02, 8078, True), run("warm", 44, 4.09, 8085, True)]
    entries = [from_verification(name, facts_for(name, RTX3090), verified(name, "NVIDIA GeForce RTX 3090", runs),
                                 profile=PROFILE)
               for name, runs in [*((f"ok-{i:02d}", healthy) for i in range(60)),
                                  *((f"bad-{i:02d}", black) for i in range(30))]]
    report = build_report(entries)
    shown = html.pictured(report)
    assert len(shown) == html.PICTURED_MAX + 1 and "ok-00" in shown and "ok-01" not in shown
    assert {h for h in shown if h.startswith("bad-")} == {f"bad-{i:02d}" for i in range(html.PICTURED_MAX)}
    page = render_html(report)
    assert page.count("data:image/png") == 3 * len(shown)
    assert f"the pictures of {90 - len(shown)} other hosts are left out" in page
    assert re.findall(r'<h2>([^<]+)</h2>', page) == [h.host for h in report.hosts]   # every host, pictured or not


def test_hostile_strings_are_escaped() -> None:
    evil_host = '<script>alert("host")</script>'
    report = build_report([
        HostEntry(evil_host, "unreachable", '<img src=x onerror=alert(1)> ssh: refused'),
        HostEntry("ok-host", "failed", verification={
            "checks": [{"name": "generation", "passed": False,
                        "detail": "cold run of '</td><script>x()</script>': boom"}],
            "runs": [{"prompt": '"><script>p()</script>', "kind": "cold", "seconds_comfy": 1.0,
                      "seconds_wall": 1.2, "vram_peak_mib": 1, "image": None}]},
            thumbnails=[("<b>label</b>", b"not a png <script>")]),
    ], profile="<i>profile</i>")
    page = render_html(report)
    parsed = _Collect()
    parsed.feed(page)
    assert parsed.tags.count("script") == 0 and "img" not in parsed.tags and "i" not in parsed.tags
    assert "&lt;script&gt;alert(&#34;host&#34;)&lt;/script&gt;" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "&lt;/td&gt;&lt;script&gt;" in page
    assert evil_host in " ".join(parsed.text)           # shown as text, intact


# --- adapters ----------------------------------------------------------------------------------

def test_from_verification_takes_the_object_or_its_json() -> None:
    ver = verified("h", "NVIDIA GeForce RTX 3090", [run("cold", 42, 98.4, 8090), run("warm", 43, 4.0, 8080)])
    facts = facts_for("h", RTX3090)
    assert from_verification("h", facts, ver, profile=PROFILE) == \
        from_verification("h", facts, ver.to_json(), profile=PROFILE)
    none = from_verification("h", facts, None)
    assert (none.status, none.error, none.versions["model_variant"]) == ("failed", "no verification ran", None)


def test_from_exception_statuses() -> None:
    bug = from_exception("h", RuntimeError("boom\nsecond line"))
    assert (bug.status, bug.error) == ("failed", "RuntimeError: boom second line")
    assert from_exception("h", ConnectError("h: refused")).status == "unreachable"


# --- an apply's rollout --------------------------------------------------------------------------

def rollout_report():
    """A verify-gated rollout: the canary was rolled back (restored, verified again), one host left."""
    failed = Check("comfyui_ready", False, "TypeError: QwenTimestepProjEmbeddings.__init__() got an unexpected "
                   "keyword argument 'use_additional_t_cond' <script>")
    restored = verified("gpu-01", "NVIDIA GeForce RTX 3090", [run("cold", 42, 98.4, 8090), run("warm", 43, 4.0, 8080)])
    rollout = {"result": "rolled_back", "snapshot_before": "20260301-120000-001", "snapshot_after": "20260301-120105-002",
               "restored": "20260301-120000-001", "failed_checks": [failed.to_json()],
               "reason": "rolled back to 20260301-120000-001, restored host verified: comfyui_ready: TypeError: ..."}
    left = {"result": "left", "snapshot_before": None, "snapshot_after": None, "restored": None, "failed_checks": [],
            "reason": "gpu-02: not attempted: the verify gate stopped the rollout after gpu-01 was rolled back"}
    return build_report([
        from_verification("gpu-01", facts_for("gpu-01", RTX3090), restored, profile=PROFILE, rollout=rollout),
        from_exception("gpu-02", ProvisionError(left["reason"]), left=True, rollout=left),
    ], profile="rtx3090", generated_at=WHEN)


def test_a_rolled_back_host_and_a_left_one_in_every_report_file(tmp_path: Path) -> None:
    report = rollout_report()
    by = {h.host: h for h in report.hosts}
    assert [h.host for h in report.hosts] == ["gpu-01", "gpu-02"]         # failed first, then left
    canary, left = by["gpu-01"], by["gpu-02"]
    # its own status, as the console says it, and the reason once, in words
    assert canary.status == "rolled_back"
    assert canary.failures == ("rolled back to 20260301-120000-001, restored host verified: comfyui_ready: TypeError: ...",)
    assert all(c.passed for c in canary.checks)                          # restored and verified again
    assert left.status == "left" and "stopped the rollout after gpu-01" in left.failures[0]
    s = report.summary
    assert (s.passed, s.failed, s.unreachable, s.left, s.rolled_back) == (0, 0, 0, 1, 1)

    doc = report_to_json(report)
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()), cls=jsonschema.Draft202012Validator)
    hosts = {h["host"]: h for h in doc["hosts"]}
    assert hosts["gpu-01"]["rollout"]["failed_checks"][0]["name"] == "comfyui_ready"
    assert hosts["gpu-02"]["rollout"]["result"] == "left" and doc["summary"]["left"] == 1

    paths = write_report(tmp_path, report)
    html = paths.html.read_text()
    assert "rolled back" in html and "20260301-120105-002" in html and "(restored 20260301-120000-001)" in html
    assert "&lt;script&gt;" in html and "<script>" not in html
    assert 'class="badge left"' in html and '<span class="badge rolled_back">rolled back</span>' in html
    # the reason once in the host's section (and in its row of the overview table), never repeated
    assert html.count("restored host verified") == 2 and html.count("comfyui_ready: TypeError: ...") == 2
    junit = ET.parse(paths.junit).getroot()
    suites = {s.get("name"): s for s in junit}
    (rollout_case,) = [c for c in suites["gpu-01"] if c.get("name") == "rollout"]
    assert rollout_case.find("failure").get("type") == "rolled_back"      # type: ignore[union-attr]
    assert "use_additional_t_cond" in (rollout_case.find("failure").text or "")   # type: ignore[union-attr]
    assert suites["gpu-02"].get("skipped") == "1" and suites["gpu-02"].find("testcase/skipped") is not None


def test_the_ladder_rung_each_host_stopped_at_in_report_json_and_junit() -> None:
    """verify's ladder, as report.json and junit.xml carry it: the rung a host stopped at (nodes for
    the host whose plugin lacks its backend, images for the black one, timed runs for the slow one)."""
    doc = report_to_json(fleet_report())
    jsonschema.validate(doc, json.loads(SCHEMA_PATH.read_text()), cls=jsonschema.Draft202012Validator)
    rungs = {h["host"]: h["ladder"]["failed_rung"] for h in doc["hosts"]}
    assert rungs == {"gpu-3090-a": None, "gpu-3090-nonodes": "nodes", "gpu-4090-black": "images",
                     "gpu-a4000-slow": "timed_runs", "gpu-offline": "reachable"}
    nonodes = next(h for h in doc["hosts"] if h["host"] == "gpu-3090-nonodes")["ladder"]["rungs"]
    assert [r["state"] for r in nonodes] == ["passed", "failed", "failed"] + ["not reached"] * 4
    root = ET.fromstring(render_junit(fleet_report()))
    props = {s.get("name"): {p.get("name"): p.get("value") for p in s.findall("properties/property")}
             for s in root.findall("testsuite")}
    assert props["gpu-3090-nonodes"]["ladder.failed_rung"] == "nodes" and props["gpu-3090-a"]["ladder.failed_rung"] == "none"
    cases = {c.get("name"): c.get("classname") for c in root.findall("testsuite[@name='gpu-3090-nonodes']/testcase")}
    assert cases == {"comfyui_reachable": "provision.verify.gpu-3090-nonodes.reachable",
                     "nodes_registered": "provision.verify.gpu-3090-nonodes.nodes",
                     "workflow_accepted": "provision.verify.gpu-3090-nonodes.workflow"}
