"""ASGI without a socket for the Ray Serve path: run an app in process, and speak ASGI at the ingress.

:class:`InProcessApp` runs an ASGI app's lifespan and one request at a time as (status, headers, body): a
Ray Serve replica holds the single-process server app this way and answers what the ingress forwards, so
the replica gives exactly the single-process server's answers. The other functions are what the ingress
(an ASGI app itself) needs: its lifespan, a header, the request body under a limit, an answer sent on.
Standard library only; status codes are never chosen here (they come from the replica or ``api.ERRORS``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

from .errors import TooLarge, WireError

ASGI = {"version": "3.0", "spec_version": "2.3"}
Headers = list[tuple[bytes, bytes]]


class InProcessApp:
    def __init__(self, app: Callable, server: tuple[str, int]):
        self.app, self.server = app, server  # server: the address clients reach (the app may check Host against it)
        self.state: dict[str, Any] = {}  # lifespan state, handed to every request as the ASGI spec says
        self._lifespan: asyncio.Task | None = None
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._outbox: asyncio.Queue = asyncio.Queue()

    async def start(self) -> None:
        """Run the app's start-up (e.g. load the model); raises RuntimeError when it fails."""
        scope = {"type": "lifespan", "asgi": ASGI, "state": self.state}
        self._lifespan = asyncio.get_running_loop().create_task(self.app(scope, self._inbox.get, self._outbox.put))
        await self._inbox.put({"type": "lifespan.startup"})
        message = await self._outbox.get()
        if message["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the server app did not start: {message.get('message', message['type'])}")

    async def stop(self) -> None:
        if self._lifespan is None or self._lifespan.done():
            return
        await self._inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(self._outbox.get(), timeout=30)

    async def request(self, method: str, path: str, query: bytes, headers: Headers,
                      body: bytes) -> tuple[int, Headers, bytes]:
        scope = {"type": "http", "asgi": ASGI, "http_version": "1.1", "method": method, "scheme": "http",
                 "path": path, "raw_path": path.encode("utf-8"), "query_string": query, "root_path": "",
                 "headers": headers, "client": ("127.0.0.1", 0), "server": self.server,
                 "state": dict(self.state)}
        delivered = False
        never = asyncio.Event()

        async def receive() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await never.wait()  # the client stays connected while the app works (the ingress holds it)
            return {"type": "http.disconnect"}

        status, answer_headers, chunks = None, [], []

        async def send(message: dict) -> None:
            nonlocal status, answer_headers
            if message["type"] == "http.response.start":
                status, answer_headers = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        if status is None:
            raise RuntimeError(f"the server app sent no answer to {method} {path}")
        return status, answer_headers, b"".join(chunks)


async def lifespan(receive: Callable, send: Callable) -> None:
    """An app with nothing to start or stop: acknowledge start-up and shut-down."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def header(scope: dict, name: str) -> Optional[str]:
    """The value of request header ``name`` (any case), or None."""
    wanted = name.lower().encode("latin-1")
    for key, value in scope["headers"]:
        if key.lower() == wanted:
            return value.decode("latin-1")
    return None


async def read_body(scope: dict, receive: Callable, limit: int) -> bytes:
    """The request body, refused (TooLarge) as soon as it declares or reaches more than ``limit`` bytes."""
    declared = header(scope, "content-length")
    if declared is not None and (not declared.strip().isdigit()):
        raise WireError(f"bad Content-Length {declared[:40]!r}")
    if declared is not None and int(declared) > limit:
        raise TooLarge(f"the request has {int(declared)} bytes; this server accepts at most {limit} "
                       "(medsam serve --max-upload-mb)")
    body, more = bytearray(), True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise WireError("the client disconnected before the body was complete")
        body += message.get("body", b"")
        more = message.get("more_body", False)
        if len(body) > limit:
            raise TooLarge(f"the request is longer than the {limit} bytes this server accepts "
                           "(medsam serve --max-upload-mb)")
    return bytes(body)


async def send_answer(send: Callable, status: int, headers: Headers, body: bytes) -> None:
    """Send an answer (e.g. a replica's, unchanged) to the client."""
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
