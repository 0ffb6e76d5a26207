"""Many readers at once: ``medsam serve --replicas 2`` (Ray Serve) against one ``medsam serve`` process.

Each reader is the Slicer module's client in a thread of this process. By default each annotates its own
slab of slicerio's CTChest4 (``--slices`` axial slices each, different slabs: different patients, whose
embeddings no session can share): upload, prefetch in the background, a box on each lung of each
slice, a corrected box on each (cached) slice, a propagated annotation from the first and last slice's
boxes, delete. ``--whole-ct``: each reader annotates the whole CT instead, as the demo does (its own copy,
shifted by a few HU so that no two readers share an embedding; both lungs, keyframe boxes every 5 slices,
a corrected box on each keyframe, the annotation interpolated over all 27 lung slices). That is 34
encoded slices a reader, 340 for the four configurations below: about 10-15 minutes on the shared
2-core machine (2 s an encode under load), not the few minutes the slab run takes, so the slab run is
the default and the README's figures come from it.

Measured side by side in one run, on the same Ray cluster and the same CPU:

- one reader: one process (``medsam serve``, ONNX Runtime on all cores) vs the Ray path with one replica
  that holds all cores (the same compute: the ratio is the cost of the proxy -> ingress -> replica hops);
- four readers at once: one process vs two replicas of one core each (torch and ONNX Runtime threads
  limited to the replica's share);
- per replica: sessions held, cache hits and misses, slices encoded (affinity: a session's slices
  are encoded once, on its replica), from ``/info``'s aggregate ``load`` figures.

``--cached-box``: only the latency of a box on a cached slice, one reader, one process against the Ray path
(1 replica holding all cores) side by side: corrected boxes on one slice while the upload's background
embedding runs (as in ``--whole-ct``, where a reader corrects its keyframes before its CT is embedded),
the same once it is done, and ``/health`` round trips (the proxy -> ingress -> replica hops with no model
work). About 3 minutes on 2 cores.

Run: ``.venv/bin/python bench/ray_serve.py [--slices 6] [--readers 4] [--whole-ct | --cached-box]`` (a few
minutes on 2 cores for the default). ``--paper [--encoder-ms 15 --decoder-ms 2]`` prints the scale on paper instead:
one replica's model worker under N readers, simulated event by event from the per-slice costs (see
``WorkerSim``).
"""

from __future__ import annotations

import argparse
import heapq
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
RIGHT_LUNG, LEFT_LUNG = 5, 6
FIRST_SLICE = 7  # CTChest4's slices 7..33 show both lungs
WINDOW = "ct-lung"


def load_client():
    sys.path.insert(0, str(REPO / "MedSAMSlicer"))
    from MedSAMSlicerLib import client

    return client


def ct_chest():
    import SimpleITK as sitk
    import slicerio

    folder = Path(slicerio.__file__).parent / "data"
    image = sitk.ReadImage(str(folder / "CTChest4.nrrd"))
    labels = slicerio.read_segmentation(str(folder / "Segmentation.seg.nrrd"))["voxels"].transpose(2, 1, 0)
    return sitk.GetArrayFromImage(image), labels, np.array(image.GetDirection()).reshape(3, 3)


def box(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    return [float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())]


def reader(client, volume, labels, direction, cached_ms: list[float]) -> None:
    """One reader's annotation of its slab; appends the cached-slice box round trips (ms) to ``cached_ms``."""
    session = client.upload_volume(volume, direction=direction)
    client.prefetch(session, window=WINDOW)
    boxes = [{lung: box(labels[k] == lung) for lung in (RIGHT_LUNG, LEFT_LUNG)} for k in range(volume.shape[0])]
    for k, lungs in enumerate(boxes):
        for lung in (RIGHT_LUNG, LEFT_LUNG):
            client.segment(session, [{"slice": k, "box": lungs[lung]}], window=WINDOW)
    for k, lungs in enumerate(boxes):  # a corrected box: the slice is cached now
        start = time.perf_counter()
        client.segment(session, [{"slice": k, "box": np.add(lungs[RIGHT_LUNG], [-1, -1, 1, 1]).tolist()}],
                       window=WINDOW)
        cached_ms.append((time.perf_counter() - start) * 1e3)
    last = volume.shape[0] - 1
    document = {"axis": 2, "window": WINDOW, "segments": [
        {"name": name, "label": lung, "boxes": [{"slice": 0, "box": boxes[0][lung]},
                                                {"slice": last, "box": boxes[last][lung]}]}
        for name, lung in (("right lung", RIGHT_LUNG), ("left lung", LEFT_LUNG))]}
    client.annotate(session, document)
    client.delete(session)


