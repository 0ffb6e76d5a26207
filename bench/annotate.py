"""Whole-workflow overhead: wall time of an annotate run against the time spent inside the model.

Runs the sparse-marker workflow on the real chest CT (both lungs, keyframe boxes
every 5 slices, LiteMedSAM) and prints, measured side by side in one run:
- wall time of `annotate(...)` vs the sum of the runtime's encoder and decoder
  calls (overhead ratio: preprocessing, interpolation, post-processing, bookkeeping);
- the cache hit rate when the second segment (left lung) shares slices with the first;
- box interpolation: PCHIP vs linear, Dice of each lung at k = 5 and 10;
- issue 15's stages (``medsam simulate --ablation``'s list): each one's wall time, cold cache, as a ratio
  of the model alone, and both lungs' Dice.

- ``--overlap ROUNDS``: only decoding overlapped with the next encode against the sequential loop (issue 17).

Usage: python bench/annotate.py [--quick] [--overlap ROUNDS]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import SimpleITK as sitk
import slicerio

from medsam_server.annotate import annotate
from medsam_server.embeddings import EmbeddingCache
from medsam_server.models import load_model
from medsam_server.multiview import annotate_multiview
from medsam_server.prompts import parse_prompts
from medsam_server.requests import AnnotateOptions
from medsam_server.simulate import ABLATION, simulated_prompts

LUNGS = (("right lung", 5), ("left lung", 6))


class TimedRuntime:
    """Wraps a runtime and adds up the seconds spent in its encode and decode calls."""

    def __init__(self, runtime):
        self.runtime, self.seconds = runtime, 0.0
        self.device = runtime.device

    def _timed(self, call, *args):
        started = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.seconds += time.perf_counter() - started

    def encode(self, images):
        return self._timed(self.runtime.encode, images)

    def decode(self, embeddings, coords, labels):
        return self._timed(self.runtime.decode, embeddings, coords, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one lung, fewer slices")
    parser.add_argument("--overlap", type=int, metavar="ROUNDS", help="only the decode/encode overlap A/B")
    args = parser.parse_args()
    data = os.path.join(os.path.dirname(slicerio.__file__), "data")
    image = sitk.ReadImage(os.path.join(data, "CTChest4.nrrd"))
    volume, direction = sitk.GetArrayFromImage(image), np.array(image.GetDirection()).reshape(3, 3)
    labels = slicerio.read_segmentation(os.path.join(data, "Segmentation.seg.nrrd"))["voxels"].transpose(2, 1, 0)
    if args.quick:
        volume, labels = volume[14:22], labels[14:22]
    size = tuple(reversed(volume.shape))
    if args.overlap:
        return overlap_ab(volume, direction, labels, size, args.overlap)
    model = load_model("litemedsam", device="cpu")
    model.runtime = timed = TimedRuntime(model.runtime)

    document = parse_prompts(simulated_prompts(labels, LUNGS, 5, window="ct-lung"), size)
    cache = EmbeddingCache()
    started = time.perf_counter()
    result = annotate(volume, direction, document, model, cache)
    wall = time.perf_counter() - started
    hits, misses = result.cache_hits, result.cache_misses
    print(f"annotate, both lungs, keyframes every 5 slices, {len(result.changed_slices)} slices, cold cache")
    print(f"  wall {wall:.2f} s   inside the model {timed.seconds:.2f} s   overhead ratio {wall / timed.seconds:.3f}")
    print(f"  embedding {result.seconds_embedding:.2f} s   decoding {result.seconds_decoding:.2f} s")
    print(f"  cache: {hits} hits / {hits + misses} slice requests = {hits / (hits + misses):.0%} "
          "(the left lung reuses the right lung's slices)")

    timed.seconds = 0.0
    started = time.perf_counter()
    annotate(volume, direction, document, model, cache)
    wall = time.perf_counter() - started
    print(f"same run, warm cache: wall {wall:.2f} s, inside the model (decoder only) {timed.seconds:.2f} s, "
          f"overhead ratio {wall / timed.seconds:.3f}")

    print("box interpolation (warm cache), 3D Dice:")
    for every in (5, 10):
        row = []
        for method in ("linear", "pchip"):
            doc = parse_prompts(simulated_prompts(labels, LUNGS, every, window="ct-lung"), size)
            out = annotate(volume, direction, doc, model, cache, AnnotateOptions(interpolation=method)).labels
            scores = [2 * ((out == n) & (labels == lab)).sum() / ((out == n).sum() + (labels == lab).sum())
                      for n, (_, lab) in enumerate(LUNGS, start=1)]
            row.append(f"{method} {scores[0]:.4f}/{scores[1]:.4f}")
        print(f"  k={every:<3} right/left  " + "   ".join(row))

    stage_costs(volume, direction, labels, model, size)


def stage_costs(volume, direction, labels, model, size) -> None:
    """Each stage of ``simulate.ABLATION`` on both lungs (keyframes every 5), each on a cold cache: the extra
    views encode their own slices, which a warm cache would hide."""
    spacing = (3.046875, 3.046875, 10.0)
    document = parse_prompts(simulated_prompts(labels, LUNGS, 5, window="ct-lung"), size)
    print("issue 15's stages, both lungs, every 5, cold cache each (ratio to the model alone):")
    alone = None
    for stage, changes in ABLATION:
        started = time.perf_counter()
        out = annotate_multiview(volume, direction, spacing, document, model, EmbeddingCache(),
                                 AnnotateOptions(**changes)).labels
        wall = time.perf_counter() - started
        alone = alone or wall
        scores = [2 * ((out == n) & (labels == lab)).sum() / ((out == n).sum() + (labels == lab).sum())
                  for n, (_, lab) in enumerate(LUNGS, start=1)]
        print(f"  {stage:<20} {wall:7.2f} s  x{wall / alone:.2f}   Dice {scores[0]:.4f} / {scores[1]:.4f}")


def overlapped_probabilities(self, indices, boxes):
    """Prototype of ``_Run.probabilities`` with batch n decoded on a helper thread while batch n+1 is encoded
    (ONNX Runtime releases the GIL); same order, progress, cache counts and cancellation (the pending decode
    is waited for before Cancelled is raised)."""
    from concurrent.futures import ThreadPoolExecutor

    from medsam_server.refine import quantize

    out = np.zeros((len(indices), *self.stack.shape), dtype=np.uint8)
    live = [n for n, i in enumerate(indices) if not self.stack.is_constant(i)]
    pending = None

    def decode(batch, emb):
        started = time.perf_counter()
        out[batch] = quantize(self.stack.decode(emb, np.array([boxes[n] for n in batch])))
        return time.perf_counter() - started

    def finish():
        batch, future = pending
        self.seconds_decoding += future.result()
        self.advance(len(batch))

    with ThreadPoolExecutor(max_workers=1) as helper:
        try:
            for start in range(0, len(live), self.batch_size):
                self.check()
                batch = live[start:start + self.batch_size]
                t0 = time.perf_counter()
                emb, hits = self.stack.embeddings([indices[n] for n in batch], should_stop=self.should_stop)
                self.seconds_embedding += time.perf_counter() - t0
                self.hits += hits
                self.misses += len(batch) - hits
                if pending:
                    finish()
                pending = batch, helper.submit(decode, batch, emb)
            if pending:
                finish()
        except BaseException:
            if pending:
                pending[1].exception()  # let the decode end before the caller sees the error
            raise
    self.advance(len(indices) - len(live))
    return out


def overlap_ab(volume, direction, labels, size, rounds: int) -> None:
    """Decoding overlapped with the next encode against today's sequential loop (issue 17): the same job
    (both lungs, every 5, cold cache, default backend), the variants taking turns; also one intra-op thread
    per session, sequential and overlapped."""
    from medsam_server import annotate as annotate_module

    sequential = annotate_module._Run.probabilities
    document = parse_prompts(simulated_prompts(labels, LUNGS, 5, window="ct-lung"), size)
    models = {2: load_model("litemedsam", device="cpu", backend="auto"),
              1: load_model("litemedsam", device="cpu", backend="auto", threads=1)}
    variants = {"sequential": (sequential, 2), "overlapped": (overlapped_probabilities, 2),
                "sequential, 1 thread/session": (sequential, 1),
                "overlapped, 1 thread/session": (overlapped_probabilities, 1)}
    walls: dict = {name: [] for name in variants}
    masks: dict = {}
    print(f"decode overlapped with the next encode, both lungs, every 5, cold cache, {rounds} rounds, "
          f"backend {models[2].runtime.backend}, load {os.getloadavg()[0]:.2f}")
    for _ in range(rounds):
        for name, (function, threads) in variants.items():
            annotate_module._Run.probabilities = function
            try:
                started = time.perf_counter()
                out = annotate(volume, direction, document, models[threads], EmbeddingCache()).labels
                walls[name].append(time.perf_counter() - started)
            finally:
                annotate_module._Run.probabilities = sequential
            masks.setdefault(name, out)
            assert np.array_equal(out, masks[name]), f"{name}: labels differ between rounds"
    base = statistics.median(walls["sequential"])
    for name, seconds in walls.items():
        same = np.array_equal(masks[name], masks["sequential"])
        print(f"  {name:<30} median {statistics.median(seconds):6.2f} s  x{statistics.median(seconds) / base:.3f}  "
              f"runs {' '.join(f'{s:.2f}' for s in seconds)}  labels identical to sequential: {same}")
    print(f"  load after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
