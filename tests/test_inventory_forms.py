"""Inventories from anywhere: one fleet written as Ansible YAML, INI, the JSON `ansible-inventory
--list` prints and an executable script loads identically; the real ansible-inventory (ansible-core,
from the `test` extra) reads the INI and YAML the same way provision does; a malformed one is a
located line and exit 3."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from provisioner import cli
from provisioner.config import inventory_forms
from provisioner.config.inventory import Inventory, load_inventory
from provisioner.config.inventory_forms import ini_value, inventory_form
from provisioner.errors import ConfigError

ANSIBLE_INVENTORY = Path(sys.executable).parent / "ansible-inventory"

YAML = """\
all:
  vars:
    ansible_user: comfy
    retries: 3
  hosts:
    bastion:
      ansible_connection: local
  children:
    gpu:
      vars:
        provision_jump: ops@jump.example.internal
        flags: [a, b]
      children:
        rtx3090:
          hosts:
            gpu-[01:03]:
            gpu-04:
              ansible_host: 192.0.2.4
              ansible_port: 2222
              provision:
                comfyui: {root: /srv/ComfyUI}
        a100:
          vars:
            ansible_user: svc
            fast: true
            provision:
              comfyui: {port: 8189}
          hosts:
            gpu-05:
              ansible_ssh_private_key_file: ~/.ssh/a100
              note: two words
    canary:
      hosts:
        gpu-01:
          canary: true
"""

INI = """\
# the same fleet in Ansible's INI format
bastion ansible_connection=local

[rtx3090]
gpu-[01:03]
gpu-04:2222 ansible_host=192.0.2.4 provision="{'comfyui': {'root': '/srv/ComfyUI'}}"

[a100]
gpu-05 ansible_ssh_private_key_file=~/.ssh/a100 note="two words"

[a100:vars]
ansible_user=svc
fast=True
provision={'comfyui': {'port': 8189}}

[gpu:children]
rtx3090
a100

[gpu:vars]
provision_jump=ops@jump.example.internal
flags=['a', 'b']

[canary]
gpu-01 canary=True

[all:vars]
ansible_user=comfy
retries=3
"""


def seen(inv: Inventory) -> dict[str, Any]:
    """What a fleet gives provision: each host's connection, groups and merged variables."""
    return {h.name: (h.address, h.port, h.user, h.key_file, h.transport, h.jump, sorted(h.groups), dict(h.vars))
            for h in inv.hosts}


def ansible_inventory(source: Path, out: Path) -> dict[str, Any]:
    """The real `ansible-inventory --list` of `source`, written to `out`."""
    subprocess.run([str(ANSIBLE_INVENTORY), "-i", str(source), "--list", "--output", str(out)],
                   check=True, capture_output=True, timeout=300)
    return json.loads(out.read_text())


