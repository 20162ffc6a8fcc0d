"""What `provision report merge` costs at fleet scale, measured on generated slices (docs/scale.md).

Generates HOSTS host entries (facts, checks, three runs with thumbnails, a fingerprint, one kept
1024² image each: the sandbox ComfyUI's picture for the prompt's seed; one host drifted in its driver
per 97, one slow, one degraded) split into SLICES slice folders, as verify --references writes them,
then times the merge's parts in-process, wall and CPU: reading the slices, the image agreement (every
host's image decoded and compared with its class's reference at full size), the fleet judgement
(groups, drift, class speed) and writing report.json/html and junit.xml. By default the class already
has its reference (every run after the first); --first-run lets the merge choose it (the medoid:
n² comparisons at 256 px, also timed alone for --medoid-n hosts); --cli also runs the whole CLI in a
fresh process.

    .venv/bin/python bench/merge.py --hosts 1000 --slices 10
"""

from __future__ import annotations

import argparse
import io
import json
import random
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from provisioner.config.model import AgreementSpec, ClassSpeedSpec
from provisioner.report import build_report, from_verification, write_report
from provisioner.report.references import ReferenceStore
from provisioner.report.slices import Slice, judge, read_slices, write_slice
from provisioner.sandbox import comfyui_png
from provisioner.verify.agreement import PANEL_PX, KeyedImage, Reference, decode, medoid
from provisioner.verify.checks import Check, HostVerification, RunResult
from provisioner.verify.images import check_image
from provisioner.verify.fingerprint import FIELDS, Fingerprint

PROMPT, SEED, KEY = "a red fox in the snow, photograph", 42, "a-red-fox-in-the-snow-photograph-seed42-0123456789"
GPU_CLASS = "NVIDIA GeForce RTX 3090 24 GiB"


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def host_entry(index: int, picture: bytes, noisy: bytes, thumb: bytes, checked):
    name = f"gpu-{index:04d}"
    fields = {k: f"{k}-value" for k in FIELDS}
    fields["driver"] = "550.120" if index % 97 else "535.183"              # a few drifted hosts
    fields["object_info"] = "a" * 64
    fingerprint = Fingerprint(GPU_CLASS, fields, {"models/diffusion_models/qwen.safetensors": "b" * 64},
                              {"NunchakuQwenImageDiTLoader": "c" * 16, "KSampler": "d" * 16})
    warm = 2.0 + (index % 7) * 0.01 + (3.0 if index == 500 else 0.0)     # one slow host
    runs = tuple(RunResult(PROMPT, kind, SEED, f"p{index}-{i}", seconds, seconds + 0.05, 18_000,
                           checked, thumb)
                 for i, (kind, seconds) in enumerate((("cold", 9.0), ("warm", warm), ("warm", warm))))
    checks = tuple(Check(n, True, "ok") for n in ("comfyui_reachable", "device", "nodes_registered",
                                                  "workflow_accepted", "comfyui_ready", "generation"))
    verification = HostVerification(name, checks, runs, "0.3.64", "cuda:0", 18_500, 300, fingerprint,
                                     images=(KeyedImage(KEY, PROMPT, SEED, noisy if index == 3 else picture),))
    facts = {"gpu": {"name": "NVIDIA GeForce RTX 3090", "vram_total_mib": 24576, "driver": fields["driver"],
                     "compute_capability": [8, 6]}, "env": {"torch": "2.6.0", "version": "3.11.2"}}
    return from_verification(name, facts, verification), verification.images


def generate(root: Path, hosts: int, slices: int) -> list[Path]:
    picture = comfyui_png.picture(1024, 1024, SEED, "normal")
    noisy = comfyui_png.picture(1024, 1024, SEED, "noisy")
    thumb = png(Image.open(io.BytesIO(picture)).reduce(4))
    checked = check_image(picture, (1024, 1024))
    made = [host_entry(i, picture, noisy, thumb, checked) for i in range(1, hosts + 1)]
    folders = []
    for s in range(slices):
        part = made[s::slices]
        folders.append(root / f"slice-{s:02d}")
        write_slice(folders[-1], Slice("rtx3090", ClassSpeedSpec(), tuple(e for e, _ in part),
                                       {e.host: images for e, images in part},
                                       {e.host: AgreementSpec() for e, _ in part}))
    return folders


