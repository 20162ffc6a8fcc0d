"""core resource: the ComfyUI checkout at comfyui.version and its requirements.txt, planned from facts
(pure), and compat judging the plugin at the core the plan leads to."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

import pytest

from provisioner.remote import clone_argv, git_argv
from provisioner.config.model import Profile, build_profile
from provisioner.errors import PlanError
from provisioner.facts.model import Distribution, Facts, FileState, GitCheckout, Probe, PythonEnv, RemoteTags
from provisioner.resources import compat, core
from provisioner.resources.base import Run

ROOT = "/opt/ComfyUI"
REPO = "https://github.com/Comfy-Org/ComfyUI.git"
NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
REQS_60 = "comfyui-frontend-package==1.26.13\ntorch\ntorchvision\ntorchaudio\nnumpy>=1.25.0\n#non essential\nkornia>=0.7.1\n"
REQS_64 = REQS_60.replace("1.26.13", "1.27.10")
AT_60 = GitCheckout(ROOT, True, True, "b" * 40, ("v0.3.60",), None, (), REPO)


def profile(**comfyui: Any) -> Profile:
    return build_profile({"comfyui": {"root": ROOT, "version": "v0.3.64", **comfyui}}, name="t", file="/p/t.yaml")


def facts(co: GitCheckout, *, local: bool | None = None, tags: tuple[str, ...] | None = None,
          dists: dict[str, str] | None = None, venv: bool = True, shown: dict[str, str | None] | None = None,
          requirements: str | None = REQS_60) -> Facts:
    env = PythonEnv(f"{ROOT}/venv/bin/python", venv, "3.11.2",
                    distributions={k: Distribution(k, v) for k, v in (dists or {}).items()})
    remote = {} if local is None and tags is None else {
        (ROOT, REPO, "v0.3.64"): RemoteTags(bool(local), tags)}
    return Facts(host="h", os="Debian 12", arch="x86_64", kernel="6.1", system_python="3.11.2 /usr/bin/python3",
                 env=env, gpus=(), gpu_error="none", nvcc=None, disk_path="/opt", disk_free=10**12,
                 comfyui_version=None, git={ROOT: co}, remote_tags=remote,
                 contents={f"{ROOT}/requirements.txt": requirements},
                 shown={(ROOT, f"refs/tags/v0.3.64:{k}"): v for k, v in (shown or {}).items()})


MET_60 = {"comfyui-frontend-package": "1.26.13", "numpy": "2.1.0", "kornia": "0.8.1", "torch": "2.6.0+cu124"}


def argvs(change: Any) -> list[tuple[str, ...]]:
    return [s.argv for s in change.steps if isinstance(s, Run)]


def test_unset_version_leaves_the_core_alone() -> None:
    p = build_profile({"comfyui": {"root": ROOT}}, name="t", file="/p/t.yaml")
    assert core.probe(p) == Probe() and core.plan(p, facts(GitCheckout(ROOT, False))).changes == ()


def test_probe_reads_the_requirements_here_and_at_the_version_and_asks_for_tags() -> None:
    assert core.probe(profile()) == Probe(read=(f"{ROOT}/requirements.txt",),
                                          show=((ROOT, "refs/tags/v0.3.64:requirements.txt"),),
                                          remote_tags=((ROOT, REPO, "v0.3.64"),))
    commit = "637221995f7424a561bd825de3e61ea117dfe1e3"
    assert core.probe(profile(version=commit)).show == ((ROOT, f"{commit}:requirements.txt"),)
    assert core.probe(profile(version=commit)).remote_tags == ()


def test_a_bare_host_gets_a_clone_made_beside_the_root() -> None:
    result = core.plan(profile(), facts(GitCheckout(ROOT, False), tags=("v0.3.60", "v0.3.64"), venv=False),
                       now=NOW)
    (change,) = result.changes
    assert (change.action, change.summary, change.before) == ("create", f"clone ComfyUI v0.3.64 into {ROOT}", None)
    assert argvs(change) == [clone_argv(REPO, f"{ROOT}.provision-tmp", "v0.3.64", ROOT)]
    assert change.notify == frozenset({"restart-comfyui"})      # no venv yet: the venv resource installs its requirements


def test_a_root_holding_only_provisions_lock_is_a_bare_host() -> None:
    """apply takes its lock in ROOT/.provision before anything else: that root is not someone's ComfyUI."""
    only_lock = GitCheckout(ROOT, True, False, entries=(".provision",))
    (change,) = core.plan(profile(), facts(only_lock, tags=("v0.3.64",), venv=False), now=NOW).changes
    assert change.action == "create" and change.before is None
    assert argvs(change) == [clone_argv(REPO, f"{ROOT}.provision-tmp", "v0.3.64"),      # left beside the root
                             ("mv", f"{ROOT}/.provision", f"{ROOT}.provision-tmp/.provision"),
                             ("rmdir", ROOT), ("mv", f"{ROOT}.provision-tmp", ROOT)]


