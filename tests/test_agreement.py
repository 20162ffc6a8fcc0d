"""Image agreement metrics: PSNR and SSIM as the literature defines them (checked against
scikit-image), the floors derived from upstream's tolerance, and what each degradation trips."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from provisioner.catalog import tolerances
from provisioner.config.model import AgreementSpec
from provisioner.verify import agreement, checks
from provisioner.verify.agreement import Agreement, Reference, compare, decode, luminance, medoid, psnr, ssim

SCHEMA = Path(__file__).resolve().parents[1] / "provisioner" / "config" / "schemas" / "profile.schema.json"


def vector() -> tuple[np.ndarray, np.ndarray]:
    """A small test pair: a patterned image and a copy with uniform noise of +-20 levels."""
    y, x = np.mgrid[0:64, 0:80]
    base = np.stack([(x * 3) % 256, (y * 4) % 256, ((x + y) * 2) % 256], -1).astype(np.uint8)
    noise = np.random.default_rng(7).integers(-20, 21, base.shape)
    return base, np.clip(base.astype(np.int16) + noise, 0, 255).astype(np.uint8)


def test_psnr_and_ssim_match_scikit_image_on_a_test_vector() -> None:
    # Expected values from scikit-image 0.26: peak_signal_noise_ratio(data_range=255) and
    # structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    # data_range=255) on the same luminance arrays.
    base, noisy = vector()
    assert psnr(base, noisy) == pytest.approx(26.80789812490096, abs=1e-6)
    assert ssim(luminance(base), luminance(noisy)) == pytest.approx(0.6204781062625072, abs=1e-4)
    assert psnr(base, base) == agreement.PSNR_IDENTICAL_DB
    assert ssim(luminance(base), luminance(base)) == pytest.approx(1.0)


def test_compare_gives_psnr_s_own_figures_from_one_pass_of_squared_errors() -> None:
    """compare squares the errors once for the whole image and its channels: each figure is still
    exactly psnr's own (a megapixel, so that numpy's pairwise sums run over many blocks)."""
    rng = np.random.default_rng(5)
    ref = rng.integers(0, 256, (1024, 1024, 3), dtype=np.uint8)
    image = np.clip(ref.astype(np.int16) + rng.integers(-9, 10, ref.shape) * (np.arange(3) + 1), 0, 255).astype(np.uint8)
    squared = (ref.astype(np.float32) - image.astype(np.float32)) ** 2
    for c in range(3):
        assert agreement._db(float(np.mean(np.ascontiguousarray(squared[..., c])))) == psnr(ref[..., c], image[..., c])
    assert agreement._db(float(np.mean(squared))) == psnr(ref, image)
    found = judged(image, ref)
    assert found.psnr_db == round(psnr(ref, image), 2)
    assert found.psnr_channel_min_db == round(min(psnr(ref[..., c], image[..., c]) for c in range(3)), 2)
    # The worst channel is the one named when it alone fails (blue here: the largest errors).
    strict = compare(ref, image, AgreementSpec(psnr_min_db=25.0, ssim_min=0.0), key="k", prompt="p", seed=42,
                     source=None)
    assert found.psnr_db > 25.0 > found.psnr_channel_min_db
    assert not strict.passed and strict.detail.startswith(f"B channel PSNR {found.psnr_channel_min_db:.1f} dB < 25 dB")


@pytest.mark.parametrize("shape", [(384, 512, 3), (1024, 1024, 3), (8, 8, 3)])
def test_equal_images_get_exactly_the_figures_the_arithmetic_gives(shape: tuple[int, int, int]) -> None:
    """compare skips the arithmetic for equal pixels (the reference's own host, and often its whole
    GPU class): every figure and the difference picture are still what it would compute."""
    rng = np.random.default_rng(sum(shape))
    for image in (rng.integers(0, 256, shape, dtype=np.uint8), np.zeros(shape, np.uint8),
                  np.full(shape, 255, np.uint8), photo(size=(shape[1], shape[0]))):
        whole, channels, structure, shift, diff = agreement._measure(image, image.copy())
        known = agreement._identical(image)
        assert (whole, channels, structure, shift) == known[:4]
        assert all(type(a) is type(b) for a, b in zip((whole, structure, *channels, *shift), (*known[:1], known[2], *known[1], *known[3])))
        assert diff.dtype == known[4].dtype and np.array_equal(diff, known[4])
        assert judged(image.copy(), image) == judged(image, image)
        assert judged(image.copy(), image).detail == "identical pixels"


def test_what_verify_loads_before_its_hosts_holds_no_numpy_jinja2_or_report_modules() -> None:
    """`provision verify --report DIR` reads the report's file names before any host, then runs
    the verification: numpy (0.1 s), jinja2 and the report's modules load while the hosts work."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from provisioner.report import JSON_NAME\n"
            "early = sorted(m for m in sys.modules if m.startswith(('provisioner.report.', 'PIL', 'numpy')))\n"
            "import provisioner.verify.run\n"
            "print(early, 'numpy' in sys.modules, 'jinja2' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "False", "False"], out


def test_the_defaults_are_upstreams_floor_in_code_schema_and_profile() -> None:
    assert tolerances.upstream_psnr_floor(31) == pytest.approx(20.4)      # edit: expected 31 dB
    assert tolerances.upstream_psnr_floor(16) == pytest.approx(13.6)      # text-to-image: 16 dB
    assert AgreementSpec() == AgreementSpec(tolerances.PSNR_MIN_DB, tolerances.SSIM_MIN)
    props = json.loads(SCHEMA.read_text())["properties"]["verify"]["properties"]["agreement"]["properties"]
    assert props["psnr_min_db"]["default"] == tolerances.PSNR_MIN_DB == 20.4
    assert props["ssim_min"]["default"] == tolerances.SSIM_MIN


