"""The lock file's data model (config/lock.py): round trip, the profile digest, located errors, diffs."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from provisioner.cli import main
from provisioner.config import lock as lockfile
from provisioner.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40
SHA_A, SHA_B = "1" * 64, "2" * 64


def sample(file: str = "x.lock.yaml") -> lockfile.Lock:
    env = lockfile.Environment(
        "sm_86", "2.8.0+cu128", "cp312", "linux_x86_64",
        lockfile.TorchPin("--index-url https://download.pytorch.org/whl/cu128",
                          {"torch": "2.8.0+cu128", "torchvision": "0.23.0+cu128"}),
        lockfile.WheelPin("nunchaku-1.0.1+torch2.8-cp312-cp312-linux_x86_64.whl", "https://example.invalid/n.whl",
                          123, SHA_A),
        {"diffusers": "0.35.1", "huggingface-hub": "0.35.3"})
    return lockfile.Lock(file, "x.yaml", "sha256:" + "0" * 64,
                         lockfile.GitPin("https://github.com/Comfy-Org/ComfyUI.git", "v0.3.64", COMMIT_A),
                         lockfile.GitPin("https://github.com/nunchaku-ai/ComfyUI-nunchaku.git", "v1.1.0", COMMIT_B),
                         (lockfile.ModelPin("nunchaku-tech/nunchaku-qwen-image", "dit.safetensors", "main",
                                            COMMIT_A, 12_000, SHA_B),),
                         {env.key: env})


def test_dump_then_load_is_the_same_lock(tmp_path: Path) -> None:
    lock = sample(str(tmp_path / "x.lock.yaml"))
    lockfile.write(lock)
    text = (tmp_path / "x.lock.yaml").read_text()
    assert text.startswith("# Written by `provision lock`")
    assert lockfile.load(tmp_path / "x.lock.yaml") == lock
    assert lockfile.dumps(lockfile.load(tmp_path / "x.lock.yaml")) == text     # stable bytes


def test_lock_path_sits_beside_the_profile() -> None:
    assert lockfile.path_for("profiles/rtx3090.yaml") == Path("profiles/rtx3090.lock.yaml")
    assert lockfile.path_for("p/a.yml") == Path("p/a.lock.yaml")


def test_digest_ignores_comments_and_checkout_place_but_not_content(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    for where in (one, two):
        shutil.copytree(ROOT / "profiles", where / "profiles")
    chain = lambda base: (str(base / "profiles" / "rtx3090.yaml"), str(base / "profiles" / "base.yaml"))  # noqa: E731
    assert lockfile.profile_digest(chain(one)) == lockfile.profile_digest(chain(two))
    profile = two / "profiles" / "rtx3090.yaml"
    profile.write_text("# a comment\n" + profile.read_text())
    assert lockfile.profile_digest(chain(one)) == lockfile.profile_digest(chain(two))
    (two / "profiles" / "base.yaml").write_text((two / "profiles" / "base.yaml").read_text().replace("v1.1.0", "v1.2.0"))
    assert lockfile.profile_digest(chain(one)) != lockfile.profile_digest(chain(two))


@pytest.mark.parametrize("edit, expected", [
    (lambda t: t.replace("digest: sha256:", "digest: md5:"), "x.lock.yaml:5:1: digest:"),
    (lambda t: t.replace("size: 12000", "size: twelve"), "models[0].size: expected an integer"),
    (lambda t: t.replace("commit: " + COMMIT_A, "commit: abc", 1), "core.commit:"),
    (lambda t: t + "extra: 1\n", "extra: unknown key"),
    (lambda t: t.replace("format: 1", "format: 2"), "format: 2 is not valid"),
    (lambda t: "[1, 2", "invalid YAML"),
    (lambda t: "", "empty lock file"),
])
def test_a_malformed_lock_is_one_located_problem(tmp_path: Path, edit, expected: str) -> None:
    lockfile.write(sample(str(tmp_path / "x.lock.yaml")))
    path = tmp_path / "x.lock.yaml"
    path.write_text(edit(path.read_text()))
    with pytest.raises(ConfigError) as err:
        lockfile.load(path)
    assert expected in str(err.value)
    assert str(path) in str(err.value)
    assert err.value.exit_code == 3


def test_differences_name_old_and_new_commit_and_sha256() -> None:
    old = sample()
    moved = dataclasses.replace(old.models[0], commit=COMMIT_B, sha256=SHA_A)
    new = dataclasses.replace(old, models=(moved,))
    (line,) = lockfile.differences(old, new)
    assert line == (f"~ model nunchaku-tech/nunchaku-qwen-image/dit.safetensors@main: commit {COMMIT_A[:12]} -> "
                    f"{COMMIT_B[:12]}, sha256 {SHA_B[:12]} -> {SHA_A[:12]}")
    assert lockfile.differences(old, old) == []
    assert all(line.startswith("+ ") for line in lockfile.differences(None, old))


def test_schema_command_prints_the_lock_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "lock"]) == 0
    assert '"title": "provision lock file"' in capsys.readouterr().out
