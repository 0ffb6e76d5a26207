"""The review list (issue 14 part 1): the server's per-slice confidence as rows, least confident first.

Every annotate result's summary carries ``review``: per segment ``{"name", "label", "slices": [{"slice",
"confidence", "keyframe"}, ...]}``. Pure Python, so it runs and is tested headless.
"""

from __future__ import annotations

from dataclasses import dataclass
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
