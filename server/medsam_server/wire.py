"""The server's wire protocol: names, limits, and the binary array envelope.

Everything a request or response may carry that is not plain JSON travels in one
*envelope* (content type :data:`ENVELOPE_TYPE`)::

    b"MSW1" | uint32 big-endian N | N bytes of UTF-8 JSON (an object) | payload

If the JSON object has an ``"array"`` entry, the payload is that array's raw
C-order little-endian bytes, compressed as one zlib (or gzip) stream; otherwise the
payload is empty. The ``"array"`` entry describes it::

    {"dtype": "int16", "shape": [k, j, i] or [k, j, i, 3], "compression": "zlib",
     "spacing": [si, sj, sk], "origin": [x, y, z], "direction": [9 numbers],
     "offset": [i0, j0, k0]}

Frames: ``shape`` is numpy's (k, j, i) order (SimpleITK's ``GetArrayFromImage``);
``spacing`` and ``offset`` are in (i, j, k) order like ``GetSpacing()``; ``origin`` and
``direction`` are LPS as SimpleITK reports them (``direction`` row-major, its columns
the i, j, k axes). Geometry and offset are optional.

Names, dtypes and limits come from :mod:`.protocol`. Decoding is strict and bounded:
the dtype must be whitelisted, the shape within :class:`Limits`, and the data exactly
as long as the shape says. Decompression stops as soon as the output would pass the declared size, so a compression bomb
costs at most one chunk beyond it.

This module is numpy + stdlib (no torch). The Slicer client (``MedSAMSlicerLib/client.py``)
has its own small codec of the same format, because Slicer's Python has no
``medsam_server``; ``tests/test_wire.py`` runs both against each other so they
cannot drift.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from .errors import TooLarge, Unsupported, WireError, shown
from .protocol import ARRAY_FIELDS, COMPRESSIONS, IMAGE_DTYPES, MAGIC, RGB_CHANNELS, Limits

_CHUNK = 4 << 20  # decompression step: the most a bomb can allocate past the declared size
#: Deflate's largest expansion (a 258-byte match per 2 bits, about 1032:1): shorter data cannot fill an array.
DEFLATE_MAX_RATIO = 1032


# ------------------------------------------------------------------ encode


def encode(header: dict, array: Optional[np.ndarray] = None, level: int = 1) -> bytes:
    """Envelope bytes of a JSON-able ``header`` and an optional array (described under ``header["array"]``).

    The caller's ``header["array"]`` may carry geometry (spacing, origin, direction,
    offset); dtype, shape and compression are filled in here. Level 1 zlib: masks
    and CT compress well at it, and it costs little time.
    """
    header = dict(header)
    payload = b""
    if array is not None:
        array = np.asarray(array)
        if array.dtype == np.bool_:
            array = array.astype(np.uint8)
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        header["array"] = {**header.get("array", {}), "dtype": array.dtype.name, "shape": list(array.shape),
                           "compression": "zlib"}
        payload = zlib.compress(little.data, level)
    else:
        header.pop("array", None)
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return MAGIC + struct.pack(">I", len(text)) + text + payload


# ------------------------------------------------------------------ decode


def decode(body: bytes, limits: Limits = Limits(), dtypes: Sequence[str] = IMAGE_DTYPES,
           allow_rgb: bool = True) -> tuple[dict, Optional[np.ndarray]]:
    """Envelope bytes -> (header, array or None); raises WireError (TooLarge, Unsupported) naming the problem.

    ``dtypes`` is the whitelist for this request (images or labels); ``allow_rgb``
    admits a trailing channel axis of 3. The array is little-endian, writable and
    owns its memory.
    """
    if len(body) > limits.max_body_bytes:
        raise TooLarge(f"the body has {len(body)} bytes; the limit is {limits.max_body_bytes}")
    if len(body) < len(MAGIC) + 4 or body[:len(MAGIC)] != MAGIC:
        raise WireError(f"not a MedSAM array envelope (it starts with {MAGIC!r}, a 4-byte header length, "
                        "a JSON header and the compressed data)")
    (length,) = struct.unpack(">I", body[len(MAGIC):len(MAGIC) + 4])
    if length > limits.max_header_bytes:
        raise TooLarge(f"the envelope header declares {length} bytes; the limit is {limits.max_header_bytes}")
    start = len(MAGIC) + 4
    if len(body) < start + length:
        raise WireError(f"the body is truncated: its header declares {length} bytes, {len(body) - start} follow")
    header = parse_json_object(body[start:start + length], "the envelope header")
    payload = memoryview(body)[start + length:]  # no copy of what may be a gigabyte
    meta = header.get("array")
    if meta is None:
        if payload:
            raise WireError("the envelope carries data but its header has no 'array' entry describing it")
        return header, None
    dtype, shape = check_array_header(meta, limits, dtypes, allow_rgb)
    data = bounded_decompress(payload, math.prod(shape) * dtype.itemsize, meta.get("compression", "zlib"))
    return header, data.view(dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=False)


def declared_bytes(body: bytes, limits: Limits = Limits(), dtypes: Sequence[str] = IMAGE_DTYPES,
                   allow_rgb: bool = True) -> int:
    """The bytes the envelope's array will take once decoded (0 without one), read from its header alone.

    So that a server can charge an upload to its memory budget before decoding it.
    """
    declared = declared_array(body, limits, dtypes, allow_rgb)
    return 0 if declared is None else math.prod(declared[1]) * declared[0].itemsize


def declared_array(body: bytes, limits: Limits = Limits(), dtypes: Sequence[str] = IMAGE_DTYPES,
                   allow_rgb: bool = True) -> Optional[tuple[np.dtype, tuple[int, ...]]]:
    """(dtype, shape) the envelope's header declares for its array, checked; None without one."""
    if len(body) < len(MAGIC) + 4 or body[:len(MAGIC)] != MAGIC:
        return None  # decode() says what is wrong
    (length,) = struct.unpack(">I", body[len(MAGIC):len(MAGIC) + 4])
    if length > limits.max_header_bytes or len(body) < len(MAGIC) + 4 + length:
        return None
    meta = parse_json_object(body[len(MAGIC) + 4:len(MAGIC) + 4 + length], "the envelope header").get("array")
    return None if meta is None else check_array_header(meta, limits, dtypes, allow_rgb)


