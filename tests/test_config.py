"""Profiles: shipped files, the broken corpus, extends merging, path resolution, overlays, schemas."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jsonschema
import pytest

from provisioner.config import load_profile, profile_for_host, schema_text, validate_files
from provisioner.config import model
from provisioner.config.marks import Mark, read_yaml
from provisioner.config.schema import schema
from provisioner.errors import ConfigError, UsageError
from provisioner.config.inventory import Host, load_inventory

ROOT = Path(__file__).resolve().parents[1]
BROKEN = ROOT / "tests" / "broken"
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
EXPECTED = json.loads((BROKEN / "expected.json").read_text(encoding="utf-8"))


def shown(problems: list) -> list[str]:
    return [str(p).replace(str(BROKEN), "broken").replace(str(ROOT), "<repo>") for p in problems]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- shipped files ----------------------------------------------------------------------------

def test_shipped_profiles_and_inventories_validate() -> None:
    assert len(PROFILES) >= 5
    files = PROFILES + sorted((ROOT / "inventories").glob("*.yaml"))
    assert validate_files(files) == []


def test_base_profile_is_the_seed() -> None:
    p = load_profile(ROOT / "profiles" / "base.yaml").profile
    assert (p.plugin.repo, p.plugin.tag) == ("https://github.com/nunchaku-ai/ComfyUI-nunchaku.git", "v1.1.0")
    assert p.backend.version == "1.0.1"
    assert p.backend.sources == (model.WheelSource("github", "https://github.com/nunchaku-tech/nunchaku"),)
    assert p.packages[:2] == ("diffusers>=0.35", "peft>=0.17")  # + the plugin's transformers/accelerate
    assert (p.model.family, p.model.variant) == ("qwen-image-edit-2509", "lightning-4step-r128")
    w = p.workflow
    # steps unset: the variant's own (4 for lightning-4step-r128)
    assert (w.cpu_offload, w.shift, w.steps, w.sampler, w.scheduler, w.cfg) == ("auto", 1.0, None, "euler", "beta", 1.0)
    assert (p.comfyui.root, p.comfyui.venv) == ("/opt/ComfyUI", "/opt/ComfyUI/venv")
    assert p.comfyui.restart == model.RestartSpec(docker="comfyui-qwen")
    assert Path(w.template_dir) == ROOT / "templates"
    assert p.inventory == str(ROOT / "inventories" / "fleet.yaml")


def test_gpu_profiles_extend_base() -> None:
    rtx3090 = load_profile(ROOT / "profiles" / "rtx3090.yaml")
    assert rtx3090.name == "rtx3090" and rtx3090.hosts == "rtx3090"
    assert rtx3090.chain[1].endswith("base.yaml")
    t = rtx3090.profile.verify.thresholds
    assert (t.warm_seconds, t.vram_gib, t.cold_seconds) == (6, 9, 150)
    assert rtx3090.profile.plugin.tag == "v1.1.0"          # inherited
    assert load_profile(ROOT / "profiles" / "rtx5090.yaml").profile.model.precision == "fp4"
    hosts = load_inventory(rtx3090.inventory).select(rtx3090.hosts)
    assert [h.name for h in hosts] == [f"gpu-0{i}.example.internal" for i in (1, 2, 3)]


# --- the broken corpus ------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_broken_file(name: str) -> None:
    case = EXPECTED[name]
    assert shown(validate_files([BROKEN / name])) == case["problems"]


def test_corpus_is_large_and_every_file_is_covered() -> None:
    files = {p.name for p in BROKEN.glob("*.yaml")}
    assert len(files) >= 15 and files == set(EXPECTED)
    assert all(case["problems"] for case in EXPECTED.values())


def test_whole_corpus_at_once_reports_every_file() -> None:
    problems = validate_files(sorted(BROKEN.glob("*.yaml")))
    files = {Path(p.file).name for p in problems}
    assert {"empty.yaml", "binary.yaml", "latin1.yaml", "wrong-type.yaml", "broken.yaml"} <= files


def test_directory_missing_and_unreadable_files(tmp_path: Path) -> None:
    (tmp_path / "dir.yaml").mkdir()
    locked = write(tmp_path / "locked.yaml", "comfyui: {root: /opt/ComfyUI}\n")
    locked.chmod(0)
    got = [str(p) for p in validate_files([tmp_path / "dir.yaml", tmp_path / "nope.yaml", locked])]
    assert got[:2] == [f"{tmp_path}/dir.yaml: is a directory, not a YAML file", f"{tmp_path}/nope.yaml: no such file"]
    if os.geteuid() != 0:  # root reads any file, so only an ordinary user can see this one
        assert got[2] == f"{locked}: cannot be read: permission denied"


def test_load_profile_raises_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as err:
        load_profile(BROKEN / "hostile-path.yaml")
    assert [p.key for p in err.value.problems] == ["comfyui.root", "workflow.dest", "plugin.name"]
    assert all(p.line and p.col for p in err.value.problems)


def test_comment_only_file_is_empty(tmp_path: Path) -> None:
    f = write(tmp_path / "c.yaml", "# nothing yet\n")
    assert [p.message for p in validate_files([f])] == ["empty file"]


# --- extends and paths ------------------------------------------------------------------------

def test_extends_chain_merges_child_over_parent(tmp_path: Path) -> None:
    write(tmp_path / "shared" / "root.yaml", """\