def test_a_bare_host_with_a_venv_elsewhere_gets_the_requirements_with_the_clone() -> None:
    p = profile(venv="/srv/venvs/comfyui")
    (change,) = core.plan(p, facts(GitCheckout(ROOT, False), tags=("v0.3.64",)), now=NOW).changes
    install = change.steps[-1]                  # the hold program, then pip: the venv's own python
    assert isinstance(install, Run) and install.argv[0] == "/srv/venvs/comfyui/bin/python" and install.stdin
    assert install.argv[-2:] == ("-r", f"{ROOT}/requirements.txt")
    assert install.argv[6:8] == ("-c", f"{ROOT}/.provision/constraints.txt")
    assert change.summary.endswith("; pip install -r requirements.txt of ComfyUI v0.3.64")


def test_a_folder_that_is_no_checkout_is_refused_or_moved_aside_with_force() -> None:
    zip_install = GitCheckout(ROOT, True, False, entries=("main.py", "models", "venv"))
    with pytest.raises(PlanError, match="exists but is not a git checkout of ComfyUI.*comfyui.force: true"):
        core.plan(profile(), facts(zip_install))
    (change,) = core.plan(profile(force=True), facts(zip_install, tags=("v0.3.64",)), now=NOW).changes
    backup = f"{ROOT}.provision-backup-20260102-030405"
    assert change.action == "replace" and argvs(change)[0] == ("mv", ROOT, backup)
    assert "nothing is deleted" in change.warnings[0]
    assert not any("pip" in a for a in argvs(change))             # its venv moved aside: the venv resource makes one
    assert core.venv_kept(profile(force=True), facts(zip_install)) is False


def test_at_the_version_with_its_requirements_met_is_converged() -> None:
    at_64 = replace(AT_60, tags=("v0.3.64",))
    f = facts(at_64, local=True, dists={**MET_60, "comfyui-frontend-package": "1.27.10"}, requirements=REQS_64)
    assert core.plan(profile(), f).changes == ()
    missing = facts(at_64, local=True, dists={**MET_60, "comfyui-frontend-package": "1.27.10", "kornia": "0.6.0"},
                    requirements=REQS_64)
    (change,) = core.plan(profile(), missing).changes
    assert (change.key, change.summary) == (f"{ROOT}/requirements.txt", "pip install kornia>=0.7.1 (have 0.6.0)")
    assert change.notify == frozenset({"restart-comfyui"})


def test_moving_to_a_tag_the_checkout_has_is_one_change_without_network() -> None:
    f = facts(AT_60, local=True, dists=MET_60, shown={"requirements.txt": REQS_64})
    (change,) = core.plan(profile(), f, now=NOW).changes
    assert change.summary == ("checkout ComfyUI v0.3.60 -> v0.3.64; pip install comfyui-frontend-package==1.27.10 "
                              "(have 1.26.13)")
    assert [a[-4:] for a in argvs(change)][0] == ("checkout", "--quiet", "--detach", "v0.3.64")
    assert not any("fetch" in a for a in argvs(change))
    assert change.before == {"version": "v0.3.60", "commit": "b" * 40, "remote": REPO, "modified": [],
                             "comfyui-frontend-package": "1.26.13"}
    assert change.after["comfyui-frontend-package"] == "==1.27.10 (ComfyUI v0.3.64 requirements.txt)"
    install = argvs(change)[-1][3:]                  # pip's arguments, after the hold program's source
    assert "torch" not in " ".join(install) and install[-1] == "comfyui-frontend-package==1.27.10"


def test_moving_to_a_tag_the_checkout_lacks_fetches_and_installs_the_whole_file() -> None:
    f = facts(AT_60, tags=("v0.3.60", "v0.3.64"), dists=MET_60)
    (change,) = core.plan(profile(), f, now=NOW).changes
    assert git_argv(ROOT, "fetch", "--quiet", "--force", "--tags", "origin") in argvs(change)
    assert argvs(change)[-1][-2:] == ("-r", f"{ROOT}/requirements.txt")