def parse_json_object(raw: bytes, what: str) -> dict:
    """Strict JSON (no NaN or Infinity) that must be an object; raises WireError."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant, parse_int=_bounded_int)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise WireError(f"{what} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise WireError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def _bounded_int(text: str) -> int:
    # No protocol number needs 19 digits; bigger ones would overflow float() further in.
    if len(text.lstrip("-")) > 18:
        raise ValueError(f"the integer {text[:24]}... is too large")
    return int(text)


def check_array_header(meta: Any, limits: Limits, dtypes: Sequence[str], allow_rgb: bool) -> tuple[np.dtype, tuple]:
    """Validate an ``"array"`` entry's dtype, shape and compression; return the little-endian dtype and shape."""
    if not isinstance(meta, dict):
        raise WireError("'array' must be an object with dtype and shape")
    unknown = sorted(set(meta) - set(ARRAY_FIELDS))
    if unknown:
        raise WireError(f"'array' has unknown key(s) {', '.join(map(repr, unknown))}")
    name = meta.get("dtype")
    if not isinstance(name, str) or name not in dtypes:
        raise Unsupported(f"dtype {name!r} is not accepted here; use one of {', '.join(dtypes)}")
    compression = meta.get("compression", "zlib")
    if compression not in COMPRESSIONS:
        raise Unsupported(f"compression {compression!r} is not supported; use one of {', '.join(COMPRESSIONS)}")
    shape = meta.get("shape")
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
        raise WireError(f"shape must be a list of integers, got {shown(shape)}")
    rgb = len(shape) == 4 and shape[3] == RGB_CHANNELS
    if len(shape) != 3 and not (allow_rgb and rgb):
        expected = "(k, j, i) or (k, j, i, 3)" if allow_rgb else "(k, j, i)"
        raise WireError(f"shape {shown(shape)} is not {expected}; a 2D image is one slice: (1, rows, cols)")
    if any(n < 1 for n in shape):
        raise WireError(f"shape {shape} has an empty axis")
    if any(n > limits.max_dim for n in shape):
        raise TooLarge(f"shape {shape} has an axis longer than {limits.max_dim}")
    voxels = math.prod(shape[:3])
    if voxels > limits.max_voxels:
        raise TooLarge(f"shape {shape} has {voxels} voxels; the limit is {limits.max_voxels}")
    dtype = np.dtype(name).newbyteorder("<")
    size = math.prod(shape) * dtype.itemsize
    if size > limits.max_decompressed_bytes:
        raise TooLarge(f"shape {shape} of {name} needs {size} bytes; the limit is {limits.max_decompressed_bytes}")
    return dtype, tuple(shape)


