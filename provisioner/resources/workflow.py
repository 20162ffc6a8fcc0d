"""ComfyUI API-format workflows: Jinja2 templates rendered, checked, written as canonical JSON."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from provisioner.config.model import Profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Probe
from provisioner.facts.snapshots import WorkflowFile
from provisioner.resources import retention
from provisioner.resources.base import Action, Change, Note, Put, ResourcePlan, Run, changes

name = "workflow"

DEFAULT_IMAGE = "example.png"   # the input image every ComfyUI checkout ships in input/


def dest_path(profile: Profile, template_name: str) -> str:
    """Where a template's JSON goes on the host: <root>/<dest>/<name without .j2>."""
    base = template_name[:-3] if template_name.endswith(".j2") else template_name
    return posixpath.join(profile.comfyui.root, profile.workflow.dest, base)


def template_dir(profile: Profile) -> Path:
    """The template folder on the control machine; a relative one is relative to the profile file."""
    # normpath: `profiles/../templates` must work even where profiles/ is not a real folder.
    return Path(os.path.normpath(Path(profile.file).parent / profile.workflow.template_dir))


def folders(profile: Profile) -> tuple[str, ...]:
    return tuple(dict.fromkeys(posixpath.dirname(dest_path(profile, t)) for t in profile.workflow.templates))


def probe(profile: Profile) -> Probe:
    """Each workflow's text, and its folder: an upload killed halfway left a temporary sibling there."""
    return Probe(read=tuple(dest_path(profile, t) for t in profile.workflow.templates), listing=folders(profile))


def resolve_offload(profile: Profile, facts: Facts) -> tuple[str, str]:
    """The `cpu_offload` the loader gets, and why: the plugin's own `auto` rule, made explicit."""
    wanted = profile.workflow.cpu_offload
    if wanted != "auto":
        return wanted, f"cpu_offload {wanted} (set in the profile)"
    gpu = facts.gpu
    if gpu is None:
        why = facts.gpu_error or "none listed"
        return "enable", f"cpu_offload auto -> enable: no GPU found ({why})"
    limit = profile.workflow.offload_below_gb
    vram = gpu.vram_total_gb
    if vram < limit:
        return "enable", f"cpu_offload auto -> enable: {gpu.name} has {vram:.1f} GiB < {limit:g} GiB"
    return "disable", f"cpu_offload auto -> disable: {gpu.name} has {vram:.1f} GiB >= {limit:g} GiB"


def variables(profile: Profile, facts: Facts, *, prompt: str | None = None,
              seed: int | None = None, image: str | None = None) -> dict[str, Any]:
    """Every value a template may use; model files come from the catalog for this host's GPU (with
    `model.family: null` there are none, and `steps` is the profile's own or 1)."""
    from provisioner.catalog import models as catalog   # file names and step counts

    model, wf = profile.model, profile.workflow
    chosen: dict[str, Any] = {"steps": wf.steps if wf.steps is not None else 1}
    if model.family is not None:
        sel = catalog.resolve(model.family, model.variant, model.precision, facts.gpu,
                              gpu_error=facts.gpu_error, backend=profile.backend.version)
        chosen = {"model_name": sel.dit.filename, "text_encoder": sel.text_encoder.filename,
                  "vae": sel.vae.filename, "precision": sel.precision,
                  "steps": wf.steps if wf.steps is not None else sel.steps}
    return {
        **chosen,
        "cpu_offload": resolve_offload(profile, facts)[0],
        "num_blocks_on_gpu": wf.num_blocks_on_gpu,
        "use_pin_memory": "enable" if wf.use_pin_memory else "disable",
        "shift": wf.shift, "cfg": wf.cfg, "sampler": wf.sampler, "scheduler": wf.scheduler,
        "width": wf.width, "height": wf.height,
        "seed": wf.seed if seed is None else seed,
        "prompt": wf.prompt if prompt is None else prompt,
        "image": image or DEFAULT_IMAGE,
    }


def _tojson(value: object) -> str:
    # Plain JSON (no HTML escaping: autoescape is off); NaN/inf are not JSON, so they fail here.
    import jinja2

    if isinstance(value, jinja2.Undefined):
        str(value)                  # StrictUndefined raises UndefinedError naming the variable
    return json.dumps(value, ensure_ascii=False, allow_nan=False)