comfyui: {root: /opt/ComfyUI, port: 8188, restart: {docker: comfyui-qwen}}
packages: [diffusers>=0.35, peft>=0.17, accelerate>=1.10]
workflow: {template_dir: ../tpl, templates: [a.json.j2], steps: 4}
inventory: inv.yaml
""")
    write(tmp_path / "shared" / "inv.yaml", "all: {hosts: {gpu-01: }}\n")
    write(tmp_path / "tpl" / "a.json.j2", "{}")
    write(tmp_path / "mid.yaml", "extends: shared/root.yaml\ncomfyui:\n  port: 8190\nplugin: {force: true}\n")
    leaf = write(tmp_path / "leaf.yaml", "extends: mid.yaml\npackages:\n  - peft>=0.17\nworkflow:\n  steps: 8\n")
    loaded = load_profile(leaf)
    d = loaded.data
    assert d["comfyui"] == {"root": "/opt/ComfyUI", "port": 8190, "restart": {"docker": "comfyui-qwen"}}
    assert d["packages"] == ["peft>=0.17"]                               # lists replace
    assert d["workflow"]["steps"] == 8 and d["workflow"]["templates"] == ["a.json.j2"]
    assert d["workflow"]["template_dir"] == str(tmp_path / "tpl")        # relative to root.yaml
    assert d["inventory"] == str(tmp_path / "shared" / "inv.yaml")
    assert "extends" not in d and loaded.profile.plugin.force is True
    assert loaded.chain == (str(leaf), str(tmp_path / "mid.yaml"), str(tmp_path / "shared" / "root.yaml"))
    assert loaded.marks[("comfyui", "port")] == Mark(str(tmp_path / "mid.yaml"), 3, 3)
    assert loaded.marks[("comfyui", "root")].file == str(tmp_path / "shared" / "root.yaml")
    assert loaded.marks[("packages", 0)] == Mark(str(leaf), 3, 5)
    assert ("packages", 2) not in loaded.marks


def test_default_template_dir_and_wheelhouse_resolve_against_their_file(tmp_path: Path) -> None:
    write(tmp_path / "templates" / "qwen-image-edit-lightning.json.j2", "{}")
    (tmp_path / "profiles" / "wheels").mkdir(parents=True)
    f = write(tmp_path / "profiles" / "p.yaml", """\
comfyui: {root: /srv/comfy, venv: /srv/venvs/comfy}
backend: {sources: [{wheelhouse: wheels}, github, {huggingface: nunchaku-tech/nunchaku}]}
""")
    p = load_profile(f).profile
    assert p.workflow.template_dir == str(tmp_path / "templates")
    assert p.backend.sources[0] == model.WheelSource("wheelhouse", str(tmp_path / "profiles" / "wheels"))
    assert p.backend.sources[1].kind == "github" and p.comfyui.venv == "/srv/venvs/comfy"


def test_problem_in_parent_is_located_in_parent(tmp_path: Path) -> None:
    write(tmp_path / "base.yaml", "comfyui:\n  root: /opt/ComfyUI\n  port: high\n")
    f = write(tmp_path / "child.yaml", "extends: base.yaml\nworkflow: {template_dir: " + str(ROOT / "templates") + "}\n")
    assert [str(p) for p in validate_files([f])] == [
        f"{tmp_path}/base.yaml:3:3: comfyui.port: expected an integer, got a string"]


# --- host overlays ----------------------------------------------------------------------------

def test_host_overlay_merges_and_keeps_the_rest(tmp_path: Path) -> None:
    inv = write(tmp_path / "inv.yaml", """\