def whole_ct_reader(client, volume, labels, direction, cached_ms: list[float]) -> None:
    """One reader's annotation of the whole CT: both lungs, keyframe boxes every 5 slices (as ``make demo``)."""
    from medsam_server.simulate import simulated_prompts

    document = simulated_prompts(labels, [("right lung", RIGHT_LUNG), ("left lung", LEFT_LUNG)], 5, window=WINDOW)
    session = client.upload_volume(volume, direction=direction)
    client.prefetch(session, window=WINDOW)
    keyframes = [entry for segment in document["segments"] for entry in segment["boxes"]]
    for entry in keyframes:  # the reader draws each keyframe box and sees its mask
        client.segment(session, [entry], window=WINDOW)
    for entry in keyframes:  # a corrected box: the slice is cached now
        start = time.perf_counter()
        client.segment(session, [{"slice": entry["slice"], "box": np.add(entry["box"], [-1, -1, 1, 1]).tolist()}],
                       window=WINDOW)
        cached_ms.append((time.perf_counter() - start) * 1e3)
    client.annotate(session, document)
    client.delete(session)


def readers(client_module, url: str, count: int, slices: int, scan, whole: bool = False) -> tuple[float, list[float]]:
    """``count`` readers at once; (wall seconds, cached-box milliseconds of all)."""
    volume, labels, direction = scan
    cached: list[float] = []
    errors: list[BaseException] = []

    def one(n: int) -> None:
        try:
            if whole:  # a different patient each: shifted intensities, so no embedding is shared
                shifted = (volume.astype(np.int32) + 7 * n).astype(volume.dtype)
                whole_ct_reader(client_module.MedSAMClient(url), shifted, labels, direction, cached)
                return
            slab = slice(FIRST_SLICE + n * slices, FIRST_SLICE + (n + 1) * slices)
            reader(client_module.MedSAMClient(url), np.ascontiguousarray(volume[slab]),
                   labels[slab], direction, cached)
        except BaseException as err:  # reported below: a failed reader voids the measurement
            errors.append(err)

    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start, cached


def cached_box(client, volume, labels, direction, boxes: int, k: int = 20) -> dict[str, list[float]]:
    """Round trips (ms) of ``boxes`` corrected boxes on cached slice ``k``: while the rest of the volume is
    embedded in the background, then once it is all embedded; and ``boxes`` ``/health`` round trips."""
    session = client.upload_volume(volume, direction=direction)
    job = client.prefetch(session, window=WINDOW)
    lung = box(labels[k] == RIGHT_LUNG)
    client.segment(session, [{"slice": k, "box": lung}], window=WINDOW)  # slice k is cached from here on
    times: dict[str, list[float]] = {"embedding": [], "idle": [], "health": []}

    def boxes_on_k(into: list[float]) -> None:
        for n in range(boxes):
            start = time.perf_counter()
            client.segment(session, [{"slice": k, "box": np.add(lung, [-(n % 3), 0, n % 3, 0]).tolist()}],
                           window=WINDOW)
            into.append((time.perf_counter() - start) * 1e3)

    boxes_on_k(times["embedding"])
    if client.job_status(session, job)["state"] == "done":
        raise RuntimeError("the background embedding ended before the boxes did: the first figures are not "
                           "'while embedding' (ask for fewer --boxes)")
    client.wait(session, job)
    boxes_on_k(times["idle"])
    for _ in range(boxes):
        start = time.perf_counter()
        client.health()
        times["health"].append((time.perf_counter() - start) * 1e3)
    client.delete(session)
    return times


def cached_box_run(client_module, scan, boxes: int, ray_url: str, ray_port: int, cores: int) -> None:
    """``--cached-box``: one process, then the Ray path (1 replica x all cores), one reader each; a table."""
    volume, labels, direction = scan
    results = {}
    with one_process(ray_port + 1) as url:
        wait_ready(client_module, url)
        results["1 process"] = cached_box(client_module.MedSAMClient(url), volume, labels, direction, boxes)
    with ray_replicas(1, cores, ray_port):
        wait_ready(client_module, ray_url)
        shifted = (volume.astype(np.int32) + 7).astype(volume.dtype)  # no embedding carried over, come what may
        results[f"Ray, 1 replica x {cores} cores"] = cached_box(client_module.MedSAMClient(ray_url), shifted, labels,
                                                                direction, boxes)
    print(f"one reader, {boxes} corrected boxes on a cached slice of CTChest4 (128x128), LiteMedSAM on {cores} "
          "CPU cores; round trips in ms, p50 / p95")
    print(f"{'configuration':<28} {'box while embedding':>20} {'box, embedding done':>20} {'/health':>14}")
    for name, times in results.items():
        cells = [f"{p(times[part], 50):.0f} / {p(times[part], 95):.0f}" for part in ("embedding", "idle", "health")]
        print(f"{name:<28} {cells[0]:>20} {cells[1]:>20} {cells[2]:>14}")