def test_local_modifications_stop_the_plan_or_are_stashed_untracked_files_never_count() -> None:
    dirty = replace(AT_60, dirty=("comfy/model_management.py", "workflows/a.json", ".provision/"),
                    untracked=("workflows/a.json", ".provision/"))
    with pytest.raises(PlanError, match=r"local modifications \(comfy/model_management.py\); .*git stash"):
        core.plan(profile(), facts(dirty, local=True, dists=MET_60))
    (change,) = core.plan(profile(force=True), facts(dirty, local=True, dists=MET_60), now=NOW).changes
    stash = argvs(change)[0]
    assert stash[-5:-2] == ("stash", "push", "--quiet") and "user.name=provision" in stash
    assert change.warnings == (f"{ROOT}: comfy/model_management.py set aside in git stash "
                               f"(`git -C {ROOT} stash list`)",)
    only_untracked = replace(AT_60, tags=("v0.3.64",), dirty=("workflows/a.json",), untracked=("workflows/a.json",))
    assert core.plan(profile(), facts(only_untracked, local=True, requirements=REQS_64, dists={
        **MET_60, "comfyui-frontend-package": "1.27.10"})).changes == ()


def test_another_origin_is_refused_or_switched_with_force() -> None:
    fork = replace(AT_60, remote="git@github.com:someone/ComfyUI-fork.git")
    with pytest.raises(PlanError, match="comes from git@github.com:someone/ComfyUI-fork.git, not"):
        core.plan(profile(), facts(fork, local=True))
    (change,) = core.plan(profile(force=True), facts(fork, local=True, dists=MET_60), now=NOW).changes
    assert ("remote", "set-url", "origin", REPO) == argvs(change)[0][-4:]
    assert any("fetch" in a for a in argvs(change))                # the tag is origin's, fetched anew


def test_a_tag_the_repository_lacks_is_refused_with_the_nearest_and_a_branch_never_pins() -> None:
    with pytest.raises(PlanError, match="comfyui.version v0.3.64 is not a tag of .*a branch is never pinned") as err:
        core.plan(profile(), facts(GitCheckout(ROOT, False), tags=("v0.3.60", "v0.3.65", "v0.3.66")))
    assert err.value.alternatives == ("v0.3.66", "v0.3.65", "v0.3.60")
    master = profile(version="master")
    f = replace(facts(GitCheckout(ROOT, False)), remote_tags={(ROOT, REPO, "master"): RemoteTags(False, ("v0.3.64",))})
    with pytest.raises(PlanError, match="comfyui.version master is not a tag"):
        core.plan(master, f)


def test_a_commit_is_pinned_by_its_head() -> None:
    commit = "637221995f7424a561bd825de3e61ea117dfe1e3"
    at = replace(AT_60, head=commit, tags=())
    f = replace(facts(at, dists={**MET_60, "comfyui-frontend-package": "1.27.10"}, requirements=REQS_64))
    assert core.plan(profile(version=commit[:12]), f).changes == ()
    moved = core.plan(profile(version="a" * 40), facts(AT_60, dists=MET_60), now=NOW).changes[0]
    assert moved.summary.startswith("checkout ComfyUI v0.3.60 -> " + "a" * 40)


# -- compat at the core the plan leads to -----------------------------------------------------------

MODEL_60 = "class QwenTimestepProjEmbeddings:\n    def __init__(self, embedding_dim, pooled_projection_dim):\n"


def core_facts(co: GitCheckout, shown: dict[str, str | None], *, local: bool | None = True,
               tags: tuple[str, ...] | None = None) -> Facts:
    f = facts(co, local=local, tags=tags)
    files = {f"{ROOT}/comfy/ldm/qwen_image/model.py": FileState(f"{ROOT}/comfy/ldm/qwen_image/model.py", True),
             f"{ROOT}/comfy_extras/nodes_qwen.py": FileState(f"{ROOT}/comfy_extras/nodes_qwen.py", True)}
    return replace(f, files=files, comfyui_version="0.3.60",
                   greps={(f"{ROOT}/comfy_extras/nodes_qwen.py", "TextEncodeQwenImageEditPlus"): True,
                          (f"{ROOT}/comfy/ldm/qwen_image/model.py", "apply_rotary_emb"): True},
                   shown={(ROOT, f"refs/tags/v0.3.48:{k}"): v for k, v in shown.items()},
                   remote_tags={(ROOT, REPO, "v0.3.48"): RemoteTags(bool(local), tags)})


