"""Exporting a model's graphs to ONNX (``medsam export-onnx``, and ``--backend onnx`` the first time).

The graphs, their names and the cache folder are described in ``onnx_backend.py``, which runs them
without torch; this file is the only part of the ONNX path that needs torch.
"""

from __future__ import annotations

import json
import sys
import time
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .onnx_backend import (
    DECODER_FILE,
    DECODER_INPUTS,
    DECODER_OUTPUTS,
    ENCODER_FILE,
    ENCODER_INPUTS,
    ENCODER_OUTPUTS,
    EXPORT_FORMAT,
    MANIFEST_FILE,
    OPSET,
    PREPARE_FILE,
    PREPARED,
    PROMPT_FILE,
    PROMPT_INPUTS,
    ModuleBuilder,
    weights_digest,
    write_atomically,
)
from .torch_runtime import PromptedMaskDecoder


def export_missing(model_name: str, checkpoint: Optional[Path], build_torch_modules: ModuleBuilder,
                   folder: Path) -> list[Path]:
    """Export the graphs missing from ``folder`` (the cache folder of ``onnx_backend.onnx_runtime``)."""
    encoder, decoder = build_torch_modules()
    return _export_graphs(encoder, decoder, folder, _manifest(model_name, checkpoint), only_missing=True,
                          progress=True)


def export_onnx(model_name: str, out_dir: str | Path, checkpoint: Optional[str | Path] = None) -> list[Path]:
    """Write ``encoder.onnx``, ``decoder.onnx`` (and its two steps) and ``manifest.json`` of a model into ``out_dir``.

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
        "decoder_steps": {"files": [PREPARE_FILE, PROMPT_FILE],
                          "prepare": {"inputs": ["embeddings"], "outputs": {
                              "src": "float32 (N, 4096, 256)", "key": "float32 (N, 8, 16, 4096)",
                              "value": "float32 (N, 8, 4096, 16)", "query": "float32 (N, 8, 4096, 16)"}},
                          "prompt": {"inputs": PROMPT_INPUTS, "outputs": ["logits"]}},
    }


def _export_graphs(encoder: nn.Module, decoder: PromptedMaskDecoder, folder: Path, manifest: dict,
                   only_missing: bool, progress: bool = False) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    size = int(decoder.prompt_encoder.input_image_size[0])  # the square model input S
    manifest = {**manifest, "input_size": size}
    encoder_path, decoder_path = folder / ENCODER_FILE, folder / DECODER_FILE
    prepare_path, prompt_path = folder / PREPARE_FILE, folder / PROMPT_FILE
    steps = [(path, export) for path, export in (
        (decoder_path, lambda: export_decoder(decoder, decoder_path)),
        (prepare_path, lambda: export_prepare(decoder, prepare_path)),
        (prompt_path, lambda: export_prompt(decoder, prompt_path)),
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
    return [encoder_path, decoder_path, prepare_path, prompt_path, manifest_path]


def export_encoder(encoder: nn.Module, path: Path, input_size: int) -> Path:
    """Export an image encoder: ``images`` (N, 3, S, S) -> ``embeddings`` (N, 256, 64, 64), N dynamic."""
    example = torch.rand(1, 3, input_size, input_size)
    with _batch_agnostic(encoder):
        _export(encoder.eval(), (example,), ENCODER_INPUTS, ENCODER_OUTPUTS,
                {"images": {0: "n"}, "embeddings": {0: "n"}}, path)
    return path


def export_decoder(decoder: PromptedMaskDecoder, path: Path) -> Path:
    """Export a :class:`.torch_runtime.PromptedMaskDecoder`, N (pairs) and K (prompt points) dynamic."""
    size = float(decoder.prompt_encoder.input_image_size[0])
    # N = 2 and K = 3 (one point + a box) so that no traced size coincides with 1 or with the box's 2.
    example = (torch.randn(2, 256, 64, 64), torch.rand(2, 3, 2) * size, torch.tensor([[1, 2, 3], [0, 2, 3]]))
    axes = {"embeddings": {0: "n"}, "coords": {0: "n", 1: "k"}, "labels": {0: "n", 1: "k"}, "logits": {0: "n"}}
    _export(decoder.eval(), example, DECODER_INPUTS, DECODER_OUTPUTS, axes, path)
    return path


class _Step(nn.Module):
    """One method of a decoder as a module's forward, for the exporter."""

    def __init__(self, decoder: PromptedMaskDecoder, method: str):
        super().__init__()
        self.decoder, self.method = decoder, method

    def forward(self, *inputs: torch.Tensor):
        return getattr(self.decoder, self.method)(*inputs)


def export_prepare(decoder: PromptedMaskDecoder, path: Path) -> Path:
    """Export :meth:`.torch_runtime.PromptedMaskDecoder.prepare`: ``embeddings`` -> :data:`PREPARED`, N dynamic."""
    axes = {name: {0: "n"} for name in ("embeddings", *PREPARED)}
    _export(_Step(decoder, "prepare").eval(), (torch.randn(2, 256, 64, 64),), ["embeddings"], PREPARED, axes, path)
    return path


def export_prompt(decoder: PromptedMaskDecoder, path: Path) -> Path:
    """Export :meth:`.torch_runtime.PromptedMaskDecoder.decode_prepared`, N and K dynamic."""
    size = float(decoder.prompt_encoder.input_image_size[0])
    with torch.no_grad():
        prepared = decoder.eval().prepare(torch.randn(2, 256, 64, 64))
    example = (*prepared, torch.rand(2, 3, 2) * size, torch.tensor([[1, 2, 3], [0, 2, 3]]))
    axes = {**{name: {0: "n"} for name in (*PREPARED, "logits")},
            "coords": {0: "n", 1: "k"}, "labels": {0: "n", 1: "k"}}
    _export(_Step(decoder, "decode_prepared").eval(), example, PROMPT_INPUTS, DECODER_OUTPUTS, axes, path)
    return path


def export_alternatives(decoder: PromptedMaskDecoder, path: Path) -> Path:
    """Export the alternatives graph (``alternatives.py``) of a decoder's weights to ``path``; other versions of it
    in that folder (older keys) are removed."""
    from .alternatives import ALTERNATIVE_TOKENS, ALTERNATIVES_OUTPUTS, ALTERNATIVES_PREFIX
    from .torch_runtime import AlternativeMaskDecoder

    module = AlternativeMaskDecoder(decoder.prompt_encoder, decoder.mask_decoder, ALTERNATIVE_TOKENS)
    size = float(decoder.prompt_encoder.input_image_size[0])
    example = (torch.randn(2, 256, 64, 64), torch.rand(2, 3, 2) * size, torch.tensor([[1, 2, 3], [0, 2, 3]]))
    axes = {"embeddings": {0: "n"}, "coords": {0: "n", 1: "k"}, "labels": {0: "n", 1: "k"}, "logits": {0: "n"}}
    _export(module.eval(), example, DECODER_INPUTS, ALTERNATIVES_OUTPUTS, axes, path)
    for stale in path.parent.glob(f"{ALTERNATIVES_PREFIX}*.onnx"):
        if stale.name != path.name:
            stale.unlink(missing_ok=True)
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
