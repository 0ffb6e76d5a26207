"""Wiring: settings -> model, embedding cache, model worker and session store, and the app around them.

``build_app(settings, model=None, cache=None)`` returns the ASGI (FastAPI) app: tests call
it, ``medsam serve`` runs it under uvicorn, and a Ray Serve replica wraps one per replica.
Pass an already-loaded ``model`` (and a ``cache``) to share them; otherwise the model named
in ``settings`` is loaded when the app starts. :class:`Server` is what the routes in
``api.py`` talk to; nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

from .embeddings import EmbeddingCache
from .errors import Forbidden, InputError, Unauthorized, VersionMismatch
from .models import DEFAULT_MODEL, DEFAULT_PRECISION, load_model
from .protocol import API_VERSION, DEFAULT_HOST, DEFAULT_PORT, MIN_TOKEN_LENGTH, Limits, MiB
from .sessions import ServerSession, Sessions
from .worker import ModelWorker

log = logging.getLogger("medsam_server")


@dataclass
class Settings:
    """Everything ``medsam serve`` can set; tests build it directly."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model: str = DEFAULT_MODEL
    checkpoint: Optional[str] = None
    backend: str = "auto"  # ONNX Runtime on a CPU when installed, torch otherwise
    precision: str = DEFAULT_PRECISION
    threads: Optional[int] = None  # ONNX Runtime intra-op threads (None: the physical cores)
    device: str = "auto"
    tokens: tuple[str, ...] = ()  # empty: no auth (loopback only); several: one per user, each owns its sessions
    cache_gb: float = 2.0
    cache_fp16: bool = False
    max_upload_mb: float = 1024.0
    session_idle_seconds: float = 3600.0
    max_sessions: int = 16
    max_sessions_gb: float = 8.0  # all uploaded volumes together, decompressed
    max_active_jobs: int = 4
    # One token's share: default half of the slots and memory when several tokens share the server.
    max_sessions_per_token: Optional[int] = None
    share_cache: bool = False  # with tokens, True lets every token reuse (and time) the others' embeddings
    encode_chunk: Optional[int] = None  # slices per encoder step (default 1 on CPU, the model's batch on a GPU)
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self):
        self.tokens = tuple(self.tokens)
        self.limits = Limits(**{**self.limits.as_dict(), "max_body_bytes": int(self.max_upload_mb * MiB)})

    def validate(self) -> None:
        """Refuse settings that would expose the server (InputError, the CLI's exit code 2)."""
        if not self.tokens and not is_loopback(self.host):
            raise InputError(f"refusing to listen on {self.host} without a token: anyone who can reach this machine "
                             "could use the server. Pass --token-file FILE (or set MEDSAM_TOKEN), or bind 127.0.0.1")
        for token in self.tokens:
            if len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or not token.isascii() or " " in token:
                raise InputError(f"a token must be at least {MIN_TOKEN_LENGTH} printable ASCII characters without "
                                 "spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        if self.max_upload_mb <= 0 or self.cache_gb < 0 or self.session_idle_seconds <= 0 or self.max_sessions < 1:
            raise InputError("max upload, cache size, idle expiry and max sessions must be positive")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name may resolve to anything


class Callers:
    """Who a request comes from: its API version checked, its bearer token compared (constant time) with each
    known token; the single-process server and the Ray ingress (``ray_serve.py``) both ask this."""

    def __init__(self, tokens: tuple[str, ...]):
        self.token_owners = [(t.encode(), hashlib.sha256(t.encode()).hexdigest()) for t in tokens]

    def owner(self, authorization: str, api_version: Optional[str]) -> str:
        """The caller's owner id (sha256 of its token; "" without auth) from its request headers."""
        if api_version is not None and api_version.strip() != str(API_VERSION):
            raise VersionMismatch(f"this server speaks MedSAM API {API_VERSION}, the client {api_version[:20]!r}; "
                                  "update the one that is older")
        if not self.token_owners:
            return ""
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise Unauthorized("this server needs a token: send 'Authorization: Bearer <token>'")
        presented_bytes = presented.strip().encode("utf-8", "surrogateescape")
        owner = ""
        for token, token_owner in self.token_owners:  # every token compared, in constant time each
            if hmac.compare_digest(presented_bytes, token):
                owner = token_owner
        if not owner:
            raise Forbidden("wrong token")
        return owner


class Server:
    """What the app holds between requests: model, worker, cache, sessions, a thread pool for blocking work."""

    def __init__(self, settings: Settings, model: Any = None, cache: Optional[EmbeddingCache] = None):
        settings.validate()
        self.settings = settings
        self.model = model
        self.cache = cache if cache is not None else EmbeddingCache(int(settings.cache_gb * 2**30), settings.cache_fp16)
        self.callers = Callers(settings.tokens)
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="medsam-request")
        self.worker: Optional[ModelWorker] = None
        self.sessions: Optional[Sessions] = None
        self._expiry: Optional[asyncio.Task] = None

    async def start(self) -> None:
        s = self.settings
        if self.model is None:
            self.model = await self.run(load_model, s.model, s.checkpoint, s.device, s.backend, False,
                                        s.precision, s.threads)
        self.worker = ModelWorker(self.model, self.cache, s.encode_chunk)
        self.worker.start()
        total_bytes = int(s.max_sessions_gb * 2**30)
        several = len(s.tokens) > 1
        owner_sessions = s.max_sessions_per_token or (max(1, s.max_sessions // 2) if several else s.max_sessions)
        owner_bytes = total_bytes // 2 if several else total_bytes
        self.sessions = Sessions(self.worker, self.cache, s.limits, s.session_idle_seconds, s.max_sessions,
                                 total_bytes, s.max_active_jobs, owner_sessions, owner_bytes,
                                 share_cache=s.share_cache or not s.tokens)
        self._expiry = asyncio.create_task(self._expire_forever())
        log.info("MedSAM server ready: model %s on %s", self.model.name, self.model.device)

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        if self.sessions is not None:
            self.sessions.close()
        if self.worker is not None:
            await asyncio.get_running_loop().run_in_executor(None, self.worker.stop)
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def _expire_forever(self) -> None:
        period = min(60.0, max(1.0, self.settings.session_idle_seconds / 4))
        while True:
            await asyncio.sleep(period)
            self.sessions.expire()

    async def run(self, function: Callable, *args) -> Any:
        """Run blocking work (decoding, validation, the engine) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, function, *args)

    def owner(self, authorization: str, api_version: Optional[str]) -> str:
        """The caller's owner id (sha256 of its token; "" without auth) from its request headers."""
        return self.callers.owner(authorization, api_version)

    def session(self, session_id: str, owner: str, key: Optional[str]) -> ServerSession:
        return self.sessions.get(session_id, owner, key)

    def load(self) -> dict:
        """Aggregate figures of this server, safe to show every caller (no session, owner or slice named):
        sessions held by everyone, cache bytes, hits and misses, slices encoded and model work queued."""
        cache, worker = self.cache.stats(), self.worker.stats()
        return {"sessions": len(self.sessions), "cache_bytes": cache.bytes, "cache_hits": cache.hits,
                "cache_misses": cache.misses, "encoded_slices": worker["encoded_slices"],
                "queued": worker["queued"]}

    def info(self, owner: str = "") -> dict:
        """What ``/info`` tells ``owner``: with tokens, its own sessions and no other user's counts."""
        from . import __version__
        from .protocol import IMAGE_DTYPES, LABEL_DTYPES

        s, model = self.settings, self.model
        cache, worker = self.cache.stats().as_dict(), self.worker.stats()
        if s.tokens:  # the cache and worker serve everyone: only the sizes and the load, not what others did
            cache = {"budget_bytes": cache["budget_bytes"], "shared": s.share_cache}
            worker = {"queued": worker["queued"], "encode_chunk": worker["encode_chunk"]}
        return {"api_version": API_VERSION, "version": __version__, "model": model.name, "device": str(model.device),
                "backend": getattr(model, "backend", s.backend), "precision": getattr(model, "precision", "fp32"),
                "auth": bool(s.tokens), "sessions": self.sessions.count(owner),
                "session_idle_seconds": s.session_idle_seconds, "cache": cache,
                "worker": worker, "limits": s.limits.as_dict(),
                "image_dtypes": list(IMAGE_DTYPES), "label_dtypes": list(LABEL_DTYPES)}


def build_app(settings: Settings, model: Any = None, cache: Optional[EmbeddingCache] = None):
    """The server's ASGI (FastAPI) app for ``settings``; ``model``/``cache`` already loaded, or None."""
    from .api import create_app

    return create_app(Server(settings, model, cache))
