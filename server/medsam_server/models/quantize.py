"""The int8 encoder (``--precision int8``): ONNX Runtime's static quantization of the fp32 encoder graph.

Static QDQ quantization, per-channel int8 weights and uint8 activations whose ranges
(MinMax) are calibrated on real CT slices: slicerio's CTChest4 in the lung, bone and
soft-tissue windows, every ``CALIBRATION_STEP``-th axial slice, through the model's own
recipe. Dynamic quantization was measured too (bench/speed.py, the README's speed
table); it quantizes activations per call and was no faster on this CPU.

The int8 graph lives beside the fp32 one in the ONNX cache folder
(``encoder.int8.onnx``); it is made once, from the fp32 graph, the first time it is asked for.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

PRECISIONS = ("fp32", "int8")
INT8_ENCODER_FILE = "encoder.int8.onnx"
CALIBRATION_WINDOWS = ("ct-lung", "ct-bone", "ct-soft")
CALIBRATION_STEP = 4  # every 4th slice of the 34: 8 slices a window, 24 in all


def calibration_inputs(image_to_input: Callable[[np.ndarray], np.ndarray]) -> list[np.ndarray]:
    """Model inputs (3, S, S) float32 of real CT slices, in the canonical view the engine uses."""
    import SimpleITK as sitk
    import slicerio

    from ..geometry import canonical_view
    from ..intensity import to_uint8

    image = sitk.ReadImage(os.path.join(os.path.dirname(slicerio.__file__), "data", "CTChest4.nrrd"))
    volume = sitk.GetArrayFromImage(image)
    view = canonical_view(np.array(image.GetDirection()).reshape(3, 3), axis=2)
    inputs = []
    for window in CALIBRATION_WINDOWS:
        u8, _ = to_uint8(volume, window)
        for plane in u8[::CALIBRATION_STEP]:
            if plane.min() != plane.max():
                inputs.append(image_to_input(np.ascontiguousarray(view.to_view(plane))))
    return inputs


def quantize_encoder(fp32_path: Path, out_path: Path, inputs: list[np.ndarray], input_name: str = "images") -> Path:
    """Write the int8 encoder of ``fp32_path`` to ``out_path`` (atomically), calibrated on ``inputs``."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .onnx_backend import write_atomically

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.remaining: Iterator[np.ndarray] = iter(inputs)
            self.done = 0

        def get_next(self):
            image = next(self.remaining, None)
            if image is None:
                return None
            self.done += 1
            print(f"\r  calibrating the int8 encoder: slice {self.done}/{len(inputs)}", end="", file=sys.stderr,
                  flush=True)
            return {input_name: image[None]}

    started = time.perf_counter()
    prepared = out_path.with_name(f".{out_path.name}.{os.getpid()}.pre.onnx")
    try:
        # Shape inference and graph folding first, as ONNX Runtime's quantization guide asks.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)

        def write(tmp: Path) -> None:
            quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)

        write_atomically(out_path, write)
    finally:
        prepared.unlink(missing_ok=True)
    print(f"\n  int8 encoder written in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return out_path
