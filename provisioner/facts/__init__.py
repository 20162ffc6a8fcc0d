"""What a host is and has, gathered in one round trip (`gather`) and parsed into `Facts`."""

from __future__ import annotations

from provisioner.facts.gather import base_probe, gather
from provisioner.facts.model import (
    Distribution,
    Facts,
    FileState,
    GitCheckout,
    Gpu,
    Probe,
    PythonEnv,
    canonical,
)
from provisioner.facts.parse import (
    describe_nunchaku,
    facts_to_json,
    is_real_nunchaku,
    parse_facts,
    parse_nvidia_smi_csv,
)
from provisioner.facts.render import render_facts

__all__ = [
    "Distribution", "Facts", "FileState", "GitCheckout", "Gpu", "Probe", "PythonEnv", "canonical",
    "base_probe", "gather", "describe_nunchaku", "facts_to_json", "is_real_nunchaku", "parse_facts",
    "parse_nvidia_smi_csv", "render_facts",
]
