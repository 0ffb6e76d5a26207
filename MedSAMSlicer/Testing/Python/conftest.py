"""Headless tests of the Slicer module against real MRML from the ``slicer-core`` wheel.

Adds ``MedSAMSlicer/`` to ``sys.path`` so that ``MedSAMSlicerLib`` imports as it does inside Slicer.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

MODULE_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
REPO_DIR = os.path.dirname(MODULE_DIR)
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
for path in (MODULE_DIR, TESTS_DIR):  # MedSAMSlicerLib as inside Slicer; mrml_fixtures beside the tests
    if path not in sys.path:
        sys.path.insert(0, path)


def slicerio_data(name: str) -> str:
    """A file of the test data that ships inside the slicerio wheel (never downloaded)."""
    import slicerio

    return os.path.join(os.path.dirname(slicerio.__file__), "data", name)


@pytest.fixture
def scene():
    """A fresh MRML scene with the segmentation converters registered (Slicer's app does that at startup)."""
    slicer = pytest.importorskip("slicer")
    from MedSAMSlicerLib import segments

    segments.register_segmentation_converters()
    mrml = slicer.vtkMRMLScene()
    yield mrml
    mrml.Clear(1)


@pytest.fixture
def ct_volume(scene):
    """CTChest4 read by MRML's own volume storage node (vtkITK), as Slicer reads it."""
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CTChest4")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(slicerio_data("CTChest4.nrrd"))
    assert storage.ReadData(node), "MRML could not read CTChest4.nrrd"
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert isinstance(node, slicer.vtkMRMLScalarVolumeNode)
    return node


@pytest.fixture(scope="session")
def reference_segmentation():
    """The expert segmentation of CTChest4 as a (k, j, i) label array and its segment names -> labels."""
    slicerio = pytest.importorskip("slicerio")
    segmentation = slicerio.read_segmentation(slicerio_data("Segmentation.seg.nrrd"))
    assert list(segmentation["referenceImageExtentOffset"]) == [0, 0, 0]
    labels = np.transpose(segmentation["voxels"], (2, 1, 0))  # slicerio gives (i, j, k)
    names = {s["name"]: int(s["labelValue"]) for s in segmentation["segments"]}
    return labels, names


@pytest.fixture(scope="module")
def server():
    """A real local ``medsam serve`` process started as the module starts it, with its client; stopped after
    the test module (skipped where the server package is not installed)."""
    pytest.importorskip("medsam_server")
    from MedSAMSlicerLib import client as medsam_client
    from MedSAMSlicerLib import local_server

    local = local_server.LocalServer(python=sys.executable, extra_args=["--model", "litemedsam", "--device", "cpu"])
    url, token = local.start()
    client = medsam_client.MedSAMClient(url, token=token)
    try:
        local.wait_ready(client.info, timeout=300)
        yield local, client
    finally:
        local.stop()
