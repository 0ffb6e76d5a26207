"""Alternative masks in the panel's Lib (issue 14), headless on real MRML and a real ``medsam serve``: cycling a
slice through the model's mask and the decoder's three others writes that slice alone, one undo step each, and the
fourth step brings the model's own mask back."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from MedSAMSlicerLib import protocol, run, segments  # noqa: E402
from test_review_refine import _lung_run  # noqa: E402

SLICE = 22  # a keyframe slice between others of the run


def test_cycling_a_slice_writes_it_alone_one_undo_step_each_and_comes_back(scene, ct_volume, server):
    _, client = server
    segmentation_node, segment_id, _, result, _ = _lung_run(scene, ct_volume, client)
    before = segments.segment_array(segmentation_node, segment_id, ct_volume).copy()
    others = [k for k in range(before.shape[0]) if k != SLICE]
    seen = [before[SLICE]]
    for step in range(1, protocol.ALTERNATIVE_COUNT + 1):
        undo_steps: list = []
        applied, header = run.cycle_alternative(client, result.session, ct_volume, segmentation_node, segment_id,
                                                SLICE, label=1,
                                                save_undo_state=lambda steps=undo_steps: steps.append(1))
        after = segments.segment_array(segmentation_node, segment_id, ct_volume)
        assert header["chosen"] == step % protocol.ALTERNATIVE_COUNT and header["slice"] == SLICE
        assert applied.changed_slices == [SLICE] and undo_steps == [1]
        np.testing.assert_array_equal(after[others], before[others])
        seen.append(after[SLICE].copy())
    np.testing.assert_array_equal(seen[-1], before[SLICE])  # the last step restores the model's mask
    assert len({mask.tobytes() for mask in seen[:-1]}) == protocol.ALTERNATIVE_COUNT  # four different masks
    _, kept = client.threshold(result.session, label=1, threshold=0.5)  # the server's run holds the model's again
    np.testing.assert_array_equal(kept[SLICE], before[SLICE])


def test_a_slice_outside_the_run_has_no_alternatives(scene, ct_volume, server):
    from MedSAMSlicerLib.client import ServerError

    _, client = server
    segmentation_node, segment_id, _, result, _ = _lung_run(scene, ct_volume, client)
    with pytest.raises(ServerError, match="slice 60 was not decoded in the last run"):
        run.cycle_alternative(client, result.session, ct_volume, segmentation_node, segment_id, 60, label=1)
