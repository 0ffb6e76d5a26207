"""CPU speed per backend and precision on the real chest CT, measured side by side in one run (issue 17).

The job: both lungs (lung window) and the thoracic spine (bone window) of slicerio's
CTChest4 with LiteMedSAM, as one prompt document with a window per segment; keyframe
boxes every 5 slices from the expert segmentation. Printed, all measured in this run:

1. per backend and precision (torch fp32, onnx fp32, onnx int8): warm seconds per encode
   and per decode (this process, the variants taking turns call by call); time to the
   first encode (a fresh process: interpreter, imports, model load, one slice); the
   `medsam annotate` job in a fresh process (start-up included), its peak memory (max
   RSS) and its minor page faults; Dice of each target against the expert;
2. the default `medsam annotate` (no --backend: auto) against the yardstick, one warm
   plain-torch encoder pass per slice the job needs (goal <= 0.5), and against
   upstream's ``CVPR24_LiteMedSAM_infer.py`` when ``--upstream DIR`` holds it with its
   ``tiny_vit_sam.py`` and ``segment_anything/`` (fetched outside the repo, never vendored;
   goal >= 6x). Upstream gets the same volume in the same windows and each target's 3D box;
   its workflow (a box on the middle slice, then the previous mask's box) is its own;
3. a box on a cached 512x512 slice over HTTP (p50/p95), with its breakdown, each part measured
   alone and taking turns with the requests: the decoder's two steps (ONNX Runtime: the slice-only
   step, run on a miss of the model's ``prepared`` cache, and the prompt step), post-processing
   (crop, bilinear, sigmoid, threshold), mask encode (the response envelope), and request +
   response (the rest: HTTP, JSON, thread hand-offs, the client's decoding); also a box whose
   slice-only step was dropped first (a miss) and the one-graph decoder that annotate runs.
   ``--http-only`` measures this part alone (about 20 s).

ONNX graphs go to a temporary cache folder (the one-time export and int8 quantization
are timed and reported); the user's cache is left alone.

    python bench/speed.py [--repeats 5] [--http-repeats 40] [--upstream DIR] [--skip-torch-job] [--http-only]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TARGETS = (("right lung", 5, "ct-lung"), ("left lung", 6, "ct-lung"), ("thoracic spine", 3, "ct-bone"))
EVERY = 5  # keyframe spacing, slices
VARIANTS = (("torch", "fp32"), ("onnx", "fp32"), ("onnx", "int8"))
HTTP_BOX = [190, 60, 330, 420]  # the cameraman on skimage's 512x512 camera()
#: Idle before each timed call of the HTTP breakdown: ONNX Runtime's intra-op threads spin after a run, and
#: the parts run different graphs (sessions), whose spinning would slow the next part on a 2-core CPU.
IDLE_S = 0.05


def ct_paths() -> tuple[str, str]:
    import slicerio

    folder = os.path.join(os.path.dirname(slicerio.__file__), "data")
    return os.path.join(folder, "CTChest4.nrrd"), os.path.join(folder, "Segmentation.seg.nrrd")


def reference_labels() -> np.ndarray:
    import slicerio

    return slicerio.read_segmentation(ct_paths()[1])["voxels"].transpose(2, 1, 0)  # (k, j, i)


def prompt_document(reference: np.ndarray) -> dict:
    """One document: each target with its own window, keyframe boxes every EVERY slices."""
    from medsam_server.simulate import simulated_prompts

    segments = []
    for name, label, window in TARGETS:
        segment = simulated_prompts(reference, [(name, label)], EVERY)["segments"][0]
        for entry in segment["boxes"]:  # a one-row extent is a box of zero area: give it a pixel
            box = entry["box"]
            box[2], box[3] = max(box[2], box[0] + 1), max(box[3], box[1] + 1)
        segments.append({**segment, "label": len(segments) + 1, "window": window})
    return {"axis": 2, "window": "ct-lung", "segments": segments}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def lung_slices() -> tuple[list[np.ndarray], np.ndarray]:
    """Four axial view slices (lung window) with both lungs, and the right lung's box on each."""
    import SimpleITK as sitk

    from medsam_server.geometry import canonical_view
    from medsam_server.intensity import to_uint8
    from medsam_server.simulate import bounding_box

    image = sitk.ReadImage(ct_paths()[0])
    view = canonical_view(np.array(image.GetDirection()).reshape(3, 3), axis=2)
    u8, _ = to_uint8(sitk.GetArrayFromImage(image), "ct-lung")
    reference = reference_labels()
    ks = (11, 17, 23, 29)
    slices = [np.ascontiguousarray(view.to_view(u8[k])) for k in ks]
    boxes = np.array([bounding_box(view.to_view(reference[k] == TARGETS[0][1])) for k in ks], dtype=np.float64)
    return slices, boxes