def script(path: Path, body: str) -> Path:
    path.write_text(f"#!{sys.executable}\nimport json, sys, time\n{body}")
    path.chmod(0o755)
    return path


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out), redirect_stderr(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fleet in every form; the listing is what the real ansible-inventory prints for the YAML.
    (No `provision:` is set at two levels of one host: provision deep-merges those, Ansible's
    listing has already replaced one with the other.)"""
    base = tmp_path_factory.mktemp("forms")
    (base / "fleet.yaml").write_text(YAML)
    (base / "fleet.ini").write_text(INI)
    (base / "hosts").write_text(INI)  # no extension, like /etc/ansible/hosts
    listing = ansible_inventory(base / "fleet.yaml", base / "fleet.json")
    script(base / "inventory.py", f"LISTING = {listing!r}\nprint(json.dumps(LISTING))\n")
    groups_only = {k: v for k, v in listing.items() if k != "_meta"}
    script(base / "by-host.py", f"LISTING = {listing!r}\nGROUPS = {groups_only!r}\n"
           "print(json.dumps(GROUPS if sys.argv[1] == '--list' else LISTING['_meta']['hostvars'][sys.argv[2]]))\n")
    return {"yaml": base / "fleet.yaml", "ini": base / "fleet.ini", "ini_bare": base / "hosts",
            "listing": base / "fleet.json", "script": base / "inventory.py", "script_by_host": base / "by-host.py"}


def test_every_form_loads_the_same_fleet(fleet: dict[str, Path]) -> None:
    expected = seen(load_inventory(fleet["yaml"]))
    assert expected["gpu-04"][:3] == ("192.0.2.4", 2222, "comfy")
    assert expected["gpu-04"][7]["provision"] == {"comfyui": {"root": "/srv/ComfyUI"}}
    assert expected["gpu-05"][7]["provision"] == {"comfyui": {"port": 8189}}
    assert expected["gpu-05"][2] == "svc" and expected["bastion"][4] == "local"
    for form in ("ini", "ini_bare", "listing", "script", "script_by_host"):
        assert seen(load_inventory(fleet[form])) == expected, form
    assert {g: sorted(h) for g, h in load_inventory(fleet["ini"]).groups.items()} == \
           {g: sorted(h) for g, h in load_inventory(fleet["yaml"]).groups.items()}


def test_the_real_ansible_reads_the_ini_as_provision_does(fleet: dict[str, Path], tmp_path: Path) -> None:
    """Every host's variables, as ansible-inventory merges them from the INI, are provision's."""
    listing = ansible_inventory(fleet["ini"], tmp_path / "ini.json")
    ours = load_inventory(fleet["ini"])
    assert listing["_meta"]["hostvars"] == {h.name: dict(h.vars) for h in ours.hosts}


def test_ini_values_are_typed_as_ansible_types_them() -> None:
    assert [ini_value(v) for v in ("2222", "True", "None", "[1, 2]", "'2222'", "yes", "true", "0777",
                                   "/opt/x", "{1, 2}", "(1, 2)", "9" * 5000)] == \
           [2222, True, None, [1, 2], "2222", "yes", "true", "0777", "/opt/x", "{1, 2}", [1, 2], "9" * 5000]


def test_the_form_is_known_by_extension_executable_bit_or_first_line(tmp_path: Path) -> None:
    cases = {"a.yaml": "all:\n", "b": "all:\n  hosts:\n", "c": "[gpu]\nh1\n", "d": "h1 ansible_port=22\n",
             "e": '{"all": {}}', "f.ini": "all:\n"}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
    assert {n: inventory_form(str(tmp_path / n)) for n in cases} == \
           {"a.yaml": "yaml", "b": "yaml", "c": "ini", "d": "ini", "e": "yaml", "f.ini": "ini"}
    assert inventory_form(str(script(tmp_path / "s.yaml", ""))) == "script"


@pytest.mark.parametrize("text, where", [
    ("[gpu\nh1\n", ":1:1: '[gpu' is not a section header"),
    ("[gpu:hosts]\nh1\n", ":1:1: section [gpu:hosts]: unknown suffix :hosts"),
    ("[gpu]\nh1 ansible_port\n", ":2:4: 'ansible_port' after host 'h1' is not key=value"),
    ("[gpu]\nh1 x='open\n", ":2:1: cannot split the host line: No closing quotation"),
    ("[gpu:vars]\nx=1\n", ":1:1: [gpu:vars] sets variables of a group that no section defines"),
    ("[gpu]\nh1\n[gpu:vars]\njust words\n", ":4:1: 'just words' in [gpu:vars] is not key=value"),
    ("[gpu]\nh1\n[gpu:children]\n9lives\n", ":4:1: '9lives' in [gpu:children] is not a group name"),
    ("[gpu]\nh1 ansible_port=70000\n", ":2:4: gpu.hosts.h1.ansible_port: 70000 is above the maximum 65535"),
    ("[gpu]\ngpu-[09:01]\n", ":2:1: gpu.hosts.gpu-[09:01]: the range runs backwards"),
])
def test_a_malformed_ini_is_one_located_line_and_exit_3(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "bad.ini"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_inventory(path)
    assert str(err.value).startswith(f"{path}{where}"), str(err.value)
    assert len(str(err.value).splitlines()) == 1
    code, out = run("facts", "-i", str(path))
    assert code == 3 and out.startswith(f"error: {path}{where}") and "Traceback" not in out


def test_a_malformed_listing_names_the_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "fleet.json"
    path.write_text('{"_meta": {"hostvars": {"h1": {"ansible_port": "x"}}},\n "gpu": {"hosts": ["h1"]},\n'
                    ' "bad": {"hosts": "h2"}}\n')
    code, out = run("validate", str(path))
    assert code == 3 and f"{path}:3:10: bad.hosts: expected a list" in out
    path.write_text('{"_meta": {"hostvars": {"h1": {"ansible_port": "x"}}},\n "gpu": {"hosts": ["h1"]}}\n')
    code, out = run("validate", str(path))
    assert code == 3 and f"{path}:1:32: gpu.hosts.h1.ansible_port:" in out


@pytest.mark.parametrize("body, message", [
    ("sys.stderr.write('token expired\\n'); sys.exit(4)", "exited 4: token expired (run it by hand to see why)"),
    ("print('not json')", "printed no JSON (line 1, column 1): Expecting value"),
    ("time.sleep(30)", "gave no answer within 1 s"),
    ("sys.stdout.write('x' * 5000); sys.stdout.flush(); time.sleep(30)", "printed more than 0 MiB"),
    ("print('[1, 2]')", "printed no inventory (a JSON mapping of groups)"),
    ("print(json.dumps({'g': ['h1']}) if sys.argv[1] == '--list' else 'oops')",
     "--host h1: printed no JSON (line 1, column 1): Expecting value"),
])
def test_a_failing_script_is_one_line_within_its_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        body: str, message: str) -> None:
    monkeypatch.setattr(inventory_forms, "SCRIPT_TIMEOUT_S", 1)
    monkeypatch.setattr(inventory_forms, "SCRIPT_MAX_BYTES", 4096)
    path = script(tmp_path / "inv", body)
    code, out = run("facts", "-i", str(path))
    assert code == 3 and out.startswith(f"error: {path}") and message in out, out
    assert len(out.strip().splitlines()) == 1


def test_a_bad_value_in_a_scripts_answer_names_the_script_and_the_key(tmp_path: Path) -> None:
    path = script(tmp_path / "inv", "print(json.dumps({'_meta': {'hostvars': {'h1': {'ansible_port': 70000}}},"
                                    " 'gpu': {'hosts': ['h1']}}))")
    code, out = run("facts", "-i", str(path))
    assert code == 3 and out.startswith(f"error: {path} --list: gpu.hosts.h1.ansible_port: 70000 is above"), out
