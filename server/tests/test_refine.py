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


# ---------------------------------------------------------------- on the real CT, a real server and the CLI

RIGHT_LUNG_LABEL = 5  # in slicerio's Segmentation.seg.nrrd
RANGE = (14, 18)  # right-lung keyframes: five axial slices, a few seconds of encoding


@pytest.fixture(scope="module")
def served(litemedsam, shared_cache):
    from medsam_server.app import Settings
    from server_harness import load_client_module, running_server

    with running_server(Settings(), litemedsam, shared_cache) as (url, app):
        yield load_client_module().MedSAMClient(url), url, app.state.medsam


def _right_lung_document(slices) -> dict:
    from engine_data import bounding_box, ct_volume

    _, labels, _ = ct_volume()
    boxes = [{"slice": k, "box": bounding_box(labels[k] == RIGHT_LUNG_LABEL).tolist()} for k in slices]
    return {"axis": 2, "window": "ct-lung", "segments": [{"name": "right lung", "label": 1, "boxes": boxes}]}


def _threshold(url: str, session, body: dict) -> tuple[int, dict, np.ndarray]:
    import httpx

    from medsam_server import protocol, wire

    answer = httpx.post(url + protocol.ROUTE_THRESHOLD.format(session_id=session.id), json=body,
                        headers={protocol.SESSION_KEY_HEADER: session.key}, timeout=60)
    if answer.status_code != 200:
        return answer.status_code, answer.json(), None
    header, masks = wire.decode(answer.content, protocol.Limits(), (protocol.MASK_DTYPE,))
    return 200, header, masks.astype(bool)


def test_the_server_moves_a_threshold_without_a_model_call_and_reboxes_one_slice(served):
    from engine_data import ct_volume

    client, url, state = served
    volume, _, direction = ct_volume()
    session = client.upload_volume(volume, direction=direction)
    offset, block, summary = client.annotate(session, _right_lung_document(RANGE))
    review = summary["review"][0]
    assert review["label"] == 1 and {e["slice"] for e in review["slices"]} == set(range(14, 19))
    assert {e["slice"] for e in review["slices"] if e["keyframe"]} == {14, 18}
    assert all(0.0 <= e["confidence"] <= 1.0 for e in review["slices"])
    k0, j0, i0 = offset[2], offset[1], offset[0]
    annotated = np.zeros(volume.shape, np.uint16)
    annotated[k0:k0 + block.shape[0], j0:j0 + block.shape[1], i0:i0 + block.shape[2]] = block

    work = state.worker.stats()
    status, header, at_half = _threshold(url, session, {"label": 1, "threshold": 0.5})
    assert status == 200 and header["slices"] == list(range(14, 19))
    np.testing.assert_array_equal(at_half, annotated[14:19] == 1)  # the same threshold gives the run's masks
    _, header, grown = _threshold(url, session, {"label": 1, "threshold": 0.3})
    assert header["threshold"] == 0.3 and grown.sum() > at_half.sum()
    _, header, one = _threshold(url, session, {"label": 1, "slices": {"16": 0.8}})
    assert one[2].sum() < grown[2].sum()
    np.testing.assert_array_equal(np.delete(one, 2, axis=0), np.delete(grown, 2, axis=0))
    assert header["slice_thresholds"] == {"16": 0.8}
    assert state.worker.stats() == work  # nothing was encoded or decoded

    # Re-box slice 16 alone: only it changes and it becomes a keyframe of the kept run.
    rebox = _right_lung_document((16,))
    _, _, again = client.annotate(session, rebox, existing=annotated, only_slice=16)
    assert again["changed_slices"] == [16]  # the review: slice 16 within the kept run, now a keyframe
    assert {e["slice"]: e["keyframe"] for e in again["review"][0]["slices"]} == {14: True, 15: False, 16: True,
                                                                                 17: False, 18: True}
    _, header, _ = _threshold(url, session, {"label": 1, "threshold": 0.5})
    assert {e["slice"] for e in header["review"]["slices"] if e["keyframe"]} == {14, 16, 18}

    status, error, _ = _threshold(url, session, {"label": 1, "threshold": 1.5})
    assert status == 422 and "threshold must be a number between 0 and 1" in error["error"]
    status, error, _ = _threshold(url, session, {"label": 9, "threshold": 0.4})
    assert status == 422 and "segment label 9 has no annotate run" in error["error"]
    points = client.segment(session, [{"slice": 16, "box": rebox["segments"][0]["boxes"][0]["box"],
                                       "points": [[40, 60]]}], window="ct-lung")
    assert any("points are experimental" in note for note in points.notes)


