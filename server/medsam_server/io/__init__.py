"""File input and output: images (``images``), label files (``labels``), Slicer ``.seg.nrrd`` (``segnrrd``),
and DICOM (``dicom``, ``dicomseg``).

Light on purpose: importing this package imports no reader (and never torch); import the
module you need, e.g. ``from medsam_server.io.images import read_image``.
"""
