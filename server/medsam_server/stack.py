"""A volume seen as 2D slices along one axis through one model: embeddings and decode, boxes and points.

Like segment-anything's ``SamPredictor``: the expensive step (an embedding per slice) is
cached by ``embeddings.embed_steps``; decoding many boxes on cached slices is cheap. Boxes,
points and masks cross this class in *slice pixels* (rows along v, columns along u) and are
turned into the model's view (``orientation``) and back inside, exactly.

``model`` is a ``models.base.PromptableModel`` or the server's ``worker.WorkerModel``: both
offer ``embed_cached``, ``decode``, ``name`` and ``decoder_batch``. This class is the one decode
path: :meth:`decode` and :meth:`masks` wait for the model here and now (the CLI, annotate jobs);
:meth:`embeddings_awaited` and :meth:`masks_awaited` do the same for a request on the event loop,
awaiting the worker's futures (``WorkerModel.embed_future``, ``decode_future``) without holding a
thread.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Awaitable
from typing import Any, Callable, Optional, Sequence

import numpy as np

from .embeddings import EmbeddingCache, EmbedResult, SliceKey, volume_digest
from .errors import InputError
from .geometry import DEFAULT_ORIENTATION, SliceView, canonical_view, slice_index
from .intensity import to_uint8
from .protocol import MASK_THRESHOLD


class SliceStack:
    """A (k, j, i) or (k, j, i, 3) volume as slices along ``axis``, mapped by ``window``, through ``model``."""

    def __init__(
        self,
        array: np.ndarray,
        direction: np.ndarray,
        axis: int,
        window,
        model: Any,
        cache: EmbeddingCache,
        orientation: str = DEFAULT_ORIENTATION,
        digest: Optional[str] = None,
    ):
        rgb = array.ndim == 4 and array.shape[-1] == 3
        if array.ndim != 3 and not rgb:
            raise InputError(f"a volume is (k, j, i) or (k, j, i, 3); got shape {array.shape}")
        self.axis = axis
        self.model = model
        self.cache = cache
        self.u8, mapping = to_uint8(array, window, rgb=rgb)
        self.n_slices = array.shape[2 - axis]
        # A 2D image (X-ray, photo, one slice) is stored the way it is meant to be seen: only
        # volumes are turned into the canonical patient orientation.
        self.view: SliceView = canonical_view(direction, axis, "array" if self.n_slices == 1 else orientation)
        self.volume_key = digest or volume_digest(array)
        self.preprocessing = f"{mapping}|{self.view.key}"
        self.shape = self.u8[slice_index(axis, 0)].shape[:2]  # (rows, cols) of a slice

    def using(self, model: Any) -> SliceStack:
        """The same slices (no copy of the volume) through another model, e.g. a worker at another priority."""
        other = copy.copy(self)
        other.model = model
        return other

    def key(self, index: int) -> SliceKey:
        return SliceKey(self.volume_key, self.axis, int(index), self.model.name, self.preprocessing)

    def plane(self, index: int) -> np.ndarray:
        """The uint8 slice ``index`` in slice pixels (rows, cols[, 3])."""
        return self.u8[slice_index(self.axis, index)]

    def is_constant(self, index: int) -> bool:
        plane = self.plane(index)
        return bool(plane.min() == plane.max())

    def mean_intensity(self, index: int, mask: np.ndarray) -> float:
        """Mean windowed intensity (0..255, channels averaged) of slice ``index`` under a non-empty mask."""
        return float(self.plane(index)[mask].mean())

    def embeddings(self, indices: Sequence[int], progress: Optional[Callable[[int], None]] = None,
                   should_stop: Optional[Callable[[], bool]] = None, keep: bool = True) -> EmbedResult:
        """(N, *embedding_shape) embeddings of slices ``indices`` (None with ``keep=False``) and the cache hits."""
        indices = list(indices)
        return self.model.embed_cached(self.cache, [self.key(i) for i in indices],
                                       lambda n: self.view.to_view(self.plane(indices[n])), progress, should_stop,
                                       keep)

    def decode(self, embeddings: np.ndarray, boxes: np.ndarray, points: Optional[np.ndarray] = None,
               point_labels: Optional[np.ndarray] = None, slices: Optional[Sequence[int]] = None) -> np.ndarray:
        """Box i (and points i) on embedding i -> (N, rows, cols) probabilities in slice pixels.

        ``boxes`` (N, 4) and ``points`` (N, P, 2) are in slice pixels; ``point_labels`` (N, P)
        1 inside, 0 outside. Points map to the view like box corners. ``slices``: the embeddings'
        slice indices, given when the next prompt may come to the same slices (a user's box; the
        model keeps the decoder's slice-only step of them, ``models/prepared.py``).
        """
        view_boxes, view_shape, view_points = self.prompts_to_view(boxes, points)
        return self.from_view(self.model.decode(embeddings, view_boxes, view_shape, view_points, point_labels,
                                                self._keys(slices)))

    async def embeddings_awaited(self, indices: Sequence[int]) -> np.ndarray:
        """As :meth:`embeddings` (kept in the cache), awaited: slices all cached go straight on (no turn in the
        worker's queue to wait for); otherwise the worker embeds the missing ones at the model's priority."""
        indices = list(indices)
        keys = [self.key(i) for i in indices]
        cached = [self.cache.get(key) for key in keys]
        if all(e is not None for e in cached):
            return np.stack(cached)
        embedded = self.model.embed_future(keys, lambda n: self.view.to_view(self.plane(indices[n])))
        embeddings, _ = await asyncio.wrap_future(embedded)
        return embeddings

    async def masks_awaited(self, embeddings: np.ndarray, boxes: np.ndarray, points: Optional[np.ndarray] = None,
                            point_labels: Optional[np.ndarray] = None,
                            run: Optional[Callable[..., Awaitable]] = None,
                            slices: Optional[Sequence[int]] = None) -> np.ndarray:
        """As :meth:`masks`, awaited: (N, rows, cols) bool. ``run(function, *args)`` maps the probabilities back
        and thresholds them on a thread (here when None); ``slices`` as in :meth:`decode`."""
        view_boxes, view_shape, view_points = self.prompts_to_view(boxes, points)
        decoded = self.model.decode_future(embeddings, view_boxes, view_shape, view_points, point_labels,
                                           self._keys(slices))
        probabilities = await asyncio.wrap_future(decoded)
        return self._masks(probabilities) if run is None else await run(self._masks, probabilities)

    async def alternatives_awaited(self, embeddings: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """The decoder's other mask outputs for box i on embedding i (``PromptableModel.decode_alternatives``),
        awaited: (N, 3, rows, cols) float32 probabilities in slice pixels."""
        view_boxes, view_shape, _ = self.prompts_to_view(boxes)
        decoded = await asyncio.wrap_future(self.model.alternatives_future(embeddings, view_boxes, view_shape))
        return np.stack([self.from_view(planes) for planes in decoded])

    def prompts_to_view(self, boxes: np.ndarray, points: Optional[np.ndarray] = None) -> tuple:
        """Boxes (N, 4) and points (N, P, 2) in slice pixels -> (view boxes, view (H, W), view points)."""
        view, shape = self.view, self.shape
        view_boxes = np.array([view.box_to_view(b, shape) for b in boxes]).reshape(-1, 4)
        view_points = None if points is None else view.points_to_view(np.asarray(points, dtype=np.float64), shape)
        return view_boxes, view.view_shape(shape), view_points

    def from_view(self, probabilities: np.ndarray) -> np.ndarray:
        """(N, H, W) probabilities in the view -> (N, rows, cols) in slice pixels."""
        if not len(probabilities):
            return probabilities.reshape(0, *self.shape)
        return np.stack([self.view.from_view(p) for p in probabilities])

    def masks(self, embeddings: np.ndarray, boxes: np.ndarray, points: Optional[np.ndarray] = None,
              point_labels: Optional[np.ndarray] = None, slices: Optional[Sequence[int]] = None) -> np.ndarray:
        """As :meth:`decode`, thresholded: (N, rows, cols) bool."""
        return self.decode(embeddings, boxes, points, point_labels, slices) > MASK_THRESHOLD

    def _keys(self, slices: Optional[Sequence[int]]) -> Optional[list[SliceKey]]:
        return None if slices is None else [self.key(i) for i in slices]

    def _masks(self, view_probabilities: np.ndarray) -> np.ndarray:
        return self.from_view(view_probabilities) > MASK_THRESHOLD
