"""The inference server for real: uvicorn on 127.0.0.1, LiteMedSAM, the CT of slicerio, the Slicer module's client.

One server (two tokens, alice and bob) runs in a thread of this module and shares the
model with direct engine calls, so "equal to the engine" compares the same weights.
Model work is kept to a few 128x128 slices (the encoder costs seconds a slice on the
shared CPU); the tests that must kill a server start ``medsam serve`` as a process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine_data import LEFT_LUNG, RIGHT_LUNG, bounding_box, ct_volume, dice
from medsam_server import cli, protocol, wire
from medsam_server.app import Settings
from medsam_server.embeddings import EmbeddingCache, volume_digest
from medsam_server.errors import InputError
from medsam_server.models import load_model
from medsam_server.multiview import annotate_multiview
from medsam_server.prompts import parse_prompts
from medsam_server.stack import SliceStack
from medsam_server.worker import ModelWorker
from server_harness import free_port, load_client_module, running_server, serve_subprocess

client_module = load_client_module()
MedSAMClient = client_module.MedSAMClient

ALICE, BOB = "alice-" + "a" * 26, "bob-" + "b" * 28
WINDOW = "ct-lung"
ROUND_TRIP_SLICES = slice(19, 22)  # three axial slices of CTChest4 with both lungs
SPACING = (0.7, 0.7, 5.0)  # the round trip's upload, anisotropic
PROBE_SLICE = 30  # a one-slice session for the "server keeps serving" checks
UNIQUE_SLICES = (10, 12, 14, 16, 23, 25, 27, 29)  # the images of the eight concurrent sessions


@dataclass
class Served:
    url: str
    cache: EmbeddingCache
    state: object

    def client(self, token=ALICE, **options) -> MedSAMClient:
        return MedSAMClient(self.url, token=token, **options)

    def worker_stats(self) -> dict:
        return self.state.worker.stats()


@pytest.fixture(scope="module")
def model():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # two cores shared by several people: one intra-op thread avoids oversubscription
    yield load_model("litemedsam", device="cpu")
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def served(model):
    cache = EmbeddingCache()
    # share_cache: the tests compare the server's cache with the engine's keys (per-token keys are test_hardening's)
    settings_ = Settings(tokens=(ALICE, BOB), max_upload_mb=2, max_sessions=64, share_cache=True,
                         limits=protocol.Limits(max_decompressed_bytes=64 * protocol.MiB))
    with running_server(settings_, model, cache) as (url, app):
        yield Served(url, cache, app.state.medsam)


@pytest.fixture(scope="module")
def probe(served):
    """A cached one-slice session and a good request on it: what must still work after every bad request."""
    volume, labels, direction = ct_volume()
    client = served.client()
    session = client.upload_volume(volume[PROBE_SLICE:PROBE_SLICE + 1], direction=direction)
    box = bounding_box(labels[PROBE_SLICE] == RIGHT_LUNG).tolist()
    client.wait(session, client.prefetch(session, window=WINDOW))
    expected = client.segment(session, [{"slice": 0, "box": box}], window=WINDOW)[0]

    def still_serving() -> None:
        mask = served.client().segment(session, [{"slice": 0, "box": box}], window=WINDOW)[0]
        np.testing.assert_array_equal(mask, expected)

    return session, still_serving


def stack_for(array, direction, model, cache) -> SliceStack:
    return SliceStack(array, direction, 2, WINDOW, model, cache)


def assert_same_masks(masks: np.ndarray, probabilities: np.ndarray) -> None:
    """Masks equal to the engine's probabilities > 0.5, except where a batch's rounding could tip a pixel at 0.5."""
    probabilities = np.asarray(probabilities)
    differ = np.asarray(masks, bool) != (probabilities > 0.5)
    assert not (differ & (np.abs(probabilities - 0.5) > 1e-3)).any()
    assert differ.sum() <= 3


# ------------------------------------------------------------------ round trips


def test_round_trip_upload_prefetch_segment_annotate_delete_equals_the_engine(served, model):
    volume, labels, direction = ct_volume()
    sub, reference = np.ascontiguousarray(volume[ROUND_TRIP_SLICES]), labels[ROUND_TRIP_SLICES]
    client = served.client()
    session = client.upload_volume(sub, SPACING, (10.0, -20.0, 30.0), direction)
    assert session.shape == sub.shape and session.digest == volume_digest(sub)
    described = client.session_info(session)
    assert described["spacing"] == [0.7, 0.7, 5.0] and described["direction"] == direction.ravel().tolist()

    # Prefetch from slice 0 up; a box on slice 2 meanwhile is encoded before the prefetch gets there (priority),
    # and the prefetch then finds slice 2 cached instead of encoding it again.
    before = served.worker_stats()
    job = client.prefetch(session, window=WINDOW, around=0)
    right = {k: bounding_box(reference[k] == RIGHT_LUNG) for k in range(3)}
    left = {k: bounding_box(reference[k] == LEFT_LUNG) for k in range(3)}
    early = client.segment(session, [{"slice": 2, "box": right[2]}], window=WINDOW)
    progress: list[tuple[int, int]] = []
    status = client.wait(session, job, progress=lambda done, total: progress.append((done, total)))
    after = served.worker_stats()
    assert status["state"] == "done" and progress[-1] == (3, 3)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress)
    assert after["encoded_slices"] - before["encoded_slices"] == 3
    assert after["cache_reused_slices"] - before["cache_reused_slices"] >= 1

    # The server's embeddings are the model's.
    stack = stack_for(sub, direction, model, served.cache)
    cached = served.cache.get(stack.key(1))
    direct = model.embed([stack.view.to_view(stack.u8[1])])[0]
    np.testing.assert_allclose(cached, direct, atol=1e-4, rtol=1e-4)

    # segment == SliceStack.decode on the same embeddings, and masks a lung.
    embeddings, hits = stack.embeddings([0, 1, 2])
    assert hits == 3
    for boxes, label in ((right, RIGHT_LUNG), (left, LEFT_LUNG)):
        masks = client.segment(session, [{"slice": k, "box": boxes[k]} for k in range(3)], window=WINDOW)
        assert sorted(masks) == [0, 1, 2] and masks.notes == []
        probabilities = stack.decode(embeddings, np.array([boxes[k] for k in range(3)]))
        for k in range(3):
            assert masks[k].shape == (128, 128)
            assert_same_masks(masks[k], probabilities[k])
            assert dice(masks[k], reference[k] == label) > 0.7  # a lung, not noise (accuracy: the engine tests)
    np.testing.assert_array_equal(early[2], client.segment(session, [{"slice": 2, "box": right[2]}], window=WINDOW)[2])

    # Points with the box: the same decoder call with the points placed in the model's view of the slice
    # (found here by moving a one-pixel image into the view, independently of the server's arithmetic).
    rows, cols = np.nonzero(reference[1] == RIGHT_LUNG)
    points = [[int(cols[len(cols) // 2]), int(rows[len(rows) // 2])], [int(right[1][0]), int(right[1][1])]]
    with_points = client.segment(session, [{"slice": 1, "box": right[1], "points": points, "point_labels": [1, 0]}],
                                 window=WINDOW)[1]
    view_points = []
    for u, v in points:
        marker = np.zeros((128, 128), bool)
        marker[v, u] = True
        y, x = np.argwhere(stack.view.to_view(marker))[0]
        view_points.append([x, y])
    view_box = stack.view.box_to_view(right[1], (128, 128))
    probability = model.decode(embeddings[1:2], view_box[None], (128, 128), np.array([view_points]),
                               np.array([[1, 0]]))[0]
    assert_same_masks(with_points, stack.view.from_view(probability))

    # annotate == the engine's workflow (annotate_multiview: intensity fusion by default), placed back from the
    # changed block.
    document = {"axis": 2, "window": WINDOW, "segments": [
        {"name": "right lung", "label": 5, "boxes": [{"slice": 0, "box": right[0].tolist()},
                                                     {"slice": 2, "box": right[2].tolist()}]},
        {"name": "left lung", "label": 6, "boxes": [{"slice": 0, "box": left[0].tolist()},
                                                    {"slice": 2, "box": left[2].tolist()}]}]}
    seen: list = []
    offset, block, summary = client.annotate(session, document, progress=lambda d, t: seen.append((d, t)))
    expected = annotate_multiview(sub, direction, SPACING, parse_prompts(document, sub.shape[::-1]), model,
                                  served.cache)
    np.testing.assert_array_equal(placed(block, offset, sub.shape), expected.labels)
    assert summary["changed_slices"] == [0, 1, 2] and seen[-1][0] == seen[-1][1]
    assert [s["voxels"] for s in summary["segments"]] == [s.voxels for s in expected.segments]
    assert block.shape[0] == 3 and block.shape[1:] != (128, 128)  # in-plane, only the labelled extent travels

    # With an existing labelmap and a locked slice: slice 1 keeps the hand edit.
    existing = expected.labels.copy()
    existing[1][existing[1] == 5] = 0
    existing[1, 40:60, 20:40] = 5
    document["segments"][0]["locked_slices"] = [1]
    offset, block, _ = client.annotate(session, document, existing=existing)
    again = annotate_multiview(sub, direction, SPACING, parse_prompts(document, sub.shape[::-1]), model, served.cache,
                               existing=existing)
    result = existing.copy()
    result[offset[2]:offset[2] + block.shape[0]] = 0
    result = np.maximum(result, placed(block, offset, sub.shape))
    np.testing.assert_array_equal(result, again.labels)
    np.testing.assert_array_equal(result[1] == 5, existing[1] == 5)

    # The same voxels uploaded again reuse the cached embeddings; delete forgets a session.
    twin = client.upload_volume(sub, direction=direction)
    assert twin.id != session.id and twin.digest == session.digest
    encoded = served.worker_stats()["encoded_slices"]
    client.segment(twin, [{"slice": 1, "box": right[1]}], window=WINDOW)
    assert served.worker_stats()["encoded_slices"] == encoded
    client.delete(session)
    with pytest.raises(client_module.UnknownSession, match="unknown session"):
        client.segment(session, [{"slice": 1, "box": right[1]}], window=WINDOW)
    assert stack.key(1) in served.cache  # the twin still holds this volume
    client.delete(twin)
    assert stack.key(1) not in served.cache  # the last session of a volume takes its embeddings along


def placed(block: np.ndarray, offset, shape) -> np.ndarray:
    """A (k, j, i) block at IJK offset (i0, j0, k0) inside a zero volume of ``shape``."""
    out = np.zeros(shape, dtype=np.uint16)
    i0, j0, k0 = offset
    k, j, i = block.shape
    out[k0:k0 + k, j0:j0 + j, i0:i0 + i] = block
    return out


def test_rgb_volume_with_a_channel_axis_is_accepted_and_segmented(served, model):
    from skimage import data

    rgb = np.ascontiguousarray(data.astronaut()[::4, ::4])[np.newaxis]  # (1, 128, 128, 3) uint8
    client = served.client()
    session = client.upload_volume(rgb)
    assert session.shape == (1, 128, 128, 3)
    box = [40, 5, 95, 70]  # the head, in (u = column, v = row)
    mask = client.segment(session, [{"slice": 0, "box": box}], window="auto")[0]
    stack = SliceStack(rgb, np.eye(3), 2, "auto", model, EmbeddingCache())
    embedding, hits = stack.embeddings([0])
    assert hits == 0 and stack.preprocessing.startswith("rgb")  # channels as they are: no window
    assert_same_masks(mask, stack.decode(embedding, np.array([box]))[0])
    assert 500 < mask.sum() < 0.4 * 128 * 128
    with pytest.raises(ValueError, match=r"\(k, j, i, 3\)"):
        client.upload_volume(np.zeros((1, 8, 8, 4), np.uint8))
    client.delete(session)


# ------------------------------------------------------------------ many clients


def test_eight_clients_twenty_segments_each_get_their_own_answers(served, model):
    """Eight sessions, each a different pair of CT slices; 8 threads x 20 boxes; every mask equals the engine's."""
    volume, labels, direction = ct_volume()
    unique = list(UNIQUE_SLICES)
    volumes = [np.ascontiguousarray(volume[[unique[s], unique[(s + 1) % 8]]]) for s in range(8)]
    references = [labels[[unique[s], unique[(s + 1) % 8]]] for s in range(8)]
    clients = [served.client(token=(ALICE, BOB)[s % 2]) for s in range(8)]
    sessions = [clients[s].upload_volume(volumes[s], direction=direction) for s in range(8)]
    # The server embeds slice 0 of every session (eight images, one each); slice 1 of session s shows the
    # image of session s + 1's slice 0, so its embedding is copied under session s's key, not recomputed.
    jobs = [clients[s].prefetch(sessions[s], window=WINDOW, first=0, last=0) for s in range(8)]
    for s in range(8):
        assert clients[s].wait(sessions[s], jobs[s])["state"] == "done"
    stacks = [stack_for(volumes[s], direction, model, served.cache) for s in range(8)]
    for s in range(8):
        served.cache.put(stacks[s].key(1), served.cache.get(stacks[(s + 1) % 8].key(0)))

    boxes = [[[bounding_box(references[s][k] == lab) for lab in (RIGHT_LUNG, LEFT_LUNG)] for k in (0, 1)]
             for s in range(8)]
    expected = []
    for s in range(8):
        embeddings, hits = stacks[s].embeddings([0, 0, 1, 1])
        assert hits == 4
        probabilities = stacks[s].decode(embeddings, np.array([b for pair in boxes[s] for b in pair]))
        expected.append(probabilities.reshape(2, 2, 128, 128))
    for s in range(8):  # different answers per session, so that a mix-up would show
        for other in range(s):
            assert (expected[s][0, 0] > 0.5).tolist() != (expected[other][0, 0] > 0.5).tolist()

    answers: list = [[] for _ in range(8)]
    errors: list = []
    barrier = threading.Barrier(8)

    def run(s: int) -> None:
        try:
            barrier.wait()
            for n in range(20):
                k, lung = n % 2, (n // 2) % 2
                masks = clients[s].segment(sessions[s], [{"slice": k, "box": boxes[s][k][lung]}], window=WINDOW)
                answers[s].append((k, lung, masks[k]))
        except Exception as err:  # noqa: BLE001 - reported below, with the session
            errors.append((s, err))

    before = served.worker_stats()
    threads = [threading.Thread(target=run, args=(s,)) for s in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=900)
    after = served.worker_stats()
    assert not errors, errors
    for s in range(8):
        assert len(answers[s]) == 20
        for k, lung, mask in answers[s]:
            assert_same_masks(mask, expected[s][k, lung])
    assert after["encoded_slices"] == before["encoded_slices"]  # all from the cache
    assert after["decoded_prompts"] - before["decoded_prompts"] >= 160
    print(f"\n160 concurrent segment calls took {after['decode_calls'] - before['decode_calls']} decoder calls "
          f"(largest batch so far {after['largest_decode_batch']})")
    for s in range(8):
        clients[s].delete(sessions[s])


class _FirstDecodeWaits:
    """The real model, except that its first decode waits for ``release``: the worker's decoder is busy."""

    def __init__(self, model):
        self.model, self.entered, self.release = model, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def decode(self, *args, **kwargs):
        if not self.entered.is_set():
            self.entered.set()
            self.release.wait(timeout=60)
        return self.model.decode(*args, **kwargs)


def test_the_worker_batches_decodes_that_wait_together(model, served, probe):
    """Decode requests that queue while the worker's decoder is busy leave as one batch, each with its own answer."""
    volume, _, direction = ct_volume()
    key = stack_for(volume[PROBE_SLICE:PROBE_SLICE + 1], direction, model, served.cache).key(0)
    embeddings = np.stack([served.cache.get(key)] * 4)
    waits = _FirstDecodeWaits(model)
    worker = ModelWorker(waits, EmbeddingCache())
    worker.start()
    boxes = np.array([[10, 10, 60, 60], [20, 30, 90, 100], [5, 5, 120, 120], [40, 40, 80, 90]], float)
    try:
        first = worker.decode(embeddings[:1], boxes[:1], (128, 128))
        assert waits.entered.wait(timeout=60)
        futures = [worker.decode(embeddings[n:n + 1], boxes[n:n + 1], (128, 128)) for n in range(4)]
        waits.release.set()
        first.result(timeout=600)
        results = [f.result(timeout=600)[0] for f in futures]
        stats = worker.stats()
    finally:
        worker.stop()
    assert stats["decode_calls"] == 2 and stats["largest_decode_batch"] == 4
    for n in range(4):
        assert_same_masks(results[n] > 0.5, model.decode(embeddings[n:n + 1], boxes[n:n + 1], (128, 128))[0])


# ------------------------------------------------------------------ bad requests


def _upload_body(array: np.ndarray, **meta) -> bytes:
    return wire.encode({"array": meta}, array)


def _raw_envelope(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    return protocol.MAGIC + len(text).to_bytes(4, "big") + text + payload


def _bomb() -> bytes:
    compressor = zlib.compressobj(9)
    zeros = bytes(16 << 20)
    return b"".join(compressor.compress(zeros) for _ in range(16)) + compressor.flush()  # 256 MiB of zeros


def _bad_requests(session):
    ct = np.zeros((2, 16, 16), np.int16)
    good = _upload_body(ct)
    key = {protocol.SESSION_KEY_HEADER: session.key}
    envelope = {"Content-Type": protocol.ENVELOPE_TYPE}
    segment = f"/sessions/{session.id}/segment"
    box = {"slice": 0, "box": [10, 10, 60, 60]}
    return [
        ("truncated body", "POST", "/sessions", good[:len(good) - 10], envelope, 400, "truncated"),
        ("wrong dtype", "POST", "/sessions", _upload_body(np.zeros((1, 4, 4), np.int64)), envelope, 415, "int64"),
        ("declared shape != data", "POST", "/sessions",
         _raw_envelope({"array": {"dtype": "int16", "shape": [3, 16, 16]}}, zlib.compress(ct.tobytes())),
         envelope, 400, "declare"),
        ("enormous declared shape", "POST", "/sessions",
         _raw_envelope({"array": {"dtype": "uint8", "shape": [50000, 50000, 50000]}}, b""), envelope, 413, "voxels"),
        ("compression bomb", "POST", "/sessions",
         _raw_envelope({"array": {"dtype": "uint8", "shape": [1, 16, 16]}}, _bomb()), envelope, 400, "more than"),
        ("four channels", "POST", "/sessions", _upload_body(np.zeros((1, 4, 4, 4), np.uint8)), envelope, 400,
         "(k, j, i, 3)"),
        ("NaN voxels", "POST", "/sessions", _upload_body(np.full((1, 4, 4), np.nan, np.float32)), envelope, 422,
         "NaN"),
        ("singular direction", "POST", "/sessions", _upload_body(ct, direction=[0] * 9), envelope, 400, "singular"),
        ("JSON instead of an envelope", "POST", "/sessions", b"{}", {"Content-Type": "application/json"}, 415,
         protocol.ENVELOPE_TYPE),
        ("out-of-range slice", "POST", segment, json.dumps({"boxes": [{"slice": 7, "box": [1, 1, 9, 9]}]}), key,
         422, "slice 7 is out of range 0..0"),
        ("reversed box", "POST", segment, json.dumps({"boxes": [{"slice": 0, "box": [60, 60, 10, 10]}]}), key,
         422, "reversed"),
        ("box outside the slice", "POST", segment, json.dumps({"boxes": [{"slice": 0, "box": [200, 200, 300, 300]}]}),
         key, 422, "outside"),
        ("two boxes on one slice", "POST", segment, json.dumps({"boxes": [box, box]}), key, 422, "one box per slice"),
        ("unknown field", "POST", segment, json.dumps({"boxes": [box], "model": "x"}), key, 422, "unknown key"),
        ("bad window", "POST", segment, json.dumps({"boxes": [box], "window": "bone"}), key, 422, "unknown window"),
        ("not JSON", "POST", segment, b"boxes please", key, 400, "not valid JSON"),
        ("a point outside", "POST", segment, json.dumps({"boxes": [{**box, "points": [[500, 1]]}]}), key, 422,
         "point lies outside"),
        ("bad prompt document", "POST", f"/sessions/{session.id}/annotate",
         json.dumps({"document": {"segments": [{"name": "liver", "boxes": [{"slice": 3, "box": [1, 1, 5, 5]}]}]}}),
         key, 422, "segment 'liver'"),
        ("existing of another shape", "POST", f"/sessions/{session.id}/annotate",
         wire.encode({"document": {"segments": [{"boxes": [box]}]}}, np.zeros((2, 128, 128), np.uint16)),
         {**key, **envelope}, 422, "existing segmentation has shape"),
        ("existing as floats", "POST", f"/sessions/{session.id}/annotate",
         wire.encode({"document": {"segments": [{"boxes": [box]}]}}, np.zeros((1, 128, 128), np.float32)),
         {**key, **envelope}, 415, "float32"),
        ("bad option", "POST", f"/sessions/{session.id}/annotate",
         json.dumps({"document": {"segments": [{"boxes": [box]}]}, "options": {"propagate": "yes"}}), key, 422,
         "option 'propagate'"),
        ("prefetch past the end", "POST", f"/sessions/{session.id}/prefetch", json.dumps({"last": 5}), key, 422,
         "last 5 is out of range"),
        ("unknown session", "POST", "/sessions/nonexistent/segment", json.dumps({"boxes": [box]}), key, 404,
         "unknown session"),
        ("no session key", "POST", segment, json.dumps({"boxes": [box]}), {}, 404, "unknown session"),
        ("wrong session key", "POST", segment, json.dumps({"boxes": [box]}), {protocol.SESSION_KEY_HEADER: "guess"},
         404, "unknown session"),
        ("unknown job", "GET", f"/sessions/{session.id}/jobs/nope", b"", key, 404, "unknown job"),
        ("other API version", "GET", "/info", b"", {protocol.API_VERSION_HEADER: "2"}, 409, "speaks MedSAM API 1"),
        ("declared body too long", "POST", "/sessions", b"", {**envelope, "Content-Length": str(3 << 20)}, 413,
         "at most"),
    ]


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_serving(served, probe):
    session, still_serving = probe
    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=120) as http:
        for name, method, path, body, headers, status, message in _bad_requests(session):
            if "Content-Length" in headers:  # httpx sets its own; this one lies
                answer = _raw_http(served.url, method, path, headers)
            else:
                answer = http.request(method, path, content=body, headers=headers)
            assert answer.status_code == status, (name, answer.status_code, answer.text[:300])
            assert message in answer.json()["error"], (name, answer.json())
            still_serving()


def _raw_http(url: str, method: str, path: str, headers: dict):
    """Send only a request head (no body) over a socket and read the answer: for headers httpx will not send."""
    host, port = url.removeprefix("http://").split(":")
    head = [f"{method} {path} HTTP/1.1", f"Host: {host}", f"Authorization: Bearer {ALICE}", "Connection: close",
            *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall("\r\n".join(head).encode())
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    status_line, _, rest = received.partition(b"\r\n")
    body = rest.split(b"\r\n\r\n", 1)[1]
    return httpx.Response(int(status_line.split()[1]), content=body)


def test_an_oversized_upload_is_refused_before_and_by_the_server(served, probe):
    session, still_serving = probe
    noise = np.random.default_rng(3).integers(0, 2**15, (80, 128, 128), dtype=np.int16)  # 2.5 MiB, incompressible
    with pytest.raises(client_module.RequestTooLarge, match="--max-upload-mb"):
        served.client().upload_volume(noise)
    body = _upload_body(noise)
    assert len(body) > 2 << 20

    def chunks():  # no Content-Length: the server counts as it reads
        for start in range(0, len(body), 1 << 16):
            yield body[start:start + (1 << 16)]

    with httpx.Client(base_url=served.url, headers={"Authorization": f"Bearer {ALICE}"}, timeout=120) as http:
        for content in (body, chunks()):  # with a Content-Length (refused unread), then chunked (refused at 2 MiB)
            answer = http.post("/sessions", content=content, headers={"Content-Type": protocol.ENVELOPE_TYPE})
            assert answer.status_code == 413 and "max-upload-mb" in answer.json()["error"]
    still_serving()


def test_tokens_are_required_and_sessions_are_their_owners(served, probe):
    session, still_serving = probe
    with pytest.raises(client_module.AuthError, match="needs a token"):
        MedSAMClient(served.url).info()
    with pytest.raises(client_module.AuthError, match="wrong token"):
        MedSAMClient(served.url, token="x" * 30).info()
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}  # liveness needs no token
    answer = httpx.get(served.url + "/info")
    assert answer.status_code == 401 and answer.headers["WWW-Authenticate"] == "Bearer"
    # Bob holds Alice's session id and even its key: still an unknown session to him.
    with pytest.raises(client_module.UnknownSession):
        served.client(BOB).segment(session, [{"slice": 0, "box": [10, 10, 60, 60]}], window=WINDOW)
    stolen = client_module.Session(session.id, "not-the-key", session.shape, session.digest)
    with pytest.raises(client_module.UnknownSession):
        served.client(ALICE).session_info(stolen)
    still_serving()


def test_a_version_mismatch_is_refused_clearly(served, monkeypatch):
    monkeypatch.setattr(client_module, "API_VERSION", 99)
    with pytest.raises(client_module.VersionMismatch, match="speaks MedSAM API 1"):
        served.client().check_compatible()


def test_without_tokens_the_session_key_owns_the_session(model):
    """Auth off (loopback): the key returned at upload is what proves ownership."""
    with running_server(Settings(max_upload_mb=1, session_idle_seconds=3600), model=model) as (url, app):
        client = MedSAMClient(url)
        assert client.check_compatible()["auth"] is False
        session = client.upload_volume(np.arange(2 * 8 * 8, dtype=np.int16).reshape(2, 8, 8))
        assert client.session_info(session)["shape"] == [2, 8, 8]
        for key in ("", "x", session.key[:-1]):
            with pytest.raises(client_module.UnknownSession):
                client.session_info(client_module.Session(session.id, key, session.shape, session.digest))
        client.delete(session)
        with pytest.raises(client_module.UnknownSession):
            client.session_info(session)
        # A 2D image is a volume of one slice; a session idle past the limit is gone.
        flat = client.upload_volume(np.arange(6 * 7, dtype=np.uint8).reshape(6, 7))
        assert flat.shape == (1, 6, 7)
        assert app.state.medsam.sessions.expire(time.monotonic() + 2 * 3600) == 1
        with pytest.raises(client_module.UnknownSession, match="expired"):
            client.session_info(flat)


# ------------------------------------------------------------------ property test


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(-1e3, 1e3) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
_boxes = st.lists(st.fixed_dictionaries(
    {"slice": st.integers(-1, 2), "box": st.lists(st.floats(-20, 200), max_size=5)},
    optional={"points": st.lists(st.lists(st.floats(-5, 130), max_size=3), max_size=3),
              "point_labels": st.lists(st.integers(-1, 2), max_size=3)}), max_size=3)
_structured = st.one_of(
    st.fixed_dictionaries({"boxes": _boxes}, optional={"axis": st.just(2), "window": st.just(WINDOW),
                                                        "orientation": st.sampled_from(["ras", "x"])}),
    st.fixed_dictionaries({"document": st.fixed_dictionaries(
        {"window": st.just(WINDOW), "segments": st.lists(st.fixed_dictionaries({"boxes": _boxes}), max_size=2)}),
        "options": st.dictionaries(st.sampled_from(["propagate", "fill_holes", "overwrite", "batch_size", "x"]),
                                   st.integers(-1, 3) | st.booleans(), max_size=3)}),
    st.fixed_dictionaries({}, optional={"window": st.just(WINDOW), "first": st.integers(-1, 2),
                                        "last": st.integers(-1, 2), "around": st.integers(-1, 2)}),
)
_bodies = st.one_of(
    st.binary(max_size=200),
    _json_values.map(lambda v: json.dumps(v).encode()),
    _structured.map(lambda v: json.dumps(v).encode()),
    st.builds(lambda h, p: _raw_envelope(h, p), st.dictionaries(st.sampled_from(["array", "document", "x"]),
                                                                _json_values, max_size=2), st.binary(max_size=64)),
    st.builds(lambda dtype, shape: _raw_envelope({"array": {"dtype": dtype, "shape": shape}},
                                                 zlib.compress(bytes(int(np.prod(shape or [0])) * 2))),
              st.sampled_from(["uint8", "uint16", "int64"]), st.lists(st.integers(0, 9), max_size=4)),
)
_printable = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                                  HealthCheck.function_scoped_fixture])
@given(route=st.sampled_from([
    ("GET", "/health"), ("GET", "/info"), ("POST", "/sessions"), ("GET", "/sessions/{sid}"),
    ("DELETE", "/sessions/{other}"), ("POST", "/sessions/{sid}/segment"), ("POST", "/sessions/{sid}/prefetch"),
    ("POST", "/sessions/{sid}/annotate"), ("GET", "/sessions/{sid}/jobs/{jid}"),
    ("GET", "/sessions/{sid}/jobs/{jid}/result"), ("DELETE", "/sessions/{sid}/jobs/{jid}"),
    ("GET", "/sessions/{sid}/jobs/{jid}?wait={text}"), ("PUT", "/sessions/{sid}"), ("POST", "/{text}"),
]), body=_bodies,
    # Mostly valid credentials, so that most bodies get past the door to the parsers behind it.
    auth=st.sampled_from([f"Bearer {ALICE}"] * 6 + [f"Bearer {BOB}", "Bearer wrong", "", "Basic eA=="]),
    key=st.one_of(st.just("valid"), st.just("valid"), st.none(), _printable),
    content_type=st.one_of(st.sampled_from([protocol.ENVELOPE_TYPE, "application/json"]), st.none(), _printable),
    api=st.one_of(st.none(), st.just("1"), _printable), sid=st.one_of(st.just("valid"), st.just("valid"), _printable),
    text=_printable)