@contextmanager
def one_process(port: int):
    command = [sys.executable, "-m", "medsam_server.cli", "serve", "--port", str(port), "--device", "cpu",
               "--log-level", "warning"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def ray_replicas(replicas: int, cpus_each: float, port: int):
    from ray import serve

    from medsam_server.app import Settings
    from medsam_server.ray_serve import APP_NAME, ScaleOut, application

    settings = Settings(device="cpu", port=port)  # no token (loopback): /info shows every replica's cache
    serve.run(application(settings, ScaleOut(replicas=replicas, num_cpus=cpus_each)), name=APP_NAME,
              route_prefix="/")
    try:
        yield
    finally:
        serve.delete(APP_NAME)


def wait_ready(client_module, url: str) -> None:
    client = client_module.MedSAMClient(url, retries=0)
    deadline = time.monotonic() + 180
    while True:
        try:
            client.info()
            return
        except client_module.MedSAMClientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


# ---------------------------------------------------------------------- the scale on paper

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
    parser.add_argument("--slices", type=int, default=6, help="slices per reader (default 6)")
    parser.add_argument("--readers", type=int, default=4, help="readers at once (default 4)")
    parser.add_argument("--whole-ct", action="store_true",
                        help="each reader annotates the whole CT (keyframes every 5 slices): ~10-15 min on 2 cores")
    parser.add_argument("--cached-box", action="store_true",
                        help="only a cached-slice box's latency, one process vs Ray side by side (~3 min)")
    parser.add_argument("--boxes", type=int, default=20, help="boxes per figure of --cached-box (default 20)")
    parser.add_argument("--paper", action="store_true",
                        help="only the simulated scale: readers per replica from per-slice costs (no Ray)")
    parser.add_argument("--encoder-ms", type=float, default=15.0, help="for --paper (default: an H100's 15)")
    parser.add_argument("--decoder-ms", type=float, default=2.0, help="for --paper (default: an H100's 2)")
    args = parser.parse_args()
    if args.paper:
        paper(args.encoder_ms, args.decoder_ms, [1, 10, 20, 30, 40, 45, 50, 60])
        return 0
    if not (args.whole_ct or args.cached_box) and FIRST_SLICE + args.readers * args.slices > 34:
        parser.error("CTChest4 has 27 slices with both lungs (7..33): readers x slices must be at most 27")

    import ray
    from ray import serve

    from medsam_server.ray_serve import init_local

    client_module = load_client()
    scan = ct_chest()
    cores = os.cpu_count() or 1
    init_local(cores, object_store_memory=200 * 2**20, log_to_driver=False, configure_logging=False)  # as serve's
    ray_port = 18000 + os.getpid() % 1000
    serve.start(http_options={"host": "127.0.0.1", "port": ray_port})
    ray_url = f"http://127.0.0.1:{ray_port}"
    if args.cached_box:
        cached_box_run(client_module, scan, args.boxes, ray_url, ray_port, cores)
        serve.shutdown()
        ray.shutdown()
        return 0
    results: dict[str, tuple[float, list[float]]] = {}
    with one_process(ray_port + 1) as url:
        wait_ready(client_module, url)
        results["1 process, 1 reader"] = readers(client_module, url, 1, args.slices, scan, args.whole_ct)
        results[f"1 process, {args.readers} readers"] = readers(client_module, url, args.readers, args.slices, scan,
                                                               args.whole_ct)
        alone = client_module.MedSAMClient(url).info()  # after both runs, as the replicas' after theirs
    with ray_replicas(1, cores, ray_port):
        wait_ready(client_module, ray_url)
        results[f"Ray, 1 replica x {cores} cores, 1 reader"] = readers(client_module, ray_url, 1, args.slices, scan,
                                                                       args.whole_ct)
    with ray_replicas(2, cores / 2, ray_port):
        wait_ready(client_module, ray_url)
        key = f"Ray, 2 replicas x {cores / 2:g} core, {args.readers} readers"
        results[key] = readers(client_module, ray_url, args.readers, args.slices, scan, args.whole_ct)
        replicas = client_module.MedSAMClient(ray_url).info()["replicas"]

    work = "the whole CT (34 slices, keyframes every 5)" if args.whole_ct else f"{args.slices} slices"
    print(f"{args.readers} readers x {work} of CTChest4 (128x128), LiteMedSAM on {cores} CPU cores")
    print(f"{'configuration':<42} {'wall s':>8} {'cached box p50 ms':>18} {'p95 ms':>8}")
    for name, (wall, cached) in results.items():
        print(f"{name:<42} {wall:8.1f} {p(cached, 50):18.1f} {p(cached, 95):8.1f}")
    walls = [wall for wall, _ in results.values()]
    print(f"Ray path overhead, one reader (same compute): {walls[2] / walls[0]:.3f}x the one process's wall time")
    print(f"{args.readers} readers: 2 replicas take {walls[3] / walls[1]:.3f}x the one process's wall time")
    cache, worker = alone["cache"], alone["worker"]
    print(f"1 process (1 + {args.readers} readers): cache hits {cache['hits']}, misses {cache['misses']}, "
          f"slices encoded {worker['encoded_slices']}")
    for replica in replicas:  # the aggregate figures every caller may see, with or without tokens
        load = replica["load"]
        print(f"replica {replica['replica']} ({load['threads']} threads): cache hits {load['cache_hits']}, "
              f"misses {load['cache_misses']}, slices encoded {load['encoded_slices']}")
    serve.shutdown()
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
