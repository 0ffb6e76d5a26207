"""The HTTP API: ``create_app(settings)`` builds the FastAPI app; routes are thin.

Routes (all answers JSON unless noted; errors are ``{"error": message, "code": tag}``)::

    GET    /health                                 liveness, no token needed
    GET    /info                                   versions, model, device, cache and worker stats, limits
    POST   /sessions                               upload a volume (envelope) -> {"session", "key", ...}
    GET    /sessions/{id}                          the session's volume and jobs
    DELETE /sessions/{id}                          forget it (cancels its jobs)
    POST   /sessions/{id}/segment                  boxes on slices -> masks (envelope)
    POST   /sessions/{id}/prefetch                 embed a slice range in the background -> job
    POST   /sessions/{id}/annotate                 a prompt document (JSON, or an envelope with an existing
                                                   labelmap) -> job
    GET    /sessions/{id}/jobs/{job}?wait=S        job progress; waits up to S s (<= 10) for it to end
    GET    /sessions/{id}/jobs/{job}/result        an annotate job's changed block (envelope)
    DELETE /sessions/{id}/jobs/{job}               cancel

Session routes need the session's key in ``X-MedSAM-Session-Key``; with tokens
configured every route but ``/health`` needs ``Authorization: Bearer <token>``
(compared in constant time). Status codes: 400 bad wire data, 401 no token, 403
wrong token, 404 unknown session or job, 409 API version mismatch or job not
finished, 413 too large, 415 unsupported content or dtype, 422 bad input
(``InputError``), 429 server full. The event loop only reads bodies and awaits:
decoding, validation and model work run on threads and the model worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import API_VERSION, __version__, wire
from .embeddings import EmbeddingCache
from .errors import Cancelled, InputError
from .models import DEFAULT_MODEL, PromptableModel, load_model
from .sessions import Busy, NotFinished, Session, Sessions, UnknownJob, UnknownSession
from .worker import ModelWorker

log = logging.getLogger("medsam_server")

MIN_TOKEN_LENGTH = 16
MAX_POLL_WAIT_SECONDS = 10.0


@dataclass
class Settings:
    """Everything ``medsam serve`` can set; tests build it directly."""

    host: str = "127.0.0.1"
    port: int = 8765
    model: str = DEFAULT_MODEL
    checkpoint: Optional[str] = None
    backend: str = "torch"
    device: str = "auto"
    tokens: tuple[str, ...] = ()  # empty: no auth (loopback only); several: one per user, each owns its sessions
    cache_gb: float = 2.0
    cache_fp16: bool = False
    max_upload_mb: float = 1024.0
    session_idle_seconds: float = 3600.0
    max_sessions: int = 16
    max_sessions_gb: float = 8.0  # all uploaded volumes together, decompressed
    max_active_jobs: int = 4
    encode_chunk: Optional[int] = None  # slices per encoder step (default 1 on CPU, the model's batch on a GPU)
    limits: wire.Limits = field(default_factory=wire.Limits)

    def __post_init__(self):
        self.tokens = tuple(self.tokens)
        self.limits = wire.Limits(**{**self.limits.as_dict(), "max_body_bytes": int(self.max_upload_mb * wire.MiB)})

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


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.code = status, code


class ServerState:
    """What the app holds between requests: model worker, cache, sessions, thread pool."""

    def __init__(self, settings: Settings, model: Optional[PromptableModel], cache: Optional[EmbeddingCache]):
        self.settings = settings
        self.model = model
        self.cache = cache if cache is not None else EmbeddingCache(int(settings.cache_gb * 2**30), settings.cache_fp16)
        self.token_owners = [(t.encode(), hashlib.sha256(t.encode()).hexdigest()) for t in settings.tokens]
        self.pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="medsam-request")
        self.worker: Optional[ModelWorker] = None
        self.sessions: Optional[Sessions] = None
        self._expiry: Optional[asyncio.Task] = None

    async def start(self) -> None:
        s = self.settings
        if self.model is None:
            self.model = await asyncio.get_running_loop().run_in_executor(
                self.pool, lambda: load_model(s.model, s.checkpoint, s.device, s.backend))
        self.worker = ModelWorker(self.model, self.cache, s.encode_chunk)
        self.worker.start()
        self.sessions = Sessions(self.worker, self.cache, s.limits, s.session_idle_seconds, s.max_sessions,
                                 int(s.max_sessions_gb * 2**30), s.max_active_jobs)
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

    def owner(self, request: Request) -> str:
        """The caller's owner id (sha256 of its token; "" without auth); 401/403 otherwise."""
        version = request.headers.get(wire.API_VERSION_HEADER)
        if version is not None and version.strip() != str(API_VERSION):
            raise ApiError(409, f"this server speaks MedSAM API {API_VERSION}, the client {version[:20]!r}; "
                                "update the one that is older", "version_mismatch")
        if not self.token_owners:
            return ""
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            raise ApiError(401, "this server needs a token: send 'Authorization: Bearer <token>'", "unauthorized")
        presented_bytes = presented.strip().encode("utf-8", "surrogateescape")
        owner = ""
        for token, token_owner in self.token_owners:  # every token compared, in constant time each
            if hmac.compare_digest(presented_bytes, token):
                owner = token_owner
        if not owner:
            raise ApiError(403, "wrong token", "forbidden")
        return owner

    def session(self, request: Request, session_id: str, owner: str) -> Session:
        return self.sessions.get(session_id, owner, request.headers.get(wire.SESSION_KEY_HEADER))


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is longer than ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise ApiError(400, f"bad Content-Length {declared[:40]!r}", "bad_request")
        if int(declared) > limit:
            raise ApiError(413, f"the request has {int(declared)} bytes; this server accepts at most {limit} "
                                "(medsam serve --max-upload-mb)", "too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request is longer than the {limit} bytes this server accepts "
                                "(medsam serve --max-upload-mb)", "too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def envelope_response(body: bytes, status: int = 200) -> Response:
    return Response(content=body, status_code=status, media_type=wire.ENVELOPE_TYPE)


def _error(status: int, message: str, code: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)


def create_app(settings: Settings, model: Optional[PromptableModel] = None,
               cache: Optional[EmbeddingCache] = None) -> FastAPI:
    """The server app. ``model`` (already loaded) and ``cache`` may be given, e.g. shared by tests;
    otherwise the model named in ``settings`` is loaded at start-up."""
    settings.validate()
    state = ServerState(settings, model, cache)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    app = FastAPI(title="MedSAM server", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.medsam = state

    # ------------------------------------------------------------------ errors, in one place

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return _error(err.status, str(err), err.code, headers)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, err: InputError):
        return _error(422, str(err), "bad_input")

    @app.exception_handler(wire.WireError)
    async def _wire_error(request: Request, err: wire.WireError):
        code = {413: "too_large", 415: "unsupported"}.get(err.status, "bad_data")
        return _error(err.status, str(err), code)

    @app.exception_handler(UnknownSession)
    @app.exception_handler(UnknownJob)
    async def _unknown(request: Request, err: LookupError):
        return _error(404, str(err), "unknown_session" if isinstance(err, UnknownSession) else "unknown_job")

    @app.exception_handler(Busy)
    async def _busy(request: Request, err: Busy):
        return _error(429, str(err), "busy")

    @app.exception_handler(NotFinished)
    async def _not_finished(request: Request, err: NotFinished):
        return _error(409, str(err), "not_finished")

    @app.exception_handler(Cancelled)
    async def _cancelled(request: Request, err: Cancelled):
        return _error(409, str(err), "cancelled")

    @app.exception_handler(ClientDisconnect)
    async def _disconnect(request: Request, err: ClientDisconnect):
        return _error(400, "the client disconnected before the body was complete", "bad_request")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in err.errors())
        return _error(422, f"bad request parameters: {problems}", "bad_input")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):
        return _error(err.status_code, str(err.detail), "http")

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, f"internal error ({type(err).__name__}); the server log has the details", "internal")

    async def caller(request: Request) -> str:
        return state.owner(request)

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info(owner: str = Depends(caller)):
        model = state.model
        return {"api_version": API_VERSION, "version": __version__, "model": model.name, "device": str(model.device),
                "backend": settings.backend, "auth": bool(settings.tokens), "sessions": len(state.sessions),
                "session_idle_seconds": settings.session_idle_seconds, "cache": state.cache.stats().as_dict(),
                "worker": state.worker.stats(), "limits": settings.limits.as_dict(),
                "image_dtypes": list(wire.IMAGE_DTYPES), "label_dtypes": list(wire.LABEL_DTYPES)}

    @app.post("/sessions", status_code=201)
    async def upload(request: Request, owner: str = Depends(caller)):
        if media_type(request) != wire.ENVELOPE_TYPE:
            raise ApiError(415, f"an upload is a {wire.ENVELOPE_TYPE} envelope, not {media_type(request)!r}",
                           "unsupported")
        body = await read_body(request, settings.limits.max_body_bytes)
        session, key = await state.run(state.sessions.create, body, owner)
        return {**session.describe(), "key": key}

    @app.get("/sessions/{session_id}")
    async def describe(session_id: str, request: Request, owner: str = Depends(caller)):
        return state.session(request, session_id, owner).describe()

    @app.delete("/sessions/{session_id}", status_code=204)
    async def delete(session_id: str, request: Request, owner: str = Depends(caller)):
        session = state.session(request, session_id, owner)
        await state.run(state.sessions.delete, session)
        return Response(status_code=204)

    @app.post("/sessions/{session_id}/segment")
    async def segment(session_id: str, request: Request, owner: str = Depends(caller)):
        session = state.session(request, session_id, owner)
        raw = await _json(request, settings.limits)

        def masks_envelope() -> bytes:  # one trip off the event loop: segment and encode
            segment_request, masks = state.sessions.segment(session, raw)
            header = {"axis": segment_request.axis, "slices": [e.slice for e in segment_request.entries],
                      "notes": segment_request.notes}
            return wire.encode(header, masks.astype(np.uint8))

        return envelope_response(await state.run(masks_envelope))

    @app.post("/sessions/{session_id}/prefetch", status_code=202)
    async def prefetch(session_id: str, request: Request, owner: str = Depends(caller)):
        session = state.session(request, session_id, owner)
        raw = await _json(request, settings.limits)
        job = await state.run(state.sessions.start_prefetch, session, raw)
        return job.status()

    @app.post("/sessions/{session_id}/annotate", status_code=202)
    async def annotate(session_id: str, request: Request, owner: str = Depends(caller)):
        session = state.session(request, session_id, owner)
        if media_type(request) == wire.ENVELOPE_TYPE:
            body = await read_body(request, settings.limits.max_body_bytes)
            header, existing = await state.run(lambda: wire.decode(body, settings.limits, wire.LABEL_DTYPES, False))
        else:
            header, existing = await _json(request, settings.limits), None
        job = await state.run(state.sessions.start_annotate, session, header, existing)
        return job.status()

    @app.get("/sessions/{session_id}/jobs/{job_id}")
    async def job_status(session_id: str, job_id: str, request: Request, wait: float = 0.0,
                         owner: str = Depends(caller)):
        job = state.sessions.job(state.session(request, session_id, owner), job_id)
        deadline = time.monotonic() + min(max(wait, 0.0), MAX_POLL_WAIT_SECONDS)
        while job.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return job.status()

    @app.get("/sessions/{session_id}/jobs/{job_id}/result")
    async def job_result(session_id: str, job_id: str, request: Request, owner: str = Depends(caller)):
        job = state.sessions.job(state.session(request, session_id, owner), job_id)
        status = job.status()
        if job.active:
            raise NotFinished(f"job {job_id[:64]!r} is {status['state']} ({status['done']}/{status['total']}); "
                              "poll its status until it is done")
        if status["state"] == "failed":
            code = "bad_input" if job.error_status == 422 else "internal"
            return _error(job.error_status or 500, status["error"], code)
        if status["state"] == "cancelled":
            raise Cancelled(f"job {job_id[:64]!r} was cancelled")
        if job.result is None:
            return status
        return envelope_response(job.result)

    @app.delete("/sessions/{session_id}/jobs/{job_id}")
    async def cancel(session_id: str, job_id: str, request: Request, owner: str = Depends(caller)):
        job = state.sessions.job(state.session(request, session_id, owner), job_id)
        job.cancel.set()
        return job.status()

    return app


async def _json(request: Request, limits: wire.Limits) -> dict:
    body = await read_body(request, limits.max_json_bytes)
    if len(body) <= 1 << 16:  # a box or two: parsing here is quicker than a thread hop
        return wire.parse_json_object(body, "the request body")
    return await request.app.state.medsam.run(wire.parse_json_object, body, "the request body")