def bounded_decompress(payload: bytes, expected: int, compression: str = "zlib") -> np.ndarray:
    """Decompress exactly ``expected`` bytes into a uint8 array; WireError on more, fewer, or trailing data.

    Data too short to reach ``expected`` is refused before anything is allocated, and the
    output's memory is only touched as data lands in it (``np.empty``, not zero-filled): a
    compression bomb costs what it really decompresses to, never what its header claims.
    """
    if expected > len(payload) * DEFLATE_MAX_RATIO + 1024:
        raise WireError(f"{len(payload)} bytes of {compression} data cannot decompress to the {expected} bytes its "
                        f"shape and dtype declare (deflate expands at most {DEFLATE_MAX_RATIO}:1): it is truncated")
    decompressor = zlib.decompressobj(wbits=31 if compression == "gzip" else 15)
    out = np.empty(expected, dtype=np.uint8)
    source = memoryview(payload)
    position = offset = 0
    try:
        while not decompressor.eof:
            data = decompressor.unconsumed_tail  # fed a chunk at a time: the input is never copied whole
            if not data:
                data, offset = source[offset:offset + _CHUNK], offset + _CHUNK
            chunk = decompressor.decompress(data, _CHUNK)
            if position + len(chunk) > expected:
                raise WireError(f"the data decompresses to more than the {expected} bytes its shape and dtype declare")
            out[position:position + len(chunk)] = np.frombuffer(chunk, dtype=np.uint8)
            position += len(chunk)
            if not chunk and not data:
                break  # input exhausted before the end of the stream
    except zlib.error as err:
        raise WireError(f"the data is not a valid {compression} stream: {err}") from None
    if not decompressor.eof:
        raise WireError(f"the data is truncated: the {compression} stream ends early "
                        f"({position} of {expected} bytes decompressed)")
    stray = len(decompressor.unused_data) + max(0, len(source) - offset)
    if stray:
        raise WireError(f"{stray} stray bytes follow the compressed data")
    if position != expected:
        raise WireError(f"the data holds {position} bytes; shape and dtype declare {expected}")
    return out


# ------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class Geometry:
    """Where voxels sit: spacing (i, j, k) mm, origin LPS mm, direction 3x3 LPS (columns i, j, k)."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.array(self.direction, dtype=np.float64).reshape(3, 3)

    def as_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}


def geometry(meta: dict) -> Geometry:
    """The optional geometry of an ``"array"`` entry, validated (WireError on bad numbers)."""
    spacing = _numbers(meta.get("spacing", [1.0, 1.0, 1.0]), 3, "spacing")
    if any(s <= 0 for s in spacing):
        raise WireError(f"spacing {list(spacing)} must be positive")
    origin = _numbers(meta.get("origin", [0.0, 0.0, 0.0]), 3, "origin")
    direction = _numbers(meta.get("direction", [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]), 9, "direction")
    if abs(np.linalg.det(np.array(direction).reshape(3, 3))) < 1e-6:
        raise WireError(f"direction {list(direction)} is singular; it is a 3x3 matrix whose columns are the "
                        "i, j, k axes")
    return Geometry(spacing, origin, direction)


def offset(meta: dict) -> tuple[int, int, int]:
    """The optional (i0, j0, k0) offset of an ``"array"`` entry."""
    value = meta.get("offset", [0, 0, 0])
    if not isinstance(value, list) or len(value) != 3 or \
            not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise WireError(f"offset must be three non-negative integers (i0, j0, k0), got {value!r}")
    return tuple(value)


def _numbers(value: Any, count: int, what: str) -> tuple:
    if not isinstance(value, list) or len(value) != count or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise WireError(f"{what} must be {count} finite numbers, got {value!r}")
    return tuple(float(v) for v in value)
