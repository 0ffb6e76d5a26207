"""The binary array envelope: exact round trips, strict refusals, and the client's codec against the server's."""

from __future__ import annotations

import json
import struct
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medsam_server import protocol, wire
from medsam_server.api import status_for
from medsam_server.errors import WireError
from server_harness import load_client_module

load_client_module()  # puts MedSAMSlicerLib on the path, as Slicer does
from MedSAMSlicerLib import envelope as client  # noqa: E402  (the Lib's copy of the codec)

LIMITS = protocol.Limits(max_decompressed_bytes=64 * protocol.MiB)


def envelope(header, payload: bytes = b"") -> bytes:
    return raw_envelope(json.dumps(header).encode(), payload)


def raw_envelope(text: bytes, payload: bytes = b"") -> bytes:
    return protocol.MAGIC + struct.pack(">I", len(text)) + text + payload


@pytest.mark.parametrize("dtype", protocol.IMAGE_DTYPES)
def test_every_image_dtype_round_trips_exactly(dtype):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else None
    array = (rng.integers(info.min, info.max, (3, 5, 7), endpoint=True) if info
             else rng.normal(size=(3, 5, 7)) * 1e3).astype(dtype)
    header = {"array": {"spacing": [0.5, 0.7, 2.5], "origin": [1.0, -2.0, 3.0],
                        "direction": [-1, 0, 0, 0, -1, 0, 0, 0, 1]}}
    decoded_header, decoded = wire.decode(wire.encode(header, array), LIMITS)
    assert decoded.dtype == np.dtype(dtype) and decoded.shape == (3, 5, 7)
    np.testing.assert_array_equal(decoded, array)
    assert decoded.flags.writeable and decoded.flags.c_contiguous
    geometry = wire.geometry(decoded_header["array"])
    assert geometry.spacing == (0.5, 0.7, 2.5)
    np.testing.assert_array_equal(geometry.direction_matrix, np.diag([-1.0, -1.0, 1.0]))


def test_big_endian_and_non_contiguous_input_arrive_as_the_same_values():
    array = np.arange(2 * 3 * 4, dtype=">i2").reshape(2, 3, 4)[:, ::-1]
    _, decoded = wire.decode(wire.encode({}, array), LIMITS)
    np.testing.assert_array_equal(decoded, array)


def test_rgb_volume_and_gzip_payload_are_accepted():
    rgb = np.random.default_rng(1).integers(0, 255, (1, 6, 4, 3), dtype=np.uint8)
    header = {"array": {"dtype": "uint8", "shape": [1, 6, 4, 3], "compression": "gzip"}}
    import gzip

    _, decoded = wire.decode(envelope(header, gzip.compress(rgb.tobytes())), LIMITS)
    np.testing.assert_array_equal(decoded, rgb)


def test_the_client_codec_and_the_server_codec_read_each_other():
    """The Slicer client carries its own copy of the format; both directions must agree, for every dtype."""
    rng = np.random.default_rng(2)
    for dtype in protocol.IMAGE_DTYPES:
        array = (rng.normal(size=(2, 3, 4)) * 100).astype(dtype)
        _, on_server = wire.decode(client.encode_envelope({"array": {"spacing": [1, 2, 3]}}, array), LIMITS)
        np.testing.assert_array_equal(on_server, array)
        header, on_client = client.decode_envelope(wire.encode({"summary": {"x": 1}}, array))
        np.testing.assert_array_equal(on_client, array)
        assert header["summary"] == {"x": 1} and on_client.dtype == array.dtype
    rgb = rng.integers(0, 255, (1, 3, 4, 3)).astype(np.uint8)
    np.testing.assert_array_equal(wire.decode(client.encode_envelope({}, rgb), LIMITS)[1], rgb)
    header, nothing = client.decode_envelope(wire.encode({"summary": {}}))
    assert nothing is None and header == {"summary": {}}


def test_the_client_converts_only_exactly():
    assert client.wire_array(np.array([[[0, 70000]]], dtype=np.int64)).dtype == np.int32
    assert client.wire_array(np.array([[[0, 200]]], dtype=np.uint64)).dtype == np.uint8
    assert client.wire_array(np.ones((1, 1, 1), bool)).dtype == np.uint8
    with pytest.raises(ValueError, match="cannot be sent"):
        client.wire_array(np.array([[[2**40]]], dtype=np.int64))
    with pytest.raises(ValueError, match="cannot be sent"):
        client.wire_array(np.ones((1, 1, 1), np.complex64))


def _volume_header(dtype="int16", shape=(2, 4, 4), **extra) -> dict:
    return {"array": {"dtype": dtype, "shape": list(shape), **extra}}


