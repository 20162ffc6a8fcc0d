"""`provision lock`: resolve every name of a profile that upstream can move, into a Lock (config/lock.py).

On the control machine: each model file at the revision asked (`main` asked again, never the
record of an earlier answer), through the Hub client (resources/hub.py). On the hosts, through
their one connection and the normal supervised commands: the facts; the commits of the core's and
the plugin's tags (`git ls-remote`, as the host's own git sees the repositories); per environment
class, the backend wheel (resources/releases.py, catalog/wheels.py), the torch family's exact
versions and every package pip resolves for the profile's floors, answered by pip itself in that
host's venv (`pip install --dry-run --report`, resources/dryrun.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from provisioner import remote, secrets
from provisioner.catalog import models as catalog
from provisioner.catalog.requirements import is_held
from provisioner.config.lock import KEYS, Environment, GitPin, Lock, ModelPin, TorchPin, WheelPin
from provisioner.config.model import Profile
from provisioner.connection.base import Connection, as_whom
from provisioner.errors import PlanError
from provisioner.facts.gather import gather
from provisioner.facts.model import Facts, PythonEnv
from provisioner.plan.build import probe_for
from provisioner.resources import backend, core, dryrun, hub, packages, pins, releases, venv
from provisioner.resources.base import Run

SKIPPED = frozenset({"nunchaku", "pip", "setuptools", "wheel"})   # the backend pin has nunchaku; the rest are the venv's tools


@dataclass(frozen=True)
class HostFindings:
    """What one host contributed: its environment class and entry, the commits its git saw."""

    environment: Environment
    git: Mapping[str, GitPin]


def models(profile: Profile) -> tuple[ModelPin, ...]:
    """Every model file a host of this profile could load (both precisions under `auto`), as the Hub
    serves it now."""
    m, hf = profile.model, profile.huggingface
    if m.family is None:
        return ()
    token = secrets.read(hf.token_env)
    out = []
    for f in catalog.candidate_files(m.family, m.variant, m.precision):
        revision = (m.revision if f.folder == "diffusion_models" and m.revision else f.revision) or hub.DEFAULT_REF
        found = hub.file_metadata(hf.endpoint, f.repo, f.path_in_repo, revision, token, token_env=hf.token_env)
        if not found.commit:
            raise PlanError(f"the Hub at {hf.endpoint} named no commit for {f.repo}/{f.path_in_repo}: it cannot be locked")
        out.append(ModelPin(f.repo, f.path_in_repo, revision, found.commit, found.size, found.sha256))
    return tuple(out)


def host(conn: Connection, profile: Profile) -> HostFindings:
    """Resolve on one host (its profile without a lock); PlanError naming what it could not."""
    facts = gather(conn, profile, probe_for(profile))
    git = {}
    if profile.comfyui.version and not core.is_commit(profile.comfyui.version):
        git["core"] = _tag(conn, profile, profile.comfyui.repo, profile.comfyui.version)
    git["plugin"] = _tag(conn, profile, profile.plugin.repo, profile.plugin.tag)
    return HostFindings(environment(conn, profile, facts), git)


def _tag(conn: Connection, profile: Profile, repo: str, tag: str) -> GitPin:
    ref = f"refs/tags/{tag}"
    result = as_whom(conn, False).run(remote.git_argv(None, "ls-remote", "--", repo, ref, ref + "^{}"), timeout=profile.timeouts.git_s, check=False)
    found = dict(reversed(line.split("\t", 1)) for line in result.stdout.splitlines() if "\t" in line)
    commit = found.get(ref + "^{}") or found.get(ref)         # an annotated tag: the commit it points at
    if not result.ok or not commit:
        why = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"no tag {tag}"
        raise PlanError(f"{repo} {tag}: the host's git could not resolve it ({why})")
    return GitPin(repo, tag, commit)


def environment(conn: Connection, profile: Profile, facts: Facts) -> Environment:
    env = facts.env
    if not env.exists or env.error or not env.torch:
        raise PlanError(f"{profile.comfyui.venv} has no torch yet: apply once without a lock (or with "
                        "--limit to a host of this class that has one), then lock")
    goal = venv.target_torch(profile, facts)
    family = _held(env)
    source = "(as installed; comfyui.torch is not set)"
    if goal is not None:
        assert profile.comfyui.torch is not None
        source = " ".join(venv.source_args(profile.comfyui.torch, profile, goal.flavour)) or "pip's index"
        if venv.missing(env, goal):                # the venv runs another torch: ask pip which it gets
            moved = _dry_run(conn, venv.install_torch(profile, goal), env)
            family = _held(env, moved)
    ahead = replace(facts, env=replace(env, torch=family["torch"], distributions={
        **env.distributions, **{k: replace(d, version=family[k]) for k, d in env.distributions.items() if k in family}}))
    floors, _ = packages.floors(profile, ahead)
    step = packages.install_step(profile, [str(f.requirement) for f in floors.values()])
    resolved = dryrun.resolved(env, _dry_run(conn, step, env))
    target = backend.host_target(profile, ahead)
    asset, _ = backend.find_wheel(profile, target)
    sha = asset.sha256 or (releases.file_sha256(asset.local_path) if asset.local_path else None)
    return Environment(pins.gpu_class(facts), family["torch"], env.tag or "", env.platform or "",
                       TorchPin(source, family), WheelPin(asset.name, asset.url or asset.local_path or "", asset.size, sha),
                       {k: v for k, v in resolved.items() if not is_held(k) and k not in SKIPPED})


def _held(env: PythonEnv, moved: Mapping[str, tuple[str | None, str]] | None = None) -> dict[str, str]:
    versions = dryrun.resolved(env, moved or {})
    return {k: v for k, v in versions.items() if is_held(k)}


def _dry_run(conn: Connection, step: Run, env: PythonEnv) -> dict[str, tuple[str | None, str]]:
    run = dryrun.preview(step, env)
    result = as_whom(conn, False).run(run.argv, timeout=run.timeout, check=False)
    if not result.ok:
        lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
        raise PlanError(f"pip's dry run failed: {lines[-1] if lines else f'exit {result.exit_code}'}")
    return dryrun.moves(result.stdout, env)


def combine(file: str, profile_name: str, digest: str, found: Sequence[HostFindings],
            model_pins: Sequence[ModelPin] | None, old: Lock | None, keep: frozenset[str]) -> Lock:
    """The new lock: what was found now, except the parts of `old` named in `keep` (KEYS) which
    stay as they were where the profile still asks the same; classes no host of this run had stay."""
    fresh: dict[str, Environment] = {}
    for f in found:                                  # the first host of each class answers for it
        fresh.setdefault(f.environment.key, f.environment)
    envs: dict[str, Environment] = dict(old.environments) if old else {}
    for key, new in fresh.items():
        was = envs.get(key)
        if was is not None:
            new = replace(new, torch_family=was.torch_family if "torch" in keep else new.torch_family,
                          backend=was.backend if "backend" in keep else new.backend,
                          packages=was.packages if "packages" in keep else new.packages)
        envs[key] = new
    git: dict[str, GitPin | None] = {}
    for what in ("core", "plugin"):
        now = next((f.git[what] for f in found if what in f.git), None)
        before = getattr(old, what) if old else None
        git[what] = before if what in keep and before and now and (before.repo, before.ref) == (now.repo, now.ref) else now
    models_now = tuple(model_pins or ())
    if old and "models" in keep:
        models_now = tuple(old.model(*m.key) or m for m in models_now)
    return Lock(file, profile_name, digest, git["core"], git["plugin"], models_now, envs)


def kept(old: Lock | None, update: Sequence[str] | None, same_profile: bool) -> frozenset[str]:
    """Which parts of an existing lock stay: without `--update`, every pin the profile still asks for
    the same way (the environments' only while the profile is unchanged: their floors may have
    moved); `--update` alone moves everything, `--update KEY…` only those."""
    if old is None or update == []:
        return frozenset()
    if update is None:
        return frozenset(KEYS) if same_profile else frozenset({"core", "plugin", "models"})
    return frozenset(KEYS) - set(update)