all:
  vars:
    provision: {comfyui: {port: 8190}}
  hosts:
    box:
      provision:
        comfyui: {root: /srv/ComfyUI, restart: {systemd: comfyui.service}}
        workflow: {cpu_offload: enable}
""")
    loaded = load_profile(ROOT / "profiles" / "rtx3090.yaml")
    host = load_inventory(inv).host("box")
    p = profile_for_host(loaded, host)
    assert (p.comfyui.root, p.comfyui.venv, p.comfyui.port) == ("/srv/ComfyUI", "/srv/ComfyUI/venv", 8190)
    assert p.workflow.cpu_offload == "enable" and p.verify.thresholds.warm_seconds == 6
    assert p.name == "rtx3090"
    # restart replaces instead of merging: docker from the profile plus systemd would be two modes
    assert p.comfyui.restart == model.RestartSpec(systemd="comfyui.service")


def test_host_overlay_problems_name_inventory_and_host(tmp_path: Path) -> None:
    inv = write(tmp_path / "inv.yaml", "all:\n  hosts:\n    box:\n      provision:\n        plugin: {tag: main}\n"
                "        extends: x.yaml\n")
    loaded = load_profile(ROOT / "profiles" / "base.yaml")
    with pytest.raises(ConfigError) as err:
        profile_for_host(loaded, load_inventory(inv).host("box"))
    assert str(err.value) == (f"{inv}:6:9: provision.extends: host box: extends is not allowed in a host "
                              "overlay (put the keys themselves under provision:)")
    write(inv, "all:\n  hosts:\n    box:\n      provision:\n        plugin: {tag: main}\n")
    with pytest.raises(ConfigError) as err:
        profile_for_host(loaded, load_inventory(inv).host("box"))
    assert str(err.value) == (f"{inv}:5:18: provision.plugin.tag: host box: 'main' is not valid "
                              "(expected a release tag like v1.1.0)")


def test_host_without_overlay_gets_the_profile_itself() -> None:
    loaded = load_profile(ROOT / "profiles" / "base.yaml")
    assert profile_for_host(loaded, Host("plain")) is loaded.profile


# --- schemas ----------------------------------------------------------------------------------

def test_schema_text_is_valid_draft_2020_12() -> None:
    for kind in ("profile", "inventory", "lock"):
        jsonschema.Draft202012Validator.check_schema(json.loads(schema_text(kind)))
    with pytest.raises(UsageError, match="profile, inventory"):
        schema_text("playbook")


def _properties(node: dict, path: str = ""):
    for key, sub in node.get("properties", {}).items():
        yield f"{path}{key}", sub
        yield from _properties(sub, f"{path}{key}.")


def test_every_profile_key_is_documented_and_closed() -> None:
    s = schema("profile")
    for path, sub in _properties(s):
        assert sub.get("description"), f"{path} has no description"
        if sub.get("type") == "object" or "object" in sub.get("type", []):
            assert sub.get("additionalProperties") is False, path


SECTIONS = {"comfyui": model.ComfySpec, "comfyui.restart": model.RestartSpec, "comfyui.torch": model.TorchSpec,
            "plugin": model.PluginSpec,
            "backend": model.BackendSpec, "pip": model.PipSpec, "model": model.ModelSpec,
            "huggingface": model.HubSpec, "workflow": model.WorkflowSpec, "verify": model.VerifySpec,
            "verify.thresholds": model.Thresholds, "verify.agreement": model.AgreementSpec,
            "verify.class_speed": model.ClassSpeedSpec, "snapshots": model.SnapshotSpec,
            "rollout": model.RolloutSpec}


def _plain(value: object) -> object:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, model.WheelSource):
        return {value.kind: value.value}
    return value


def test_schema_keys_and_defaults_equal_the_model() -> None:
    props = dict(_properties(schema("profile")))
    top = {f.name for f in dataclasses.fields(model.Profile)} - {"name", "file", "raw", "lock"}   # lock: read beside the profile
    assert set(schema("profile")["properties"]) == top | {"extends"}
    assert props["packages"]["default"] == list(model.Profile.packages)
    assert props["hosts"]["default"] == "all" and props["inventory"]["default"] is None
    for section, cls in SECTIONS.items():
        keys = {p.split(".")[-1] for p in props if p.startswith(section + ".") and p.count(".") == section.count(".") + 1}
        keys -= {old[-1] for old in model.OLD_NAMES if ".".join(old[:-1]) == section}   # read into the new
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert keys == set(fields), section
        if section == "comfyui.restart":
            continue               # exactly one mode is given: its keys have no defaults
        for name, f in fields.items():
            if isinstance(f.default, (model.RestartSpec, model.Thresholds, model.AgreementSpec,
                                      model.ClassSpeedSpec)) or name in ("restart", "torch"):
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            if name == "venv":
                default = "venv"   # build_profile's default, joined to root
            if f.default is dataclasses.MISSING and name in ("root", "version"):
                continue           # required (comfyui.root, comfyui.torch.version)
            assert props[f"{section}.{name}"]["default"] == _plain(default), f"{section}.{name}"


def test_read_yaml_marks_merge_keys_and_aliases(tmp_path: Path) -> None:
    f = write(tmp_path / "a.yaml", "base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  y: 3\nl: [*b]\n")
    doc = read_yaml(str(f))
    assert doc.data == {"base": {"x": 1, "y": 2}, "m": {"x": 1, "y": 3}, "l": [{"x": 1, "y": 2}]}
    assert doc.marks[("m", "y")] == Mark(str(f), 4, 3)
    assert doc.marks[("l", 0)] == Mark(str(f), 1, 7)   # an alias is the anchored node: marked there
    write(f, "a: &a [*a]\n")
    with pytest.raises(ConfigError, match="recursive alias"):
        read_yaml(str(f))


def test_bom_and_crlf_are_fine_and_no_inventory_means_no_host_checks(tmp_path: Path) -> None:
    f = tmp_path / "win.yaml"
    f.write_bytes(b"\xef\xbb\xbfcomfyui:\r\n  root: /opt/ComfyUI\r\nhosts: rtx3090:!gpu-07\r\nworkflow:\r\n"
                  b"  template_dir: " + str(ROOT / "templates").encode() + b"\r\n")
    assert validate_files([f]) == []
    assert load_profile(f).marks[("hosts",)] == Mark(str(f), 3, 1)


def test_old_vram_gb_is_read_as_vram_gib_and_the_new_keys_have_their_defaults(tmp_path: Path) -> None:
    tpl = f"workflow: {{template_dir: {ROOT / 'templates'}}}\n"
    f = write(tmp_path / "old.yaml", tpl + "comfyui: {root: /opt/ComfyUI, gpu: GPU-5b1c0e2a-3f4d}\n"
              "verify: {thresholds: {vram_gb: 9.5}, required_nodes: [NunchakuTextEncoderLoaderV2]}\n")
    p = load_profile(f).profile
    assert p.verify.thresholds.vram_gib == 9.5
    assert p.verify.required_nodes == ("NunchakuTextEncoderLoaderV2",)
    assert (p.comfyui.gpu, p.comfyui.ready_timeout_s, p.comfyui.log_file) == ("GPU-5b1c0e2a-3f4d", 300.0, None)
    write(f, tpl + "comfyui: {root: /opt/ComfyUI, gpu: 1}\n")
    assert load_profile(f).profile.comfyui.gpu == 1


# --- hostile and malformed values (issue 13) ---------------------------------------------------

def valid_with(tmp_path: Path, body: str) -> list[str]:
    """Problems of the corpus' valid parent with `body` over it."""
    f = write(tmp_path / "p.yaml", f"extends: {BROKEN / 'base' / 'valid.yaml'}\n{body}")
    return [f"{p.key}: {p.message}" for p in validate_files([f])]


