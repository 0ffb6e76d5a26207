"""MedSAM: SAM ViT-B fine-tuned on medical images, built by the official
``segment_anything.sam_model_registry["vit_b"]``.

The checkpoint comes from ``--checkpoint PATH`` or is downloaded once into the user
cache folder (see :mod:`.checkpoints`). SAM's pixel mean/std normalisation is not
used: MedSAM feeds [0, 1] images straight to the image encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..preprocess import MEDSAM_RECIPE
from .base import PromptedMaskDecoder
from .checkpoints import MEDSAM_VIT_B, fetch_known_weights, load_state_dict

RECIPE = MEDSAM_RECIPE
GPU_ENCODER_BATCH = 2  # slices per encoder call on a GPU


def build_torch_modules(checkpoint: Optional[Path] = None):
    """(image encoder, PromptedMaskDecoder) with MedSAM ViT-B weights loaded."""
    from segment_anything import sam_model_registry

    sam = sam_model_registry["vit_b"](checkpoint=None)  # upstream's loader uses an unsafe torch.load
    if checkpoint is None:
        checkpoint = fetch_known_weights(MEDSAM_VIT_B)
    sam.load_state_dict(load_state_dict(checkpoint, sam, "MedSAM ViT-B"))
    return sam.image_encoder.eval(), PromptedMaskDecoder(sam.prompt_encoder, sam.mask_decoder).eval()

