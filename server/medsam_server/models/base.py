"""One interface for every model family and backend.

Like segment-anything's ``SamPredictor``: :meth:`PromptableModel.embed` is the one
expensive step (image encoder, once per slice), :meth:`PromptableModel.decode` the
cheap one (prompt encoder + mask decoder, many boxes over many slices in one call).

A *runtime* does the tensor work (torch modules, ``torch_runtime.py``, or ONNX Runtime
sessions, ``onnx_backend.py``); the *recipe* (:class:`Recipe`, one per family in its own
file) does the model family's pre- and post-processing. Torch-free: the ONNX path runs
without torch once its graphs are exported.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence

import numpy as np

from ..embeddings import EmbedResult, Progress, ShouldStop, SliceKey, ViewSlice, embed
from ..errors import InputError
from ..geometry import check_box
from ..intensity import to_uint8
from ..protocol import MASK_THRESHOLD
from .prepared import PreparedSlices

# Prompt labels as SAM's prompt encoder numbers its learned embeddings.
LABEL_PAD, LABEL_BACKGROUND, LABEL_FOREGROUND, LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT = -1, 0, 1, 2, 3


@dataclass(frozen=True)
class Recipe:
    """How one model family turns view pixels into model input and logits into probabilities."""

    name: str
    input_size: int
    image_to_input: Callable[[np.ndarray], np.ndarray]
    pixel_scale: Callable[[tuple[int, int]], tuple[float, float]]
    logits_to_probabilities: Callable[[np.ndarray, tuple[int, int]], np.ndarray]
    embedding_shape: tuple[int, int, int] = (256, 64, 64)

    def coords_to_input(self, coords: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        """(x, y) pairs ``(..., 2)`` in view pixels of a ``(rows, cols)`` slice -> model pixels."""
        return np.asarray(coords, dtype=np.float64) * np.array(self.pixel_scale(shape))


def three_channels(image_u8: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) -> (H, W, 3)."""
    if image_u8.ndim == 2:
        return np.repeat(image_u8[:, :, None], 3, axis=-1)
    if image_u8.ndim == 3 and image_u8.shape[-1] == 3:
        return image_u8
    raise InputError(f"a slice is (H, W) or (H, W, 3); got shape {image_u8.shape}")


def min_max(image: np.ndarray, what: str) -> np.ndarray:
    """Scale to [0, 1] by the image's own min and max (both recipes do)."""
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        raise InputError(f"{what} is constant (min = max = {lo:g}): nothing to segment")
    return ((image - lo) / (hi - lo)).astype(np.float32)


