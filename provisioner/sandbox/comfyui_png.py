"""Real PNG files from the standard library alone: the stand-in runs in a sandbox venv without Pillow."""

from __future__ import annotations

import functools
import random
import struct
import zlib

SIGNATURE = b"\x89PNG\r\n\x1a\n"
GRAIN = 25                      # noise amplitude (levels): texture, so the picture is not flat
# Degraded pictures a broken host makes while it reports success: more noise (a half-broken
# kernel), a colour cast (a wrong VAE or text encoder), or another size (a wrong latent node).
MODES = ("normal", "black", "uniform", "noisy", "shifted", "wrong-size")
NOISY_GRAIN = 101
SHIFT = (36, 0, -12)            # levels added to R, G, B
WRONG_SIZE = 0.75               # of each side


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode(width: int, height: int, rows: list[bytes], text: dict[str, str] | None = None) -> bytes:
    """An 8-bit RGB PNG from `height` rows of `3 * width` bytes, with tEXt chunks (ComfyUI puts the
    graph in `prompt`)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"".join(b"\x00" + row for row in rows)          # filter type 0 on every row
    texts = b"".join(_chunk(b"tEXt", k.encode("latin-1") + b"\x00" + v.encode("latin-1", "replace"))
                     for k, v in (text or {}).items())
    return SIGNATURE + _chunk(b"IHDR", header) + texts + _chunk(b"IDAT", zlib.compress(raw, 1)) + \
        _chunk(b"IEND", b"")


def size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR; None when `data` is not a PNG."""
    if not data.startswith(SIGNATURE) or data[12:16] != b"IHDR":
        return None
    return struct.unpack(">II", data[16:24])


@functools.lru_cache(maxsize=1024)
def _table(base: int, grain: int = GRAIN) -> bytes:
    """Maps a random byte to `base` plus grain, clamped: one bytes.translate per row and channel."""
    return bytes(min(255, max(1, base + v % grain - grain // 2)) for v in range(256))


def picture(width: int, height: int, seed: int, mode: str, text: dict[str, str] | None = None,
            device: str = "") -> bytes:
    """normal: a vertical two-colour gradient with grain, different per seed; black; uniform grey;
    or one of the degraded MODES. `device` shifts rows by a level or so, as another GPU's rounding
    would: the same seed gives slightly different pictures on different GPUs."""
    if mode in ("black", "uniform"):
        flat = bytes((0, 0, 0) if mode == "black" else (128, 128, 128)) * width
        return encode(width, height, [flat] * height, text)
    if mode == "wrong-size":
        width, height = round(width * WRONG_SIZE), round(height * WRONG_SIZE)
    grain = NOISY_GRAIN if mode == "noisy" else GRAIN
    shift = SHIFT if mode == "shifted" else (0, 0, 0)
    rounding = random.Random(f"{device}/{seed}") if device else None
    rng = random.Random(seed)
    top = [rng.randint(40, 110) for _ in range(3)]              # dark to light: a real contrast
    bottom = [rng.randint(150, 220) for _ in range(3)]
    if rng.random() < 0.5:
        top, bottom = bottom, top
    rows = []
    for y in range(height):
        t = y / max(1, height - 1)
        row = bytearray(3 * width)
        for c in range(3):
            noise = rng.randbytes(width)
            level = round(top[c] + (bottom[c] - top[c]) * t) + shift[c] + (rounding.randint(-1, 1) if rounding else 0)
            row[c::3] = noise.translate(_table(level, grain))
        rows.append(bytes(row))
    return encode(width, height, rows, text)
