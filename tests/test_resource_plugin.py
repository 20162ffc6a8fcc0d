"""plugin resource: YAML cases (profile + checkout facts in, change out), then real git: a local
upstream repo, the plan's steps run for real, and the real facts script reading the result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioner import remote
from provisioner.config.model import Profile, build_profile
from provisioner.connection.base import Result
from provisioner.errors import FactsError, PlanError
from provisioner.facts.gather import base_probe, build_request, facts_argv, read_answer
from provisioner.facts.model import Facts, GitCheckout, NodePack, Probe, PythonEnv, RemoteTags
from provisioner.resources import plugin
from provisioner.resources.base import Run

CASES = sorted((Path(__file__).parent / "resources" / "plugin").glob("*.yaml"))
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
DEST = "/srv/ComfyUI/custom_nodes/ComfyUI-nunchaku"


def make_profile(fragment: dict[str, Any], root: str = "/srv/ComfyUI") -> Profile:
    return build_profile({"comfyui": {"root": root}, **fragment}, name="t", file="/p/profiles/t.yaml")


def make_facts(git: dict[str, GitCheckout]) -> Facts:
    return Facts(host="h", os="Ubuntu 24.04", arch="x86_64", kernel="6.8", system_python="3.12",
                 env=PythonEnv("/srv/ComfyUI/venv/bin/python", True), gpus=(), gpu_error="none",
                 nvcc=None, disk_path="/srv", disk_free=10**12, comfyui_version="0.3.64", git=git)


def shown_argv(argv: tuple[str, ...]) -> list[str]:
    """A step's argv as the cases write it: the hardened git prefix (remote.git_argv) as `GIT`, the
    clone step (remote.CLONE) as `CLONE` with its repo, temporary folder, ref and destination."""
    prefix = remote.git_argv(None)
    if argv[:3] == ("sh", "-c", remote.CLONE) and argv[8:] == prefix:
        return ["CLONE", *argv[4:8]]
    return ["GIT", *argv[len(prefix):]] if argv[:len(prefix)] == prefix else list(argv)


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_case(case: Path) -> None:
    data = yaml.safe_load(case.read_text())
    profile = make_profile(data["profile"])
    dest = data.get("path", DEST)
    co = data["checkout"]
    checkout = GitCheckout(dest, co["exists"], co.get("is_repo", False), co.get("head"),
                           tuple(co.get("tags", ())), co.get("branch"), tuple(co.get("dirty", ())),
                           co.get("remote"), co.get("error"), foreign=co.get("foreign", False))
    facts = make_facts({dest: checkout})
    if "remote" in data:          # what the host's git said of the repository's tags
        r = data["remote"]
        answer = RemoteTags(bool(r.get("local")), tuple(r["tags"]) if "tags" in r else None, r.get("error"))
        facts = replace(facts, remote_tags={(dest, profile.plugin.repo, profile.plugin.tag): answer})
    if "error" in data:
        with pytest.raises(PlanError) as err:
            plugin.plan(profile, facts, now=NOW)
        assert data["error"] in str(err.value) and "\n" not in str(err.value)
        return
    result = plugin.plan(profile, facts, now=NOW)
    got = result.changes
    assert [n.message for n in result.notes] == data.get("notes", [])
    assert len(got) == len(data["expect"])
    for change, want in zip(got, data["expect"]):
        assert (change.resource, change.key) == ("plugin", dest)
        view = {"action": change.action, "summary": change.summary, "before": change.before,
                "after": change.after, "warnings": list(change.warnings),
                "steps": [shown_argv(s.argv) for s in change.steps if isinstance(s, Run)],
                "notify": sorted(change.notify)}
        assert len(view["steps"]) == len(change.steps)       # only Run steps: git, cp, mv
        for field, value in want.items():
            assert view[field] == value, field
        assert change.notify == frozenset({"restart-comfyui"})


def test_probe_asks_for_the_checkout_and_the_tag() -> None:
    assert plugin.probe(make_profile({})) == Probe(
        git=(DEST,), remote_tags=((DEST, "https://github.com/nunchaku-ai/ComfyUI-nunchaku.git", "v1.1.0"),),
        listing=("/srv/ComfyUI/custom_nodes",), node_packs=("/srv/ComfyUI/custom_nodes",))


@pytest.mark.parametrize(("tag", "tags", "nearest"), [
    ("v1.3.0", ["v0.3.4", "v1.0.0", "v1.0.1", "v1.0.2", "v1.1.0", "v1.2.0", "v1.2.1"],
     ["v1.2.1", "v1.2.0", "v1.1.0", "v1.0.2", "v1.0.1"]),
    ("v1.1.5", ["v1.0.0", "v1.0.2", "v1.1.0", "v1.2.0", "v1.2.1"], ["v1.2.1", "v1.2.0", "v1.1.0", "v1.0.2", "v1.0.0"]),
    ("v1.1.5", ["v1.0.0", "v1.0.2", "v1.1.0", "v1.2.0", "v1.2.1", "v1.3.0"], ["v1.2.1", "v1.2.0", "v1.1.0", "v1.0.2", "v1.0.0"]),
    ("release-1.1", ["v1.1.0", "v1.0.0", "nightly"], ["v1.1.0", "v1.0.0", "nightly"]),
])
def test_nearest_tags(tag: str, tags: list[str], nearest: list[str]) -> None:
    assert plugin.nearest_tags(tag, tags) == nearest


def test_facts_without_the_probe_answer_are_a_facts_error() -> None:
    with pytest.raises(FactsError, match="plugin probe did not run"):
        plugin.plan(make_profile({}), make_facts({}))


def test_same_repo_spellings() -> None:
    url = "https://github.com/nunchaku-ai/ComfyUI-nunchaku.git"
    assert plugin.same_repo("ssh://git@GitHub.com/nunchaku-ai/ComfyUI-nunchaku", url)
    assert not plugin.same_repo("https://github.com/nunchaku-tech/ComfyUI-nunchaku.git", url)
    assert not plugin.same_repo(None, url)
    assert plugin.same_repo("/srv/mirror/repo.git/", "/srv/mirror/repo")


# --- real git ---------------------------------------------------------------------------------

GIT_ENV = {**os.environ, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.invalid"}


def sh(*argv: str, cwd: Path | None = None) -> str:
    return subprocess.run(argv, cwd=cwd, env=GIT_ENV, check=True, capture_output=True,
                          text=True).stdout


def commit(repo: Path, text: str, tag: str | None = None, annotated: bool = False) -> None:
    (repo / "__init__.py").write_text(f"VERSION = {text!r}\n")
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-q", "-m", text, cwd=repo)
    if tag:
        sh("git", "tag", *(("-a", "-m", tag) if annotated else ()), tag, cwd=repo)


@pytest.fixture
def upstream(tmp_path: Path) -> Path:
    """ComfyUI-nunchaku's shape in miniature: v1.0.0, an annotated v1.1.0, then untagged work."""
    repo = tmp_path / "upstream" / "ComfyUI-nunchaku"
    repo.mkdir(parents=True)
    sh("git", "init", "-q", "-b", "main", cwd=repo)
    (repo / ".gitignore").write_text("__pycache__/\n")
    commit(repo, "1.0.0", "v1.0.0")
    commit(repo, "1.1.0", "v1.1.0", annotated=True)
    commit(repo, "1.2.0.dev")
    return repo


