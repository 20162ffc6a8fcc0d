"""workflow resource: YAML cases (profile + GPU + host files in, change out), template faults, and
the rendered graphs checked against the real ComfyUI object_info and the upstream example graphs."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioner.config.model import Profile, build_profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Gpu, Probe, PythonEnv
from provisioner.resources import workflow
from provisioner.resources.base import Put, Run

REPO = Path(__file__).resolve().parents[1]
REAL = REPO / "provisioner" / "sandbox" / "captures" / "comfyui-0.3.64"
UPSTREAM = REPO / "tests" / "fixtures" / "comfyui-nunchaku-v1.1.0" / "example_workflows"
CASES = sorted((Path(__file__).parent / "resources" / "workflow").glob("*.yaml"))
TEMPLATES = ("qwen-image-edit-lightning.json.j2", "qwen-image-lightning.json.j2")
RTX3090 = Gpu(0, "NVIDIA GeForce RTX 3090", 24576, 23000, 1576, (8, 6), "550.54")


def make_profile(fragment: dict[str, Any], file: Path = REPO / "profiles" / "t.yaml") -> Profile:
    """The default template_dir (../templates, relative to the profile file) is the repo's."""
    return build_profile({"comfyui": {"root": "/srv/ComfyUI"}, **fragment}, name="t", file=str(file))


def make_facts(gpu: Gpu | None = RTX3090, contents: dict[str, str | None] | None = None) -> Facts:
    return Facts(host="h", os="Ubuntu 24.04", arch="x86_64", kernel="6.8", system_python="3.12",
                 env=PythonEnv("/srv/ComfyUI/venv/bin/python", True), gpus=(gpu,) if gpu else (),
                 gpu_error=None if gpu else "nvidia-smi: not found", nvcc=None, disk_path="/srv",
                 disk_free=10**12, comfyui_version="0.3.64", contents=contents or {})


def step_view(step: object) -> object:
    if isinstance(step, Run):
        return list(step.argv)
    assert isinstance(step, Put)
    return {"put": step.dest}


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_case(case: Path) -> None:
    data = yaml.safe_load(case.read_text())
    profile = make_profile(data["profile"])
    g = data["gpu"]
    gpu = Gpu(0, g["name"], g["vram_total_mib"], g["vram_total_mib"], 0, tuple(g["cc"]), "570.1") \
        if g else None
    contents: dict[str, str | None] = {}
    for path, have in (data.get("existing") or {}).items():
        template = Path(path).name + ".j2"
        if have == "@rendered" or isinstance(have, dict):
            seed = have.get("seed") if isinstance(have, dict) else None
            graph = workflow.render(profile, make_facts(gpu), template, seed=seed)
            have = workflow.canonical_text(graph)
        contents[path] = have
    facts = make_facts(gpu, contents)
    if "error" in data:
        with pytest.raises(PlanError) as err:
            workflow.plan(profile, facts)
        assert data["error"] in str(err.value) and "\n" not in str(err.value)
        return

    result = workflow.plan(profile, facts)
    assert len(result.changes) == len(data["expect"])
    for change, want in zip(result.changes, data["expect"]):
        assert change.resource == "workflow" and change.notify == frozenset()  # read per request
        assert change.before == contents.get(change.key)
        put = change.steps[-1]
        assert isinstance(put, Put) and put.dest == change.key
        assert put.content.decode() == change.after              # the diff shows what is written
        view = {"key": change.key, "action": change.action, "summary": change.summary,
                "steps": [step_view(s) for s in change.steps]}
        for field, value in want.items():
            if field == "before_has":
                assert value in str(change.before)
            elif field == "after_has":
                assert value in str(change.after)
            else:
                assert view[field] == value, field
    for template, nodes in (data.get("graph") or {}).items():
        graph = workflow.render(profile, facts, template)
        for node_id, inputs in nodes.items():
            node = graph[node_id]
            for key, value in inputs.items():
                assert (node["class_type"] if key == "class_type" else node["inputs"][key]) == value, \
                    f"{template} node {node_id} {key}"
    if "notes" in data:
        assert [n.message for n in result.notes] == data["notes"]


