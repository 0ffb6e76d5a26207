"""Segmentation accuracy as in the MedSAM paper: DSC and NSD per case and target, and their summaries.

- DSC: volumetric Dice, ``2|A and B| / (|A| + |B|)``.
- NSD: normalized surface Dice at a tolerance tau (2 mm by default, as in MedSAM's
  evaluation): the fraction of both surfaces lying within tau of the other surface,
  computed with DeepMind's ``surface-distance`` package on the voxel grid's real spacing.
- Empty masks: both empty -> DSC 1 and NSD 1 (nothing to find, nothing found);
  exactly one empty -> DSC 0 and NSD 0. ``surface-distance`` itself is never called
  with an empty mask (its empty-mask branch also fails on NumPy 2).

Arrays are numpy ``(k, j, i)`` as SimpleITK's ``GetArrayFromImage`` returns them;
spacings are given in SimpleITK's ``(i, j, k)`` order and reversed here, once.

Label files (NIfTI, NRRD, MHA, or a Slicer ``.seg.nrrd``) are read into
:class:`LabelFile`; labels are integers: a labelmap's voxel values, or a Slicer
segment's ``labelValue``. Folders of files are paired by case name (file name
without its extension).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import InputError

DEFAULT_TOLERANCE_MM = 2.0
LABEL_FILE_EXTENSIONS = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")

Warn = Callable[[str], None]


# -- metrics on arrays ---------------------------------------------------------------------------------------------


def dice(ref: np.ndarray, pred: np.ndarray) -> float:
    """Volumetric Dice of two boolean masks of one shape; both empty -> 1.0."""
    ref, pred = _as_masks(ref, pred)
    total = int(ref.sum()) + int(pred.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(ref, pred).sum()) / total


def surface_dice(ref: np.ndarray, pred: np.ndarray, spacing_ijk: Sequence[float],
                 tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> float:
    """Normalized surface Dice (NSD) at ``tolerance_mm``.

    ``ref`` and ``pred`` are boolean masks in numpy order (k, j, i) (or (j, i) for 2D);
    ``spacing_ijk`` is the voxel spacing in mm in SimpleITK's order (i, j, k).
    Both empty -> 1.0; one empty -> 0.0.
    """
    import surface_distance  # deferred: it imports scipy.ndimage, which only NSD needs

    ref, pred = _as_masks(ref, pred)
    if len(spacing_ijk) != ref.ndim:
        raise InputError(f"spacing {tuple(spacing_ijk)} has {len(spacing_ijk)} values for a {ref.ndim}D mask")
    if tolerance_mm < 0:
        raise InputError(f"the NSD tolerance must be >= 0 mm, not {tolerance_mm}")
    ref_any, pred_any = bool(ref.any()), bool(pred.any())
    if not ref_any and not pred_any:
        return 1.0
    if not ref_any or not pred_any:
        return 0.0
    spacing_array_order = tuple(float(s) for s in reversed(tuple(spacing_ijk)))
    with warnings.catch_warnings():
        # surface-distance 0.1 imports from scipy.ndimage's deprecated sub-modules; not ours to fix.
        warnings.simplefilter("ignore", DeprecationWarning)
        distances = surface_distance.compute_surface_distances(ref, pred, spacing_array_order)
    return float(surface_distance.compute_surface_dice_at_tolerance(distances, tolerance_mm))


def case_scores(ref: np.ndarray, pred: np.ndarray, spacing_ijk: Sequence[float],
                tolerance_mm: float = DEFAULT_TOLERANCE_MM) -> dict:
    """``{"dsc": float, "nsd": float}`` for one target of one case (arrays (k, j, i), spacing (i, j, k) mm)."""
    return {"dsc": dice(ref, pred), "nsd": surface_dice(ref, pred, spacing_ijk, tolerance_mm)}


def _as_masks(ref: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ref, pred = np.asarray(ref).astype(bool, copy=False), np.asarray(pred).astype(bool, copy=False)
    if ref.shape != pred.shape:
        raise InputError(f"masks differ in shape: reference {ref.shape}, prediction {pred.shape}")
    return ref, pred


# -- summaries -----------------------------------------------------------------------------------------------------


def median_iqr(values: Sequence[float]) -> dict:
    """``{"median", "q1", "q3", "n"}`` of ``values`` (linear-interpolated quartiles); None entries when empty."""
    data = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if data.size == 0:
        return {"median": None, "q1": None, "q3": None, "n": 0}
    q1, median, q3 = np.percentile(data, [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3), "n": int(data.size)}


def wilcoxon_test(a: Sequence[float], b: Sequence[float]) -> dict:
    """Wilcoxon signed-rank test between paired scores of two methods (two-sided).

    Returns ``{"n", "statistic", "p_value", "note"}``; identical pairs give p = 1 without calling scipy,
    and no pairs give None values with a note.
    """
    from scipy.stats import wilcoxon

    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise InputError(f"the two methods have {x.size} and {y.size} scores; the test needs pairs")
    n = int(x.size)
    if n == 0:
        return {"n": 0, "statistic": None, "p_value": None, "note": "no paired scores"}
    if np.all(x == y):
        return {"n": n, "statistic": 0.0, "p_value": 1.0, "note": "all pairs equal"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy warns on tiny samples; the note says so
        result = wilcoxon(x, y)
    p_value = float(result.pvalue)
    note = "fewer than 6 pairs: p cannot fall below 0.05" if n < 6 else ""
    return {"n": n, "statistic": float(result.statistic), "p_value": None if math.isnan(p_value) else p_value,
            "note": note}


def box_plot(path: str, results: list[dict], methods: Sequence[str], title: str = "") -> None:
    """Box plots of DSC and NSD per target (x) and method (box colour), as a PNG at ``path``.

    ``results`` are the per-case rows of :func:`evaluate_files` (keys method, target, dsc, nsd).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = list(dict.fromkeys(row["target"] for row in results))
    colours = ["#4C72B0", "#DD8452", "#55A868", "#C44E52"]
    width = 0.8 / max(1, len(methods))
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.6 * len(targets) * len(methods) + 2.5), 4.2), squeeze=False)
    for ax, metric, label in zip(axes[0], ("dsc", "nsd"), ("DSC", "NSD"), strict=True):
        for m, method in enumerate(methods):
            data = [[row[metric] for row in results if row["target"] == t and row["method"] == method]
                    for t in targets]
            positions = [t + (m - (len(methods) - 1) / 2) * width for t in range(len(targets))]
            boxes = ax.boxplot(data, positions=positions, widths=width * 0.85, patch_artist=True, showfliers=False)
            for patch in boxes["boxes"]:
                patch.set_facecolor(colours[m % len(colours)])
                patch.set_alpha(0.75)
            for median in boxes["medians"]:
                median.set_color("black")
            for position, values in zip(positions, data, strict=True):
                # every case as a dot too: with few cases a box says little, and a zero-height box is invisible
                spread = np.linspace(-0.2, 0.2, len(values)) * width if len(values) > 1 else [0.0]
                ax.scatter(np.asarray(spread) + position, values, s=12, color=colours[m % len(colours)],
                           edgecolors="black", linewidths=0.4, zorder=3)
            ax.plot([], [], "s", color=colours[m % len(colours)], label=method)  # legend handle
        ax.set_xticks(range(len(targets)))
        crowded = len(targets) > 3
        ax.set_xticklabels(targets, rotation=20 if crowded else 0, ha="right" if crowded else "center")
        ax.set_xlim(-0.6, len(targets) - 0.4)
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel(label)
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
        if len(methods) > 1:
            ax.legend(loc="best", fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- label files ---------------------------------------------------------------------------------------------------


@dataclass
class LabelFile:
    """A segmentation read from disk.

    ``layers`` is (L, k, j, i) integer voxels (L = 1 for a labelmap; a ``.seg.nrrd`` may hold
    overlapping segments in several layers); ``labels`` maps each label to its (layer, value).
    Geometry is SimpleITK's: ``size``, ``spacing`` and ``origin`` in (i, j, k) order, LPS mm;
    ``direction`` row-major.
    """

    path: str
    layers: np.ndarray
    labels: dict[int, tuple[int, int]]
    names: dict[int, str]
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    defined: set[int] = field(default_factory=set)

    def mask(self, label: int) -> np.ndarray:
        """Boolean mask (k, j, i) of ``label``; all False when the file has no such label."""
        if label not in self.labels:
            return np.zeros(self.layers.shape[1:], dtype=bool)
        layer, value = self.labels[label]
        return self.layers[layer] == value

    def describe(self, label: int) -> str:
        name = self.names.get(label)
        return f"{label} ({name})" if name else str(label)


def case_name(path: str) -> str:
    """A file's case name: its base name without a known label-file extension (``ct01.seg.nrrd`` -> ``ct01``)."""
    base = os.path.basename(path.rstrip(os.sep))
    lower = base.lower()
    for ext in LABEL_FILE_EXTENSIONS:
        if lower.endswith(ext):
            return base[: -len(ext)]
    return base


def read_label_file(path: str) -> LabelFile:
    """Read a labelmap (anything SimpleITK reads) or a Slicer ``.seg.nrrd`` (by its segments' label values)."""
    if not os.path.isfile(path):
        raise InputError(f"no such file: {path}")
    if path.lower().endswith(".seg.nrrd"):
        return _read_slicer_segmentation(path)
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(path)
    except RuntimeError as err:
        raise InputError(f"cannot read {path} as an image: {str(err).strip().splitlines()[-1]}") from err
    if image.GetDimension() not in (2, 3):
        raise InputError(f"{path} is {image.GetDimension()}D; evaluation takes 2D or 3D labelmaps")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{path} has {image.GetNumberOfComponentsPerPixel()} values per voxel; a labelmap has one")
    voxels = sitk.GetArrayFromImage(image)  # (k, j, i)
    if not np.issubdtype(voxels.dtype, np.integer):
        if not np.all(np.isfinite(voxels)) or not np.all(voxels == np.round(voxels)):
            raise InputError(f"{path} holds non-integer values; a labelmap holds integer labels "
                             "(is it an image or a probability map?)")
        voxels = voxels.astype(np.int32)
    present = [int(v) for v in np.unique(voxels) if v != 0]
    return LabelFile(path=path, layers=voxels[np.newaxis], labels={v: (0, v) for v in present}, names={},
                     size=tuple(image.GetSize()), spacing=tuple(image.GetSpacing()), origin=tuple(image.GetOrigin()),
                     direction=tuple(image.GetDirection()), defined=set(present))


def _read_slicer_segmentation(path: str) -> LabelFile:
    import slicerio

    try:
        segmentation = slicerio.read_segmentation(path)
    except Exception as err:  # slicerio raises plain exceptions for malformed headers
        raise InputError(f"cannot read {path} as a Slicer segmentation: {err}") from err
    voxels = np.asarray(segmentation["voxels"])  # (i, j, k) or (layers, i, j, k)
    if voxels.ndim == 3:
        voxels = voxels[np.newaxis]
    layers = np.ascontiguousarray(voxels.transpose(0, 3, 2, 1))  # -> (layers, k, j, i)
    labels: dict[int, tuple[int, int]] = {}
    names: dict[int, str] = {}
    for segment in segmentation["segments"]:
        value, layer, name = int(segment["labelValue"]), int(segment.get("layer", 0)), segment.get("name", "")
        if value <= 0:
            raise InputError(f"{path}: segment {name!r} has label value {value}; label values start at 1")
        if value in labels:
            raise InputError(f"{path}: segments {names[value]!r} and {name!r} share label value {value} "
                             "(overlapping segments in different layers); give each segment its own label value")
        labels[value] = (layer, value)
        names[value] = name
    ijk_to_lps = np.asarray(segmentation["ijkToLPS"], dtype=float)
    axes = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    direction = axes / spacing  # column c: the direction of voxel axis c, as SimpleITK stores it
    return LabelFile(path=path, layers=layers, labels=labels, names=names, size=tuple(int(n) for n in voxels.shape[1:]),
                     spacing=tuple(float(s) for s in spacing), origin=tuple(float(o) for o in ijk_to_lps[:3, 3]),
                     direction=tuple(float(d) for d in direction.ravel()), defined=set(labels))


def check_same_geometry(pred: LabelFile, ref: LabelFile) -> None:
    """Raise InputError naming the first of size, spacing, origin, direction that differs."""
    checks = (
        ("size", pred.size, ref.size, 0.0, ""),
        ("spacing", pred.spacing, ref.spacing, 1e-3, " mm"),
        ("origin", pred.origin, ref.origin, 1e-3, " mm"),
        ("direction", pred.direction, ref.direction, 1e-4, ""),
    )
    for what, a, b, tolerance, unit in checks:
        if len(a) != len(b) or not np.allclose(a, b, rtol=1e-5, atol=tolerance):
            raise InputError(
                f"{what} differs between prediction {pred.path} and reference {ref.path}: "
                f"{_fmt(a)}{unit} vs {_fmt(b)}{unit}; resample the prediction onto the reference grid first")


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
        pred_labels, ref_labels = read_label_file(pred_file), read_label_file(ref_file)
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
            scores = case_scores(ref_labels.mask(label), pred_labels.mask(label), ref_labels.spacing, tolerance_mm)
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
