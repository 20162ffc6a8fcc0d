"""The docs that are generated from the schemas stay in step with them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from provisioner.config.schema_doc import markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("kind", ["profile", "inventory", "lock"])
def test_reference_matches_schema(kind: str) -> None:
    text = (DOCS / f"{kind}-reference.md").read_text()
    assert text == markdown(kind), f"run: provision schema {kind} --markdown > docs/{kind}-reference.md"


def test_profile_reference_documents_every_key() -> None:
    text = markdown("profile")
    for key in ("comfyui.root", "plugin.tag", "backend.sources", "model.variant", "workflow.cpu_offload",
                "verify.thresholds.warm_seconds", "huggingface.token_env", "pip.no_index"):
        assert f"| `{key}` |" in text


def test_inventory_reference_documents_every_variable_provision_reads() -> None:
    """Every `ansible_*` / `provision_*` name the inventory code reads has a row (was: an empty table)."""
    source = (DOCS.parent / "provisioner" / "config" / "inventory.py").read_text()
    read = set(re.findall(r'"((?:ansible|provision)_[a-z_]+|provision)"', source))
    assert {"ansible_ssh_host", "ansible_ssh_port", "ansible_ssh_user", "provision_jump"} <= read
    text = markdown("inventory")
    assert [name for name in sorted(read) if f"| `{name}` |" not in text] == []


def test_every_file_the_readme_and_docs_run_exists() -> None:
    """`provision plan profiles/fresh.yaml` in the README must work as printed: each shipped profile
    or inventory a doc names is in the repository (and every shipped profile validates: test_cli)."""
    repo = DOCS.parent
    texts = [repo / "README.md", *DOCS.glob("*.md")]
    named = {m for path in texts for m in re.findall(r"\b((?:profiles|inventories)/[\w.-]+\.yaml)\b", path.read_text())}
    assert "profiles/fresh.yaml" in named
    # A lock (PROFILE.lock.yaml) is what `provision lock` writes on the user's side, not a shipped file.
    assert sorted(n for n in named if not (repo / n).is_file() and not n.endswith(".lock.yaml")) == []
