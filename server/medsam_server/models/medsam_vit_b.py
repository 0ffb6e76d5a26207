"""MedSAM: SAM ViT-B fine-tuned on medical images, built by the official
``segment_anything.sam_model_registry["vit_b"]``, and its recipe.

The recipe mirrors upstream bowang-lab/MedSAM ``MedSAM_Inference.py``: skimage bicubic
resize to 1024x1024 without keeping aspect, per-image min-max to [0, 1], box scaled by
1024/W and 1024/H, low-res logits -> sigmoid -> bilinear to (H, W) -> > 0.5.

The checkpoint comes from ``--checkpoint PATH`` or is downloaded once into the user
cache folder (see :mod:`.checkpoints`). SAM's pixel mean/std normalisation is not
used: MedSAM feeds [0, 1] images straight to the image encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from .base import Recipe, min_max, three_channels
from .checkpoints import MEDSAM_VIT_B, fetch_known_weights, load_state_dict

GPU_ENCODER_BATCH = 2  # slices per encoder call on a GPU
INPUT_SIZE = 1024


def image_to_input(image_u8: np.ndarray) -> np.ndarray:
    """(H, W[, 3]) uint8 -> (3, 1024, 1024) float32; mirrors MedSAM_Inference.py."""
    from skimage import transform

    img = three_channels(image_u8)
    resized = transform.resize(img, (INPUT_SIZE, INPUT_SIZE), order=3, preserve_range=True, anti_aliasing=True)
    return min_max(resized.astype(np.uint8).astype(np.float32), "the slice").transpose(2, 0, 1).copy()


def pixel_scale(shape: tuple[int, int]) -> tuple[float, float]:
    """x scaled by 1024/W and y by 1024/H: the slice is stretched to a square."""
    rows, cols = shape
    return (INPUT_SIZE / cols, INPUT_SIZE / rows)


def logits_to_probabilities(logits: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(N, 1, 256, 256) logits -> (N, H, W) float32 probabilities: sigmoid, then bilinear (torch's, as upstream)."""
    import torch
    import torch.nn.functional as F

    probs = torch.sigmoid(torch.as_tensor(np.asarray(logits, dtype=np.float32)))
    return F.interpolate(probs, size=shape, mode="bilinear", align_corners=False)[:, 0].numpy()


RECIPE = Recipe("medsam", INPUT_SIZE, image_to_input, pixel_scale, logits_to_probabilities)


def build_torch_modules(checkpoint: Optional[Path] = None):
    """(image encoder, PromptedMaskDecoder) with MedSAM ViT-B weights loaded."""
    from segment_anything import sam_model_registry

    from .torch_runtime import PromptedMaskDecoder

    sam = sam_model_registry["vit_b"](checkpoint=None)  # upstream's loader uses an unsafe torch.load
    if checkpoint is None:
        checkpoint = fetch_known_weights(MEDSAM_VIT_B)
    sam.load_state_dict(load_state_dict(checkpoint, sam, "MedSAM ViT-B"))
    return sam.image_encoder.eval(), PromptedMaskDecoder(sam.prompt_encoder, sam.mask_decoder).eval()