@pytest.mark.parametrize("body, expected", [
    ("plugin: {repo: 'ext::sh -c touch%20x'}\n", "plugin.repo: 'ext::sh -c touch%20x' is not valid"),
    ("plugin: {repo: 'ext::sh'}\n", "plugin.repo: 'ext::sh' asks git for its `ext::` remote helper"),
    ("plugin: {repo: 'FD::3'}\n", "plugin.repo: 'FD::3' asks git for its `FD::` remote helper"),
    ("verify: {seed: !!float x}\n", "verify.seed: 'x' is not a valid number"),
    ("verify: {seed: !!timestamp x}\n", "verify.seed: 'x' is not a valid date"),
    ("verify: {seed: -18446744073709551617}\n", "verify.seed: '-18446744073709551617' is too large a number"),
    ("verify: {seed: !!int 0x" + "f" * 5000 + "}\n", "verify.seed: '0xfffffffff"),
    ("comfyui: {root: '//.'}\n", "comfyui.root: cannot be /"),
    ("comfyui: {root: /opt/a;b}\n", "comfyui.root: contains ';', which pip reads"),
    ("comfyui: {root: \"/opt/ComfyUI\\n\"}\n", "comfyui.root: '/opt/ComfyUI\\n' is not valid"),
    ("model: {family: \"qwen-image\\n\"}\n", "model.family: 'qwen-image\\n' is not valid"),
    ("workflow: {width: 1024.0}\n", "workflow.width: expected an integer, got a number"),
    ("verify: {prompts: [\"two\\nlines\\tand a tab\"]}\n", ""),
    ("verify: {prompts: [\"bell\\a\"]}\n", "verify.prompts[0]: contains the control character '\\x07'"),
    ("backend: {version: \"1.0.1\\u2028\"}\n", "backend.version: contains the control character '\\u2028'"),
])
def test_hostile_values_are_located_problems(tmp_path: Path, body: str, expected: str) -> None:
    got = valid_with(tmp_path, body)
    assert (got[0].startswith(expected) if expected else got == []), got


