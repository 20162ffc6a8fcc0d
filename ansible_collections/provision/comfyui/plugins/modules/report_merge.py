# The documentation of the action plugin of the same name (plugins/action/report_merge.py), which does the
# work on the controller; Ansible finds a task's documentation here.

DOCUMENTATION = r"""
module: report_merge
short_description: provision.comfyui.report_merge
description: see plugins/action/report_merge.py and docs/ansible.md in the provision repository
author: provision maintainers
"""
