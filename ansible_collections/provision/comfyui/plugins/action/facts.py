"""provision.comfyui.facts: provision's facts of the current host (GPU, VRAM, driver, torch,
Python, what is installed) as `ansible_facts.provision_facts`, and its GPU class as
`ansible_facts.provision_gpu_class` (the class the fleet report groups hosts by), for `when:`.
(Not `provision`: facts become host variables, and `provision` is the host's profile overlay.)"""

from __future__ import annotations

from ansible.plugins.action import ActionBase

from ansible_collections.provision.comfyui.plugins.plugin_utils.provision_run import EXIT_OK, reason, run_provision

ARGS = {"profile": {"type": "path"}, "options": {"type": "list", "elements": "str", "default": []}}


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _requires_connection = False
    _supports_check_mode = True     # it only reads

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        _, args = self.validate_argument_spec(argument_spec=ARGS)
        host = task_vars["inventory_hostname"]
        argv = ([args["profile"]] if args["profile"] else []) + args["options"]
        code, answer, said = run_provision("facts", argv, task_vars, self._templar,
                                               play_context=self._play_context)
        facts = (answer or {}).get(host) if isinstance(answer, dict) else None
        if code != EXIT_OK or not facts or "error" in facts and len(facts) <= 2:
            result.update(failed=True, msg=(facts or {}).get("error") or reason(code, answer, said, host))
            return result
        result["ansible_facts"] = {"provision_facts": facts, "provision_gpu_class": facts.get("gpu_class")}
        result["changed"] = False
        return result
