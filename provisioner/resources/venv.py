"""ComfyUI's venv and the torch it runs (`comfyui.torch`): created with the host's python3 when it
does not exist, torch of the profile's release and CUDA build installed into it with its
torchvision and torchaudio, then ComfyUI's requirements.txt with the torch family held. A venv whose
torch is another release or build is moved (a planned change: the backend wheel follows it).

`cuda: auto` picks the newest build PyTorch publishes for that torch which the host's NVIDIA driver
runs (catalog/torch.py). The resources that install into the venv after this one (backend,
packages) plan against `planned(profile, facts)`: the facts as they will be once this resource's
change has run, so a venv created, or a torch moved, in the same apply gets the wheel and the
packages of the torch it will have, not of the one it had.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from packaging.version import Version

from provisioner import remote
from provisioner.catalog import torch as torches
from provisioner.catalog.requirements import is_held
from provisioner.config.model import Profile, TorchSpec
from provisioner.errors import PlanError
from provisioner.facts import snapshot_check, snapshots
from provisioner.facts.model import Distribution, Facts, Probe, PythonEnv
from provisioner.config.lock import environment_key
from provisioner.facts.snapshots import Dist, Snapshot
from provisioner.resources import core, dryrun, pins
from provisioner.resources.base import RESTART, Action, Change, Note, ResourcePlan, Run, Step, changes, pip_install

name = "venv"
BASE_PYTHON = "python3"          # the host's python the venv is made with, as found on its PATH
TRIO = ("torch", "torchvision", "torchaudio")


def probe(profile: Profile) -> Probe:
    """The host's python3 (to make the venv with, and the wheel tags the venv will have) and
    ComfyUI's requirements.txt; the venv itself is a base fact."""
    if profile.comfyui.torch is None:
        return Probe()
    return Probe(interpreters=(BASE_PYTHON,), read=(posixpath.join(profile.comfyui.root, core.REQUIREMENTS),))


@dataclass(frozen=True)
class TorchTarget:
    """The torch a venv must run: release (`2.9` or `2.9.1`), CUDA build, and why that build."""

    version: str
    cuda: str
    why: str                          # "pinned", or how auto chose it

    @property
    def flavour(self) -> str:
        return torches.flavour(self.cuda)

    @property
    def shown(self) -> str:
        return f"{self.version}{'.*' if self.version.count('.') == 1 else ''}+{self.flavour}"


def target_torch(profile: Profile, facts: Facts) -> TorchTarget | None:
    """The torch this host's venv must run, or None when the profile leaves torch alone. `auto`
    reads the NVIDIA driver from facts: a host whose GPUs cannot be read is a plan error then."""
    spec = profile.comfyui.torch
    if spec is None:
        return None
    minor = torches.minor_of(spec.version)
    published = torches.FLAVOURS.get(minor or "", ())
    driver = facts.gpus[0].driver if facts.gpus else None
    if spec.cuda != "auto":
        fits = torches.driver_supports(driver, spec.cuda) if driver else None
        if fits is False:
            floor = torches.DRIVER_MIN[spec.cuda]
            raise PlanError(f"comfyui.torch.cuda {spec.cuda} needs an NVIDIA driver >= {floor}; this host has "
                            f"{driver}: upgrade the driver, or pin a CUDA build it runs "
                            f"(torch {minor} has {', '.join(published) or 'builds the catalog does not know'})")
        return _locked(profile, facts, TorchTarget(spec.version, spec.cuda, "pinned"))
    if not published:
        raise PlanError(f"comfyui.torch.cuda auto: the catalog does not know which CUDA builds torch {minor} "
                        "has: pin comfyui.torch.cuda")
    if driver is None:
        raise PlanError(f"comfyui.torch.cuda auto picks the CUDA build from the NVIDIA driver, but this host's "
                        f"GPUs could not be read ({facts.gpu_error}): fix nvidia-smi, or pin comfyui.torch.cuda")
    cuda = torches.newest_supported(minor or "", driver)
    if cuda is None:
        oldest = next((c for c in published if c in torches.DRIVER_MIN), published[0])
        raise PlanError(f"the NVIDIA driver {driver} runs no CUDA build of torch {minor} ({', '.join(published)}; "
                        f"{oldest} needs >= {torches.DRIVER_MIN.get(oldest, 'an unknown driver')}): upgrade the "
                        "driver, or choose an older comfyui.torch.version")
    newer = [c for c in published if c > cuda and c in torches.DRIVER_MIN]
    why = f"auto: the newest torch {minor} build driver {driver} runs"
    if newer:
        why += f" ({newer[0]} needs >= {torches.DRIVER_MIN[newer[0]]})"
    return _locked(profile, facts, TorchTarget(spec.version, cuda, why))