def photo(seed: int = 3, size: tuple[int, int] = (256, 192)) -> np.ndarray:
    """Smooth shapes with a little texture: photo-like enough for the metrics."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    sky = np.stack([80 + x / 4, 120 + y / 3, 200 - y / 4], -1)
    blob = ((x - size[0] / 2) ** 2 + (y - size[1] / 2) ** 2 < (size[1] / 4) ** 2)[..., None] * np.array([90, -40, -90])
    return np.clip(sky + blob + rng.normal(0, 4, sky.shape), 0, 255).astype(np.uint8)


def judged(image: np.ndarray, reference: np.ndarray | None = None) -> Agreement:
    ref = photo() if reference is None else reference
    return compare(ref, image, AgreementSpec(), key="k", prompt="p", seed=42,
                   source=Reference("rtx-3090-24gib", "k", "gpu-01", "2026-11-24T10:00:00Z"))


def test_a_close_image_agrees_and_each_degradation_fails_for_its_own_reason() -> None:
    ref = photo()
    rng = np.random.default_rng(11)
    close = np.clip(ref.astype(np.int16) + rng.integers(-1, 2, ref.shape), 0, 255).astype(np.uint8)
    ok = judged(close)
    assert ok.passed and ok.psnr_db is not None and ok.psnr_db > 45 and ok.ssim is not None and ok.ssim > 0.95
    assert all(p.startswith(b"\x89PNG") for p in ok.panels)

    noisy = np.clip(ref.astype(np.float32) + rng.normal(0, 40, ref.shape), 0, 255).astype(np.uint8)
    bad = judged(noisy)
    assert not bad.passed and bad.detail.startswith("PSNR ") and "SSIM" in bad.detail

    cast = np.clip(ref.astype(np.int16) + np.array([35, 0, 0]), 0, 255).astype(np.uint8)
    shifted = judged(cast)
    # The whole-image PSNR stays above the floor: only the per-channel figure catches the cast.
    assert shifted.psnr_db is not None and shifted.psnr_db > tolerances.PSNR_MIN_DB
    assert not shifted.passed and shifted.detail.startswith("R channel PSNR") and "R +35" in shifted.detail
    assert shifted.mean_shift is not None and shifted.mean_shift[0] == pytest.approx(35, abs=1)

    other = judged(photo(size=(256, 128)))
    assert not other.passed and other.detail == "size 256x128, the reference is 256x192"
    assert other.psnr_db is None and other.panels[2] == b""


def test_agreement_round_trips_through_json() -> None:
    got = judged(photo())
    again = Agreement.from_json(json.loads(json.dumps(got.to_json())))
    assert again == got
    assert "panels_png_base64" not in got.to_json(panels=False)
    # ...and inside a host's verification, as a fleet report is read back
    held = checks.HostVerification("gpu-01", (), agreement=(got,))
    assert checks.HostVerification.from_json(json.loads(json.dumps(held.to_json()))).agreement == (got,)


def test_the_reference_among_first_runs_is_the_one_the_class_agrees_with() -> None:
    ref = photo()
    rng = np.random.default_rng(5)
    near = [np.clip(ref.astype(np.int16) + rng.integers(-2, 3, ref.shape), 0, 255).astype(np.uint8) for _ in range(3)]
    outlier = np.clip(ref.astype(np.float32) + rng.normal(0, 50, ref.shape), 0, 255).astype(np.uint8)
    # The outlier sorts first by name, yet the class's consensus wins.
    assert medoid([("gpu-00", outlier), ("gpu-02", near[0]), ("gpu-03", near[1]), ("gpu-04", near[2])]) != "gpu-00"
    assert medoid([("b", near[0]), ("a", near[1])]) == "a"           # two that agree: by name


def test_decode_refuses_what_is_not_an_image() -> None:
    with pytest.raises(agreement.NotAnImage):
        decode(b"not a png")
    out = io.BytesIO()
    Image.new("L", (8, 4), 9).save(out, format="PNG")
    assert decode(out.getvalue()).shape == (4, 8, 3)


def test_check_words_the_outcome() -> None:
    ok, bad = judged(photo()), judged(photo(seed=4, size=(256, 128)))
    assert checks.image_agreement([ok]).passed
    failed = checks.image_agreement([ok, bad])
    assert not failed.passed and "1/2 images disagree" in failed.detail and "the GPU class" in failed.detail and "from gpu-01" in failed.detail
    none = checks.image_agreement([], "no reference store; pass --report DIR")
    assert none.passed and none.detail == "no reference store; pass --report DIR"


@pytest.mark.parametrize("mode, failure", [("noisy", "PSNR "), ("shifted", "R channel PSNR"),
                                           ("wrong-size", "size 192x192, the reference is 256x256")])
def test_the_stand_ins_degraded_pictures_fail_and_another_gpus_rounding_passes(mode: str, failure: str) -> None:
    from provisioner.sandbox import comfyui_png

    reference = decode(comfyui_png.picture(256, 256, 42, "normal", device="GPU-a:/hosts/gpu-01"))
    other_gpu = judged(decode(comfyui_png.picture(256, 256, 42, "normal", device="GPU-b:/hosts/gpu-02")), reference)
    assert other_gpu.passed and other_gpu.psnr_db is not None and 40 < other_gpu.psnr_db < agreement.PSNR_IDENTICAL_DB
    degraded = judged(decode(comfyui_png.picture(256, 256, 42, mode, device="GPU-c:/hosts/gpu-03")), reference)
    assert not degraded.passed and degraded.detail.startswith(failure), degraded.detail
