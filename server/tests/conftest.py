"""Fixtures shared by the engine, workflow and CLI tests: one real LiteMedSAM and one cache per run.

The encoder costs ~1.3 s a slice on these 2 CPU cores, so every test that segments
the real CT shares the same model and embedding cache: a slice is encoded once per run.
"""

from __future__ import annotations

import pytest

from medsam_server.embeddings import EmbeddingCache
from medsam_server.models import load_model


@pytest.fixture(scope="session")
def litemedsam():
    return load_model("litemedsam", device="cpu")


@pytest.fixture(scope="session")
def shared_cache() -> EmbeddingCache:
    return EmbeddingCache(budget_bytes=1 << 30)


@pytest.fixture(scope="module")
def onnx_cache(tmp_path_factory):
    """A cache folder of the test module's own (``MEDSAM_CACHE_DIR``): its ONNX graphs are exported there."""
    folder = tmp_path_factory.mktemp("medsam_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MEDSAM_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="module")
def lite_onnx(onnx_cache):
    """LiteMedSAM on ONNX Runtime, its graphs exported into the module's own cache folder."""
    return load_model("litemedsam", device="cpu", backend="onnx")