def _locked(profile: Profile, facts: Facts, goal: TorchTarget) -> TorchTarget:
    """Under a lock, the exact torch release it pins for this host's environment class (`2.8` ->
    `2.8.0`, whatever PyTorch's index offers now); without one, `goal` as the profile says it."""
    if profile.lock is None:
        return goal
    python = facts.env if facts.env.exists and facts.env.tag else facts.interpreters.get(BASE_PYTHON)
    if python is None or not python.tag or not python.platform:
        return goal                        # the plan fails on the missing python3 with its own reason
    found = pins.environment_at(profile, environment_key(pins.gpu_class(facts), f"{goal.version}+{goal.flavour}",
                                                         python.tag, python.platform))
    torch = found.torch_family.versions.get("torch") if found and found.torch_family else None
    if torch is None:
        raise pins.stale(profile, f"torch {goal.shown} for {found.key if found else 'this host'}", "torch")
    return replace(goal, version=Version(torch).public)


def missing(env: PythonEnv, goal: TorchTarget) -> list[str]:
    """What of the torch trio the venv lacks or has in another release or build."""
    out = []
    if not (env.torch and torches.matches(env.torch, goal.version) and env.torch_cuda == goal.cuda):
        out.append("torch")
    out += [n for n in TRIO[1:] if env.version_of(n) is None]
    return out


def _base(facts: Facts) -> PythonEnv:
    """The host's python3, checked able to make the venv: PlanError saying what to install if not."""
    base = facts.interpreters.get(BASE_PYTHON)
    if base is None or not base.exists:
        raise PlanError(f"no {BASE_PYTHON} on the host's PATH to create ComfyUI's venv with: install python3 "
                        "(>= 3.10, which nunchaku's wheels are built for)")
    if base.error:
        raise PlanError(f"the host's {BASE_PYTHON} ({base.python}) cannot be run: {base.error}")
    if not base.ensurepip:
        version = ".".join((base.version or "3").split(".")[:2])
        raise PlanError(f"the host's {BASE_PYTHON} {base.version} ({base.python}) cannot create venvs (no venv/"
                        f"ensurepip module): install python{version}-venv (Debian, Ubuntu)")
    return base


def planned(profile: Profile, facts: Facts) -> Facts:
    """The facts as they will be once this resource's change has run: the venv there, with the
    target torch (its release as the profile says it, `2.9` for the newest 2.9.x), its torchvision
    and torchaudio, and the interpreter the venv is made from; other distributions as they are.
    Unchanged facts when the profile leaves torch alone or the venv already runs it."""
    goal = target_torch(profile, facts)
    if goal is None:
        return facts
    kept = core.venv_kept(profile, facts)
    if kept and not missing(facts.env, goal):
        return facts
    env = facts.env if kept else replace(_base(facts), distributions={})
    dists = {k: d for k, d in env.distributions.items() if not is_held(k)}
    dists.update(torch=Distribution("torch", goal.version), torchvision=Distribution(
        "torchvision", torches.torchvision_of(goal.version)), torchaudio=Distribution("torchaudio", goal.version))
    return replace(facts, env=replace(env, python=profile.comfyui.python, exists=True, error=None,
                                      torch=f"{goal.version}+{goal.flavour}", torch_cuda=goal.cuda,
                                      distributions=dict(sorted(dists.items()))))


