"""How many readers one replica (one GPU) serves: its model worker under N readers, simulated event by event.

From per-slice costs only (no model, no Ray): an H100's for LiteMedSAM by default (encoder about 15 ms a slice,
decoder about 2 ms a box; assumed, not measured here). The README's scaling section quotes its table.

Run: ``.venv/bin/python bench/readers_per_gpu.py [--encoder-ms 15 --decoder-ms 2]`` (seconds).
"""

from __future__ import annotations

import argparse
import heapq

import numpy as np


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


DECODE, SEGMENT_ENCODE, ANNOTATE, PREFETCH = 0, 1, 2, 3  # the model worker's priorities, highest first


class WorkerSim:
    """One replica's model worker under ``readers`` readers, as a discrete-event simulation.

    Each reader uploads a case of ``slices`` slices (all queued for prefetch), draws ``boxes`` boxes
    ``think_s`` apart (exponential) moving through the volume, then propagates over ``propagated`` of
    the slices (one decoder call per slice), and starts the next case. The worker runs one step at a time
    (an encoder slice or a decoder call): decoder calls first, then encodes a box waits for, then
    annotate, then prefetch, as the server's worker does; no batching gain is assumed (conservative).
    """

    def __init__(self, readers: int, encoder_ms: float, decoder_ms: float, slices: int = 300, boxes: int = 40,
                 think_s: float = 6.0, propagated: float = 0.6, seed: int = 0):
        import random

        self.rng, self.slices, self.boxes, self.think_s, self.propagated = random.Random(seed), slices, boxes, \
            think_s, propagated
        self.cost = {"encode": encoder_ms / 1e3, "decode": decoder_ms / 1e3}
        self.events: list = []  # (time, order, kind, reader, payload)
        self.queue: list = []  # (priority, order, reader, case, kind, item)
        self.order = iter(range(1 << 62))
        self.case, self.uploaded = [0] * readers, [0.0] * readers
        self.encoded: list[set] = [set() for _ in range(readers)]
        self.latency: dict[str, list[float]] = {"cached": [], "uncached": [], "prefetch": []}
        self.busy, self.worker_free = 0.0, 0.0
        for r in range(readers):  # readers start at random moments of a case
            self.event(self.rng.uniform(0, boxes * think_s), "upload", r)

    def event(self, when: float, kind: str, reader: int, payload=None) -> None:
        heapq.heappush(self.events, (when, next(self.order), kind, reader, payload))

    def work(self, priority: float, reader: int, kind: str, item) -> None:
        heapq.heappush(self.queue, (priority, next(self.order), reader, self.case[reader], kind, item))

    def upload(self, r: int, now: float) -> None:
        self.case[r] += 1
        self.encoded[r], self.uploaded[r] = set(), now
        for k in range(self.slices):
            self.work(PREFETCH, r, "encode", k)
        self.event(now + self.rng.expovariate(1 / self.think_s), "box", r, 0)

    def box(self, r: int, n: int, now: float) -> None:
        k = min(self.slices - 1, n * self.slices // self.boxes)
        if k in self.encoded[r]:
            self.work(DECODE, r, "decode", ("cached", now))
        else:
            self.work(SEGMENT_ENCODE, r, "encode", k)
            self.work(DECODE + 0.5, r, "decode", ("uncached", now))  # after its encode, before other boxes
        if n + 1 < self.boxes:
            self.event(now + self.rng.expovariate(1 / self.think_s), "box", r, n + 1)
            return
        for _ in range(int(self.propagated * self.slices)):
            self.work(ANNOTATE, r, "decode", ("annotate", now))
        self.event(now + self.think_s, "upload", r)

    def step(self, now: float) -> None:
        """The worker's next step, if it is free (work of a finished case is dropped)."""
        while self.queue and self.queue[0][3] != self.case[self.queue[0][2]]:
            heapq.heappop(self.queue)
        if self.worker_free > now or not self.queue:
            return
        _, _, r, _, kind, item = heapq.heappop(self.queue)
        if kind == "encode" and item in self.encoded[r]:
            return self.step(now)
        self.worker_free = now + self.cost[kind]
        self.busy += self.cost[kind]
        if kind == "encode":
            self.encoded[r].add(item)
            if len(self.encoded[r]) == self.slices:
                self.latency["prefetch"].append(self.worker_free - self.uploaded[r])
        elif item[0] in ("cached", "uncached"):
            self.latency[item[0]].append((self.worker_free - item[1]) * 1e3)
        self.event(self.worker_free, "done", r)

    def run(self, hours: float = 2.0) -> dict:
        end = hours * 3600.0
        while self.events and self.events[0][0] <= end:
            now, _, kind, r, payload = heapq.heappop(self.events)
            if kind == "upload":
                self.upload(r, now)
            elif kind == "box":
                self.box(r, payload, now)
            self.step(now)
        return {"utilisation": self.busy / end, "cached_p95_ms": p(self.latency["cached"], 95),
                "uncached_p95_ms": p(self.latency["uncached"], 95), "prefetch_p95_s": p(self.latency["prefetch"], 95)}


def paper(encoder_ms: float, decoder_ms: float, counts: list[int]) -> None:
    print(f"one replica, encoder {encoder_ms:g} ms/slice, decoder {decoder_ms:g} ms/box; readers on 300-slice "
          "cases, 40 boxes 6 s apart, then propagation over 60 % of the slices")
    print(f"{'readers':>8} {'busy':>6} {'cached box p95 ms':>18} {'uncached box p95 ms':>20} "
          f"{'case prefetched p95 s':>22}")
    for n in counts:
        r = WorkerSim(n, encoder_ms, decoder_ms).run()
        print(f"{n:8d} {r['utilisation']:6.0%} {r['cached_p95_ms']:18.1f} {r['uncached_p95_ms']:20.1f} "
              f"{r['prefetch_p95_s']:22.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder-ms", type=float, default=15.0, help="encoder ms a slice (default: an H100's 15)")
    parser.add_argument("--decoder-ms", type=float, default=2.0, help="decoder ms a box (default: an H100's 2)")
    args = parser.parse_args()
    paper(args.encoder_ms, args.decoder_ms, [1, 10, 20, 30, 40, 45, 50, 60])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
