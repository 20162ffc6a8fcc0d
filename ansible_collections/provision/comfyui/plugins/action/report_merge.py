"""provision.comfyui.report_merge: the hosts' report parts (REPORT/hosts/*, written by apply and
verify with `report`) judged as one fleet into REPORT: groups, drift, GPU-class references and image
agreement as one `provision verify --report REPORT` over those hosts. Run it once (`run_once: true`)
after the hosts; under AWX job slicing, once after every slice (a workflow node)."""

from __future__ import annotations

import glob
import os

from ansible.plugins.action import ActionBase

from ansible_collections.provision.comfyui.plugins.plugin_utils.provision_run import EXIT_FAILED, EXIT_OK, run_provision

ARGS = {"report": {"type": "path", "required": True}}


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False
    _supports_check_mode = False

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        _, args = self.validate_argument_spec(argument_spec=ARGS)
        report = args["report"]
        parts = sorted(glob.glob(os.path.join(report, "hosts", "*", "slice")))
        if not parts:
            result.update(failed=True, msg=f"no host wrote its report part under {report}/hosts/")
            return result
        code, _, said = run_provision("report merge", [*(os.path.dirname(p) for p in parts), "--out", report,
                                                       "--references", os.path.join(report, "references")],
                                      task_vars, self._templar, host_scoped=False)
        lines = [ln for ln in said.splitlines() if ln.strip()]
        result.update(changed=True, exit_code=code, report=os.path.join(report, "report.json"), stdout_lines=lines)
        if code not in (EXIT_OK, EXIT_FAILED):   # a failed host failed its own task already
            result.update(failed=True, msg=next((ln for ln in lines if " hosts from " in ln), lines[-1] if lines else ""))
        return result
