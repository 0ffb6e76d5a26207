"""MedSAM / LiteMedSAM inference, sparse-marker volume annotation, server and CLI for MedSAMSlicer."""

from .protocol import API_VERSION

__version__ = "0.1.0"
__all__ = ["API_VERSION", "__version__"]
