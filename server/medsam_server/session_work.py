"""The work done on a server session: segment, threshold, prefetch and annotate.

:class:`SessionWork` is the half of ``sessions.Sessions`` that runs model work (the other half,
``sessions.py``, is the store: keys, owners, quotas, expiry). Request bodies are parsed by
``requests.py``, jobs kept by ``jobs.py``, and every decode goes through ``stack.SliceStack``:

- ``segment``: boxes (and optional points) on slices -> one mask per box, waiting only
  for the embeddings of those slices (computed at ``PRIORITY_SEGMENT`` if missing);
- ``threshold``: a segment's kept run at other thresholds (no model call);
- ``alternatives``: one slice of a kept run, its mask and the decoder's other masks, one of them chosen
  (``alternative_masks.py``; a decoder call on the cached embedding, no encoder call);
- prefetch jobs: embed a slice range in the background (lowest priority);
- annotate jobs: the prompt document run by ``multiview.annotate_multiview`` on the model worker;
  the result is the block of changed slices, already encoded, and each segment's run is kept.

Frames: boxes and points are (u, v) slice pixels as in the prompt document; masks
are (rows = v, cols = u); volumes are (k, j, i[, 3]); offsets (i0, j0, k0).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from . import alternative_masks, wire
from .annotate import plan, slices_to_decode
from .embeddings import EmbeddingCache
from .errors import InputError
from .geometry import changed_block
from .jobs import Job, run_job
from .multiview import annotate_multiview
from .protocol import Limits
from .refine import kept_review, merge, set_thresholds, threshold_answer
from .requests import (
    AlternativesRequest,
    SegmentRequest,
    SliceParams,
    parse_alternatives_request,
    parse_annotate_request,
    parse_prefetch_request,
    parse_segment_request,
    parse_threshold_request,
)
from .stack import SliceStack
from .worker import PRIORITY_ANNOTATE, PRIORITY_PREFETCH, PRIORITY_SEGMENT, ModelWorker, WorkerModel

if TYPE_CHECKING:
    from .sessions import ServerSession

STACKS_PER_SESSION = 2  # (axis, window) views kept per session; each is one uint8 copy of the volume


class SessionWork:
    """Model work on sessions; blocking unless said otherwise (call from worker threads).

    Needs ``worker``, ``cache``, ``limits`` and ``job_pool`` (``sessions.Sessions`` sets them).
    """

    worker: ModelWorker
    cache: EmbeddingCache
    limits: Limits
    job_pool: ThreadPoolExecutor

    def _stack(self, session: ServerSession, params: SliceParams, priority: int,
               should_stop=None) -> SliceStack:
        """The session's volume as slices (kept for the next request), through the worker at ``priority``."""
        key = (params.axis, json.dumps(params.window), params.orientation)
        with session.lock:
            stack = session.stacks.get(key)
            if stack is None:
                stack = SliceStack(session.array, session.geometry.direction_matrix, params.axis, params.window,
                                   WorkerModel(self.worker), self.cache, params.orientation, session.cache_volume)
                session.stacks[key] = stack
                while len(session.stacks) > STACKS_PER_SESSION:
                    session.stacks.popitem(last=False)
            session.stacks.move_to_end(key)
        return stack.using(WorkerModel(self.worker, priority, should_stop, session.owner))

    async def segment(self, session: ServerSession, raw: Any,
                      run: Callable[..., Awaitable]) -> tuple[SegmentRequest, np.ndarray]:
        """Masks (N, rows, cols) bool, one per box of the request, in slice pixels.

        A coroutine: ``run(function, *args)`` does the blocking parts (parsing, the slice view) on a
        thread, and the model work is awaited on the worker's futures, so no thread waits for the
        encoder; cancelling it (the client went away) drops the work still queued.
        """
        request, stack, live = await run(self._segment_plan, session, raw)
        masks = np.zeros((len(request.entries), *stack.shape), dtype=bool)
        if not live:
            return request, masks
        embeddings = await stack.embeddings_awaited([request.entries[n].slice for n in live])
        groups: dict[Optional[int], list[int]] = {}  # decoded together: the same number of points
        for position, n in enumerate(live):
            points = request.entries[n].points
            groups.setdefault(None if points is None else len(points), []).append(position)
        for count, positions in groups.items():
            entries = [request.entries[live[p]] for p in positions]
            points = None if count is None else np.array([e.points for e in entries])
            labels = None if count is None else np.array([e.point_labels for e in entries])
            found = await stack.masks_awaited(embeddings[positions], np.array([e.box for e in entries]), points,
                                              labels, run, [e.slice for e in entries])
            for p, mask in zip(positions, found, strict=True):
                masks[live[p]] = mask
        return request, masks

    def _segment_plan(self, session: ServerSession, raw: Any) -> tuple[SegmentRequest, SliceStack, list[int]]:
        """The parsed request, its slices, and which of its boxes lie on slices that are not constant."""
        request = parse_segment_request(raw, session.size_ijk, self.limits)
        stack = self._stack(session, request.params, PRIORITY_SEGMENT)
        live = []
        for n, entry in enumerate(request.entries):
            if stack.is_constant(entry.slice):
                request.notes.append(f"slice {entry.slice} is constant; its mask is empty")
            else:
                live.append(n)
        return request, stack, live

    def threshold(self, session: ServerSession, raw: Any) -> tuple[dict, np.ndarray]:
        """Move one segment's thresholds over its last annotate run (no model call): header and its masks."""
        request = parse_threshold_request(raw)
        with session.lock:
            run = session.runs.get(request.label)
            if run is None:
                raise InputError(f"segment label {request.label} has no annotate run in this session; "
                                 "run annotate first (the threshold moves over its probabilities)")
            set_thresholds(run, request.threshold, request.slice_thresholds)
            return threshold_answer(run)

    async def alternatives(self, session: ServerSession, raw: Any,
                           run: Callable[..., Awaitable]) -> tuple[dict, np.ndarray]:
        """One slice of a segment's last run: header and its (4, rows, cols) candidate masks, after keeping the
        one the request chooses. Its alternatives are decoded once (on the worker, from the cached embedding)."""
        request, box, params = await run(self._alternatives_plan, session, raw)
        if box is not None:
            stack = await run(self._stack, session, params, PRIORITY_SEGMENT)
            embedding = await stack.embeddings_awaited([request.slice])
            decoded = (await stack.alternatives_awaited(embedding, box[None]))[0]
        return await run(self._alternatives_choose, session, request, None if box is None else (box, decoded))

    def _alternatives_plan(self, session: ServerSession, raw: Any) -> tuple[AlternativesRequest, Any, SliceParams]:
        request = parse_alternatives_request(raw, session.size_ijk)
        with session.lock:
            kept = self._kept_run(session, request.label)
            box = alternative_masks.box_to_decode(kept, request.slice)
            return request, box, SliceParams(kept.axis, kept.window, kept.orientation)

    def _alternatives_choose(self, session: ServerSession, request: AlternativesRequest,
                             decoded: Optional[tuple]) -> tuple[dict, np.ndarray]:
        with session.lock:
            kept = self._kept_run(session, request.label)  # the same run, unless a new one came meanwhile
            box = alternative_masks.box_to_decode(kept, request.slice)
            if box is not None:
                if decoded is None or not np.array_equal(decoded[0], box):
                    raise InputError(f"segment label {request.label}: its run changed during the request; "
                                     "ask again")
                alternative_masks.keep_alternatives(kept, request.slice, decoded[1])
            if request.choose is not None:
                alternative_masks.choose(kept, request.slice, request.choose)
            return alternative_masks.alternatives_answer(kept, request.slice)

    @staticmethod
    def _kept_run(session: ServerSession, label: int):
        kept = session.runs.get(label)
        if kept is None:
            raise InputError(f"segment label {label} has no annotate run in this session; run annotate first")
        if kept.window is None:
            raise InputError(f"segment label {label}: its run does not say which slices it decoded")
        return kept

    def start_prefetch(self, session: ServerSession, raw: Any) -> Job:
        """Embed a slice range in the background; returns the job to poll."""
        request = parse_prefetch_request(raw, session.size_ijk)
        job = session.jobs.new("prefetch")

        def work(job: Job) -> None:
            stack = self._stack(session, request.params, PRIORITY_PREFETCH, job.cancel.is_set)
            live = [i for i in request.slices if not stack.is_constant(i)]
            job.set_progress(len(request.slices) - len(live), len(request.slices), "embedding")
            _, job.cached = stack.embeddings(live, progress=job.advance, keep=False)

        self.job_pool.submit(run_job, job, work)
        return job

    def start_annotate(self, session: ServerSession, header: Any, existing: Optional[np.ndarray]) -> Job:
        """Validate a prompt document (errors now, before a job exists) and run it as a job."""
        prompts, options = parse_annotate_request(header, session.size_ijk,
                                                  None if existing is None else existing.shape)
        job = session.jobs.new("annotate")

        def work(job: Job) -> bytes:
            params = SliceParams(prompts.axis, prompts.window, options.orientation)
            stack = self._stack(session, params, PRIORITY_ANNOTATE, job.cancel.is_set)
            # Embed every keyframe range first, so that progress moves during the slow part;
            # annotate() then finds them cached.
            needed = [i for i in slices_to_decode(prompts, plan(prompts, options)) if not stack.is_constant(i)]
            job.set_progress(0, len(needed), "embedding")
            stack.embeddings(needed, progress=job.advance, keep=False)

            def progress(phase: str, done: int, total: int) -> None:
                job.set_progress(len(needed) + done, len(needed) + total, phase)

            result = annotate_multiview(session.array, session.geometry.direction_matrix, session.geometry.spacing,
                                        prompts, stack.model, self.cache, options, existing=existing,
                                        progress=progress, should_stop=job.cancel.is_set,
                                        digest=session.cache_volume, stack=stack)
            offset, block = changed_block(result.labels, result.changed_slices, prompts.axis)
            with session.lock:  # kept so that a threshold can move without a model call
                for done in result.segments:
                    session.runs[done.label] = merge(session.runs.get(done.label), done.run, options.only_slice)
                # a re-boxed slice is reviewed within its segment's kept run (its neighbours count)
                review = [d.review if options.only_slice is None else kept_review(session.runs[d.label])
                          for d in result.segments]
            summary = {**result.summary(), "changed_slices": result.changed_slices, "axis": prompts.axis,
                       "review": review}
            meta = {} if block is None else {"array": {"offset": list(offset)}}
            return wire.encode({"summary": summary, **meta}, block)

        self.job_pool.submit(run_job, job, work)
        return job
