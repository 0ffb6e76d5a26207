"""A run in three steps, so that the slow one can leave the UI thread.

``prepare_run`` (reads MRML, main thread) -> ``execute_run`` (server call, arrays only, any
thread) -> ``apply_run`` (writes the segment, main thread). A failed or cancelled
``execute_run`` never reaches ``apply_run``, so the segmentation is untouched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .client import UnknownSession  # SessionLost (410) is one
from .errors import InputError
from .geometry import VolumeArray, slice_index, volume_array
from .keyframes import flatten_roi, keyframe_nodes, line_keyframe, prompt_document, roi_keyframe, slicing_axis
from .protocol import ALTERNATIVE_COUNT
from .segments import AppliedRun, apply_labels, edited_slices, find_segment, segment_array


@dataclass
class RunRequest:
    """Everything a run needs, detached from MRML: made on the main thread, sent from a worker."""

    volume: VolumeArray
    document: dict
    axis: int
    segment_id: str
    locked_slices: list[int]
    existing: np.ndarray | None  # (k, j, i) uint16, label 1 = the segment; sent when slices are locked
    keyframe_count: int
    keyframe_spacing: float | None  # mean slices between neighbouring keyframes
    volume_node_id: str = ""
    segmentation_node_id: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class RunResult:
    session: Any
    ijk_offset: tuple[int, int, int]
    labels: np.ndarray  # (k, j, i) block; (0, 0, 0) when the run changed nothing
    seconds: float  # wall time of upload (if any) and annotate, as the client saw it
    summary: dict = field(default_factory=dict)  # the server's report: per segment, seconds, cache, notes

    @property
    def server_seconds(self) -> float | None:
        """The server's own compute time (embedding + decoding), when it reports it."""
        seconds = self.summary.get("seconds") if isinstance(self.summary, dict) else None
        if isinstance(seconds, dict) and seconds:
            return float(sum(float(v) for v in seconds.values()))
        return None


def prepare_run(volume_node, segmentation_node, segment_id: str, roi_nodes: Sequence | None = None,
                line_nodes: Sequence | None = None, window: Any = "auto", axis: int | None = None,
                flatten: bool = True) -> RunRequest:
    """Read volume, keyframes and hand edits into a :class:`RunRequest` (main thread).

    Keyframes default to the markups tagged for the segment (``keyframe_nodes``). ``flatten`` snaps
    each ROI onto its slice so that what the user sees is what is sent.
    """
    target = find_segment(segmentation_node, segment_id)
    if roi_nodes is None and line_nodes is None:
        roi_nodes, line_nodes = keyframe_nodes(segmentation_node, segment_id)
    roi_nodes, line_nodes = list(roi_nodes or ()), list(line_nodes or ())
    volume = volume_array(volume_node)
    axis = slicing_axis(volume, roi_nodes, line_nodes, axis)
    boxes = [(flatten_roi if flatten else roi_keyframe)(roi, volume, axis) for roi in roi_nodes]
    lines = [line_keyframe(line, volume, axis) for line in line_nodes]
    current = segment_array(segmentation_node, segment_id, volume_node)
    locked = edited_slices(segmentation_node, segment_id, volume_node, axis, current)
    document = prompt_document(axis, boxes, lines, target.GetName(), window, locked)
    existing = current.astype(np.uint16) if locked else None
    slices = sorted({k.slice for k in boxes} | {k.slice for k in lines})
    spacing = float(np.mean(np.diff(slices))) if len(slices) > 1 else None
    return RunRequest(volume=volume, document=document, axis=axis, segment_id=segment_id, locked_slices=locked,
                      existing=existing, keyframe_count=len(slices), keyframe_spacing=spacing,
                      volume_node_id=volume_node.GetID() or "", segmentation_node_id=segmentation_node.GetID() or "",
                      notes=list(volume.notes))


def upload(client, volume: VolumeArray, cancel: Any = None):
    """Upload a volume (``MedSAMClient.upload_volume``: spacing (i, j, k), origin and direction LPS); a session."""
    return client.upload_volume(volume.array, volume.spacing, origin=volume.origin_lps, direction=volume.direction_lps,
                                cancel=cancel)


