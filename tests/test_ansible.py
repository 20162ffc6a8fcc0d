"""The Ansible collection with the real thing: ansible-core (the `test` extra) builds the collection
with ansible-galaxy and installs it into a temporary path; ansible-playbook runs its example
playbook over real sshd hosts (the sandbox world of tests/lab.py): it converges the fleet and writes
one fleet report, a second run changes nothing, --check --diff shows provision's diff and changes
nothing, a failing host respects max_fail_percentage, and AWX's job slicing (the same playbook as
parallel processes with disjoint --limit) merges into a report that judges as the single run's."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from lab import Lab, LabHost, open_lab, tree_state

import provisioner
from provisioner.sandbox.world import write_yaml
from sshd import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
COLLECTION = REPO / "ansible_collections" / "provision" / "comfyui"
BIN = Path(sys.executable).parent
RECAP = re.compile(r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)", re.M)


def test_the_collection_is_versioned_with_the_package() -> None:
    assert yaml.safe_load((COLLECTION / "galaxy.yml").read_text())["version"] == provisioner.__version__


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The collection built by ansible-galaxy and installed from its tarball, as a user would."""
    base = tmp_path_factory.mktemp("galaxy")
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", str(COLLECTION), "--output-path",
                    str(base)], check=True, capture_output=True, timeout=300)
    (tarball,) = base.glob("provision-comfyui-*.tar.gz")
    assert tarball.name == f"provision-comfyui-{provisioner.__version__}.tar.gz"
    subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install", str(tarball), "-p", str(base / "collections")],
                   check=True, capture_output=True, timeout=300)
    assert (base / "collections" / "ansible_collections" / "provision" / "comfyui" / "playbooks" / "site.yml").is_file()
    return base / "collections"


# A task that shows what the collection would give provision for its host, from the real play
# context and templar of an ansible-playbook run (the collection's own helper, unchanged).
SHOW_INVENTORY = """\
from ansible.plugins.action import ActionBase
from ansible_collections.provision.comfyui.plugins.plugin_utils.provision_run import host_inventory


class ActionModule(ActionBase):
    _requires_connection = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        inventory, env = host_inventory(task_vars, self._templar, self._play_context)
        (host,) = inventory["all"]["hosts"].values()
        result["become"] = {k: v for k, v in (host or {}).items() if "become" in k}
        result["env"] = env
        return result
"""


def test_become_reaches_provision_as_ansible_decided_it(installed: Path, tmp_path: Path) -> None:
    """`become: true` on a play (or -b) sets no variable: provision gets become from the play
    context, where Ansible put its decision (a host's ansible_become over the play's keyword). The
    become password (a vaulted variable, -K) goes to provision's environment, never into the
    inventory file it reads."""
    (tmp_path / "action_plugins").mkdir()
    (tmp_path / "action_plugins" / "show_inventory.py").write_text(SHOW_INVENTORY)
    write_yaml(tmp_path / "inventory.yaml", {"all": {"hosts": {
        "keyword": {"ansible_host": "192.0.2.1"},
        "opted-out": {"ansible_become": False},
        "as-comfy": {"ansible_become_user": "comfy", "ansible_become_password": "s3cret"},
        "named-env": {"ansible_become_password": "s3cret", "provision_become_password_env": "SUDO_PASS"}}}})
    (tmp_path / "play.yml").write_text("- hosts: all\n  gather_facts: false\n  become: true\n  tasks:\n"
                                       "    - show_inventory:\n")
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(installed), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(tmp_path / "ansible-tmp"), "PYTHONWARNINGS": "ignore",
           "ANSIBLE_STDOUT_CALLBACK": "oneline", "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1"}
    done = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(tmp_path / "inventory.yaml"), "play.yml"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    out = done.stdout + done.stderr
    found = {m[1]: json.loads(m[2]) for m in re.finditer(r"^(\S+) \| \w+!? => (\{.*\})$", out, re.M)}
    assert done.returncode == 0 and len(found) == 4, out
    assert found["keyword"]["become"] == {"ansible_become": True, "ansible_become_user": "root",
                                          "ansible_become_method": "sudo"} and found["keyword"]["env"] == {}
    assert found["opted-out"]["become"] == {"ansible_become": False}
    assert found["as-comfy"]["become"] == {"ansible_become": True, "ansible_become_user": "comfy",
                                           "ansible_become_method": "sudo",
                                           "provision_become_password_env": "PROVISION_ANSIBLE_BECOME_PASSWORD"}
    assert found["as-comfy"]["env"] == {"PROVISION_ANSIBLE_BECOME_PASSWORD": "s3cret"}
    assert found["named-env"]["become"]["provision_become_password_env"] == "SUDO_PASS"   # the inventory's own
    assert found["named-env"]["env"] == {}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with open_lab(tmp_path_factory.mktemp("lab-ansible")) as lab:
        lab.add(2, torch="2.8.0+cu128")      # backend 1.2.0 (the gate case: plugin v1.2.0 needs it) starts at torch 2.7
        yield lab


