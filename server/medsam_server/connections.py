"""What reaches the app from the network: connections, slow clients, the Host header, repeated log lines.

uvicorn accepts any number of connections and waits forever for a request's headers,
so idle or half-open connections can use up the process's files until every
``/health`` probe fails. :func:`uvicorn_options` gives ``medsam serve`` an HTTP
protocol with a guard around uvicorn's own (httptools or h11):

- at most ``max_connections`` at once, kept below the file limit (raised to the hard
  limit at start); a new connection past the cap closes the oldest one that has not
  sent a complete request, so a flood of idle connections cannot lock others out;
- a request's headers must arrive within ``header_seconds`` and stay under
  ``max_header_bytes``; a body that stops arriving for ``body_idle_seconds`` is dropped;
- repeated log lines (an accept loop out of files logs one per attempt) are logged
  once per ``REPEAT_WINDOW_SECONDS`` with a count.

:class:`BodyBudget` is the byte budget of request bodies held at once: each body is
charged as it arrives (its declared ``Content-Length`` at once), so that many large
uploads at a time are refused before the server has buffered them.

:class:`LoopbackHostOnly` refuses requests whose ``Host`` is not this server's
loopback address, so that a web page that rebinds its domain to 127.0.0.1 cannot use
a server that has no token. Rates per client address, TLS and minimum upload speeds
are a reverse proxy's job (README, "Security").
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional

from .errors import Busy, TooLarge

log = logging.getLogger("medsam_server")

FILES_RESERVED = 128  # files kept for the model, the log and the process itself, beyond connections
REPEAT_WINDOW_SECONDS = 10.0
SWEEP_SECONDS = 1.0
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 512
    header_seconds: float = 10.0
    body_idle_seconds: float = 30.0
    max_header_bytes: int = 64 * 1024


def raise_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; returns the soft limit now."""
    try:
        import resource
    except ImportError:  # Windows: no such limit on sockets
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass  # keep the old limit; the connection cap follows it
    return soft


class ConnectionGuard:
    """Every open connection of the server, oldest first, and the sweep that times them out."""

    def __init__(self, limits: ConnectionLimits, max_connections: int):
        self.limits = limits
        self.max_connections = max_connections
        self.open: OrderedDict[Any, None] = OrderedDict()
        self.closed_idle = self.closed_slow = 0
        self._sweeping = False

    def admit(self, protocol) -> None:
        if len(self.open) >= self.max_connections:
            victim = next((p for p in self.open if p.waiting_for_headers), None)
            if victim is None:  # every connection is mid-request: the newcomer is the one to go
                protocol.transport.close()
                return
            self.forget(victim)
            victim.transport.close()
            self.closed_idle += 1
        self.open[protocol] = None
        if not self._sweeping:
            self._sweeping = True
            asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)

    def forget(self, protocol) -> None:
        self.open.pop(protocol, None)

    def _sweep(self) -> None:
        now = time.monotonic()
        for protocol in list(self.open):
            if protocol.too_slow(now, self.limits):
                self.forget(protocol)
                protocol.transport.close()
                self.closed_slow += 1
        if self.open:
            asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)
        else:
            self._sweeping = False


