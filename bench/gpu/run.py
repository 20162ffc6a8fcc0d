"""provision on a real GPU machine: real ComfyUI, the machine's own nvidia-smi, the local connection.

Run from the repository root on the GPU machine (docs/gpu-run.md says how it was run):

    python bench/gpu/run.py --out DIR --venv VENV --bundles DIR [--seconds 2 --gib 8] [--only-samplercustom]

VENV is a Python environment with torch that ComfyUI runs in (its own python and pip), DIR of
--bundles holds ComfyUI.bundle and ComfyUI-nunchaku.bundle (the offline git bundles). What it does:

1. `provision facts`, then `provision plan` of a fleet profile (base.yaml: Qwen-Image-Edit-2509
   INT4): nunchaku runs on no architecture but sm_75/80/86/89 (int4) and sm_120/121 (fp4), so on
   this GPU the plan must refuse, with the reason (exit 1).
2. `provision apply` of a smoke profile on the same host (`model.family: null`): the real
   ComfyUI-nunchaku v1.1.0 cloned, the backend wheel and the packages (from local stand-ins: this
   machine reaches no network), and a workflow running the GPU probe node
   (bench/gpu/provision_gpu_probe: holds --gib GiB of VRAM and multiplies bf16 matrices for
   --seconds), ComfyUI restarted by a command that returns before it listens, readiness, then
   verification of the probe (1 cold + 3 warm runs).
3. `provision apply` again (nothing to do), and `provision verify --report`.
4. `provision verify` of a workflow whose sampler takes its seed as SamplerCustom does
   (`noise_seed`, the probe's ProvisionGpuSampler, cached by ComfyUI like any sampler): every warm
   run must get its own seed and really run; then the same with the seed linked from a
   PrimitiveInt, which provision cannot set: ComfyUI serves the warm run from its cache, and
   verification must fail that run (`runs_sampled`) instead of passing it in milliseconds.
5. The same two verifications with ComfyUI's own `SamplerCustom` (core nodes only:
   CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSamplerSelect, BasicScheduler,
   SamplerCustom, VAEDecode, SaveImage; `gpu-samplercustom.json.j2` and
   `gpu-samplercustom-linked.json.j2`). No model weights reach the machine, so before ComfyUI
   starts, `sd15_random.py` builds an SD1.5-shaped checkpoint of random fp16 weights from ComfyUI's
   own classes into models/checkpoints/ and reads it back with ComfyUI's loader: the images are
   noise by design, but each comes from a full SD1.5 sampling pass of its own seed.

Everything it printed and the reports go to --out; the figures to hold against the probe's own
(from ComfyUI's log) are printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from provisioner.sandbox.world import start_world, write_yaml  # noqa: E402

SERVICE = REPO / "tests" / "real" / "service.py"      # a restart that returns at once, like systemctl's
PORT = 8188
CHECKPOINT = "provision-sd15-random.safetensors"   # gpu-samplercustom*.json.j2 load it by this name


def sh(*argv: str, cwd: Path | None = None, check: bool = True) -> str:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    if check and proc.returncode:
        raise SystemExit(f"{' '.join(argv[:4])} failed ({proc.returncode}): {proc.stderr.strip()[-400:]}")
    return proc.stdout


def wait_listening(port: int, timeout: float = 300) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=2):
                return time.monotonic() - started
        except OSError:
            time.sleep(0.25)
    raise SystemExit(f"ComfyUI did not answer on port {port} in {timeout:g} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--venv", type=Path, required=True, help="ComfyUI's Python environment (with torch)")
    ap.add_argument("--bundles", type=Path, required=True, help="folder of ComfyUI.bundle, ComfyUI-nunchaku.bundle")
    ap.add_argument("--work", type=Path, default=Path("/tmp/provision-gpu-run"))
    ap.add_argument("--gib", type=float, default=8.0)
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--sd15-size", type=int, default=512, help="the SamplerCustom workflow's image side")
    ap.add_argument("--sd15-steps", type=int, default=20)
    ap.add_argument("--only-samplercustom", action="store_true",
                    help="facts and step 5 alone (a shorter run when device time is short)")
    ap.add_argument("--comfyui-arg", action="append", default=[],
                    help="more arguments for main.py (--cpu for a dry run on a machine without a GPU)")
    args = ap.parse_args()
    out, work, python = args.out, args.work, str(args.venv / "bin" / "python")
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    console = open(out / "console.txt", "w")

    def say(text: str) -> None:
        print(text, flush=True)
        console.write(text + "\n")
        console.flush()

    # The host: real ComfyUI v0.3.64 from the bundle, the probe node beside it, under the service runner.
    root = work / "ComfyUI"
    sh("git", "clone", "--quiet", str(args.bundles / "ComfyUI.bundle"), str(root))
    sh("git", "-C", str(root), "checkout", "--quiet", "v0.3.64")
    plugin_repo = work / "ComfyUI-nunchaku.git"
    sh("git", "clone", "--quiet", "--bare", str(args.bundles / "ComfyUI-nunchaku.bundle"), str(plugin_repo))
    probe = root / "custom_nodes" / "provision_gpu_probe"
    shutil.copytree(REPO / "bench" / "gpu" / "provision_gpu_probe", probe)
    template = work / "templates"
    template.mkdir()
    for name in ("gpu-probe.json.j2", "gpu-sampler.json.j2", "gpu-sampler-linked.json.j2",
                 "gpu-samplercustom.json.j2", "gpu-samplercustom-linked.json.j2"):
        text = (REPO / "bench" / "gpu" / name).read_text()
        (template / name).write_text(
            text.replace('"gib": 8.0', f'"gib": {args.gib}').replace('"seconds": 2.0', f'"seconds": {args.seconds}'))
    service = work / "service"
    service.mkdir()
    (service / "service.json").write_text(json.dumps({
        "argv": [python, "main.py", "--listen", "127.0.0.1", "--port", str(PORT), "--disable-auto-launch",
                 *args.comfyui_arg],
        "cwd": str(root)}))
    say("$ nvidia-smi (before ComfyUI)\n" + sh("nvidia-smi", "--query-gpu=index,name,uuid,memory.total,"
                                               "memory.used,compute_cap,driver_version", "--format=csv"))
    # The SamplerCustom workflow's checkpoint, before ComfyUI starts (its list of checkpoints).
    started = time.monotonic()
    built = subprocess.run([python, str(REPO / "bench" / "gpu" / "sd15_random.py"), "--comfyui", str(root),
                            "--out", str(root / "models" / "checkpoints" / CHECKPOINT)],
                           capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    say(f"$ python bench/gpu/sd15_random.py   # the random SD1.5-shaped checkpoint\n{built.stdout}"
        f"{built.stderr[-2000:] if built.returncode else ''}[exit {built.returncode}, "
        f"{time.monotonic() - started:.1f} s]")
    sh(sys.executable, str(SERVICE), "start", str(service))
    say(f"ComfyUI v0.3.64 answered {wait_listening(PORT):.1f} s after its start")

    world = start_world(work / "world", venv_template=False)
    try:
        inventory = write_yaml(work / "inventory.yaml", {"all": {"hosts": {"h200": {"ansible_connection": "local"}}}})
        fleet = write_yaml(work / "fleet.yaml", {
            "extends": str(REPO / "profiles" / "base.yaml"), "inventory": str(inventory), "hosts": "all",
            "comfyui": {"root": str(root), "venv": str(args.venv), "port": PORT, "ready_timeout_s": 300,
                        "log_file": str(service / "comfyui.log"),
                        "restart": {"command": [sys.executable, str(SERVICE), "restart", str(service)]}},
            "plugin": {"repo": str(plugin_repo), "tag": "v1.1.0"},
            # The machine's torch is 2.11 stable, for which upstream has only wheels built against a
            # nightly: taken with the profile's opt-in, as an operator would have to.
            "backend": {"version": "1.2.1", "allow_nightly_built": True,
                        "sources": [{"github": world.backend_repo_url}]},
            "pip": {"no_index": True, "find_links": [str(world.wheelhouse)]},
            "huggingface": {"endpoint": world.hub.url}},
            "Qwen-Image-Edit-2509 INT4 Lightning, as the fleet runs it, pointed at local stand-ins.")
        smoke = write_yaml(work / "smoke.yaml", {
            "extends": str(fleet), "model": {"family": None},
            "workflow": {"template_dir": str(template), "templates": ["gpu-probe.json.j2"]},
            "verify": {"family_nodes": False, "required_nodes": ["ProvisionGpuProbe"], "warm_runs": 3,
                       "prompts": ["gpu probe"], "timeout_s": 600}},
            "The same host with no Nunchaku model: ComfyUI, the plugin, its backend and the GPU probe workflow.")
        sampler = write_yaml(work / "sampler.yaml", {
            "extends": str(smoke), "workflow": {"templates": ["gpu-sampler.json.j2"]},
            "verify": {"required_nodes": ["ProvisionGpuSampler"]}},
            "The seed in SamplerCustom's input name (noise_seed), on a node ComfyUI caches by its inputs.")
        cached = write_yaml(work / "cached.yaml", {
            "extends": str(smoke), "workflow": {"templates": ["gpu-sampler-linked.json.j2"]},
            "verify": {"required_nodes": ["ProvisionGpuSampler"]}},
            "The same with the seed linked from a PrimitiveInt: nothing provision can set.")
        custom_workflow = {"width": args.sd15_size, "height": args.sd15_size, "steps": args.sd15_steps,
                           "cfg": 7.0, "sampler": "euler", "scheduler": "normal"}
        custom_verify = {"required_nodes": ["CheckpointLoaderSimple", "SamplerCustom", "KSamplerSelect",
                                            "BasicScheduler"], "prompts": ["a lighthouse on a cliff at dusk"]}
        custom = write_yaml(work / "samplercustom.yaml", {
            "extends": str(smoke),
            "workflow": {"templates": ["gpu-samplercustom.json.j2"], **custom_workflow}, "verify": custom_verify},
            "ComfyUI's own SamplerCustom (seed in noise_seed) on an SD1.5-shaped checkpoint of random weights.")
        custom_linked = write_yaml(work / "samplercustom-linked.yaml", {
            "extends": str(smoke),
            "workflow": {"templates": ["gpu-samplercustom-linked.json.j2"], **custom_workflow},
            "verify": custom_verify},
            "The same with SamplerCustom's noise_seed linked from a PrimitiveInt.")
        steps = [
            ("facts", ["facts", str(smoke), "--json"]),
            ("plan of the fleet profile: the GPU is refused", ["plan", str(fleet)]),
            ("apply of the smoke profile: a restart that returns at once, readiness, verification",
             ["apply", str(smoke), "--report", str(work / "report-apply"), "--log-dir", str(work / "logs")]),
            ("apply again: nothing to do", ["apply", str(smoke), "--log-dir", str(work / "logs")]),
            ("verify", ["verify", str(smoke), "--report", str(work / "report")]),
            ("verify, the seed in noise_seed: distinct seeds, no cached warm run",
             ["verify", str(sampler), "--report", str(work / "report-sampler")]),
            ("verify, the seed out of reach: a warm run served from the cache fails",
             ["verify", str(cached), "--report", str(work / "report-cached")]),
            ("verify, ComfyUI's SamplerCustom: distinct seeds, every warm run sampled",
             ["verify", str(custom), "--report", str(work / "report-samplercustom")]),
            ("verify, SamplerCustom's seed out of reach: a warm run served from the cache fails",
             ["verify", str(custom_linked), "--report", str(work / "report-samplercustom-linked")]),
        ]
        if args.only_samplercustom:
            steps = [steps[0], *steps[-2:]]
        outputs = root / "output"
        for title, argv in steps:
            say(f"\n$ provision {' '.join(argv)}   # {title}")
            before = set(outputs.glob("*.png"))
            started = time.monotonic()
            proc = subprocess.run([sys.executable, "-m", "provisioner", *argv, "--no-color"], cwd=REPO,
                                  capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"})
            say(proc.stdout + proc.stderr + f"[exit {proc.returncode}, {time.monotonic() - started:.1f} s]")
            if argv[0] == "facts":
                (out / "facts.json").write_text(proc.stdout)
            if argv[1] == str(custom):              # the SamplerCustom images, one per seed
                (out / "samplercustom-images").mkdir(exist_ok=True)
                for png in sorted(set(outputs.glob("*.png")) - before):
                    shutil.copy(png, out / "samplercustom-images" / png.name)
    finally:
        world.stop()
        sh(sys.executable, str(SERVICE), "stop", str(service), check=False)
    for name in ("report.json", "report.html"):
        if (work / "report" / name).exists():
            shutil.copy(work / "report" / name, out / name)
    if (work / "report-apply" / "report.json").exists():
        shutil.copy(work / "report-apply" / "report.json", out / "report-apply.json")
    for which in ("sampler", "cached", "samplercustom", "samplercustom-linked"):
        if (work / f"report-{which}" / "report.json").exists():
            shutil.copy(work / f"report-{which}" / "report.json", out / f"report-{which}.json")
    shutil.copy(service / "comfyui.log", out / "comfyui.log")
    for which in ("report", "report-sampler", "report-cached", "report-samplercustom",
                  "report-samplercustom-linked"):
        if not (work / which / "report.json").exists():
            say(f"\n{which}: no report.json")
            continue
        report = json.loads((work / which / "report.json").read_text())
        say(f"\n{which}: verification against the probe's own figures:")
        for host in report["hosts"]:
            say(f"  ladder: failed rung {host['ladder']['failed_rung']}")
            for run in host["runs"]:
                image = run.get("image") or {}
                say(f"  {run['kind']:4} run: seed {run['seed']}, ComfyUI {run['seconds_comfy']} s, "
                    f"wall {run['seconds_wall']} s, VRAM peak {run['vram_peak_mib']} MiB, "
                    f"image mean {image.get('mean')} std {image.get('std')}")
            for check in host["checks"]:
                if check["name"] in ("runs_sampled", "generation", "warm_time", "images_ok"):
                    say(f"  {'PASS' if check['passed'] else 'FAIL'} {check['name']}: {check['detail']}")
            say(f"  figures: {json.dumps(host['figures'])}")
    probe_lines = [x for x in (service / "comfyui.log").read_text().splitlines()
                   if any(w in x for w in ("ProvisionGpu", "Prompt executed in", "model weight dtype",
                                           "model_type", "Requested to load", "loaded completely"))]
    say("ComfyUI's own lines:\n  " + "\n  ".join(probe_lines))
    console.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
