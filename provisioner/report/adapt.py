"""Host entries from what the CLI holds: Facts, a HostVerification, an exception, the profile."""

from __future__ import annotations

import base64
import binascii
import posixpath
from collections.abc import Mapping
from typing import Any

from provisioner.config.model import Profile
from provisioner.errors import ConnectError, ProvisionError
from provisioner.catalog.gpus import precision_for
from provisioner.facts.model import Facts
from provisioner.facts.parse import facts_to_json
from provisioner.report.model import HostEntry, Status


def _plugin(facts: Mapping[str, Any], name: str) -> str | None:
    for path, checkout in (facts.get("git") or {}).items():
        if posixpath.basename(path.rstrip("/")) != name:
            continue
        if not checkout.get("exists"):
            return "not installed"
        if not checkout.get("is_repo"):
            return "not a git checkout"
        at = ", ".join(checkout.get("tags") or ()) or (checkout.get("head") or "no commit")[:10]
        return f"{at} (modified)" if checkout.get("dirty") else at
    return None


def _backend(env: Mapping[str, Any]) -> str | None:
    if not env.get("exists"):
        return None
    nunchaku = env.get("nunchaku")
    if nunchaku is None:
        return "not installed"
    return nunchaku["version"] if nunchaku.get("real") else f"PyPI impostor {nunchaku['version']}"


def _precision(wanted: str, facts: Mapping[str, Any]) -> str:
    if wanted != "auto":
        return wanted
    gpu = facts.get("gpu")                           # the GPU ComfyUI uses, as facts_to_json picked it
    runs = precision_for(gpu.get("compute_capability") or ()) if gpu else None
    return f"{runs or 'none'} (auto)"


def versions_from(facts: Mapping[str, Any] | None, profile: Profile | None = None,
                  verification: Mapping[str, Any] | None = None) -> dict[str, str | None]:
    """The versions row of a host: installed ones from facts, the model choice from the profile."""
    facts = facts or {}
    env = facts.get("env") or {}
    dists = env.get("distributions") or {}
    return {
        "plugin": _plugin(facts, profile.plugin.name if profile else "ComfyUI-nunchaku"),
        "backend": _backend(env),
        "diffusers": (dists.get("diffusers") or {}).get("version"),
        "peft": (dists.get("peft") or {}).get("version"),
        "model_variant": profile.model.variant if profile and profile.model.family else None,
        "precision": (_precision(profile.model.precision, facts)
                      if profile and profile.model.family else None),
        "comfyui": (verification or {}).get("comfyui_version") or facts.get("comfyui_version"),
    }


def thumbnails_of(verification: Mapping[str, Any]) -> list[tuple[str, bytes]]:
    out = []
    for i, run in enumerate(verification.get("runs") or (), 1):
        data = run.get("thumbnail_png_base64")
        if not data:
            continue
        try:
            png = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            continue                  # a garbled thumbnail loses the picture, not the report
        out.append((f"#{i} {run.get('kind', '')}: {run.get('prompt', '')}", png))
    return out


def from_verification(host: str, facts: Facts | Mapping[str, Any] | None,
                      verification: Any | None, *, profile: Profile | None = None,
                      error: str | None = None, unreachable: bool = False,
                      rollout: Mapping[str, Any] | None = None) -> HostEntry:
    """A host entry from verify's shapes: `verification` is a `HostVerification` or its to_json();
    `rollout`: what the apply did (`HostRollout.to_json()`).

    Passed only when a verification ran, every check passed and no `error` was given.
    """
    facts_json = facts_to_json(facts) if isinstance(facts, Facts) else facts
    ver: Mapping[str, Any] | None
    if verification is None or isinstance(verification, Mapping):
        ver = verification
    else:
        ver = verification.to_json()
    status: Status
    if unreachable:
        status = "unreachable"
    elif error is None and ver is not None and ver.get("passed") and ver.get("checks"):
        status = "passed"
    else:
        status = "failed"
        if ver is None and error is None:
            error = "no verification ran"
    return HostEntry(host, status, error, facts_json, versions_from(facts_json, profile, ver), ver,
                     thumbnails_of(ver) if ver else [], rollout)


def from_exception(host: str, err: BaseException, facts: Facts | Mapping[str, Any] | None = None,
                   *, profile: Profile | None = None, left: bool = False,
                   rollout: Mapping[str, Any] | None = None) -> HostEntry:
    """A host whose pipeline raised: unreachable for a ConnectError, failed otherwise; `left` when
    a rollout stopped before it (it was not contacted)."""
    text = str(err) if isinstance(err, ProvisionError) else f"{type(err).__name__}: {err}"
    facts_json = facts_to_json(facts) if isinstance(facts, Facts) else facts
    status: Status = "left" if left else "unreachable" if isinstance(err, ConnectError) else "failed"
    return HostEntry(host, status, " ".join(text.split()) or type(err).__name__, facts_json,
                     versions_from(facts_json, profile) if facts_json else {}, rollout=rollout)