def test_random_requests_at_every_route_never_get_a_5xx(served, probe, route, body, auth, key, content_type, api,
                                                        sid, text):
    session, _ = probe
    method, template = route
    path = template.format(sid=session.id if sid == "valid" else sid.replace("/", "_"), other=text.replace("/", "_"),
                       jid=_probe_job(served, session), text=text.replace("/", "_").replace("?", "_"))
    headers = {"Authorization": auth}
    if key is not None:
        headers[protocol.SESSION_KEY_HEADER] = session.key if key == "valid" else key
    if content_type is not None:
        headers["Content-Type"] = content_type
    if api is not None:
        headers[protocol.API_VERSION_HEADER] = api
    try:
        answer = httpx.request(method, served.url + path, content=body if method != "GET" else None,
                               headers=headers, timeout=300)
    except (httpx.InvalidURL, httpx.LocalProtocolError):
        return  # not a request that HTTP lets a client send (e.g. a blank header value)
    event(f"{method} {template.split('?')[0]} -> {answer.status_code}")  # see --hypothesis-show-statistics
    assert answer.status_code < 500, (method, path, answer.status_code, answer.text[:300])
    if answer.status_code >= 400:
        assert answer.json()["error"]


_probe_jobs: dict = {}


def _probe_job(served, session) -> str:
    """A real (finished) job id of the probe session, so job routes are reached past the lookup."""
    if session.id not in _probe_jobs:
        client = served.client()
        _probe_jobs[session.id] = client.prefetch(session, window=WINDOW)
        client.wait(session, _probe_jobs[session.id])
    return _probe_jobs[session.id]


