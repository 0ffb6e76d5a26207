"""Many readers at once: ``medsam serve --replicas 2`` (Ray Serve) against one ``medsam serve`` process.

Each reader is the Slicer module's client in a thread of this process. By default each annotates its own
slab of slicerio's CTChest4 (``--slices`` axial slices each, different slabs: different patients, whose
embeddings no session can share): upload, prefetch in the background, a box on each lung of each
slice, a corrected box on each (cached) slice, a propagated annotation from the first and last slice's
boxes, delete. ``--whole-ct``: each reader annotates the whole CT instead, as the demo does (its own copy,
shifted by a few HU so that no two readers share an embedding; both lungs, keyframe boxes every 5 slices,
a corrected box on each keyframe, the annotation interpolated over all 27 lung slices). That is 34
encoded slices a reader: about 12 minutes on the quiet 2-core machine with three one-reader rounds, against
a few for the slab run (the default). The README's overhead figures come from ``--whole-ct``.

Measured side by side in one run on the same CPU; the one process runs with no Ray cluster up (Ray's own
processes would take the machine's CPU from it too), the Ray path on a local cluster started as ``medsam serve
--replicas`` starts it:

- one reader: one process (``medsam serve``, ONNX Runtime on all cores) vs the Ray path with one replica
  that holds all cores (the same compute: the ratio is the cost of Ray's processes and of the proxy ->
  ingress -> replica hops), ``--rounds`` rounds interleaved, the ratio their median;
- four readers at once: one process vs two replicas of one core each (torch and ONNX Runtime threads
  limited to the replica's share);
- per replica: sessions held, cache hits and misses, slices encoded (affinity: a session's slices
  are encoded once, on its replica), from ``/info``'s aggregate ``load`` figures.

``--cached-box``: only the latency of a box on a cached slice, one reader, one process against the Ray path
(1 replica holding all cores) side by side: corrected boxes on one slice while the upload's background
embedding runs (as in ``--whole-ct``, where a reader corrects its keyframes before its CT is embedded),
the same once it is done, and ``/health`` round trips (the proxy -> ingress -> replica hops with no model
work). About 3 minutes on 2 cores.

Run: ``.venv/bin/python bench/ray_serve.py [--slices 6] [--readers 4] [--rounds 3] [--whole-ct | --cached-box]``
(a few minutes on 2 cores for the default). ``--idle SECONDS``: the CPU an idle local cluster with one replica
takes, by process, with Ray's defaults against ``medsam serve``'s (``ray_serve.QUIET_CLUSTER``). The readers a
GPU serves, simulated from per-slice costs: ``bench/readers_per_gpu.py``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

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
    with cluster(cores, ray_port), ray_replicas(1, cores, ray_port):
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


@contextmanager
def cluster(cores: int, port: int, env: Optional[dict] = None):
    """A local Ray cluster as ``medsam serve --replicas`` starts it (``env`` set first: it wins), Serve on ``port``."""
    import ray
    from ray import serve

    from medsam_server.ray_serve import init_local

    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    init_local(cores, object_store_memory=200 * 2**20, log_to_driver=False, configure_logging=False)  # as serve's
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()
        for name, value in saved.items():  # as it was: the next cluster starts from the same environment
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def cpu_seconds() -> dict[int, tuple[float, str]]:
    """Every process's CPU seconds so far (user + system) and its command line: pid -> (seconds, command)."""
    tick, seconds = os.sysconf("SC_CLK_TCK"), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat, open(f"/proc/{pid}/cmdline", "rb") as cmdline:
                fields, title = stat.read().rsplit(")", 1)[1].split(), cmdline.read().replace(b"\0", b" ").decode()
        except OSError:  # ended meanwhile
            continue
        seconds[int(pid)] = ((int(fields[11]) + int(fields[12])) / tick, title)
    return seconds


