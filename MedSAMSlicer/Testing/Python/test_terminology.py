"""Terminology (issue 14 part 3): the Lib's copy of the server's table, and the tag on segments, on real MRML."""

from __future__ import annotations

import importlib.util
import os

from conftest import REPO_DIR
from MedSAMSlicerLib import terminology

SOURCE = os.path.join(REPO_DIR, "server", "medsam_server", "io", "terminology.py")


def test_the_copy_has_the_server_table():
    """Loaded by path (no medsam_server import): the same targets, codes and entry strings as the source."""
    spec = importlib.util.spec_from_file_location("server_terminology", SOURCE)
    source = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(source)
    assert terminology.COMMON_TARGETS == source.COMMON_TARGETS
    assert (terminology.CATEGORY_CONTEXT, terminology.ANATOMY_CONTEXT) == (source.CATEGORY_CONTEXT,
                                                                           source.ANATOMY_CONTEXT)
    for name in [*source.COMMON_TARGETS, "Right_Lung", "made up"]:
        assert terminology.terminology_for(name) == source.terminology_for(name)


def test_a_new_segment_with_a_known_name_carries_its_terminology(scene):
    from MedSAMSlicerLib import segments

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    liver = node.GetSegmentation().GetSegment(segments.add_segment(node, "Right Lung"))
    assert _tag(liver) == ("Segmentation category and type - DICOM master list~SCT^91723000^Anatomical Structure"
                           "~SCT^39607008^Lung~SCT^24028007^Right~Anatomic codes - DICOM master list~^^~^^")
    unnamed = node.GetSegmentation().GetSegment(segments.add_segment(node))
    assert segments.GENERIC_TERMINOLOGY_TYPE in _tag(unnamed)  # Slicer's default stays for an unknown name
    unnamed.SetName("liver")  # renamed later: tagged when a run writes it (apply_labels calls this)
    assert segments.tag_terminology(unnamed) is True
    assert _tag(unnamed) == terminology.terminology_for("liver") and "^10200004^Liver~" in _tag(unnamed)
    chosen = "Segmentation category and type - DICOM master list~SCT^85756007^Tissue~SCT^39607008^Lung~^^~x~^^~^^"
    unnamed.SetTag("TerminologyEntry", chosen)  # the user's own choice is never replaced
    assert segments.tag_terminology(unnamed) is False
    assert _tag(unnamed) == chosen


def _tag(segment) -> str:
    import vtk

    value = vtk.reference("")
    assert segment.GetTag("TerminologyEntry", value)
    return str(value)