def test_after_the_random_requests_the_server_still_serves_and_no_work_is_left_running(served, probe):
    session, still_serving = probe
    client = served.client()
    for job in client.session_info(session)["jobs"]:
        if job["state"] in ("queued", "running"):
            client.cancel(session, job["job"])
    still_serving()


# ------------------------------------------------------------------ killing, cancelling, refusing


def test_cancelling_an_annotate_stops_it_and_returns_nothing(served):
    volume, labels, direction = ct_volume()
    sub = np.ascontiguousarray(volume[15:18])
    client = served.client()
    session = client.upload_volume(sub, direction=direction)
    box = bounding_box(labels[16] == RIGHT_LUNG).tolist()
    document = {"window": WINDOW, "segments": [{"boxes": [{"slice": 0, "box": box}, {"slice": 2, "box": box}]}]}
    cancel = threading.Event()
    calls = []

    def progress(done, total):
        calls.append((done, total))
        cancel.set()  # cancel as soon as the job reports anything

    with pytest.raises(client_module.Cancelled, match="nothing was applied"):
        client.annotate(session, document, progress=progress, cancel=cancel)
    jobs = client.session_info(session)["jobs"]
    for _ in range(600):
        if jobs[0]["state"] not in ("queued", "running"):
            break
        time.sleep(0.5)
        jobs = client.session_info(session)["jobs"]
    assert [job["state"] for job in jobs] == ["cancelled"] and calls
    assert jobs[0]["done"] < jobs[0]["total"] or jobs[0]["phase"] == "embedding"
    client.delete(session)


