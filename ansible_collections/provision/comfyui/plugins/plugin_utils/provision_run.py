"""What every action of this collection shares: the play's current host as a one-host provision
inventory (its connection from Ansible's own variables), and provision's CLI run with --json on the
controller, in the Python that runs Ansible (provision installed beside ansible-core)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

# The host variables provision reads (docs/inventory-reference.md); become and provision_* pass as
# they are, for provision's own inventory handling to judge.
CONNECTION_VARS = (
    "ansible_host", "ansible_ssh_host", "ansible_port", "ansible_ssh_port", "ansible_user", "ansible_ssh_user",
    "ansible_ssh_private_key_file", "ansible_private_key_file", "ansible_connection",
    "ansible_ssh_common_args", "ansible_ssh_extra_args", "ansible_group_priority",
    "provision", "provision_container", "provision_via", "provision_jump")
PASSED_PREFIXES = ("ansible_become",)
EXIT_OK, EXIT_FAILED, EXIT_CHANGED, EXIT_BAD_INPUT = 0, 1, 2, 3


def host_inventory(task_vars, templar):
    """The current host in Ansible's YAML inventory shape, with its groups (so that the profile's
    `hosts` pattern selects it as in the play's inventory) and its connection variables."""
    host = task_vars["inventory_hostname"]
    chosen = {}
    for name, value in task_vars.items():
        if name in CONNECTION_VARS or name.startswith(PASSED_PREFIXES):
            chosen[name] = _plain(templar.template(value))
    groups = [g for g in task_vars.get("group_names") or () if g not in ("all", "ungrouped")]
    return {"all": {"hosts": {host: chosen or None},
                    "children": {g: {"hosts": {host: None}} for g in groups} or None}}


def _plain(value):
    """Ansible's tagged strings and mappings as JSON's own types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)


def run_provision(verb, argv, task_vars, templar, *, host_scoped=True):
    """`python -m provisioner VERB ARGV… --json` for the current host: (exit code, the JSON it printed
    or None, what it said on stderr: its human output, the diff among it)."""
    command = [sys.executable, "-m", "provisioner", *verb.split(), *argv]
    with tempfile.TemporaryDirectory(prefix="provision-ansible-") as tmp:
        if host_scoped:
            inventory = os.path.join(tmp, "inventory.yaml")
            with open(inventory, "w", encoding="utf-8") as fh:
                json.dump(host_inventory(task_vars, templar), fh)
            command += ["-i", inventory, "--limit", task_vars["inventory_hostname"], "--json"]
        env = dict(os.environ, NO_COLOR="1", COLUMNS="160")
        done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env)
    try:
        answer = json.loads(done.stdout) if done.stdout.strip() else None
    except ValueError:
        answer = None
    return done.returncode, answer, done.stderr


def reason(code, answer, stderr, host=None):
    """provision's one-line reason for a failure: the host's own, else its first error line."""
    rows = (answer or {}).get("hosts") if isinstance(answer, dict) else None
    for row in rows or ():
        if host is None or row.get("host") == host:
            text = row.get("detail") or "; ".join(row.get("errors") or ()) or row.get("error")
            if text and row.get("status") not in ("ok", "changed", "changes"):
                return text
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or "FAIL" in ln or ": failed" in ln]
    return (errors or lines or [f"provision exited {code}"])[0]
