"""Slicer-independent parts of the MedSAMSlicer module: no qt, no torch, so they run headless."""
