"""The 15 ImageNet-C corruptions (Hendrycks & Dietterich, 2019) of one uint8 image, seeded per image.

The pixels come from the PyPI package ``imagecorruptions-imaug`` (module ``imagecorruptions``), the fork that
runs on current numpy / scikit-image; it is the optional extra ``mal[robustness]`` and is imported lazily, so the
rest of MAL never needs it. Each call is seeded from (image index, corruption, severity), so a corrupted image
set is the same on every machine, whatever the number of worker processes.
"""
from __future__ import annotations

import difflib
import functools
import importlib.metadata
from collections.abc import Callable, Sequence

import numpy as np

from ..errors import MALError

#: The 15 ImageNet-C test corruptions, in the benchmark's order (noise, blur, weather, digital).
CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise",
    "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
    "snow", "frost", "fog", "brightness",
    "contrast", "elastic_transform", "pixelate", "jpeg_compression",
)
#: The benchmark's four groups, accepted by ``--corruptions`` beside ``all`` and single names.
GROUPS: dict[str, tuple[str, ...]] = {
    "noise": CORRUPTIONS[0:3], "blur": CORRUPTIONS[3:7], "weather": CORRUPTIONS[7:11], "digital": CORRUPTIONS[11:15],
}
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)
#: imagecorruptions refuses smaller images (its kernels and frost crops assume at least this side).
MIN_SIDE = 32
INSTALL_HINT = "mal eval --corruptions needs the robustness extra: pip install 'mal[robustness]'"
PACKAGE = "imagecorruptions-imaug"
#: These two draw from their own generator, seeded through a `seed` argument; the others use np.random's.
_SEED_ARGUMENT = frozenset({"impulse_noise", "glass_blur"})


class MissingExtraError(MALError, ImportError):
    """The optional robustness package is not installed (the message says how to install it)."""


def backend_tag() -> str:
    """'imagecorruptions-imaug <version>' from the installed metadata (no import: it is part of the cache key)."""
    try:
        return f"{PACKAGE}-{importlib.metadata.version(PACKAGE)}"
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        old = importlib.metadata.version("imagecorruptions")
    except importlib.metadata.PackageNotFoundError:
        raise MissingExtraError(INSTALL_HINT) from None
    raise MissingExtraError(f"the original imagecorruptions {old} is installed, which fails on glass_blur and fog "
                            f"with current numpy / scikit-image; replace it by its maintained fork: "
                            f"pip uninstall imagecorruptions && pip install 'mal[robustness]'")


@functools.lru_cache(maxsize=1)
def _corrupt_fn() -> Callable[..., np.ndarray]:
    """imagecorruptions.corrupt, imported on first use (it pulls in OpenCV, numba and scikit-image)."""
    backend_tag()
    try:
        from imagecorruptions import corrupt
    except ImportError as e:
        raise MissingExtraError(f"{INSTALL_HINT} (importing imagecorruptions failed: {e})") from None
    return corrupt


def parse_corruptions(text: str | Sequence[str]) -> list[str]:
    """'all', a group (noise, blur, weather, digital) or a comma list of names → names in benchmark order."""
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if not items:
        raise ValueError(f"--corruptions is empty; give 'all', a group {sorted(GROUPS)} or names from "
                         f"{', '.join(CORRUPTIONS)}")
    chosen: set[str] = set()
    for item in items:
        if item == "all":
            chosen.update(CORRUPTIONS)
        elif item in GROUPS:
            chosen.update(GROUPS[item])
        elif item in CORRUPTIONS:
            chosen.add(item)
        else:
            close = difflib.get_close_matches(item, [*CORRUPTIONS, *GROUPS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown corruption {item!r}{hint}; valid: all, {', '.join(GROUPS)}, "
                             f"{', '.join(CORRUPTIONS)}")
    return [c for c in CORRUPTIONS if c in chosen]


def parse_severities(text: str | Sequence[int]) -> list[int]:
    """'1-5', '1,3,5', '2' or '1-2,5' → sorted severities in 1..5."""
    if not isinstance(text, str):
        text = ",".join(str(s) for s in text)
    out: set[int] = set()
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"--severities {text!r}: expected a range or a comma list such as 1-5 or 1,3,5") from None
    if not out or not out <= set(SEVERITIES):
        raise ValueError(f"--severities {text!r}: severities are 1..5 (severity 0 is the clean image, always "
                         f"reported as the clean top-1), e.g. 1-5 or 1,3,5")
    return sorted(out)


def image_seed(index: int, corruption: str, severity: int) -> int:
    """A 32-bit seed from (image index, corruption, severity): the same on every run and in every worker."""
    return int(np.random.SeedSequence([index, CORRUPTIONS.index(corruption), severity]).generate_state(1)[0])


def corrupt_image(image: np.ndarray, corruption: str, severity: int, seed: int = 0) -> np.ndarray:
    """One corrupted copy of a uint8 (H, W, 3) image; severity 0 returns the image unchanged (a copy).

    The package draws its noise from np.random's global state (seeded here) or, for impulse_noise and glass_blur,
    from a `seed` argument; either way the result is a function of (image, corruption, severity, seed).
    """
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"corrupt_image needs a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    if corruption not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; valid: {', '.join(CORRUPTIONS)}")
    if severity == 0:
        return image.copy()
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 0 (clean) or 1..5, got {severity}")
    if min(image.shape[:2]) < MIN_SIDE:
        raise ValueError(f"the ImageNet-C corruptions need images of at least {MIN_SIDE}x{MIN_SIDE} pixels, got "
                         f"{image.shape[1]}x{image.shape[0]}; evaluate a model whose img_size is {MIN_SIDE} or more")
    extra = {"seed": seed} if corruption in _SEED_ARGUMENT else {}
    state = np.random.get_state()                       # the caller's global numpy stream stays as it was
    try:
        np.random.seed(seed)
        out = _corrupt_fn()(image, corruption_name=corruption, severity=severity, **extra)
    finally:
        np.random.set_state(state)
    if out.shape != image.shape or out.dtype != np.uint8:
        raise RuntimeError(f"{corruption} (severity {severity}) returned {out.dtype} {out.shape} for a "
                           f"{image.dtype} {image.shape} image; report this with the image size")
    return out


__all__ = ["CORRUPTIONS", "GROUPS", "SEVERITIES", "MIN_SIDE", "INSTALL_HINT", "MissingExtraError", "backend_tag",
           "parse_corruptions", "parse_severities", "image_seed", "corrupt_image"]