def test_problems_stay_one_line_whatever_a_key_holds(tmp_path: Path) -> None:
    got = validate_files([write(tmp_path / "p.yaml", f"extends: {BROKEN / 'base' / 'valid.yaml'}\n"
                                                      '"plu\\ngin\\u2028": {}\n')])
    assert [str(p).replace(str(tmp_path), "") for p in got] == [
        "/p.yaml:2:1: plu\\ngin\\u2028: unknown key (did you mean 'plugin'?)"]


def test_a_file_past_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    from provisioner.config.marks import MAX_BYTES

    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_BYTES // 10 + 1))
    for f in (big, Path("/dev/zero")):  # /dev/zero never ends: it must not be read to its end
        (problem,) = validate_files([f])
        assert problem.message == "larger than 512 KiB: too large for a profile or inventory"


def test_ecma_pattern_dollar_and_strict_integers() -> None:
    from provisioner.config.schema import _ecma

    assert _ecma(r"^v[0-9]+$").search("v1") and not _ecma(r"^v[0-9]+$").search("v1\n")
    assert _ecma(r"^[$]+$").search("$$") and _ecma(r"^[^]$]+$").search("ab") and _ecma(r"^a\$$").search("a$")


def test_comfyui_itself_in_the_profile(tmp_path: Path) -> None:
    """The core, its venv's torch and its service: read into the model, the unit name without suffix."""
    tpl = f"workflow: {{template_dir: {ROOT / 'templates'}}}\n"
    f = write(tmp_path / "core.yaml", tpl + "comfyui: {root: /opt/ComfyUI, version: v0.3.64, service: systemd, "
              "unit: comfyui-qwen.service, instances: per-gpu, args: [--lowvram],\n"
              "  torch: {version: '2.9', find_links: ['/srv/torch/{flavour}']}}\n")
    assert validate_files([f]) == []
    spec = load_profile(f).profile.comfyui
    assert (spec.version, spec.repo, spec.service, spec.unit, spec.instances, spec.args) == (
        "v0.3.64", "https://github.com/Comfy-Org/ComfyUI.git", "systemd", "comfyui-qwen", "per-gpu", ("--lowvram",))
    assert spec.torch == model.TorchSpec("2.9", "auto", "https://download.pytorch.org/whl/{flavour}",
                                         ("/srv/torch/{flavour}",))
    assert spec.restart is None and spec.unit_dir == "/etc/systemd/system"


def test_a_file_that_passed_is_not_validated_again_and_one_that_did_not_always_is(tmp_path: Path) -> None:
    """The schema verdict of an unchanged document is recorded (a no-op run skips jsonschema's
    import); any change to it, even 8188 to 8188.0, is a new document, and failures never stick."""
    import subprocess
    import sys

    good = tmp_path / "good.yaml"
    good.write_text("comfyui:\n  root: /opt/ComfyUI\n  port: 8188\n")
    code = ("import sys; from provisioner.config.marks import read_yaml\n"
            "from provisioner.config.schema import schema_problems\n"
            "doc = read_yaml(sys.argv[1])\n"
            "print(len(schema_problems(doc.data, doc.marks, sys.argv[1], 'profile')), 'jsonschema' in sys.modules)\n")
    env = {**os.environ, "PROVISION_CACHE_DIR": str(tmp_path / "cache")}

    def run(path: Path) -> str:
        return subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                              env=env, check=True).stdout.strip()

    assert run(good) == "0 True"          # validated, and recorded
    assert run(good) == "0 False"         # the same document: jsonschema not even imported
    good.write_text("comfyui:\n  root: /opt/ComfyUI\n  port: 8188.0\n")
    assert run(good) == "1 True"          # a new document, with a problem
    assert run(good) == "1 True"          # ... reported on every run