def test_probe_reads_each_destination() -> None:
    profile = make_profile({"workflow": {"templates": list(TEMPLATES)}})
    assert workflow.probe(profile) == Probe(read=(
        "/srv/ComfyUI/workflows/qwen-image-edit-lightning.json",
        "/srv/ComfyUI/workflows/qwen-image-lightning.json"), listing=("/srv/ComfyUI/workflows",))


def test_canonical_text_keeps_node_order_and_ends_with_newline() -> None:
    text = workflow.canonical_text(workflow.render(make_profile({}), make_facts(), TEMPLATES[0]))
    assert text.endswith("}\n") and text.startswith('{\n  "3": {\n    "class_type"')
    assert list(json.loads(text)) == ["3", "4", "15", "5", "6", "13", "14", "7", "8", "10", "9",
                                      "11", "12"]


HOSTILE = 'fox"}, "99": {"class_type": "Evil", "inputs": {}}, "x": {"\n{{ seed }} </script> \\ \u00e9'


@pytest.mark.parametrize("template", TEMPLATES)
def test_hostile_prompt_stays_one_string(template: str) -> None:
    profile = make_profile({"workflow": {"prompt": HOSTILE, "templates": [template]}})
    (change,) = workflow.plan(profile, make_facts()).changes
    graph = json.loads(change.after)
    assert "99" not in graph and "x" not in graph
    positive = graph["7"]["inputs"]
    assert positive.get("text", positive.get("prompt")) == HOSTILE


def test_render_takes_verifications_own_prompt_seed_and_image() -> None:
    profile, facts = make_profile({}), make_facts()
    base = workflow.render(profile, facts, TEMPLATES[0])
    mine = workflow.render(profile, facts, TEMPLATES[0], prompt="a cat", seed=9, image="upload.png")
    assert mine["7"]["inputs"]["prompt"] == "a cat" and mine["9"]["inputs"]["seed"] == 9
    assert mine["13"]["inputs"]["image"] == "upload.png"
    assert base["9"]["inputs"]["seed"] == 42 and base["13"]["inputs"]["image"] == "example.png"
    for node in set(base) - {"7", "9", "13"}:
        assert base[node] == mine[node]


def test_nan_is_not_json() -> None:
    profile = make_profile({"workflow": {"cfg": float("nan")}})
    with pytest.raises(PlanError, match="a value is not JSON"):
        workflow.plan(profile, make_facts())


