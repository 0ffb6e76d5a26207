"""Run an ASGI app in process without a socket: its lifespan, and one request as (status, headers, body).

A Ray Serve replica holds the single-process server app this way and answers what the ingress forwards,
so the replica gives exactly the single-process server's answers. Standard library only.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

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

        status, answer_headers, chunks = 500, [], []

        async def send(message: dict) -> None:
            nonlocal status, answer_headers
            if message["type"] == "http.response.start":
                status, answer_headers = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self.app(scope, receive, send)
        return status, answer_headers, b"".join(chunks)
