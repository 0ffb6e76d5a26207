"""Refining a run without a model call: thresholds per segment and per slice over the kept probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from medsam_server.errors import InputError
from medsam_server.refine import SegmentRun, check_threshold, quantize, segment_masks, set_thresholds


def soft_disc_run() -> SegmentRun:
    """Three slices of a disc whose probability falls off from the centre: a lower threshold grows it."""
    rows, cols = np.ogrid[:32, :32]
    distance = np.sqrt((rows - 16.0) ** 2 + (cols - 16.0) ** 2)
    probs = 1.0 / (1.0 + np.exp((distance - 8.0) / 2.0))
    run = SegmentRun("disc", 1, 2, (32, 32), 5)
    for index in (1, 2, 3):
        run.probabilities[index] = quantize(probs)
        run.boxes[index] = np.array([6.0, 6.0, 26.0, 26.0])
    run.keyframes = [1, 3]
    return run


def test_a_lower_threshold_grows_the_mask_and_the_same_threshold_gives_the_same_mask():
    run = soft_disc_run()
    at_half = segment_masks(run)
    assert segment_masks(run).tolist() == at_half.tolist()
    assert not at_half[0].any() and not at_half[4].any()  # slices the run never decoded stay empty
    set_thresholds(run, 0.2, None)
    grown = segment_masks(run)
    assert grown.sum() > at_half.sum()
    assert (grown | at_half).sum() == grown.sum()  # it only grows


def test_a_slice_threshold_moves_that_slice_only():
    run = soft_disc_run()
    before = segment_masks(run)
    set_thresholds(run, None, {2: 0.8})
    after = segment_masks(run)
    assert after[2].sum() < before[2].sum()
    assert after[1].tolist() == before[1].tolist() and after[3].tolist() == before[3].tolist()
    set_thresholds(run, None, {2: None})  # back to the segment's threshold
    assert segment_masks(run).tolist() == before.tolist()


def test_locked_slices_are_kept_as_they_are():
    run = soft_disc_run()
    hand = np.zeros((32, 32), bool)
    hand[14:18, 14:18] = True
    run.locked[2] = hand
    del run.probabilities[2]
    set_thresholds(run, 0.1, None)
    assert segment_masks(run)[2].tolist() == hand.tolist()


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "0.5", True, None])
def test_bad_thresholds_are_refused_by_name(bad):
    with pytest.raises(InputError, match="threshold must be a number between 0 and 1"):
        check_threshold(bad)


def test_a_slice_threshold_on_a_slice_the_run_did_not_decode_is_refused():
    with pytest.raises(InputError, match="slice 4 was not decoded in the last run"):
        set_thresholds(soft_disc_run(), None, {4: 0.3})
