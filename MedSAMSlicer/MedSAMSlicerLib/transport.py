"""How the client's requests travel: stdlib HTTP(S) with a short connect timeout, cancellable uploads, retries
while a server is starting, and the server's error answers turned into the errors a user can act on.

``client.MedSAMClient`` decides what to ask and how long it may take; this module only carries it.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Optional

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

CONNECT_TIMEOUT = 3.0  # seconds to open a connection: a loopback or LAN server connects in milliseconds
UPLOAD_CHUNK_BYTES = 64 << 10  # how often a cancellable upload looks at its flag (and takes the GIL)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def opener(hostname: str) -> urllib.request.OpenerDirector:
    """An opener whose connections get ``CONNECT_TIMEOUT`` to open; a loopback server is reached directly."""
    handlers: list = [_HTTPHandler(), _HTTPSHandler()]
    if hostname in LOOPBACK_NAMES:
        handlers.append(urllib.request.ProxyHandler({}))  # a system proxy must not see loopback traffic
    return urllib.request.build_opener(*handlers)


def send(opener: urllib.request.OpenerDirector, url: str, method: str, path: str, body: Optional[bytes],
         headers: dict, timeout: float, cancel: Optional[threading.Event], retries: int, backoff: float,
         what: str) -> tuple[int, Any, bytes]:
    """(status, headers, body) of one request; ``retries`` new tries, ``backoff`` s doubling, only while the
    connection is refused (a request that was sent is never repeated). A body sent with ``cancel`` goes in
    chunks and stops once it is set (its Content-Length must be in ``headers``)."""
    for attempt in range(retries + 1):
        data = _cancellable_chunks(body, cancel) if cancel is not None and body else body
        request = urllib.request.Request(url + path, data=data, headers=headers, method=method)
        try:
            with opener.open(request, timeout=timeout) as response:
                return response.status, response.headers, response.read()
        except urllib.error.HTTPError as err:
            raise http_error(url, err.code, err.read(), what) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            if isinstance(reason, ConnectionRefusedError):
                if attempt < retries:
                    time.sleep(backoff * 2 ** attempt)
                    continue
                raise ServerNotRunning(f"cannot reach the MedSAM server at {url}: connection refused. "
                                       "Is it running? Start it with `medsam serve` (or the module's "
                                       "Start server button).") from None
            if isinstance(reason, (socket.timeout, TimeoutError)):
                raise ServerNotRunning(f"the MedSAM server at {url} did not answer {what} within "
                                       f"{timeout:.0f} s.") from None
            raise ServerNotRunning(f"lost the connection to the MedSAM server at {url} during {what} "
                                   f"({type(reason).__name__}: {reason}); the server may have stopped.") from None
    raise AssertionError("unreachable")


def http_error(url: str, status: int, body: bytes, what: str) -> MedSAMClientError:
    """The error for the server's answer ``status`` with ``body`` (``{"error": ..., "code": ...}``) to ``what``."""
    try:
        answer = json.loads(body.decode("utf-8"))
        message, code = str(answer.get("error") or answer.get("detail")), str(answer.get("code", ""))
    except (ValueError, AttributeError):
        message, code = body[:300].decode("utf-8", "replace") or http.client.responses.get(status, ""), ""
    if code == "version_mismatch":
        return VersionMismatch(f"{message} (server {url})")
    if status == 401:
        return AuthError(f"the MedSAM server at {url} needs a token; set it in the module's settings")
    if status == 403 and message.startswith("Host "):  # a token-less server reached by another name
        return AuthError(f"{message} (use http://127.0.0.1:<port> or set a token)")
    if status == 403:
        return AuthError(f"wrong token for the MedSAM server at {url}")
    if status == 429 or code == "busy":
        return ServerBusy(status, message, code)
    if status == 410 and code == "session_lost":
        return SessionLost(status, message, code)
    if status == 413:
        return RequestTooLarge(f"{what} is too large for the server: {message}")
    if status == 404 and code == "unknown_session":
        return UnknownSession(status, message, code)
    if code == "cancelled":
        return Cancelled(message)
    return ServerError(status, message, code)


class _ConnectTimeout:
    """An HTTP(S) connection that gets ``CONNECT_TIMEOUT`` to open, then the request's own timeout for reads."""

    def connect(self) -> None:
        read_timeout = self.timeout
        if isinstance(read_timeout, (int, float)):
            self.timeout = min(CONNECT_TIMEOUT, read_timeout)
        try:
            super().connect()
        finally:
            self.timeout = read_timeout
        if isinstance(read_timeout, (int, float)):
            self.sock.settimeout(read_timeout)


class _HTTPConnection(_ConnectTimeout, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_ConnectTimeout, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_HTTPConnection, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_HTTPSConnection, req, context=self._context)


def _cancellable_chunks(body: bytes, cancel: threading.Event):
    """A request body that http.client sends chunk by chunk, and that stops the request once ``cancel`` is set."""
    view = memoryview(body)
    for start in range(0, len(view), UPLOAD_CHUNK_BYTES):
        if cancel.is_set():
            raise Cancelled("the upload was cancelled; the server keeps nothing of it")
        yield view[start:start + UPLOAD_CHUNK_BYTES]
