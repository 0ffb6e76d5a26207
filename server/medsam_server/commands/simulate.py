"""``medsam simulate``: the headless twin of a timing study -- keyframes from a reference, annotate, score."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from pathlib import Path

from ..errors import InputError
from ..intensity import WINDOW_NAMES, window_from_text
from ..models import add_model_arguments
from ..requests import add_option_arguments, options_from_arguments
from .annotate import progress_bar


def register(p: argparse.ArgumentParser) -> None:
    p.description = ("Mark every K-th slice of each reference target (first and last included) with its bounding "
                     "box (or RECIST lines), run the annotate workflow, and score it against the reference.")
    p.add_argument("--image", type=Path, required=True)
    p.add_argument("--ref", type=Path, required=True, help="reference labelmap or .seg.nrrd on the image's grid")
    p.add_argument("--every", type=int, nargs="+", metavar="K", help="keyframe spacing(s) in slices")
    p.add_argument("--clicks", type=int, metavar="N",
                   help="instead of keyframes: a box on every slice of each target and N rounds of corrective clicks "
                        "(box + points; mean Dice per round)")
    p.add_argument("--labels", nargs="+", help="reference segment names or label values (default: all)")
    p.add_argument("--markers", choices=("boxes", "lines"), default="boxes")
    p.add_argument("--jitter-px", type=int, default=0, metavar="J", help="jitter each box side by up to J pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--axis", type=int, choices=(0, 1, 2), default=2)
    p.add_argument("--window", default="auto", help=f"{', '.join(WINDOW_NAMES)} or LOW,HIGH")
    add_option_arguments(p, ("propagate", "interpolation", "orientation", "threshold", "box_margin", "views",
                             "intensity_weight"))
    p.add_argument("--ablation", action="store_true",
                   help="run each of issue 15's stages in turn (the model alone, the default, + box margin, "
                        "+ three views) and report Dice, NSD and seconds of each")
    p.add_argument("--tolerance-mm", type=float, default=2.0, help="NSD tolerance (default 2 mm)")
    p.add_argument("--output", type=Path, help="write the segmentation of the (first) K here")
    p.add_argument("--out", type=Path, help="folder for simulate.json, simulate.csv and dice_vs_k.png")
    add_model_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..embeddings import EmbeddingCache
    from ..io.images import read_image
    from ..io.labels import read_labels, segment_colour, write_labels
    from ..metrics import case_scores
    from ..models import load_model
    from ..multiview import annotate_multiview
    from ..prompts import parse_prompts
    from ..review import review_scores
    from ..simulate import ABLATION, simulated_prompts, target_labels

    if (args.every is None) == (args.clicks is None):
        raise InputError("give --every K (keyframes) or --clicks N (corrective clicks), one of them")
    volume = read_image(args.image)
    reference, names = read_labels(args.ref, volume)
    targets = target_labels(names, args.labels)
    window = window_from_text(args.window)
    model = load_model(args.model, args.checkpoint, args.device, args.backend, precision=args.precision,
                       threads=args.threads)
    cache = EmbeddingCache()  # shared by every K: each slice is encoded once
    if args.clicks is not None:
        return _run_clicks(args, volume, reference, targets, window, model, cache)
    options = options_from_arguments(args)
    stages = [(name, dataclasses.replace(options, **changes)) for name, changes in ABLATION] if args.ablation \
        else [("", options)]
    rows = []
    for every in args.every:
        document = simulated_prompts(reference, targets, every, args.axis, window, args.jitter_px, args.markers,
                                     args.seed)
        prompts = parse_prompts(document, volume.size)
        for stage, stage_options in stages:
            with tqdm(total=1, desc=f"K={every} {stage}".strip(), unit="slice", file=sys.stderr) as bar:
                started = time.perf_counter()
                result = annotate_multiview(volume.array, volume.direction, volume.spacing, prompts, model, cache,
                                            stage_options, progress=progress_bar(bar))
                seconds = time.perf_counter() - started
            if args.output and every == args.every[0] and stage == stages[0][0]:
                write_labels(args.output, result.labels, volume,
                             [(s.name, s.label, segment_colour(n)) for n, s in enumerate(prompts.segments)])
            for segment, done, (name, ref_label) in zip(prompts.segments, result.segments, targets):
                scores = case_scores(reference == ref_label, result.labels == segment.label, volume.spacing,
                                     args.tolerance_mm)
                ranking = review_scores(done.review["slices"], reference == ref_label,
                                        result.labels == segment.label, prompts.axis)
                rows.append({"every": every, "target": name, "stage": stage, "keyframes": len(segment.keyframes),
                             "dsc": round(scores["dsc"], 4), "nsd": round(scores["nsd"], 4),
                             "seconds": round(seconds, 2), "cache_hits": result.cache_hits, "markers": args.markers,
                             **ranking})
    _print_table(rows)
    if args.out:
        _write_reports(args.out, rows)
    return 0


def _run_clicks(args: argparse.Namespace, volume, reference, targets, window, model, cache) -> int:
    """The corrective-click protocol (``simulate.click_rounds``) on every slice of each target."""
    from ..simulate import click_rounds
    from ..stack import SliceStack

    stack = SliceStack(volume.array, volume.direction, args.axis, window, model, cache, args.orientation)
    rows = []
    for name, label in targets:
        target = reference == label
        result = click_rounds(stack, target, range(stack.n_slices), args.clicks)
        rows.append({"target": name, "slices": len(result["slices"]), "clicks": args.clicks,
                     "dice": [round(v, 4) for v in result["dice"]], "worse": round(result["worse"], 4)})
    print("| target | slices | mean Dice per round (box, then each click) | clicks that lowered Dice |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['target']} | {r['slices']} | {' → '.join(f'{v:.3f}' for v in r['dice'])} | {r['worse']:.0%} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "clicks.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


def _print_table(rows: list[dict]) -> None:
    # Spearman: confidence against the true per-slice Dice; worst 20 %: the share of the per-slice error
    # (1 - Dice, summed) in the 20 % least confident slices (review.py).
    # seconds: the whole run (every target) of that K and stage.
    print("| K | target | stage | keyframes | DSC | NSD | Spearman | error in worst 20 % | seconds |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['every']} | {r['target']} | {r['stage'] or '-'} | {r['keyframes']} | {r['dsc']:.4f} | "
              f"{r['nsd']:.4f} | "
              f"{_maybe(r['spearman'], '+.2f')} | {_maybe(r['worst20_error_share'], '.0%')} | {r['seconds']} |")


def _maybe(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _write_reports(folder: Path, rows: list[dict]) -> None:
    from ..plots import dice_vs_spacing

    if not rows:
        raise InputError("nothing was scored")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "simulate.json").write_text(json.dumps(rows, indent=2) + "\n")
    with open(folder / "simulate.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    dice_vs_spacing(rows, str(folder / "dice_vs_k.png"))
