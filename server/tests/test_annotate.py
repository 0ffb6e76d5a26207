"""The sparse-marker workflow on the real chest CT with the real LiteMedSAM.

All tests share one model and one embedding cache (conftest.py), so each slice of
CTChest4 is encoded once per run.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from engine_data import LEFT_LUNG, RIGHT_LUNG, ct_volume, dice, slicerio_data
from medsam_server.annotate import annotate, interpolate_boxes
from medsam_server.errors import Cancelled
from medsam_server.geometry import slice_index
from medsam_server.prompts import parse_prompts
from medsam_server.requests import AnnotateOptions
from medsam_server.simulate import simulated_prompts

LUNGS = (("right lung", RIGHT_LUNG), ("left lung", LEFT_LUNG))
SIZE = (128, 128, 34)


def run(document, litemedsam, cache, volume=None, direction=None, **options):
    volume = ct_volume()[0] if volume is None else volume
    direction = ct_volume()[2] if direction is None else direction
    size = tuple(reversed(volume.shape))
    return annotate(volume, direction, parse_prompts(document, size), litemedsam, cache, AnnotateOptions(**options))


@pytest.fixture(scope="module")
def sweep(litemedsam, shared_cache):
    """3D Dice of each lung for keyframes every k slices (first and last slice of each lung included)."""
    _, labels, _ = ct_volume()
    scores = {}
    for every in (1, 3, 5, 10):
        result = run(simulated_prompts(labels, LUNGS, every, window="ct-lung"), litemedsam, shared_cache)
        for position, (name, label) in enumerate(LUNGS, start=1):
            scores[every, name] = dice(result.labels == position, labels == label)
    print("\nDice by keyframe spacing:", {f"k={k} {n}": round(v, 4) for (k, n), v in scores.items()})
    return scores


def test_every_fifth_slice_is_nearly_as_good_as_every_slice(sweep):
    for name, _ in LUNGS:
        assert sweep[1, name] >= 0.83, (name, sweep[1, name])  # the reference's box on every slice
        assert sweep[5, name] >= 0.82, (name, sweep[5, name])
        assert abs(sweep[5, name] - sweep[1, name]) <= 0.03, (name, sweep[1, name], sweep[5, name])
        assert sweep[10, name] >= 0.75, (name, sweep[10, name])


def test_recist_lines_are_within_005_of_boxes(litemedsam, shared_cache, sweep):
    _, labels, _ = ct_volume()
    result = run(simulated_prompts(labels, LUNGS, 5, window="ct-lung", markers="lines"), litemedsam, shared_cache)
    for position, (name, label) in enumerate(LUNGS, start=1):
        lines_dice = dice(result.labels == position, labels == label)
        print(f"\n{name}: RECIST lines {lines_dice:.4f}, boxes {sweep[5, name]:.4f}")
        assert abs(lines_dice - sweep[5, name]) <= 0.05


def test_run_reports_phases_and_a_second_segment_hits_the_cache(litemedsam, shared_cache, sweep):
    _, labels, _ = ct_volume()
    result = run(simulated_prompts(labels, LUNGS, 5, window="ct-lung"), litemedsam, shared_cache)
    summary = result.summary()
    assert result.cache_misses == 0 and result.cache_hits == sum(s["slices"] for s in summary["segments"])
    assert summary["seconds"]["decoding"] > 0
    right = summary["segments"][0]
    assert right["name"] == "right lung" and right["voxels"] == int((result.labels == 1).sum())


def test_boxes_between_keyframes_are_interpolated():
    parsed = parse_prompts({"segments": [{"boxes": [{"slice": 2, "box": [10, 10, 20, 20]},
                                                    {"slice": 6, "box": [14, 10, 40, 20]}]}]}, SIZE)
    boxes = interpolate_boxes(parsed.segments[0], "linear")
    assert sorted(boxes) == [2, 3, 4, 5, 6]
    assert boxes[4].tolist() == [12, 10, 30, 20]
    # PCHIP through three keyframes keeps every corner within its neighbours' range (no overshoot).
    parsed = parse_prompts({"segments": [{"boxes": [{"slice": 0, "box": [10, 10, 20, 20]},
                                                    {"slice": 5, "box": [5, 5, 40, 40]},
                                                    {"slice": 10, "box": [12, 12, 22, 22]}]}]}, SIZE)
    curved = interpolate_boxes(parsed.segments[0], "pchip")
    assert all(5 <= curved[s][0] <= 12 and 20 <= curved[s][2] <= 40 for s in range(11))


def _flip_transpose_copy(image: sitk.Image) -> sitk.Image:
    """The same physical image stored with i and j swapped and both reversed."""
    permuted = sitk.PermuteAxes(image, [1, 0, 2])
    return sitk.Flip(permuted, [True, True, False])


def _crop(image: sitk.Image, first: int, last: int) -> sitk.Image:
    return image[:, :, first:last + 1]


def test_a_reoriented_copy_gives_the_same_voxels_in_physical_space(litemedsam, shared_cache, tmp_path):
    from medsam_server.io.images import read_image
    from medsam_server.io.labels import segment_colour, write_labels

    original = _crop(sitk.ReadImage(slicerio_data("CTChest4.nrrd")), 14, 19)
    original.SetSpacing((2.5, 3.0, 10.0))  # anisotropic in-plane too
    copy = _flip_transpose_copy(original)
    assert copy.GetSpacing() == (3.0, 2.5, 10.0)
    sitk.WriteImage(original, str(tmp_path / "original.nrrd"))
    sitk.WriteImage(copy, str(tmp_path / "copy.nrrd"))
    a, b = read_image(tmp_path / "original.nrrd"), read_image(tmp_path / "copy.nrrd")
    assert not np.allclose(a.direction, b.direction)

    box = [30, 40, 60, 100]  # (i, j) on the original; on the copy i' = 127 - j, j' = 127 - i
    copy_box = [127 - box[3], 127 - box[2], 127 - box[1], 127 - box[0]]
    doc_a = {"window": "ct-lung", "segments": [{"boxes": [{"slice": 0, "box": box}, {"slice": 5, "box": box}]}]}
    doc_b = {"window": "ct-lung",
             "segments": [{"boxes": [{"slice": 0, "box": copy_box}, {"slice": 5, "box": copy_box}]}]}
    result_a = run(doc_a, litemedsam, shared_cache, a.array, a.direction)
    result_b = run(doc_b, litemedsam, shared_cache, b.array, b.direction)

    write_labels(tmp_path / "a.nrrd", result_a.labels, a, [("s", 1, segment_colour(0))])
    write_labels(tmp_path / "b.nrrd", result_b.labels, b, [("s", 1, segment_colour(0))])
    out_a, out_b = sitk.ReadImage(str(tmp_path / "a.nrrd")), sitk.ReadImage(str(tmp_path / "b.nrrd"))
    for got, source in ((out_a, original), (out_b, copy)):
        assert got.GetOrigin() == pytest.approx(source.GetOrigin())
        assert got.GetSpacing() == pytest.approx(source.GetSpacing())
        assert got.GetDirection() == pytest.approx(source.GetDirection())
    resampled = sitk.Resample(out_b, out_a, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    assert (sitk.GetArrayFromImage(out_a) > 0).sum() > 500
    np.testing.assert_array_equal(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(out_a))


def test_locked_slices_and_other_labels_are_untouched(litemedsam, shared_cache):
    volume, labels, _ = ct_volume()
    document = simulated_prompts(labels, LUNGS[:1], 5, window="ct-lung")
    first = run(document, litemedsam, shared_cache)
    existing = first.labels.copy()
    locked = document["segments"][0]["boxes"][1]["slice"] + 2
    existing[locked] = 0
    existing[locked, 40:60, 30:50] = 1  # the annotator's hand edit
    existing[0, :5, :5] = 9  # a structure of someone else's
    document["segments"][0]["locked_slices"] = [locked]
    second = annotate(volume, ct_volume()[2], parse_prompts(document, SIZE), litemedsam, shared_cache,
                      existing=existing)
    np.testing.assert_array_equal(second.labels[locked], existing[locked])
    assert (second.labels[0, :5, :5] == 9).all()
    assert locked not in second.changed_slices and second.cache_misses == 0
    assert existing[locked, 40:60, 30:50].all() and (existing[locked] == 1).sum() == 400  # input unchanged


def test_propagation_follows_the_lung_and_stops_where_it_ends(litemedsam, shared_cache):
    _, labels, _ = ct_volume()
    lung = labels == RIGHT_LUNG
    present = np.flatnonzero(lung.any(axis=(1, 2)))
    middle = present[len(present) // 2 - 2: len(present) // 2 + 3: 2]  # 3 keyframes mid-lung
    boxes = []
    for k in middle:
        rows, cols = np.nonzero(lung[k])
        boxes.append({"slice": int(k), "box": [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]})
    document = {"window": "ct-lung", "segments": [{"name": "right lung", "boxes": boxes}]}
    limited = run(document, litemedsam, shared_cache, propagate=2)
    assert limited.segments[0].slices == list(range(middle[0] - 2, middle[-1] + 3))
    free = run(document, litemedsam, shared_cache, propagate=40)
    reached = free.segments[0].slices
    print(f"\npropagation reached slices {reached[0]}..{reached[-1]}; the lung spans {present[0]}..{present[-1]}")
    # Upwards the lung runs to the volume's last slice. Downwards it ends at slice 7 but its last four
    # slices are slivers (2..783 voxels) whose box lies on the liver dome: propagation must stop
    # there, not walk on through the liver to slice 0 (as it did before the intensity check).
    assert present[-1] - 3 <= reached[-1] <= present[-1]
    assert present[0] <= reached[0] <= present[0] + 4
    assert dice(free.labels == 1, lung) >= 0.75


@pytest.mark.parametrize("axis", [0, 1])
def test_sagittal_and_coronal_slices(litemedsam, shared_cache, axis):
    _, labels, _ = ct_volume()
    lung = labels == LEFT_LUNG
    present = np.flatnonzero([lung[slice_index(axis, s)].any() for s in range(128)])
    chosen = present[len(present) // 2 - 8: len(present) // 2 + 9: 8]  # 3 keyframes, every 8th slice
    boxes = []
    for s in chosen:
        rows, cols = np.nonzero(lung[slice_index(axis, s)])
        boxes.append({"slice": int(s), "box": [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]})
    document = {"axis": axis, "window": "ct-lung", "segments": [{"name": "left lung", "boxes": boxes}]}
    result = run(document, litemedsam, shared_cache, largest_component=False)
    assert result.segments[0].slices == list(range(chosen[0], chosen[-1] + 1))
    # Sagittal and coronal slices of this CT are 34 rows of 10 mm by 128 columns of 3 mm: they reach
    # the model squashed 3.3 times, as upstream feeds them. A box mapped to the wrong place scores ~0.
    for s in (chosen[0], chosen[1]):
        plane = slice_index(axis, s)
        score = dice(result.labels[plane] == 1, lung[plane])
        print(f"\naxis {axis} slice {s}: Dice {score:.3f}")
        assert score >= 0.6


def test_a_later_segment_does_not_erase_an_earlier_one_unless_asked(litemedsam, shared_cache):
    box_a, box_b = [20, 30, 70, 100], [50, 30, 110, 100]
    document = {"window": "ct-lung", "segments": [
        {"name": "a", "boxes": [{"slice": 20, "box": box_a}]}, {"name": "b", "boxes": [{"slice": 20, "box": box_b}]}]}
    kept = run(document, litemedsam, shared_cache, largest_component=False)
    alone = run({**document, "segments": document["segments"][:1]}, litemedsam, shared_cache, largest_component=False)
    np.testing.assert_array_equal(kept.labels == 1, alone.labels == 1)
    taken = run(document, litemedsam, shared_cache, largest_component=False, overwrite=True)
    assert (taken.labels == 1).sum() < (kept.labels == 1).sum()  # b took some of a's voxels


def test_one_keyframe_segments_that_slice_alone_and_says_so(litemedsam, shared_cache):
    document = {"window": "ct-lung", "segments": [{"name": "x", "boxes": [{"slice": 20, "box": [20, 30, 70, 100]}]}]}
    result = run(document, litemedsam, shared_cache)
    assert result.changed_slices == [20] and (result.labels[20] == 1).any()
    assert "one keyframe" in result.notes[0]


def test_cancel_raises_and_returns_nothing(litemedsam):
    from medsam_server.embeddings import EmbeddingCache

    _, labels, _ = ct_volume()
    with pytest.raises(Cancelled):
        annotate(ct_volume()[0], ct_volume()[2], parse_prompts(simulated_prompts(labels, LUNGS, 5), SIZE),
                 litemedsam, EmbeddingCache(), should_stop=lambda: True)
