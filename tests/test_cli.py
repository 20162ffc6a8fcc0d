"""The command line as a user meets it: bad input gets one line naming the file, key and fix, the
documented exit code, and never a traceback."""

from __future__ import annotations

import io
import json
import os
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


@pytest.mark.parametrize("argv, reason", [
    (["deploy"], "invalid choice: 'deploy'"),
    (["plan"], "the following arguments are required: profile"),
    (["plan", "p.yaml", "-f", "abc"], "-f/--forks: 'abc' is not a whole number"),
    (["plan", "p.yaml", "-f", "0"], "-f/--forks: 0: give at least 1"),
    (["plan", "p.yaml", "-f", "-3"], "-f/--forks: -3: give at least 1"),
    (["apply", "p.yaml", "--serial", "abc"], "--serial: 'abc' is neither a host count"),
    (["apply", "p.yaml", "--serial", "0"], "--serial: 0 hosts per batch: give at least 1"),
    (["apply", "p.yaml", "--serial", "150%"], "--serial: 150% is not a share of hosts"),
    (["apply", "p.yaml", "--serial", "0%"], "--serial: 0% is not a share of hosts"),
    (["apply", "p.yaml", "--max-fail-percentage", "200"], "200 is not a percentage from 0 to 100"),
    (["apply", "p.yaml", "--max-fail-percentage", "-1"], "-1 is not a percentage from 0 to 100"),
    (["plan", "p.yaml", "--connect-timeout", "-1"], "--connect-timeout: -1 seconds: give a time above 0"),
    (["plan", "p.yaml", "--connect-timeout", "nan"], "--connect-timeout: 'nan' is not a finite number"),
    (["apply", "p.yaml", "--lock-timeout", "inf"], "--lock-timeout: 'inf' is not a finite number"),
    (["schema", "playbook"], "invalid choice: 'playbook'"),
    (["apply", "p.yaml", "--canary", "0"], "--canary: 0: give at least 1"),
    (["rollback"], "the following arguments are required: profile"),
    (["history", "p.yaml", "--to", "x"], "unrecognized arguments: --to x"),
    (["rollback", "p.yaml", "--to", ""], "--to: '' is not a snapshot id (YYYYMMDD-HHMMSS-mmm, or its start"),
    (["rollback", "p.yaml", "--to", "../../etc"], "--to: '../../etc' is not a snapshot id"),
    (["rollback", "p.yaml", "--to", "20261129-1144261"], "is not a snapshot id"),
    (["rollback", "p.yaml", "--to", "latest"], "--to: 'latest' is not a snapshot id"),
])
def test_bad_arguments_are_bad_input_exit_3(argv: list[str], reason: str) -> None:
    code, out = run(*argv)
    assert code == 3, out
    assert out.count("\n") == 1 and reason in out and "--help" in out, out


@pytest.mark.parametrize(("argv", "near"), [
    (["plann", "p.yaml"], "did you mean `plan`?"),
    (["rolback", "p.yaml"], "did you mean `rollback`?"),
    (["plan", "p.yaml", "--limt", "gpu-*"], "did you mean `--limit`?"),
    (["apply", "p.yaml", "--verify-gates"], "did you mean `--verify-gate`?"),
    (["schema", "profle"], "did you mean `profile`?"),
])
def test_a_mistyped_verb_option_or_choice_suggests_the_nearest(argv: list[str], near: str) -> None:
    code, out = run(*argv)
    assert code == 3 and out.count("\n") == 1 and near in out, out
    assert "did you mean" not in run("plan", "p.yaml", "--zzzzzz")[1]


def test_a_verify_gate_without_verification_is_bad_input(tmp_path: Path) -> None:
    inventory = write(tmp_path / "inv.yaml", "all: {hosts: {gpu-01: {ansible_host: 127.0.0.1}}}\n")
    profile = minimal(tmp_path / "p.yaml", inventory)
    code, out = run("apply", str(profile), "--verify-gate", "--no-verify")
    assert code == 3 and "--verify-gate needs the verification: drop --no-verify" in out, out
    profile.write_text(profile.read_text() + "rollout: {verify_gate: true}\n")
    code, out = run("apply", str(profile), "--no-verify")
    assert code == 3 and "rollout.verify_gate: false" in out, out


def test_a_canary_without_the_verify_gate_is_refused_with_the_reason(tmp_path: Path) -> None:
    inventory = write(tmp_path / "inv.yaml", "all: {hosts: {gpu-01: {ansible_host: 127.0.0.1}}}\n")
    profile = minimal(tmp_path / "p.yaml", inventory)
    code, out = run("apply", str(profile), "--canary", "1")
    assert code == 3 and out.count("\n") == 1, out
    assert ("--canary 1 needs the verify gate: without it a failing canary stops nothing; add --verify-gate "
            "(or rollout.verify_gate: true)") in out
    profile.write_text(profile.read_text() + "rollout: {canary: 2}\n")
    code, out = run("apply", str(profile))
    assert code == 3 and f"rollout.canary: 2 in {profile} needs the verify gate" in out, out


