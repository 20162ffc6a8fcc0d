"""The controller's cost per host of a no-op rollout, provision's CLI against the collection's
playbook (docs/scale.md): N sandbox hosts behind real sshd, converged once, then RUNS interleaved
runs of each, timed (wall) with the CPU of the whole process tree on the control machine (the
children's rusage; the hosts' sshd and what it runs are not ours to count).

    .venv/bin/python bench/ansible_cost.py --hosts 4 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from lab import open_lab  # noqa: E402

BIN = Path(sys.executable).parent


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float, int]:
    """(wall s, CPU s of the process tree, exit code)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ansible-cost-") as tmp, open_lab(Path(tmp) / "lab") as lab:
        lab.add(args.hosts)
        code, out = lab.run("apply", "--no-verify")
        assert code == 2, out
        base = Path(tmp)
        subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", str(REPO / "ansible_collections" /
                        "provision" / "comfyui"), "--output-path", str(base)], check=True, capture_output=True)
        (tarball,) = base.glob("provision-comfyui-*.tar.gz")
        subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install", str(tarball), "-p",
                        str(base / "collections")], check=True, capture_output=True)
        env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(base / "collections"), "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_LOCAL_TEMP": str(base / "ansible-tmp"), "PYTHONWARNINGS": "ignore"}
        options = [*lab.ssh_args(), "--no-color"]
        cases = {
            "provision apply --no-verify": [sys.executable, "-m", "provisioner", "apply", str(lab.profile),
                                            *options, "--no-verify", "--log-dir", str(base / "logs")],
            "ansible-playbook provision.comfyui.site (facts + apply, no verify)": [
                str(BIN / "ansible-playbook"), "-i", str(lab.inventory), "provision.comfyui.site", "-e",
                json.dumps({"provision_profile": str(lab.profile), "provision_options": options,
                            "provision_verify": False})],
        }
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for _ in range(args.runs):
            for name, argv in cases.items():
                wall, cpu, code = timed(argv, env, base)
                assert code == 0, (name, code)
                samples[name].append((wall, cpu))
        print(json.dumps({"hosts": args.hosts, "runs": args.runs, "load_1min": os.getloadavg()[0],
                          "cases": {name: {"wall_s": round(statistics.median(w for w, _ in s), 2),
                                           "cpu_s": round(statistics.median(c for _, c in s), 2),
                                           "cpu_per_host_s": round(statistics.median(c for _, c in s) / args.hosts, 3)}
                                    for name, s in samples.items()}}, indent=2))


if __name__ == "__main__":
    main()
