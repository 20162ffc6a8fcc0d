"""The injection corpus: hostile strings, and every place a string goes on its way to a host.

Each payload tries to create CANARY (an absolute path the suite watches) if anything on the way
(a shell on the control machine or on the host, git, pip, ssh, Jinja) reads it as code rather
than data. A field says where the string goes (a profile key, a host's `provision:` overlay, an
inventory variable, a host's name) and how it is shaped there (alone, or inside a plausible value).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

CANARY = "CANARY"  # replaced by the canary's absolute path

PAYLOADS: tuple[str, ...] = (
    ";touch CANARY",
    "$(touch CANARY)",
    "`touch CANARY`",
    "'; touch CANARY; '",
    '"; touch CANARY; "',
    "\ntouch CANARY\n",
    "| touch CANARY",
    "&& touch CANARY #",
    "${IFS}touch${IFS}CANARY",
    "-oProxyCommand=touch CANARY",
    "-o ProxyCommand=touch${IFS}CANARY",
    "--upload-pack=touch CANARY",
    "ext::sh -c touch% CANARY",
    "ext::touch${IFS}CANARY",
    "{{ cycler.__init__.__globals__.os.system('touch CANARY') }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{% endfor %}",
    "../../../../CANARY",
    "..",
    "\x00; touch CANARY",
    "\uff1btouch CANARY",                   # a fullwidth semicolon
    "\u202e;touch CANARY",                  # right-to-left override
    "[/x] [bold]:b: %s%n",                  # rich markup, emoji codes, printf
    "a\\\"b'c$d`e",                          # every quote and escape at once
)
# A few that every field meets even in the default (short) run.
CORE = (PAYLOADS[0], PAYLOADS[1], PAYLOADS[2], PAYLOADS[5], PAYLOADS[8], PAYLOADS[9], PAYLOADS[14])

Shape = Callable[[str, Any], Any]  # (payload with the canary's path, lab) -> the value written


@dataclass(frozen=True)
class Field:
    name: str
    where: str                  # "profile" | "overlay" (the host's provision:) | "var" | "host-name"
    path: tuple[Any, ...]       # "+" appends to a list
    shape: Shape = lambda p, lab: p
    also: tuple[tuple[tuple[Any, ...], Any], ...] = ()  # profile keys that make the value used


# So that apply runs the step that carries the value: a package to install (pip's options go on its
# command line), a fresh plugin folder (git clones from the repo URL).
PIP_RUNS = ((("packages", "+"), "injection-probe>=1"),)
GIT_RUNS = ((("plugin", "name"), "ComfyUI-nunchaku-probe"),)


def _url(p: str, lab: Any) -> str:
    return f"http://127.0.0.1:9/{p}"


FIELDS: tuple[Field, ...] = (
    # paths on the host
    Field("comfyui.root", "overlay", ("comfyui", "root"), lambda p, lab: f"{lab.root}/roots/r{p}"),
    Field("comfyui.venv", "overlay", ("comfyui", "venv"), lambda p, lab: f"venv{p}"),
    Field("workflow.dest", "profile", ("workflow", "dest"), lambda p, lab: f"workflows{p}"),
    # names, addresses, tags
    Field("comfyui.listen", "overlay", ("comfyui", "listen")),
    Field("comfyui.restart.systemd", "overlay", ("comfyui", "restart"), lambda p, lab: {"systemd": p}),
    Field("comfyui.restart.docker", "overlay", ("comfyui", "restart"), lambda p, lab: {"docker": p}),
    Field("comfyui.restart.command", "overlay", ("comfyui", "restart"), lambda p, lab: {"command": ["echo", p]}),
    Field("plugin.name", "profile", ("plugin", "name")),
    Field("plugin.tag", "profile", ("plugin", "tag")),
    Field("model.family", "profile", ("model", "family")),
    Field("model.variant", "profile", ("model", "variant")),
    Field("model.sha256", "profile", ("model", "sha256")),
    Field("huggingface.token_env", "profile", ("huggingface", "token_env")),
    Field("workflow.templates", "profile", ("workflow", "templates"), lambda p, lab: [p]),
    Field("workflow.sampler", "profile", ("workflow", "sampler")),
    Field("workflow.scheduler", "profile", ("workflow", "scheduler")),
    # URLs
    Field("plugin.repo", "profile", ("plugin", "repo"), also=GIT_RUNS),
    Field("plugin.repo (inside)", "profile", ("plugin", "repo"),
          lambda p, lab: f"file://{lab.world.plugin_repo}{p}", also=GIT_RUNS),
    Field("backend.sources.mirror", "profile", ("backend", "sources"),
          lambda p, lab: [{"mirror": _url(p, lab) + "{filename}"}]),
    Field("backend.sources.github", "profile", ("backend", "sources"),
          lambda p, lab: [{"github": f"https://github.com/{p}"}]),
    Field("backend.sources.huggingface", "profile", ("backend", "sources"), lambda p, lab: [{"huggingface": p}]),
    Field("pip.index_url", "profile", ("pip", "index_url"), _url, also=PIP_RUNS),
    Field("pip.extra_index_urls", "profile", ("pip", "extra_index_urls"), lambda p, lab: [_url(p, lab)], also=PIP_RUNS),
    Field("pip.find_links", "profile", ("pip", "find_links", "+"), also=PIP_RUNS),
    Field("huggingface.endpoint", "profile", ("huggingface", "endpoint"), _url),
    # versions and specifiers
    Field("backend.version", "profile", ("backend", "version"), lambda p, lab: f"1.0.1{p}"),
    Field("packages", "profile", ("packages", "+")),
    Field("packages (specifier)", "profile", ("packages", "+"), lambda p, lab: f"injection-probe>=1{p}"),
    Field("packages (marker)", "profile", ("packages", "+"), lambda p, lab: f"injection-probe>=1; os_name == '{p}'"),
    # template values and prompts
    Field("workflow.prompt", "profile", ("workflow", "prompt")),
    Field("verify.prompts", "profile", ("verify", "prompts"), lambda p, lab: [p]),
    # inventory variables and names
    Field("ansible_host", "var", ("ansible_host",)),
    Field("ansible_host (after)", "var", ("ansible_host",), lambda p, lab: f"127.0.0.1{p}"),
    Field("ansible_user", "var", ("ansible_user",)),
    Field("ansible_port", "var", ("ansible_port",)),
    Field("ansible_ssh_host", "var", ("ansible_ssh_host",)),
    Field("ansible_ssh_user", "var", ("ansible_ssh_user",)),
    Field("ansible_ssh_private_key_file", "var", ("ansible_ssh_private_key_file",)),
    Field("ansible_ssh_common_args", "var", ("ansible_ssh_common_args",)),
    Field("ansible_ssh_extra_args", "var", ("ansible_ssh_extra_args",), lambda p, lab: f"-J {p}"),
    Field("provision_jump", "var", ("provision_jump",)),
    Field("provision_container", "var", ("provision_container",)),
    Field("host name", "host-name", (), lambda p, lab: f"gpu-x{p}"),
)
