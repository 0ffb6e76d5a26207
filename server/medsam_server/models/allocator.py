"""glibc malloc settings for the torch CPU path: keep freed memory instead of handing it back.

With glibc's defaults every large tensor torch frees goes back to the kernel (``munmap``,
or a heap trim) and the next one is fresh pages: LiteMedSAM's torch encoder took
~460,000 minor page faults and ~1 s of kernel time per slice on a 2-core laptop CPU.
Raising the mmap and trim thresholds (what ``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_TOP_PAD_`` set at start) keeps those pages for
reuse: ~3,000 faults and 0.01 s of kernel time a slice, for ~150 MB more resident memory
(bench/speed.py). ONNX Runtime's memory arena does the same for the ONNX path.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3  # mallopt parameters from glibc's malloc.h
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
TRIM_THRESHOLD = 1 << 30
TOP_PAD = 64 << 20

_applied = False


def keep_freed_memory() -> bool:
    """Apply the settings once per process (glibc on Linux only; elsewhere nothing). True if applied."""
    global _applied
    if _applied or not sys.platform.startswith("linux"):
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc without mallopt
        return False
    _applied = all(mallopt(param, value) == 1 for param, value in (
        (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD), (M_TOP_PAD, TOP_PAD)))
    return _applied