def run_child(command: list[str], env: dict, stdout_path: Path) -> dict:
    """Run a process to its end: wall seconds, max RSS (MiB), minor page faults, exit code."""
    with open(stdout_path, "w") as out, open(stdout_path.with_suffix(".err"), "w") as err:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{stdout_path.with_suffix('.err').read_text()[-3000:]}")
    return {"wall": wall, "rss_mib": usage.ru_maxrss / 1024, "minflt": usage.ru_minflt}


def annotate_job(variant: tuple[str, str] | None, document: Path, out: Path, env: dict) -> dict:
    """`medsam annotate` in a fresh process; None: the defaults (no --backend, no --precision)."""
    import SimpleITK as sitk

    command = [sys.executable, "-m", "medsam_server.cli", "annotate", ct_paths()[0], "--prompts", str(document),
               "--output", str(out), "--force"]
    if variant is not None:
        command += ["--backend", variant[0], "--precision", variant[1]]
    result = run_child(command, env, out.with_suffix(".json"))
    summary = json.loads(out.with_suffix(".json").read_text())
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    return {**result, "summary": summary, "labels": labels}


FIRST_ENCODE = """
import sys, warnings
warnings.simplefilter("ignore")
import numpy as np
from medsam_server.models import load_model
model = load_model("litemedsam", device="cpu", backend=sys.argv[1], precision=sys.argv[2])
model.embed([np.tile(np.arange(128, dtype=np.uint8), (128, 1))])
"""


def first_encode_seconds(variant: tuple[str, str], env: dict, scratch: Path) -> float:
    return run_child([sys.executable, "-c", FIRST_ENCODE, *variant], env, scratch / f"first-{'-'.join(variant)}.out")[
        "wall"]


def medians(calls: dict, repeats: int) -> dict:
    """Median seconds of each call; the calls take turns so that a busy machine slows them alike."""
    times: dict = {key: [] for key in calls}
    for call in calls.values():
        call()  # warm-up
    for _ in range(repeats):
        for key, call in calls.items():
            started = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - started)
    return {key: statistics.median(v) for key, v in times.items()}


def warm_costs(repeats: int) -> tuple[dict, float]:
    """Per variant: (s per encode, s per one-box decode); and the yardstick's plain-torch encoder pass."""
    import torch

    from medsam_server.models import load_model
    from medsam_server.models.litemedsam import build_torch_modules

    slices, boxes = lung_slices()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {v: load_model("litemedsam", device="cpu", backend=v[0], precision=v[1]) for v in VARIANTS}
    turn = {"n": 0}

    def next_slice():
        turn["n"] += 1
        return slices[turn["n"] % len(slices)]

    encode = medians({v: (lambda m=m: m.embed([next_slice()])) for v, m in models.items()}, repeats)
    embeddings = {v: m.embed(slices[:1]) for v, m in models.items()}
    decode = medians({v: (lambda v=v, m=m: m.decode(embeddings[v], boxes[:1], slices[0].shape))
                      for v, m in models.items()}, repeats * 4)

    # The yardstick: upstream's own encoder call, plain torch (no cache, no batching), warm.
    encoder, _ = build_torch_modules()
    image = torch.from_numpy(models[VARIANTS[0]].recipe.image_to_input(slices[0])[None])

    def plain_pass():
        with torch.no_grad():
            encoder(image)

    yardstick = medians({"pass": plain_pass}, repeats)["pass"]
    return {v: (encode[v], decode[v]) for v in VARIANTS}, yardstick


