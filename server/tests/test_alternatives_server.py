"""Alternative masks on a real server on 127.0.0.1: one slice of a kept run, from its cached embedding."""

from __future__ import annotations

import numpy as np
import pytest

RANGE = (14, 18)  # right-lung keyframes on the real CT: five axial slices


@pytest.fixture(scope="module")
def served(litemedsam, shared_cache):
    from medsam_server.app import Settings
    from server_harness import load_client_module, running_server

    with running_server(Settings(), litemedsam, shared_cache) as (url, app):
        yield load_client_module().MedSAMClient(url), url, app.state.medsam


def _alternatives(url: str, session, body: dict) -> tuple[int, dict, np.ndarray]:
    import httpx

    from medsam_server import protocol, wire

    answer = httpx.post(url + protocol.ROUTE_ALTERNATIVES.format(session_id=session.id), json=body,
                        headers={protocol.SESSION_KEY_HEADER: session.key}, timeout=120)
    if answer.status_code != 200:
        return answer.status_code, answer.json(), None
    header, masks = wire.decode(answer.content, protocol.Limits(), (protocol.MASK_DTYPE,))
    return 200, header, masks.astype(bool)


def _threshold(url: str, session, body: dict) -> np.ndarray:
    from test_refine import _threshold as threshold

    status, _, masks = threshold(url, session, body)
    assert status == 200
    return masks


def test_alternatives_of_one_slice_are_decoded_once_without_the_encoder_and_a_choice_is_kept(served):
    from engine_data import ct_volume
    from test_refine import _right_lung_document

    client, url, state = served
    volume, _, direction = ct_volume()
    session = client.upload_volume(volume, direction=direction)
    offset, block, _ = client.annotate(session, _right_lung_document(RANGE))
    annotated = np.zeros(volume.shape, np.uint16)
    annotated[offset[2]:offset[2] + block.shape[0], offset[1]:offset[1] + block.shape[1],
              offset[0]:offset[0] + block.shape[2]] = block
    before = _threshold(url, session, {"label": 1, "threshold": 0.5})

    work = state.worker.stats()
    status, header, masks = _alternatives(url, session, {"label": 1, "slice": 16})
    assert status == 200 and masks.shape == (4, *volume.shape[1:])  # only that slice
    assert (header["axis"], header["label"], header["slice"], header["chosen"], header["count"]) == (2, 1, 16, 0, 4)
    np.testing.assert_array_equal(masks[0], annotated[16] == 1)  # candidate 0: the run's own mask
    assert all((masks[n] != masks[0]).any() for n in (1, 2, 3))  # three other masks
    after = state.worker.stats()
    assert after["encode_calls"] == work["encode_calls"]  # the cached embedding: no encoder call
    assert after["decode_calls"] == work["decode_calls"] + 1

    # Choose alternative 2: the kept run holds it; a threshold request gives it back, the other slices unchanged.
    status, header, chosen = _alternatives(url, session, {"label": 1, "slice": 16, "choose": 2})
    assert status == 200 and header["chosen"] == 2
    np.testing.assert_array_equal(chosen, masks)  # the same candidates, decoded once
    assert state.worker.stats()["decode_calls"] == after["decode_calls"]
    now = _threshold(url, session, {"label": 1, "threshold": 0.5})
    np.testing.assert_array_equal(now[2], masks[2])
    # (the other slices may change only through the run's largest 3D component, which the new mask may join)
    lower = _threshold(url, session, {"label": 1, "threshold": 0.3})  # the threshold moves the chosen mask
    assert lower[2].sum() >= masks[2].sum() and (lower[2] | masks[2]).sum() == lower[2].sum()
    _threshold(url, session, {"label": 1, "threshold": 0.5})

    # Choose 0: the run's own mask is back, every slice as the run made it.
    status, header, _ = _alternatives(url, session, {"label": 1, "slice": 16, "choose": 0})
    assert status == 200 and header["chosen"] == 0
    np.testing.assert_array_equal(_threshold(url, session, {"label": 1, "threshold": 0.5}), before)

    status, error, _ = _alternatives(url, session, {"label": 1, "slice": 30})
    assert status == 422 and "slice 30 was not decoded in the last run" in error["error"]
    status, error, _ = _alternatives(url, session, {"label": 9, "slice": 16})
    assert status == 422 and "segment label 9 has no annotate run" in error["error"]
    status, error, _ = _alternatives(url, session, {"label": 1, "slice": 16, "choose": 4})
    assert status == 422 and "choose 4 is out of range 0..3" in error["error"]
    status, error, _ = _alternatives(url, session, {"label": 1, "slice": 16, "pick": 1})
    assert status == 422 and "pick" in error["error"]


def test_a_rebox_of_the_slice_forgets_its_alternatives():
    from medsam_server.alternative_masks import box_to_decode, choose, keep_alternatives
    from medsam_server.refine import SegmentRun, merge, quantize

    run = SegmentRun("disc", 1, 2, (8, 8), 3, window="auto", orientation="RAS")
    run.probabilities[1], run.boxes[1] = quantize(np.full((8, 8), 0.9)), np.array([1.0, 1.0, 6.0, 6.0])
    keep_alternatives(run, 1, np.zeros((3, 8, 8)))
    choose(run, 1, 3)
    assert run.chosen == {1: 3} and box_to_decode(run, 1) is None
    new = SegmentRun("disc", 1, 2, (8, 8), 3, window="auto", orientation="RAS")
    new.probabilities[1], new.boxes[1] = quantize(np.full((8, 8), 0.8)), np.array([2.0, 2.0, 6.0, 6.0])
    kept = merge(run, new, only_slice=1)
    assert kept.chosen == {} and kept.original == {} and kept.alternatives == {}
    np.testing.assert_array_equal(box_to_decode(kept, 1), [2.0, 2.0, 6.0, 6.0])
