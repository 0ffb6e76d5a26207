"""Engine benchmark: encoder, decoder and cache-hit cost per model and backend, measured side by side.

Inputs are real: axial slices of slicerio's CTChest4 (128x128, lung window,
the engine's canonical view) and the expert's lung bounding boxes as prompts. MedSAM ViT-B
runs on a randomly initialised checkpoint written to a temporary folder (the
official weights cannot be downloaded here; weights do not change the speed).
ONNX graphs are exported into a temporary cache folder, so the first-use export
time is measured too and the user's cache is left alone.

    python bench/engine.py [--quick] [--device cpu|cuda|auto] [--models litemedsam medsam-vit-b] [--bf16]

Times are medians of repeated calls after one warm-up call, through the public
``PromptableModel`` API (so they include each model's pre- and post-processing).
The backends of a model take turns call by call, so a busy machine slows them alike
and the ratios stay comparable; the header reports the load average.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from medsam_server.embeddings import EmbeddingCache, SliceKey, embed
from medsam_server.geometry import canonical_view
from medsam_server.intensity import to_uint8
from medsam_server.models import load_model, resolve_device

RIGHT_LUNG, LEFT_LUNG = 5, 6
SLICES = (8, 11, 14, 17, 20, 23, 26, 29)  # eight axial slices with both lungs: 16 boxes
ENCODER_BATCH = {"litemedsam": 8, "medsam-vit-b": 2}


def ct_inputs() -> tuple[list[np.ndarray], np.ndarray]:
    """Eight uint8 view slices (128, 128) and their 16 lung boxes (slice index, [x0, y0, x1, y1])."""
    import SimpleITK as sitk
    import slicerio

    folder = os.path.join(os.path.dirname(slicerio.__file__), "data")
    image = sitk.ReadImage(os.path.join(folder, "CTChest4.nrrd"))
    volume = sitk.GetArrayFromImage(image)
    labels = slicerio.read_segmentation(os.path.join(folder, "Segmentation.seg.nrrd"))["voxels"].transpose(2, 1, 0)
    view = canonical_view(np.array(image.GetDirection()).reshape(3, 3), axis=2)
    volume_u8, _ = to_uint8(volume, "ct-lung")
    slices, boxes = [], []
    for n, k in enumerate(SLICES):
        slices.append(np.ascontiguousarray(view.to_view(volume_u8[k])))
        for label in (RIGHT_LUNG, LEFT_LUNG):
            rows, cols = np.nonzero(view.to_view(labels[k] == label))
            boxes.append((n, [cols.min(), rows.min(), cols.max(), rows.max()]))
    return slices, boxes


def interleaved_medians(calls: dict, repeats: int) -> dict:
    """Median seconds of each call, alternating between them so that they share the machine's load."""
    times = {key: [] for key in calls}
    for _ in range(repeats):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(values) for key, values in times.items()}