def upstream_job(folder: Path, scratch: Path, env: dict) -> dict:
    """Upstream's script on the same targets: one 3D npz per window, each target's 3D bounding box."""
    import SimpleITK as sitk

    from medsam_server.intensity import to_uint8
    from medsam_server.models.litemedsam import bundled_checkpoint

    volume = sitk.GetArrayFromImage(sitk.ReadImage(ct_paths()[0]))
    reference = reference_labels()
    inputs, outputs = scratch / "upstream-in", scratch / "upstream-out"
    inputs.mkdir()
    for window in ("ct-lung", "ct-bone"):
        boxes = []
        for _, label, target_window in TARGETS:
            if target_window == window:
                k, j, i = np.nonzero(reference == label)
                boxes.append([i.min(), j.min(), k.min(), i.max(), j.max(), k.max()])
        u8, _ = to_uint8(volume, window)
        np.savez_compressed(inputs / f"3D_{window}.npz", imgs=u8, boxes=np.array(boxes), spacing=np.ones(3))
    command = [sys.executable, str(folder / "CVPR24_LiteMedSAM_infer.py"), "-i", str(inputs), "-o", str(outputs),
               "-lite_medsam_checkpoint_path", str(bundled_checkpoint()[0]), "-device", "cpu",
               "-png_save_dir", str(scratch / "upstream-overlay")]
    up_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH", "")) if p)}
    result = run_child(command, up_env, scratch / "upstream.out")
    scores = {}
    for window in ("ct-lung", "ct-bone"):
        segs = np.load(outputs / f"3D_{window}.npz")["segs"]
        mine = [t for t in TARGETS if t[2] == window]
        for position, (name, label, _) in enumerate(mine, start=1):
            scores[name] = dice(segs == position, reference == label)
    return {**result, "dice": scores}


