"""A run driven the way the Slicer panel drives it, against the same run from a plain script (the CLI client).

Inside Slicer, Python threads run only while the main thread gives up the GIL. The panel runs a Segment in
a daemon worker thread (``run.in_background``) and a QTimer on the main thread polls it every 100 ms; between
polls the main thread runs Python of its own (the panel, observers, other modules). Here that main thread
is a loop that, every ``POLL_MS``, polls the run and its progress as ``_poll`` does and then runs
``--main-python-ms`` of pure Python (holding the GIL), and idles the rest of the tick (Qt's event loop).
Idle comes in two kinds: the event loop releases the GIL (``time.sleep``), or -- the worst case, a
main thread that keeps the GIL outside Python -- it holds it (a libc ``usleep`` called through
``ctypes.PyDLL``, which does not release the GIL), so the worker runs only while the main thread runs Python.

- script: ``run.execute_run`` (upload + annotate) on the main thread, nothing else running;
- script + other work: the same, while another *process* runs the main thread's Python duty cycle (the
  same milliseconds per tick). The server shares this machine's cores, so the panel's own Python slows
  it whatever the threads do; this is the yardstick for the panel rows, so that their ratio shows what
  the GIL and the polling cost, not what the other work costs the CPU;
- panel: the same call, with the widget's progress callback and cancel flag (which makes the upload go
  block by block through Python), in the worker while the main thread loops as above; the run ends when
  the loop sees it done (what the user sees).

Both talk to one real ``medsam serve`` (LiteMedSAM, CPU) on 127.0.0.1, started as the module starts it
(``LocalServer``). Each run uploads CTChest4 as a new session and annotates the right lung from boxes on
four keyframe slices; the server's embedding cache is warmed first, so every run does the same work.
Runs are interleaved and the medians compared. Run:
``.venv/bin/python bench/slicer_panel.py [--repeats 5] [--main-python-ms 20 60]``.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "MedSAMSlicer"))

from MedSAMSlicerLib import client as medsam_client  # noqa: E402
from MedSAMSlicerLib import geometry, keyframes, local_server, run  # noqa: E402

POLL_MS = 100  # MedSAMSlicer.POLL_MS
BAR = 1.2  # issue 11, point 5: a panel run may take at most 1.2 times the script's run
KEYFRAMES = (12, 19, 26, 31)


def data(name: str) -> str:
    import slicerio

    return os.path.join(os.path.dirname(slicerio.__file__), "data", name)


def request() -> run.RunRequest:
    """CTChest4 as the panel hands it over (voxels, IJK->RAS) and a prompt document from boxes on keyframes."""
    import SimpleITK as sitk
    import slicerio

    image = sitk.ReadImage(data("CTChest4.nrrd"))
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.array(image.GetDirection()).reshape(3, 3) \
        * np.array(image.GetSpacing())
    ijk_to_ras[:3, 3] = np.array(image.GetOrigin()) * np.array([-1.0, -1.0, 1.0])
    volume = geometry.VolumeArray(array=sitk.GetArrayFromImage(image), ijk_to_world=ijk_to_ras)
    segmentation = slicerio.read_segmentation(data("Segmentation.seg.nrrd"))
    labels = np.transpose(segmentation["voxels"], (2, 1, 0))
    value = next(int(s["labelValue"]) for s in segmentation["segments"] if s["name"] == "right lung")
    boxes = []
    for k in KEYFRAMES:
        rows, cols = np.nonzero(labels[k] == value)
        boxes.append(keyframes.BoxKeyframe(k, (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max()))))
    document = keyframes.prompt_document(2, boxes, segment_name="right lung", window="ct-lung")
    return run.RunRequest(volume=volume, document=document, axis=2, segment_id="right lung", locked_slices=[],
                          existing=None, keyframe_count=len(boxes), keyframe_spacing=None)


def script_run(client, job: run.RunRequest, other_python_ms: float = 0.0) -> float:
    """The run alone, or (``other_python_ms``) beside another process with the panel's main-thread duty cycle."""
    stop = multiprocessing.Event()
    other = multiprocessing.Process(target=_duty_cycle, args=(other_python_ms, stop), daemon=True)
    if other_python_ms:
        other.start()
    try:
        start = time.perf_counter()
        run.execute_run(client, job)
        return time.perf_counter() - start
    finally:
        stop.set()
        if other_python_ms:
            other.join(timeout=10)