@pytest.mark.parametrize("body, status, message", [
    (b"", 400, "not a MedSAM array envelope"),
    (b"GIF89a" + bytes(20), 400, "not a MedSAM array envelope"),
    (protocol.MAGIC + struct.pack(">I", 100) + b"{}", 400, "truncated"),
    (protocol.MAGIC + struct.pack(">I", 1 << 30), 413, "envelope header declares"),
    (raw_envelope(b'{"array": {"dtype": "int16", '), 400, "not valid JSON"),
    (envelope([1, 2]), 400, "must be a JSON object"),
    (envelope(_volume_header("int64")), 415, "dtype 'int64' is not accepted"),
    (envelope(_volume_header("complex64")), 415, "not accepted"),
    (envelope(_volume_header(compression="lzma")), 415, "compression"),
    (envelope(_volume_header(shape=(4, 4))), 400, "a 2D image is one slice"),
    (envelope(_volume_header(shape=(1, 4, 4, 4))), 400, "(k, j, i, 3)"),
    (envelope(_volume_header(shape=(1, 0, 4))), 400, "empty axis"),
    (envelope(_volume_header(shape=(100000, 100000, 100000))), 413, "longer than"),
    (envelope(_volume_header(shape=(60000, 60000, 60000))), 413, "voxels"),
    (envelope(_volume_header("float64", shape=(1024, 1024, 16))), 413, "bytes; the limit"),
    (envelope(_volume_header(shape=(1.5, 4, 4))), 400, "list of integers"),
    (envelope(_volume_header(surprise=1)), 400, "unknown key"),
    (envelope(_volume_header()), 400, "truncated"),  # no data at all
    (envelope(_volume_header(), zlib.compress(bytes(2 * 4 * 4 * 2))[:-3]), 400, "truncated"),
    (envelope(_volume_header(), zlib.compress(bytes(2 * 4 * 4 * 2 - 2))), 400, "holds 62 bytes"),
    (envelope(_volume_header(), zlib.compress(bytes(2 * 4 * 4 * 2 + 2))), 400, "more than the 64 bytes"),
    (envelope(_volume_header(), zlib.compress(bytes(64)) + b"xx"), 400, "stray bytes"),
    (envelope(_volume_header(), b"not zlib at all"), 400, "not a valid zlib stream"),
    (envelope({"note": 1}, b"data"), 400, "no 'array' entry"),
    (raw_envelope(b'{"x": NaN}'), 400, "NaN is not a number JSON allows"),
    (raw_envelope(b'{"x": ' + b"9" * 400 + b"}"), 400, "is too large"),
])
def test_bad_envelopes_are_refused_with_a_status_and_a_message(body, status, message):
    with pytest.raises(WireError) as caught:
        wire.decode(body, LIMITS)
    assert status_for(caught.value)[0] == status
    assert message in str(caught.value)


def test_a_compression_bomb_is_stopped_after_one_chunk():
    """256 MiB of zeros (about 250 KiB compressed) declared as 256 bytes: refused without inflating it all."""
    compressor = zlib.compressobj(9)
    zeros = bytes(16 << 20)
    bomb = b"".join(compressor.compress(zeros) for _ in range(16)) + compressor.flush()
    assert len(bomb) < 1 << 20
    body = envelope(_volume_header("uint8", shape=(1, 16, 16)), bomb)
    tracemalloc.start()
    try:
        with pytest.raises(WireError, match="more than the 256 bytes"):
            wire.decode(body, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20  # one 4 MiB chunk and change, not 256 MiB


def test_labels_refuse_images_and_rgb():
    rgb = np.zeros((1, 2, 2, 3), np.uint8)
    with pytest.raises(WireError, match=r"\(k, j, i\)"):
        wire.decode(wire.encode({}, rgb), LIMITS, protocol.LABEL_DTYPES, allow_rgb=False)
    with pytest.raises(WireError, match="not accepted"):
        wire.decode(wire.encode({}, np.zeros((1, 2, 2), np.float32)), LIMITS, protocol.LABEL_DTYPES, allow_rgb=False)


@pytest.mark.parametrize("meta, message", [
    ({"spacing": [1, 0, 1]}, "positive"),
    ({"spacing": [1, 1]}, "3 finite numbers"),
    ({"origin": [0, 0, "x"]}, "3 finite numbers"),
    ({"direction": [1, 0, 0, 0, 1, 0, 0, 0, 0]}, "singular"),
    ({"direction": [1, 0, 0]}, "9 finite numbers"),
    ({"spacing": [True, 1, 1]}, "finite numbers"),
])
def test_bad_geometry_is_refused(meta, message):
    with pytest.raises(WireError, match=message):
        wire.geometry(meta)


def test_offsets_are_non_negative_integer_triples():
    assert wire.offset({"offset": [1, 2, 3]}) == (1, 2, 3)
    for bad in ([1, 2], [1, 2, -1], [1.0, 2, 3], "x"):
        with pytest.raises(WireError, match="offset"):
            wire.offset({"offset": bad})


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda h, p: raw_envelope(h, p), st.binary(max_size=60), st.binary(max_size=60)),
    st.builds(lambda shape, dtype, p: envelope({"array": {"dtype": dtype, "shape": shape}}, p),
              st.lists(st.integers(-3, 70), max_size=5), st.sampled_from(["uint8", "int16", "float32", "int64", "x"]),
              st.one_of(st.binary(max_size=64), st.binary(max_size=64).map(zlib.compress))),
))
def test_random_bodies_only_ever_raise_wire_errors(body):
    try:
        header, array = wire.decode(body, LIMITS)
    except WireError as err:
        assert 400 <= status_for(err)[0] < 500 and str(err)
    else:
        assert isinstance(header, dict)
        assert array is None or array.size * array.itemsize <= LIMITS.max_decompressed_bytes
