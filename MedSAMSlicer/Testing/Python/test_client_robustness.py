"""The client's timeouts and error paths (issue 13 items 2 and 8, issue 16) against a real ``medsam serve``.

The server is the real one on 127.0.0.1 (LiteMedSAM, CPU), started as the module starts it. A hung server is a
real socket on 127.0.0.1 that takes connections and never answers.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from mrml_fixtures import add_roi, add_segmentation, ijk_to_ras_point

slicer = pytest.importorskip("slicer")
pytest.importorskip("medsam_server")

from MedSAMSlicerLib import client as medsam_client  # noqa: E402
from MedSAMSlicerLib import keyframes, local_server, run, segments, transport  # noqa: E402


def _lung_request(scene, ct_volume, slices=(12, 22, 31)):
    """A run request for the right lung of CTChest4 with an ROI keyframe on each of ``slices``."""
    segmentation_node, (segment_id,) = add_segmentation(scene, ct_volume, ("right lung",))
    for k in slices:
        corner_a = ijk_to_ras_point(ct_volume, (70 - 0.5, 40 - 0.5, k - 0.15))
        corner_b = ijk_to_ras_point(ct_volume, (110 + 0.5, 95 + 0.5, k + 0.15))
        roi = add_roi(scene, (corner_a + corner_b) / 2, np.abs(corner_b - corner_a), f"k{k}")
        keyframes.tag_keyframe(roi, segmentation_node, segment_id)
    return segmentation_node, segment_id, run.prepare_run(ct_volume, segmentation_node, segment_id)


def _final_state(client, session, job, seconds=30.0) -> str:
    deadline = time.monotonic() + seconds
    while True:
        state = client.job_status(session, job)["state"]
        if state in ("cancelled", "done", "failed") or time.monotonic() > deadline:
            return state
        time.sleep(0.2)


def test_a_failing_poll_cancels_the_server_job(scene, ct_volume, server):
    """Any exception after the annotate job exists (here: the progress callback raises) cancels it server-side."""
    local, client = server
    jobs = []

    class Recording(medsam_client.MedSAMClient):
        def cancel(self, session, job):
            jobs.append(job)
            return super().cancel(session, job)

    recording = Recording(client.url, token=local.token)
    segmentation_node, segment_id, request = _lung_request(scene, ct_volume)
    request.volume.array = request.volume.array + np.int16(3)  # voxels nobody cached: a job that takes a while
    session = run.upload(recording, request.volume)

    def failing_progress(done, total):
        raise KeyError("the panel's progress display broke")

    with pytest.raises(KeyError, match="progress display broke"):
        run.execute_run(recording, request, session=session, progress=failing_progress)
    (job,) = jobs
    assert _final_state(recording, session, job) == "cancelled"
    assert not segments.segment_array(segmentation_node, segment_id, ct_volume).any()
    assert recording.health()["status"] == "ok"  # and the server keeps serving


def test_a_hung_server_fails_a_control_call_quickly():
    """A socket that accepts and never answers: health fails within ~15 s (not the 300 s default), saying why."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # the kernel completes the connections; nobody ever reads or answers
    try:
        client = medsam_client.MedSAMClient(f"http://127.0.0.1:{listener.getsockname()[1]}", token="x")
        start = time.monotonic()
        with pytest.raises(medsam_client.ServerNotRunning, match=r"did not answer the health check within 10 s"):
            client.health()
        assert time.monotonic() - start < 15
        start = time.monotonic()
        with pytest.raises(medsam_client.ServerNotRunning, match=r"did not answer the info request within 10 s"):
            client.check_compatible()
        assert time.monotonic() - start < 15
    finally:
        listener.close()


def test_upload_timeout_grows_with_the_body():
    assert medsam_client.upload_timeout(0) == medsam_client.UPLOAD_BASE_TIMEOUT
    assert medsam_client.upload_timeout(500 << 20) == pytest.approx(medsam_client.UPLOAD_BASE_TIMEOUT + 100)



