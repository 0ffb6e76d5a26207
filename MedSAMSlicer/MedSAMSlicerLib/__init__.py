"""Slicer-independent parts of the MedSAMSlicer module: no qt, no torch, so they run headless."""

#: The Lib's modules, each after those it imports (the module's Reload reloads them in this order).
MODULES = ("errors", "protocol", "processes", "geometry", "keyframes", "terminology", "segments", "envelope",
           "transport", "client", "run", "local_server", "install", "reference", "review", "timing")
