# The documentation of the action plugin of the same name (plugins/action/verify.py), which does the
# work on the controller; Ansible finds a task's documentation here.

DOCUMENTATION = r"""
module: verify
short_description: provision.comfyui.verify
description: see plugins/action/verify.py and docs/ansible.md in the provision repository
author: provision maintainers
"""
