"""Model registry: a name on the command line or in a request -> a loaded PromptableModel.

Torch-free at import (the command line lists these names without loading torch); the
model families, their recipes and the runtimes load only when a model is built.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..errors import InputError

if TYPE_CHECKING:
    from .base import PromptableModel

MODEL_NAMES = ("litemedsam", "medsam-vit-b")
DEFAULT_MODEL = "litemedsam"
BACKENDS = ("auto", "torch", "onnx")
DEFAULT_BACKEND = "auto"  # ONNX Runtime on a CPU when it is installed (2x torch there), torch otherwise
PRECISIONS = ("fp32", "int8")  # int8: the ONNX encoder quantized (models/quantize.py)
DEFAULT_PRECISION = "fp32"  # int8 becomes the default only where bench/speed.py shows it faster at Dice within 0.005
DEVICES = ("auto", "cpu", "cuda", "mps")


def family(name: str):
    """The module of a model family: RECIPE, GPU_ENCODER_BATCH and build_torch_modules(checkpoint)."""
    if name == "litemedsam":
        from . import litemedsam as module
    elif name == "medsam-vit-b":
        from . import medsam_vit_b as module
    else:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return module


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


def resolve_backend(backend: str, device: str, precision: str = "fp32") -> str:
    """``auto`` -> ``onnx`` on a CPU (or for int8) when onnxruntime is installed, else ``torch``."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    if backend == "auto":
        wants_onnx = device == "cpu" or precision == "int8"
        backend = "onnx" if wants_onnx and importlib.util.find_spec("onnxruntime") is not None else "torch"
    if precision == "int8" and backend != "onnx":
        raise InputError("precision int8 runs on the ONNX backend: use --backend onnx (or auto) with onnxruntime "
                         "installed")
    return backend


def load_model(
    name: str = DEFAULT_MODEL,
    checkpoint: Optional[str | Path] = None,
    device: str = "auto",
    backend: str = "torch",
    autocast_bf16: bool = False,
    precision: str = "fp32",
    threads: Optional[int] = None,
) -> PromptableModel:
    """Build a model by registry name, load its weights, and place it on a device.

    ``checkpoint`` None means the model's default weights (bundled for LiteMedSAM,
    downloaded once into the user cache for MedSAM ViT-B). ``backend`` ``auto`` is
    :func:`resolve_backend`'s choice; ``precision`` ``int8`` needs the ONNX backend;
    ``threads`` sets ONNX Runtime's intra-op threads (default: the physical cores).
    """
    from .base import PromptableModel, TorchRuntime

    module = family(name)
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    device = resolve_device(device)
    backend = resolve_backend(backend, device, precision)
    checkpoint = Path(checkpoint) if checkpoint else None
    if backend == "onnx":
        from .onnx_backend import onnx_runtime

        runtime = onnx_runtime(name, checkpoint, device, lambda: module.build_torch_modules(checkpoint), precision,
                               threads)
    else:
        runtime = TorchRuntime(*module.build_torch_modules(checkpoint), device, autocast_bf16=autocast_bf16)
    # bench/engine.py on 2 CPU cores: encoding is fastest one slice at a time and decoding 2-4 boxes a
    # call (83 ms a box, against 96 ms one by one and 123 ms sixteen at a time); a GPU wants big batches.
    if device == "cpu":
        return PromptableModel(name, module.RECIPE, runtime, encoder_batch=1, decoder_batch=4)
    return PromptableModel(name, module.RECIPE, runtime, encoder_batch=module.GPU_ENCODER_BATCH, decoder_batch=32)


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "DEFAULT_MODEL", "DEFAULT_PRECISION", "DEVICES", "MODEL_NAMES", "PRECISIONS",
           "family", "load_model", "resolve_backend", "resolve_device"]