def execute_run(client, request: RunRequest, session: Any = None, progress: Callable | None = None,
                cancel: Any = None, options: dict | None = None) -> RunResult:
    """Upload the volume (unless ``session`` is given) and run the prompt document on the server.

    Touches no MRML, so it may run in a worker thread. A session the server no longer holds (404
    ``unknown_session``: expired or deleted; 410 ``session_lost``: its replica stopped) is uploaded
    again and the run repeated, once. Other exceptions (server errors, cancellation) propagate; the
    caller then skips ``apply_run`` and the segmentation stays as it was.
    """
    start = time.perf_counter()
    for attempt in (1, 2):
        if session is None:
            session = upload(client, request.volume, cancel)
        try:
            offset, labels, summary = client.annotate(session, request.document, existing=request.existing,
                                                      progress=progress, cancel=cancel, **(options or {}))
            break
        except UnknownSession:
            if attempt == 2:
                raise
            session = None  # lost before or during the run: nothing came back, so nothing is applied
    return RunResult(session=session, ijk_offset=tuple(int(v) for v in offset), labels=np.asarray(labels),
                     seconds=time.perf_counter() - start, summary=dict(summary or {}))


def apply_run(request: RunRequest, result: RunResult, volume_node, segmentation_node,
              save_undo_state: Callable[[], Any] | None = None) -> AppliedRun:
    """Write a finished run into its segment (main thread); refuses if the nodes are not the request's."""
    if (volume_node.GetID() or "") != request.volume_node_id or \
            (segmentation_node.GetID() or "") != request.segmentation_node_id:
        raise InputError("the volume or segmentation changed while the run was going; run Segment again")
    if tuple(reversed(volume_node.GetImageData().GetDimensions())) != request.volume.array.shape[:3]:
        raise InputError("the volume's size changed while the run was going; run Segment again")
    label = int(request.document["segments"][0]["label"])
    return apply_labels(volume_node, segmentation_node, request.segment_id, result.ijk_offset, result.labels,
                        label=label, axis=request.axis, locked_slices=request.locked_slices,
                        save_undo_state=save_undo_state)


#: The panel's "Quality" choice -> the annotate request's options (server ``requests.AnnotateOptions``).
#: "fast": the server's defaults (with its intensity fusion, which lifted every measured target). "best": the
#: orthogonal views on top (README "Accuracy": the thoracic spine 0.74 -> 0.84 at every 5 slices, the lungs
#: within 0.02 either way; about 6 times the time on a cold cache).
QUALITY_OPTIONS = {"fast": {}, "best": {"views": True}}
QUALITIES = tuple(QUALITY_OPTIONS)
DEFAULT_THRESHOLD = 0.5  # the probability threshold a run starts with (the server's protocol.MASK_THRESHOLD)


def quality_options(quality: str, single_slice: bool = False) -> dict:
    """The annotate options of a quality name; ``single_slice`` (a re-box) drops the views, which refine a
    whole segment."""
    if quality not in QUALITY_OPTIONS:
        raise InputError(f"quality is one of {', '.join(QUALITIES)}, got {quality!r}")
    options = dict(QUALITY_OPTIONS[quality])
    if single_slice:
        options.pop("views", None)
    return options


def keyframe_slices(request: RunRequest) -> list[int]:
    """Slices of ``request`` that carry a keyframe (a box or lines) of its segment."""
    segment = request.document["segments"][0]
    return sorted({int(k["slice"]) for k in segment.get("boxes", []) + segment.get("lines", [])})


def rebox_target(request: RunRequest, shown_slice: int | None) -> int:
    """The slice "Re-box this slice" decodes: the one the view shows (``geometry.view_slice``), which needs a
    keyframe of its own (a box drawn on it, or a keyframe whose corner moved). InputError says what to do."""
    if shown_slice is None:
        raise InputError("show the slice to re-box in the red view, in the orientation the keyframes were drawn in")
    if int(shown_slice) not in keyframe_slices(request):
        raise InputError(f"slice {shown_slice} has no keyframe: draw a box on it (Add box) or move a keyframe's "
                         "corner there, then re-box")
    return int(shown_slice)


def rebox_slice(client, request: RunRequest, slice_: int, session: Any = None, progress: Callable | None = None,
                cancel: Any = None, options: dict | None = None) -> RunResult:
    """Decode slice ``slice_`` alone from its keyframe box in ``request`` (re-box one slice); no propagation.
    ``apply_run`` then writes that slice only, as one undo step. The slice needs a keyframe of its own
    (``rebox_target``): that keyframe is what the next Segment keeps."""
    rebox_target(request, slice_)
    chosen = {**(options or {}), "only_slice": int(slice_), "propagate": 0}
    return execute_run(client, request, session, progress, cancel, chosen)