def test_compat_judges_the_target_from_its_own_files_when_the_checkout_holds_it() -> None:
    p = profile(version="v0.3.48")
    assert set(compat.probe(p).show) >= {(ROOT, "refs/tags/v0.3.48:comfy/ldm/qwen_image/model.py"),
                                         (ROOT, "refs/tags/v0.3.48:comfyui_version.py")}
    v48 = {"comfy/ldm/qwen_image/model.py": None, "comfy_extras/nodes_qwen.py": None,
           "comfyui_version.py": '__version__ = "0.3.48"\n', "pyproject.toml": None}
    with pytest.raises(PlanError, match="which this host's ComfyUI 0.3.48 does not have"):
        compat.plan(p, core_facts(AT_60, v48))
    # The same host staying at v0.3.60 is fine: the live tree has the file.
    assert compat.plan(profile(version="v0.3.60"), replace(core_facts(AT_60, v48))).notes == ()


def test_compat_judges_a_target_not_on_the_host_by_its_number_and_says_so() -> None:
    p = profile(version="v0.3.48")
    with pytest.raises(PlanError, match="ComfyUI 0.3.48 does not have"):
        compat.plan(p, core_facts(GitCheckout(ROOT, False), {}, local=False, tags=("v0.3.48", "v0.3.64")))
    notes = compat.plan(profile(), replace(core_facts(GitCheckout(ROOT, False), {}, local=False),
                                           remote_tags={(ROOT, REPO, "v0.3.64"): RemoteTags(False, ("v0.3.64",))})).notes
    assert [n.message for n in notes] == [
        "ComfyUI v0.3.64 is not on the host yet: the plugin and the model family are judged from its version number "
        "(> 0.3.48 has comfy/ldm/qwen_image; 0.23.0 up to 0.24.0 lacks apply_rotary_emb; >= 0.3.60 has "
        "TextEncodeQwenImageEditPlus)"]


def test_another_users_root_is_refused_with_whose_it_is_when_the_version_is_pinned() -> None:
    """The facts program never runs git in a checkout of another user's: a pinned core says why."""
    why = f"{ROOT} is owned by comfy (uid 1001), not by admin (uid 1000), who runs provision there"
    foreign = GitCheckout(ROOT, True, error=why, foreign=True)
    with pytest.raises(PlanError, match=f"{ROOT} cannot be read: {ROOT} is owned by comfy"):
        core.plan(profile(), facts(foreign, tags=("v0.3.64",)), now=NOW)
    assert core.plan(profile(version=None), facts(foreign, tags=("v0.3.64",)), now=NOW).changes == ()


def test_a_checkout_an_apply_was_killed_in_is_finished_only_when_the_owed_restart_names_the_core() -> None:
    """git writes the files before it moves HEAD: a kill in between leaves tracked files that differ
    from HEAD. The owed restart the killed apply recorded names the core's change: finish it."""
    half = replace(AT_60, dirty=("comfy/model_management.py", "nodes.py", "workflows/a.json"),
                   untracked=("workflows/a.json",))
    marker = ('{"handler": "restart-comfyui", "since": "2026-01-02T03:04:05Z", "change": "core: checkout '
              'ComfyUI v0.3.60 -> v0.3.64"}')
    owed = {f"{ROOT}/.provision/owed": {"restart-comfyui": marker}}
    (change,) = core.plan(profile(), replace(facts(half, local=True, dists=MET_60), markers=owed), now=NOW).changes
    assert change.summary.startswith("finish the checkout an interrupted apply left half done (2 file(s) differ "
                                     "from HEAD); checkout ComfyUI v0.3.60 -> v0.3.64")
    assert git_argv(ROOT, "checkout", "--quiet", "--force", "--detach", "v0.3.64") in argvs(change)
    assert not any("stash" in argv for argv in argvs(change))
    assert change.warnings[0].endswith("comfy/model_management.py, nodes.py are checked out as v0.3.64 has them "
                                       "(git checkout --force); untracked and ignored files are left as they are")
    # Another change's record says nothing of the core's checkout: local modifications are refused.
    plugin = {f"{ROOT}/.provision/owed": {"restart-comfyui": marker.replace('"core: checkout', '"plugin: clone')}}
    for markers in ({}, plugin):
        with pytest.raises(PlanError, match=r"local modifications \(comfy/model_management.py, nodes.py\)"):
            core.plan(profile(), replace(facts(half, local=True, dists=MET_60), markers=markers))