def real_profile(tmp_path: Path, upstream: Path, **plugin_spec: Any) -> Profile:
    root = tmp_path / "ComfyUI"
    root.mkdir(exist_ok=True)
    return make_profile({"plugin": {"repo": str(upstream), **plugin_spec},
                         "comfyui": {"root": str(root), "port": 1}}, root=str(root))


def real_facts(profile: Profile, env: dict[str, str] | None = None) -> Facts:
    """The real facts script, run here as a host runs it (one process, request on stdin)."""
    request = build_request(profile, base_probe(profile) | plugin.probe(profile))
    proc = subprocess.run(facts_argv(), input=json.dumps(request), capture_output=True, text=True,
                          env=env or GIT_ENV, timeout=120)
    return read_answer("local", Result(tuple(facts_argv()), proc.returncode, proc.stdout, proc.stderr))


def apply(profile: Profile) -> None:
    for change in plugin.plan(profile, real_facts(profile), now=datetime.now(timezone.utc)).changes:
        for step in change.steps:
            assert isinstance(step, Run)
            sh(*step.argv)


def converged_at(profile: Profile, tag: str) -> GitCheckout:
    facts = real_facts(profile)
    assert plugin.plan(profile, facts).changes == ()
    co = facts.git[plugin.path(profile)]
    assert tag in co.tags and not co.dirty
    return co


