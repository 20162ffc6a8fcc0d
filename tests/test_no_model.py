"""`model.family: null`: hosts whose ComfyUI, plugin, backend and workflows provision keeps, with no
Nunchaku model (a GPU nunchaku does not run on, or a smoke profile)."""

from __future__ import annotations

from pathlib import Path

from provisioner.config.model import build_profile
from provisioner.config.validate import validate_files
from provisioner.facts.model import Facts, Gpu, PythonEnv
from provisioner.report.adapt import versions_from
from provisioner.resources import models, service, workflow

REPO = Path(__file__).resolve().parents[1]
H200 = Gpu(0, "NVIDIA H200", 143771, 143000, 771, (9, 0), "580.159.04", "GPU-h200")


def profile(**model: object) -> object:
    return build_profile({"comfyui": {"root": "/srv/ComfyUI"}, "model": {"family": None, **model},
                          "verify": {"family_nodes": True, "required_nodes": ["GpuProbe"]},
                          "workflow": {"template_dir": str(REPO / "templates"), "steps": 3}},
                         name="p", file=str(REPO / "profiles" / "p.yaml"))


def facts() -> Facts:
    return Facts("h200", "Ubuntu 24.04", "x86_64", "6.8", "3.12", PythonEnv("/srv/ComfyUI/venv/bin/python", True),
                 (H200,), None, None, "/srv", 10**12, "0.3.64")


def test_no_model_plans_no_download_even_on_a_gpu_nunchaku_refuses() -> None:
    p = profile()
    assert models.probe(p).stat == () and models.plan(p, facts()).changes == ()
    assert models.paths(p, facts()) == ()


def test_no_model_workflows_get_no_model_names_and_the_profile_steps() -> None:
    values = workflow.variables(profile(), facts())
    assert "model_name" not in values and values["steps"] == 3


def test_no_model_requires_only_the_listed_nodes_and_reports_no_variant() -> None:
    assert [n.name for n in service.required_nodes(profile())] == ["GpuProbe"]
    versions = versions_from({}, profile())
    assert versions["model_variant"] is None and versions["precision"] is None


def test_a_null_family_validates(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text(f"comfyui: {{root: /srv/ComfyUI}}\nmodel: {{family: null}}\n"
                 f"workflow: {{template_dir: {REPO / 'templates'}}}\n")
    assert validate_files([f]) == []