def ray_cpu(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two ``cpu_seconds`` by Ray's processes, by kind (the first kind a command
    line names: the raylet's names the dashboard agent's too)."""
    spent: dict[str, float] = {}
    for pid, (seconds, title) in after.items():
        kind = next((k for k in ("ServeController", "ProxyActor", "MedSAMIngress", "MedSAMReplica", "DashboardAgent",
                                 "gcs_server", "raylet", "log_monitor", "dashboard") if k in title), None)
        if kind is not None:
            spent[kind] = spent.get(kind, 0.0) + seconds - before.get(pid, (0.0, ""))[0]
    return spent


def idle_run(client_module, seconds: float, port: int, cores: int) -> None:
    """``--idle``: CPU an idle local cluster with one replica takes, with Ray's defaults and with ours."""
    from medsam_server.ray_serve import QUIET_CLUSTER

    rays_defaults = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.1", "RAY_enable_metrics_collection": "1",
                     "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "100"}
    spent = {}
    for name, env in (("Ray's defaults", rays_defaults), ("medsam serve's", QUIET_CLUSTER)):
        with cluster(cores, port, env), ray_replicas(1, cores, port):
            wait_ready(client_module, f"http://127.0.0.1:{port}")
            time.sleep(5)  # start-up settles
            before = cpu_seconds()
            time.sleep(seconds)
            spent[name] = ray_cpu(before, cpu_seconds())
    kinds = sorted({kind for figures in spent.values() for kind in figures},
                   key=lambda kind: -spent["Ray's defaults"].get(kind, 0.0))
    print(f"an idle local cluster with one replica: CPU seconds over {seconds:g} s, by process")
    print(f"{'process':<18}" + "".join(f"{name:>16}" for name in spent))
    for kind in kinds:
        print(f"{kind:<18}" + "".join(f"{figures.get(kind, 0.0):16.2f}" for figures in spent.values()))
    totals = [sum(figures.values()) for figures in spent.values()]
    print(f"{'all':<18}" + "".join(f"{total:16.2f}" for total in totals))
    print(f"share of {cores} cores: " + ", ".join(f"{name} {total / seconds / cores:.1%}" for name, total in
                                             zip(spent, totals)) + f"; ours {totals[1] / totals[0]:.2f}x Ray's")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=6, help="slices per reader (default 6)")
    parser.add_argument("--readers", type=int, default=4, help="readers at once (default 4)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="one-reader rounds, one process and Ray interleaved; the ratio is their median (3)")
    parser.add_argument("--whole-ct", action="store_true",
                        help="each reader annotates the whole CT (keyframes every 5 slices): ~10-15 min on 2 cores")
    parser.add_argument("--cached-box", action="store_true",
                        help="only a cached-slice box's latency, one process vs Ray side by side (~3 min)")
    parser.add_argument("--boxes", type=int, default=20, help="boxes per figure of --cached-box (default 20)")
    parser.add_argument("--idle", type=float, metavar="SECONDS",
                        help="only the CPU an idle cluster takes over SECONDS: Ray's defaults against ours")
    args = parser.parse_args()
    if not (args.whole_ct or args.cached_box) and FIRST_SLICE + args.readers * args.slices > 34:
        parser.error("CTChest4 has 27 slices with both lungs (7..33): readers x slices must be at most 27")

    client_module = load_client()
    cores = os.cpu_count() or 1
    ray_port = 18000 + os.getpid() % 1000
    ray_url = f"http://127.0.0.1:{ray_port}"
    if args.idle:
        idle_run(client_module, args.idle, ray_port, cores)
        return 0
    scan = ct_chest()
    if args.cached_box:
        cached_box_run(client_module, scan, args.boxes, ray_url, ray_port, cores)
        return 0

    def alone(count: int) -> tuple[tuple[float, list[float]], dict]:
        """``count`` readers on one process, no Ray cluster up (it would take the machine's CPU too)."""
        with one_process(ray_port + 1) as url:
            wait_ready(client_module, url)
            result = readers(client_module, url, count, args.slices, scan, args.whole_ct)
            return result, client_module.MedSAMClient(url).info()

    def over_ray(count: int, replicas: int) -> tuple[tuple[float, list[float]], list]:
        with cluster(cores, ray_port), ray_replicas(replicas, cores / replicas, ray_port):
            wait_ready(client_module, ray_url)
            result = readers(client_module, ray_url, count, args.slices, scan, args.whole_ct)
            return result, client_module.MedSAMClient(ray_url).info()["replicas"]

    one, ray_one = "1 process, 1 reader", f"Ray, 1 replica x {cores} cores, 1 reader"
    results: dict[str, list[tuple[float, list[float]]]] = {one: [], ray_one: []}
    for _ in range(args.rounds):  # interleaved: the machine's drift falls on both alike
        results[one].append(alone(1)[0])
        results[ray_one].append(over_ray(1, 1)[0])
    many, info = alone(args.readers)
    results[f"1 process, {args.readers} readers"] = [many]
    many, replicas = over_ray(args.readers, 2)
    results[f"Ray, 2 replicas x {cores / 2:g} core, {args.readers} readers"] = [many]

    work = "the whole CT (34 slices, keyframes every 5)" if args.whole_ct else f"{args.slices} slices"
    print(f"{args.readers} readers x {work} of CTChest4 (128x128), LiteMedSAM on {cores} CPU cores; "
          "one process runs with no Ray cluster up")
    print(f"{'configuration':<42} {'wall s':>20} {'cached box p50 ms':>18} {'p95 ms':>8}")
    for name, runs in results.items():
        cached = [ms for _, times in runs for ms in times]
        walls = " / ".join(f"{wall:.1f}" for wall, _ in runs)
        print(f"{name:<42} {walls:>20} {p(cached, 50):18.1f} {p(cached, 95):8.1f}")
    ratios = [ray[0] / alone_[0] for alone_, ray in zip(results[one], results[ray_one])]
    print(f"Ray path overhead, one reader (same compute): {float(np.median(ratios)):.3f}x the one process's wall "
          f"time (median of rounds: {', '.join(f'{r:.3f}' for r in ratios)})")
    walls = [runs[0][0] for runs in list(results.values())[2:]]
    print(f"{args.readers} readers: 2 replicas take {walls[1] / walls[0]:.3f}x the one process's wall time")
    cache, worker = info["cache"], info["worker"]
    print(f"1 process ({args.readers} readers): cache hits {cache['hits']}, misses {cache['misses']}, "
          f"slices encoded {worker['encoded_slices']}")
    for replica in replicas:  # the aggregate figures every caller may see, with or without tokens
        load = replica["load"]
        print(f"replica {replica['replica']} ({load['threads']} threads): cache hits {load['cache_hits']}, "
              f"misses {load['cache_misses']}, slices encoded {load['encoded_slices']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
