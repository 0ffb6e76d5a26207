"""Intensity windows: a volume's values -> uint8 [0, 255], the mapping the models were trained on.

CT presets by level/width (README "Models"); MR and other modalities are clipped to
the 0.5-99.5 percentiles of their non-zero voxels; ``auto`` picks ``ct-soft`` when the
values look like Hounsfield units. RGB images are scaled by their min-max. numpy only.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np

from .errors import InputError, shown

#: CT presets as (level, width) in Hounsfield units.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "ct-soft": (40.0, 400.0),
    "ct-lung": (-600.0, 1500.0),
    "ct-bone": (400.0, 1800.0),  # a choice: wide enough for cortical bone and spine
    "ct-brain": (40.0, 80.0),
}
WINDOW_NAMES = ("auto", *CT_WINDOWS, "mr")
MR_PERCENTILES = (0.5, 99.5)

Window = Union[str, Sequence[float]]


def parse_window(window: Window) -> Union[str, tuple[float, float]]:
    """Validate a window as the prompt document spells it: a preset name or ``[low, high]``."""
    if isinstance(window, str):
        if window not in WINDOW_NAMES:
            raise InputError(f"unknown window {shown(window)}; use one of {', '.join(WINDOW_NAMES)} or [low, high]")
        return window
    try:
        low, high = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError(f"window must be a preset name or [low, high], got {shown(window)}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise InputError(f"window [low, high] needs finite low < high, got [{low}, {high}]")
    return (low, high)


def window_from_text(text: str) -> Window:
    """A window as the command line spells it: a preset name or ``LOW,HIGH``."""
    if "," in text:
        try:
            return [float(v) for v in text.split(",")]
        except ValueError:
            raise InputError(f"--window LOW,HIGH needs two numbers, got {text!r}") from None
    return text


def looks_like_ct(volume: np.ndarray) -> bool:
    """Hounsfield units: integer-valued, air near -1000 and something denser than water."""
    lo, hi = float(volume.min()), float(volume.max())
    integral = np.issubdtype(volume.dtype, np.integer) or bool(np.all(np.mod(volume.ravel()[::97], 1) == 0))
    return integral and -1100.0 <= lo <= -500.0 and hi >= 100.0


def resolve_window(volume: np.ndarray, window: Window) -> tuple[float, float]:
    """Turn a window (preset, ``auto`` or ``[low, high]``) into concrete intensity bounds."""
    parsed = parse_window(window)
    if isinstance(parsed, tuple):
        return parsed
    if parsed == "auto":
        parsed = "ct-soft" if looks_like_ct(volume) else "mr"
    if parsed in CT_WINDOWS:
        level, width = CT_WINDOWS[parsed]
        return (level - width / 2.0, level + width / 2.0)
    nonzero = volume[volume != 0]
    if nonzero.size == 0:
        raise InputError("the image is all zeros: nothing to segment")
    low, high = np.percentile(nonzero, MR_PERCENTILES)
    if high <= low:
        low, high = float(nonzero.min()), float(nonzero.max())
    if high <= low:
        raise InputError("the image has a single intensity value: nothing to segment")
    return (float(low), float(high))


def check_finite(array: np.ndarray, what: str = "image") -> None:
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise InputError(f"{what} contains NaN or infinite values")


def to_uint8(volume: np.ndarray, window: Window = "auto", rgb: bool = False) -> tuple[np.ndarray, str]:
    """Map a grayscale volume to [0, 255] by its window, or an RGB one by its min-max.

    Returns the uint8 array (same shape) and a short description of the mapping,
    used in cache keys so that a different window never reuses an embedding.
    The caller's array is never modified.
    """
    check_finite(volume)
    if rgb:
        if volume.dtype == np.uint8:
            return volume, "rgb"
        lo, hi = float(volume.min()), float(volume.max())
        if hi <= lo:
            raise InputError("the RGB image has a single intensity value: nothing to segment")
        scaled = (volume.astype(np.float32) - lo) * (255.0 / (hi - lo))
        return np.rint(scaled).astype(np.uint8), f"rgb[{lo:.6g},{hi:.6g}]"
    low, high = resolve_window(volume, window)
    scaled = (np.clip(volume.astype(np.float32), low, high) - low) * (255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8), f"[{low:.6g},{high:.6g}]"
