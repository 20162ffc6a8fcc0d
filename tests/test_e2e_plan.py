"""`provision plan` over real sshd hosts in several states: the right changes and exit codes, and
not one byte changed on any host."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import Lab, LabHost, open_lab, tree_state

from provisioner.sandbox.wheels import build_impostor_nunchaku

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-plan")) as lab:
        yield lab


@pytest.fixture(scope="module")
def converged(lab: Lab) -> LabHost:
    """One host applied once; each test below bends it, plans, and puts it back with apply."""
    fresh, host = lab.add(2)
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    return host


def plan_json(lab: Lab, *args: str) -> tuple[int, dict]:
    code, out = lab.run("plan", "--json", *args)
    start = out.index("{\n")
    doc, _ = json.JSONDecoder().raw_decode(out[start:])
    return code, doc


def planned(lab: Lab, host: LabHost) -> tuple[int, dict]:
    """Plan one host and prove it touched nothing on any host of the lab."""
    before = {h.name: tree_state(h.sandbox.root) for h in lab.hosts}
    code, doc = plan_json(lab, "--limit", host.name)
    assert {h.name: tree_state(h.sandbox.root) for h in lab.hosts} == before
    (entry,) = doc["hosts"]
    return code, entry


def restore(lab: Lab, host: LabHost) -> None:
    code, out = lab.run("apply", "--limit", host.name, "--no-verify")
    assert code in (0, 2), out
    assert lab.run("plan", "--limit", host.name)[0] == 0


def test_fresh_host_plans_every_resource(lab: Lab, converged: LabHost) -> None:
    fresh = lab.hosts[0]
    code, entry = planned(lab, fresh)
    assert code == 2
    resources = [c["resource"] for c in entry["changes"]]
    assert resources[:4] == ["plugin", "backend", "packages", "model"]
    assert resources.count("model") == 3 and resources.count("workflow") == 2
    backend = next(c for c in entry["changes"] if c["resource"] == "backend")
    assert "nunchaku-1.0.1+torch2.6-cp" in " ".join(backend["steps"])
    packages = next(c for c in entry["changes"] if c["resource"] == "packages")
    (install,) = packages["steps"]
    assert "diffusers>=0.35.1" in install and install.endswith("(torch and its CUDA build held as installed)")


def test_converged_host_plans_nothing(lab: Lab, converged: LabHost) -> None:
    code, entry = planned(lab, converged)
    assert (code, entry["status"], entry["changes"]) == (0, "ok", [])


def test_summary_line_over_the_fleet(lab: Lab, converged: LabHost) -> None:
    code, out = lab.run("plan")
    assert code == 2
    assert "2 hosts: 1 to change (8 changes), 1 up to date, 0 failed" in out


def test_wrong_tag(lab: Lab, converged: LabHost) -> None:
    converged.git("checkout", "-q", "--detach", "v1.0.2")
    code, entry = planned(lab, converged)
    assert code == 2
    (change,) = entry["changes"]
    assert change["resource"] == "plugin" and "tag: v1.0.2 -> v1.1.0" in change["diff"]
    restore(lab, converged)


def test_dirty_plugin_is_refused_and_untouched(lab: Lab, converged: LabHost) -> None:
    init = converged.plugin / "__init__.py"
    original = init.read_text()
    init.write_text(original + "\n# local hotfix\n")
    code, entry = planned(lab, converged)
    assert code == 1 and entry["status"] == "failed"
    assert "__init__.py" in entry["errors"][0] and "force" in entry["errors"][0]
    assert init.read_text().endswith("# local hotfix\n")
    init.write_text(original)


def test_impostor_nunchaku_is_replaced(lab: Lab, converged: LabHost, tmp_path: Path) -> None:
    converged.pip("--force-reinstall", "--no-deps", str(build_impostor_nunchaku(tmp_path)))
    code, entry = planned(lab, converged)
    assert code == 2
    (change,) = entry["changes"]
    assert change["resource"] == "backend" and change["action"] == "replace"
    assert any("uninstall" in s for s in change["steps"])
    restore(lab, converged)


def test_old_diffusers(lab: Lab, converged: LabHost) -> None:
    converged.pip("--find-links", str(lab.world.wheelhouse), "diffusers==0.34.0")
    code, entry = planned(lab, converged)
    assert code == 2
    (change,) = entry["changes"]
    assert change["resource"] == "packages" and "0.34.0" in change["summary"]
    restore(lab, converged)


def test_wrong_workflow_shows_a_json_diff(lab: Lab, converged: LabHost) -> None:
    path = converged.comfy / "workflows" / "qwen-image-lightning.json"
    path.write_text(path.read_text().replace('"euler"', '"dpmpp_2m"'))
    code, entry = planned(lab, converged)
    assert code == 2
    (change,) = entry["changes"]
    assert change["resource"] == "workflow"
    assert '-      "sampler_name": "dpmpp_2m",' in change["diff"]
    assert '+      "sampler_name": "euler",' in change["diff"]
    restore(lab, converged)


def test_torch_without_a_wheel_fails_with_the_alternatives(lab: Lab, converged: LabHost) -> None:
    (odd,) = lab.add(1, torch="2.9.0+cu128")
    code, entry = planned(lab, odd)
    assert code == 1 and entry["status"] == "failed"
    message = " ".join(entry["errors"])
    assert "no nunchaku 1.0.1 wheel for torch 2.9" in message and "torch2.8/" in message


def test_plugin_too_new_for_the_core_is_refused(lab: Lab, converged: LabHost) -> None:
    code, out = lab.run("plan", "--limit", converged.name)
    assert code == 0
    lab.profile_extra = {"plugin": {"tag": "v1.2.0"}, "backend": {"version": "1.2.0"}}   # #777: backend >= 1.2.0
    lab.write()
    try:
        code, entry = planned(lab, converged)
    finally:
        lab.profile_extra = {}
        lab.write()
    assert code == 1
    assert "use_additional_t_cond" in entry["errors"][0] and "v1.1.0" in entry["errors"][0]


def test_unreachable_host_is_listed_and_others_still_answer(lab: Lab, converged: LabHost) -> None:
    lab.add_unreachable()
    try:
        code, doc = plan_json(lab)
    finally:
        lab.extra_hosts.clear()
        lab.write()
    assert code == 1
    status = {h["host"]: h["status"] for h in doc["hosts"]}
    assert status["gpu-down"] == "unreachable" and status[converged.name] == "ok"


def test_the_cores_of_december_2026_over_ssh(lab: Lab) -> None:
    """Hosts whose stand-in core is the newest release (v0.47.1) or 0.23.0 (apply_rotary_emb moved),
    with plugin v1.2.0 and backend 1.2.0 on torch 2.9 (cu130, as 1.2.0 built it): the first is planned
    with a warning saying what was checked from its files and what was not; the second is refused
    with its thread."""
    newest, moved = (lab.add(1, torch="2.9.0+cu130", comfyui_version=v)[0] for v in ("0.47.1", "0.23.0"))
    lab.profile_extra = {"plugin": {"tag": "v1.2.0"}, "backend": {"version": "1.2.0"}}
    lab.write()
    try:
        code, entry = planned(lab, newest)
        assert code == 2 and entry["errors"] == [], entry["errors"]
        (warning,) = [n["message"] for n in entry["notes"] if n["resource"] == "compat"]
        assert warning.startswith("ComfyUI 0.47.1 came after v0.8.0, the last core before ComfyUI-nunchaku v1.2.0 "
                                  "(2026-01-12), which upstream has not adapted to it: checked: ")
        assert "comfy/ldm/qwen_image/model.py has apply_rotary_emb, which the plugin imports from it (read from " \
               "its source)" in warning and "not checked: whether a core after 0.12.x still breaks the plugin as " \
               "ComfyUI-nunchaku#801 reported" in warning
        assert warning.endswith("apply with --verify-gate, which rolls back a host whose generations fail")
        code, entry = planned(lab, moved)
        assert code == 1
        assert entry["errors"][0].startswith("compat: ComfyUI-nunchaku v1.2.0 on ComfyUI 0.23.0 is known broken: "
                                             "ImportError: cannot import name 'apply_rotary_emb'")
    finally:
        lab.profile_extra = {}
        lab.write()


def test_a_second_copy_of_the_plugin_is_found_whatever_its_name(lab: Lab, converged: LabHost) -> None:
    """A Comfy Registry install beside the checkout (a plain folder, `.tracking`, the pyproject name)
    is a plan error naming both; disabled as ComfyUI-Manager does it, it is only a note."""
    registry = converged.comfy / "custom_nodes" / "comfyui-nunchaku"
    shutil.copytree(converged.plugin, registry, ignore=shutil.ignore_patterns(".git"))
    (registry / ".tracking").write_text("__init__.py\n")
    try:
        code, entry = planned(lab, converged)
        assert code == 1 and entry["status"] == "failed"
        (error,) = entry["errors"]
        assert str(converged.plugin) in error and str(registry) in error and "disable comfyui-nunchaku" in error
        disabled = converged.comfy / "custom_nodes" / ".disabled" / "comfyui-nunchaku@1.1.0"
        disabled.parent.mkdir()
        registry.rename(disabled)
        code, entry = planned(lab, converged)
        assert (code, entry["changes"]) == (0, [])
        assert [n["message"] for n in entry["notes"] if n["resource"] == "plugin"] == [
            f"disabled copies of the plugin, not loaded by ComfyUI: {disabled}"]
        code, out = lab.run("facts", "--json", "--limit", converged.name)
        packs = json.loads(out[out.index("{"):])[converged.name]["node_packs"][str(disabled.parent.parent)]
        assert {"name": disabled.name, "path": str(disabled), "enabled": False, "origin": None,
                "project": "comfyui-nunchaku", "registry": True} in packs
    finally:
        shutil.rmtree(registry, ignore_errors=True)
        shutil.rmtree(converged.comfy / "custom_nodes" / ".disabled", ignore_errors=True)


def test_adopt_takes_a_registry_copy_over_in_place(lab: Lab) -> None:
    """On a host where the Registry installed the plugin as `comfyui-nunchaku`, apply would clone a
    second copy: refused, naming `plugin.adopt`; with it, apply puts a checkout in that folder."""
    (host,) = lab.add(1)
    nodes = host.comfy / "custom_nodes"
    subprocess.run(["git", "clone", "-q", "--branch", "v1.0.2", str(lab.world.plugin_repo),
                    str(nodes / "comfyui-nunchaku")], check=True, capture_output=True)
    shutil.rmtree(nodes / "comfyui-nunchaku" / ".git")
    (nodes / "comfyui-nunchaku" / ".tracking").write_text("__init__.py\n")
    code, entry = planned(lab, host)
    assert code == 1 and "plugin.name: comfyui-nunchaku and plugin.adopt: true" in entry["errors"][0]
    lab.profile_extra = {"plugin": {"name": "comfyui-nunchaku", "adopt": True}}
    lab.write()
    try:
        code, entry = planned(lab, host)
        plugin_change = next(c for c in entry["changes"] if c["resource"] == "plugin")
        assert plugin_change["summary"].startswith(f"adopt {nodes / 'comfyui-nunchaku'} (pyproject.toml name")
        code, out = lab.run("apply", "--limit", host.name, "--no-verify")
        assert code == 2, out
        tags = subprocess.run(["git", "-C", str(nodes / "comfyui-nunchaku"), "tag", "--points-at", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.split()
        assert tags == ["v1.1.0"] and not (nodes / "ComfyUI-nunchaku").exists()
        backups = [p.name for p in nodes.iterdir() if ".provision-backup-" in p.name]
        assert len(backups) == 1 and (nodes / backups[0] / ".tracking").exists()
        assert lab.run("plan", "--limit", host.name)[0] == 0
    finally:
        lab.profile_extra = {}
        lab.write()


def test_a_saved_plan_is_applied_exactly_or_refused_when_the_host_changed(lab: Lab, converged: LabHost,
                                                                          tmp_path: Path) -> None:
    """Terraform's `plan -out` then `apply PLANFILE`: what was reviewed is what runs; a host whose
    facts moved since is refused, saying what moved, and left as it is."""
    saved = tmp_path / "reviewed.plan"

    def apply_saved() -> tuple[int, str]:
        import io
        from contextlib import redirect_stderr, redirect_stdout

        from provisioner import cli

        out = io.StringIO()
        with redirect_stdout(out), redirect_stderr(out):
            code = cli.main(["apply", str(saved), *lab.ssh_args(), "--no-color", "--no-verify",
                             "--log-dir", str(lab.root / "logs")])
        return code, out.getvalue()

    converged.git("checkout", "-q", "--detach", "v1.0.2")
    code, out = lab.run("plan", "--limit", converged.name, "--out", str(saved))
    assert code == 2 and f"saved to {saved}" in out, out
    doc = json.loads(saved.read_text())
    assert [c.split(":")[0] for c in doc["hosts"][converged.name]["changes"]] == [
        f"update plugin {converged.plugin}"]

    converged.git("checkout", "-q", "--detach", "v1.0.0")         # the host moves after the review
    before = tree_state(converged.sandbox.root)
    code, out = apply_saved()
    assert code == 1, out
    assert f"its facts changed since {saved} was written (" in out and "v1.0.2" in out and "v1.0.0" in out
    assert tree_state(converged.sandbox.root) == before            # refused: nothing touched

    code, out = lab.run("plan", "--limit", converged.name, "--out", str(saved))
    assert code == 2, out
    code, out = apply_saved()
    assert code == 2, out
    assert converged.git("tag", "--points-at", "HEAD") == "v1.1.0"
    assert lab.run("plan", "--limit", converged.name)[0] == 0

    lab.profile_extra = {"verify": {"warm_runs": 3}}                # the profile is edited after the review
    lab.write()
    try:
        code, out = apply_saved()
        assert code == 3 and "changed since this plan was written" in out, out
    finally:
        lab.profile_extra = {}
        lab.write()


def test_a_saved_plan_whose_pin_makes_pip_move_another_distribution_applies_and_keeps_its_wheel(
        lab: Lab, converged: LabHost, tmp_path: Path) -> None:
    """`plan --out` runs pip's dry run, so the saved changes say what pip moves besides the pin;
    `apply PLAN` plans the same way (the same changes, not refused) and its snapshot keeps the
    wheel of the distribution pip replaces."""
    saved = tmp_path / "pinned.plan"
    lab.profile_extra = {"packages": ["diffusers>=0.35", "peft>=0.17", "tokenizers==0.22.2"]}
    lab.write()
    try:
        code, out = lab.run("plan", "--limit", converged.name, "--out", str(saved))
        assert code == 2 and "pip also moves huggingface-hub 0.35.3 -> 0.34.4" in out, out
        import io
        from contextlib import redirect_stderr, redirect_stdout

        from provisioner import cli

        said = io.StringIO()
        with redirect_stdout(said), redirect_stderr(said):
            code = cli.main(["apply", str(saved), *lab.ssh_args(), "--no-color", "--no-verify",
                             "--log-dir", str(lab.root / "logs")])
        out = said.getvalue()
        assert code == 2, out
        assert "1 host: 1 changed" in out, out
        assert list((converged.comfy / ".provision" / "snapshots" / "wheels").glob("*/huggingface_hub-0.35.3-*.whl"))
    finally:
        lab.profile_extra = {}
        lab.write()
        assert lab.run("rollback", "--limit", converged.name, "--no-verify")[0] in (0, 2)   # as the module had it
