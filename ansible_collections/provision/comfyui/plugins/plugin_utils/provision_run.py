"""What every action of this collection shares: the play's current host as a one-host provision
inventory (its connection from Ansible's own variables), and provision's CLI run with --json on the
controller, in the Python that runs Ansible (provision installed beside ansible-core)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

# The host variables provision reads (docs/inventory-reference.md); the other ansible_become*
# variables pass as they are, for provision's own inventory handling to judge.
CONNECTION_VARS = (
    "ansible_host", "ansible_ssh_host", "ansible_port", "ansible_ssh_port", "ansible_user", "ansible_ssh_user",
    "ansible_ssh_private_key_file", "ansible_private_key_file", "ansible_connection",
    "ansible_ssh_common_args", "ansible_ssh_extra_args", "ansible_group_priority",
    "provision", "provision_container", "provision_via", "provision_jump", "provision_become_password_env")
PASSED_PREFIXES = ("ansible_become",)
# The become password (a vaulted host variable, or -K) is never written to the inventory file: the
# child provision gets it in its environment under this name, which the inventory names.
PASSWORD_VARS = ("ansible_become_password", "ansible_become_pass")
PASSWORD_ENV = "PROVISION_ANSIBLE_BECOME_PASSWORD"
EXIT_OK, EXIT_FAILED, EXIT_CHANGED, EXIT_BAD_INPUT = 0, 1, 2, 3


def host_inventory(task_vars, templar, play_context=None):
    """The current host in Ansible's YAML inventory shape, with its groups (so that the profile's
    `hosts` pattern selects it as in the play's inventory) and its connection variables; and what
    the child provision's environment adds (the become password). Become is as Ansible decided it
    for this task (the play context: the host's variables over the play's `become:` keywords over
    -b/--become), not only the variables: `become: true` on a play sets none."""
    host = task_vars["inventory_hostname"]
    chosen, env = {}, {}
    for name, value in task_vars.items():
        if name in PASSWORD_VARS:
            continue
        if name in CONNECTION_VARS or name.startswith(PASSED_PREFIXES):
            chosen[name] = _plain(templar.template(value))
    password = None
    if play_context is not None:
        chosen["ansible_become"] = bool(play_context.become)
        if play_context.become:
            chosen["ansible_become_user"] = str(play_context.become_user or "root")
            chosen["ansible_become_method"] = str(play_context.become_method or "sudo")
            password = play_context.become_pass or None
    elif str(chosen.get("ansible_become", False)).lower() in ("true", "yes"):
        found = next((task_vars[v] for v in PASSWORD_VARS if task_vars.get(v) is not None), None)
        password = templar.template(found) if found is not None else None
    if password is not None and "provision_become_password_env" not in chosen:
        env[PASSWORD_ENV] = str(password)
        chosen["provision_become_password_env"] = PASSWORD_ENV
    groups = [g for g in task_vars.get("group_names") or () if g not in ("all", "ungrouped")]
    return {"all": {"hosts": {host: chosen or None},
                    "children": {g: {"hosts": {host: None}} for g in groups} or None}}, env


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


def run_provision(verb, argv, task_vars, templar, *, host_scoped=True, play_context=None):
    """`python -m provisioner VERB ARGV… --json` for the current host: (exit code, the JSON it printed
    or None, what it said on stderr: its human output, the diff among it)."""
    command = [sys.executable, "-m", "provisioner", *verb.split(), *argv]
    env = dict(os.environ, NO_COLOR="1", COLUMNS="160")
    with tempfile.TemporaryDirectory(prefix="provision-ansible-") as tmp:
        if host_scoped:
            inventory = os.path.join(tmp, "inventory.yaml")
            found, secret = host_inventory(task_vars, templar, play_context)
            env.update(secret)
            with open(inventory, "w", encoding="utf-8") as fh:
                json.dump(found, fh)
            command += ["-i", inventory, "--limit", task_vars["inventory_hostname"], "--json"]
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
