"""``medsam evaluate``: DSC and NSD of predictions against references, per case and target.

JSON on stdout (per-case scores, per-target median (Q1, Q3), the Wilcoxon test with ``--compare``);
with ``--out``, the same as CSV files plus box plots as PNG.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from ..metrics import DEFAULT_TOLERANCE_MM


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Score predictions against references: Dice (DSC) and normalized surface Dice (NSD) at a tolerance, per "
        "case and label, with per-target median (Q1, Q3). PRED and REF are two files or two folders (paired by "
        "file name) of NIfTI, NRRD, MHA or Slicer .seg.nrrd; labels are voxel values, or a .seg.nrrd segment's "
        "label value. Results as JSON on stdout.")
    parser.add_argument("--pred", required=True, metavar="P", help="prediction file or folder")
    parser.add_argument("--ref", required=True, metavar="R", help="reference file or folder")
    parser.add_argument("--tolerance-mm", type=float, default=DEFAULT_TOLERANCE_MM, metavar="MM",
                        help=f"NSD tolerance in mm (default {DEFAULT_TOLERANCE_MM:g}, as in MedSAM's evaluation)")
    parser.add_argument("--labels", type=int, nargs="+", metavar="L",
                        help="labels to score (default: those in each reference)")
    parser.add_argument("--compare", metavar="P2",
                        help="a second method's predictions: adds a Wilcoxon signed-rank test per target and metric")
    parser.add_argument("--out", metavar="DIR",
                        help="also write cases.csv, targets.csv (and wilcoxon.csv) and boxplots.png")
    parser.set_defaults(func=run)


def _method_names(pred: str, compare: str | None) -> list[str]:
    names = [os.path.basename(os.path.normpath(pred)) or "pred"]
    if compare:
        other = os.path.basename(os.path.normpath(compare)) or "compare"
        names.append(other if other != names[0] else f"{other} (compare)")
    return names


def run(args: argparse.Namespace) -> int:
    from ..evaluate import compare_methods, evaluate_files, summarize_targets

    collected: list[str] = []

    def warn(message: str) -> None:
        collected.append(message)
        print(f"medsam evaluate: warning: {message}", file=sys.stderr)

    methods = _method_names(args.pred, args.compare)
    rows = evaluate_files(args.pred, args.ref, args.labels, args.tolerance_mm, method=methods[0], warn=warn)
    result: dict = {"tolerance_mm": args.tolerance_mm, "methods": {methods[0]: args.pred}, "reference": args.ref}
    all_rows = list(rows)
    tests: list[dict] = []
    if args.compare:
        rows_b = evaluate_files(args.compare, args.ref, args.labels, args.tolerance_mm, method=methods[1], warn=warn)
        result["methods"][methods[1]] = args.compare
        all_rows += rows_b
        tests = compare_methods(rows, rows_b)
    targets = summarize_targets(all_rows)
    result.update({"cases": all_rows, "targets": targets, "warnings": collected})
    if args.compare:
        result["wilcoxon"] = tests
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        result["files"] = _write_outputs(args.out, all_rows, targets, tests, methods, args.tolerance_mm)
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


def _write_outputs(out: str, rows: list[dict], targets: list[dict], tests: list[dict], methods: list[str],
                   tolerance_mm: float) -> list[str]:
    from ..plots import box_plot

    paths = [os.path.join(out, "cases.csv"), os.path.join(out, "targets.csv")]
    _write_csv(paths[0], ["method", "case", "label", "target", "dsc", "nsd"], rows)
    flat = [{"method": t["method"], "label": t["label"], "target": t["target"], "n": t["n"],
             **{f"{m}_{q}": t[m][q] for m in ("dsc", "nsd") for q in ("median", "q1", "q3")}} for t in targets]
    _write_csv(paths[1], list(flat[0]), flat)
    if tests:
        paths.append(os.path.join(out, "wilcoxon.csv"))
        _write_csv(paths[-1], ["label", "target", "metric", "n", "statistic", "p_value", "note"], tests)
    paths.append(os.path.join(out, "boxplots.png"))
    box_plot(paths[-1], rows, methods, title=f"DSC and NSD (tolerance {tolerance_mm:g} mm) per target")
    return paths


def _write_csv(path: str, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
