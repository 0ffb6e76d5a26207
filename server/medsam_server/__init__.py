"""MedSAM / LiteMedSAM inference, sparse-marker volume annotation, server and CLI for MedSAMSlicer."""

__version__ = "0.1.0"
# Bumped whenever a route, a field or the wire encoding changes incompatibly;
# the Slicer client refuses a server whose API_VERSION differs from its own.
API_VERSION = 1
