"""``medsam evaluate``'s engine: prediction files or folders against references, per case and label.

Label files (NIfTI, NRRD, MHA, or a Slicer ``.seg.nrrd``) are read by ``io.labels.read_label_file``;
labels are integers: a labelmap's voxel values, or a Slicer segment's ``labelValue``. A ``.seg.nrrd``
prediction that Slicer cropped to its segments is placed on its reference's grid. Folders are paired
by case name (file name without its extension).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np

from .errors import InputError
from .io.labels import LabelFile, read_label_file
from .metrics import DEFAULT_TOLERANCE_MM, case_scores, median_iqr, wilcoxon_test

LABEL_FILE_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

Warn = Callable[[str], None]


def case_name(path: str) -> str:
    """A file's case name: its base name without a known label-file extension (``ct01.seg.nrrd`` -> ``ct01``)."""
    base = os.path.basename(path.rstrip(os.sep))
    lower = base.lower()
    for ext in LABEL_FILE_EXTENSIONS:
        if lower.endswith(ext):
            return base[: -len(ext)]
    return base



def check_same_geometry(pred: LabelFile, ref: LabelFile) -> None:
    """Raise InputError naming the first of size, spacing, origin, direction that differs."""
    n = ref.dimension  # a 2D file is compared on its two axes, as it reports them
    checks = (
        ("size", pred.size[:n], ref.size[:n], 0.0, ""),
        ("spacing", pred.spacing[:n], ref.spacing[:n], 1e-3, " mm"),
        ("origin", pred.origin[:n], ref.origin[:n], 1e-3, " mm"),
        ("direction", np.ravel(pred.direction), np.ravel(ref.direction), 1e-4, ""),
    )
    for what, a, b, tolerance, unit in checks:
        if pred.dimension != ref.dimension or not np.allclose(a, b, rtol=1e-5, atol=tolerance):
            raise InputError(
                f"{what} differs between prediction {pred.path} and reference {ref.path}: "
                f"{_fmt(a)}{unit} vs {_fmt(b)}{unit}; resample the prediction onto the reference grid first")


def _on_reference_grid(pred: LabelFile, ref: LabelFile) -> LabelFile:
    """A cropped ``.seg.nrrd`` prediction padded onto the reference's grid (others unchanged)."""
    if not pred.cropped or pred.size == ref.size:
        return pred
    from .io.images import Volume

    grid = Volume(np.zeros(ref.layers.shape[1:], dtype=np.uint8), ref.spacing, ref.origin, ref.direction)
    return pred.placed_on(grid)


def _scored_masks(labels: LabelFile, label: int) -> np.ndarray:
    mask = labels.mask(label)
    return mask[0] if labels.dimension == 2 else mask


def _fmt(values: Sequence[float]) -> str:
    return "(" + ", ".join(f"{v:g}" for v in values) + ")"