def guarded_protocol(guard: ConnectionGuard) -> type:
    """uvicorn's HTTP protocol class with ``guard`` around it."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    class GuardedHTTPProtocol(AutoHTTPProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.since = self.last_data = time.monotonic()  # since: the wait for the next headers began
            self.header_bytes = 0
            guard.admit(self)

        def connection_lost(self, exc) -> None:
            guard.forget(self)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            self.last_data = time.monotonic()
            super().data_received(data)
            if self.waiting_for_headers:
                self.header_bytes += len(data)
                if self.header_bytes > guard.limits.max_header_bytes and not self.transport.is_closing():
                    guard.forget(self)
                    self.transport.close()
            else:
                self.header_bytes = 0

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.since = time.monotonic()
            self.header_bytes = 0

        @property
        def waiting_for_headers(self) -> bool:
            cycle = getattr(self, "cycle", None)
            return cycle is None or cycle.response_complete

        def too_slow(self, now: float, limits: ConnectionLimits) -> bool:
            if self.waiting_for_headers:
                return now - self.since > limits.header_seconds
            receiving = self.cycle.more_body and not (self.flow is not None and self.flow.read_paused)
            return receiving and now - self.last_data > limits.body_idle_seconds

    return GuardedHTTPProtocol


class BodyBudget:
    """Bytes of request bodies (and what they declare they decode to) held at once: by everyone, and per caller.

    Used from the event loop only (no lock). :meth:`charge` refuses what does not fit: TooLarge (413)
    past the caller's own share, Busy (429) when other callers' bodies fill the rest.
    """

    def __init__(self, total: int, per_owner: int):
        self.total, self.per_owner = total, min(per_owner, total)
        self.held: dict[str, int] = {}

    def charge(self, owner: str, nbytes: int) -> None:
        mine, everyone = self.held.get(owner, 0), sum(self.held.values())
        if mine + nbytes > self.per_owner:
            raise TooLarge(f"this request would make {_mib(mine + nbytes)} of your request data in flight at once; "
                           f"the server takes at most {_mib(self.per_owner)} per token at once")
        if everyone + nbytes > self.total:
            raise Busy(f"the server is receiving {_mib(everyone)} of request data and takes at most "
                       f"{_mib(self.total)} at once; try again when uploads under way have ended")
        self.held[owner] = mine + nbytes

    def release(self, owner: str, nbytes: int) -> None:
        left = self.held.pop(owner, 0) - nbytes
        if left > 0:
            self.held[owner] = left


class Charge:
    """What one request has charged to a :class:`BodyBudget`; :meth:`release` gives it all back."""

    def __init__(self, budget: BodyBudget, owner: str):
        self.budget, self.owner, self.nbytes = budget, owner, 0

    def add(self, nbytes: int) -> None:
        self.budget.charge(self.owner, nbytes)
        self.nbytes += nbytes

    def release(self) -> None:
        self.budget.release(self.owner, self.nbytes)
        self.nbytes = 0


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


class RepeatFilter(logging.Filter):
    """Lets a log line through once per window; the next one after the window says how many were dropped."""

    def __init__(self, window: float = REPEAT_WINDOW_SECONDS):
        super().__init__()
        self.window = window
        self._seen: dict[tuple, list] = {}  # (logger, message template) -> [first time in window, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg)[:200])
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.window:
            seen[1] += 1
            return False
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} [{seen[1]} more like it in {self.window:.0f} s were not logged]"
        if len(self._seen) > 1000:
            self._seen.clear()
        self._seen[key] = [now, 0]
        return True


def quiet_repeated_log_lines() -> None:
    repeat = RepeatFilter()
    for name in ("asyncio", "uvicorn.error", "medsam_server"):
        logging.getLogger(name).addFilter(repeat)


def uvicorn_options(limits: ConnectionLimits = ConnectionLimits()) -> dict:
    """Keyword arguments for ``uvicorn.run``/``uvicorn.Config``: the guarded protocol, at a cap that fits the files."""
    files = raise_file_limit()
    cap = max(16, min(limits.max_connections, files - FILES_RESERVED))
    if cap < limits.max_connections:
        log.warning("at most %d connections at once: the file limit is %d (ulimit -n)", cap, files)
    quiet_repeated_log_lines()
    return {"http": guarded_protocol(ConnectionGuard(limits, cap)), "h11_max_incomplete_event_size":
            limits.max_header_bytes, "timeout_keep_alive": 5}


# ------------------------------------------------------------------ the Host header


class LoopbackHostOnly:
    """ASGI middleware: answer only requests addressed to 127.0.0.1, localhost or [::1] on this server's port.

    For a server without a token: a browser sends the page's own host name, so a page
    whose domain was rebound to 127.0.0.1 is refused here before any route runs.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and not _loopback_host(scope):
            host = dict(scope.get("headers", ())).get(b"host", b"").decode("latin-1")
            body = json.dumps({"error": f"Host {host[:80]!r} is not this server's address: without a token it only "
                                        "answers requests sent to 127.0.0.1, localhost or [::1] at its port",
                               "code": "forbidden"}).encode()
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)


def _loopback_host(scope) -> bool:
    hosts = [value for name, value in scope.get("headers", ()) if name == b"host"]
    if len(hosts) != 1:
        return False
    host = hosts[0].decode("latin-1").strip().lower()
    server: Optional[tuple] = scope.get("server")
    port = None if server is None else server[1]
    if host.endswith("]") or ":" not in host:  # no port given: only right for a server on port 80
        name, given = host, "80"
    else:
        name, _, given = host.rpartition(":")
    return name in LOOPBACK_NAMES and (port is None or given == str(port))
