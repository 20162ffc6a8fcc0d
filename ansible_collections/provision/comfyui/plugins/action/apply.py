"""provision.comfyui.apply: converge the current host to a provision profile (`state: present`), or
show what would change (`state: planned`, and always under Ansible's --check). `changed` is true
exactly when provision changed (or, planning, would change) something; --diff shows provision's
diff; a failure carries provision's one-line reason. With `report`, the host's verification is
written to REPORT/hosts/HOST for `provision.comfyui.report_merge` (references read from
REPORT/references); `verify_gate` rolls back a host whose change fails verification."""

from __future__ import annotations

import os

from ansible.plugins.action import ActionBase

from ansible_collections.provision.comfyui.plugins.plugin_utils.provision_run import (
    EXIT_CHANGED, EXIT_OK, reason, run_provision)

ARGS = {"profile": {"type": "path", "required": True},
        "state": {"type": "str", "choices": ["present", "planned"], "default": "present"},
        "report": {"type": "path"},
        "verify": {"type": "bool", "default": True},
        "verify_gate": {"type": "bool", "default": False},
        "options": {"type": "list", "elements": "str", "default": []}}


def report_args(report, host):
    """A host's part of the fleet report: its own folder, the shared references (a job slice)."""
    return ["--report", os.path.join(report, "hosts", host), "--references", os.path.join(report, "references")]


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False    # provision makes its own connection to the host
    _supports_check_mode = True
    _supports_async = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        _, args = self.validate_argument_spec(argument_spec=ARGS)
        host = task_vars["inventory_hostname"]
        planning = self._task.check_mode or args["state"] == "planned"
        argv = [args["profile"], *args["options"]]
        if planning:
            code, answer, said = run_provision("plan", argv, task_vars, self._templar,
                                               play_context=self._play_context)
        else:
            argv += report_args(args["report"], host) if args["report"] else []
            argv += ["--no-verify"] if not args["verify"] else []
            argv += ["--verify-gate"] if args["verify_gate"] else []
            code, answer, said = run_provision("apply", argv, task_vars, self._templar,
                                               play_context=self._play_context)
        result["provision"] = answer
        result["exit_code"] = code       # not `rc`: Ansible takes a non-zero rc for a failure
        if code not in (EXIT_OK, EXIT_CHANGED):
            result.update(failed=True, msg=reason(code, answer, said, host))
            return result
        result["changed"] = code == EXIT_CHANGED
        if self._task.diff and result["changed"]:
            result["diff"] = {"prepared": said}
        return result
