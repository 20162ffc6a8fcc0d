"""A stdlib-only `nvidia-smi` that answers like the real tool from GPU presets (real captures).

host.py copies this file into a sandbox host's bin/ with the preset baked in as CONFIG; memory
used/free come from a JSON state file so a stand-in ComfyUI can raise VRAM use during a generation
(on the GPU the state names, the first by default). `-i` takes an index, a UUID or a PCI bus id;
`-lms N` repeats the query every N ms until killed, as the real tool does.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

CONFIG: dict = {}  # replaced by host.py in the installed copy

DRIVER_FAILED = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
    "Make sure that the latest NVIDIA driver is installed and running."
)
INVALID_ARGS = "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help."
STATE_KEY = "memory_used_mib"

# Display-only figures (temperature, power) are plausible idle readings of each card.
_CONSUMER = dict(pm="Off", disp=" On", ecc="N/A", fan="30%", perf="P8", util=0, mode="Default",
                 mig="N/A", bus="00000000:01:00.0", used=0)
PRESETS: dict[str, dict] = {
    "rtx3090": dict(_CONSUMER, name="NVIDIA GeForce RTX 3090", total=24576, reserved=322,
                    driver="550.120", cuda="12.4", cc="8.6", temp=35, power=22, cap=350),
    "rtx4090": dict(_CONSUMER, name="NVIDIA GeForce RTX 4090", total=24564, reserved=347,
                    driver="550.120", cuda="12.4", cc="8.9", temp=36, power=18, cap=450),
    "rtx5090": dict(_CONSUMER, name="NVIDIA GeForce RTX 5090", total=32607, reserved=487,
                    driver="570.133.07", cuda="12.8", cc="12.0", temp=34, power=21, cap=575),
    "a100-80gb": dict(pm="On", disp="Off", ecc="0", fan="N/A", perf="P0", util=0, mode="Default",
                      mig="Disabled", bus="00000000:07:00.0", used=0, name="NVIDIA A100-SXM4-80GB",
                      total=81920, reserved=665, driver="535.183.01", cuda="12.2", cc="8.0",
                      temp=31, power=62, cap=400),
    # "h100" is read from the real capture at build time: see host.h100_preset().
    "h100": dict(pm="On", disp="Off", ecc="0", fan="N/A", perf="P0", util=0, mode="Default",
                 mig="Disabled", temp=33, power=71, cap=700, cuda="13.0"),
    "broken-driver": {},
}

# field -> (csv header, unit or "", how to read it from (gpu, used, free))
FIELDS = {
    "index": ("index", "", lambda g, u, f: g["index"]),
    "name": ("name", "", lambda g, u, f: g["name"]),
    "gpu_name": ("name", "", lambda g, u, f: g["name"]),
    "uuid": ("uuid", "", lambda g, u, f: g["uuid"]),
    "gpu_uuid": ("uuid", "", lambda g, u, f: g["uuid"]),
    "memory.total": ("memory.total", "MiB", lambda g, u, f: g["total"]),
    "memory.used": ("memory.used", "MiB", lambda g, u, f: u),
    "memory.free": ("memory.free", "MiB", lambda g, u, f: f),
    "memory.reserved": ("memory.reserved", "MiB", lambda g, u, f: g["reserved"]),
    "driver_version": ("driver_version", "", lambda g, u, f: g["driver"]),
    "compute_cap": ("compute_cap", "", lambda g, u, f: g["cc"]),
    "pci.bus_id": ("pci.bus_id", "", lambda g, u, f: g["bus"]),
    "count": ("count", "", lambda g, u, f: len(CONFIG["gpus"])),
    "temperature.gpu": ("temperature.gpu", "", lambda g, u, f: g["temp"]),
    "utilization.gpu": ("utilization.gpu", "%", lambda g, u, f: g["util"]),
    "power.draw": ("power.draw", "W", lambda g, u, f: f"{g['power']:.2f}"),
    "power.limit": ("power.limit", "W", lambda g, u, f: f"{g['cap']:.2f}"),
    "persistence_mode": ("persistence_mode", "", lambda g, u, f: "Enabled" if g["pm"] == "On" else "Disabled"),
}


def memory(gpu: dict) -> tuple[int, int]:
    """(used, free) MiB: used from the state file when it is about this GPU, free = total - reserved - used."""
    used = gpu["used"]
    state = CONFIG.get("state")
    if state:
        try:
            data = json.loads(Path(state).read_text())
            if data.get("gpu", CONFIG["gpus"][0]["uuid"]) == gpu["uuid"]:
                used = int(data[STATE_KEY])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no or half-written state: the idle figure, like a GPU nobody uses
    return used, max(gpu["total"] - gpu["reserved"] - used, 0)


def selected(gpu: dict, ids: list[str] | None) -> bool:
    return ids is None or any(i in (str(gpu["index"]), gpu["uuid"], gpu["bus"]) for i in ids)


def query(fields: list[str], fmt: set[str], ids: list[str] | None) -> tuple[str, int]:
    for field in fields:
        if field not in FIELDS:
            return f'Field "{field}" is not a valid field to query.\n\n', 2
    lines = []
    if "noheader" not in fmt:
        heads = [FIELDS[f][0] + (f" [{FIELDS[f][1]}]" if FIELDS[f][1] and "nounits" not in fmt else "")
                 for f in fields]
        lines.append(", ".join(heads))
    if ids is not None and not any(selected(g, ids) for g in CONFIG["gpus"]):
        return "No devices were found\n", 6
    for gpu in CONFIG["gpus"]:
        if not selected(gpu, ids):
            continue
        used, free = memory(gpu)
        cells = []
        for f in fields:
            value, unit = str(FIELDS[f][2](gpu, used, free)), FIELDS[f][1]
            cells.append(f"{value} {unit}" if unit and "nounits" not in fmt else value)
        lines.append(", ".join(cells))
    return "".join(line + "\n" for line in lines), 0


def table() -> str:
    """The default `nvidia-smi` screen, laid out column for column like driver 580's."""
    first = CONFIG["gpus"][0]
    bar = "+" + "-" * 41 + "+" + "-" * 24 + "+" + "-" * 22 + "+"
    out = [
        time.asctime() + " " * 7,
        "+" + "-" * 89 + "+",
        f"| NVIDIA-SMI {first['driver']:<23}Driver Version: {first['driver']:<15}CUDA Version: {first['cuda']:<9}|",
        bar,
        "| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |",
        "| Fan  Temp   Perf          Pwr:Usage/Cap |           Memory-Usage | GPU-Util  Compute M. |",
        "|                                         |                        |               MIG M. |",
        "|" + "=" * 41 + "+" + "=" * 24 + "+" + "=" * 22 + "|",
    ]
    for g in CONFIG["gpus"]:
        used, _ = memory(g)
        out += [
            f"| {g['index']:>3}  {g['name']:<31}{g['pm']:<3} | {g['bus']:>18} {g['disp']:>3} | {g['ecc']:>20} |",
            f"| {g['fan']:>3}  {g['temp']:>3}C    {g['perf']:<2}{g['power']:>15}W / {g['cap']:>4}W "
            f"| {used:>7}MiB / {g['total']:>6}MiB | {g['util']:>6}%{g['mode']:>13} |",
            f"|{'':41}|{'':24}| {g['mig']:>20} |",
            bar,
        ]
    out += [
        "",
        "+" + "-" * 89 + "+",
        "| Processes:" + " " * 78 + "|",
        "|  GPU   GI   CI              PID   Type   Process name                        GPU Memory |",
        "|        ID   ID                                                               Usage      |",
        "|" + "=" * 89 + "|",
        "|  No running processes found" + " " * 61 + "|",
        "+" + "-" * 89 + "+",
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if CONFIG.get("broken"):
        print(DRIVER_FAILED)
        return 9
    fields: list[str] | None = None
    fmt: set[str] | None = None
    ids: list[str] | None = None
    loop_ms: int | None = None
    args = list(argv)
    while args:
        arg = args.pop(0)
        key, eq, value = arg.partition("=")
        if key in ("--query-gpu", "--format", "-i", "--id", "-lms", "--loop-ms") and not eq:
            if not args:
                print(INVALID_ARGS)
                return 2
            value = args.pop(0)
        if key == "--query-gpu":
            fields = [f.strip() for f in value.split(",") if f.strip()]
        elif key == "--format":
            fmt = {f.strip() for f in value.split(",")}
        elif key in ("-i", "--id"):
            ids = [i.strip() for i in value.split(",") if i.strip()]
        elif key in ("-lms", "--loop-ms"):
            loop_ms = int(value)
        elif key == "-L":
            for g in CONFIG["gpus"]:
                print(f"GPU {g['index']}: {g['name']} (UUID: {g['uuid']})")
            return 0
        else:
            print(INVALID_ARGS)
            return 2
    if fields is None:
        sys.stdout.write(table())
        return 0
    if fmt is None or "csv" not in fmt:
        print(INVALID_ARGS)
        return 2
    while True:
        text, code = query(fields, fmt, ids)
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:                 # whoever read the stream went away: so do we
            return 0
        if loop_ms is None or code:
            return code
        time.sleep(loop_ms / 1000)


def write_state(state_file: Path, used_mib: int, gpu_uuid: str | None = None) -> None:
    """Atomically set memory.used (MiB) of a sandbox host's GPU (by UUID; None: the first)."""
    # A temp name of its own per write (not per process: a server's threads write too).
    fd, tmp = tempfile.mkstemp(dir=state_file.parent, prefix=f".{state_file.name}.")
    with os.fdopen(fd, "w") as out:
        out.write(json.dumps({STATE_KEY: int(used_mib), **({"gpu": gpu_uuid} if gpu_uuid else {})}))
    os.chmod(tmp, 0o644)
    os.replace(tmp, state_file)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