def _duty_cycle(python_ms: float, stop) -> None:
    while not stop.is_set():
        tick = time.perf_counter()
        _python_for(python_ms)
        time.sleep(max(0.0, POLL_MS / 1000.0 - (time.perf_counter() - tick)))


def _python_for(milliseconds: float) -> int:
    """Pure Python that holds the GIL for about ``milliseconds`` (what the main thread does between polls)."""
    end, count = time.perf_counter() + milliseconds / 1000.0, 0
    while time.perf_counter() < end:
        count += sum(range(200))
    return count


def _idle_holding_the_gil(seconds: float) -> None:
    ctypes.PyDLL(None).usleep(int(seconds * 1e6))


def panel_run(client, job: run.RunRequest, main_python_ms: float, hold_gil: bool) -> float:
    idle = _idle_holding_the_gil if hold_gil else time.sleep
    progress = []
    start = time.perf_counter()
    cancel = threading.Event()  # as the widget passes it: the upload is then read block by block (cancellable)
    future = run.in_background(lambda: run.execute_run(client, job, progress=lambda d, t: progress.append(d),
                                                       cancel=cancel))
    while True:  # the QTimer: poll, then the main thread's own Python, then idle until the next tick
        tick = time.perf_counter()
        _ = progress[-1:] if progress else None
        if future.done():
            future.result()
            return time.perf_counter() - start
        _python_for(main_python_ms)
        idle(max(0.0, POLL_MS / 1000.0 - (time.perf_counter() - tick)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--main-python-ms", type=float, nargs="+", default=[20.0, 60.0],
                        help="Python the main thread runs in each 100 ms tick (default 20 and 60)")
    args = parser.parse_args()
    job = request()
    server = local_server.LocalServer(python=sys.executable, extra_args=["--model", "litemedsam", "--device", "cpu"])
    url, token = server.start()
    try:
        client = medsam_client.MedSAMClient(url, token=token)
        server.wait_ready(client.info, timeout=300)
        script_run(client, job)  # warm the server's embedding cache: every measured run does the same work
        modes = [(ms, hold) for hold in (False, True) for ms in args.main_python_ms]
        name = "panel: {:.0f} ms Python per {} ms tick, idle {}".format
        times: dict[str, list[float]] = {"script": []}
        for ms in args.main_python_ms:
            times[other_name(ms)] = []
            times.update({name(ms, POLL_MS, "holds GIL" if hold else "frees GIL"): [] for hold in (False, True)})
        for _ in range(args.repeats):  # interleaved, so that a shared machine's load hits all alike
            times["script"].append(script_run(client, job))
            for ms in args.main_python_ms:
                times[other_name(ms)].append(script_run(client, job, ms))
            for ms, hold in modes:
                times[name(ms, POLL_MS, "holds GIL" if hold else "frees GIL")].append(panel_run(client, job, ms, hold))
    finally:
        server.stop()
    report(times, job, args.repeats)


def other_name(python_ms: float) -> str:
    return f"script + {python_ms:.0f} ms per tick in another process"


def verdict(ratio: float) -> str:
    return f"at or below the bar of {BAR}" if ratio <= BAR else f"ABOVE the bar of {BAR}"


def report(times: dict[str, list[float]], job: run.RunRequest, repeats: int) -> None:
    """Each panel row against the script run beside the same other work (its yardstick); the plain script too."""
    medians = {label: statistics.median(values) for label, values in times.items()}
    print(f"run: upload CTChest4 {job.volume.array.shape} + annotate {len(KEYFRAMES)} keyframes, warm cache, "
          f"{repeats} runs each, medians; the bar (issue 11): panel / script <= {BAR}")
    ratios, base = {}, medians["script"]
    for label, median in medians.items():
        if label.startswith("panel"):
            ms = float(label.split(":")[1].split("ms")[0])
            yardstick = other_name(ms)
            ratios[label] = median / medians[yardstick]
            print(f"  {label:52s} {median:6.2f} s   ratio to '{yardstick}' {ratios[label]:5.2f}  "
                  f"{verdict(ratios[label])}   (to the plain script {median / base:5.2f})")
        else:
            print(f"  {label:52s} {median:6.2f} s   ratio to the plain script {median / base:5.2f}")
    worst = max(ratios, key=ratios.get)
    print(f"worst panel ratio: {ratios[worst]:.2f} ({worst}): {verdict(ratios[worst])}")


if __name__ == "__main__":
    main()