def source_template(spec: TorchSpec, profile: Profile) -> tuple[str, ...]:
    """Where pip finds torch, with `{flavour}` (cu128, ...) still to fill in: the flavour's index
    (PyTorch's own, or a mirror) replacing the profile's, else the profile's pip settings;
    `find_links` beside either. Snapshots record it; `source_args` fills it."""
    out: list[str] = ["--index-url", spec.index_url] if spec.index_url else list(profile.pip.args())
    for link in spec.find_links:
        out += ["--find-links", link]
    return tuple(out)


def source_args(spec: TorchSpec, profile: Profile, flavour: str) -> tuple[str, ...]:
    """Where pip finds torch of this flavour (`source_template`, filled in)."""
    return tuple(a.replace("{flavour}", flavour) for a in source_template(spec, profile))


def install_torch(profile: Profile, goal: TorchTarget) -> Run:
    spec = profile.comfyui.torch
    assert spec is not None
    specs = torches.requirements(goal.version)
    argv = pip_install(profile.comfyui.python, *source_args(spec, profile, goal.flavour), *specs)
    return Run(argv, what=f"pip install {' '.join(specs)} ({goal.flavour})", timeout=3600.0)


def _requirements(profile: Profile, facts: Facts) -> tuple[tuple[Step, ...], str, Note | None]:
    """ComfyUI's requirements for a venv made now: those of the core the plan leads to."""
    goal = core.target(profile, facts)
    if goal is not None:
        text, origin = core.requirements_text(profile, facts, goal), core.label(goal.version)
    else:
        path = posixpath.join(profile.comfyui.root, core.REQUIREMENTS)
        text, origin = facts.contents.get(path), f"ComfyUI at {profile.comfyui.root}"
        if text is None:
            return (), "", Note(name, f"no {path}: the new venv gets torch only; ComfyUI's requirements are "
                                      "installed once comfyui.version pins a checkout")
    needed = core.install(profile, planned(profile, facts), text, origin)
    return (needed.steps, needed.summary, None) if needed else ((), "", None)


def plan(profile: Profile, facts: Facts) -> ResourcePlan:
    goal = target_torch(profile, facts)
    if goal is None:
        return changes()
    spec, env = profile.comfyui, facts.env
    assert spec.torch is not None                  # target_torch said so
    kept = core.venv_kept(profile, facts)
    if env.exists and env.error and kept:
        raise PlanError(f"ComfyUI's venv {spec.venv} cannot be read ({env.error}): repair it, or remove it "
                        "and provision creates it")
    lacking = missing(env, goal) if kept else list(TRIO)
    if not lacking:
        return changes()
    notes = [Note(name, f"comfyui.torch.cuda {goal.why}: CUDA {goal.cuda} ({goal.flavour})", level="info")] \
        if goal.why != "pinned" else []
    after: dict[str, object] = {"torch": goal.shown, "cuda": goal.cuda,
                                "from": " ".join(source_args(spec.torch, profile, goal.flavour)) or "pip's index"}
    steps: list[Step] = []
    replaces: frozenset[str] = frozenset()
    action: Action
    preview: Run | None = None
    if not kept:
        base = _base(facts)
        action, before = "create", None
        steps.append(Run((base.python, "-m", "venv", spec.venv), what=f"create the venv {spec.venv}"))
        steps.append(install_torch(profile, goal))
        more, installs, note = _requirements(profile, facts)
        steps += more
        notes += [note] if note else []
        summary = f"create {spec.venv} with {BASE_PYTHON} {base.version}, torch {goal.shown}"
        if installs:
            summary += f"; {installs}"
            after["requirements"] = installs.removeprefix("pip install ")
    elif "torch" in lacking:
        action, before = "update", {"torch": env.torch, "cuda": env.torch_cuda}
        # Out first: an installed torch of the same release but another build would count as met.
        steps.append(Run((spec.python, "-m", "pip", "uninstall", "--yes", "--disable-pip-version-check", *TRIO),
                         what="uninstall torch, torchvision, torchaudio"))
        steps.append(install_torch(profile, goal))
        summary = f"torch {env.torch or '(none)'} -> {goal.shown} (the backend wheel is chosen for it)"
        preview = dryrun.preview(steps[-1], env)                  # type: ignore[arg-type]  # a Run
        replaces = frozenset(n for n in TRIO if n in env.distributions)
    else:
        action, before = "update", {n: None for n in lacking}
        steps.append(install_torch(profile, goal))
        summary = f"pip install {', '.join(lacking)} for torch {env.torch}"
    return changes(Change(name, spec.venv, action, summary, before, after, tuple(steps), notify=RESTART,
                          preview=preview, replaces=replaces), notes=notes)