def http_latency(repeats: int) -> dict:
    """A box on a cached 512x512 slice over HTTP, and the parts of it measured alone (milliseconds)."""
    import socket
    import threading

    import uvicorn
    from skimage import data

    from medsam_server import wire
    from medsam_server.app import Settings, build_app
    from medsam_server.embeddings import EmbeddingCache
    from medsam_server.models import load_model
    from medsam_server.protocol import MASK_DTYPE, MASK_THRESHOLD
    from medsam_server.stack import SliceStack

    sys.path.insert(0, str(REPO / "MedSAMSlicer"))
    from MedSAMSlicerLib.client import MedSAMClient

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model("litemedsam", device="cpu", backend="auto")
    cache = EmbeddingCache()
    image = data.camera()[np.newaxis]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(build_app(Settings(), model=model, cache=cache), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        client = MedSAMClient(f"http://127.0.0.1:{sock.getsockname()[1]}")
        session = client.upload_volume(image)
        client.wait(session, client.prefetch(session))
        stack = SliceStack(image, np.eye(3), 2, "auto", model, cache)
        embedding, hits = stack.embeddings([0])
        assert hits == 1, "the server's prefetch should have cached the slice"
        box = np.array([HTTP_BOX], dtype=np.float64)
        mask = stack.masks(embedding, box)
        header = {"axis": 2, "slices": [0], "notes": []}
        view_boxes, view_shape, _ = stack.prompts_to_view(box)
        coords = model.recipe.coords_to_input(view_boxes.reshape(-1, 2, 2), view_shape).astype(np.float32)
        labels = np.array([[2, 3]], dtype=np.int64)  # SAM's box corner labels
        logits = model.runtime.decode(embedding, coords, labels)
        prepared = model.runtime.prepare(embedding)
        assert np.abs(model.runtime.decode_prepared(prepared, coords, labels) - logits).max() < 1e-4

        def post() -> np.ndarray:  # what the worker and the request do after the graph: logits -> masks
            return stack.from_view(model.recipe.logits_to_probabilities(logits, view_shape)) > MASK_THRESHOLD

        assert np.array_equal(post(), mask), "the parts should give the request's mask"
        def miss() -> None:
            model.prepared.clear()  # not timed: the request then runs both decoder steps
            started = time.perf_counter()
            client.segment(session, [{"slice": 0, "box": HTTP_BOX}])
            return (time.perf_counter() - started) * 1e3

        calls = {"http": lambda: client.segment(session, [{"slice": 0, "box": HTTP_BOX}]),
                 "http miss": miss,
                 "prepare": lambda: model.runtime.prepare(embedding),
                 "prompt step": lambda: model.runtime.decode_prepared(prepared, coords, labels),
                 "one graph": lambda: model.runtime.decode(embedding, coords, labels),
                 "post-processing": post,
                 "mask encode": lambda: wire.encode(header, mask.astype(MASK_DTYPE)),
                 "null request": client.health}
        times: dict = {key: [] for key in calls}
        for round_ in range(repeats + 3):
            for key, call in calls.items():
                time.sleep(IDLE_S)  # as a user's boxes come: the last call's spinning threads gone
                started = time.perf_counter()
                took = call()
                if round_ >= 3:
                    times[key].append(took if key == "http miss" else (time.perf_counter() - started) * 1e3)
        client.delete(session)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    out = {key: float(np.median(v)) for key, v in times.items()}
    out["http p95"] = float(np.percentile(times["http"], 95))
    out["http miss p95"] = float(np.percentile(times["http miss"], 95))
    out["backend"] = model.backend
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="warm encoder calls per variant (default 5)")
    parser.add_argument("--http-repeats", type=int, default=40)
    parser.add_argument("--upstream", type=Path, help="folder with upstream's CVPR24_LiteMedSAM_infer.py")
    parser.add_argument("--skip-torch-job", action="store_true", help="no torch `medsam annotate` job (saves ~1 min)")
    parser.add_argument("--http-only", action="store_true", help="only the cached-slice box over HTTP")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.http_only:
        print(f"# cached-slice box over HTTP: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
        print_http(http_latency(args.http_repeats))
        print(f"# load average at the end: {os.getloadavg()[0]:.2f}")
        return 0

    import onnxruntime
    import torch

    print(f"# speed: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"onnxruntime {onnxruntime.__version__}, load average {os.getloadavg()[0]:.1f}")
    reference = reference_labels()
    with tempfile.TemporaryDirectory(prefix="medsam-speed-") as tmp:
        scratch = Path(tmp)
        os.environ["MEDSAM_CACHE_DIR"] = str(scratch / "cache")  # ONNX graphs here, not in the user's cache
        env = dict(os.environ)
        document = scratch / "prompts.json"
        document.write_text(json.dumps(prompt_document(reference)))

        started = time.perf_counter()
        run_child([sys.executable, "-c", FIRST_ENCODE, "onnx", "fp32"], env, scratch / "export.out")
        export_s = time.perf_counter() - started
        started = time.perf_counter()
        run_child([sys.executable, "-c", FIRST_ENCODE, "onnx", "int8"], env, scratch / "quantize.out")
        quantize_s = time.perf_counter() - started
        print(f"# one-time: ONNX export + first run {export_s:.0f} s; int8 quantization + first run {quantize_s:.0f} s")

        first = {v: first_encode_seconds(v, env, scratch) for v in VARIANTS}
        default = annotate_job(None, document, scratch / "default.nrrd", env)
        jobs = {(default["summary"]["backend"], default["summary"]["precision"]): default}  # the default's own row
        for variant in VARIANTS:
            if variant not in jobs and not (variant[0] == "torch" and args.skip_torch_job):
                jobs[variant] = annotate_job(variant, document, scratch / f"{'-'.join(variant)}.nrrd", env)
        warm, yardstick = warm_costs(args.repeats)
        upstream = upstream_job(args.upstream, scratch, env) if args.upstream else None
        http = http_latency(args.http_repeats)

    report(reference, first, jobs, default, warm, yardstick, upstream, http)
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


def target_dice(labels: np.ndarray, reference: np.ndarray) -> list[float]:
    return [dice(labels == n, reference == label) for n, (_, label, _) in enumerate(TARGETS, start=1)]


def report(reference, first, jobs, default, warm, yardstick, upstream, http) -> None:
    names = " / ".join(name for name, _, _ in TARGETS)
    print("\n| backend | precision | s per encode (warm) | s per decode (1 box) | time to first encode s | "
          f"`medsam annotate` s (start-up included) | peak RSS MiB | minor faults | Dice {names} |")
    print("|" + "---|" * 9)
    for variant in VARIANTS:
        enc, dec = warm[variant]
        job = jobs.get(variant)
        wall = f"{job['wall']:.1f}" if job else "-"
        rss = f"{job['rss_mib']:.0f}" if job else "-"
        faults = f"{job['minflt'] / 1e6:.2f} M" if job else "-"
        scores = " / ".join(f"{d:.4f}" for d in target_dice(job["labels"], reference)) if job else "-"
        print(f"| {variant[0]} | {variant[1]} | {enc:.3f} | {dec:.3f} | {first[variant]:.1f} | {wall} | {rss} | "
              f"{faults} | {scores} |")
    summary = default["summary"]
    needed = summary["cache"]["misses"]
    print(f"\ndefault `medsam annotate` (backend {summary['backend']}, precision {summary['precision']}): "
          f"{default['wall']:.1f} s for {needed} encoded slices; Dice "
          + " / ".join(f"{d:.4f}" for d in target_dice(default["labels"], reference)))
    print(f"yardstick: {needed} x one warm plain-torch encoder pass ({yardstick:.3f} s) = {needed * yardstick:.1f} s; "
          f"default / yardstick = {default['wall'] / (needed * yardstick):.2f} (goal <= 0.5)")
    if ("onnx", "fp32") in jobs and ("onnx", "int8") in jobs:
        base = target_dice(jobs[("onnx", "fp32")]["labels"], reference)
        eight = target_dice(jobs[("onnx", "int8")]["labels"], reference)
        worst = max(abs(a - b) for a, b in zip(base, eight, strict=True))
        print(f"int8 vs fp32: largest Dice change {worst:.4f} over the targets (default only if <= 0.005 and faster)")
    if upstream:
        print(f"upstream CVPR24_LiteMedSAM_infer.py: {upstream['wall']:.1f} s, Dice "
              + " / ".join(f"{upstream['dice'][name]:.4f}" for name, _, _ in TARGETS)
              + f"; default is {upstream['wall'] / default['wall']:.1f}x faster (goal >= 6x)")
    print_http(http)


def print_http(http: dict) -> None:
    rest = http["http"] - http["prompt step"] - http["post-processing"] - http["mask encode"]
    print(f"\ncached 512x512 slice over HTTP ({http['backend']}): p50 {http['http']:.1f} ms, "
          f"p95 {http['http p95']:.1f} ms (goal p50 <= 50 ms); breakdown at the medians: decoder prompt step "
          f"{http['prompt step']:.1f} ms, post-processing {http['post-processing']:.1f} ms, mask encode "
          f"{http['mask encode']:.2f} ms, request + response {rest:.1f} ms (a null request alone "
          f"{http['null request']:.1f} ms)")
    print(f"the slice's decoder step dropped first (a miss): p50 {http['http miss']:.1f} ms, p95 "
          f"{http['http miss p95']:.1f} ms, with the slice-only step {http['prepare']:.1f} ms; the one-graph "
          f"decoder (annotate's) {http['one graph']:.1f} ms")


if __name__ == "__main__":
    sys.exit(main())