BROKEN = {
    "syntax.json.j2": ('{"1": {{ seed }', "template syntax.json.j2:1: "),
    "undefined.json.j2": ('{"1": {{ sed | tojson }}}', "template undefined.json.j2: 'sed' is undefined"),
    "notjson.json.j2": ('{"1": {"class_type": "SaveImage",}}', "template notjson.json.j2:1:"),
    "list.json.j2": ("[]", "template list.json.j2: must render a JSON object of nodes"),
    "noclass.json.j2": ('{"1": {"inputs": {}}}', "template noclass.json.j2: node 1 needs a class_type"),
    "dangling.json.j2": ('{"1": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0]}}}',
                         "template dangling.json.j2: node 1 input samples links to ['7', 0]"),
    "badslot.json.j2": ('{"1": {"class_type": "A", "inputs": {}}, '
                        '"2": {"class_type": "B", "inputs": {"x": ["1", -1]}}}',
                        "template badslot.json.j2: node 2 input x links to ['1', -1]"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_templates_are_one_line_plan_errors(tmp_path: Path, name: str) -> None:
    text, message = BROKEN[name]
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / name).write_text(text)     # no profiles/ folder: the path is normalised
    profile = make_profile({"workflow": {"templates": [name]}}, file=tmp_path / "profiles" / "p.yaml")
    with pytest.raises(PlanError) as err:
        workflow.plan(profile, make_facts())
    assert message in str(err.value) and "\n" not in str(err.value)


# --- the graphs against the real ComfyUI and the upstream examples ---------------------------

def real_object_info() -> dict[str, Any]:
    """ComfyUI 0.3.64's own /object_info (all core nodes); loader lists as captured with the text
    encoder and VAE files present, LoadImage as a stock install (input/example.png); the DiT
    loader's inputs as plugin v1.1.0 declares them (the capture's README: it registers only when
    the backend imports, so no capture lists it)."""
    with gzip.open(REAL / "extra" / "object_info.full.json.gz", "rt") as fh:
        info = json.load(fh)
    placeholders = REAL / "extra" / "object_info.trimmed.with-placeholder-models.json"
    with_files = json.loads(placeholders.read_text())
    info.update(CLIPLoader=with_files["CLIPLoader"], VAELoader=with_files["VAELoader"],
                LoadImage=json.loads((REAL / "object_info.trimmed.json").read_text())["LoadImage"])
    readme = (REAL / "README.md").read_text()
    for name in ("model_name", "cpu_offload", "num_blocks_on_gpu", "use_pin_memory"):
        assert f"`{name}`" in readme
    info["NunchakuQwenImageDiTLoader"] = {
        "input": {"required": {"model_name": [[]], "cpu_offload": [["auto", "enable", "disable"]]},
                  "optional": {"num_blocks_on_gpu": ["INT", {"min": 1, "max": 60}],
                               "use_pin_memory": [["enable", "disable"]]}},
        "output": ["MODEL"]}
    return info


@pytest.mark.parametrize("template", TEMPLATES)
def test_graph_matches_real_node_definitions(template: str) -> None:
    info = real_object_info()
    graph = workflow.render(make_profile({}), make_facts(), template)
    for node_id, node in graph.items():
        spec = info[node["class_type"]]
        required = spec["input"].get("required", {})
        known = {**required, **spec["input"].get("optional", {})}
        assert set(required) <= set(node["inputs"]) <= set(known), node_id
        for key, value in node["inputs"].items():
            kind = known[key][0]
            if isinstance(value, list):                       # a link: the types must agree
                source = info[graph[value[0]]["class_type"]]["output"]
                assert source[value[1]] == kind, f"{node_id}.{key}"
            elif isinstance(kind, list) and kind:             # a combo with real options
                assert value in kind, f"{node_id}.{key}={value!r}"
            elif kind == "COMBO":
                assert value in known[key][1]["options"], f"{node_id}.{key}={value!r}"
            elif kind in ("INT", "FLOAT"):
                limits = known[key][1] if len(known[key]) > 1 else {}
                assert limits.get("min", value) <= value <= limits.get("max", value), f"{node_id}.{key}"


def upstream_edges(ui_file: str) -> Counter[tuple[str, str, str]]:
    """(source class, target class, target input) of every link of an upstream UI-format graph."""
    data = json.loads((UPSTREAM / ui_file).read_text())
    nodes = {n["id"]: n for n in data["nodes"]}
    edges: Counter[tuple[str, str, str]] = Counter()
    for _, src, _, dst, slot, _ in data["links"]:
        edges[(nodes[src]["type"], nodes[dst]["type"], nodes[dst]["inputs"][slot]["name"])] += 1
    return edges


def our_edges(graph: dict[str, Any]) -> Counter[tuple[str, str, str]]:
    return Counter((graph[v[0]]["class_type"], n["class_type"], k)
                   for n in graph.values() for k, v in n["inputs"].items() if isinstance(v, list))


def test_text_to_image_graph_is_upstreams() -> None:
    graph = workflow.render(make_profile({}), make_facts(), "qwen-image-lightning.json.j2")
    assert our_edges(graph) == upstream_edges("nunchaku-qwen-image.json")


def test_edit_graph_is_upstreams_with_one_input_image() -> None:
    graph = workflow.render(make_profile({}), make_facts(), "qwen-image-edit-lightning.json.j2")
    upstream = upstream_edges("nunchaku-qwen-image-edit-2509-lightning.json")
    # Upstream feeds two more LoadImage nodes into image2/image3; one image is the verified case.
    one_image = Counter({e: c for e, c in upstream.items() if e[2] not in ("image2", "image3")})
    assert our_edges(graph) == one_image