def test_real_clone_into_place_then_nothing(tmp_path: Path, upstream: Path) -> None:
    profile = real_profile(tmp_path, upstream)
    (change,) = plugin.plan(profile, real_facts(profile)).changes
    assert change.action == "create"
    apply(profile)
    converged_at(profile, "v1.1.0")
    assert Path(plugin.path(profile), "__init__.py").read_text() == "VERSION = '1.1.0'\n"
    assert sorted(p.name for p in Path(profile.comfyui.custom_nodes).iterdir()) == ["ComfyUI-nunchaku"]


def test_real_clone_survives_an_interrupted_earlier_clone(tmp_path: Path, upstream: Path) -> None:
    profile = real_profile(tmp_path, upstream)
    leftover = Path(plugin.path(profile) + ".provision-tmp.disabled")
    leftover.mkdir(parents=True)
    (leftover / "partial").write_text("half a clone")
    apply(profile)
    converged_at(profile, "v1.1.0")
    assert not leftover.exists()


def test_real_retag_including_a_tag_published_after_the_clone(tmp_path: Path, upstream: Path) -> None:
    apply(real_profile(tmp_path, upstream, tag="v1.0.0"))
    converged_at(real_profile(tmp_path, upstream, tag="v1.0.0"), "v1.0.0")
    profile = real_profile(tmp_path, upstream, tag="v1.1.0")
    (change,) = plugin.plan(profile, real_facts(profile)).changes
    assert change.summary == "checkout ComfyUI-nunchaku v1.0.0 -> v1.1.0"
    apply(profile)
    converged_at(profile, "v1.1.0")
    # A shallow single-branch clone could not reach this one; a full clone fetches it.
    commit(upstream, "1.2.0", "v1.2.0")
    apply(real_profile(tmp_path, upstream, tag="v1.2.0"))
    converged_at(real_profile(tmp_path, upstream, tag="v1.2.0"), "v1.2.0")


def test_real_dirty_tree_refused_then_backed_up_with_force(tmp_path: Path, upstream: Path) -> None:
    profile = real_profile(tmp_path, upstream)
    apply(profile)
    dest = Path(plugin.path(profile))
    (dest / "__init__.py").write_text("VERSION = 'patched by hand'\n")
    (dest / "notes.txt").write_text("mine\n")
    with pytest.raises(PlanError, match=r"local modifications \(__init__.py, notes.txt\)"):
        plugin.plan(profile, real_facts(profile))

    forced = real_profile(tmp_path, upstream, force=True)
    (change,) = plugin.plan(forced, real_facts(forced)).changes
    assert "__init__.py, notes.txt would be lost" in change.warnings[0]
    apply(forced)
    converged_at(forced, "v1.1.0")
    (backup,) = dest.parent.glob("ComfyUI-nunchaku.provision-backup-*.disabled")
    assert (backup / "__init__.py").read_text() == "VERSION = 'patched by hand'\n"
    assert (backup / "notes.txt").read_text() == "mine\n"
    assert not (dest / "notes.txt").exists()


def test_real_plain_folder_moved_aside_with_force(tmp_path: Path, upstream: Path) -> None:
    profile = real_profile(tmp_path, upstream, force=True)
    dest = Path(plugin.path(profile))
    dest.mkdir(parents=True)
    (dest / "from-a-zip.py").write_text("x = 1\n")
    with pytest.raises(PlanError, match="not a git checkout"):
        plugin.plan(real_profile(tmp_path, upstream), real_facts(profile))
    apply(profile)
    converged_at(profile, "v1.1.0")
    (backup,) = dest.parent.glob("ComfyUI-nunchaku.provision-backup-*.disabled")
    assert (backup / "from-a-zip.py").read_text() == "x = 1\n"


def test_real_plain_folder_stays_when_the_forced_clone_fails(tmp_path: Path, upstream: Path) -> None:
    """The replacement is cloned before the folder is moved aside: a clone that fails (the
    repository unreachable) leaves the host with the plugin it had."""
    profile = real_profile(tmp_path, upstream, force=True)
    dest = Path(plugin.path(profile))
    dest.mkdir(parents=True)
    (dest / "from-a-zip.py").write_text("x = 1\n")
    (change,) = plugin.plan(profile, real_facts(profile)).changes
    upstream.rename(upstream.with_name("gone"))
    with pytest.raises(subprocess.CalledProcessError):
        for step in change.steps:
            assert isinstance(step, Run)
            sh(*step.argv)
    assert (dest / "from-a-zip.py").read_text() == "x = 1\n"
    assert not list(dest.parent.glob("*.provision-backup-*"))