def playbook(lab: Lab, collections: Path, report: Path | None, *args: str, inventory: Path | None = None,
             **extra: object) -> tuple[int, str, dict[str, tuple[int, int, int, int]]]:
    """`ansible-playbook provision.comfyui.site` over the lab: (exit code, output, host -> (ok,
    changed, unreachable, failed) from the PLAY RECAP)."""
    variables = {"provision_profile": str(lab.profile), "provision_options": [*lab.ssh_args(), "--no-color"],
                 **({"provision_report": str(report)} if report else {}), **extra}
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(collections), "ANSIBLE_LOCAL_TEMP": str(lab.root / "ansible-tmp"),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
           "ANSIBLE_LOCALHOST_WARNING": "0", "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory or lab.inventory), "provision.comfyui.site",
                           "-e", json.dumps(variables), *args], capture_output=True, text=True, env=env, timeout=900,
                          cwd=lab.root)
    out = done.stdout + done.stderr
    return done.returncode, out, {m[0]: tuple(map(int, m[1:])) for m in RECAP.findall(out)}


def changed(recap: dict[str, tuple[int, int, int, int]], host: str) -> int:
    return recap[host][1]


def judgements(report: dict) -> dict:
    """What report.json judges, without what a second run measures anew (timings, dates)."""
    return {"hosts": {h["host"]: (h["status"], [c["name"] for c in h["checks"] if not c["passed"]],
                                  [(a["passed"], (a.get("reference") or {}).get("host")) for a in h["agreement"]])
                      for h in report["hosts"]},
            "groups": [(g["gpu_class"], g["hosts"], g["values"]) for g in report["groups"]],
            "fleet": [(f["host"], f["kind"], f["field"]) for f in report["fleet"]]}


def test_the_playbook_converges_verifies_and_then_changes_nothing(lab: Lab, installed: Path, tmp_path: Path) -> None:
    names = [h.name for h in lab.hosts]
    code, out, recap = playbook(lab, installed, tmp_path / "report")
    assert code == 0, out
    assert all(changed(recap, n) == 1 and recap[n][2:] == (0, 0) for n in names), out
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert sorted(h["host"] for h in report["hosts"]) == names and report["summary"]["passed"] == 2, out
    index = json.loads((tmp_path / "report" / "references" / "index.json").read_text())["references"]
    assert [e["host"] in names and not e["promoted"] for e in index.values()] == [True]   # made by the merge
    assert all(h["agreement"][0]["reference"] for h in report["hosts"])
    code, out, recap = playbook(lab, installed, None)
    assert code == 0 and all(changed(recap, n) == 0 for n in names), out     # a second run: changed=0