def wait_until_serving(client: MedSAMClient, process) -> None:
    """Until a ``serve_subprocess`` answers (the model loads before the port opens); fails if it died."""
    for _ in range(600):
        try:
            client.check_compatible()
            return
        except client_module.ServerNotRunning:
            assert process.poll() is None, process.stdout.read().decode()
            time.sleep(0.5)


def test_killing_the_server_during_annotate_gives_a_clear_error_and_no_result(tmp_path):
    volume, labels, direction = ct_volume()
    port = free_port()
    process = serve_subprocess(port, env={"OMP_NUM_THREADS": "1", "MEDSAM_TOKEN": ""})
    try:
        client = MedSAMClient(f"http://127.0.0.1:{port}", timeout=120, retries=2, backoff=0.25)
        wait_until_serving(client, process)
        session = client.upload_volume(np.ascontiguousarray(volume[24:27]), direction=direction)
        box = bounding_box(labels[25] == LEFT_LUNG).tolist()
        document = {"window": WINDOW, "segments": [{"boxes": [{"slice": 0, "box": box}, {"slice": 2, "box": box}]}]}
        results = []

        def kill_on_first_progress(done, total):
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)

        with pytest.raises(client_module.ServerNotRunning, match="nothing was applied"):
            results.append(client.annotate(session, document, progress=kill_on_first_progress))
        assert results == []
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        process.stdout.close()