class Runtime(Protocol):
    """Tensor work of one model on one device: torch modules or ONNX Runtime sessions."""

    device: str
    backend: str  # "torch" or "onnx"
    precision: str  # "fp32" or "int8" (the encoder's weights)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32 model input -> (N, 256, 64, 64) float32 embeddings."""

    def decode(self, embeddings: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Embeddings, coords (N, K, 2) in model pixels, labels (N, K) -> (N, 1, 256, 256) float32 logits."""

    def prepare(self, embeddings: np.ndarray) -> tuple[np.ndarray, ...]:
        """The decoder's first step, what depends on the slice only (``PromptedMaskDecoder.prepare``)."""

    def decode_prepared(self, prepared: tuple[np.ndarray, ...], coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """The decoder's second step: :meth:`decode` from :meth:`prepare`'s tensors."""

    def decode_alternatives(self, embeddings: np.ndarray, coords: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """As :meth:`decode`, SAM's other mask tokens 1..3: (N, 3, 256, 256) float32 logits."""


class PromptableModel:
    """A box (and optional points) on a slice in, a mask probability out.

    Slices reach :meth:`embed` as view pixels already mapped to [0, 255]
    (``intensity.to_uint8``); boxes reach :meth:`decode` in the same view pixels.
    """

    def __init__(self, name: str, recipe: Recipe, runtime: Runtime, encoder_batch: int = 4, decoder_batch: int = 16):
        self.name = name
        self.recipe = recipe
        self.runtime = runtime
        self.encoder_batch = encoder_batch  # slices per encoder call
        self.decoder_batch = decoder_batch  # boxes per decoder call in the volume workflow
        self.prepared = PreparedSlices()  # the decoder's first step of the slices decoded last

    @property
    def device(self) -> str:
        return self.runtime.device

    @property
    def backend(self) -> str:
        return self.runtime.backend

    @property
    def precision(self) -> str:
        return self.runtime.precision

    @property
    def embedding_shape(self) -> tuple[int, int, int]:
        return self.recipe.embedding_shape

    def embed_cached(self, cache, keys: Sequence[SliceKey], view_slice: ViewSlice, progress: Optional[Progress] = None,
                     should_stop: Optional[ShouldStop] = None, keep: bool = True) -> EmbedResult:
        """``embeddings.embed`` on this model, here and now (the server's worker runs the same steps queued)."""
        return embed(self, cache, keys, view_slice, progress, should_stop, keep)

    def embed(self, slices: Sequence[np.ndarray]) -> np.ndarray:
        """List of (H, W) or (H, W, 3) uint8 slices -> (N, 256, 64, 64) float32, encoded in batches."""
        inputs = []
        for index, image in enumerate(slices):
            try:
                inputs.append(self.recipe.image_to_input(np.asarray(image)))
            except InputError as err:
                raise InputError(f"slice {index} of the batch: {err}") from None
        out = np.empty((len(inputs), *self.embedding_shape), dtype=np.float32)
        for start in range(0, len(inputs), self.encoder_batch):
            batch = np.stack(inputs[start:start + self.encoder_batch])
            out[start:start + len(batch)] = self.runtime.encode(batch)
        return out

    def decode(
        self,
        embeddings: np.ndarray,
        boxes: np.ndarray,
        image_shape: tuple[int, int],
        points: Optional[np.ndarray] = None,
        point_labels: Optional[np.ndarray] = None,
        keys: Optional[Sequence[SliceKey]] = None,
    ) -> np.ndarray:
        """Decode box i (and points i) on embedding i, all in one call.

        Args:
            embeddings: (N, 256, 64, 64) from :meth:`embed`.
            boxes: (N, 4) inclusive ``[x_min, y_min, x_max, y_max]`` in view pixels, already valid.
            image_shape: (H, W) of the view slices (all N share it).
            points: optional (N, P, 2) (x, y) in view pixels; ``point_labels`` (N, P) 1 = inside,
                0 = outside, -1 = padding.
            keys: the slices' keys, when the next prompt may come to the same slices (a user's box): the
                decoder's slice-only step is then kept for them (``prepared.py``; the same probabilities).
        Returns: (N, H, W) float32 probabilities.
        """
        coords, labels = self._prompt_input(embeddings, boxes, image_shape, points, point_labels)
        if keys is None:
            logits = self.runtime.decode(embeddings, coords, labels)
        else:
            logits = self.runtime.decode_prepared(self.prepared.tensors(self.runtime, keys, embeddings), coords, labels)
        return self.recipe.logits_to_probabilities(logits, image_shape)

    def decode_alternatives(self, embeddings: np.ndarray, boxes: np.ndarray,
                            image_shape: tuple[int, int]) -> np.ndarray:
        """The decoder's other mask outputs for box i on embedding i: (N, 3, H, W) float32 probabilities of SAM's
        mask tokens 1..3 (:meth:`decode` gives token 0, the model's mask; its path is not touched)."""
        coords, labels = self._prompt_input(embeddings, boxes, image_shape, None, None)
        logits = self.runtime.decode_alternatives(embeddings, coords, labels)  # (N, T, S', S')
        n, count = logits.shape[:2]
        planes = self.recipe.logits_to_probabilities(logits.reshape(n * count, 1, *logits.shape[2:]), image_shape)
        return planes.reshape(n, count, *planes.shape[1:])

    def _prompt_input(self, embeddings: np.ndarray, boxes: np.ndarray, image_shape: tuple[int, int],
                      points: Optional[np.ndarray], point_labels: Optional[np.ndarray]) -> tuple:
        """Boxes (and points) in view pixels -> the runtime's coords (N, K, 2) in model pixels and labels (N, K)."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 2, 2)
        n = len(boxes)
        if len(embeddings) != n:
            raise InputError(f"{len(embeddings)} embeddings but {n} boxes: decode pairs them one to one")
        coords = self.recipe.coords_to_input(boxes, image_shape)
        labels = np.tile([LABEL_BOX_TOP_LEFT, LABEL_BOX_BOTTOM_RIGHT], (n, 1))
        if points is not None:
            pts = np.asarray(points, dtype=np.float64).reshape(n, -1, 2)
            if point_labels is None:
                lab = np.ones(pts.shape[:2], dtype=np.int64)
            else:
                lab = np.asarray(point_labels).reshape(n, -1)
            # SAM's order: points first, then the box corners.
            coords = np.concatenate([self.recipe.coords_to_input(pts, image_shape), coords], axis=1)
            labels = np.concatenate([lab, labels], axis=1)
        return coords, labels

    def segment(self, image2d: np.ndarray, box: Sequence[float], window="auto") -> np.ndarray:
        """Convenience: one (H, W) or (H, W, 3) image and one box in its pixels -> (H, W) bool mask.

        Grayscale images are mapped by ``window``; RGB images by their min-max. A box
        partly outside the image is clipped with a warning.
        """
        image = np.asarray(image2d)
        rgb = image.ndim == 3 and image.shape[-1] == 3
        if image.ndim != 2 and not rgb:
            raise InputError(f"segment takes a 2D image (H, W) or (H, W, 3); got shape {image.shape}")
        image_u8, _ = to_uint8(image, window, rgb=rgb)
        clipped, note = check_box(box, image.shape[:2])
        if note:
            warnings.warn(note, stacklevel=2)
        probabilities = self.decode(self.embed([image_u8]), clipped[None], image.shape[:2])
        return probabilities[0] > MASK_THRESHOLD
