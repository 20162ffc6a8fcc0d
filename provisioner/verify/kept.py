"""What a verification keeps for the image agreement, and what the agreement found: the records
alone (KeyedImage and its key, Reference, Agreement), without numpy: the verification of a host and
a report's reading need them, not the pixel arithmetic of agreement.py (numpy's import is a tenth
of a second)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class KeyedImage:
    """A verification image kept whole for the comparison: the first run of each prompt."""

    key: str                  # prompt, seed and workflow: what must give the same picture
    prompt: str
    seed: int
    png: bytes
    # agreement.Sketch, made while the next generations run: what choosing a reference needs of it
    # (its shape and a small copy), so the fleet's judgement does not decode it for that again.
    sketch: object = field(default=None, compare=False, repr=False)


def image_key(prompt: str, seed: int, graph: Mapping[str, Any]) -> str:
    """`a-red-fox-in-the-snow-photograph-seed42-1f2e3d4c5b`: a file name that changes whenever the
    picture legitimately would (the prompt, the seed, any setting of the workflow as sent)."""
    slug = "-".join(re.findall(r"[a-z0-9]+", prompt.lower()))[:48].strip("-") or "prompt"
    canonical = json.dumps(graph, sort_keys=True, separators=(",", ":"), default=str)
    return f"{slug}-seed{seed}-{hashlib.sha256(canonical.encode()).hexdigest()[:10]}"



@dataclass(frozen=True)
class Reference:
    """Where a GPU class's reference image came from (the store's index entry, as verify sees it)."""

    gpu_class: str
    key: str
    host: str
    created_at: str
    promoted: bool = False             # chosen by `--promote-reference`, not by the first good run

    def to_json(self) -> dict[str, Any]:
        return {"gpu_class": self.gpu_class, "key": self.key, "host": self.host,
                "created_at": self.created_at, "promoted": self.promoted}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Reference:
        return cls(str(raw.get("gpu_class", "")), str(raw.get("key", "")), str(raw.get("host", "")),
                   str(raw.get("created_at", "")), bool(raw.get("promoted")))


@dataclass(frozen=True)
class Agreement:
    """One host image against its class's reference for the same prompt and seed."""

    key: str
    prompt: str
    seed: int
    reference: Reference | None
    passed: bool
    detail: str
    size: tuple[int, int] = (0, 0)                  # the host image's (width, height)
    reference_size: tuple[int, int] = (0, 0)
    psnr_db: float | None = None                    # None: not compared (no reference, other size)
    psnr_channel_min_db: float | None = None        # the worst of R, G, B alone
    ssim: float | None = None
    mean_shift: tuple[float, float, float] | None = None   # host minus reference, per channel, 0-255
    panels: tuple[bytes, bytes, bytes] = (b"", b"", b"")   # reference, host, difference (PNGs, small)

    def to_json(self, *, panels: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key, "prompt": self.prompt, "seed": self.seed,
            "reference": None if self.reference is None else self.reference.to_json(),
            "passed": self.passed, "detail": self.detail, "width": self.size[0], "height": self.size[1],
            "reference_width": self.reference_size[0], "reference_height": self.reference_size[1],
            "psnr_db": self.psnr_db, "psnr_channel_min_db": self.psnr_channel_min_db, "ssim": self.ssim,
            "mean_shift": None if self.mean_shift is None else list(self.mean_shift)}
        if panels:
            out["panels_png_base64"] = [base64.b64encode(p).decode() for p in self.panels]
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Agreement:
        def number(key: str) -> float | None:
            value = raw.get(key)
            return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        try:
            panels = tuple(base64.b64decode(p or "", validate=True) for p in raw.get("panels_png_base64") or ())
        except (binascii.Error, ValueError, TypeError):
            panels = ()
        shift = raw.get("mean_shift")
        seed = raw.get("seed")
        return cls(str(raw.get("key", "")), str(raw.get("prompt", "")),
                   seed if isinstance(seed, int) and not isinstance(seed, bool) else 0,
                   Reference.from_json(raw["reference"]) if isinstance(raw.get("reference"), Mapping) else None,
                   bool(raw.get("passed")), str(raw.get("detail", "")),
                   (int(raw.get("width") or 0), int(raw.get("height") or 0)),
                   (int(raw.get("reference_width") or 0), int(raw.get("reference_height") or 0)),
                   number("psnr_db"), number("psnr_channel_min_db"), number("ssim"),
                   tuple(float(v) for v in shift) if isinstance(shift, list) and len(shift) == 3 else None,  # type: ignore[arg-type]
                   panels if len(panels) == 3 else (b"", b"", b""))  # type: ignore[arg-type]