def test_a_token_less_server_reached_by_another_name_says_so():
    """A real token-less ``medsam serve`` answers 403 to a Host other than 127.0.0.1/localhost; shown as it is."""
    port = local_server.free_port()
    process = subprocess.Popen([sys.executable, "-m", "medsam_server.cli", "serve", "--host", "127.0.0.1",
                                "--port", str(port), "--device", "cpu", "--model", "litemedsam",
                                "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        loopback = medsam_client.MedSAMClient(f"http://127.0.0.1:{port}", retries=8, backoff=0.5)
        deadline = time.monotonic() + 120
        while True:
            try:
                assert loopback.health()["status"] == "ok"
                break
            except medsam_client.ServerNotRunning:
                assert time.monotonic() < deadline and process.poll() is None, "medsam serve did not start"
        other_name = medsam_client.MedSAMClient(f"http://127.1:{port}")  # the same address, another Host
        with pytest.raises(medsam_client.AuthError,
                           match=r"Host '127\.1:\d+' is not this server's address.*use http://127\.0\.0\.1"):
            other_name.health()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_a_session_deleted_server_side_is_uploaded_again_once(scene, ct_volume, server):
    """The session is gone between upload and annotate (DELETE on the server): the run uploads again and finishes."""
    local, client = server
    segmentation_node, segment_id, request = _lung_request(scene, ct_volume)
    session = run.upload(client, request.volume)
    client.delete(session)  # the real server forgets it; its next answer is 404 unknown_session
    with pytest.raises(medsam_client.UnknownSession, match="unknown session .*upload the volume again"):
        client.session_info(session)
    result = run.execute_run(client, request, session=session)
    assert result.session.id != session.id
    applied = run.apply_run(request, result, ct_volume, segmentation_node)
    assert set(applied.changed_slices) >= {12, 22, 31}
    assert segments.segment_array(segmentation_node, segment_id, ct_volume).any()


def test_a_lost_session_after_the_retry_raises_and_writes_nothing(scene, ct_volume, server):
    """If the fresh session is lost too, the run raises SessionLost and the segment stays empty (no partial result).

    A Ray replica's death cannot be staged in this suite; the client here answers 410 ``session_lost`` for every
    annotate (the server's tests check that a real Ray deployment sends it). Uploads go to the real server.
    """
    local, client = server
    annotate_calls = []

    class LosingClient(medsam_client.MedSAMClient):
        def annotate(self, session, document, **kwargs):
            annotate_calls.append(session.id)
            raise transport.http_error(self.url, 410, b'{"error": "the server lost session \'x\' (its replica '
                                       b'stopped): upload the volume again", "code": "session_lost"}',
                                       "the annotate request")

    losing = LosingClient(client.url, token=local.token)
    segmentation_node, segment_id, request = _lung_request(scene, ct_volume)
    with pytest.raises(medsam_client.SessionLost, match="the server lost this session: upload again"):
        run.execute_run(losing, request)
    assert len(annotate_calls) == 2 and annotate_calls[0] != annotate_calls[1]  # uploaded again, run again, once
    assert not segments.segment_array(segmentation_node, segment_id, ct_volume).any()


def test_review_rows_put_the_least_confident_slice_first():
    from MedSAMSlicerLib import errors, review

    rows = review.review_rows([
        {"name": "right lung", "label": 1, "slices": [{"slice": 8, "confidence": 0.9, "keyframe": True},
                                                     {"slice": 9, "confidence": 0.2, "keyframe": False}]},
        {"name": "left lung", "label": 2, "slices": [{"slice": 8, "confidence": 0.5, "keyframe": False}]}])
    assert [(r.segment, r.slice, r.confidence, r.keyframe) for r in rows] == [
        ("right lung", 9, 0.2, False), ("left lung", 8, 0.5, False), ("right lung", 8, 0.9, True)]
    with pytest.raises(errors.InputError, match="cannot be read"):
        review.review_rows([{"name": "x", "label": 1, "slices": [{"slice": 1}]}])


def test_a_real_run_is_reviewed_and_rethresholded_without_a_model_call(scene, ct_volume, server):
    from MedSAMSlicerLib import review

    local, client = server
    segmentation_node, segment_id, request = _lung_request(scene, ct_volume)
    result = run.execute_run(client, request)
    rows = review.review_rows(result.summary["review"])
    assert {r.segment for r in rows} == {"right lung"} and {12, 22, 31} <= {r.slice for r in rows}
    assert [r.confidence for r in rows] == sorted(r.confidence for r in rows)
    _, at_half = client.threshold(result.session, label=1, threshold=0.5)
    header, lower = client.threshold(result.session, label=1, threshold=0.2)
    assert header["threshold"] == 0.2 and set(lower) == set(at_half) >= {12, 22, 31}
    assert sum(m.sum() for m in lower.values()) > sum(m.sum() for m in at_half.values())
    assert all((lower[k] | ~at_half[k]).all() for k in at_half)  # a lower threshold only adds voxels

    run.apply_run(request, result, ct_volume, segmentation_node)
    before = segments.segment_array(segmentation_node, segment_id, ct_volume).copy()
    undo_steps = []
    applied, header = run.apply_threshold(client, result.session, ct_volume, segmentation_node, segment_id, label=1,
                                          threshold=0.2, save_undo_state=lambda: undo_steps.append(1))
    after = segments.segment_array(segmentation_node, segment_id, ct_volume)
    assert undo_steps == [1] and applied.changed_slices  # one undo step for all changed slices
    assert after.sum() > before.sum() and not (before & ~after).any()
    for k in applied.changed_slices:
        assert np.array_equal(after[k], lower[k])
    assert {r.slice for r in review.review_rows(header["review"])} == set(lower)  # the new ranking comes with it


def test_rebox_one_slice_writes_that_slice_alone(scene, ct_volume, server):
    local, client = server
    segmentation_node, segment_id, request = _lung_request(scene, ct_volume)
    result = run.execute_run(client, request)
    run.apply_run(request, result, ct_volume, segmentation_node)
    before = segments.segment_array(segmentation_node, segment_id, ct_volume).copy()
    request = run.prepare_run(ct_volume, segmentation_node, segment_id)
    reboxed = run.rebox_slice(client, request, 22, session=result.session)
    assert set(reboxed.summary["changed_slices"]) <= {22}
    run.apply_run(request, reboxed, ct_volume, segmentation_node)
    after = segments.segment_array(segmentation_node, segment_id, ct_volume)
    others = [k for k in range(after.shape[0]) if k != 22]
    assert np.array_equal(after[others], before[others])
    assert after[22].any()
