"""Decoding image files to 8-bit RGB, whatever their Pillow mode, so every sample has one pixel format.

Alpha is composited on white, 16/32-bit and float images are rescaled by their value range, and decoding is
deterministic (the same file gives the same pixels in any process).
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

#: File suffixes (case-insensitive) treated as images: torchvision's list plus GIF and JFIF.
IMG_EXTENSIONS: tuple[str, ...] = (
    ".jpg", ".jpeg", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif",
)

MAX_U8 = 255
_MAX_U16 = 65535
_WHITE_RGBA = (255, 255, 255, 255)
#: Modes Pillow converts to RGB correctly by itself (no alpha, 8 bits or fewer per channel).
_DIRECT_RGB_MODES = frozenset({"1", "L", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
#: Modes with an alpha channel: composited on white.
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


def _high_bit_to_u8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale a one-channel 16-bit / 32-bit int / float array to uint8 by its value range.

    * 16-bit modes (``I;16*``) and ``I`` with values in [0, 65535]: ``round(v * 255 / 65535)``,
      so 65535 → 255 (full-range rescale, not clipping).
    * ``F``: values in [0, 1] → ``round(v * 255)``; in [0, 255] → rounded as is; in [0, 65535] →
      as 16-bit; anything else (and ``I`` outside [0, 65535]) → min-max stretched to [0, 255].
    NaN/inf become 0.
    """
    a = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = a * MAX_U8
    elif mode == "F" and lo >= 0.0 and hi <= MAX_U8:
        scaled = a
    elif lo >= 0.0 and hi <= _MAX_U16:
        scaled = a * (MAX_U8 / _MAX_U16)
    elif hi > lo:
        scaled = (a - lo) * (MAX_U8 / (hi - lo))
    else:
        scaled = np.zeros_like(a)
    return np.clip(np.rint(scaled), 0, MAX_U8).astype(np.uint8)


def to_rgb8(img: Image.Image) -> Image.Image:
    """Return a new 8-bit RGB copy of ``img``, whatever its mode.

    Alpha (LA, PA, RGBA, palette with transparency) is composited on a white background.
    16-bit and 32-bit one-channel images are rescaled by value range (see :func:`_high_bit_to_u8`).
    CMYK uses Pillow's conversion (no ICC colour management). Multi-frame files give the first frame.
    """
    mode = img.mode
    if mode == "P":
        mode = "PA" if "transparency" in img.info else "RGB"
        img = img.convert("RGBA" if mode == "PA" else "RGB")
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE_RGBA)
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in _DIRECT_RGB_MODES:
        return img.convert("RGB")  # always a new image, even for RGB (convert copies)
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img)
        if arr.ndim != 2:
            raise ValueError(f"unsupported {arr.ndim}-d array for image mode {mode!r}")
        return Image.fromarray(_high_bit_to_u8(arr, mode)).convert("RGB")
    return img.convert("RGB")  # any other mode Pillow knows; raises ValueError if it cannot


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Open, fully decode (truncated files raise) and convert one file to 8-bit RGB."""
    with Image.open(path) as img:
        img.load()
        return to_rgb8(img)


__all__ = ["IMG_EXTENSIONS", "to_rgb8", "load_rgb_image"]
