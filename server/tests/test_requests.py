"""Request parsing shared by the server and the command line: one options type for both."""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import pytest

from medsam_server.errors import InputError
from medsam_server.protocol import Limits
from medsam_server.requests import (
    POINTS_EXPERIMENTAL,
    AnnotateOptions,
    add_option_arguments,
    options_from_arguments,
    parse_options,
    parse_prefetch_request,
    parse_segment_request,
)

SIZE = (128, 100, 34)  # (i, j, k)


def test_every_option_is_both_a_flag_and_a_request_field_with_the_same_meaning():
    parser = argparse.ArgumentParser()
    add_option_arguments(parser)
    flags = ["--propagate", "3", "--no-fill-holes", "--all-components", "--overwrite", "--interpolation", "linear",
             "--orientation", "radiological", "--batch-size", "8"]
    from_cli = options_from_arguments(parser.parse_args(flags))
    from_request = parse_options({"propagate": 3, "fill_holes": False, "largest_component": False, "overwrite": True,
                                  "interpolation": "linear", "orientation": "radiological", "batch_size": 8}, 34)
    assert from_cli == from_request
    assert {f.name for f in dataclasses.fields(AnnotateOptions)} == set(vars(parser.parse_args([])))
    assert options_from_arguments(parser.parse_args([])) == AnnotateOptions() == parse_options({}, 34)


@pytest.mark.parametrize("raw, message", [
    ({"propagate": "3"}, "option 'propagate' must be a int"),
    ({"propagate": True}, "option 'propagate' must be a int"),
    ({"fill_holes": 1}, "option 'fill_holes' must be a bool"),
    ({"interpolation": "cubic"}, "interpolation must be one of pchip, linear"),
    ({"orientation": "sideways"}, "orientation must be one of ras, radiological, array"),
    ({"batch_size": 0}, "batch_size must be 1..64"),
    ({"propagate": 35}, "propagate 35 is more than the 34 slices"),
    ({"colour": "red"}, "unknown key(s) 'colour'"),
])
def test_a_bad_option_is_refused_naming_it(raw, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_options(raw, 34)


def test_segment_requests_keep_points_and_clip_boxes_with_a_note():
    request = parse_segment_request({"axis": 2, "boxes": [
        {"slice": 3, "box": [-5, 2, 40, 50], "points": [[10, 10], [20, 30]], "point_labels": [1, 0]},
        {"slice": 4, "box": [1, 2, 3, 4]}]}, SIZE, Limits())
    first, second = request.entries
    assert request.params.axis == 2 and request.params.orientation == "ras"
    np.testing.assert_array_equal(first.box, [0, 2, 40, 50])
    assert request.notes == ["box 0, slice 3: box [-5, 2, 40, 50] clipped to [0.0, 2.0, 40.0, 50.0] "
                             "(the slice is 128x100)", POINTS_EXPERIMENTAL]
    np.testing.assert_array_equal(first.point_labels, [1, 0])
    assert second.points is None and second.point_labels is None
    with pytest.raises(InputError, match="box 0, slice 3: a point lies outside the 128x100 slice"):
        parse_segment_request({"boxes": [{"slice": 3, "box": [1, 2, 30, 40], "points": [[1, 100]]}]}, SIZE, Limits())
    with pytest.raises(InputError, match="513 boxes in one request; the limit is 512"):
        parse_segment_request({"boxes": [{"slice": 0, "box": [1, 1, 5, 5]}] * 513}, SIZE, Limits())


def test_prefetch_requests_order_the_slices_nearest_first():
    request = parse_prefetch_request({"first": 2, "last": 6, "around": 5}, SIZE)
    assert request.slices == [5, 4, 6, 3, 2]
    with pytest.raises(InputError, match="last 1 is out of range 2..33"):
        parse_prefetch_request({"first": 2, "last": 1}, SIZE)
