"""The package's imports run one way: each layer imports only itself and the layers below it, as
docs/architecture.md draws them, and no module imports another that imports it back."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "provisioner"


def layer_order() -> list[list[str]]:
    """The fenced block after "## Layers" in docs/architecture.md: one line per layer, bottom first."""
    text = (REPO / "docs" / "architecture.md").read_text()
    block = re.search(r"## Layers\n.*?```\n(.*?)```", text, re.S)
    assert block, "docs/architecture.md has no `## Layers` section with a fenced block"
    return [line.split("#")[0].split() for line in block.group(1).splitlines() if line.split("#")[0].strip()]


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(REPO).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Every provisioner module `name` imports, at any depth of the file (function-level too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` names the module; `from pkg import name` the package itself.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("provisioner") and target != name:
                found.add(target)
    return found


def layer_of(module: str, order: list[list[str]]) -> int:
    parts = module.split(".")
    part = parts[1] if len(parts) > 1 else "__init__"
    for index, names in enumerate(order):
        if part in names:
            return index
    raise AssertionError(f"{module}: its folder {part!r} is in no layer of docs/architecture.md")


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports(path, name, set(found)) for name, path in found.items()}


def test_every_import_points_down_or_sideways() -> None:
    order = layer_of_names = layer_order()
    upward = [f"{src} (layer {' '.join(layer_of_names[layer_of(src, order)])}) imports {dst} "
              f"(layer {' '.join(layer_of_names[layer_of(dst, order)])})"
              for src, targets in sorted(graph().items()) for dst in sorted(targets)
              if layer_of(dst, order) > layer_of(src, order)]
    assert upward == []


def test_no_import_cycle() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:            # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert cycles == []


def test_an_apply_imports_nothing_that_only_verify_or_a_release_server_needs() -> None:
    """What a plan or an apply imports is paid by every run, a no-op included: Pillow and numpy
    (pictures: verify and the report), urllib.request (a release server) and huggingface_hub (the
    Hub, asked only when its record is stale) stay out until a run needs them. In a process of its
    own: this one has them all."""
    import subprocess
    import sys

    heavy = ("PIL", "numpy", "urllib.request", "huggingface_hub")
    code = ("import sys, provisioner.cli, provisioner.commands, provisioner.plan.rollout, provisioner.connection.ssh\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out == "[]\n"
