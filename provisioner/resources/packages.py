"""Pip requirements beside the backend wheel: the profile's packages and the wheel's own Requires-Dist
(it is installed with --no-deps), each at the highest floor of the profile, the backend release and
the plugin's requirements.txt at its tag; compared by specifier (not by string), installed in one
pip run with the torch family held by a constraints file."""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence

from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import Version

from provisioner.catalog import requirements as upstream
from provisioner.config.model import Profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Probe, PythonEnv, canonical
from provisioner.resources import dryrun, pins, venv
from provisioner.resources.base import RESTART, Action, Change, Note, ResourcePlan, Run, changes
from provisioner.resources.hold import held_install

name = "packages"
PROFILE = "profile"
LOCK = "lock"


def _plugin_requirements_spec(profile: Profile) -> tuple[str, str] | None:
    """(checkout, `refs/tags/T:requirements.txt`) when the catalog does not know the plugin's tag."""
    if profile.plugin.tag in upstream.PLUGIN_REQUIREMENTS:
        return None
    checkout = posixpath.join(profile.comfyui.custom_nodes, profile.plugin.name)
    return checkout, f"refs/tags/{profile.plugin.tag}:requirements.txt"


def probe(profile: Profile) -> Probe:
    """The venv's distributions are base facts; a plugin tag the catalog lacks is read from the checkout."""
    spec = _plugin_requirements_spec(profile)
    return Probe(show=(spec,)) if spec else Probe()


def requirements(profile: Profile) -> tuple[Requirement, ...]:
    """The profile's requirements, parsed; a bad one or `nunchaku` is a one-line PlanError."""
    out = []
    for text in profile.packages:
        try:
            req = Requirement(text)
        except InvalidRequirement as err:
            why = str(err).splitlines()[0]          # packaging adds a caret diagram below
            raise PlanError(f"{text!r} is not a pip requirement ({why}); "
                            "write it like 'diffusers>=0.35'") from None
        if canonical(req.name) == "nunchaku":
            # PyPI's `nunchaku` is an unrelated package; the backend resource installs the real wheel.
            raise PlanError("remove 'nunchaku' from packages; the backend wheel is "
                            "set by backend.version")
        out.append(req)
    return tuple(out)


def _sources(profile: Profile, facts: Facts) -> tuple[list[tuple[str, Sequence[Requirement]]], list[Note]]:
    """Every source of requirements, labelled for the plan, and notes on the ones that are unknown."""
    backend, tag = profile.backend.version, profile.plugin.tag
    sources: list[tuple[str, Sequence[Requirement]]] = [(PROFILE, requirements(profile))]
    notes: list[Note] = []
    wheel = upstream.backend_requires(backend)
    if wheel is None:
        notes.append(Note(name, f"nunchaku {backend} is not in the catalog: its Requires-Dist is unknown "
                                "(the wheel is installed --no-deps); list what it needs in packages"))
    else:
        sources.append((f"nunchaku {Version(backend).public} Requires-Dist", upstream.parse(wheel)))
    spec = _plugin_requirements_spec(profile)
    lines = upstream.PLUGIN_REQUIREMENTS.get(tag)
    if spec is not None:
        text = facts.shown.get(spec)
        lines = upstream.requirements_txt(text) if text is not None else None
    if lines is None:
        notes.append(Note(name, f"ComfyUI-nunchaku {tag} is not in the catalog and its checkout does not have "
                                "that tag yet: its requirements.txt floors are applied once it does", "info"))
    else:
        sources.append((f"ComfyUI-nunchaku {tag} requirements.txt", upstream.parse(lines)))
    return sources, notes


def floors(profile: Profile, facts: Facts) -> tuple[dict[str, upstream.Floor], list[Note]]:
    """What this host must have, by canonical name: the packages a plan installs (the profile's and
    the wheel's Requires-Dist) at their highest floor, and any torch-family requirement (checked,
    never installed). Requirements whose markers exclude this host are left out."""
    sources, notes = _sources(profile, facts)
    markers = upstream.marker_environment(facts.env.version, facts.arch)
    applicable = [(origin, [r for r in reqs if r.marker is None or r.marker.evaluate(markers)])
                  for origin, reqs in sources]
    try:
        combined = upstream.floors(applicable)
    except upstream.Conflict as err:
        raise PlanError(f"{err}; change packages, backend.version or plugin.tag") from None
    # The plugin's list only raises floors: its optional nodes' packages are not installed unasked.
    wanted = {canonical(r.name) for origin, reqs in applicable if not origin.startswith("ComfyUI-nunchaku")
              for r in reqs}
    return {key: floor for key, floor in combined.items() if key in wanted}, notes


