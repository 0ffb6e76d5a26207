"""The review list (issue 14 part 1): the server's per-slice confidence as rows, least confident first.

Every annotate result's summary carries ``review``: per segment ``{"name", "label", "slices": [{"slice",
"confidence", "keyframe"}, ...]}``. :class:`ReviewState` is the panel's list: the last run's rows and
which slices the user has reviewed (jumped to, edited by hand, re-boxed). Pure Python apart from
``mark_edited``, which reads the segment through ``segments``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError


@dataclass(frozen=True)
class ReviewRow:
    segment: str
    label: int
    slice: int
    confidence: float  # in [0, 1]; low: look at this slice first
    keyframe: bool


def review_rows(review: Any) -> list[ReviewRow]:
    """All segments' slices as rows, least confident first (ties: label, then slice).

    ``review`` is an annotate summary's list, or one segment's entry (the threshold answer's)."""
    if isinstance(review, dict):
        review = [review]
    if not isinstance(review, list):
        raise InputError(f"the server's review is a list of segments, got {type(review).__name__}")
    rows = []
    for entry in review:
        try:
            for item in entry["slices"]:
                rows.append(ReviewRow(str(entry["name"]), int(entry["label"]), int(item["slice"]),
                                      float(item["confidence"]), bool(item.get("keyframe", False))))
        except (KeyError, TypeError, ValueError) as error:
            raise InputError(f"the server's review cannot be read ({type(error).__name__}: {error})") from None
    return sorted(rows, key=lambda row: (row.confidence, row.label, row.slice))


@dataclass
class ReviewState:
    """The review list of one segment's last run along ``axis``: rows least confident first, and the slices
    reviewed so far. A new ranking of the same run (a moved threshold) keeps what was reviewed; a new run
    starts afresh (``ReviewState(...)`` again)."""

    segment_id: str
    axis: int
    rows: list[ReviewRow] = field(default_factory=list)
    reviewed: set[int] = field(default_factory=set)

    @classmethod
    def from_summary(cls, segment_id: str, axis: int, summary: Any) -> ReviewState:
        """The list of a finished run (``RunResult.summary``); empty when the server sent no review."""
        return cls(segment_id, int(axis), review_rows(summary.get("review", [])) if isinstance(summary, dict) else [])

    def rerank(self, review: Any) -> None:
        """A new ranking of the same run (the threshold answer's ``review``); the reviewed marks stay."""
        self.rows = review_rows(review)

    def mark_reviewed(self, slices: Iterable[int]) -> list[int]:
        """Mark slices of the list reviewed (looked at, re-boxed); returns those newly marked."""
        listed = {row.slice for row in self.rows}
        new = sorted({int(s) for s in slices} & listed - self.reviewed)
        self.reviewed.update(new)
        return new

    def mark_edited(self, segmentation_node, volume_node) -> list[int]:
        """Mark the slices edited by hand since the run (``segments.edited_slices``) reviewed; the newly marked."""
        from .segments import edited_slices

        return self.mark_reviewed(edited_slices(segmentation_node, self.segment_id, volume_node, self.axis))

    def is_reviewed(self, slice_: int) -> bool:
        return int(slice_) in self.reviewed

    def next_to_review(self) -> ReviewRow | None:
        """The least confident slice not yet reviewed, or None when all are."""
        return next((row for row in self.rows if row.slice not in self.reviewed), None)

    @property
    def progress(self) -> tuple[int, int]:
        """(slices reviewed, slices listed)."""
        listed = {row.slice for row in self.rows}
        return len(self.reviewed & listed), len(listed)


def state_after_run(previous: ReviewState | None, segment_id: str, axis: int, summary: Any,
                    only_slice: int | None = None) -> ReviewState:
    """The review list once a run is written: a new list for a run of the segment; after a re-box of one slice
    (``only_slice``) of the listed segment, its new ranking with the marks kept and that slice reviewed."""
    if only_slice is None or previous is None or (previous.segment_id, previous.axis) != (segment_id, int(axis)):
        state = ReviewState.from_summary(segment_id, axis, summary)
    else:
        state = previous
        if isinstance(summary, dict) and summary.get("review"):
            state.rerank(summary["review"])
    if only_slice is not None:
        state.mark_reviewed([only_slice])  # the user drew its box
    return state