def test_check_diff_shows_provisions_diff_and_changes_nothing(lab: Lab, installed: Path) -> None:
    host = lab.hosts[0]
    playbook(lab, installed, None)
    workflow = next((host.comfy / "workflows").glob("*.json"))
    workflow.write_text(workflow.read_text().replace('"steps": 4', '"steps": 9'))
    before = tree_state(host.comfy)
    code, out, recap = playbook(lab, installed, None, "--check", "--diff")
    assert code == 0, out
    assert changed(recap, host.name) == 1 and changed(recap, lab.hosts[1].name) == 0, out
    assert "~ workflow update" in out and '-      "steps": 9,' in out and '+      "steps": 4,' in out, out
    assert tree_state(host.comfy) == before                                   # --check changed nothing
    code, out, recap = playbook(lab, installed, None)
    assert code == 0 and changed(recap, host.name) == 1 and '"steps": 4' in workflow.read_text(), out


def test_a_failing_host_respects_max_fail_percentage(lab: Lab, installed: Path, tmp_path: Path) -> None:
    """One host of three down: with serial 1 and max_fail_percentage 0 the play stops after it;
    with max_fail_percentage 50 the other hosts go on. Its failure is provision's one line."""
    inventory = yaml.safe_load(lab.inventory.read_text())
    hosts = inventory["all"]["hosts"]
    inventory["all"]["hosts"] = {"gpu-down": {"ansible_host": "127.0.0.1", "ansible_port": free_port(),
                                              "ansible_user": "root"}, **hosts}
    write_yaml(tmp_path / "inventory.yaml", inventory)
    code, out, recap = playbook(lab, installed, None, inventory=tmp_path / "inventory.yaml",
                                provision_serial=1, provision_max_fail_percentage=0)
    assert code != 0 and recap["gpu-down"][3] == 1, out
    assert not any(n in recap for n in hosts), out                            # no later batch started
    assert re.search(r"gpu-down.*cannot connect|gpu-down.*refused|gpu-down.*unreachable", out, re.I), out
    code, out, recap = playbook(lab, installed, None, inventory=tmp_path / "inventory.yaml",
                                provision_max_fail_percentage=50)
    assert recap["gpu-down"][3] == 1 and all(recap[n][3] == 0 and recap[n][0] >= 2 for n in hosts), out