def timed_medoid(picture: bytes, n: int) -> tuple[float, float]:
    """(wall, CPU) of choosing a first reference among n hosts' images (256 px copies)."""
    import numpy as np

    small = np.asarray(Image.fromarray(decode(picture), "RGB").reduce(1024 // PANEL_PX))
    noise = random.Random(1)
    candidates = [(f"gpu-{i:04d}", np.clip(small.astype(int) + noise.randint(-2, 2), 0, 255).astype(np.uint8))
                  for i in range(n)]
    wall, cpu = time.perf_counter(), time.process_time()
    medoid(candidates)
    return round(time.perf_counter() - wall, 2), round(time.process_time() - cpu, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--slices", type=int, default=10)
    parser.add_argument("--first-run", action="store_true", help="no reference yet: the merge chooses it")
    parser.add_argument("--medoid-n", type=int, default=100, help="hosts for the medoid's own timing (0: none)")
    parser.add_argument("--cli", action="store_true", help="also time `provision report merge` in a process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="merge-bench-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        folders = generate(root, args.hosts, args.slices)
        size = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
        figures: dict[str, object] = {"generate_s": round(time.perf_counter() - started, 1)}
        store = ReferenceStore(root / "out", root=root / "refs")
        if not args.first_run:
            store.put(Reference(GPU_CLASS, KEY, "gpu-0001", "2026-12-07T00:00:00Z"),
                      comfyui_png.picture(1024, 1024, SEED, "normal"), "2026-12-07T00:00:00Z")
        marks = [(time.perf_counter(), time.process_time())]
        part = read_slices(folders)
        marks.append((time.perf_counter(), time.process_time()))
        entries, outcome = judge(part, store, now="2026-12-07T00:00:00Z")
        marks.append((time.perf_counter(), time.process_time()))
        report = build_report(entries, profile=part.profile, class_speed=part.class_speed)
        marks.append((time.perf_counter(), time.process_time()))
        write_report(root / "out", report)
        marks.append((time.perf_counter(), time.process_time()))
        for name, (a, b) in zip(("read", "agreement", "judge", "write"), zip(marks, marks[1:])):
            figures[name] = {"wall_s": round(b[0] - a[0], 2), "cpu_s": round(b[1] - a[1], 2)}
        figures["in_process"] = {"wall_s": round(marks[-1][0] - marks[0][0], 2),
                                 "cpu_s": round(marks[-1][1] - marks[0][1], 2)}
        figures["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        if args.medoid_n:
            wall, cpu = timed_medoid(comfyui_png.picture(1024, 1024, SEED, "normal"), args.medoid_n)
            figures[f"medoid_{args.medoid_n}_hosts"] = {"wall_s": wall, "cpu_s": cpu}
        if args.cli:
            cli = time.perf_counter()
            subprocess.run([sys.executable, "-m", "provisioner", "report", "merge", *map(str, folders), "--out",
                            str(root / "cli"), "--references", str(root / "refs"), "--no-color"],
                           check=False, capture_output=True)
            figures["cli_wall_s"] = round(time.perf_counter() - cli, 2)
            figures["cli_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
        files = {n: (root / "out" / n).stat().st_size for n in ("report.json", "report.html", "junit.xml")}
        print(json.dumps({"hosts": args.hosts, "slices": args.slices, "first_run": args.first_run,
                          "slice_bytes": size, **figures, "report_bytes": files,
                          "failed": report.summary.failed, "flags": sorted({f.kind for f in report.fleet}),
                          "notes": len(outcome.notes), "load_1min": os.getloadavg()[0]}, indent=2))


if __name__ == "__main__":
    main()