def render_text(folder: Path, template_name: str, values: dict[str, Any]) -> str:
    """Render one template to text. Raises PlanError naming the template on any template fault."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(folder)), autoescape=False,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["tojson"] = _tojson
    where = f"template {template_name}"
    try:
        return env.get_template(template_name).render(**values)
    except jinja2.TemplateNotFound:
        raise PlanError(f"{where} not found in {folder} (check workflow.templates and "
                        "workflow.template_dir)") from None
    except jinja2.TemplateSyntaxError as err:
        raise PlanError(f"{where}:{err.lineno}: {err.message}") from None
    except jinja2.UndefinedError as err:
        raise PlanError(f"{where}: {err.message}; it may use {', '.join(sorted(values))}") from None
    except (TypeError, ValueError) as err:
        raise PlanError(f"{where}: a value is not JSON ({err}); check the workflow settings") from None


def check_graph(graph: object, template_name: str) -> dict[str, Any]:
    """An API-format graph: node id -> {class_type, inputs}; every [id, slot] link hits a node."""
    where = f"template {template_name}"
    if not isinstance(graph, dict) or not graph:
        raise PlanError(f"{where}: must render a JSON object of nodes (node id -> node)")
    for node_id, node in graph.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str) \
                or not isinstance(node.get("inputs"), dict):
            raise PlanError(f"{where}: node {node_id} needs a class_type string and an inputs object")
        for key, value in node["inputs"].items():
            is_link = isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            if is_link and (value[0] not in graph or not isinstance(value[1], int) or value[1] < 0):
                raise PlanError(f"{where}: node {node_id} input {key} links to {value!r}, "
                                "which is not an output of a node in the graph")
    return graph


def render(profile: Profile, facts: Facts, template_name: str, *, prompt: str | None = None,
           seed: int | None = None, image: str | None = None) -> dict[str, Any]:
    """The checked API graph of one template for this host (verification passes its own prompt/seed)."""
    values = variables(profile, facts, prompt=prompt, seed=seed, image=image)
    text = render_text(template_dir(profile), template_name, values)
    try:
        graph = json.loads(text)
    except json.JSONDecodeError as err:
        raise PlanError(f"template {template_name}:{err.lineno}:{err.colno}: "
                        f"does not render valid JSON ({err.msg})") from None
    return check_graph(graph, template_name)


def canonical_text(graph: dict[str, Any]) -> str:
    """Node order kept (readable in a diff), indent 2, trailing newline: byte-stable across runs."""
    return json.dumps(graph, indent=2, ensure_ascii=False) + "\n"


def unfinished(profile: Profile, facts: Facts) -> list[Change | None]:
    """What killed uploads left in the workflow folders: an apply's, or a rollback's (it writes
    the snapshot's workflows there too, and removes these like an apply)."""
    return [retention.cleanup(name, folder, retention.temps(facts.listings.get(folder)), "what killed uploads left")
            for folder in folders(profile)]


def plan(profile: Profile, facts: Facts) -> ResourcePlan:
    found: list[Change | None] = []
    for template in dict.fromkeys(profile.workflow.templates):
        dest = dest_path(profile, template)
        text = canonical_text(render(profile, facts, template))
        current = facts.contents.get(dest)
        if current == text:
            found.append(None)
            continue
        put = Put(dest, text.encode(), 0o644, what=f"write {dest}")
        verb: Action = "update" if current is not None else "create"
        found.append(Change("workflow", dest, verb, f"{verb} {dest} from {template}",
                            current, text, (put,)))   # no restart: ComfyUI reads workflows per request
    found.extend(unfinished(profile, facts))
    notes: list[Note] = []
    value, why = resolve_offload(profile, facts)
    if value == "enable" and profile.workflow.cpu_offload == "auto":   # slower: say why
        notes.append(Note("workflow", why, "warning" if facts.gpu is None else "info"))
    return changes(*found, notes=notes)


# --- a snapshot's workflow folders (a rollback) ----------------------------------------------------

def _text(f: WorkflowFile | None) -> str | None:
    return None if f is None else f.text


def restore(want: Mapping[str, Mapping[str, WorkflowFile] | None],
               have: Mapping[str, Mapping[str, WorkflowFile] | None], notes: list[Note]) -> list[Change]:
    """Each workflow folder the snapshot recorded back to its files: changed ones rewritten, added
    ones removed (a folder it recorded as absent goes too). Folders it did not record stay."""
    found: list[Change] = []
    for where, files in sorted(want.items()):
        now = have.get(where) or {}
        for file in sorted(set(files or {}) | set(now)):
            path = posixpath.join(where, file)
            old, new = now.get(file), (files or {}).get(file)
            if old == new:
                continue
            if new is None:
                found.append(Change("workflow", path, "remove", f"remove {path} (not in the snapshot)",
                                    _text(old) or "", None, (Run(("rm", "-f", path), what=f"remove {path}"),)))
            elif new.text is None:
                notes.append(Note(name, f"{path} differs from the snapshot, which recorded only its sha256 "
                                        f"({new.size} bytes, not text): it is left as it is"))
            else:
                found.append(Change("workflow", path, "update" if old else "create",
                                    f"{'restore' if old else 'create'} {path} as in the snapshot",
                                    _text(old), new.text, (Put(path, new.text.encode(), what=f"write {path}"),)))
        if files is None and have.get(where) is not None:
            found.append(Change("workflow", where, "remove", f"remove the folder {where} (not in the snapshot)",
                                None, None, (Run(("sh", "-c", 'rmdir "$1" 2>/dev/null || true', "sh", where),
                                                 what=f"remove {where} if empty"),)))
    return found
