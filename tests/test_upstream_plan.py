"""Plan cases decided by upstream truth alone (pure: profile + facts in, plan out), starting from the
real facts captures in tests/facts/."""

from __future__ import annotations

import json
from pathlib import Path

from provisioner.config.model import build_profile
from provisioner.facts.parse import parse_facts
from provisioner.plan.build import build_plan

FACTS = Path(__file__).parent / "facts"


def captured(name: str):
    return parse_facts("gpu-h200", json.loads((FACTS / f"{name}.json").read_text())["answer"])


def test_real_h200_capture_is_refused_with_the_reason(tmp_path: Path) -> None:
    """The lent H200 (compute 9.0): nunchaku's check_hardware_compatibility refuses sm_90, so the
    plan refuses the host (it was planned as an int4 host before), once, whatever resource asks."""
    facts = captured("device-h200-local")
    (tmp_path / "wheels").mkdir()
    profile = build_profile({"comfyui": {"root": "/opt/torch", "venv": ".venv"},
                             "backend": {"version": "1.2.1", "sources": [{"wheelhouse": str(tmp_path / "wheels")}]}},
                            name="h200", file=str(tmp_path / "p.yaml"))
    plan = build_plan(profile, facts)
    reason = ("NVIDIA H200 (compute capability 9.0) has no 4-bit tensor cores nunchaku supports (int4 on "
              "7.5, 8.0, 8.6, 8.9; fp4 on 12.0, 12.1): it cannot run SVDQuant models on this GPU; ComfyUI's own "
              "int8 convrot models (core >= v0.27.0) run on it: a different stack, not a nunchaku variant")
    assert f"model, workflow: {reason}" in plan.errors
    assert sum(reason in e for e in plan.errors) == 1
