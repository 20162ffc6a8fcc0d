"""Pip requirements of the plugin, compared by specifier (not by string) and installed in one step."""

from __future__ import annotations

from collections.abc import Mapping

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.version import InvalidVersion, Version

from provisioner.config.model import Profile
from provisioner.errors import PlanError
from provisioner.facts.model import Facts, Probe, PythonEnv, canonical
from provisioner.resources.base import RESTART, Action, Change, ResourcePlan, Run, changes

name = "packages"


def probe(profile: Profile) -> Probe:
    """The base facts already list the venv's distributions: nothing more to look at."""
    return Probe()


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


def _marker_env(env: PythonEnv, facts: Facts) -> dict[str, str]:
    """The host's marker values where facts know them (python version, machine)."""
    values = {k: str(v) for k, v in default_environment().items()}
    if env.version:
        values["python_full_version"] = env.version
        values["python_version"] = ".".join(env.version.split(".")[:2])
    values.update(sys_platform="linux", platform_system="Linux", os_name="posix",
                  platform_machine=facts.arch or values["platform_machine"])
    return values


def satisfied(req: Requirement, installed: str | None) -> bool:
    """Does the installed version meet the specifier?

    `prereleases=True` matches pip's own check of an installed distribution: pip calls an
    installed 0.36.0.dev0 good enough for `>=0.35`, so a stricter test would plan forever.
    """
    if installed is None:
        return False
    try:
        version = Version(installed)
    except InvalidVersion:
        return False
    return req.specifier.contains(version, prereleases=True)


def unmet(profile: Profile, facts: Facts) -> dict[str, tuple[Requirement, str | None]]:
    """Requirements the venv does not meet, by canonical name, with the installed version."""
    env = facts.env
    marker_env = _marker_env(env, facts)
    out: dict[str, tuple[Requirement, str | None]] = {}
    for req in requirements(profile):
        if req.marker is not None and not req.marker.evaluate(marker_env):
            continue                                  # not meant for this host's python/arch
        installed = env.version_of(req.name)
        if not satisfied(req, installed):
            out[canonical(req.name)] = (req, installed)
    return out


def _check_env(profile: Profile, env: PythonEnv) -> None:
    if not env.exists:
        raise PlanError(f"venv not found at {profile.comfyui.venv}: "
                        "create ComfyUI's venv first (or set comfyui.venv)")
    if env.error:
        raise PlanError(f"the venv at {profile.comfyui.venv} cannot be read "
                        f"({env.error}); repair or recreate it")


def plan(profile: Profile, facts: Facts) -> ResourcePlan:
    if not profile.packages:
        return changes()
    _check_env(profile, facts.env)
    missing = unmet(profile, facts)
    if not missing:
        return changes()
    # One argv element per requirement: `>=` never meets a shell unquoted.
    specs = tuple(str(req) for req, _ in missing.values())
    argv = (profile.comfyui.python, "-m", "pip", "install", "--disable-pip-version-check",
            *profile.pip.args(), *specs)
    before: Mapping[str, object] = {n: have for n, (_, have) in missing.items()}
    after: Mapping[str, object] = {n: str(req.specifier) or "any" for n, (req, _) in missing.items()}
    summary = "pip install " + ", ".join(
        f"{spec} ({'have ' + have if have else 'missing'})"
        for spec, (_, have) in zip(specs, missing.values()))
    action: Action = "update" if any(have for _, have in missing.values()) else "create"
    step = Run(argv, what=f"pip install {' '.join(specs)}", timeout=1800.0)
    return changes(Change("packages", ", ".join(missing), action, summary, before, after,
                          (step,), notify=RESTART))
