"""ComfyUI-nunchaku v1.2.0 against real ComfyUI cores: refused where the core's
QwenTimestepProjEmbeddings does not take `use_additional_t_cond`, applied where it does."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import upstream
from lab import Lab, tree_state
from realhost import RealHost, http_json

pytestmark = pytest.mark.real

CORE_MODEL = Path("comfy/ldm/qwen_image/model.py")
REAL_SIGNATURE = "def __init__(self, embedding_dim, pooled_projection_dim, dtype=None, device=None, operations=None):"


def take_t_cond(comfy: Path) -> None:
    """The change upstream made to the core (Comfy-Org/ComfyUI #11408), on a v0.3.64 checkout:
    QwenTimestepProjEmbeddings takes `use_additional_t_cond`, which v1.2.0 passes."""
    path = comfy / CORE_MODEL
    text = path.read_text()
    assert text.count(REAL_SIGNATURE) == 1, "the real v0.3.64 signature is not where it was"
    path.write_text(text.replace(REAL_SIGNATURE, REAL_SIGNATURE.replace(
        "pooled_projection_dim, ", "pooled_projection_dim, use_additional_t_cond=False, ") +
        "\n        self.use_additional_t_cond = use_additional_t_cond", 1))


def use_tag(lab: Lab, host: RealHost, tag: str) -> None:
    lab.overlays[host.name] = {"plugin": {"tag": tag}}
    lab.write()


@pytest.mark.parametrize("core", ["v0.3.60", "v0.3.64"])
def test_plugin_v120_is_refused_on_a_real_core_without_use_additional_t_cond(
        real_lab: Lab, real_host: Callable[..., RealHost], core: str) -> None:
    host = real_host(core, start=False)         # a plan reads files; ComfyUI need not run
    assert "use_additional_t_cond" not in (host.comfy / CORE_MODEL).read_text()   # upstream's fact
    use_tag(real_lab, host, "v1.2.0")
    before = tree_state(host.comfy, skip=("venv", "__pycache__"))
    for verb in ("plan", "apply"):
        code, out = real_lab.run(verb, "--limit", host.name, "--no-verify" if verb == "apply" else "-v")
        assert code == 1, out
        assert ("ComfyUI-nunchaku v1.2.0 needs a ComfyUI core whose QwenTimestepProjEmbeddings takes "
                f"use_additional_t_cond (ComfyUI >= 0.6.0); this host has {core[1:]}") in out
        assert "pin plugin.tag v1.1.0 or update ComfyUI" in out
        assert "Traceback" not in out
    assert not host.plugin.exists()
    assert tree_state(host.comfy, skip=("venv", "__pycache__")) == before


def test_plugin_v120_applies_on_a_real_core_patched_to_take_use_additional_t_cond(
        real_lab: Lab, real_host: Callable[..., RealHost], plugin_repo: Path) -> None:
    host = real_host("v0.3.64", patch=take_t_cond)
    use_tag(real_lab, host, "v1.2.0")
    host.wait_ready()                           # the patched core runs
    code, out = real_lab.run("plan", "--limit", host.name)
    assert code == 2, out
    assert f"clone ComfyUI-nunchaku v1.2.0 into {host.plugin}" in out

    code, out = real_lab.run("apply", "--limit", host.name, "--no-verify")
    assert code == 2, out
    assert "1 changed, 0 unchanged, 0 failed" in out
    assert host.git("rev-parse", "HEAD") == upstream.git("-C", str(plugin_repo), "rev-parse", "v1.2.0^{commit}")
    host.wait_ready()                           # restarted: real ComfyUI loads the real v1.2.0
    assert "ComfyUI-nunchaku version: 1.2.0" in host.log()
    assert "NunchakuWheelInstaller" in http_json(host.url + "/object_info")
    assert real_lab.run("plan", "--limit", host.name)[0] == 0


def test_plugin_v110_is_refused_on_real_v0348_which_has_no_qwen_image(
        real_lab: Lab, real_host: Callable[..., RealHost]) -> None:
    host = real_host("v0.3.48", start=False)    # decided from the host's files
    assert not (host.comfy / "comfy" / "ldm" / "qwen_image").exists()          # upstream's fact
    before = tree_state(host.comfy, skip=("venv", "__pycache__"))
    for verb in ("plan", "apply"):
        code, out = real_lab.run(verb, "--limit", host.name, "--no-verify" if verb == "apply" else "-v")
        assert code == 1, out
        said = " ".join(out.split())
        assert ("ComfyUI-nunchaku v1.1.0 builds Qwen-Image on ComfyUI core's comfy/ldm/qwen_image, which "
                "this host's ComfyUI 0.3.48 does not have (it came after 0.3.48): update ComfyUI") in said
        # The profile's model family (Qwen-Image-Edit-2509) needs a later core too, and says so.
        assert "model.family qwen-image-edit-2509 needs ComfyUI >= 0.3.60" in said
        assert "Traceback" not in out
    assert not host.plugin.exists()
    assert tree_state(host.comfy, skip=("venv", "__pycache__")) == before


def move_apply_rotary_emb(comfy: Path) -> None:
    """What core 0.23 did (ComfyUI-nunchaku#820, #822), on a real v0.3.64 checkout: the function the
    plugin imports from comfy/ldm/qwen_image/model.py is there under another name, so that import fails."""
    path = comfy / CORE_MODEL
    text = path.read_text()
    assert text.count("def apply_rotary_emb(") == 1, "the real v0.3.64 apply_rotary_emb is not where it was"
    path.write_text(text.replace("apply_rotary_emb", "apply_rope_moved"))


def test_the_plugin_is_refused_on_a_real_core_whose_model_py_lacks_apply_rotary_emb(
        real_lab: Lab, real_host: Callable[..., RealHost]) -> None:
    host = real_host("v0.3.64", start=False, patch=move_apply_rotary_emb)
    # The patched real core really lacks the name: its own interpreter says so, as the plugin's import would.
    # (--cpu, read as main.py has ComfyUI read it: its model management sets up the device at import,
    # and this machine has no GPU.)
    probe = subprocess.run([str(host.comfy / "venv" / "bin" / "python"), "-c",
                            "import sys, comfy.options; sys.argv.append('--cpu'); comfy.options.enable_args_parsing()\n"
                            "from comfy.ldm.qwen_image.model import apply_rotary_emb"],
                           cwd=host.comfy, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 1 and "cannot import name 'apply_rotary_emb'" in probe.stderr, probe.stderr[-500:]
    before = tree_state(host.comfy, skip=("venv", "__pycache__"))
    for verb in ("plan", "apply"):
        code, out = real_lab.run(verb, "--limit", host.name, "--no-verify" if verb == "apply" else "-v")
        assert code == 1, out
        said = " ".join(out.split())
        assert ("ComfyUI-nunchaku v1.1.0 on ComfyUI 0.3.64 is known broken: ImportError: cannot import name "
                "'apply_rotary_emb' from 'comfy.ldm.qwen_image.model' (the DiT loader does not register) "
                "(ComfyUI-nunchaku#820, #822; fixed in core by Comfy-Org/ComfyUI PR #14364 (2026-06-09))") in said
        assert "Traceback" not in out
    assert not host.plugin.exists()
    assert tree_state(host.comfy, skip=("venv", "__pycache__")) == before
