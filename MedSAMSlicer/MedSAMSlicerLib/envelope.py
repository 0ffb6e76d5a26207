"""The binary envelope, coded a second time for Slicer (``medsam_server.wire`` is the reference).

Slicer's Python has no ``medsam_server``; the server's tests check that both codecs read each other,
for every dtype. MAGIC | uint32 big-endian JSON length | JSON header | zlib(little-endian C-order bytes).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Sequence

import numpy as np

from .protocol import IMAGE_DTYPES, MAGIC

MAX_RESPONSE_BYTES = 4 << 30  # an answer larger than this is not one of ours


def encode_envelope(header: dict, array: np.ndarray | None = None, level: int = 1) -> bytes:
    """MAGIC | uint32 big-endian JSON length | JSON header | zlib(raw little-endian C-order bytes)."""
    header = dict(header)
    payload = b""
    if array is not None:
        array = np.asarray(array)
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        header["array"] = {**header.get("array", {}), "dtype": array.dtype.name, "shape": list(array.shape),
                           "compression": "zlib"}
        payload = zlib.compress(little.data, level)
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return MAGIC + struct.pack(">I", len(text)) + text + payload


def decode_envelope(body: bytes, dtypes: Sequence[str] = IMAGE_DTYPES) -> tuple[dict, np.ndarray | None]:
    """Envelope bytes -> (header, array or None); ValueError if they break the format."""
    if len(body) < 8 or body[:4] != MAGIC:
        raise ValueError("the answer is not a MedSAM array envelope")
    (length,) = struct.unpack(">I", body[4:8])
    if len(body) < 8 + length:
        raise ValueError("the answer is truncated")
    header = json.loads(body[8:8 + length].decode("utf-8"))
    meta = header.get("array") if isinstance(header, dict) else None
    if meta is None:
        return header, None
    if meta.get("dtype") not in dtypes or meta.get("compression", "zlib") not in ("zlib", "gzip"):
        raise ValueError(f"unexpected array {meta.get('dtype')!r} / {meta.get('compression')!r} in the answer")
    shape = tuple(int(n) for n in meta["shape"])
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if any(n < 0 for n in shape) or expected > MAX_RESPONSE_BYTES:
        raise ValueError(f"the answer declares an impossible shape {shape}")
    decompressor = zlib.decompressobj(wbits=31 if meta.get("compression") == "gzip" else 15)
    data = decompressor.decompress(body[8 + length:], expected + 1)  # never more than declared (+1 to notice)
    if len(data) != expected or not decompressor.eof or decompressor.unused_data:
        raise ValueError(f"the answer's data does not match its declared shape {shape} of {meta['dtype']}")
    array = np.frombuffer(bytearray(data), dtype=dtype).reshape(shape)
    return header, array.astype(dtype.newbyteorder("="), copy=False)


def wire_array(array: np.ndarray) -> np.ndarray:
    """A volume in a dtype the server accepts: exact conversions only (bool, wide ints that fit, float16)."""
    array = np.asarray(array)
    if array.dtype.name in IMAGE_DTYPES:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8)
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer) and array.size:
        low, high = int(array.min()), int(array.max())
        for name in ("uint8", "int16", "uint16", "int32"):
            info = np.iinfo(name)
            if info.min <= low and high <= info.max:
                return array.astype(name)
    raise ValueError(f"a volume of {array.dtype} cannot be sent as is; the server takes {', '.join(IMAGE_DTYPES)}")
