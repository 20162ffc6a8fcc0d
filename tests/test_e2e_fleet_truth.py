"""Fleet-wide truth over real sshd hosts running the ComfyUI stand-in: four hosts of one GPU class,
one making degraded pictures, one with an extra node pack, one slower, reported with exactly those
three findings; the references beside the report, their promotion, drift since a previous report,
and the side-by-side pictures rendered by headless Chromium."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from lab import Lab, LabHost, open_lab

from provisioner import cli
from provisioner.sandbox import comfyui_process

pytestmark = pytest.mark.slow
EXTRA = 'class ExtraSharpen:\n    pass\n\n\nNODE_CLASS_MAPPINGS = {"ExtraSharpen": ExtraSharpen}\n'


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, dict[str, LabHost], Path]]:
    with open_lab(tmp_path_factory.mktemp("lab-truth")) as lab:
        clean, degraded, extra = lab.add(3)
        (slow,) = lab.add(1, comfyui_args=("--warm-s", "1.5"))
        code, out = lab.run("apply", "--no-verify")
        assert code == 2, out
        pack = extra.comfy / "custom_nodes" / "ComfyUI-Extra"
        pack.mkdir()
        (pack / "__init__.py").write_text(EXTRA)
        comfyui_process.restart(extra.comfy, wait=True)
        degrade(degraded, "noisy")
        hosts = {"clean": clean, "degraded": degraded, "extra": extra, "slow": slow}
        yield lab, hosts, tmp_path_factory.mktemp("reports")


def degrade(host: LabHost, mode: str) -> None:
    host.comfyui_args("--image-mode", mode)
    comfyui_process.restart(host.comfy, wait=True)


def findings(report: dict) -> dict[str, list[str]]:
    """Host -> its failed checks and its fleet flags (kind:field), everything that sets it apart."""
    out: dict[str, list[str]] = {h["host"]: [c["name"] for c in h["checks"] if not c["passed"]] for h in report["hosts"]}
    for flag in report["fleet"]:
        out[flag["host"]].append(f"{flag['kind']}:{flag['field']}" if flag["field"] else flag["kind"])
    return out


def verify(lab: Lab, reports: Path, *args: str) -> tuple[int, str, dict]:
    code, out = lab.run("verify", "--report", str(reports), *args)
    return code, out, json.loads((reports / "report.json").read_text())


def test_one_degraded_one_drifted_one_slow_host_and_nothing_else(fleet) -> None:
    lab, h, reports = fleet
    code, out, report = verify(lab, reports)
    assert code == 1, out
    assert findings(report) == {h["clean"].name: [], h["degraded"].name: ["image_agreement"],
                                h["extra"].name: ["drift:object_info"], h["slow"].name: ["class_slower"]}, out
    (group,) = report["groups"]
    assert group["gpu_class"] == "NVIDIA GeForce RTX 3090 24 GiB" and len(group["hosts"]) == 4
    drift = next(f for f in report["fleet"] if f["kind"] == "drift")
    assert "+ ExtraSharpen" in drift["message"] and "3 of 4 hosts" in drift["message"]
    slower = next(f for f in report["fleet"] if f["kind"] == "class_slower")
    assert slower["actual"] > 1.4 and slower["expected"] < 0.5
    bad = next(x for x in report["hosts"] if x["host"] == h["degraded"].name)
    (agreement,) = bad["agreement"]
    assert not agreement["passed"] and agreement["detail"].startswith("PSNR ")
    # The reference was made from a host the class agrees with, never from the noisy one.
    index = json.loads((reports / "references" / "index.json").read_text())["references"]
    (entry,) = index.values()
    assert entry["host"] in {h["clean"].name, h["extra"].name, h["slow"].name} and not entry["promoted"]
    assert (reports / "references" / entry["file"]).is_file() and entry["width"] == entry["height"] == 1024
    fingerprint = bad["fingerprint"]
    assert fingerprint["gpu"] == "NVIDIA GeForce RTX 3090" and fingerprint["plugin_tag"] == "v1.1.0"
    assert fingerprint["launch_args"].endswith("--port <comfyui.port>") and fingerprint["ram"].endswith(" GiB")
    assert all(len(sha or "") == 64 for sha in fingerprint["models"].values()) and fingerprint["models"]
    assert f"{h['extra'].name}: FLAG node set differs" in out and f"{h['degraded'].name} FAIL image_agreement" in out


@pytest.mark.parametrize("mode, failed", [("shifted", ["image_agreement"]),
                                          ("wrong-size", ["images_ok", "image_agreement"])])
def test_each_degradation_fails_against_the_stored_reference(fleet, mode: str, failed: list[str]) -> None:
    lab, h, reports = fleet
    if not (reports / "references" / "index.json").exists():
        verify(lab, reports)
    before = (reports / "references" / "index.json").read_text()
    degrade(h["degraded"], mode)
    code, out, report = verify(lab, reports)
    assert code == 1, out
    assert findings(report) == {h["clean"].name: [], h["degraded"].name: failed,
                                h["extra"].name: ["drift:object_info"], h["slow"].name: ["class_slower"]}, out
    assert (reports / "references" / "index.json").read_text() == before      # kept, not replaced
    assert report["changes"] == []                                             # nothing drifted over time
    bad = next(x for x in report["hosts"] if x["host"] == h["degraded"].name)
    detail = bad["agreement"][0]["detail"]
    assert detail.startswith("R channel PSNR" if mode == "shifted" else "size 768x768, the reference is 1024x1024")


def test_promotion_takes_a_passing_hosts_images_and_refuses_a_failing_one(fleet) -> None:
    lab, h, reports = fleet
    code, out = lab.run("verify", "--report", str(reports), "--promote-reference", h["degraded"].name)
    assert code == 1 and f"{h['degraded'].name}'s images were not promoted: it failed verification" in out, out
    code, out = lab.run("verify", "--limit", h["clean"].name, "--report", str(reports),
                        "--promote-reference", h["clean"].name)
    assert code == 0, out
    (entry,) = json.loads((reports / "references" / "index.json").read_text())["references"].values()
    assert (entry["host"], entry["promoted"]) == (h["clean"].name, True)
    assert "promoted from" in out
    code, out = lab.run("verify", "--promote-reference", h["clean"].name)
    assert code == 3 and "--promote-reference needs --report DIR" in out
    code, out = lab.run("verify", "--report", str(reports), "--promote-reference", "gpu-99")
    assert code == 3 and "not one of the hosts verified" in out


def test_without_a_report_directory_there_is_no_reference_store(fleet) -> None:
    lab, h, _ = fleet
    code, out = lab.run("verify", "--limit", h["clean"].name)
    assert code == 0, out
    assert f"{h['clean'].name} PASS image_agreement: no reference store; pass --report DIR" in out


@pytest.mark.skipif(not shutil.which("chromium"), reason="needs Debian's chromium (make test installs it)")
def test_the_side_by_side_pictures_render_in_chromium(fleet, tmp_path: Path) -> None:
    lab, h, reports = fleet
    degrade(h["degraded"], "noisy")
    verify(lab, reports)
    html = reports / "report.html"
    argv = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'c'}"]
    dom = subprocess.run([*argv, "--dump-dom", html.as_uri()], capture_output=True, text=True, timeout=120).stdout
    section = dom[dom.index(f"<h2>{h['degraded'].name}</h2>"):]
    section = section[:section.index("</section>")]
    assert section.count('<img src="data:image/png;base64,') >= 3 + 3          # side by side, then thumbnails
    assert "difference ×4" in section and "reference: " in section and "FAIL" in section
    assert "Groups: hosts that should be identical" in dom and "ExtraSharpen" in dom
    shot = tmp_path / "shot.png"
    subprocess.run([*argv, f"--screenshot={shot}", "--window-size=1280,2400", html.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.stat().st_size > 50_000


def test_drift_since_an_older_report_names_what_changed(fleet, tmp_path: Path) -> None:
    lab, h, reports = fleet
    old = tmp_path / "old.json"
    shutil.copy(reports / "report.json", old)
    shutil.rmtree(h["extra"].comfy / "custom_nodes" / "ComfyUI-Extra")
    comfyui_process.restart(h["extra"].comfy, wait=True)
    code, out = lab.run("verify", "--limit", h["extra"].name, "--compare", str(old), "--json")
    assert code == 0, out
    doc = json.loads(out[out.index("{"):])
    (change,) = doc["changes"]
    assert (change["host"], change["field"]) == (h["extra"].name, "object_info")
    assert change["message"] == "node set changed: - ExtraSharpen"
    code, out = lab.run("verify", "--compare", str(tmp_path / "nope.json"))
    assert code == 3 and "--compare" in out


def judgements(report: dict) -> dict:
    """What report.json judges, without what a second run measures anew (timings, dates): each
    host's status, failed checks and image agreement (against whose reference), the groups and
    their values, every fleet flag."""
    hosts = {h["host"]: (h["status"], [c["name"] for c in h["checks"] if not c["passed"]],
                         [(a["passed"], (a.get("reference") or {}).get("host")) for a in h["agreement"]])
             for h in report["hosts"]}
    groups = [(g["gpu_class"], g["hosts"], g["values"]) for g in report["groups"]]
    flags = [(f["host"], f["kind"], f["field"], f["message"] if f["kind"] == "drift" else None) for f in report["fleet"]]
    return {"hosts": hosts, "groups": groups, "fleet": flags}


def merge(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = cli.main(["report", "merge", "--no-color", *argv])
    return code, out.getvalue()


def test_slices_merged_judge_the_fleet_as_one_run_does(fleet, tmp_path: Path) -> None:
    """AWX's job slicing by hand: disjoint --limit slices that share one reference folder (read,
    never written), merged into one report that judges as a single run over the fleet."""
    lab, h, _ = fleet
    degrade(h["degraded"], "noisy")
    code, out, single = verify(lab, tmp_path / "whole")
    assert code == 1 and findings(single)[h["degraded"].name] == ["image_agreement"], out
    names = sorted(x.name for x in h.values())
    shared = tmp_path / "references"
    slices = []
    for i, part in enumerate((names[:1], names[1:3], names[3:])):
        slices.append(tmp_path / f"slice-{i}")
        code, out = lab.run("verify", "--report", str(slices[-1]), "--references", str(shared),
                            "--limit", ",".join(part))
        assert code in (0, 1) and "for this slice only" in out, out
    assert not shared.exists()                                 # the slices read it, never write it
    code, out = merge(*map(str, slices), "--out", str(tmp_path / "fleet"), "--references", str(shared))
    assert code == 1 and "4 hosts from 3 slices: 3 passed, 1 failed" in out, out
    merged = json.loads((tmp_path / "fleet" / "report.json").read_text())
    assert judgements(merged) == judgements(single)
    index = json.loads((shared / "index.json").read_text())["references"]
    assert [e["host"] for e in index.values()] == \
           [e["host"] for e in json.loads((tmp_path / "whole" / "references" / "index.json").read_text())["references"].values()]
    # The next slices read the references the merge wrote, and judge against them themselves.
    code, out = lab.run("verify", "--report", str(slices[0]), "--references", str(shared), "--limit", names[0])
    assert "for this slice only" not in out, out
    again = json.loads((slices[0] / "report.json").read_text())
    assert again["hosts"][0]["agreement"][0]["reference"]["host"] == next(iter(index.values()))["host"]


def test_a_merge_of_the_same_hosts_is_byte_for_byte_one_run(fleet, tmp_path: Path) -> None:
    """The same host results, judged as one slice or split into three, give the same report.json,
    byte for byte but for the dates (the report's, and when each merge made its references)."""
    from provisioner.report.slices import Slice, read_slices, write_slice

    lab, h, _ = fleet
    code, out = lab.run("verify", "--report", str(tmp_path / "one"), "--references", str(tmp_path / "none"))
    whole = read_slices([tmp_path / "one"])
    parts = []
    for i, hosts in enumerate((whole.entries[:1], whole.entries[1:3], whole.entries[3:])):
        parts.append(tmp_path / f"part-{i}")
        write_slice(parts[-1], Slice(whole.profile, whole.class_speed, hosts,
                                     {e.host: whole.images[e.host] for e in hosts},
                                     {e.host: whole.agreement[e.host] for e in hosts}))
    reports = []
    for name, dirs in (("a", [tmp_path / "one"]), ("b", parts)):
        merge(*map(str, dirs), "--out", str(tmp_path / name), "--references", str(tmp_path / f"refs-{name}"))
        text = (tmp_path / name / "report.json").read_text()
        reports.append(re.sub(r'"(generated_at|created_at)": "[^"]*"', r'"\1": ""', text))
    assert reports[0] == reports[1] and len(json.loads(reports[0])["hosts"]) == 4
    code, out = merge(str(parts[0]), str(parts[0]), "--out", str(tmp_path / "c"))
    assert code == 3 and "is in slice" in out and "Traceback" not in out
    code, out = merge(str(tmp_path / "whole-missing"), "--out", str(tmp_path / "c"))
    assert code == 3 and "no slice/entries.json; run each slice with --report DIR --references" in out
