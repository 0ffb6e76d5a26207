"""Model registry: a name on the command line or in a request -> a loaded PromptableModel.

Torch-free at import (the command line lists these names without loading torch); the
model families, their recipes and the runtimes load only when a model is built.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import os
import sys
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
DEVICES = ("auto", "cpu", "cuda", "mps")  # and cuda:N, the GPU of index N (check_device)


def family(name: str):
    """The module of a model family: RECIPE, GPU_ENCODER_BATCH and build_torch_modules(checkpoint)."""
    if name == "litemedsam":
        from . import litemedsam as module
    elif name == "medsam-vit-b":
        from . import medsam_vit_b as module
    else:
        raise InputError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    return module


def check_device(device: str) -> str:
    """A device name as the command line and ``load_model`` take it: one of ``DEVICES``, or ``cuda:N`` with N the
    index of a GPU (0, 1, ...). Whether that device exists is :func:`resolve_device`'s question."""
    kind, colon, index = str(device).partition(":")
    if device in DEVICES or (kind == "cuda" and colon and index.isascii() and index.isdigit()):
        return device
    raise InputError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}, or cuda:N for the GPU of index N "
                     "(e.g. cuda:1)")


def _device_argument(text: str) -> str:
    try:
        return check_device(text)
    except InputError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model flags of every command that runs a model (``annotate``, ``simulate``, ``serve``)."""
    parser.add_argument("--model", choices=MODEL_NAMES, default=DEFAULT_MODEL, help="model (default %(default)s)")
    parser.add_argument("--checkpoint", metavar="PATH", help="weights file (default: bundled, or downloaded once)")
    parser.add_argument("--backend", choices=BACKENDS, default=DEFAULT_BACKEND,
                        help="runtime (default auto: ONNX Runtime on a CPU, torch on a GPU)")
    parser.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                        help="int8: the quantized encoder (ONNX backend; faster on a CPU, masks within 0.005 Dice) "
                             "(default %(default)s)")
    parser.add_argument("--threads", type=int, metavar="N", help="ONNX Runtime threads (default: the physical cores)")
    parser.add_argument("--device", type=_device_argument, default="auto",
                        help=f"one of {', '.join(DEVICES)}, or cuda:N for the GPU of index N (default %(default)s)")


def _gpu_may_exist() -> bool:
    """False only where torch could find no GPU: not macOS (Apple's GPU), and no CUDA driver library or ROCm
    device on Linux (none on Windows). Lets ``auto`` choose the CPU without importing torch (seconds)."""
    if sys.platform == "darwin":
        return True
    if sys.platform.startswith("linux") and os.path.exists("/dev/kfd"):  # an AMD GPU (ROCm torch)
        return True
    names = {"win32": ("nvcuda.dll",)}.get(sys.platform, ("libcuda.so.1",))
    for name in names:
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def resolve_device(device: str) -> str:
    """``auto`` -> cuda, then mps, then cpu; an explicit device that is absent is an error.

    ``cpu``, and ``auto`` on a machine without a GPU driver, import no torch (the ONNX path runs without it).
    """
    check_device(device)
    if device == "cpu" or (device == "auto" and not _gpu_may_exist()):
        return "cpu"
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("device cuda was asked for but torch sees no CUDA GPU")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise InputError(f"device {device} was asked for but torch sees {count} CUDA GPU(s): "
                         f"use cuda:0{f'..cuda:{count - 1}' if count > 1 else ''}")
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
    from .base import PromptableModel

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
        from .torch_runtime import TorchRuntime

        runtime = TorchRuntime(*module.build_torch_modules(checkpoint), device, autocast_bf16=autocast_bf16)
    # bench/engine.py on 2 CPU cores: encoding is fastest one slice at a time and decoding 2-4 boxes a
    # call (83 ms a box, against 96 ms one by one and 123 ms sixteen at a time); a GPU wants big batches.
    if device == "cpu":
        return PromptableModel(name, module.RECIPE, runtime, encoder_batch=1, decoder_batch=4)
    return PromptableModel(name, module.RECIPE, runtime, encoder_batch=module.GPU_ENCODER_BATCH, decoder_batch=32)


__all__ = ["BACKENDS", "DEFAULT_BACKEND", "DEFAULT_MODEL", "DEFAULT_PRECISION", "DEVICES", "MODEL_NAMES", "PRECISIONS",
           "add_model_arguments", "check_device", "family", "load_model", "resolve_backend", "resolve_device"]
