"""provision.comfyui.verify: the verification generations on the current host; returns its status,
figures (cold, warm median, VRAM peak in GiB) and failed checks, and with `report` writes its part
of the fleet report to REPORT/hosts/HOST (judged as a fleet by `provision.comfyui.report_merge`)."""

from __future__ import annotations

from ansible.plugins.action import ActionBase

from ansible_collections.provision.comfyui.plugins.action.apply import report_args
from ansible_collections.provision.comfyui.plugins.plugin_utils.provision_run import EXIT_OK, reason, run_provision

ARGS = {"profile": {"type": "path", "required": True}, "report": {"type": "path"},
        "options": {"type": "list", "elements": "str", "default": []}}


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False
    _supports_check_mode = False    # it runs generations

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        _, args = self.validate_argument_spec(argument_spec=ARGS)
        host = task_vars["inventory_hostname"]
        argv = [args["profile"], *args["options"]] + (report_args(args["report"], host) if args["report"] else [])
        code, answer, said = run_provision("verify", argv, task_vars, self._templar,
                                               play_context=self._play_context)
        mine = next((h for h in (answer or {}).get("hosts") or () if h.get("host", "").split("/")[0] == host), None)
        if mine is None:
            result.update(failed=True, msg=reason(code, answer, said, host))
            return result
        result.update(changed=False, status=mine["status"], figures=mine["figures"],
                      failures=mine["failures"], fleet=[f for f in answer.get("fleet") or () if f["host"] == host])
        if code != EXIT_OK or mine["status"] != "passed":
            result.update(failed=True, msg="; ".join(mine["failures"]) or reason(code, answer, said, host))
        return result
