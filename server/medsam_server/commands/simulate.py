"""``medsam simulate``: the headless twin of a timing study -- keyframes from a reference, annotate, score."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

from ..annotate import AnnotateOptions, annotate
from ..embeddings import EmbeddingCache
from ..errors import InputError
from ..metrics import case_scores
from ..models import load_model
from ..preprocess import DEFAULT_ORIENTATION, ORIENTATIONS, WINDOW_NAMES
from ..prompts import parse_prompts
from ..simulate import simulated_prompts, target_labels
from ..volumes import read_image, read_labels, segment_colour, write_labels
from .annotate import add_model_arguments, parse_window_argument


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "simulate", help="a simulated annotator: keyframes every K slices from a reference, then DSC/NSD",
        description="Mark every K-th slice of each reference target (first and last included) with its bounding box "
                    "(or RECIST lines), run the annotate workflow, and score it against the reference.",
    )
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--ref", type=Path, required=True, help="reference labelmap or .seg.nrrd on the image's grid")
    p.add_argument("--every", type=int, nargs="+", required=True, metavar="K", help="keyframe spacing(s) in slices")
    p.add_argument("--labels", nargs="+", help="reference segment names or label values (default: all)")
    p.add_argument("--markers", choices=("boxes", "lines"), default="boxes")
    p.add_argument("--jitter-px", type=int, default=0, metavar="J", help="jitter each box side by up to J pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=2)
    p.add_argument("--window", default="auto", help=f"{', '.join(WINDOW_NAMES)} or LOW,HIGH")
    p.add_argument("--propagate", type=int, default=0, metavar="N")
    p.add_argument("--interpolation", choices=("pchip", "linear"), default="pchip")
    p.add_argument("--orientation", choices=ORIENTATIONS, default=DEFAULT_ORIENTATION)
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance (default 2 mm)")
    p.add_argument("--output", type=Path, help="write the segmentation of the (first) K here")
    p.add_argument("--out", type=Path, help="folder for simulate.json, simulate.csv and dice_vs_k.png")
    add_model_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    volume = read_image(args.image)
    reference, names = read_labels(args.ref, volume)
    targets = target_labels(names, args.labels)
    window = parse_window_argument(args.window)
    model = load_model(args.model, args.checkpoint, args.device, args.backend)
    cache = EmbeddingCache()  # shared by every K: each slice is encoded once
    options = AnnotateOptions(propagate=args.propagate, interpolation=args.interpolation, orientation=args.orientation)
    rows = []
    for every in args.every:
        document = simulated_prompts(reference, targets, every, args.axis, window, args.jitter_px, args.markers,
                                     args.seed)
        prompts = parse_prompts(document, volume.size)
        with tqdm(total=1, desc=f"K={every}", unit="slice", file=sys.stderr) as bar:
            def progress(phase: str, done: int, total: int) -> None:
                bar.total, bar.n = total, done
                bar.refresh()

            started = time.perf_counter()
            result = annotate(volume.array, volume.direction, prompts, model, cache, options, progress=progress)
            seconds = time.perf_counter() - started
        if args.output and every == args.every[0]:
            write_labels(args.output, result.labels, volume,
                         [(s.name, s.label, segment_colour(n)) for n, s in enumerate(prompts.segments)])
        for segment, (name, ref_label) in zip(prompts.segments, targets):
            scores = case_scores(reference == ref_label, result.labels == segment.label, volume.spacing,
                                 args.tolerance_mm)
            rows.append({"every": every, "target": name, "keyframes": len(segment.keyframes),
                         "dsc": round(scores["dsc"], 4), "nsd": round(scores["nsd"], 4), "seconds": round(seconds, 2),
                         "cache_hits": result.cache_hits, "markers": args.markers})
    _print_table(rows)
    if args.out:
        _write_reports(args.out, rows)
    return 0


def _print_table(rows: list[dict]) -> None:
    print("| K | target | keyframes | DSC | NSD | seconds |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['every']} | {r['target']} | {r['keyframes']} | {r['dsc']:.4f} | {r['nsd']:.4f} | {r['seconds']} |")


def _write_reports(folder: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "simulate.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(folder / "simulate.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for target in dict.fromkeys(r["target"] for r in rows):
        mine = [r for r in rows if r["target"] == target]
        ax.plot([r["every"] for r in mine], [r["dsc"] for r in mine], marker="o", label=target)
    ax.set_xlabel("keyframe every K slices")
    ax.set_ylabel("3D Dice")
    ax.set_title("Simulated annotator: Dice vs keyframe spacing")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "dice_vs_k.png")
    plt.close(fig)
    if not rows:
        raise InputError("nothing was scored")
