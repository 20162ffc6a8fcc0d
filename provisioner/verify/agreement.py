"""Does a host's image agree with its GPU class's reference image? PSNR (whole image and each
colour channel), SSIM (luminance, Wang et al. 2004), the mean colour shift, and a difference
picture for the report. numpy only: no torch, no GPU, no model weights.

Upstream compares each output with ONE stored reference image under a tolerance, since the same
seed gives slightly different images on different GPUs (ComfyUI-nunchaku's `tests/test_workflows.py`:
`psnr >= min(expected, 24) * 0.85`, `lpips <= max(expected, 0.1) * 1.15`). LPIPS and CLIP-IQA need
torch and network weights, so they are not computed here; the default floors are derived from
upstream's in catalog/tolerances.py (docs/fleet.md).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from provisioner.config.model import AgreementSpec
from provisioner.verify.images import encode_png
# The records live in kept.py (no numpy); they are this module's too.
from provisioner.verify.kept import Agreement, KeyedImage, Reference, image_key

__all__ = ["DIFF_GAIN", "PANEL_PX", "PSNR_IDENTICAL_DB", "Agreement", "KeyedImage", "NotAnImage", "Reference",
           "Sketch", "compare", "compare_same", "decode", "image_key", "luminance", "medoid", "psnr", "sketch", "sketch_of", "ssim"]

PSNR_IDENTICAL_DB = 100.0      # identical pixels: PSNR is infinite; reported as this
_PEAK = 255.0
_C1, _C2 = (0.01 * _PEAK) ** 2, (0.03 * _PEAK) ** 2          # Wang et al.'s K1, K2
_SIGMA, _RADIUS = 1.5, 5                                      # their 11x11 Gaussian window
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)     # ITU-R BT.601, as Pillow's "L"
PANEL_PX = 256                 # the report's side-by-side pictures
DIFF_GAIN = 4                  # the difference picture's |host - reference| is amplified this much


class NotAnImage(ValueError):
    """The bytes are not an image Pillow can decode."""


@dataclass(frozen=True)
class Sketch:
    """What the fleet's judgement needs of an image besides its pixels (references.py): its shape,
    a copy at most PANEL_PX on a side (reduced as Pillow's `reduce` does) to choose a reference
    with, and its report panel."""

    shape: tuple[int, ...]
    small: np.ndarray
    panel: bytes


def sketch(png: bytes) -> Sketch:
    """Raises NotAnImage."""
    rgb = decode(png)
    small = np.asarray(Image.fromarray(rgb, "RGB").reduce(max(1, max(rgb.shape[:2]) // PANEL_PX)))
    return Sketch(rgb.shape, small, _png(rgb))


def sketch_of(image: KeyedImage) -> Sketch:
    """The sketch made while the image's host was verified, else made now. Raises NotAnImage."""
    return image.sketch if isinstance(image.sketch, Sketch) else sketch(image.png)


def decode(png: bytes) -> np.ndarray:
    """H x W x 3 uint8 RGB."""
    try:
        with Image.open(io.BytesIO(png)) as img:
            return np.asarray(img.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise NotAnImage(str(err)) from None


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB over every value of two same-shaped uint8 arrays."""
    return _db(float(np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2)))


def _db(mse: float) -> float:
    return PSNR_IDENTICAL_DB if mse == 0 else min(PSNR_IDENTICAL_DB, 10 * math.log10(_PEAK ** 2 / mse))


def _window() -> np.ndarray:
    x = np.arange(-_RADIUS, _RADIUS + 1, dtype=np.float32)
    w = np.exp(-(x ** 2) / (2 * _SIGMA ** 2))
    return w / w.sum()


def _blur(a: np.ndarray) -> np.ndarray:
    """The separable Gaussian window over the valid region (no padding: the border is left out)."""
    w = _window()
    n = 2 * _RADIUS
    rows = sum(w[k] * a[k:a.shape[0] - n + k] for k in range(n + 1))
    return sum(w[k] * rows[:, k:a.shape[1] - n + k] for k in range(n + 1))  # type: ignore[index]


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) @ _LUMA


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two same-sized greyscale float arrays (0-255), Wang et al. 2004: an 11x11
    Gaussian window of sigma 1.5, K1 0.01, K2 0.03, population (co)variances."""
    if min(a.shape) <= 2 * _RADIUS:
        return 1.0 if np.array_equal(a, b) else 0.0
    mu_a, mu_b = _blur(a), _blur(b)
    var_a = _blur(a * a) - mu_a * mu_a
    var_b = _blur(b * b) - mu_b * mu_b
    cov = _blur(a * b) - mu_a * mu_b
    num = (2 * mu_a * mu_b + _C1) * (2 * cov + _C2)
    den = (mu_a * mu_a + mu_b * mu_b + _C1) * (var_a + var_b + _C2)
    return float(np.mean(num / den, dtype=np.float64))


def _png(rgb: np.ndarray, max_px: int = PANEL_PX) -> bytes:
    img = Image.fromarray(rgb, "RGB")
    img.thumbnail((max_px, max_px))
    return encode_png(img)


def _size(rgb: np.ndarray) -> tuple[int, int]:
    return rgb.shape[1], rgb.shape[0]


def compare(reference: np.ndarray, image: np.ndarray, thresholds: AgreementSpec, *, key: str, prompt: str,
            seed: int, source: Reference | None, reference_panel: bytes | None = None,
            image_panel: bytes | None = None) -> Agreement:
    """`image` against `reference` (both H x W x 3 uint8), judged under `thresholds`.
    `reference_panel`, `image_panel`: their report panels, made already (the reference's is the
    same for every host; the image's was made while its host was verified)."""
    size, ref_size = _size(image), _size(reference)
    same = image is reference or (size == ref_size and np.array_equal(image, reference))
    ref_panel = _png(reference) if reference_panel is None else reference_panel
    if image_panel is None:
        image_panel = ref_panel if same else _png(image)
    if size != ref_size:
        return Agreement(key, prompt, seed, source, False,
                         f"size {size[0]}x{size[1]}, the reference is {ref_size[0]}x{ref_size[1]}",
                         size, ref_size, panels=(ref_panel, image_panel, b""))
    # The host the reference was made from, and in a fleet of one GPU class often many more, gives
    # the same pixels: their figures are known without the arithmetic (a tenth of a second a host).
    figures = _identical(image) if same else _measure(reference, image)
    return _verdict(figures, thresholds, key, prompt, seed, source, size, (ref_panel, image_panel))


def compare_same(seen: Sketch, thresholds: AgreementSpec, *, key: str, prompt: str, seed: int,
                 source: Reference | None) -> Agreement:
    """`compare` of an image whose bytes are the reference's own, from its sketch: the same pixels,
    so the same Agreement, without decoding either."""
    size = (seen.shape[1], seen.shape[0])
    return _verdict(_identical(np.zeros(seen.shape, np.uint8)), thresholds, key, prompt, seed, source, size,
                    (seen.panel, seen.panel))


def _verdict(figures: _Figures, thresholds: AgreementSpec, key: str, prompt: str, seed: int,
             source: Reference | None, size: tuple[int, int], panels: tuple[bytes, bytes]) -> Agreement:
    whole, channels, structure, shift, diff = figures
    worst = min(channels)
    problems = []
    if whole < thresholds.psnr_min_db:
        problems.append(f"PSNR {whole:.1f} dB < {thresholds.psnr_min_db:g} dB")
    elif worst < thresholds.psnr_min_db:
        channel = "RGB"[channels.index(worst)]
        problems.append(f"{channel} channel PSNR {worst:.1f} dB < {thresholds.psnr_min_db:g} dB "
                        f"(mean colour shift R {shift[0]:+.0f} G {shift[1]:+.0f} B {shift[2]:+.0f})")
    if structure < thresholds.ssim_min:
        problems.append(f"SSIM {structure:.3f} < {thresholds.ssim_min:g}")
    text = ("identical pixels" if whole == PSNR_IDENTICAL_DB else
            f"PSNR {whole:.1f} dB (worst channel {worst:.1f}), SSIM {structure:.3f}")
    return Agreement(key, prompt, seed, source, not problems, "; ".join(problems) if problems else text,
                     size, size, round(whole, 2), round(worst, 2), round(structure, 4),
                     shift, (*panels, _png(diff)))


_Figures = tuple[float, list[float], float, tuple[float, float, float], np.ndarray]


def _measure(reference: np.ndarray, image: np.ndarray) -> _Figures:
    """PSNR of the whole and of each channel, SSIM, the mean colour shift, the difference picture."""
    # psnr's squared errors, once for the whole image and its channels (each made contiguous, as
    # psnr's own copy of a channel is: the same sums, so the same figures).
    squared = (reference.astype(np.float32) - image.astype(np.float32)) ** 2
    whole = _db(float(np.mean(squared)))
    channels = [_db(float(np.mean(np.ascontiguousarray(squared[..., c])))) for c in range(3)]
    structure = ssim(luminance(reference), luminance(image))
    r, g, b = (round(float(image[..., c].mean(dtype=np.float64) - reference[..., c].mean(dtype=np.float64)), 2)
               for c in range(3))
    diff = np.clip(np.abs(image.astype(np.int16) - reference.astype(np.int16)) * DIFF_GAIN, 0, 255).astype(np.uint8)
    return whole, channels, structure, (r, g, b), diff


def _identical(image: np.ndarray) -> _Figures:
    """What `_measure` gives for two equal images, exactly (tests/test_agreement.py holds it): no
    error, so PSNR_IDENTICAL_DB; SSIM 1.0, its numerator and denominator then being the same
    products; no shift; a black difference picture."""
    return PSNR_IDENTICAL_DB, [PSNR_IDENTICAL_DB] * 3, 1.0, (0.0, 0.0, 0.0), np.zeros_like(image)


def medoid(candidates: Sequence[tuple[str, np.ndarray]]) -> str:
    """The name whose image is closest to the others' (highest median PSNR), ties by name: among
    several hosts' first good runs, the one the class agrees with, not a lone outlier. Callers
    pass small copies (PANEL_PX): choosing needs n^2 comparisons."""
    def score(i: int) -> float:
        mine = candidates[i][1]
        others = [psnr(mine, c[1]) if c[1].shape == mine.shape else -math.inf
                  for j, c in enumerate(candidates) if j != i]
        return float(np.median(others)) if others else 0.0

    scores = [(-score(i), name) for i, (name, _) in enumerate(candidates)]
    return min(scores)[1]
