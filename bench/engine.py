"""Engine benchmark: encoder, decoder and cache-hit cost per model and backend, measured side by side.

Inputs are real: axial slices of slicerio's CTChest4 (128x128, lung window,
radiological view) and the expert's lung bounding boxes as prompts. MedSAM ViT-B
runs on a randomly initialised checkpoint written to a temporary folder (the
official weights cannot be downloaded here; weights do not change the speed).
ONNX graphs are exported into a temporary cache folder, so the first-use export
time is measured too and the user's cache is left alone.

    python bench/engine.py [--quick] [--device cpu|cuda|auto] [--models litemedsam medsam-vit-b] [--bf16]

Times are medians of repeated calls after one warm-up call, through the public
``PromptableModel`` API (so they include each model's pre- and post-processing).
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
from medsam_server.embeddings import EmbeddingCache, SliceKey, embed_slices
from medsam_server.models import load_model, resolve_device
from medsam_server.preprocess import radiological_view, to_uint8

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
    view = radiological_view(np.array(image.GetDirection()).reshape(3, 3), axis=2)
    volume_u8, _ = to_uint8(volume, "ct-lung")
    slices, boxes = [], []
    for n, k in enumerate(SLICES):
        slices.append(np.ascontiguousarray(view.to_view(volume_u8[k])))
        for label in (RIGHT_LUNG, LEFT_LUNG):
            rows, cols = np.nonzero(view.to_view(labels[k] == label))
            boxes.append((n, [cols.min(), rows.min(), cols.max(), rows.max()]))
    return slices, boxes


def median_seconds(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_one(name: str, backend: str, checkpoint, device: str, bf16: bool, slices, boxes, repeats: int) -> dict:
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(name, checkpoint=checkpoint, device=device, backend=backend, autocast_bf16=bf16)
    load_s = time.perf_counter() - start
    batch = ENCODER_BATCH[name]
    heavy = name == "medsam-vit-b"
    enc_repeats = max(1, repeats // 3) if heavy else repeats

    model.encoder_batch = batch
    model.embed(slices[:1])  # warm-up: first-call allocations, ONNX Runtime's graph setup
    enc1 = median_seconds(lambda: model.embed(slices[:1]), enc_repeats)
    encb = median_seconds(lambda: model.embed(slices[:batch]), enc_repeats) / batch

    embeddings = model.embed(slices) if not heavy else np.repeat(model.embed(slices[:1]), len(slices), axis=0)
    index = np.array([n for n, _ in boxes])
    box = np.array([b for _, b in boxes], dtype=np.float64)
    shape = slices[0].shape
    model.decode(embeddings[index[:1]], box[:1], shape)

    def one_by_one():
        for i in range(len(box)):
            model.decode(embeddings[index[i:i + 1]], box[i:i + 1], shape)

    dec1 = median_seconds(one_by_one, repeats) / len(box)
    decb = median_seconds(lambda: model.decode(embeddings[index], box, shape), repeats * 2) / len(box)

    cache = EmbeddingCache(fp16=True)
    keys = [SliceKey("ctchest4", 2, k, name, "ct-lung") for k in SLICES]
    for key, embedding in zip(keys, embeddings, strict=True):
        cache.put(key, embedding)
    hit = median_seconds(lambda: embed_slices(model, cache, keys[:1], lambda i: slices[i]), repeats * 20)
    return {"model": name, "backend": backend, "device": model.device, "load_s": load_s, "batch": batch,
            "enc1": enc1, "encb": encb, "dec1": dec1, "decb": decb, "hit": hit, "boxes": len(box)}


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
          f"device {device}{', bf16 autocast' if args.bf16 else ''}, {'quick' if args.quick else 'full'} run")
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
            for backend in args.backends:
                print(f"# running {name} / {backend} ...", file=sys.stderr, flush=True)
                rows.append(bench_one(name, backend, checkpoint, device, args.bf16, slices, boxes, repeats))

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
    return 0


if __name__ == "__main__":
    sys.exit(main())
