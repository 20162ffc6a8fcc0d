"""Ansible YAML inventories: groups, nested children, vars precedence, transports, host patterns."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.config.marks import Mark
from provisioner.config.model import build_profile
from provisioner.errors import ConfigError, UsageError
from provisioner.config.inventory import expand_range, hosts_for, inline_inventory, load_inventory

ROOT = Path(__file__).resolve().parents[1]

FLEET = """\
all:
  vars:
    ansible_user: deploy
    role: all
    provision:
      comfyui: {port: 8188, listen: 127.0.0.1}
  hosts:
    bastion-box:
      ansible_connection: local
  children:
    datacenter:
      vars:
        role: dc
        ansible_ssh_common_args: -o StrictHostKeyChecking=yes -J ops@jump.example.internal:2222
        provision:
          comfyui: {port: 8189}
      children:
        ampere:
          vars: {role: ampere}
          children:
            rtx3090:
              vars:
                role: rtx3090
                provision:
                  workflow: {cpu_offload: disable}
              hosts:
                gpu-[01:03].example.internal:
                gpu-04.example.internal:
                  ansible_host: 192.0.2.4
                  ansible_port: "2201"
                  role: host
                  provision:
                    comfyui: {root: /srv/ComfyUI}
            a100:
              vars: {role: a100}
              hosts:
                gpu-05.example.internal:
                  ansible_connection: paramiko
                  ansible_ssh_private_key_file: ~/.ssh/a100
        blackwell:
          vars: {role: blackwell, ansible_user: svc}
          hosts:
            gpu-06.example.internal:
              provision_container: comfyui-qwen
              provision_jump: admin@other-jump.example.internal
    canary:
      hosts:
        gpu-01.example.internal:
          canary: true
        dock-01:
          ansible_connection: docker
          ansible_host: comfy-container
