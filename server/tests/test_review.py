"""Per-slice confidence (review.py): its parts on arrays whose answer is known, and the ranking measures."""

from __future__ import annotations

import numpy as np
import pytest

from medsam_server.review import box_fit, segment_report, slice_confidence, spearman, stability, worst_error_share


def disc(radius: float, shape=(40, 40), centre=(20, 20)) -> np.ndarray:
    rows, cols = np.ogrid[:shape[0], :shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius ** 2


def test_stability_is_one_for_a_sharp_map_and_lower_for_a_soft_one():
    sharp = disc(8).astype(np.float32)
    rows, cols = np.ogrid[:40, :40]
    distance = np.sqrt((rows - 20.0) ** 2 + (cols - 20.0) ** 2)
    soft = 1.0 / (1.0 + np.exp((distance - 8.0) / 2.0))  # the same disc, a wide border
    assert stability(sharp) == 1.0
    assert 0.2 < stability(soft) < 0.6
    # uint8 probabilities (what a run keeps) read the same once scaled
    assert stability(np.round(soft * 255) / 255) == pytest.approx(stability(soft), abs=0.02)


def test_box_fit_full_half_and_empty():
    mask = np.zeros((20, 20), bool)
    mask[5:10, 4:14] = True  # cols 4..13, rows 5..9
    assert box_fit(mask, [4, 5, 13, 9]) == 1.0
    assert box_fit(mask, [4, 5, 13, 14]) == pytest.approx(0.5)
    assert box_fit(np.zeros((20, 20), bool), [4, 5, 13, 9]) == 0.0


def test_the_slice_unlike_its_neighbours_is_the_least_confident():
    masks, probs, boxes = {}, {}, {}
    for index in range(10, 16):
        masks[index] = disc(8)
        probs[index] = masks[index].astype(np.float32)
        boxes[index] = [12, 12, 28, 28]
    masks[13] = disc(3)  # a slice where the model found too little
    probs[13] = masks[13].astype(np.float32)
    confidence = slice_confidence(masks, probs, boxes)
    assert set(confidence) == set(boxes)
    assert min(confidence, key=confidence.get) == 13
    assert confidence[10] == pytest.approx(1.0)
    report = segment_report(confidence, keyframes=[10, 15])
    assert [r["slice"] for r in report][0] == 13
    assert [r["confidence"] for r in report] == sorted(r["confidence"] for r in report)
    assert {r["slice"] for r in report if r["keyframe"]} == {10, 15}
    assert set(report[0]) == {"slice", "confidence", "keyframe"}


def test_an_empty_mask_has_no_confidence():
    masks = {0: np.zeros((10, 10), bool)}
    confidence = slice_confidence(masks, {0: np.zeros((10, 10), np.uint8)}, {0: [2, 2, 6, 6]})
    assert confidence == {0: 0.0}


def test_ranking_measures():
    truth = [0.9, 0.2, 0.8, 0.5, 0.95]
    assert spearman(truth, truth) == pytest.approx(1.0)
    assert spearman([1, 1, 1, 1, 1], truth) is None
    # the least confident 20 % (one slice of five) is the 0.2 slice: 0.8 of the 1.65 total error
    assert worst_error_share(truth, truth) == pytest.approx(0.8 / 1.65)
    assert worst_error_share([0.1, 0.9, 0.9, 0.9, 0.9], truth) == pytest.approx(0.1 / 1.65)
    assert worst_error_share(truth, [1.0] * 5) is None


def test_confidence_ranks_the_real_ct_slices(litemedsam, shared_cache):
    """CTChest4's lungs, boxes every 5 slices (the simulated annotator): the README's measurement, as a floor."""
    from engine_data import LEFT_LUNG, RIGHT_LUNG, ct_volume
    from medsam_server.annotate import annotate
    from medsam_server.prompts import parse_prompts
    from medsam_server.review import review_scores
    from medsam_server.simulate import simulated_prompts

    volume, labels, direction = ct_volume()
    targets = [("right lung", RIGHT_LUNG), ("left lung", LEFT_LUNG)]
    document = simulated_prompts(labels, targets, 5, window="ct-lung")
    prompts = parse_prompts(document, volume.shape[::-1])
    result = annotate(volume, direction, prompts, litemedsam, shared_cache)
    report = result.review(2)
    assert report["axis"] == 2
    for segment, done, (name, label) in zip(prompts.segments, report["segments"], targets):
        assert done["name"] == name
        slices = [e["slice"] for e in done["slices"]]
        assert sorted(slices) == list(range(min(slices), max(slices) + 1))  # every decoded slice, once
        assert {e["slice"] for e in done["slices"] if e["keyframe"]} == {k.slice for k in segment.keyframes}
        scores = review_scores(done["slices"], labels == label, result.labels == segment.label, 2)
        # measured +0.93 / +0.85 and 58 % / 61 % (ONNX); chance would be 0 and 20 %
        assert scores["spearman"] >= 0.6, (name, scores)
        assert scores["worst20_error_share"] >= 0.4, (name, scores)