def apply_threshold(client, session, volume_node, segmentation_node, segment_id: str, label: int = 1,
                    threshold: float | None = None, slices: dict | None = None,
                    save_undo_state: Callable[[], Any] | None = None) -> tuple[AppliedRun, dict]:
    """Move a segment's threshold over its last run on the server and write the slices that change, as one
    undo step (main thread: it writes MRML). Returns what was written and the server's header (its ``review``
    is the new ranking). Slices the run did not decode stay as they are."""
    header, masks = client.threshold(session, label, threshold, slices)
    if not masks:
        return AppliedRun(changed_slices=[], locked_slices=[], voxels=0), header
    axis, first, last = int(header["axis"]), min(masks), max(masks)
    size_kji = tuple(reversed(volume_node.GetImageData().GetDimensions()))
    block_shape = list(size_kji)
    block_shape[2 - axis] = last - first + 1
    block = np.zeros(block_shape, dtype=np.uint8)
    for index, mask in masks.items():
        block[slice_index(axis, index - first)] = mask
    offset = [0, 0, 0]
    offset[axis] = first
    gaps = [k for k in range(first, last + 1) if k not in masks]  # not in the run: left alone
    applied = apply_labels(volume_node, segmentation_node, segment_id, tuple(offset), block, label=1, axis=axis,
                           locked_slices=gaps, save_undo_state=save_undo_state)
    return applied, header


def cycle_alternative(client, session, volume_node, segmentation_node, segment_id: str, slice_: int, label: int = 1,
                      save_undo_state: Callable[[], Any] | None = None) -> tuple[AppliedRun, dict]:
    """Write the next of a slice's masks (the model's, then the decoder's alternatives 1..3, then the model's
    again) as one undo step (main thread: it writes MRML). The server's kept run keeps the choice, so a later
    threshold moves the chosen mask. Returns what was written and the header (``chosen``, ``review``)."""
    header, _ = client.alternatives(session, label, slice_)
    header, masks = client.alternatives(session, label, slice_, (int(header["chosen"]) + 1) % ALTERNATIVE_COUNT)
    return write_slice(volume_node, segmentation_node, segment_id, int(header["axis"]), int(slice_),
                       masks[int(header["chosen"])], save_undo_state), header


def write_slice(volume_node, segmentation_node, segment_id: str, axis: int, slice_: int, mask: np.ndarray,
                save_undo_state: Callable[[], Any] | None = None) -> AppliedRun:
    """Replace one slice of a segment by a (rows, cols) mask in slice pixels, as one undo step."""
    block_shape = list(reversed(volume_node.GetImageData().GetDimensions()))
    block_shape[2 - axis] = 1
    block = np.zeros(block_shape, dtype=np.uint8)
    block[slice_index(axis, 0)] = mask
    offset = [0, 0, 0]
    offset[axis] = slice_
    return apply_labels(volume_node, segmentation_node, segment_id, tuple(offset), block, label=1, axis=axis,
                        save_undo_state=save_undo_state)


def run_segmentation(client, volume_node, segmentation_node, segment_id: str, *, roi_nodes=None, line_nodes=None,
                     window: Any = "auto", axis: int | None = None, session: Any = None,
                     progress: Callable | None = None, cancel: Any = None,
                     save_undo_state: Callable[[], Any] | None = None) -> tuple[AppliedRun, RunResult]:
    """``prepare_run`` + ``execute_run`` + ``apply_run`` in one blocking call (scripts and tests)."""
    request = prepare_run(volume_node, segmentation_node, segment_id, roi_nodes, line_nodes, window, axis)
    result = execute_run(client, request, session=session, progress=progress, cancel=cancel)
    return apply_run(request, result, volume_node, segmentation_node, save_undo_state), result



def in_background(function: Callable[[], Any], name: str = "MedSAM") -> Future:
    """Run ``function`` in a daemon thread; its Future says when it is done.

    A daemon thread, not a ThreadPoolExecutor's worker: Python joins those at exit, so a call blocked
    on the network would keep Slicer from quitting.
    """
    future: Future = Future()

    def target() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(function())
        except BaseException as error:  # noqa: BLE001 - handed to whoever polls the future
            future.set_exception(error)

    threading.Thread(target=target, name=name, daemon=True).start()
    return future
