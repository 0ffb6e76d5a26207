"""HTTP client of the MedSAM server (``medsam serve``): stdlib (urllib) + numpy only.

It runs inside Slicer's Python, where nothing else is installed, and knows nothing
of torch. Typical use::

    client = MedSAMClient("http://127.0.0.1:8765", token=token)
    client.check_compatible()                       # VersionMismatch if the server speaks another API
    session = client.upload_volume(array, spacing, origin, direction)   # array (k, j, i) or (k, j, i, 3)
    job = client.prefetch(session, axis=2, window="ct-lung", around=40)  # embeddings in the background
    masks = client.segment(session, [{"slice": 40, "box": [10, 20, 60, 90]}], axis=2, window="ct-lung")
    offset, labels, summary = client.annotate(session, document, progress=print, cancel=event)
    client.delete(session)

Frames: volumes are numpy (k, j, i[, 3]); spacing (i, j, k) mm; origin and direction
LPS as SimpleITK reports them (direction 3x3, columns the i, j, k axes); boxes
``[u_min, v_min, u_max, v_max]`` in slice voxels as in the prompt document (for
axis 2, u = i and v = j); a mask is (rows = v, cols = u); an annotate block is
(k, j, i) at IJK offset (i0, j0, k0).

Errors a user can act on, all :class:`MedSAMClientError` (a RuntimeError):
:class:`ServerNotRunning` (refused, lost or silent connection), :class:`AuthError`,
:class:`VersionMismatch`, :class:`RequestTooLarge`, :class:`UnknownSession` (expired:
upload again), :class:`SessionLost` (the server lost it: upload again), :class:`ServerBusy`
(429, the server's message as is), :class:`Cancelled`, and :class:`ServerError` with the
server's message. A failed or cancelled ``annotate`` returns nothing, so a caller never applies
half a result, and any failure after its job was created cancels that job on the server.

Timeouts: every connection gets ``transport.CONNECT_TIMEOUT`` s to open; control calls (health, info,
session, delete, cancel, job status) ``CONTROL_TIMEOUT`` s to answer, a long poll its wait +
``CONTROL_TIMEOUT``, an upload ``UPLOAD_BASE_TIMEOUT`` + its size at ``UPLOAD_MIN_RATE``, a segment
``SEGMENT_BASE_TIMEOUT`` + ``SEGMENT_SLICE_TIMEOUT`` per slice it names (each may wait for the encoder),
at most the client's ``timeout``, and an annotate job's finished result ``RESULT_TIMEOUT``. A read
timeout is the longest silence allowed, so a large answer that keeps arriving never times out.

The binary envelope is ``envelope`` (the Lib's copy of ``medsam_server.wire``); the errors live in
``errors``; routes and constants come from ``protocol``, the client's copy of the server's.
"""

from __future__ import annotations

import json
import math
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import protocol, transport
from .envelope import decode_envelope, encode_envelope, wire_array
from .errors import (
    AuthError,
    Cancelled,
    MedSAMClientError,
    RequestTooLarge,
    ServerBusy,
    ServerError,
    ServerNotRunning,
    SessionLost,
    UnknownSession,
    VersionMismatch,
)
from .protocol import API_VERSION, API_VERSION_HEADER, ENVELOPE_TYPE, LABEL_DTYPES, SESSION_KEY_HEADER

__all__ = [  # the client and the errors it raises (they live in ``errors``; callers take them from here)
    "AuthError", "Cancelled", "MedSAMClient", "MedSAMClientError", "Masks", "RequestTooLarge", "ServerBusy",
    "ServerError", "ServerNotRunning", "Session", "SessionLost", "UnknownSession", "VersionMismatch",
    "decode_envelope", "encode_envelope", "upload_timeout", "wire_array",
]

DEFAULT_URL = "http://127.0.0.1:8765"
CONTROL_TIMEOUT = 10.0  # seconds a control call (no model work) may take to answer
CANCEL_TIMEOUT = 5.0  # a cancel, often sent on an error path, must not hold up the error
UPLOAD_BASE_TIMEOUT = 30.0
UPLOAD_MIN_RATE = 5 << 20  # bytes/s an upload is allowed at the slowest, on top of the base
SEGMENT_BASE_TIMEOUT = 30.0  # a segment on cached slices answers in milliseconds; this covers a busy queue
SEGMENT_SLICE_TIMEOUT = 15.0  # per slice a segment names: one encoder run (MedSAM ViT-B on a CPU: seconds)
RESULT_TIMEOUT = 30.0  # an annotate job's result is ready when it is fetched: no model work left


