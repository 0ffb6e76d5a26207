"""Intensities, slice orientation, and each model's input/output recipe.

Frames used in this module:
- *volume array*: numpy ``(k, j, i)`` as SimpleITK's ``GetArrayFromImage`` gives it,
  plus a trailing channel axis of 3 for RGB.
- *slice pixels*: a 2D slice ``(rows, cols)``; a box is ``[x_min, y_min, x_max, y_max]``
  with x = column and y = row, inclusive pixel indices.
- *view pixels*: the slice after :class:`SliceView` turned it into the orientation in
  which it reaches the model.
- *model pixels*: the model's square input (1024 for MedSAM, 256 for LiteMedSAM).

The two recipes mirror upstream bowang-lab/MedSAM:
- MedSAM ViT-B: ``MedSAM_Inference.py`` (skimage bicubic resize to 1024 without keeping
  aspect, per-image min-max to [0, 1], box scaled by 1024/W and 1024/H, low-res
  logits -> sigmoid -> bilinear to (H, W) -> > 0.5).
- LiteMedSAM: ``CVPR24_LiteMedSAM_infer.py`` (``resize_longest_side`` with OpenCV
  INTER_AREA, per-image min-max, ``pad_image`` bottom/right, box scaled by
  256/max(H, W), ``postprocess_masks`` crop -> bilinear -> sigmoid > 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence, Union

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from skimage import transform as sk_transform

from .errors import InputError

# ---------------------------------------------------------------- intensities

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
            raise InputError(f"unknown window {window!r}; use one of {', '.join(WINDOW_NAMES)} or [low, high]")
        return window
    try:
        low, high = (float(v) for v in window)
    except (TypeError, ValueError):
        raise InputError(f"window must be a preset name or [low, high], got {window!r}") from None
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise InputError(f"window [low, high] needs finite low < high, got [{low}, {high}]")
    return (low, high)


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


# ------------------------------------------------------------- slice geometry


def check_box(box: Sequence[float], shape: tuple[int, int], where: str = "") -> tuple[np.ndarray, str | None]:
    """Validate an inclusive ``[x_min, y_min, x_max, y_max]`` box on a ``(rows, cols)`` slice.

    A box partly outside the slice is clipped; the note says so. Reversed, zero-area
    and wholly outside boxes are errors, since no mask could honestly answer them.
    """
    prefix = f"{where}: " if where else ""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise InputError(f"{prefix}a box is [x_min, y_min, x_max, y_max], got {box!r}") from None
    if not all(np.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InputError(f"{prefix}box {list(box)} has a non-finite coordinate")
    if x1 < x0 or y1 < y0:
        raise InputError(f"{prefix}box {list(box)} is reversed (min > max)")
    if x1 == x0 or y1 == y0:
        raise InputError(f"{prefix}box {list(box)} has zero area")
    rows, cols = shape
    if x1 < 0 or y1 < 0 or x0 > cols - 1 or y0 > rows - 1:
        raise InputError(f"{prefix}box {list(box)} lies outside the {cols}x{rows} slice")
    clipped = np.array([max(x0, 0.0), max(y0, 0.0), min(x1, cols - 1.0), min(y1, rows - 1.0)])
    note = None
    if not np.array_equal(clipped, [x0, y0, x1, y1]):
        note = f"{prefix}box {list(box)} clipped to {clipped.tolist()} (the slice is {cols}x{rows})"
    return clipped, note


@dataclass(frozen=True)
class SliceView:
    """An exact in-plane turn of a slice: optional transpose, then optional flips.

    ``to_view`` and ``from_view`` are inverse; boxes map with them exactly.
    """

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @property
    def key(self) -> str:
        return f"T{int(self.transpose)}R{int(self.flip_rows)}C{int(self.flip_cols)}"

    def to_view(self, image: np.ndarray) -> np.ndarray:
        """``(rows, cols[, C])`` slice -> view pixels."""
        out = np.swapaxes(image, 0, 1) if self.transpose else image
        if self.flip_rows:
            out = out[::-1]
        if self.flip_cols:
            out = out[:, ::-1]
        return out

    def from_view(self, image: np.ndarray) -> np.ndarray:
        out = image
        if self.flip_cols:
            out = out[:, ::-1]
        if self.flip_rows:
            out = out[::-1]
        return np.swapaxes(out, 0, 1) if self.transpose else out

    def box_to_view(self, box: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
        """Box in slice pixels of a ``(rows, cols)`` slice -> box in view pixels."""
        x0, y0, x1, y1 = (float(v) for v in box)
        rows, cols = shape
        if self.transpose:
            x0, y0, x1, y1 = y0, x0, y1, x1
            rows, cols = cols, rows
        if self.flip_rows:
            y0, y1 = rows - 1 - y1, rows - 1 - y0
        if self.flip_cols:
            x0, x1 = cols - 1 - x1, cols - 1 - x0
        return np.array([x0, y0, x1, y1], dtype=np.float64)

    def view_shape(self, shape: tuple[int, int]) -> tuple[int, int]:
        return (shape[1], shape[0]) if self.transpose else (shape[0], shape[1])


IDENTITY_VIEW = SliceView()

# Unit vectors in LPS of the patient directions used below.
_R, _A, _S = np.array([-1.0, 0.0, 0.0]), np.array([0.0, -1.0, 0.0]), np.array([0.0, 0.0, 1.0])

#: In-plane conventions, per slice plane (the patient axis the slice normal follows: 0 sagittal,
#: 1 coronal, 2 axial), as (LPS direction along view columns, LPS direction down view rows).
#: ``ras``: slices appear as they do in the array of a volume stored in RAS order (nibabel's
#: closest-canonical, MONAI's Orientation("RAS")), which many of MedSAM's NIfTI training sets are.
#: ``radiological``: the reading-room view (axial: patient right on the left, anterior on top;
#: coronal: right on the left, superior on top; sagittal: anterior on the left, superior on top).
VIEW_CONVENTIONS: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {
    "ras": {0: (_A, _S), 1: (_R, _S), 2: (_R, _A)},
    "radiological": {0: (-_A, -_S), 1: (_R, -_S), 2: (_R, -_A)},
}
#: ``array`` keeps the slice as the file stores it (no reorientation).
ORIENTATIONS = ("ras", "radiological", "array")
DEFAULT_ORIENTATION = "ras"


def in_plane_axes(axis: int) -> tuple[int, int]:
    """Index axes (u, v) of a slice taken along ``axis``; slice columns run along u, rows along v."""
    u, v = (a for a in (0, 1, 2) if a != axis)
    return u, v


def canonical_view(direction: np.ndarray, axis: int, orientation: str = DEFAULT_ORIENTATION) -> SliceView:
    """The :class:`SliceView` that shows a slice along ``axis`` in a fixed patient orientation.

    ``direction`` is the 3x3 LPS direction matrix whose columns are the i, j, k axes
    (SimpleITK's ``GetDirection`` reshaped); oblique volumes take the nearest plane.
    Because the view depends on the patient frame only, the same anatomy reaches the
    model the same way however the file orders its voxels.
    """
    if orientation == "array":
        return IDENTITY_VIEW
    if orientation not in VIEW_CONVENTIONS:
        raise InputError(f"orientation must be one of {', '.join(ORIENTATIONS)}, got {orientation!r}")
    direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    plane = int(np.argmax(np.abs(direction[:, axis])))
    want_cols, want_rows = VIEW_CONVENTIONS[orientation][plane]
    u, v = in_plane_axes(axis)
    du, dv = direction[:, u], direction[:, v]
    straight = abs(du @ want_cols) + abs(dv @ want_rows)
    swapped = abs(dv @ want_cols) + abs(du @ want_rows)
    transpose = swapped > straight
    cols_dir, rows_dir = (dv, du) if transpose else (du, dv)
    return SliceView(transpose=bool(transpose), flip_rows=bool(rows_dir @ want_rows < 0),
                     flip_cols=bool(cols_dir @ want_cols < 0))


# ---------------------------------------------------------------- model recipes


def _three_channels(image_u8: np.ndarray) -> np.ndarray:
    if image_u8.ndim == 2:
        return np.repeat(image_u8[:, :, None], 3, axis=-1)
    if image_u8.ndim == 3 and image_u8.shape[-1] == 3:
        return image_u8
    raise InputError(f"a slice is (H, W) or (H, W, 3); got shape {image_u8.shape}")


def _min_max(image: np.ndarray, what: str) -> np.ndarray:
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        raise InputError(f"{what} is constant (min = max = {lo:g}): nothing to segment")
    return ((image - lo) / (hi - lo)).astype(np.float32)


@dataclass(frozen=True)
class Recipe:
    """How one model family turns view pixels into model input and logits into probabilities."""

    name: str
    input_size: int
    image_to_input: Callable[[np.ndarray], np.ndarray]
    pixel_scale: Callable[[tuple[int, int]], tuple[float, float]]
    logits_to_probabilities: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]

    def coords_to_input(self, coords: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(x, y) pairs ``(..., 2)`` in view pixels of a ``(rows, cols)`` slice -> model pixels."""
        return np.asarray(coords, dtype=np.float64) * np.array(self.pixel_scale(shape))


def medsam_input(image_u8: np.ndarray) -> np.ndarray:
    """(H, W[, 3]) uint8 -> (3, 1024, 1024) float32; mirrors MedSAM_Inference.py."""
    img = _three_channels(image_u8)
    resized = sk_transform.resize(img, (1024, 1024), order=3, preserve_range=True, anti_aliasing=True)
    resized = resized.astype(np.uint8)
    return _min_max(resized.astype(np.float32), "the slice").transpose(2, 0, 1).copy()


def medsam_scale(shape: tuple[int, int]) -> tuple[float, float]:
    """x scaled by 1024/W and y by 1024/H: the slice is stretched to a square."""
    rows, cols = shape
    return (1024.0 / cols, 1024.0 / rows)


def medsam_probabilities(logits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(N, 1, 256, 256) logits -> (N, H, W) probabilities: sigmoid, then bilinear."""
    probs = torch.sigmoid(logits.float())
    return F.interpolate(probs, size=shape, mode="bilinear", align_corners=False)[:, 0]


def _litemedsam_resized_shape(shape: tuple[int, int]) -> tuple[int, int]:
    rows, cols = shape
    scale = 256.0 / max(rows, cols)
    # At least one row/column: upstream's rounding gives 0 (and OpenCV fails) beyond a 512:1 aspect.
    return max(1, int(rows * scale + 0.5)), max(1, int(cols * scale + 0.5))


def litemedsam_input(image_u8: np.ndarray) -> np.ndarray:
    """(H, W[, 3]) uint8 -> (3, 256, 256) float32; mirrors resize_longest_side + pad_image."""
    img = _three_channels(image_u8)
    new_rows, new_cols = _litemedsam_resized_shape(img.shape[:2])
    # Upstream always uses INTER_AREA, which is exact area averaging when shrinking but
    # nearest-neighbour blocks when enlarging: slices under 256 pixels (CTChest4's 128x128)
    # are enlarged bilinearly instead (lung Dice 0.78/0.84 -> 0.83/0.85 on CTChest4).
    interpolation = cv2.INTER_AREA if new_rows <= img.shape[0] else cv2.INTER_LINEAR
    resized = cv2.resize(img, (new_cols, new_rows), interpolation=interpolation).astype(np.float32)
    normalized = _min_max(resized, "the slice")
    padded = np.zeros((256, 256, 3), dtype=np.float32)
    padded[:new_rows, :new_cols] = normalized
    return padded.transpose(2, 0, 1).copy()


def litemedsam_scale(shape: tuple[int, int]) -> tuple[float, float]:
    """Both axes scaled by 256/max(H, W): the aspect is kept."""
    return (256.0 / max(shape), 256.0 / max(shape))


def litemedsam_probabilities(logits: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """(N, 1, 256, 256) logits -> (N, H, W): crop the unpadded part, bilinear, sigmoid."""
    new_rows, new_cols = _litemedsam_resized_shape(shape)
    cropped = logits.float()[:, :, :new_rows, :new_cols]
    return torch.sigmoid(F.interpolate(cropped, size=shape, mode="bilinear", align_corners=False))[:, 0]


MEDSAM_RECIPE = Recipe("medsam", 1024, medsam_input, medsam_scale, medsam_probabilities)
LITEMEDSAM_RECIPE = Recipe("litemedsam", 256, litemedsam_input, litemedsam_scale, litemedsam_probabilities)