def _label_files(folder: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and name.lower().endswith(LABEL_FILE_EXTENSIONS) and not name.startswith("."):
            found.setdefault(case_name(name), path)
    return found


def match_cases(pred: str, ref: str, warn: Warn) -> list[tuple[str, str, str]]:
    """Pair predictions with references: ``[(case, pred_file, ref_file)]``.

    Two files are one case (named after the reference); two folders are paired by case name,
    and files present on one side only are reported through ``warn`` and left out.
    """
    for what, path in (("prediction", pred), ("reference", ref)):
        if not os.path.exists(path):
            raise InputError(f"{what} {path} does not exist")
    if os.path.isfile(pred) and os.path.isfile(ref):
        return [(case_name(ref), pred, ref)]
    if not (os.path.isdir(pred) and os.path.isdir(ref)):
        raise InputError(f"give two files or two folders: prediction {pred} and reference {ref} are one of each")
    preds, refs = _label_files(pred), _label_files(ref)
    if not refs:
        raise InputError(f"reference folder {ref} holds no label files ({', '.join(LABEL_FILE_EXTENSIONS)})")
    only_ref = sorted(set(refs) - set(preds))
    only_pred = sorted(set(preds) - set(refs))
    if only_ref:
        warn(f"no prediction in {pred} for case(s) {', '.join(only_ref)}; left out")
    if only_pred:
        warn(f"no reference in {ref} for prediction(s) {', '.join(only_pred)}; left out")
    common = sorted(set(preds) & set(refs))
    if not common:
        raise InputError(f"no file names match between prediction folder {pred} and reference folder {ref}")
    return [(case, preds[case], refs[case]) for case in common]


def evaluate_files(pred: str, ref: str, labels: Optional[Sequence[int]] = None,
                   tolerance_mm: float = DEFAULT_TOLERANCE_MM, method: str = "pred",
                   warn: Optional[Warn] = None) -> list[dict]:
    """DSC and NSD per case and label for a prediction file/folder against a reference file/folder.

    ``labels``: the labels to score; by default each reference's own labels. A requested label that
    no file holds raises InputError; one absent from some files is scored as an empty mask there.
    Returns rows ``{"method", "case", "label", "target", "dsc", "nsd"}``.
    """
    warn = warn or (lambda message: warnings.warn(message, stacklevel=2))
    pairs = match_cases(pred, ref, warn)
    rows: list[dict] = []
    notes: list[str] = []  # held back until we know the requested labels exist somewhere
    seen: set[int] = set()
    names: dict[int, str] = {}
    for case, pred_file, ref_file in pairs:  # one case in memory at a time
        ref_labels = read_label_file(ref_file)
        pred_labels = _on_reference_grid(read_label_file(pred_file), ref_labels)
        check_same_geometry(pred_labels, ref_labels)
        seen |= pred_labels.defined | ref_labels.defined
        names.update({**pred_labels.names, **ref_labels.names})
        wanted = list(labels) if labels else sorted(ref_labels.defined)
        if not wanted:
            notes.append(f"reference {ref_file} holds no labels; case {case} left out (use --labels to score it)")
            continue
        extra = sorted(pred_labels.defined - set(wanted))
        if extra and not labels:
            notes.append(f"prediction {pred_file} has label(s) the reference lacks: "
                         f"{', '.join(pred_labels.describe(v) for v in extra)}; not scored")
        for label in wanted:
            for side, labelled in (("reference", ref_labels), ("prediction", pred_labels)):
                if label not in labelled.defined:
                    notes.append(f"{side} {labelled.path} has no label {label}; scored as an empty mask")
            scores = case_scores(_scored_masks(ref_labels, label), _scored_masks(pred_labels, label),
                                 ref_labels.spacing[:ref_labels.dimension], tolerance_mm)
            target = ref_labels.names.get(label) or pred_labels.names.get(label) or f"label {label}"
            rows.append({"method": method, "case": case, "label": int(label), "target": target, **scores})
    missing = [label for label in (labels or []) if label not in seen]
    if missing:
        listing = ", ".join(f"{v} ({names[v]})" if v in names else str(v) for v in sorted(seen)) or "none"
        raise InputError(f"label(s) {', '.join(map(str, missing))} not found in any prediction or reference; "
                         f"labels present: {listing}")
    for note in notes:
        warn(note)
    if not rows:
        raise InputError("nothing to score: no case had a label to evaluate")
    return rows


def summarize_targets(rows: list[dict]) -> list[dict]:
    """Per method and label: DSC and NSD as median (Q1, Q3) over cases."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["label"]), []).append(row)
    summary = []
    for (method, label), group in groups.items():
        summary.append({"method": method, "label": label, "target": group[0]["target"], "n": len(group),
                        "dsc": median_iqr([r["dsc"] for r in group]), "nsd": median_iqr([r["nsd"] for r in group])})
    return summary


def compare_methods(rows_a: list[dict], rows_b: list[dict]) -> list[dict]:
    """Wilcoxon signed-rank test per label and metric, pairing the two methods' scores by case."""
    by_key_b = {(r["case"], r["label"]): r for r in rows_b}
    tests = []
    for label in dict.fromkeys(r["label"] for r in rows_a):
        pairs = [(r, by_key_b[(r["case"], label)]) for r in rows_a
                 if r["label"] == label and (r["case"], label) in by_key_b]
        target = next(r["target"] for r in rows_a if r["label"] == label)
        for metric in ("dsc", "nsd"):
            result = wilcoxon_test([a[metric] for a, _ in pairs], [b[metric] for _, b in pairs])
            tests.append({"label": label, "target": target, "metric": metric, **result})
    return tests