"""


@pytest.fixture
def fleet(tmp_path: Path):
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET, encoding="utf-8")
    return load_inventory(path)


def names(hosts) -> list[str]:
    return [h.name.split(".")[0] for h in hosts]


def test_hosts_groups_and_ranges(fleet) -> None:
    assert names(fleet.hosts) == ["bastion-box", "gpu-01", "gpu-02", "gpu-03", "gpu-04", "gpu-05", "gpu-06", "dock-01"]
    assert names(fleet.host(n) for n in fleet.groups["ampere"]) == ["gpu-01", "gpu-02", "gpu-03", "gpu-04", "gpu-05"]
    assert fleet.groups["ungrouped"] == ("bastion-box",)
    gpu01 = fleet.host("gpu-01.example.internal")
    assert gpu01.groups == ("canary", "datacenter", "ampere", "rtx3090")   # precedence: depth, then name
    assert gpu01.vars["canary"] is True                                      # from its second group


def test_vars_precedence_all_parent_child_host(fleet) -> None:
    assert fleet.host("bastion-box").vars["role"] == "all"
    assert fleet.host("gpu-01.example.internal").vars["role"] == "rtx3090"   # deepest group wins
    assert fleet.host("gpu-04.example.internal").vars["role"] == "host"      # host wins
    assert fleet.host("gpu-05.example.internal").vars["role"] == "a100"
    assert fleet.host("gpu-06.example.internal").user == "svc"
    assert fleet.host("gpu-01.example.internal").user == "deploy"


def test_provision_overlay_deep_merges_with_marks(fleet, tmp_path: Path) -> None:
    gpu04 = fleet.host("gpu-04.example.internal")
    assert gpu04.overlay == {"comfyui": {"port": 8189, "listen": "127.0.0.1", "root": "/srv/ComfyUI"},
                             "workflow": {"cpu_offload": "disable"}}
    f = str(tmp_path / "fleet.yaml")
    assert gpu04.overlay_marks[("comfyui", "port")] == Mark(f, 16, 21)      # datacenter vars
    assert gpu04.overlay_marks[("comfyui", "root")] == Mark(f, 33, 31)      # the host's own
    assert gpu04.origin == f
    assert fleet.host("dock-01").overlay == {"comfyui": {"port": 8188, "listen": "127.0.0.1"}}


def test_connection_variables(fleet) -> None:
    gpu04 = fleet.host("gpu-04.example.internal")
    assert (gpu04.address, gpu04.port, gpu04.transport) == ("192.0.2.4", 2201, "ssh")
    assert gpu04.jump == "ops@jump.example.internal:2222"                    # from ssh_common_args -J
    assert fleet.host("gpu-01.example.internal").jump == "ops@jump.example.internal:2222"
    gpu05 = fleet.host("gpu-05.example.internal")
    assert (gpu05.transport, gpu05.key_file, gpu05.address) == ("ssh", "~/.ssh/a100", None)
    gpu06 = fleet.host("gpu-06.example.internal")
    assert (gpu06.transport, gpu06.container, gpu06.via) == ("docker", "comfyui-qwen", "ssh")
    assert gpu06.jump == "admin@other-jump.example.internal"
    box = fleet.host("bastion-box")
    assert (box.transport, box.via, box.jump) == ("local", "local", None)
    dock = fleet.host("dock-01")   # Ansible's docker connection: ansible_host names the container
    assert (dock.transport, dock.container, dock.address, dock.via) == ("docker", "comfy-container", None, "local")


@pytest.mark.parametrize("pattern,expected", [
    ("all", ["bastion-box", "gpu-01", "gpu-02", "gpu-03", "gpu-04", "gpu-05", "gpu-06", "dock-01"]),
    ("*", ["bastion-box", "gpu-01", "gpu-02", "gpu-03", "gpu-04", "gpu-05", "gpu-06", "dock-01"]),
    ("rtx3090", ["gpu-01", "gpu-02", "gpu-03", "gpu-04"]),
    ("gpu-05.example.internal", ["gpu-05"]),
    ("gpu-0[56]*", ["gpu-05", "gpu-06"]),
    ("a100:blackwell", ["gpu-05", "gpu-06"]),
    ("a100,blackwell", ["gpu-05", "gpu-06"]),
    ("datacenter:&canary", ["gpu-01"]),
    ("datacenter:!rtx3090", ["gpu-05", "gpu-06"]),
    ("!datacenter", ["bastion-box", "dock-01"]),
    ("rtx*:!gpu-04.example.internal", ["gpu-01", "gpu-02", "gpu-03"]),
    ("~gpu-0[12]\\.", ["gpu-01", "gpu-02"]),
    ("canary:rtx3090:&ampere:!gpu-02*", ["gpu-01", "gpu-03", "gpu-04"]),
])
def test_select_patterns(fleet, pattern: str, expected: list[str]) -> None:
    assert names(fleet.select(pattern)) == expected


def test_unknown_pattern_names_groups_and_guesses(fleet) -> None:
    with pytest.raises(UsageError) as err:
        fleet.select("datacenter:!rtx3080")
    msg = str(err.value)
    assert "'rtx3080' matches no host or group" in msg and "datacenter:!rtx3080" in msg
    assert "groups: datacenter, ampere, rtx3090, a100, blackwell, canary" in msg
    assert "did you mean 'rtx3090'?" in msg
    with pytest.raises(UsageError, match="matches no host"):
        fleet.select("tpu-*")
    with pytest.raises(UsageError, match="empty host pattern"):
        fleet.select(" , ")


def test_group_priority_and_alphabetical_order(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text("all:\n  children:\n    b: {hosts: {h: }, vars: {x: b}}\n    a: {hosts: {h: }, vars: {x: a}}\n")
    assert load_inventory(path).host("h").vars["x"] == "b"                  # same depth: later name wins
    path.write_text("all:\n  children:\n    b: {hosts: {h: }, vars: {x: b}}\n"
                    "    a: {hosts: {h: }, vars: {x: a, ansible_group_priority: 5}}\n")
    assert load_inventory(path).host("h").vars["x"] == "a"


@pytest.mark.parametrize("text,expected", [
    ("all:\n  hosts: [a, b]\n", ":2:3: all.hosts: expected a mapping, got a list"),
    ("all:\n  hots: {a: }\n", ":2:3: all.hots: unknown key (did you mean 'hosts'?)"),
    ("all:\n  hosts:\n    a: {ansible_connection: winrm}\n",
     ":3:9: all.hosts.a.ansible_connection: 'winrm' is not one of: ssh, smart, paramiko, local, docker, "
     "community.docker.docker"),
    ("all:\n  hosts:\n    a: {ansible_port: 70000}\n", ":3:9: all.hosts.a.ansible_port: 70000 is above the maximum 65535"),
    ("all:\n  hosts:\n    a:\n      ansible_port: '99999'\n", ":3:5: all.hosts.a: ansible_port 99999 is out of range 1-65535"),
    ("all:\n  children:\n    x:\n      children:\n        y:\n          children:\n            x: {hosts: {a: }}\n",
     ":3:5: all.children.x: group cycle: x -> y -> x"),
    ("all:\n  children:\n    bad group: {hosts: {a: }}\n", ":3:5: all.children.bad group: not a valid name "
     "(expected a group name (letters, digits, _ and -))"),
    ("all:\n  hosts:\n    a: {provision: [1]}\n", ":3:9: all.hosts.a.provision: expected a mapping, got a list"),
    ("all:\n  hosts:\n    a:\n      ansible_ssh_common_args: -J -oProxyCommand=x\n",
     ":3:5: all.hosts.a: ProxyJump '-oProxyCommand=x' in ansible_ssh_common_args is not a host"),
    ("- a\n", ":1:1: expected a mapping of groups like all: {hosts: …, children: …} (see `provision schema inventory`)"),
    # was: RecursionError, shown as an internal error
    ("all:\n  hosts: {a: }\n  children:\n    all: {}\n",
     ":4:5: all.children.all: `all` is every host's group; it cannot be the child of a group (remove it from children)"),
    ("all:\n  children:\n    g:\n      hosts: {a: }\n      children: {all: }\n",
     ":5:18: all.children.g.children.all: `all` is every host's group; it cannot be the child of a group "
     "(remove it from children)"),
    # was: a MemoryError after minutes; a range that names nothing was silently no host
    ("all:\n  hosts:\n    gpu-[0:99999999]: {}\n",
     ":3:5: all.hosts.gpu-[0:99999999]: expands to 100000000 hosts, over the 10000 one entry "
     "may name; split it"),
    ("all:\n  hosts:\n    n[0:999]-[0:99]: {}\n",
     ":3:5: all.hosts.n[0:999]-[0:99]: expands to 100000 hosts, over the 10000 one entry may "
     "name; split it"),
    ("all:\n  hosts:\n    gpu-[09:01]: {}\n",
     ":3:5: all.hosts.gpu-[09:01]: the range runs backwards, so it names no host; write [01:09]"),
    ("all:\n  hosts:\n    rack-[Z:A]: {}\n",
     ":3:5: all.hosts.rack-[Z:A]: the range runs backwards, so it names no host; write [A:Z]"),
    ("all:\n  hosts:\n    gpu-[01:100]: {}\n",
     ":3:5: all.hosts.gpu-[01:100]: zero-padded range bounds must have the same width, like [01:10]"),
    ("all:\n  hosts:\n    gpu-[1:c]: {}\n", ":3:5: all.hosts.gpu-[1:c]: a range is letters or numbers, not both"),
    ("all:\n  hosts:\n    gpu-[1:4:0]: {}\n", ":3:5: all.hosts.gpu-[1:4:0]: a range step must be at least 1"),
    ("all:\n  hosts:\n    gpu-[1-4]: {}\n", ":3:5: all.hosts.gpu-[1-4]: a bracket that is not a host "
     "range (ranges are [01:04], [a:f] or [1:9:2])"),
    # Ansible's older variable names are checked like the current ones
    ("all:\n  hosts:\n    a: {ansible_ssh_host: -oProxyCommand=x}\n",
     ":3:9: all.hosts.a.ansible_ssh_host: '-oProxyCommand=x' is not valid (expected a host name or IP address)"),
    ("all:\n  hosts:\n    a: {ansible_ssh_user: 'root; touch x'}\n",
     ":3:9: all.hosts.a.ansible_ssh_user: 'root; touch x' is not valid (expected a user name)"),
    ("all:\n  hosts:\n    a: {ansible_ssh_port: abc}\n",
     ":3:9: all.hosts.a.ansible_ssh_port: 'abc' is not valid (expected a port number like 22)"),
    ("all:\n  hosts:\n    a: {ansible_ssh_port: 70000}\n", ":3:9: all.hosts.a.ansible_ssh_port: 70000 is above the maximum 65535"),
    ("all:\n  hosts:\n    a: {ansible_port: 22.0}\n",
     ":3:9: all.hosts.a.ansible_port: expected an integer or a string, got a number (write 22)"),
    ("all:\n  hosts:\n    a: {ansible_user: \"root\\n\"}\n",
     ":3:9: all.hosts.a.ansible_user: 'root\\n' is not valid (expected a user name)"),
    ("all:\n  hosts:\n    \"gpu-01\\n\": {}\n", ":3:5: all.hosts.gpu-01\\n: not a valid name (expected a host name without spaces)"),
    # was: silently ignored, so the host was tried directly
    ("all:\n  hosts:\n    a:\n      ansible_ssh_common_args: -o 'ProxyCommand=ssh -W %h:%p bastion'\n",
     ":3:5: all.hosts.a: ansible_ssh_common_args sets ProxyCommand, which provision does not run (it reaches "
     "hosts without local commands); use ProxyJump: -J HOST, or provision_jump"),
    ("all:\n  vars:\n    ansible_ssh_extra_args: -oproxycommand=nc\n  hosts: {a: }\n",
     ":4:11: all.hosts.a: ansible_ssh_extra_args sets ProxyCommand, which provision does not run (it reaches "
     "hosts without local commands); use ProxyJump: -J HOST, or provision_jump"),
    ("all:\n  hosts:\n    a: {ansible_ssh_common_args: \"-o 'unclosed\"}\n",
     ":3:5: all.hosts.a: ansible_ssh_common_args: No closing quotation"),
])
def test_broken_inventories(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_inventory(path)
    assert str(err.value) == f"{path}{expected}"


def test_expand_range() -> None:
    assert expand_range("gpu-[08:10]") == ["gpu-08", "gpu-09", "gpu-10"]
    assert expand_range("n[1:5:2]-[a:b]") == ["n1-a", "n1-b", "n3-a", "n3-b", "n5-a", "n5-b"]
    assert expand_range("plain") == ["plain"]
    assert expand_range("rack-[A:C]") == ["rack-A", "rack-B", "rack-C"]          # was: not expanded
    assert expand_range("x[y:B]") == ["xy", "xz", "xA", "xB"]                       # Ansible: a…z then A…Z
    assert expand_range("n[:2]") == ["n0", "n1", "n2"]                              # Ansible: empty start is 0
    assert len(expand_range("gpu-[0:9999]")) == 10_000


@pytest.mark.parametrize("order", [range(2000), range(1999, -1, -1)])
def test_groups_nested_past_the_limit_are_refused_not_a_recursion(tmp_path: Path, order: range) -> None:
    """Groups chained through flat `children:` lists nest as deep as a file likes; YAML depth does not bound them."""
    path = tmp_path / "inv.yaml"
    path.write_text("all:\n  hosts: {a: }\n  children:\n"
                    + "".join(f"    g{i}: {{children: {{g{i + 1}: }}}}\n" for i in order))
    with pytest.raises(ConfigError, match="groups nested deeper than 32 levels"):
        load_inventory(path)


def test_inline_hosts_and_hosts_for(tmp_path: Path) -> None:
    inv = inline_inventory("localhost,gpu-01.example.internal,")
    assert [(h.name, h.transport) for h in inv.hosts] == [("localhost", "local"), ("gpu-01.example.internal", "ssh")]
    with pytest.raises(UsageError, match="needs an inventory"):
        inline_inventory("all")
    inline = build_profile({"comfyui": {"root": "/opt/ComfyUI"}, "hosts": "localhost,gpu-02"}, name="p", file="p.yaml")
    assert [h.name for h in hosts_for(inline)] == ["localhost", "gpu-02"]
    assert [h.name for h in hosts_for(inline, limit="gpu-*")] == ["gpu-02"]
    path = tmp_path / "fleet.yaml"
    path.write_text(FLEET)
    p = build_profile({"comfyui": {"root": "/opt/ComfyUI"}, "hosts": "rtx3090", "inventory": str(path)},
                      name="p", file="p.yaml")
    assert names(hosts_for(p, limit="canary")) == ["gpu-01"]
    assert names(hosts_for(p, inventory=str(path), limit="!gpu-0[123]*")) == ["gpu-04"]


def test_shipped_inventories() -> None:
    fleet = load_inventory(ROOT / "inventories" / "fleet.yaml")
    assert {"rtx3090", "rtx4090", "a100", "rtx5090"} <= set(fleet.groups)
    assert all(h.name.endswith(".example.internal") for h in fleet.hosts)
    assert fleet.host("gpu-05.example.internal").overlay == {"comfyui": {"root": "/srv/ComfyUI"}}
    local = load_inventory(ROOT / "inventories" / "local.yaml")
    assert [(h.name, h.transport) for h in local.hosts] == [("localhost", "local")]


def test_proxyjump_forms_in_ssh_args(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text("all:\n  hosts:\n    a: {ansible_ssh_common_args: '-o ProxyJump=j1 -v'}\n"
                    "    b: {ansible_ssh_extra_args: '-oProxyJump=j2'}\n    c: {ansible_ssh_common_args: '-Jj3'}\n"
                    "    d: {ansible_ssh_common_args: '-o StrictHostKeyChecking=yes'}\n")
    assert [h.jump for h in load_inventory(path).hosts] == ["j1", "j2", "j3", None]


def test_become_is_read_as_ansible_writes_it_and_su_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "inv.yaml"
    path.write_text("all:\n  vars: {ansible_user: admin, ansible_become: 'yes'}\n  hosts:\n"
                    "    a: {}\n    b: {ansible_become_user: ops, provision_become_password_env: OPS_PASSWORD}\n"
                    "    c: {ansible_become: false}\n")
    a, b, c = load_inventory(path).hosts
    assert (a.become, a.become_user, a.become_password_env) == (True, "root", None)
    assert (b.become, b.become_user, b.become_password_env) == (True, "ops", "OPS_PASSWORD")
    assert not c.become
    path.write_text("all:\n  hosts:\n    a: {ansible_become: true, ansible_become_method: su}\n")
    with pytest.raises(ConfigError) as err:
        load_inventory(path)
    assert "ansible_become_method su is not supported: su reads the password only from a terminal; use sudo" \
        in str(err.value)


def test_ask_become_pass_reads_the_first_line_of_a_piped_stdin_and_redacts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import argparse
    import io

    from provisioner import commands, secrets

    monkeypatch.setattr("sys.stdin", io.StringIO("pipe-password-1\nmore stdin\n"))
    monkeypatch.setattr(secrets, "_become_password", [])
    commands.ask_become_pass(argparse.Namespace(ask_become_pass=True))
    assert secrets.become_password("UNSET_VAR") == "pipe-password-1"
    assert secrets.redact("sudo: pipe-password-1") == "sudo: ***"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    monkeypatch.setattr(secrets, "_become_password", [])
    with pytest.raises(UsageError, match="-K/--ask-become-pass read no password"):
        commands.ask_become_pass(argparse.Namespace(ask_become_pass=True))
