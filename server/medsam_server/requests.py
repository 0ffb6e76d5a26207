"""Request bodies, parsed and validated, shared by the server and the command line.

:class:`AnnotateOptions` is the one options type: its fields carry their command-line
flag and help (``add_option_arguments`` makes the argparse arguments, ``options_from_arguments``
reads them back) and ``parse_options`` checks the ``"options"`` object of an annotate request
against the same fields. Segment and prefetch bodies are checked here too; every error is an
InputError naming the entry and what is wrong.

Frames: boxes and points are (u, v) slice pixels as in the prompt document; slices are
indices along ``axis``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

from .errors import InputError, shown
from .geometry import DEFAULT_ORIENTATION, ORIENTATIONS, check_box, check_points, slice_shape
from .intensity import parse_window
from .intensity_fusion import INTENSITY_WEIGHT, MAX_INTENSITY_WEIGHT
from .prompts import PromptDocument, check_axis, check_int, check_orientation, no_unknown_keys, parse_prompts
from .protocol import ALTERNATIVE_COUNT, MASK_THRESHOLD, MAX_BATCH_SIZE, MAX_LABEL, Limits
from .refine import check_threshold

INTERPOLATIONS = ("pchip", "linear")
#: Points (clicks) with box-trained weights: measured on CTChest4 (README "Review and refine").
POINTS_EXPERIMENTAL = ("points are experimental: with box-trained weights (LiteMedSAM, MedSAM) a corrective click "
                       "lowered the slice's Dice on 59-78 % of clicks on the real CT; re-box the slice instead")


def _option(default: Any, kind: type, help: str, flag: str = "", **argparse_extra: Any) -> Any:
    """A field of :class:`AnnotateOptions` with what the command line and the request schema need."""
    return field(default=default, metadata={"kind": kind, "help": help, "flag": flag, "extra": argparse_extra})


@dataclass
class AnnotateOptions:
    """How the annotate workflow runs (``medsam annotate`` flags and an annotate request's ``"options"``)."""

    propagate: int = _option(0, int, "grow each segment up to N slices past its outermost keyframes (default 0)",
                             metavar="N")
    fill_holes: bool = _option(True, bool, "keep holes inside each slice's mask", flag="--no-fill-holes")
    largest_component: bool = _option(True, bool, "keep every 3D component, not only the largest",
                                      flag="--all-components")
    # may a later segment take voxels an earlier one (or --existing) holds?
    overwrite: bool = _option(False, bool, "let later segments take voxels of earlier ones")
    interpolation: str = _option("pchip", str, "box interpolation between keyframes (default %(default)s)",
                                 choices=INTERPOLATIONS)
    orientation: str = _option(DEFAULT_ORIENTATION, str,
                               "in-plane orientation in which slices reach the model (default %(default)s)",
                               choices=ORIENTATIONS)
    batch_size: Optional[int] = _option(None, int, "boxes per decoder call (default: the model's best batch)")
    threshold: float = _option(MASK_THRESHOLD, float, "probability above which a voxel is inside (default "
                               "%(default)s; lower grows the masks)", metavar="T")
    # Re-box one slice: a keyframe box on it (or its interpolated box) is decoded there alone.
    only_slice: Optional[int] = _option(None, int, "decode slice K alone and write only it (re-box one slice; "
                                        "with --existing the other slices are kept)", flag="--slice", metavar="K")
    # Issue 15's 3D stages (multiview.py): margin and views off (neither helped every measured target).
    box_margin: float = _option(0.0, float, "grow each keyframe box by this fraction of its side (default 0; "
                                "0.1 lifted the right lung and the spine of CTChest4)", metavar="F")
    views: bool = _option(False, bool, "refine in the two other views on square-pixel slices and fuse the three "
                          "(about twice the time; helps the spine, hurts the lungs of CTChest4)")
    # On by default: it lifted every measured target at every keyframe spacing (intensity_fusion.py).
    intensity_weight: float = _option(INTENSITY_WEIGHT, float, "weight of the target's own intensities against the "
                                      "model's logits at the border (default %(default)s; 0 = the model alone)",
                                      metavar="W")

    def __post_init__(self):
        if isinstance(self.box_margin, bool) or not isinstance(self.box_margin, (int, float)) or \
                not 0.0 <= self.box_margin <= 1.0:
            raise InputError(f"box_margin must be a fraction 0..1 of the box side, got {shown(self.box_margin)}")
        if isinstance(self.intensity_weight, bool) or not isinstance(self.intensity_weight, (int, float)) or \
                not 0.0 <= self.intensity_weight <= MAX_INTENSITY_WEIGHT:
            raise InputError(f"intensity_weight must be a number 0..{MAX_INTENSITY_WEIGHT:g}, "
                             f"got {shown(self.intensity_weight)}")
        if self.views and self.only_slice is not None:
            raise InputError("the orthogonal views refine a whole segment: --views and --slice do not go together")
        if self.interpolation not in INTERPOLATIONS:
            raise InputError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {self.interpolation!r}")
        if self.propagate < 0:
            raise InputError("propagate must be >= 0 slices")
        check_orientation(self.orientation)
        check_threshold(self.threshold)
        if self.only_slice is not None and self.propagate:
            raise InputError("one slice is decoded alone: --slice and --propagate do not go together")
        if self.batch_size is not None and not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise InputError(f"batch_size must be 1..{MAX_BATCH_SIZE}, got {self.batch_size}")


def _flag(option: dataclasses.Field) -> str:
    return option.metadata["flag"] or "--" + option.name.replace("_", "-")


def add_option_arguments(parser: argparse.ArgumentParser, names: Optional[Sequence[str]] = None) -> None:
    """Add the flags of :class:`AnnotateOptions` (all, or those in ``names``) to ``parser``."""
    for option in dataclasses.fields(AnnotateOptions):
        if names is not None and option.name not in names:
            continue
        meta = option.metadata
        if meta["kind"] is bool:  # a flag that flips the default
            parser.add_argument(_flag(option), dest=option.name, action="store_const", const=not option.default,
                                default=option.default, help=meta["help"])
        else:
            parser.add_argument(_flag(option), dest=option.name, type=meta["kind"], default=option.default,
                                help=meta["help"], **meta["extra"])


def options_from_arguments(args: argparse.Namespace) -> AnnotateOptions:
    """The :class:`AnnotateOptions` that ``add_option_arguments`` flags set (others keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(AnnotateOptions) if hasattr(args, f.name)}
    return AnnotateOptions(**given)


def parse_options(raw: Any, n_slices: int) -> AnnotateOptions:
    """An annotate request's ``"options"`` object -> AnnotateOptions; InputError on a bad one."""
    if not isinstance(raw, dict):
        raise InputError("'options' must be an object")
    kinds = {f.name: f.metadata["kind"] for f in dataclasses.fields(AnnotateOptions)}
    no_unknown_keys(raw, set(kinds), "'options'")
    for name, value in raw.items():
        kind = (int, float) if kinds[name] is float else kinds[name]  # JSON's 2 is a fine 2.0
        if not isinstance(value, kind) or (kinds[name] is not bool and isinstance(value, bool)):
            raise InputError(f"option {name!r} must be a {kinds[name].__name__}, got {shown(value)}")
    options = AnnotateOptions(**raw)
    if options.propagate > n_slices:
        raise InputError(f"propagate {options.propagate} is more than the {n_slices} slices along the axis")
    return options


# ------------------------------------------------------------------ server request bodies


@dataclass(frozen=True)
class SliceParams:
    """Which slices a request speaks of and how they reach the model."""

    axis: int
    window: Any
    orientation: str


def _slice_params(raw: dict) -> SliceParams:
    return SliceParams(check_axis(raw.get("axis", 2)), parse_window(raw.get("window", "auto")),
                       check_orientation(raw.get("orientation", DEFAULT_ORIENTATION)))


@dataclass(frozen=True)
class SegmentEntry:
    slice: int
    box: np.ndarray  # (4,) slice pixels, clipped to the slice
    points: Optional[np.ndarray]  # (P, 2) slice pixels
    point_labels: Optional[np.ndarray]  # (P,) 1 inside, 0 outside


@dataclass(frozen=True)
class SegmentRequest:
    params: SliceParams
    entries: list[SegmentEntry]
    notes: list[str]


def parse_segment_request(raw: Any, size_ijk: Sequence[int], limits: Limits) -> SegmentRequest:
    """Validate a segment request against a volume of size (i, j, k); InputError names what is wrong."""
    if not isinstance(raw, dict):
        raise InputError("a segment request is a JSON object with 'boxes'")
    no_unknown_keys(raw, {"axis", "window", "orientation", "boxes"}, "the segment request")
    params = _slice_params(raw)
    boxes = raw.get("boxes")
    if not isinstance(boxes, list) or not boxes:
        raise InputError("the segment request needs a non-empty 'boxes' list of {\"slice\": k, \"box\": [...]}")
    if len(boxes) > limits.max_boxes_per_request:
        raise InputError(f"{len(boxes)} boxes in one request; the limit is {limits.max_boxes_per_request}")
    n_slices = int(size_ijk[params.axis])
    shape = slice_shape(size_ijk, params.axis)
    entries, notes, seen = [], [], set()
    for position, entry in enumerate(boxes):
        where = f"box {position}"
        if not isinstance(entry, dict) or not {"slice", "box"} <= set(entry):
            raise InputError(f"{where}: each box is {{\"slice\": k, \"box\": [u_min, v_min, u_max, v_max]}}")
        no_unknown_keys(entry, {"slice", "box", "points", "point_labels"}, where)
        index = check_int(entry["slice"], 0, n_slices - 1, f"{where}: slice")
        where = f"box {position}, slice {index}"
        if index in seen:
            raise InputError(f"{where}: two boxes on one slice in one request; send one box per slice")
        seen.add(index)
        box, note = check_box(entry["box"], shape, where)
        if note:
            notes.append(note)
        points, labels = _points(entry, shape, limits.max_points_per_box, where)
        entries.append(SegmentEntry(index, box, points, labels))
    if any(e.points is not None for e in entries):
        notes.append(POINTS_EXPERIMENTAL)
    return SegmentRequest(params, entries, notes)


def _points(entry: dict, shape: tuple[int, int], limit: int, where: str):
    if "points" not in entry:
        if "point_labels" in entry:
            raise InputError(f"{where}: 'point_labels' without 'points'")
        return None, None
    points = check_points(entry["points"], shape, f"'points' is a list of 1..{limit} [u, v] pairs", (1, limit),
                          where)
    labels = entry.get("point_labels", [1] * len(points))
    if not isinstance(labels, list) or len(labels) != len(points) or \
            not all(v in (0, 1) and not isinstance(v, bool) for v in labels):
        raise InputError(f"{where}: 'point_labels' is one 1 (inside) or 0 (outside) per point, got {shown(labels)}")
    return points, np.array(labels, dtype=np.int64)


@dataclass(frozen=True)
class PrefetchRequest:
    params: SliceParams
    slices: list[int]  # in the order to embed them


def parse_prefetch_request(raw: Any, size_ijk: Sequence[int]) -> PrefetchRequest:
    """Validate a prefetch request: a slice range ``first..last``, nearest ``around`` first."""
    if not isinstance(raw, dict):
        raise InputError("a prefetch request is a JSON object")
    no_unknown_keys(raw, {"axis", "window", "orientation", "first", "last", "around"}, "the prefetch request")
    params = _slice_params(raw)
    n = size_ijk[params.axis]
    first = check_int(raw.get("first", 0), 0, n - 1, "first")
    last = check_int(raw.get("last", n - 1), first, n - 1, "last")
    slices = list(range(first, last + 1))
    if raw.get("around") is not None:  # nearest first: the slices a user looks at come first
        around = check_int(raw["around"], 0, n - 1, "around")
        slices.sort(key=lambda i: (abs(i - around), i))
    return PrefetchRequest(params, slices)


def parse_annotate_request(header: Any, size_ijk: Sequence[int],
                           existing_shape: Optional[tuple]) -> tuple[PromptDocument, AnnotateOptions]:
    """An annotate request (JSON, or an envelope header with an existing labelmap) -> document and options."""
    if not isinstance(header, dict):
        raise InputError("an annotate request is a JSON object with a 'document'")
    no_unknown_keys(header, {"document", "options", "array"}, "the annotate request")
    if "document" not in header:
        raise InputError("the annotate request needs a 'document' (the prompt document, README section "
                         "'The command line')")
    prompts = parse_prompts(header["document"], size_ijk)
    options = parse_options(header.get("options", {}), size_ijk[prompts.axis])
    check_existing_shape(existing_shape, (size_ijk[2], size_ijk[1], size_ijk[0]))
    return prompts, options


def check_existing_shape(existing_shape: Optional[Sequence[int]], volume_shape: Sequence[int]) -> None:
    """An annotate request's existing labelmap is (k, j, i) on the session's volume."""
    if existing_shape is not None and tuple(existing_shape) != tuple(volume_shape):
        raise InputError(f"the existing segmentation has shape {list(existing_shape)}; the session's volume is "
                         f"{list(volume_shape)}")


@dataclass(frozen=True)
class ThresholdRequest:
    label: int
    threshold: Optional[float]  # the segment's; None keeps it
    slice_thresholds: dict  # slice -> threshold, or None to go back to the segment's


def parse_threshold_request(raw: Any) -> ThresholdRequest:
    """``{"label": 1, "threshold": 0.4, "slices": {"12": 0.3, "13": null}}``: move the last run's thresholds."""
    if not isinstance(raw, dict) or "label" not in raw:
        raise InputError("a threshold request is a JSON object with 'label' and 'threshold' and/or 'slices'")
    no_unknown_keys(raw, {"label", "threshold", "slices"}, "the threshold request")
    label = check_int(raw["label"], 1, MAX_LABEL, "label")
    threshold = None if raw.get("threshold") is None else check_threshold(raw["threshold"])
    slices = raw.get("slices", {})
    if not isinstance(slices, dict):
        raise InputError("'slices' is an object of slice index -> threshold (or null)")
    per_slice = {}
    for key, value in slices.items():
        if not str(key).isdigit():
            raise InputError(f"'slices': {shown(key)} is not a slice index")
        per_slice[int(key)] = None if value is None else check_threshold(value, f"slice {key}: threshold")
    if threshold is None and not per_slice:
        raise InputError("the threshold request moves nothing: give 'threshold' or 'slices'")
    return ThresholdRequest(label, threshold, per_slice)


@dataclass(frozen=True)
class AlternativesRequest:
    label: int
    slice: int
    choose: Optional[int]  # 0 the run's own mask, 1..3 an alternative; None chooses nothing


def parse_alternatives_request(raw: Any, size_ijk: Sequence[int]) -> AlternativesRequest:
    """``{"label": 1, "slice": 12, "choose": 2}``: one slice of the last run's segment, and which mask it keeps."""
    if not isinstance(raw, dict) or "label" not in raw or "slice" not in raw:
        raise InputError("an alternatives request is a JSON object with 'label', 'slice' and optionally 'choose'")
    no_unknown_keys(raw, {"label", "slice", "choose"}, "the alternatives request")
    choose = raw.get("choose")
    return AlternativesRequest(check_int(raw["label"], 1, MAX_LABEL, "label"),
                               check_int(raw["slice"], 0, max(size_ijk) - 1, "slice"),
                               None if choose is None else check_int(choose, 0, ALTERNATIVE_COUNT - 1, "choose"))