def test_the_hub_token_goes_only_over_https_to_its_endpoint_or_to_loopback(tmp_path: Path) -> None:
    hub = model.HubSpec
    assert hub("https://hub.example.internal").sends_token_to("https://hub.example.internal/a/resolve/x")
    assert not hub("https://hub.example.internal").sends_token_to("https://cdn.example.internal/x")
    assert not hub("https://hub.example.internal").sends_token_to("http://hub.example.internal/x")
    assert hub("http://127.0.0.1:8080").sends_token_to("http://127.0.0.1:8080/x")
    assert hub("http://localhost:8080").sends_token_to("http://localhost:8080/x")
    assert not hub("http://mirror.internal").sends_token_to("http://mirror.internal/x")
    assert hub("http://mirror.internal", allow_insecure=True).sends_token_to("http://mirror.internal/x")
    base = "extends: " + str(BROKEN / "base" / "valid.yaml") + "\n"
    allowed = write(tmp_path / "ok.yaml", base + "huggingface: {endpoint: 'http://mirror.internal', "
                    "allow_insecure: true, token_env: HUB_SECRET, token_env_allowlist: [HUB_SECRET]}\n")
    assert validate_files([allowed]) == []
    loop = write(tmp_path / "loop.yaml", base + "huggingface: {endpoint: 'http://[::1]:9000'}\n")
    assert validate_files([loop]) == []


def _numbers_and_lists(node: object, path: str = "") -> list[tuple[str, dict]]:
    found: list[tuple[str, dict]] = []
    if isinstance(node, dict):
        kinds = node.get("type")
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if {"integer", "number", "array"} & set(kinds):
            found.append((path, node))
        for key, value in node.items():
            found += _numbers_and_lists(value, f"{path}/{key}")
    return found


def test_every_number_and_list_of_the_profile_has_an_upper_bound() -> None:
    # An accepted value must stay bounded: warm_runs 1e9 once passed and then filled 23 GB.
    unbounded = [path for path, node in _numbers_and_lists(schema("profile"))
                 if "maximum" not in node and "maxItems" not in node]
    assert unbounded == []


@pytest.mark.parametrize(("key", "value", "line"), [
    ("verify", "{warm_runs: 1000000000}", "verify.warm_runs"),
    ("workflow", "{steps: 1000000000000}", "workflow.steps"),
    ("timeouts", "{pip_s: 1.0e+300}", "timeouts.pip_s"),
    ("verify", "{prompts: [" + ", ".join(["p"] * 17) + "]}", "verify.prompts"),
])
def test_values_past_their_bound_are_refused_located(tmp_path: Path, key: str, value: str, line: str) -> None:
    from tests.test_cli import ROOT, run

    profile = tmp_path / "p.yaml"
    templates = f"template_dir: {ROOT / 'templates'}"
    body = f"{key}: {value}" if key != "workflow" else f"workflow: {{{templates}, {value[1:-1]}}}"
    profile.write_text(f"comfyui: {{root: /opt/ComfyUI}}\n# a comment\n{body}\n"
                       + (f"workflow: {{{templates}}}\n" if key != "workflow" else ""))
    code, out = run("validate", str(profile))
    assert code == 3 and f"{profile}:3:" in out and line in out, out


@pytest.mark.parametrize("byte", [b"\x01", b"\x1b", b"\x7f", b"\x08"])
def test_a_raw_control_character_in_a_file_is_located(tmp_path: Path, byte: bytes) -> None:
    # PyYAML's reader names only an offset ("position 23"); it was the file alone, no line:col.
    from tests.test_cli import run

    inventory = tmp_path / "inv.yaml"
    inventory.write_bytes(b"all:\n  hosts:\n    a: {ansible_host: h" + byte + b"}\n")
    profile = tmp_path / "p.yaml"
    profile.write_bytes(b"comfyui:\n  root: /opt/Co" + byte + b"mfyUI\n")
    for path, where in ((profile, ":2:16:"), (inventory, ":3:24:")):
        code, out = run("validate", str(path))
        assert code == 3 and f"{path}{where} invalid YAML: the control character" in out, out
        assert "position" not in out and len(out.strip().splitlines()) == 2, out