@dataclass(frozen=True)
class Session:
    """Handle of an uploaded volume; ``key`` is the secret that proves it is ours."""

    id: str
    key: str
    shape: tuple  # (k, j, i) or (k, j, i, 3)
    digest: str
    replica: str = ""  # the Ray Serve replica that holds it ("" for a single-process server)


class Masks(dict):
    """``{slice index: (rows, cols) bool mask}`` of a segment call; ``notes`` has the server's remarks."""

    def __init__(self, masks=(), notes=()):
        super().__init__(masks)
        self.notes = list(notes)


# ------------------------------------------------------------------ the client


class MedSAMClient:
    """Talks to one server. Thread-safe: one client may serve a UI thread and a worker thread.

    ``timeout`` caps how long a ``segment`` may wait (on uncached slices it waits for
    the encoder; see ``segment_timeout``); ``retries`` reconnect attempts, with doubling
    ``backoff`` seconds, are made while the connection is *refused* (a server that is
    starting); a request that was sent is never repeated.
    """

    def __init__(self, url: str = DEFAULT_URL, token: str | None = None, timeout: float = 300.0,
                 retries: int = 3, backoff: float = 0.25, poll_interval: float = 0.5):
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"the server URL must look like http://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.token = token or None
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.poll_interval = poll_interval
        self._opener = transport.opener(parsed.hostname)
        self._info: dict | None = None
        self._lock = threading.Lock()

    # -------------------------------------------------------------- server

    def health(self) -> dict:
        return self._json("GET", protocol.ROUTE_HEALTH, what="the health check", timeout=CONTROL_TIMEOUT)

    def info(self) -> dict:
        """Versions, model, device, cache and worker statistics, and the server's limits."""
        info = self._json("GET", protocol.ROUTE_INFO, what="the info request", timeout=CONTROL_TIMEOUT)
        with self._lock:
            self._info = info
        return info

    def check_compatible(self) -> dict:
        """``info()``, or VersionMismatch when the server speaks another API version."""
        info = self.info()
        version = info.get("api_version")
        if version != API_VERSION:
            newer = "the Slicer extension" if isinstance(version, int) and version > API_VERSION else "the server"
            raise VersionMismatch(f"the MedSAM server at {self.url} speaks API version {version}, this client "
                                  f"version {API_VERSION}: update {newer}")
        return info

    # -------------------------------------------------------------- sessions

    def upload_volume(self, array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                      origin: Sequence[float] = (0.0, 0.0, 0.0), direction: Any = None,
                      cancel: threading.Event | None = None) -> Session:
        """Send a volume once; returns the session that later calls name.

        ``array`` is (k, j, i) or (k, j, i, 3); a 2D (rows, cols) image is sent as one
        slice. ``direction`` is 3x3 (or 9 numbers, row-major) LPS, columns the i, j, k
        axes; it decides the in-plane orientation in which slices reach the model.
        Sending the same voxels again reuses the embeddings the server still caches.
        Setting ``cancel`` stops the upload between two blocks of the body (Cancelled).
        """
        array = np.asarray(array)
        if array.ndim == 2:
            array = array[np.newaxis]
        if not (array.ndim == 3 or (array.ndim == 4 and array.shape[3] == 3)):
            raise ValueError(f"a volume is (k, j, i) or (k, j, i, 3), got shape {array.shape}")
        array = wire_array(array)
        direction = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
        meta = {"spacing": [float(v) for v in spacing], "origin": [float(v) for v in origin],
                "direction": [float(v) for v in direction.reshape(9)]}
        limits = self._limits()
        body = encode_envelope({"array": meta}, array)
        if limits and len(body) > limits.get("max_body_bytes", math.inf):
            raise RequestTooLarge(f"the volume compresses to {len(body) / 2**20:.1f} MiB; the server accepts at most "
                                  f"{limits['max_body_bytes'] / 2**20:.1f} MiB (medsam serve --max-upload-mb)")
        if limits and array.nbytes > limits.get("max_decompressed_bytes", math.inf):
            raise RequestTooLarge(f"the volume has {array.nbytes / 2**20:.1f} MiB of voxels; the server holds at most "
                                  f"{limits['max_decompressed_bytes'] / 2**20:.1f} MiB per volume")
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled before the upload; nothing was sent")
        _, headers, data = self._request("POST", protocol.ROUTE_SESSIONS, body, ENVELOPE_TYPE, None, "the upload",
                                         upload_timeout(len(body)), cancel)
        try:
            answer = json.loads(data.decode("utf-8"))
        except ValueError as err:
            raise ServerError(200, f"the server's answer to the upload is not JSON: {err}", "bad_answer") from None
        return Session(answer["session"], answer["key"], tuple(answer["shape"]), answer["digest"],
                       headers.get(protocol.REPLICA_HEADER, "") if headers is not None else "")

    def session_info(self, session: Session) -> dict:
        return self._json("GET", _path(protocol.ROUTE_SESSION, session), session=session, what="the session request",
                          timeout=CONTROL_TIMEOUT)

    def delete(self, session: Session) -> None:
        """Forget the volume on the server (and its cached embeddings); an unknown session is no error."""
        try:
            self._request("DELETE", _path(protocol.ROUTE_SESSION, session), session=session, what="the delete",
                          timeout=CONTROL_TIMEOUT)
        except UnknownSession:
            pass

    # -------------------------------------------------------------- prefetch

    def prefetch(self, session: Session, axis: int = 2, window: Any = "auto", first: int | None = None,
                 last: int | None = None, around: int | None = None, orientation: str | None = None) -> str:
        """Start embedding slices ``first..last`` (default all; nearest ``around`` first); returns a job id.

        Use the same ``axis``, ``window`` and ``orientation`` (None: the server's
        default) as later segment/annotate calls, or their slices will not be found in
        the cache.
        """
        request: dict = {"axis": axis, "window": _window(window)}
        if orientation is not None:
            request["orientation"] = orientation
        for name, value in (("first", first), ("last", last), ("around", around)):
            if value is not None:
                request[name] = int(value)
        return self._json("POST", _path(protocol.ROUTE_PREFETCH, session), _dumps(request), protocol.JSON_TYPE,
                          session=session, what="the prefetch", timeout=CONTROL_TIMEOUT)["job"]

    def job_status(self, session: Session, job: str, wait: float = 0.0) -> dict:
        """``{"state": queued|running|done|failed|cancelled, "done": n, "total": m, ...}`` of a job."""
        query = f"?wait={wait:.3f}" if wait > 0 else ""
        return self._json("GET", _path(protocol.ROUTE_JOB, session, job) + query,
                          session=session, what="the job status", timeout=CONTROL_TIMEOUT + max(0.0, wait))

    def cancel(self, session: Session, job: str) -> dict:
        """Stop a job; a short timeout, as it is also sent on error paths that must not hang on it."""
        return self._json("DELETE", _path(protocol.ROUTE_JOB, session, job),
                          session=session, what="the cancel", timeout=CANCEL_TIMEOUT)

    def _cancel_quietly(self, session: Session, job: str) -> None:
        """Best effort on an error path: the server stops the job; whatever goes wrong here is not the error."""
        try:
            self.cancel(session, job)
        except Exception:  # noqa: BLE001 - the caller re-raises the error that brought us here
            pass

    def wait(self, session: Session, job: str, progress: Callable[[int, int], Any] | None = None,
             cancel: threading.Event | None = None) -> dict:
        """Poll a job until it ends; ``progress(done, total)`` on each change. Raises if it failed or was cancelled."""
        last = None
        while True:
            if cancel is not None and cancel.is_set():
                self._cancel_quietly(session, job)  # best effort; the caller gets Cancelled either way
                raise Cancelled("cancelled; nothing was applied")
            status = self.job_status(session, job, wait=self.poll_interval)
            if progress is not None and (status["done"], status["total"]) != last:
                last = (status["done"], status["total"])
                progress(*last)
            if status["state"] == "done":
                return status
            if status["state"] == "cancelled":
                raise Cancelled(f"the server cancelled job {job}; nothing was applied")
            if status["state"] == "failed":
                status_code = status.get("error_status") or 500
                code = str(status.get("error_code") or "")
                error_class = {410: SessionLost, 404: UnknownSession}.get(status_code, ServerError)
                raise error_class(status_code, status.get("error") or "the job failed", code)

    # -------------------------------------------------------------- segmentation

    def segment(self, session: Session, boxes: Sequence[dict], axis: int = 2, window: Any = "auto",
                orientation: str | None = None) -> Masks:
        """Boxes on slices -> ``{slice: (rows, cols) bool mask}``; one box per slice.

        ``boxes`` items: ``{"slice": k, "box": [u_min, v_min, u_max, v_max]}`` plus
        optional ``"points": [[u, v], ...]`` and ``"point_labels": [1 or 0, ...]``.
        Cached slices answer in milliseconds; others wait for their embedding only.
        """
        request = {"axis": axis, "window": _window(window), "boxes": [_plain(b) for b in boxes]}
        if orientation is not None:  # None: the server's default, as annotate uses it
            request["orientation"] = orientation
        timeout = self.segment_timeout(len({str(b.get("slice")) for b in request["boxes"] if isinstance(b, dict)}))
        _, _, body = self._request("POST", _path(protocol.ROUTE_SEGMENT, session), _dumps(request), protocol.JSON_TYPE,
                                   session=session, what="the segment request", timeout=timeout)
        header, masks = self._decode(body, ("uint8",))
        return Masks({int(s): masks[n].astype(bool) for n, s in enumerate(header["slices"])}, header.get("notes", []))

    def threshold(self, session: Session, label: int, threshold: float | None = None,
                  slices: dict | None = None) -> tuple[dict, Masks]:
        """Move a segment's probability threshold over its last annotate run (no model call).

        ``slices``: ``{slice: threshold or None}`` per slice (None: back to the segment's). Returns the
        server's header (axis, label, slices, thresholds, ``review``) and the masks of the run's slices.
        """
        request: dict = {"label": int(label)}
        if threshold is not None:
            request["threshold"] = float(threshold)
        if slices:
            request["slices"] = {str(int(k)): (None if v is None else float(v)) for k, v in slices.items()}
        _, _, body = self._request("POST", _path(protocol.ROUTE_THRESHOLD, session), _dumps(request),
                                   protocol.JSON_TYPE, session=session, what="the threshold request")
        header, masks = self._decode(body, ("uint8",))
        return header, Masks({int(s): masks[n].astype(bool) for n, s in enumerate(header["slices"])})

    def alternatives(self, session: Session, label: int, slice_: int, choose: int | None = None) -> tuple[dict, list]:
        """One slice of a segment's last annotate run: its own mask and the decoder's other mask outputs
        (``protocol.ALTERNATIVE_COUNT`` candidates, 0 = the run's own), after the server's run keeps candidate
        ``choose`` (None: keeps what it holds). Returns the header (axis, slice, ``chosen``, ``review``) and the
        candidates' (rows, cols) bool masks of that slice, as the run gives each."""
        request: dict = {"label": int(label), "slice": int(slice_)}
        if choose is not None:
            request["choose"] = int(choose)
        _, _, body = self._request("POST", _path(protocol.ROUTE_ALTERNATIVES, session), _dumps(request),
                                   protocol.JSON_TYPE, session=session, what="the alternatives request")
        header, masks = self._decode(body, ("uint8",))
        return header, [mask.astype(bool) for mask in masks]

    def annotate(self, session: Session, document: dict, existing: np.ndarray | None = None,
                 progress: Callable[[int, int], Any] | None = None, cancel: threading.Event | None = None,
                 **options: Any) -> tuple[tuple[int, int, int], np.ndarray, dict]:
        """Run a prompt document (the README's "The command line") -> ``(ijk_offset, labels, summary)``.

        ``labels`` is the (k, j, i) block of the changed slices, to be placed at IJK
        ``ijk_offset`` = (i0, j0, k0); it is the complete answer for its slices along
        the document's axis (``summary["changed_slices"]`` lists the slices the run
        wrote). No change gives an empty (0, 0, 0) block. ``existing`` (k, j, i)
        uint8/uint16 labelmap: the run starts from it and its locked slices stay.
        ``options``: propagate, fill_holes, largest_component, overwrite,
        interpolation, orientation, batch_size (as ``medsam annotate``).
        ``progress(done, total)`` is called as the job advances; setting ``cancel``
        stops it. Any failure raises, and nothing is returned.
        """
        payload = {"document": document, "options": options}
        if existing is None:
            body, kind = _dumps(payload), protocol.JSON_TYPE
        else:
            existing = np.asarray(existing)
            if existing.dtype.name not in LABEL_DTYPES:
                if not np.issubdtype(existing.dtype, np.integer) and existing.dtype != np.bool_:
                    raise ValueError(f"the existing labelmap must hold integer labels, got {existing.dtype}")
                if existing.size and (existing.min() < 0 or existing.max() > 65535):
                    raise ValueError("the existing labelmap's labels must lie in 0..65535")
                existing = existing.astype(np.uint16)
            body, kind = encode_envelope(payload, existing), ENVELOPE_TYPE
        job = self._json("POST", _path(protocol.ROUTE_ANNOTATE, session), body, kind, session=session,
                         what="the annotate request", timeout=upload_timeout(len(body)))["job"]
        try:
            try:
                self.wait(session, job, progress, cancel)
            except ServerNotRunning as err:
                raise ServerNotRunning(f"{err} The annotation was not finished; nothing was applied.") from None
            _, _, result = self._request("GET", _path(protocol.ROUTE_JOB_RESULT, session, job), session=session,
                                         what="the annotate result", timeout=RESULT_TIMEOUT)
            header, labels = self._decode(result, LABEL_DTYPES)
        except Cancelled:
            raise  # wait() has cancelled the job already, or the server did
        except BaseException:  # timeout, lost poll, Ctrl-C, an unreadable result: the server must not go on
            self._cancel_quietly(session, job)
            raise
        summary = header.get("summary", {})
        if labels is None:
            return (0, 0, 0), np.zeros((0, 0, 0), dtype=np.uint16), summary
        offset = tuple(int(v) for v in header["array"].get("offset", (0, 0, 0)))
        return (offset[0], offset[1], offset[2]), labels, summary

    # -------------------------------------------------------------- HTTP

    def segment_timeout(self, slices: int) -> float:
        """Seconds a segment naming ``slices`` slices may wait for its answer: each may need the encoder."""
        return min(self.timeout, SEGMENT_BASE_TIMEOUT + SEGMENT_SLICE_TIMEOUT * max(1, slices))

    def _limits(self) -> dict:
        with self._lock:
            known = self._info
        if known is None:
            known = self.check_compatible()
        return known.get("limits", {})

    def _decode(self, body: bytes, dtypes: Sequence[str]) -> tuple[dict, np.ndarray | None]:
        try:
            return decode_envelope(body, dtypes)
        except (ValueError, KeyError, TypeError) as err:
            raise ServerError(200, f"the server's answer could not be read: {err}", "bad_answer") from None

    def _json(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
              session: Session | None = None, what: str = "the request", timeout: float | None = None,
              cancel: threading.Event | None = None) -> Any:
        _, _, data = self._request(method, path, body, content_type, session, what, timeout, cancel)
        try:
            return json.loads(data.decode("utf-8"))
        except ValueError as err:
            raise ServerError(200, f"the server's answer to {what} is not JSON: {err}", "bad_answer") from None

    def _request(self, method: str, path: str, body: bytes | None = None, content_type: str | None = None,
                 session: Session | None = None, what: str = "the request",
                 timeout: float | None = None, cancel: threading.Event | None = None) -> tuple[int, Any, bytes]:
        headers = {API_VERSION_HEADER: str(API_VERSION), "Accept": f"application/json, {ENVELOPE_TYPE}"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if session is not None:
            headers[SESSION_KEY_HEADER] = session.key
        if content_type:
            headers["Content-Type"] = content_type
        if cancel is not None and body:
            headers["Content-Length"] = str(len(body))  # the body is then sent in chunks (transport.send)
        return transport.send(self._opener, self.url, method, path, body, headers, timeout or self.timeout,
                              cancel, self.retries, self.backoff, what)


def upload_timeout(size: int) -> float:
    """Seconds a request body of ``size`` bytes may take to be sent and answered."""
    return UPLOAD_BASE_TIMEOUT + size / UPLOAD_MIN_RATE


def _path(route: str, session: Session, job: str = "") -> str:
    """A route template of ``protocol`` filled in for one session (and job)."""
    return route.format(session_id=session.id, job_id=urllib.parse.quote(job, safe=""))


def _window(window: Any) -> Any:
    return window if isinstance(window, str) else [float(v) for v in window]


def _plain(value: Any) -> Any:
    """numpy scalars and arrays -> JSON types (boxes often come straight out of numpy)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def _dumps(value: Any) -> bytes:
    return json.dumps(_plain(value), allow_nan=False).encode()