# --- a recorded set of distributions, exactly (a rollback's desired venv) ---------------------------

# Under comfyui.state_dir: what a restore fetched, before it changes anything. A temporary name
# (retention.is_temp): what a killed rollback left there is removed by the next run's plan.
STAGE = "rollback-stage.provision-tmp"
Refetch = Callable[[Dist], "Step | None"]


def stage_dir(profile: Profile) -> str:
    return posixpath.join(profile.comfyui.state_dir, STAGE)


def index_source(profile: Profile, target: Snapshot, key: str, dist: Dist) -> tuple[str, ...]:
    """The pip source arguments an index distribution is fetched from again: the ones the snapshot
    recorded, else as this resource installs it now (the torch family from its torch index, of the
    build's flavour, the rest from the profile's pip settings)."""
    if target.sources is not None and key in target.sources:
        return target.sources[key]
    torch = target.state.distributions.get("torch") if target.state.distributions else None
    flavour = Version(dist.version).local or (Version(torch.version).local if torch else None)
    if is_held(key) and profile.comfyui.torch is not None and flavour:
        return source_args(profile.comfyui.torch, profile, flavour)
    return profile.pip.args()


def exact(profile: Profile, target: Snapshot, have: Mapping[str, Dist] | None, have_error: str | None,
          kept_now: Mapping[str, str] | None, refetch: Refetch) -> tuple[Change | None, Change | None]:
    """The venv holding exactly the distributions `target` recorded, torch and its family included,
    as two changes: (fetch, install); a rollback runs the fetch before any other change.

    The fetch gets and checks everything to install into a stage folder beside provision's
    records, while the host is untouched: index distributions from the wheel the snapshot kept of
    them (copied into the stage, checked against its sha256), else by `pip download --no-deps`
    from the source each came from (the torch family from its torch index), kept wheels copied back to the
    path they were installed from and checked against their sha256 (one that is gone re-fetched
    by `refetch`, or a PlanError naming it). The install: one `pip install --no-deps
    --force-reinstall --no-index` of the staged set (pip prepares everything before it replaces
    anything), and only then what was added since is uninstalled: no step leaves the venv with
    fewer distributions than either end state. PlanError naming everything that cannot be restored."""
    want = target.state.distributions
    if want is None:
        raise PlanError(f"the snapshot could not read the venv ({target.state.venv_error}): its distributions "
                        "cannot be restored")
    if have is None:
        raise PlanError(f"the venv {profile.comfyui.venv} cannot be read ({have_error})")
    added = sorted(set(have) - set(want))
    back = sorted(k for k, d in want.items() if have.get(k) != d)
    if not added and not back:
        return None, None
    python, stage = profile.comfyui.python, stage_dir(profile)
    problems: list[str] = []
    by_source: dict[tuple[str, ...], list[str]] = {}
    kept: list[tuple[str, str, str, str]] = []      # (kept file, where it goes, sha256, the folder it goes into)
    sources = snapshot_check.Places.of(profile).wheel_sources
    fetched: list[Step] = []
    specs: list[str] = []
    for key in back:
        dist = want[key]
        if dist.kind == "index":
            store = target.wheels.get(key)
            sha = posixpath.basename(posixpath.dirname(store)) if store else ""
            if store and (kept_now is None or kept_now.get(store) == sha):
                # Its wheel was kept before the change: installed from there, whatever the index serves now.
                kept.append((store, posixpath.join(stage, posixpath.basename(store)), sha, stage))
            else:
                by_source.setdefault(index_source(profile, target, key, dist), []).append(f"{dist.name}=={dist.version}")
            specs.append(f"{dist.name}=={dist.version}")
        elif dist.kind == "url" and dist.url:
            specs.append(f"{dist.url}#sha256={dist.sha256}" if dist.sha256 and "#" not in dist.url else dist.url)
        elif dist.kind == "file" and dist.path and dist.sha256:
            store = target.wheels.get(key)
            place = snapshot_check.place_of(dist.path, sources)
            if place is None:       # read_snapshots refused such a snapshot: never planned from
                problems.append(f"{dist.name} {dist.version} was installed from {dist.path}, which is not in "
                                f"{' nor '.join(sources)}")
                continue
            if store and (kept_now is None or kept_now.get(store) == dist.sha256):
                kept.append((store, dist.path, dist.sha256, place))
            elif (step := refetch(dist)) is not None:
                fetched.append(step)
            else:
                why = (f"its kept wheel {store} is gone or changed" if store else
                       f"the snapshot could not keep it ({target.unkept.get(key, 'not recorded')})")
                problems.append(f"{dist.name} {dist.version} was installed from {dist.path}: {why}, and no "
                                "backend source offers that file again")
                continue
            specs.append(dist.path)
        elif dist.kind == "file":
            problems.append(f"{dist.name} {dist.version} was installed from {dist.path} with no sha256 recorded: "
                            "a rollback cannot check it")
        else:
            problems.append(f"{dist.name} {dist.version} was installed from a "
                            f"{'folder' if dist.kind == 'dir' else 'VCS'} ({dist.url}): a rollback cannot reinstall it")
    if problems:
        raise PlanError("; ".join(problems))
    get: list[Step] = [Run(("rm", "-rf", stage), what="clear the rollback's stage folder"),
                       Run(("mkdir", "-p", stage), what="create the rollback's stage folder")]
    for args, wanted in by_source.items():
        get.append(Run((python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                        "--dest", stage, *args, *wanted),
                       what=f"fetch {' '.join(wanted)} before anything changes", timeout=profile.timeouts.pip_s))
    if kept:
        get.append(Run(remote.argv("snapshot"), stdin=remote.stage_request(snapshots.folder(profile), kept),
                       what=f"put back and check {len(kept)} kept wheel(s)"))
    get += fetched
    from_kept = f" ({len(kept)} from the wheels the snapshot kept)" if kept else ""
    fetch = Change(name, stage, "create", f"fetch and check {len(back)} distribution(s) of the snapshot's venv"
                   f"{from_kept} before anything changes", None, {"fetched": [f"{want[k].name} {want[k].version}" for k in back]},
                   tuple(get)) if back else None
    steps: list[Step] = []
    if specs:
        # --no-deps: exactly these versions, nothing resolved; --force-reinstall: a same-version
        # distribution from another file is replaced too; --no-index: only what was fetched above.
        steps.append(Run(pip_install(python, "--no-deps", "--force-reinstall", "--no-index", "--find-links", stage, *specs),
                         what=f"pip install --no-deps {' '.join(specs)}", timeout=profile.timeouts.pip_s))
    if added:
        steps.append(Run((python, "-m", "pip", "uninstall", "--yes", "--disable-pip-version-check",
                          *(have[k].name for k in added)), what=f"pip uninstall {' '.join(added)}",
                         timeout=profile.timeouts.pip_s))
    steps.append(Run(("rm", "-rf", stage), what="remove the rollback's stage folder"))
    before = {k: have[k].shown if k in have else None for k in [*back, *added]}
    after = {k: want[k].shown if k in want else None for k in [*back, *added]}
    parts = [f"{want[k].name} {have[k].version if k in have else '(none)'} -> {want[k].version}" for k in back]
    parts += [f"uninstall {have[k].name} {have[k].version}" for k in added]
    return fetch, Change(name, profile.comfyui.venv, "update", "distributions as in the snapshot: " + ", ".join(parts),
                         before, after, tuple(steps), notify=RESTART,
                         replaces=frozenset(k for k in [*back, *added] if k in have))
