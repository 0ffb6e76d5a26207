"""The prompt document: parsing, validation messages, RECIST lines -> boxes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medsam_server.errors import InputError
from medsam_server.geometry import slice_shape
from medsam_server.prompts import LINE_MARGIN_FRACTION, line_box, parse_prompts

SIZE = (128, 100, 34)  # (i, j, k): axial slices are 100 rows x 128 columns


def doc(**segment):
    return {"axis": 2, "window": "ct-lung", "segments": [{"name": "lesion", **segment}]}


def test_parses_the_documented_example():
    parsed = parse_prompts(json.dumps({
        "axis": 2, "window": "auto",
        "segments": [{"name": "right lung", "label": 1,
                      "boxes": [{"slice": 4, "box": [10, 20, 60, 90]}],
                      "lines": [{"slice": 9, "points": [[12, 30], [55, 80]]}],
                      "locked_slices": [12]}],
    }), SIZE)
    segment = parsed.segments[0]
    assert (segment.name, segment.label, segment.locked_slices) == ("right lung", 1, (12,))
    assert [(k.slice, k.source) for k in segment.keyframes] == [(4, "box"), (9, "lines")]
    assert segment.keyframes[0].box == (10, 20, 60, 90)


def test_defaults_axis_window_and_labels_by_position():
    parsed = parse_prompts({"segments": [{"boxes": [{"slice": 0, "box": [1, 1, 5, 5]}]},
                                         {"boxes": [{"slice": 1, "box": [1, 1, 5, 5]}]}]}, SIZE)
    assert parsed.axis == 2 and parsed.window == "auto"
    assert [(s.name, s.label) for s in parsed.segments] == [("segment 1", 1), ("segment 2", 2)]


def test_slice_shape_follows_the_axis():
    assert slice_shape(SIZE, 2) == (100, 128)  # rows along j, columns along i
    assert slice_shape(SIZE, 1) == (34, 128)  # rows along k, columns along i
    assert slice_shape(SIZE, 0) == (34, 100)  # rows along k, columns along j


def test_recist_lines_give_their_enclosing_rectangle_plus_margin():
    long_axis, short_axis = np.array([[20, 40], [60, 50]]), np.array([[35, 30], [45, 62]])
    box = line_box([long_axis, short_axis], (100, 128))
    width, height = 60 - 20, 62 - 30
    assert box == pytest.approx([20 - LINE_MARGIN_FRACTION * width, 30 - LINE_MARGIN_FRACTION * height,
                                 60 + LINE_MARGIN_FRACTION * width, 62 + LINE_MARGIN_FRACTION * height])


def test_a_partly_outside_box_is_clipped_and_noted():
    parsed = parse_prompts(doc(boxes=[{"slice": 3, "box": [-5, 10, 140, 50]}]), SIZE)
    assert parsed.segments[0].keyframes[0].box == (0, 10, 127, 50)
    assert "clipped" in parsed.notes[0] and "slice 3" in parsed.notes[0]


@pytest.mark.parametrize("document, message", [
    ({"axis": 2, "segments": [], "window": "auto"}, "non-empty 'segments'"),
    ({"segments": [{"boxes": [{"slice": 1, "box": [1, 1, 4, 4]}]}], "colour": 1}, "unknown key(s) 'colour'"),
    (doc(boxes=[{"slice": 1, "box": [1, 1, 4, 4]}], colour="red"), "segment 'lesion' has unknown key(s) 'colour'"),
    (doc(boxes=[{"slice": 34, "box": [1, 1, 4, 4]}]), "segment 'lesion': slice 34 is out of range"),
    (doc(boxes=[{"slice": 2, "box": [200, 1, 240, 4]}]), "slice 2: box [200, 1, 240, 4] lies outside"),
    (doc(boxes=[{"slice": 2, "box": [40, 1, 10, 4]}]), "slice 2: box [40, 1, 10, 4] is reversed"),
    (doc(boxes=[{"slice": 2, "box": [10, 4, 40]}]), "a box is [x_min, y_min, x_max, y_max]"),
    (doc(boxes=[{"slice": 2, "box": [1, 1, 4, 4]}, {"slice": 2, "box": [1, 1, 5, 5]}]), "two boxes on one slice"),
    (doc(boxes=[{"slice": 2, "box": [1, 1, 4, 4]}], lines=[{"slice": 2, "points": [[1, 1], [3, 3]]}]),
     "both a box and lines"),
    (doc(lines=[{"slice": 2, "points": [[1, 1], [300, 3]]}]), "lies outside the 128x100 slice"),
    (doc(lines=[{"slice": 2, "points": [[1, 1]]}]), "a line is two points"),
    (doc(), "needs at least one box or line"),
    (doc(boxes=[{"slice": 1, "box": [1, 1, 4, 4]}], locked_slices=[99]), "locked slice 99 is out of range"),
    (doc(boxes=[{"slice": 1, "box": [1, 1, 4, 4]}], label=0), "label must be an integer 1..65535"),
    ({"segments": [{"label": 3, "boxes": [{"slice": 1, "box": [1, 1, 4, 4]}]},
                   {"label": 3, "boxes": [{"slice": 2, "box": [1, 1, 4, 4]}]}]}, "share the label 3"),
    ({"segments": [{"name": "a", "boxes": [{"slice": 1, "box": [1, 1, 4, 4]}]},
                   {"name": "a", "boxes": [{"slice": 2, "box": [1, 1, 4, 4]}]}]}, "share the name 'a'"),
    ({"axis": 3, "segments": [{"boxes": [{"slice": 1, "box": [1, 1, 4, 4]}]}]}, "axis must be 0, 1 or 2"),
    ({"window": "bright", "segments": [{"boxes": [{"slice": 1, "box": [1, 1, 4, 4]}]}]}, "unknown window 'bright'"),
    ({"window": [100, -100], "segments": [{"boxes": [{"slice": 1, "box": [1, 1, 4, 4]}]}]}, "finite low < high"),
    ("{not json", "not valid JSON"),
])
def test_bad_documents_name_the_problem(document, message):
    with pytest.raises(InputError) as raised:
        parse_prompts(document, SIZE)
    assert message in str(raised.value)
