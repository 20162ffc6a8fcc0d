"""Stand-ins for what tests and `make demo` cannot reach: GPU hosts, wheels, the plugin's git repo,
GitHub releases, the Hugging Face Hub and ComfyUI (see docs/testing.md).

Import from the modules: this package re-exports nothing, so a stand-in run by a sandbox venv's
bare python (ComfyUI's main.py -> comfyui_server) imports none of the rest.
"""