def test_serve_exits_by_itself_once_the_watched_process_is_gone():
    """``--watch-pid``: a real child process stands in for Slicer; killed and left unreaped (a zombie, as a
    crashed parent may stay), the server notices and shuts down cleanly within a few seconds."""
    watched = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    port = free_port()
    process = serve_subprocess(port, "--watch-pid", str(watched.pid), env={"OMP_NUM_THREADS": "1",
                                                                          "MEDSAM_TOKEN": ""})
    try:
        client = MedSAMClient(f"http://127.0.0.1:{port}", timeout=30)
        wait_until_serving(client, process)
        time.sleep(1.5)
        assert process.poll() is None  # alive while the watched process is
        os.kill(watched.pid, signal.SIGKILL)  # not reaped yet: a zombie until watched.wait() below
        killed = time.monotonic()
        code = process.wait(timeout=30)
        assert time.monotonic() - killed < 5.0
        output = process.stdout.read().decode()
        assert code == 0 and f"process {watched.pid} has ended; shutting down" in output
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)
        process.stdout.close()
        watched.kill()
        watched.wait(timeout=30)


def test_the_pid_watcher_tells_a_zombie_from_a_live_process_with_proc_and_with_ps():
    """Where there is no /proc (macOS) ``ps`` gives the state: a killed, unreaped child is not alive either way."""
    from medsam_server.commands import serve

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert serve.process_alive(child.pid) is True
        assert serve._ps_state(child.pid) in ("S", "R")
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while serve._ps_state(child.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert serve._ps_state(child.pid) == "Z"  # killed, not yet reaped
        assert serve.process_alive(child.pid) is False
    finally:
        child.kill()
        child.wait(timeout=30)
    assert serve._ps_state(child.pid) == ""  # reaped: ps knows no such process
    assert serve.process_alive(child.pid) is False


def test_serve_refuses_to_watch_a_process_that_does_not_exist(capsys):
    assert cli.main(["serve", "--watch-pid", str(2**22 + 12345)]) == 2
    assert "--watch-pid 4206649: no such process" in capsys.readouterr().err


def test_a_non_loopback_bind_without_a_token_is_refused(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("MEDSAM_TOKEN", raising=False)
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 2
    assert "refusing to listen on 0.0.0.0 without a token" in capsys.readouterr().err
    monkeypatch.setenv("MEDSAM_TOKEN", "short")
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 2
    assert "at least 16" in capsys.readouterr().err
    monkeypatch.delenv("MEDSAM_TOKEN")
    missing = tmp_path / "none"
    assert cli.main(["serve", "--host", "10.1.2.3", "--token-file", str(missing)]) == 2
    assert "cannot read the token file" in capsys.readouterr().err
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# one per user\n{ALICE}\n\n{BOB}\n")
    os.chmod(token_file, 0o600)
    from medsam_server.commands.serve import read_tokens

    assert read_tokens(str(token_file)) == (ALICE, BOB)
    Settings(host="0.0.0.0", tokens=read_tokens(str(token_file))).validate()  # with tokens it may bind anywhere
    Settings(host="::1").validate()
    with pytest.raises(InputError, match="refusing to listen on myhost.example without a token"):
        Settings(host="myhost.example").validate()
