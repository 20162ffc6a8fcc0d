"""The command line as a user meets it: bad input gets one line naming the file, key and fix, the
documented exit code, and never a traceback."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from provisioner import cli

ROOT = Path(__file__).resolve().parents[1]


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        try:
            code = cli.main(list(argv))
        except SystemExit as exc:  # argparse usage errors
            code = int(exc.code or 0)
    return code, out.getvalue()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def minimal(path: Path, inventory: Path | None = None) -> Path:
    """The smallest valid profile: a ComfyUI root and the shipped templates."""
    head = f"inventory: {inventory}\n" if inventory else ""
    return write(path, f"{head}comfyui: {{root: /opt/ComfyUI}}\nworkflow: {{template_dir: {ROOT / 'templates'}}}\n")


def test_version_and_help_are_fast_and_clean() -> None:
    proc = subprocess.run([sys.executable, "-m", "provisioner", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "plan" in proc.stdout and "apply" in proc.stdout


def test_validate_shipped_profiles_ok() -> None:
    code, out = run("validate", *map(str, sorted((ROOT / "profiles").glob("*.yaml"))))
    assert code == 0 and "valid" in out


def test_schema_prints_json() -> None:
    code, out = run("schema", "profile")
    assert code == 0 and json.loads(out)["type"] == "object"


@pytest.mark.parametrize("body, needle", [
    ("comfyui: {root: /opt/ComfyUI}\nmodel: {variant: lightning-3step}\n", "model.variant"),
    ("comfyui: {root: /opt/ComfyUI}\npackages: ['diffusers>>0.35']\n", "packages"),
    ("comfyui: {root: relative/path}\n", "comfyui.root"),
    ("comfyui: {root: /opt/ComfyUI}\nplugin: {name: ../../etc}\n", "plugin.name"),
    ("comfyui: [unclosed\n", "profile.yaml:"),
    ("\x00\x01\x02binary", "profile.yaml"),
])
def test_bad_profile_one_line_per_problem_exit_3(tmp_path: Path, body: str, needle: str) -> None:
    profile = write(tmp_path / "profile.yaml", body)
    for verb in ("validate", "plan"):
        code, out = run(verb, str(profile), *(["-i", str(profile)] if verb == "plan" else []))
        assert code == 3, out
        assert needle in out and "Traceback" not in out
        assert all(len(line) < 400 for line in out.splitlines())


def test_missing_profile_file(tmp_path: Path) -> None:
    code, out = run("plan", str(tmp_path / "nope.yaml"))
    assert code == 3 and "nope.yaml" in out and "Traceback" not in out


def test_unknown_limit_pattern_lists_groups(tmp_path: Path) -> None:
    code, out = run("plan", str(ROOT / "profiles" / "rtx3090.yaml"), "--limit", "gpu-99")
    assert code == 3 and "gpu-99" in out and "Traceback" not in out


def test_no_inventory_says_how_to_give_one(tmp_path: Path) -> None:
    profile = minimal(tmp_path / "p.yaml")
    code, out = run("plan", str(profile))
    assert code == 3 and "-i INVENTORY" in out


def test_unreachable_host_is_a_host_failure_not_a_crash(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inventory = write(tmp_path / "inv.yaml", f"all:\n  hosts:\n    down:\n      ansible_host: 127.0.0.1\n"
                                             f"      ansible_port: {port}\n")
    profile = minimal(tmp_path / "p.yaml", inventory)
    code, out = run("facts", str(profile), "--known-hosts", str(tmp_path / "kh"), "--connect-timeout", "2")
    assert code == 1 and "down" in out and "refused" in out and "Traceback" not in out


def test_wrong_host_key_is_refused_with_fingerprint(sshd_hosts, tmp_path: Path) -> None:
    (host,) = sshd_hosts(1)
    new_fp = host.replace_host_key()
    inventory = write(tmp_path / "inv.yaml", f"all:\n  hosts:\n    {host.name}: {{}}\n")
    profile = minimal(tmp_path / "p.yaml", inventory)
    for extra in ([], ["--accept-new-host-keys"]):
        code, out = run("plan", str(profile), "--ssh-config", str(host.ssh_config),
                        "--known-hosts", str(host.known_hosts), *extra)
        assert code == 1 and "HOST KEY CHANGED" in out and new_fp in out and "Traceback" not in out


def test_facts_over_ssh_is_one_connection_and_one_exec(sshd_hosts, tmp_path: Path) -> None:
    hosts = sshd_hosts(3)
    inventory = write(tmp_path / "inv.yaml", "all:\n  hosts:\n" + "".join(f"    {h.name}: {{}}\n" for h in hosts))
    marks = [h.log_size() for h in hosts]
    code, out = run("facts", "-i", str(inventory), "--ssh-config", str(hosts[0].ssh_config),
                    "--known-hosts", str(hosts[0].known_hosts), "--json")
    assert code == 0, out
    doc = json.loads(out[out.index("{"):])
    assert set(doc) == {h.name for h in hosts}
    for host, mark in zip(hosts, marks):
        assert host.wait_counts(1, 1, since=mark) == (1, 1)
