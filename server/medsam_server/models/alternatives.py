"""The decoder's other mask outputs on the ONNX backend: one more graph, exported on first use.

``decoder-alternatives-<key>.onnx``: :class:`.torch_runtime.AlternativeMaskDecoder` with the inputs of
``decoder.onnx`` (``embeddings``, ``coords``, ``labels``) -> ``logits`` (N, 3, 256, 256), SAM's mask
tokens 1..3. It lives in the model's graph folder (``onnx_backend.graph_folder``) beside the others,
which it does not touch: ``decoder.onnx`` is token 0, the model's mask. Its own key, in the file name,
digests its class's source and its base class's (the transformer it runs is there) and the export
format, so a change there exports a new file (the old one is removed then).
Torch-free, like ``onnx_backend.py``: only the export (``onnx_export.export_alternatives``) needs torch.
"""

from __future__ import annotations

import hashlib
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError
from .onnx_backend import DECODER_INPUTS, EXPORT_FORMAT, OPSET, _graph_code_digest, session_options

ALTERNATIVES_PREFIX = "decoder-alternatives-"
ALTERNATIVES_OUTPUTS = ["logits"]
#: SAM's mask tokens the alternatives graph outputs (MedSAM's own mask is token 0).
ALTERNATIVE_TOKENS = (1, 2, 3)


def alternatives_file() -> str:
    """The graph's file name, keyed by its class's and its base class's source, the opset and the export format."""
    key = json.dumps([OPSET, EXPORT_FORMAT, list(ALTERNATIVE_TOKENS), _graph_code_digest("AlternativeMaskDecoder"),
                      _graph_code_digest()])
    return f"{ALTERNATIVES_PREFIX}{hashlib.sha256(key.encode()).hexdigest()[:16]}.onnx"


class OnnxAlternatives:
    """The alternatives graph of one model folder as an ONNX Runtime session, made (and exported) on first use."""

    def __init__(self, folder: Path, export: Callable[[Path], object], providers: list, threads: Optional[int]):
        self.folder, self.export, self.providers, self.threads = Path(folder), export, providers, threads
        self._session = None
        self._lock = threading.Lock()

    def session(self):
        import onnxruntime as ort

        with self._lock:
            if self._session is None:
                path = self.folder / alternatives_file()
                if not path.is_file():
                    print(f"Exporting the alternative masks graph to ONNX into {self.folder} (once)", file=sys.stderr,
                          flush=True)
                    self.export(path)
                try:
                    self._session = ort.InferenceSession(str(path), session_options(self.threads),
                                                         providers=self.providers)
                except Exception as err:  # onnxruntime raises its own types for a damaged graph
                    raise InputError(f"cannot load the ONNX graph {path} ({err}); delete it to export it again") \
                        from None
            return self._session

    def run(self, embeddings: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Embeddings (N, 256, 64, 64), coords (N, K, 2) model pixels, labels (N, K) -> (N, 3, 256, 256) logits."""
        feed = dict(zip(DECODER_INPUTS, (np.ascontiguousarray(embeddings, dtype=np.float32),
                                         np.ascontiguousarray(coords, dtype=np.float32),
                                         np.ascontiguousarray(labels, dtype=np.int64)), strict=True))
        return self.session().run(ALTERNATIVES_OUTPUTS, feed)[0]
