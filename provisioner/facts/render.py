"""`provision facts` on a terminal: one rich table per host, then the hosts that could not be read."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping

from rich.console import Console
from rich.table import Table
from rich.text import Text

from provisioner.facts.model import Facts, GitCheckout, NodePack
from provisioner.facts.parse import describe_nunchaku

_GIB = 1 << 30


def _venv(facts: Facts) -> str:
    env = facts.env
    if not env.exists:
        return f"missing ({env.python})"
    if env.error:
        return f"broken ({env.python}): {env.error}"
    return f"{env.version} {env.tag} {env.platform} ({env.python})"


def _torch(facts: Facts) -> str:
    env = facts.env
    if not env.torch:
        return "not installed"
    return f"{env.torch} (CUDA {env.torch_cuda})" if env.torch_cuda else f"{env.torch} (no CUDA)"


def _gpus(facts: Facts) -> str:
    if not facts.gpus:
        return f"none: {facts.gpu_error}"
    mark = facts.gpu if len(facts.gpus) > 1 else None          # which one is ComfyUI's, when it matters
    return "\n".join(
        f"{g.index}: {g.name}, {g.vram_total_mib / 1024:.1f} GiB total, "
        f"{g.vram_free_mib / 1024:.1f} GiB free, compute {g.compute_capability[0]}.{g.compute_capability[1]}"
        + (" (ComfyUI's)" if g is mark else "")
        for g in facts.gpus
    )


def _comfyui(facts: Facts) -> str:
    version = facts.comfyui_version or "version unknown"
    stats = [status for url, status in facts.http.items() if url.endswith("/system_stats")]
    if not stats:
        return version
    status = stats[0]
    answer = "not answering" if status is None else f"answers HTTP {status}"
    return f"{version}, {answer}"


def _checkout(c: GitCheckout) -> str:
    if not c.exists:
        return "missing"
    if not c.is_repo:
        return f"not a git checkout ({c.error})" if c.error else "not a git checkout"
    at = ", ".join(c.tags) or c.branch or "detached"
    state = f"{len(c.dirty)} modified" if c.dirty else "clean"
    return f"{at} @ {(c.head or 'no commit')[:10]}, {state}"


def _login(facts: Facts) -> str:
    """`admin (uid 1000), becomes root; ComfyUI's root is comfy's, worked in as comfy (sudo)`: who
    provision is there."""
    login = facts.login
    if login.user is None:
        return "-"
    can = (f", becomes {login.become}" if login.become else f", cannot become ({login.become_error})"
           if login.become_error else "")
    owner = f"; ComfyUI's root is {login.root_owner}'s" if login.root_owner else "; no ComfyUI root yet"
    works = (f", worked in as {login.works_as} (sudo)" if login.works_as else
             f", which it cannot become ({login.works_as_error})" if login.works_as_error else "")
    return f"{login.user} (uid {login.uid}){can}{owner}{works}"


def _node_pack(p: NodePack) -> str:
    said = [f"origin {p.origin}" if p.origin else "no git", f"pyproject {p.project}" if p.project else "",
            "Comfy Registry" if p.registry else ""]
    return f"{p.name}{'' if p.enabled else ' (disabled)'}: {', '.join(x for x in said if x)}"


def host_table(facts: Facts) -> Table:
    """The facts of one host as a two-column table."""
    env = facts.env
    rows = [
        ("OS", f"{facts.os} (kernel {facts.kernel})"),
        ("arch", facts.arch),
        ("system python", facts.system_python),
        ("login", _login(facts)),
        ("venv python", _venv(facts)),
        ("torch", _torch(facts)),
        ("GPUs", _gpus(facts)),
        ("driver", facts.gpu.driver if facts.gpu else "-"),
        ("nvcc", facts.nvcc or "not found"),
        ("disk free", f"{facts.disk_free / _GIB:.1f} GiB at {facts.disk_path}"),
        ("ComfyUI", _comfyui(facts)),
        ("nunchaku", describe_nunchaku(env) if env.exists else "-"),
        ("diffusers", env.version_of("diffusers") or "not installed"),
        ("peft", env.version_of("peft") or "not installed"),
    ]
    # Checkouts by folder name (ComfyUI, ComfyUI-nunchaku): full paths would swamp the table.
    rows += [(f"checkout {posixpath.basename(path.rstrip('/')) or path}", _checkout(c))
             for path, c in sorted(facts.git.items())]
    # Every node pack, disabled ones too: a second copy of the plugin shows here by its origin or name.
    rows += [(f"custom nodes {posixpath.basename(folder)}/", "\n".join(map(_node_pack, packs)) or "none")
             for folder, packs in sorted(facts.node_packs.items()) if packs is not None]
    rows += [("script error", e) for e in facts.errors]
    rows.append(("facts took", f"{facts.elapsed_s:.2f} s on the host"))
    table = Table(title=facts.host, show_header=False, title_justify="left")
    table.add_column("fact", style="bold")
    table.add_column("value")
    for key, value in rows:
        table.add_row(Text(key), Text(value))   # Text: `[N/A]` is data, not rich markup
    return table


def render_facts(facts_by_host: Mapping[str, Facts | Exception], console: Console) -> None:
    """Print a table per reachable host, then each unreachable host with its reason."""
    failed = {h: v for h, v in facts_by_host.items() if isinstance(v, Exception)}
    for host, facts in facts_by_host.items():
        if not isinstance(facts, Exception):
            console.print(host_table(facts))
    if failed:
        table = Table(title="unreachable", title_justify="left", show_header=True)
        table.add_column("host", style="bold red")
        table.add_column("reason")
        for host, err in failed.items():
            table.add_row(Text(host), Text(str(err) or type(err).__name__))
        console.print(table)