def bin_without_git(tmp_path: Path, git: str | None = None) -> dict[str, str]:
    """A PATH holding sh and python3, and `git` only as the given script."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool, where in (("sh", shutil.which("sh")), ("python3", sys.executable)):
        (folder / tool).symlink_to(os.path.realpath(str(where)))
    if git is not None:
        (folder / "git").write_text(git)
        (folder / "git").chmod(0o755)
    return {**GIT_ENV, "PATH": str(folder)}


@pytest.mark.parametrize("git", [None, "#!/bin/sh\necho 'git: cannot run here' >&2\nexit 1\n"],
                         ids=["missing", "failing"])
def test_real_checkout_read_without_a_working_git_is_refused_never_moved(
        tmp_path: Path, upstream: Path, git: str | None) -> None:
    """A host whose git is missing or failing is not "a folder that is not a git checkout": with
    force that plan moved a working plugin aside. It is refused with git's reason."""
    forced = real_profile(tmp_path, upstream, force=True)
    apply(forced)
    facts = real_facts(forced, env=bin_without_git(tmp_path, git))
    co = facts.git[plugin.path(forced)]
    assert co.exists and co.error
    with pytest.raises(PlanError) as err:
        plugin.plan(forced, facts)
    assert "cannot be read by the host's git" in str(err.value)
    assert "not a git checkout" not in str(err.value)
    assert ("not installed" if git is None else "cannot run here") in str(err.value)


def test_real_checkout_with_a_damaged_git_folder_is_refused(tmp_path: Path, upstream: Path) -> None:
    forced = real_profile(tmp_path, upstream, force=True)
    apply(forced)
    (Path(plugin.path(forced)) / ".git" / "HEAD").write_text("garbage\n")
    with pytest.raises(PlanError, match="cannot be read by the host's git \\(git exited 128: "):
        plugin.plan(forced, real_facts(forced))


def test_real_other_remote_switched_with_force(tmp_path: Path, upstream: Path) -> None:
    profile = real_profile(tmp_path, upstream)
    apply(profile)
    fork = tmp_path / "fork" / "ComfyUI-nunchaku"
    sh("git", "clone", "-q", "--mirror", str(upstream), str(fork))
    moved = real_profile(tmp_path, fork)
    with pytest.raises(PlanError, match="comes from"):
        plugin.plan(moved, real_facts(moved))
    forced = real_profile(tmp_path, fork, force=True)
    apply(forced)
    co = converged_at(forced, "v1.1.0")
    assert co.remote == str(fork)


def test_real_missing_tag_is_refused_with_the_nearest(tmp_path: Path, upstream: Path) -> None:
    """A tag the repository does not have fails the plan (it used to fail halfway through apply),
    listing the tags the host's own git found there."""
    for profile in (real_profile(tmp_path, upstream, tag="v1.3.0"),):     # no checkout yet: ls-remote
        with pytest.raises(PlanError) as err:
            plugin.plan(profile, real_facts(profile))
        assert str(err.value) == f"plugin.tag v1.3.0 is not a tag of {upstream}: pin one of its tags; available: v1.1.0, v1.0.0"
    apply(real_profile(tmp_path, upstream))
    typo = real_profile(tmp_path, upstream, tag="v1.1")                   # a checkout lacking it: ls-remote
    with pytest.raises(PlanError, match=r"plugin.tag v1.1 is not a tag of .*: pin one of its tags; available: v1.1.0, v1.0.0$"):
        plugin.plan(typo, real_facts(typo))


def test_real_converged_checkout_asks_no_repository(tmp_path: Path, upstream: Path) -> None:
    profile = real_profile(tmp_path, upstream)
    apply(profile)
    upstream.rename(upstream.with_name("gone"))          # the repository is unreachable now
    facts = real_facts(profile)
    assert facts.remote_tags[(plugin.path(profile), str(upstream), "v1.1.0")].local
    assert plugin.plan(profile, facts).changes == () and plugin.plan(profile, facts).notes == ()
    retag = real_profile(tmp_path, upstream, tag="v1.0.0")               # has it locally: still no network
    assert plugin.plan(retag, real_facts(retag)).notes == ()
    missing = real_profile(tmp_path, upstream, tag="v9.0.0")             # must ask, cannot: a warning
    (note,) = plugin.plan(missing, real_facts(missing)).notes
    assert note.message.startswith(f"could not list the tags of {upstream} from the host (")