def test_after_a_views_run_the_threshold_moves_the_fused_masks_and_the_review_describes_them(served, litemedsam):
    """Issue 15's views on the server: the kept run holds the fused probabilities, so the threshold route at the
    run's own threshold gives back exactly the masks the annotate job wrote (not the first, single-view pass), and
    the review ranks those masks."""
    from medsam_server.annotate import annotate
    from medsam_server.prompts import parse_prompts
    from medsam_server.refine import review_entry
    from medsam_server.simulate import simulated_prompts
    from test_multiview import ANISOTROPIC, ellipsoid

    client, url, state = served
    volume, inside = ellipsoid()  # (10, 40, 40) at 3 x 3 x 10 mm
    document = simulated_prompts(inside.astype(np.uint8), [("blob", 1)], 3, window=[0, 255])
    session = client.upload_volume(volume, spacing=ANISOTROPIC)
    offset, block, summary = client.annotate(session, document, views=True)
    written = np.zeros(volume.shape, np.uint16)
    written[offset[2]:offset[2] + block.shape[0], offset[1]:offset[1] + block.shape[1],
            offset[0]:offset[0] + block.shape[2]] = block
    single = annotate(volume, np.eye(3), parse_prompts(document, (40, 40, 10)), litemedsam).labels == 1
    assert (single != (written == 1)).sum() > 0  # the fusion changed the masks: what follows tells them apart

    status, header, at_run = _threshold(url, session, {"label": 1, "threshold": 0.5})
    assert status == 200
    np.testing.assert_array_equal(at_run, written[header["slices"]] == 1)
    assert header["review"] == summary["review"][0]
    run = state.sessions.get(session.id, "", session.key).runs[1]
    assert summary["review"][0] == review_entry(run, written == 1)  # the review of the written (fused) masks
    _, _, lower = _threshold(url, session, {"label": 1, "threshold": 0.3})
    assert lower.sum() >= at_run.sum() and (lower | at_run).sum() == lower.sum()  # it moves the fused masks


def test_medsam_annotate_reboxes_one_slice_and_keeps_the_others(tmp_path):
    import json

    from engine_data import slicerio_data
    from medsam_server import cli
    from medsam_server.io.images import read_image
    from medsam_server.io.labels import read_labels

    ct, existing = slicerio_data("CTChest4.nrrd"), slicerio_data("Segmentation.seg.nrrd")
    document = _right_lung_document((16,))
    document["segments"][0]["label"] = RIGHT_LUNG_LABEL  # the existing segmentation's right lung
    (tmp_path / "prompts.json").write_text(json.dumps(document))
    out, report = tmp_path / "out.nrrd", tmp_path / "report.json"
    code = cli.main(["annotate", ct, "--prompts", str(tmp_path / "prompts.json"), "--output", str(out),
                     "--existing", existing, "--slice", "16", "--threshold", "0.4", "--report", str(report),
                     "--backend", "torch", "--device", "cpu"])
    assert code == 0
    volume = read_image(ct)
    before, _ = read_labels(existing, volume)
    after, _ = read_labels(out, volume)
    np.testing.assert_array_equal(np.delete(after, 16, axis=0), np.delete(before, 16, axis=0))
    lung = after[16] == RIGHT_LUNG_LABEL
    truth = before[16] == RIGHT_LUNG_LABEL
    assert 2 * (lung & truth).sum() / (lung.sum() + truth.sum()) > 0.8
    written = json.loads(report.read_text())
    assert written["axis"] == 2
    [entry] = written["segments"][0]["slices"]
    assert entry["slice"] == 16 and entry["keyframe"] is True and 0.0 < entry["confidence"] <= 1.0
    assert cli.main(["annotate", ct, "--prompts", str(tmp_path / "prompts.json"), "--output", str(tmp_path / "b.nrrd"),
                     "--report", str(report), "--slice", "16"]) == 2  # the report exists: refused before any work
