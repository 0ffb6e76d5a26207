"""The int8 encoder (``--precision int8``): ONNX Runtime's dynamic quantization of the fp32 encoder graph.

The encoder's MatMul weights become per-channel int8 and their activations are quantized
per call (``quantize_dynamic``, ``op_types_to_quantize=["MatMul"]``); convolutions stay
fp32. Measured on slicerio's CTChest4 (both lungs in the lung window, the thoracic spine
in the bone window, LiteMedSAM; bench/speed.py):

- this one (U8U8, below): Dice against the reference within 0.008 of fp32 on every case
  (within 0.004 with s8 weights on a CPU with VNNI, where s8 does not saturate);
- every op, dynamic: ConvInteger is slower than fp32 convolution on a CPU (2x the time);
- static QDQ, calibrated on CTChest4 slices: Dice against the fp32 masks only 0.74-0.93
  (the masks change, up and down by case), so it is not offered.

Weights are unsigned 8-bit (U8U8 with the u8 activations): on x86 CPUs without VNNI (AVX2, most
laptops before 2020, this project's 2-core AMD EPYC) ONNX Runtime multiplies u8 activations by s8
weights with a saturating instruction, so s8 weights gave masks that depended on the CPU (there:
embeddings correlated 0.973 with fp32's; Dice against the reference +0.012 / +0.035 / +0.006 on the
right lung, left lung and thoracic spine at K = 5); 7-bit s8 weights (``reduce_range``) cost the
spine 0.046. U8U8 computes the same on every CPU: correlation 0.996, and on those three cases
0.8442 / 0.8480 / 0.5455 against fp32's 0.8365 / 0.8442 / 0.5495; an encode takes 0.89 of fp32's
there (s8: 0.83).

The int8 graph lives beside the fp32 one in the ONNX cache folder (``INT8_ENCODER_FILE``; its name
changed with the weight type, so a graph made before is not reused); it is made once, from the fp32
graph, in a few seconds, the first time it is asked for.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

PRECISIONS = ("fp32", "int8")
INT8_ENCODER_FILE = "encoder.int8-u8.onnx"


def quantize_encoder(fp32_path: Path, out_path: Path) -> Path:
    """Write the int8 encoder of ``fp32_path`` to ``out_path``; readers never see half a file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .onnx_backend import write_atomically

    started = time.perf_counter()
    prepared = out_path.with_name(f".{out_path.name}.{os.getpid()}.pre.onnx")
    try:
        # Shape inference and graph folding first, as ONNX Runtime's quantization guide asks.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        write_atomically(out_path, lambda tmp: quantize_dynamic(
            str(prepared), str(tmp), weight_type=QuantType.QUInt8, per_channel=True,
            op_types_to_quantize=["MatMul"]))
    finally:
        prepared.unlink(missing_ok=True)
    print(f"  {out_path.name} written in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return out_path
