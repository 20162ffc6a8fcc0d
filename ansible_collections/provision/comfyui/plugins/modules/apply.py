# The documentation of the action plugin of the same name (plugins/action/apply.py), which does the
# work on the controller; Ansible finds a task's documentation here.

DOCUMENTATION = r"""
module: apply
short_description: provision.comfyui.apply
description: see plugins/action/apply.py and docs/ansible.md in the provision repository
author: provision maintainers
"""
