"""What the catalog knows, fact by fact, each with its source and the day it was checked against
upstream: what `provision catalog` prints, so an operator sees at a glance how old the knowledge is.
The facts themselves live in the other catalog modules; this only lists them.
"""

from __future__ import annotations

from dataclasses import dataclass

from provisioner.catalog import compat, cores, gpus, models, requirements, wheels


@dataclass(frozen=True)
class Fact:
    topic: str                        # core | break | plugin | backend | gpu | model
    name: str                         # what it is about: a tag, a release, a compute capability, a variant
    fact: str
    source: str
    checked: str                      # YYYY-MM-DD


def _cores() -> list[Fact]:
    out = [Fact("core", r.tag, f"released {r.date}" + (f"; {r.note}" if r.note else ""), r.source, cores.CHECKED)
           for r in cores.CORE_RELEASES]
    out += [Fact("break", b.what, f"{b.symptom}; refused with: {b.pin}", b.thread, cores.CHECKED)
            for b in cores.BREAKS]
    out += [Fact("break", "not checkable", text, "ComfyUI-nunchaku issue threads", cores.CHECKED)
            for text in cores.UNSEEN]
    return out


def _plugins() -> list[Fact]:
    out = []
    for release in cores.PLUGIN_RELEASES:
        adapted = cores.last_adapted(release.tag)
        floor = compat.backend_floor(release.tag)
        out.append(Fact("plugin", release.tag,
                        f"released {release.date}; needs backend >= {floor}; the last core the catalog knows "
                        f"before it: {adapted.tag if adapted else '(none known)'}", release.source, cores.CHECKED))
    out.append(Fact("plugin", "after v1.2.1", "no release since v1.2.1 (2026-01-26); the fixes for core 0.12.1 "
                    "(#732) and for index_timestep_zero (#790) are unmerged", "ComfyUI-nunchaku releases and pull "
                    "requests", cores.CHECKED))
    return out


def _backends() -> list[Fact]:
    out = []
    for release, builds in wheels.TORCH_BUILDS.items():
        nightly = wheels.NIGHTLY_BUILT.get(release, frozenset())
        torches = "; ".join(f"torch {m} cu{'/cu'.join(c.replace('.', '') for c in cudas)}"
                            + (" (built against a nightly)" if m in nightly else "")
                            for m, cudas in builds.items())
        needs = requirements.BACKEND_REQUIRES.get(release, ())
        diffusers = next((r for r in needs if r.startswith("diffusers")), "")
        out.append(Fact("backend", release, f"wheels: {torches}" + (f"; requires {diffusers}" if diffusers else ""),
                        "nunchaku-ai/nunchaku release-build.yaml, setup.py and pyproject.toml at the tag",
                        wheels.CHECKED))
    out.append(Fact("backend", "after 1.2.1", "no stable release since 1.2.1; nightlies to 1.3.0dev20260306; no "
                    "official wheel above torch 2.10 stable (none for torch 2.14 + CUDA 13, the default since "
                    "October 2026)", "nunchaku-ai/nunchaku releases", wheels.CHECKED))
    return out


def _gpus() -> list[Fact]:
    out = [Fact("gpu", f"sm {gpus.capability_text(cc)}", f"runs {precision}", "nunchaku utils.py "
                "check_hardware_compatibility (v1.1.0-v1.2.1)", gpus.CHECKED)
           for cc, precision in gpus.ARCHITECTURES.items()]
    out.append(Fact("gpu", "any other", "refused (sm 9.0 H100/H200, 10.0 B200 among them); from sm 7.5 on, ComfyUI's "
                    f"own int8 convrot models (core >= v{cores.CONVROT_CORE}) are the path offered",
                    "nunchaku utils.py; ComfyUI v0.27.0 release notes", cores.CHECKED))
    return out


def _models() -> list[Fact]:
    out = []
    for family in models.families():
        for variant in models.variants(family):
            dit = models.dit_file(family, variant, "int4")
            out.append(Fact("model", f"{family} {variant}", f"{dit.repo}: {dit.path_in_repo} (fp4: svdq-fp4_…)",
                            f"Hugging Face {dit.repo} file list", models.CHECKED))
    return out


def facts() -> list[Fact]:
    """Every fact, grouped by topic in a fixed order."""
    return _cores() + _plugins() + _backends() + _gpus() + _models()