def bench_model(name: str, backends: list, checkpoint, device: str, bf16: bool, slices, boxes, repeats: int) -> list:
    """One row per backend; every measurement alternates between the backends call by call."""
    models, load_s = {}, {}
    for backend in backends:
        print(f"# loading {name} / {backend} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            models[backend] = load_model(name, checkpoint=checkpoint, device=device, backend=backend,
                                         autocast_bf16=bf16)
        load_s[backend] = time.perf_counter() - start
    batch = ENCODER_BATCH[name]
    heavy = name == "medsam-vit-b"  # ~20-40 s a slice on a small CPU: fewer encoder repeats
    enc_repeats = max(1, repeats // 3) if heavy else repeats
    shape = slices[0].shape
    index = np.array([n for n, _ in boxes])
    box = np.array([b for _, b in boxes], dtype=np.float64)

    print(f"# encoder {name} ...", file=sys.stderr, flush=True)
    for model in models.values():
        model.encoder_batch = batch
        model.embed(slices[:1])  # warm-up: first-call allocations, ONNX Runtime's graph setup
    enc1 = interleaved_medians({b: (lambda m=m: m.embed(slices[:1])) for b, m in models.items()}, enc_repeats)
    encb = interleaved_medians({b: (lambda m=m: m.embed(slices[:batch])) for b, m in models.items()}, enc_repeats)

    print(f"# decoder {name} ...", file=sys.stderr, flush=True)
    first = next(iter(models.values()))
    embeddings = first.embed(slices) if not heavy else np.repeat(first.embed(slices[:1]), len(slices), axis=0)
    for model in models.values():
        model.decode(embeddings[index[:1]], box[:1], shape)

    def one_by_one(model):
        for i in range(len(box)):
            model.decode(embeddings[index[i:i + 1]], box[i:i + 1], shape)

    dec1 = interleaved_medians({b: (lambda m=m: one_by_one(m)) for b, m in models.items()}, repeats)
    decb = interleaved_medians({b: (lambda m=m: m.decode(embeddings[index], box, shape)) for b, m in models.items()},
                               repeats * 2)

    cache = EmbeddingCache(fp16=True)
    keys = [SliceKey("ctchest4", 2, k, name, "ct-lung") for k in SLICES]
    for key, embedding in zip(keys, embeddings, strict=True):
        cache.put(key, embedding)
    hit = interleaved_medians(
        {b: (lambda m=m: embed(m, cache, keys[:1], lambda i: slices[i])) for b, m in models.items()},
        repeats * 20)
    return [{"model": name, "backend": b, "device": m.device, "load_s": load_s[b], "batch": batch,
             "enc1": enc1[b], "encb": encb[b] / batch, "dec1": dec1[b] / len(box), "decb": decb[b] / len(box),
             "hit": hit[b]} for b, m in models.items()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (timings are noisier)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    parser.add_argument("--models", nargs="+", default=["litemedsam", "medsam-vit-b"])
    parser.add_argument("--backends", nargs="+", default=["torch", "onnx"])
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for the torch backend (CUDA only)")
    args = parser.parse_args()
    repeats = 2 if args.quick else 5
    device = resolve_device(args.device)

    import onnxruntime
    import torch

    print(f"# engine benchmark: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), onnxruntime {onnxruntime.__version__}, "
          f"device {device}{', bf16 autocast' if args.bf16 else ''}, {'quick' if args.quick else 'full'} run, "
          f"load average {os.getloadavg()[0]:.1f}")
    slices, boxes = ct_inputs()
    print(f"# inputs: {len(slices)} CTChest4 axial slices {slices[0].shape} (lung window), {len(boxes)} lung boxes")

    rows = []
    with tempfile.TemporaryDirectory(prefix="medsam-bench-") as tmp:
        os.environ["MEDSAM_CACHE_DIR"] = str(Path(tmp) / "cache")  # ONNX exports go here, not the user cache
        for name in args.models:
            checkpoint = None
            if name == "medsam-vit-b":
                from segment_anything import sam_model_registry

                checkpoint = Path(tmp) / "random_vit_b.pth"
                torch.manual_seed(0)
                torch.save(sam_model_registry["vit_b"](checkpoint=None).state_dict(), checkpoint)
            rows += bench_model(name, args.backends, checkpoint, device, args.bf16, slices, boxes, repeats)

    print()
    print("| model | backend | device | load s (ONNX: + export) | encoder ms/slice, batch 1 | encoder ms/slice, "
          "batched (B) | batched speed-up | decoder ms/box, one per call | decoder ms/box, 16 per call | "
          "decoder speed-up | cache hit ms/slice | encoder / cache hit |")
    print("|" + "---|" * 12)
    for r in rows:
        label = r["model"] + (" (random weights)" if r["model"] == "medsam-vit-b" else "")
        print(f"| {label} | {r['backend']} | {r['device']} | {r['load_s']:.1f} | {r['enc1'] * 1e3:.0f} | "
              f"{r['encb'] * 1e3:.0f} (B={r['batch']}) | {r['enc1'] / r['encb']:.2f}x | {r['dec1'] * 1e3:.1f} | "
              f"{r['decb'] * 1e3:.1f} | {r['dec1'] / r['decb']:.2f}x | {r['hit'] * 1e3:.2f} | "
              f"{min(r['enc1'], r['encb']) / r['hit']:.0f}x |")
    print()
    by_key = {(r["model"], r["backend"]): r for r in rows}
    for name in args.models:
        t, o = by_key.get((name, "torch")), by_key.get((name, "onnx"))
        if t and o:
            print(f"{name}: ONNX vs torch speed-up — encoder batch 1 {t['enc1'] / o['enc1']:.2f}x, "
                  f"batched {t['encb'] / o['encb']:.2f}x; decoder one per call {t['dec1'] / o['dec1']:.2f}x, "
                  f"16 per call {t['decb'] / o['decb']:.2f}x")
    print(f"# load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
