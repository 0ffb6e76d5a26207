"""The slice frames the Lib and the server share: ``in_plane_axes`` and ``slice_index`` must agree.

The Lib (``MedSAMSlicerLib/geometry.py``) cannot import the server package inside Slicer, so it keeps
its own copy of the two functions that say which IJK axes a slice spans and where a slice lies in a
(k, j, i) array; a box the Lib sends is read by the server with the server's copy. Both are loaded
from this checkout, as the terminology and protocol parity tests do.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import MODULE_DIR, REPO_DIR

SERVER_GEOMETRY = os.path.join(REPO_DIR, "server", "medsam_server", "geometry.py")
LIB_GEOMETRY = os.path.join(MODULE_DIR, "MedSAMSlicerLib", "geometry.py")


def _server_geometry():
    from medsam_server import geometry

    assert os.path.samefile(geometry.__file__, SERVER_GEOMETRY), "the tests must run against this checkout's server"
    return geometry


def _lib_geometry():
    assert os.path.isfile(LIB_GEOMETRY), f"{LIB_GEOMETRY} is missing"
    from MedSAMSlicerLib import geometry

    assert os.path.samefile(geometry.__file__, LIB_GEOMETRY)
    return geometry


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_in_plane_axes_agree(axis):
    server, lib = _server_geometry(), _lib_geometry()
    assert lib.in_plane_axes(axis) == server.in_plane_axes(axis)
    assert axis not in server.in_plane_axes(axis)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_index_picks_the_same_voxels(axis):
    """Every slice of a (k, j, i) volume with distinct voxels: the same index and the same (rows, cols) plane."""
    server, lib = _server_geometry(), _lib_geometry()
    volume = np.arange(5 * 6 * 7).reshape(5, 6, 7)  # (k, j, i): sizes i = 7, j = 6, k = 5
    u, v = server.in_plane_axes(axis)
    for index in range(volume.shape[2 - axis]):
        assert lib.slice_index(axis, index) == server.slice_index(axis, index)
        plane = volume[server.slice_index(axis, index)]
        assert plane.shape == server.slice_shape((7, 6, 5), axis) == (volume.shape[2 - v], volume.shape[2 - u])
        np.testing.assert_array_equal(volume[lib.slice_index(axis, index)], plane)
