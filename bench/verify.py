"""`provision verify` overhead: the wall time of a verify of one converged sandbox host over SSH,
minus the time ComfyUI spent on the generations themselves (`seconds_comfy` of each run in the
report). The rest is provision's: interpreter start, connect, facts, the tunnel, the checks, the
cold start's /free wait, uploads, image checks, the report."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run alone: `bench`, `provisioner` and the tests' harness importable
    sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

from bench.hosts import REPO  # noqa: E402,F401 - puts tests/ on sys.path for lab
from bench.measure import median  # noqa: E402
from lab import open_lab  # noqa: E402


def measure(root: Path, runs: int) -> dict[str, Any]:
    with open_lab(root) as lab:
        lab.add(1)
        code, out = lab.run("apply", "--no-verify")
        if code != 2:
            raise RuntimeError(f"converging the verify host failed (exit {code}):\n{out[-2000:]}")
        samples = []
        for i in range(runs):
            report = root / f"report-{i}"
            started = time.perf_counter()
            proc = lab.spawn("verify", "--report", str(report))
            out, _ = proc.communicate(timeout=600)
            wall = time.perf_counter() - started
            if proc.returncode != 0:
                raise RuntimeError(f"verify failed (exit {proc.returncode}):\n{out[-2000:]}")
            (host,) = json.loads((report / "report.json").read_text())["hosts"]
            comfy = sum(r["seconds_comfy"] for r in host["runs"])
            walls = sum(r["seconds_wall"] for r in host["runs"])
            samples.append({"wall_s": wall, "generations": len(host["runs"]), "comfy_s": comfy,
                            "generation_wall_s": walls, "overhead_s": wall - comfy})
    return {"runs": runs, "samples": samples,
            "median_wall_s": median([s["wall_s"] for s in samples]),
            "median_comfy_s": median([s["comfy_s"] for s in samples]),
            "median_generation_wall_s": median([s["generation_wall_s"] for s in samples]),
            "median_overhead_s": median([s["overhead_s"] for s in samples])}


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory(prefix="provision-bench-verify-") as tmp:
        print(json.dumps(measure(Path(tmp), 3), indent=1))
