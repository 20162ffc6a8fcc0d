# The documentation of the action plugin of the same name (plugins/action/facts.py), which does the
# work on the controller; Ansible finds a task's documentation here.

DOCUMENTATION = r"""
module: facts
short_description: provision.comfyui.facts
description: see plugins/action/facts.py and docs/ansible.md in the provision repository
author: provision maintainers
"""