def test_snapshot_ids_and_their_starts_are_kept() -> None:
    for ident in ("2026", "20261129", "20261129-", "20261129-1144", "20261129-114426-454"):
        assert cli.build_parser().parse_args(["rollback", "p.yaml", "--to", ident]).to == ident


def test_good_rolling_arguments_are_kept() -> None:
    args = cli.build_parser().parse_args(["apply", "p.yaml", "--serial", "30%", "-f", "4",
                                          "--max-fail-percentage", "50%", "--connect-timeout", "2.5"])
    assert (args.serial, args.forks, args.max_fail_percentage, args.connect_timeout) == ("30%", 4, 50.0, 2.5)
    assert cli.build_parser().parse_args(["apply", "p.yaml", "--serial", "2"]).serial == 2


@pytest.mark.parametrize("argv", [["schema", "profile"], ["schema", "inventory", "--markdown"], ["--help"]])
def test_a_closed_pipe_is_not_a_failure(argv: list[str]) -> None:
    """`provision schema profile | head`: the reader left; exit 0, nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before provision writes a byte
    try:
        proc = subprocess.run([sys.executable, "-m", "provisioner", *argv], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, "")


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
    # advice quotes the text as written: YAML reads 1.10 as the number 1.1, a different version
    ("comfyui: {root: /opt/ComfyUI}\nbackend:\n  version: 1.10\n", 'backend.version: expected a string, got a number (quote it: "1.10")'),
    ("comfyui: {root: /opt/ComfyUI}\nplugin: {repo: https://x/y.git, tag: 1.10}\n", 'quote it: "1.10"'),
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


def test_a_hosts_pattern_that_selects_nothing_is_located_and_printed_as_data(tmp_path: Path) -> None:
    """Rich read `[/x]` in an error line as a closing tag (a traceback) and `:b:` as an emoji."""
    inventory = write(tmp_path / "inv.yaml", "all:\n  hosts: {a: }\n")
    profile = write(tmp_path / "p.yaml", f"inventory: {inventory}\ncomfyui: {{root: /opt/ComfyUI}}\n"
                                         f"workflow: {{template_dir: {ROOT / 'templates'}}}\nhosts: 'a:[/x]:b:'\n")
    code, out = run("plan", str(profile))
    assert (code, out) == (3, f"error: {profile}:4:1: hosts: host pattern 'a:[/x]:b:': '[/x]' matches no host or "
                              f"group in {inventory}; groups: (none)\n")


def test_no_inventory_says_how_to_give_one(tmp_path: Path) -> None:
    profile = minimal(tmp_path / "p.yaml")
    code, out = run("plan", str(profile))
    assert code == 3 and "-i INVENTORY" in out


def test_facts_without_a_profile_validates_host_overlays(tmp_path: Path) -> None:
    """`provision facts -i INV` used host `provision:` overlays unchecked (issue 13)."""
    inventory = write(tmp_path / "inv.yaml", "all:\n  hosts:\n    gpu-01:\n      provision:\n"
                                             "        comfyui: {port: '8189', root: /opt/a;b}\n")
    code, out = run("facts", "-i", str(inventory), "--known-hosts", str(tmp_path / "kh"))
    assert code == 3 and "Traceback" not in out, out
    assert out.splitlines() == [
        f"error: {inventory}:5:19: provision.comfyui.port: host gpu-01: expected an integer, got a string",
        f"error: {inventory}:5:33: provision.comfyui.root: host gpu-01: contains ';', which pip reads as the "
        "start of an environment marker: the backend wheel kept under it could never be installed "
        "(choose a path without ';')"]


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


def test_catalog_prints_each_fact_with_its_source_and_the_day_it_was_checked() -> None:
    """`provision catalog`: core, plugin and backend releases, the breaks, the GPU rule and the model
    files, each with where it was read and when, so the age of the knowledge shows at a glance."""
    code, out = run("catalog", "--json")
    assert code == 0
    facts = json.loads(out)
    assert {f["topic"] for f in facts} == {"core", "break", "plugin", "backend", "gpu", "model"}
    assert all(f["source"] and f["checked"][:4] == "2026" for f in facts)
    by = {(f["topic"], f["name"]): f for f in facts}
    assert by[("core", "v0.47.1")]["fact"] == "released 2026-12-02; newest release"
    assert "Comfy-Org/ComfyUI#11235" in by[("break", "ModelPatcher.pinned break of core v0.4.0")]["source"]
    assert by[("plugin", "v1.2.1")]["fact"].startswith("released 2026-01-26; needs backend >= 1.2.0")
    assert "torch 2.11 cu128/cu130 (built against a nightly)" in by[("backend", "1.2.1")]["fact"]
    assert "int8 convrot models (core >= v0.27.0)" in by[("gpu", "any other")]["fact"]
    assert by[("model", "qwen-image-edit-2509 lightning-251115-8step-r32")]["fact"] == (
        "nunchaku-ai/nunchaku-qwen-image-edit-2509: lightning-251115/svdq-int4_r32-qwen-image-edit-2509-"
        "lightning-8steps-251115.safetensors (fp4: svdq-fp4_…)")
    code, out = run("catalog", "break", "--no-color")
    assert code == 0 and out.startswith("the catalog: 4 facts, checked against upstream 2026-12-07")
    assert "pin comfyui.version v0.8.0" in by[("break", "\"Nunchaku broken again\" break of core 0.12")]["fact"]
    assert "#801" in by[("break", "not checkable")]["fact"]      # whether a later core still breaks it
    code, out = run("catalog", "nonsense")
    assert code == 3 and "invalid choice: 'nonsense'" in out and "Traceback" not in out


@pytest.mark.parametrize("verb", ["plan", "apply", "rollback", "history", "verify", "facts"])
def test_list_hosts_on_every_verb_that_targets_hosts_contacts_none(tmp_path: Path, verb: str) -> None:
    """Ansible's --list-hosts: the hosts the profile's `hosts` and --limit select, nothing run (the
    addresses below answer nobody: a contacted host would fail the command)."""
    inventory = write(tmp_path / "inv.yaml", "all:\n  children:\n    gpu:\n      hosts:\n"
                      "        gpu-01: {ansible_host: 192.0.2.1}\n        gpu-02: {ansible_host: 192.0.2.2}\n"
                      "        gpu-03: {ansible_host: 192.0.2.3}\n")
    profile = minimal(tmp_path / "p.yaml", inventory)
    code, out = run(verb, str(profile), "--list-hosts", "--limit", "gpu-01:gpu-02")
    assert (code, out) == (0, "hosts (2):\n  gpu-01\n  gpu-02\n")
    code, out = run(verb, str(profile), "--list-hosts", "--json")
    assert code == 0 and [h["address"] for h in json.loads(out)["hosts"]] == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]


def test_validate_json_lists_each_problem_located(tmp_path: Path) -> None:
    bad = write(tmp_path / "bad.yaml", "comfyui: {root: relative/path}\nplugin: {tag: main}\n")
    code, out = run("validate", "--json", str(bad))
    doc = json.loads(out)
    assert code == 3 and doc["valid"] is False and doc["files"] == [str(bad)]
    keys = {(p["key"], p["line"]) for p in doc["problems"]}
    assert ("plugin.tag", 2) in keys and all(p["file"] == str(bad) and p["message"] for p in doc["problems"])
    code, out = run("validate", "--json", str(ROOT / "profiles" / "rtx3090.yaml"))
    assert code == 0 and json.loads(out) == {"valid": True, "files": [str(ROOT / "profiles" / "rtx3090.yaml")],
                                             "problems": []}


def test_a_conflict_with_the_shipped_base_is_placed_in_the_users_file(tmp_path: Path) -> None:
    """The user wrote `service: systemd`; base.yaml's `restart: {docker: ...}` conflicts with it. The
    error points at the user's line (the file they edit) and names the base's, with the fix."""
    user = write(tmp_path / "mine.yaml", f"extends: {ROOT / 'profiles' / 'base.yaml'}\ncomfyui:\n  service: systemd\n")
    code, out = run("validate", str(user))
    assert code == 3, out
    first = out.splitlines()[0]
    assert first.startswith(f"{user}:3:3: comfyui.service: conflicts with comfyui.restart (set in ")
    line = (ROOT / "profiles" / "base.yaml").read_text().splitlines().index("  restart:") + 1
    assert f"base.yaml:{line})" in first and f"(set comfyui.restart: null in {user})" in first
    user.write_text(user.read_text() + "  restart: null\n")
    assert run("validate", str(user))[0] == 0


def test_list_hosts_of_a_saved_plan_are_the_hosts_it_holds(tmp_path: Path) -> None:
    from provisioner.plan import saved

    inventory = write(tmp_path / "inv.yaml", "all:\n  hosts:\n    gpu-01: {ansible_host: 192.0.2.1}\n"
                      "    gpu-02: {ansible_host: 192.0.2.2}\n")
    profile = minimal(tmp_path / "p.yaml", inventory)
    plan = write(tmp_path / "reviewed.plan", json.dumps({"format": saved.FORMAT, "profile": str(profile),
                                                         "profile_sha256": "x", "hosts": {"gpu-02": {}}}))
    assert run("apply", str(plan), "--list-hosts") == (0, "hosts (1):\n  gpu-02\n")