def test_job_slices_merge_into_the_single_runs_report(lab: Lab, installed: Path, tmp_path: Path) -> None:
    """AWX's job slicing: the same playbook as parallel processes with disjoint --limit, then one
    merge; its report judges as one run over the fleet does."""
    names = [h.name for h in lab.hosts]
    code, out, _ = playbook(lab, installed, tmp_path / "single")
    assert code == 0, out
    single = json.loads((tmp_path / "single" / "report.json").read_text())
    variables = {"provision_profile": str(lab.profile), "provision_options": [*lab.ssh_args(), "--no-color"],
                 "provision_report": str(tmp_path / "sliced"), "provision_merge": False}
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(installed), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(lab.root / "ansible-tmp"), "PYTHONWARNINGS": "ignore"}
    slices = [subprocess.Popen([str(BIN / "ansible-playbook"), "-i", str(lab.inventory), "provision.comfyui.site",
                                "-e", json.dumps(variables), "--limit", name], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=env, cwd=lab.root) for name in names]
    for proc in slices:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out
    assert not (tmp_path / "sliced" / "report.json").exists()                # no slice merged
    parts = sorted(str(p) for p in (tmp_path / "sliced" / "hosts").iterdir())
    done = subprocess.run([str(BIN / "provision"), "report", "merge", *parts, "--out", str(tmp_path / "sliced"),
                           "--references", str(tmp_path / "sliced" / "references"), "--no-color"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "2 hosts from 2 slices: 2 passed" in done.stdout, done.stdout + done.stderr
    merged = json.loads((tmp_path / "sliced" / "report.json").read_text())
    assert judgements(merged) == judgements(single)


def ansible(lab: Lab, collections: Path, module: str, **args: object) -> tuple[int, dict[str, dict], str]:
    """An ad-hoc `ansible all -m MODULE` over the lab: (exit code, host -> its JSON result, output)."""
    env = {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(collections), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_LOCAL_TEMP": str(lab.root / "ansible-tmp"), "PYTHONWARNINGS": "ignore",
           "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1", "ANSIBLE_STDOUT_CALLBACK": "oneline"}
    options = {"profile": str(lab.profile), "options": [*lab.ssh_args(), "--no-color"], **args}
    done = subprocess.run([str(BIN / "ansible"), "all", "-i", str(lab.inventory), "-m", module,
                           "-a", json.dumps({k: v for k, v in options.items() if v is not None})],
                          capture_output=True, text=True, env=env, timeout=900, cwd=lab.root)
    results = {}
    for line in done.stdout.splitlines():
        found = re.match(r"^(\S+) \| (\w+!?)(?: \| rc=\d+)? => (\{.*\})$", line)
        if found:
            results[found[1]] = json.loads(found[3])
    return done.returncode, results, done.stdout + done.stderr


def test_facts_and_verify_as_tasks(lab: Lab, installed: Path, tmp_path: Path) -> None:
    """facts gives the GPU class for `when:`; verify returns the figures and writes the host's part
    of the report, which report_merge judges as a fleet. The fleet is converged first: verify needs
    a ComfyUI with the plugin, whichever test ran before this one (or none)."""
    code, out, _ = playbook(lab, installed, None)
    assert code == 0, out
    code, results, out = ansible(lab, installed, "provision.comfyui.facts")
    assert code == 0 and len(results) == 2, out
    for result in results.values():
        assert result["ansible_facts"]["provision_gpu_class"] == "NVIDIA GeForce RTX 3090 24 GiB"
        assert result["ansible_facts"]["provision_facts"]["gpu"]["name"] == "NVIDIA GeForce RTX 3090"
    code, results, out = ansible(lab, installed, "provision.comfyui.verify", report=str(tmp_path))
    assert code == 0 and len(results) == 2, out
    for name, result in results.items():
        assert result["status"] == "passed" and result["figures"]["warm_median_s"] > 0 and not result["changed"]
        assert (tmp_path / "hosts" / name / "slice" / "entries.json").is_file()
    code, results, out = ansible(lab, installed, "provision.comfyui.report_merge", report=str(tmp_path), profile=None,
                                 options=None)
    assert code == 0, out
    merged = json.loads((tmp_path / "report.json").read_text())
    assert merged["summary"]["hosts"] == merged["summary"]["passed"] == 2


def test_the_verification_gate_rolls_a_failing_host_back(lab: Lab, installed: Path, tmp_path: Path) -> None:
    """A host whose `provision:` overlay in the Ansible inventory takes a plugin its ComfyUI core
    fails on at the first generation: under provision_verify_gate its task fails with provision's
    reason, the host is back at its old plugin, and the other host converged."""
    from test_e2e_rollback import FOOLED

    bad, good = lab.hosts
    playbook(lab, installed, None)
    with (bad.comfy / "comfy" / "ldm" / "qwen_image" / "model.py").open("a") as fh:
        fh.write(FOOLED)
    inventory = yaml.safe_load(lab.inventory.read_text())
    inventory["all"]["hosts"][bad.name]["provision"]["plugin"] = {"tag": "v1.2.0"}
    inventory["all"]["hosts"][bad.name]["provision"]["backend"] = {"version": "1.2.0"}   # v1.2.0 needs it (#777)
    inventory["all"]["hosts"][good.name]["provision"]["workflow"] = {"steps": 5}
    write_yaml(tmp_path / "inventory.yaml", inventory)
    code, out, recap = playbook(lab, installed, tmp_path / "report", inventory=tmp_path / "inventory.yaml",
                                provision_verify_gate=True)
    assert code != 0 and recap[bad.name][3] == 1 and recap[good.name][1:] == (1, 0, 0), out
    assert re.search(rf"fatal: \[{bad.name}\]: FAILED!.*rolled back", out), out
    assert bad.git("describe", "--tags") == "v1.1.0"
    entry = next(h for h in json.loads((tmp_path / "report" / "report.json").read_text())["hosts"] if h["host"] == bad.name)
    assert entry["rollout"]["result"] == "rolled_back"
