"""Is a generated PNG a picture? Size, not black, not flat, no NaN blocks; plus a small thumbnail."""

from __future__ import annotations

import io

from PIL import Image, ImageChops, ImageStat, UnidentifiedImageError

from provisioner.verify.checks import ImageCheck

# A broken pipeline rarely crashes: it writes a picture that is wrong. The usual shapes:
# - fp16 overflow in the VAE or a wrong-precision DiT decode to an all-black image;
BLACK_MEAN_MAX = 8.0          # mean luminance (0-255) at or under this: black. Night photos sit > 20.
# - a sampler that did nothing (0 steps, a dropped latent) gives one flat colour;
UNIFORM_STD_MIN = 3.0         # luminance std dev under this: flat. Real pictures have std > 20.
# - NaN/inf in the latent decodes to exact 0 (black) blocks, or to channels clipped at 0/255
#   (pure magenta, green, cyan...) in tiles, while the rest of the picture looks fine.
PURE_BLACK_FRACTION_MAX = 0.25   # share of exact (0,0,0) pixels; photos keep shadows above 0
SATURATED_FRACTION_MAX = 0.25    # share of pixels whose every channel is 0 or 255, black/white aside
THUMBNAIL_PX = 256
# The report's small pictures (thumbnails, agreement panels): zlib level 4, not Pillow's 6. On a
# 256 px picture of a generated image 4 took 12 ms against 6's 61 ms (30 ms quiet), for a file no
# larger (79 KB against 81 KB); 1-3 were faster still but 13-18 % larger.
PNG_LEVEL = 4


def _share(mask: Image.Image) -> float:
    """Fraction of 255 pixels in a 0/255 'L' mask."""
    hist = mask.histogram()
    return hist[255] / max(1, sum(hist))


def check_image(png: bytes, expected_size: tuple[int, int] | None) -> ImageCheck:
    """Decode `png` and judge it; `expected_size` (width, height) None skips the size test."""
    return look(png, expected_size, None)[0]


def look(png: bytes, expected_size: tuple[int, int] | None,
         max_px: int | None = THUMBNAIL_PX) -> tuple[ImageCheck, bytes]:
    """`check_image` and `thumbnail` (None: none made, b"") of `png`, decoded once."""
    try:
        img = Image.open(io.BytesIO(png))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        return ImageCheck(False, 0, 0, 0.0, 0.0, 0.0, 0.0, (f"not a readable image ({err})",)), b""
    rgb = img.convert("RGB")
    return _judge(img, rgb, expected_size), b"" if max_px is None else _thumbnail(rgb, max_px)


def _judge(img: Image.Image, rgb: Image.Image, expected_size: tuple[int, int] | None) -> ImageCheck:
    stat = ImageStat.Stat(rgb.convert("L"))
    mean, std = stat.mean[0], stat.stddev[0]
    r, g, b = rgb.split()
    black = _share(ImageChops.lighter(ImageChops.lighter(r, g), b).point(lambda v: 255 if v == 0 else 0))
    white = _share(ImageChops.darker(ImageChops.darker(r, g), b).point(lambda v: 255 if v == 255 else 0))
    extreme = [c.point(lambda v: 255 if v in (0, 255) else 0) for c in (r, g, b)]
    all_extreme = _share(ImageChops.darker(ImageChops.darker(extreme[0], extreme[1]), extreme[2]))
    saturated = max(0.0, all_extreme - black - white)
    reasons = []
    if expected_size and img.size != tuple(expected_size):
        reasons.append(f"size {img.width}x{img.height}, expected {expected_size[0]}x{expected_size[1]}")
    if mean <= BLACK_MEAN_MAX:
        reasons.append(f"black (mean luminance {mean:.1f} <= {BLACK_MEAN_MAX:g})")
    elif std < UNIFORM_STD_MIN:
        reasons.append(f"uniform (luminance std {std:.2f} < {UNIFORM_STD_MIN:g})")
    if black > PURE_BLACK_FRACTION_MAX and mean > BLACK_MEAN_MAX:
        reasons.append(f"{black:.0%} pure black pixels (NaN blocks?)")
    if saturated > SATURATED_FRACTION_MAX:
        reasons.append(f"{saturated:.0%} pure-colour pixels (NaN/inf artefacts?)")
    return ImageCheck(not reasons, img.width, img.height, round(mean, 2), round(std, 2),
                      round(black, 4), round(saturated, 4), tuple(reasons))


def thumbnail(png: bytes, max_px: int = THUMBNAIL_PX) -> bytes:
    """A PNG no larger than `max_px` on its longest side, for reports; b'' when `png` is unreadable."""
    try:
        img = Image.open(io.BytesIO(png))
        img.load()
    except (UnidentifiedImageError, OSError, SyntaxError):
        return b""
    return _thumbnail(img.convert("RGB"), max_px)


def _thumbnail(rgb: Image.Image, max_px: int) -> bytes:
    rgb.thumbnail((max_px, max_px))         # in place: `look` judged it already
    return encode_png(rgb)


def encode_png(img: Image.Image) -> bytes:
    """A report picture as PNG, at zlib level PNG_LEVEL."""
    out = io.BytesIO()
    img.save(out, format="PNG", compress_level=PNG_LEVEL)
    return out.getvalue()