def unmet(profile: Profile, facts: Facts) -> tuple[dict[str, tuple[upstream.Floor, str | None]], list[Note]]:
    """Floors the venv does not meet, by canonical name, with the installed version. A held
    (torch-family) floor that is not met is a PlanError: provision never moves torch."""
    env = facts.env
    found, notes = floors(profile, facts)
    out: dict[str, tuple[upstream.Floor, str | None]] = {}
    for key, floor in found.items():
        installed = env.version_of(key)
        if upstream.satisfied(floor.requirement, installed):
            continue
        if upstream.is_held(key):
            have = f"{key} {installed} is installed" if installed else f"{key} is not installed"
            raise PlanError(f"{floor.requirement} ({floor.origin}) is not met ({have}) and {key} is held "
                            "with torch's CUDA build: install a torch family that meets it yourself")
        out[key] = (floor, installed)
    return out, notes


def locked_unmet(versions: Mapping[str, str], env: PythonEnv) -> dict[str, tuple[upstream.Floor, str | None]]:
    """Under a lock: every distribution it pins that the venv has at another version, or lacks. The
    lock was resolved by pip from the same floors, so it meets them; the torch family is the venv's."""
    return {name: (upstream.Floor(Requirement(f"{name}=={version}"), LOCK), env.version_of(name))
            for name, version in versions.items()
            if not upstream.is_held(name) and env.version_of(name) != version}


def _check_env(profile: Profile, env: PythonEnv) -> None:
    if not env.exists:
        raise PlanError(f"venv not found at {profile.comfyui.venv}: "
                        "create ComfyUI's venv first (or set comfyui.venv)")
    if env.error:
        raise PlanError(f"the venv at {profile.comfyui.venv} cannot be read "
                        f"({env.error}); repair or recreate it")


def _shown(floor: upstream.Floor) -> str:
    spec = str(floor.requirement.specifier) or "any"
    return spec if floor.origin in (PROFILE, LOCK) else f"{spec} ({floor.origin})"


def install_step(profile: Profile, specs: Sequence[str]) -> Run:
    """One pip run of `specs` from the profile's sources, the torch family held. One argv element
    per requirement: `>=` never meets a shell unquoted."""
    return held_install(profile, *profile.pip.args(), *specs, what=f"pip install {' '.join(specs)}",
                        timeout=profile.timeouts.pip_s)


def plan(profile: Profile, facts: Facts) -> ResourcePlan:
    """What the venv lacks, as it will be once the venv resource ran (created, or its torch moved)."""
    now = facts
    facts = venv.planned(profile, facts)
    _check_env(profile, facts.env)
    missing, notes = unmet(profile, facts)
    locked = pins.environment(profile, facts)
    if locked is not None:
        missing = locked_unmet(locked.packages, facts.env)
    if not missing:
        return changes(notes=notes)
    specs = tuple(str(floor.requirement) for floor, _ in missing.values())
    step = install_step(profile, specs)
    before: Mapping[str, object] = {n: have for n, (_, have) in missing.items()}
    after: Mapping[str, object] = {n: _shown(floor) for n, (floor, _) in missing.items()}
    summary = "pip install " + ", ".join(
        f"{spec} ({'have ' + have if have else 'missing'})"
        for spec, (_, have) in zip(specs, missing.values()))
    action: Action = "update" if any(have for _, have in missing.values()) else "create"
    # pip's dry run shows what else it would move; only against the venv as it is (not one this
    # apply creates or whose torch it moves first: that venv does not exist to ask yet).
    preview = dryrun.preview(step, facts.env) if facts is now else None
    return changes(Change("packages", ", ".join(missing), action, summary, before, after,
                          (step,), notify=RESTART, preview=preview,
                          replaces=frozenset(n for n, (_, have) in missing.items() if have)), notes=notes)