NODES = "/srv/ComfyUI/custom_nodes"
REPO = "https://github.com/nunchaku-ai/ComfyUI-nunchaku.git"


@pytest.mark.parametrize(("pack", "why"), [
    (NodePack("x", f"{NODES}/x", True, origin="git@github.com:nunchaku-ai/ComfyUI-nunchaku"), "origin git@"),
    (NodePack("x", f"{NODES}/x", True, project="ComfyUI_Nunchaku"), "pyproject.toml name ComfyUI_Nunchaku"),
    (NodePack("comfyui-nunchaku@1.0.2", f"{NODES}/.disabled/comfyui-nunchaku@1.0.2", False, registry=True),
     "Comfy Registry install"),
    (NodePack("comfyui-nunchaku", f"{NODES}/comfyui-nunchaku", True), None),     # a name alone proves nothing
    (NodePack("other", f"{NODES}/other", True, origin="https://github.com/a/other.git", project="other",
              registry=True), None),
])
def test_what_makes_a_folder_the_plugin(pack: NodePack, why: str | None) -> None:
    got = pack.copy_of(REPO)
    assert (got is None) if why is None else (got is not None and got.startswith(why))


def _with_packs(facts: Facts, *packs: NodePack) -> Facts:
    return replace(facts, node_packs={NODES: packs})


def test_a_git_copy_of_another_origin_is_adopted_by_pointing_origin() -> None:
    dest = f"{NODES}/comfyui-nunchaku"
    fork = "https://github.com/someone/ComfyUI-nunchaku-fork.git"
    co = GitCheckout(dest, True, True, "abc", ("v1.0.2",), None, (), fork)
    facts = _with_packs(make_facts({dest: co}), NodePack("comfyui-nunchaku", dest, True, fork, "ComfyUI-nunchaku"))
    plain = make_profile({"plugin": {"name": "comfyui-nunchaku"}})
    with pytest.raises(PlanError, match="plugin.adopt: true to take it over to switch origin"):
        plugin.plan(plain, facts, now=NOW)
    (change,) = plugin.plan(make_profile({"plugin": {"name": "comfyui-nunchaku", "adopt": True}}), facts, now=NOW).changes
    assert change.action == "update" and f"switch origin {fork} -> {REPO}" in change.summary


def test_adopt_needs_the_folder_to_be_the_plugin() -> None:
    dest = f"{NODES}/comfyui-nunchaku"
    facts = _with_packs(make_facts({dest: GitCheckout(dest, True, False)}), NodePack("comfyui-nunchaku", dest, True))
    with pytest.raises(PlanError, match="is not a git checkout; move it away, or set plugin.force"):
        plugin.plan(make_profile({"plugin": {"name": "comfyui-nunchaku", "adopt": True}}), facts, now=NOW)


def test_two_enabled_copies_name_every_one() -> None:
    co = GitCheckout(DEST, True, True, "abc", ("v1.1.0",), None, (), REPO)
    facts = _with_packs(make_facts({DEST: co}),
                        NodePack("ComfyUI-nunchaku", DEST, True, REPO),
                        NodePack("a", f"{NODES}/a", True, project="comfyui-nunchaku"),
                        NodePack("b", f"{NODES}/b", True, origin=REPO),
                        NodePack("ComfyUI-nunchaku.provision-backup-20260101-000000.disabled",
                                 f"{NODES}/ComfyUI-nunchaku.provision-backup-20260101-000000.disabled", False, REPO))
    with pytest.raises(PlanError) as err:
        plugin.plan(make_profile({}), facts, now=NOW)
    assert f"{DEST} and {NODES}/a (and {NODES}/b) are both the plugin" in str(err.value)


def test_a_mirror_named_otherwise_still_knows_the_plugin_by_its_own_name() -> None:
    """plugin.repo a mirror called `nunchaku-comfy-1a2b.git`: a Registry copy is still the plugin
    (found against the real repository's mirror in the real tier)."""
    pack = NodePack("comfyui-nunchaku", f"{NODES}/comfyui-nunchaku", True, project="ComfyUI-nunchaku", registry=True)
    assert pack.copy_of("/srv/mirrors/nunchaku-comfy-1a2b.git") == "pyproject.toml name ComfyUI-nunchaku"
    assert NodePack("x", f"{NODES}/x", True, project="other").copy_of("/srv/mirrors/nunchaku-comfy-1a2b.git") is None
