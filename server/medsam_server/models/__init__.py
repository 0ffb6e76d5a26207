"""Model registry: a name on the command line or in a request -> a loaded PromptableModel."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from ..errors import InputError
from .base import EMBEDDING_SHAPE, PromptableModel

MODEL_NAMES = ("litemedsam", "medsam-vit-b")
DEFAULT_MODEL = "litemedsam"
BACKENDS = ("torch", "onnx")
DEVICES = ("auto", "cpu", "cuda", "mps")


def _loader(name: str) -> Callable[..., PromptableModel]:
    if name == "litemedsam":
        from .litemedsam import load
    elif name == "medsam-vit-b":
        from .medsam_vit_b import load
    else:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return load


def resolve_device(device: str) -> str:
    """``auto`` -> cuda, then mps, then cpu; an explicit device that is absent is an error."""
    import torch

    if device not in DEVICES and not device.startswith("cuda:"):
        raise InputError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device cuda was asked for but torch sees no CUDA GPU")
    if device == "mps" and not torch.backends.mps.is_available():
        raise InputError("device mps was asked for but torch sees no Apple GPU")
    return device


def load_model(
    name: str = DEFAULT_MODEL,
    checkpoint: Optional[str | Path] = None,
    device: str = "auto",
    backend: str = "torch",
    autocast_bf16: bool = False,
) -> PromptableModel:
    """Build a model by registry name, load its weights, and place it on a device.

    ``checkpoint`` None means the model's default weights (bundled for LiteMedSAM,
    downloaded once into the user cache for MedSAM ViT-B).
    """
    load = _loader(name)
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    options = {"autocast_bf16": autocast_bf16} if backend == "torch" else {}
    return load(Path(checkpoint) if checkpoint else None, resolve_device(device), backend, **options)


__all__ = ["BACKENDS", "DEFAULT_MODEL", "DEVICES", "EMBEDDING_SHAPE", "MODEL_NAMES", "PromptableModel", "load_model", "resolve_device"]
