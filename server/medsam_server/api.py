"""The HTTP API: routes over :class:`.app.Server`, and the one table from domain errors to status codes.

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
(compared in constant time). Status codes come from :data:`ERRORS` alone. The event
loop only reads bodies and awaits: decoding, validation and model work run on threads
and the model worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from typing import Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from . import __version__, wire
from .app import Server, Settings  # noqa: F401 - Settings: still imported from here by the Ray tests
from .connections import BodyBudget, Charge
from .errors import (
    Busy,
    Cancelled,
    Forbidden,
    InputError,
    NoReplica,
    NotFinished,
    SessionLost,
    TooLarge,
    Unauthorized,
    UnknownJob,
    UnknownSession,
    Unsupported,
    VersionMismatch,
    WireError,
    capped,
)
from .jobs import Job
from .protocol import (
    API_VERSION_HEADER,
    ENVELOPE_TYPE,
    LABEL_DTYPES,
    MASK_DTYPE,
    MAX_POLL_WAIT_SECONDS,
    ROUTE_ALTERNATIVES,
    ROUTE_ANNOTATE,
    ROUTE_HEALTH,
    ROUTE_INFO,
    ROUTE_JOB,
    ROUTE_JOB_RESULT,
    ROUTE_PREFETCH,
    ROUTE_SEGMENT,
    ROUTE_SESSION,
    ROUTE_SESSIONS,
    ROUTE_THRESHOLD,
    SESSION_KEY_HEADER,
    Limits,
)
from .requests import check_existing_shape

log = logging.getLogger("medsam_server")

#: Every domain error -> (HTTP status, code tag); the most specific class listed first wins.
ERRORS: dict[type, tuple[int, str]] = {
    TooLarge: (413, "too_large"),
    Unsupported: (415, "unsupported"),
    WireError: (400, "bad_data"),
    ClientDisconnect: (400, "bad_request"),
    InputError: (422, "bad_input"),
    RequestValidationError: (422, "bad_input"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    UnknownSession: (404, "unknown_session"),
    UnknownJob: (404, "unknown_job"),
    VersionMismatch: (409, "version_mismatch"),
    NotFinished: (409, "not_finished"),
    Cancelled: (409, "cancelled"),
    Busy: (429, "busy"),
    SessionLost: (410, "session_lost"),  # medsam serve --replicas: the session's replica stopped
    NoReplica: (503, "no_replica"),
}


def status_for(error: BaseException) -> tuple[int, str]:
    """(status, code) of an error: the table's entry for its class (or a base class), else 500."""
    for kind in type(error).__mro__:
        if kind in ERRORS:
            return ERRORS[kind]
    return 500, "internal"


def _message(error: BaseException) -> str:
    if isinstance(error, RequestValidationError):
        problems = "; ".join(f"{'.'.join(map(str, e.get('loc', ())))}: {e.get('msg')}" for e in error.errors())
        return f"bad request parameters: {problems}"
    if isinstance(error, ClientDisconnect):
        return "the client disconnected before the body was complete"
    return str(error)


def error_response(error: BaseException) -> JSONResponse:
    status, code = status_for(error)
    if status == 500:
        message = f"internal error ({type(error).__name__}); the server log has the details"
    else:
        message = capped(_message(error))
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)


async def read_body(request: Request, limit: int, charge: Optional[Charge] = None) -> bytearray:
    """The request body, refused (TooLarge) as soon as it is longer than ``limit`` bytes.

    With a ``charge``, the body is charged to the server's :class:`BodyBudget` as it arrives (its
    ``Content-Length`` before any of it is read), so a body that does not fit is refused unread.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise WireError(f"bad Content-Length {declared[:40]!r}")
        if int(declared) > limit:
            raise TooLarge(f"the request has {int(declared)} bytes; this server accepts at most {limit} "
                           "(medsam serve --max-upload-mb)")
        if charge is not None:
            charge.add(int(declared))
    body = bytearray()  # grown as data arrives (a Content-Length alone reserves nothing), never joined
    async for chunk in request.stream():
        if len(body) + len(chunk) > limit:
            raise TooLarge(f"the request is longer than the {limit} bytes this server accepts "
                           "(medsam serve --max-upload-mb)")
        if charge is not None and len(body) + len(chunk) > charge.nbytes:  # chunked, or more than declared
            charge.add(len(body) + len(chunk) - charge.nbytes)
        body += chunk
    return body


@contextlib.asynccontextmanager
async def charged_body(request: Request, limit: int, owner: str) -> AsyncIterator[bytearray]:
    """``read_body`` with the body charged to the server's byte budget until the ``async with`` ends."""
    charge = Charge(request.app.state.body_budget, owner)
    try:
        yield await read_body(request, limit, charge)
    finally:
        charge.release()


async def unless_disconnected(request: Request, work):
    """Await the coroutine ``work``; cancel it (and the model work it waits for) if the client goes away."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        raise ClientDisconnect()
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass  # the body was read already: the next message is the disconnect


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def envelope_response(body: bytes, status: int = 200) -> Response:
    return Response(content=body, status_code=status, media_type=ENVELOPE_TYPE)


async def read_json(server: Server, request: Request, limits: Limits) -> dict:
    body = await read_body(request, limits.max_json_bytes)
    if len(body) <= 1 << 16:  # a box or two: parsing here is quicker than a thread hop
        return wire.parse_json_object(body, "the request body")
    return await server.run(wire.parse_json_object, body, "the request body")


def body_budget(settings: Settings) -> BodyBudget:
    """Request bodies held at once: the session memory cap (``max_sessions_gb``), half of it per token when
    several tokens share the server (as their sessions' share)."""
    total = int(settings.max_sessions_gb * 2**30)
    return BodyBudget(total, total // 2 if len(settings.tokens) > 1 else total)


def create_app(server: Server) -> FastAPI:
    """The FastAPI app of ``server`` (use ``app.build_app`` to make both from settings)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = FastAPI(title="MedSAM server", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.medsam = server
    app.state.body_budget = body_budget(server.settings)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException):  # routing: 404 no route, 405 wrong method
        return JSONResponse({"error": str(err.detail), "code": "http"}, status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _any(request: Request, err: Exception):
        if status_for(err)[0] == 500:
            log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=err)
        return error_response(err)

    for kind in ERRORS:  # FastAPI's own handler for validation errors must give way to the table too
        app.add_exception_handler(kind, _any)

    app.include_router(router)
    return app


router = APIRouter()


def _server(request: Request) -> Server:
    return request.app.state.medsam


async def caller(request: Request) -> str:
    """The caller's owner id, from its token and API version headers."""
    return _server(request).owner(request.headers.get("authorization", ""), request.headers.get(API_VERSION_HEADER))


def _session(request: Request, session_id: str, owner: str):
    return _server(request).session(session_id, owner, request.headers.get(SESSION_KEY_HEADER))


@router.get(ROUTE_HEALTH)
async def health():
    return {"status": "ok"}


@router.get(ROUTE_INFO)
async def info(request: Request, owner: str = Depends(caller)):
    return _server(request).info(owner)


@router.post(ROUTE_SESSIONS, status_code=201)
async def upload(request: Request, owner: str = Depends(caller)):
    server = _server(request)
    if media_type(request) != ENVELOPE_TYPE:
        raise Unsupported(f"an upload is a {ENVELOPE_TYPE} envelope, not {media_type(request)!r}")
    async with charged_body(request, server.settings.limits.max_body_bytes, owner) as body:
        session, key = await server.run(server.sessions.create, body, owner)
        del body  # the volume is decoded: its compressed bytes go before the charge does
    return {**session.describe(), "key": key}


@router.get(ROUTE_SESSION)
async def describe(session_id: str, request: Request, owner: str = Depends(caller)):
    return _session(request, session_id, owner).describe()


@router.delete(ROUTE_SESSION, status_code=204)
async def delete(session_id: str, request: Request, owner: str = Depends(caller)):
    server = _server(request)
    await server.run(server.sessions.delete, _session(request, session_id, owner))
    return Response(status_code=204)


async def _json_on_session(request: Request, session_id: str, owner: str) -> tuple:
    """(server, the caller's session, the request's JSON body) of a route on one session."""
    server = _server(request)
    session = _session(request, session_id, owner)
    return server, session, await read_json(server, request, server.settings.limits)


async def _masks_response(server, header: dict, masks) -> Response:
    return envelope_response(await server.run(wire.encode, header, masks.astype(MASK_DTYPE)))


@router.post(ROUTE_SEGMENT)
async def segment(session_id: str, request: Request, owner: str = Depends(caller)):
    server, session, raw = await _json_on_session(request, session_id, owner)
    segment_request, masks = await unless_disconnected(request, server.sessions.segment(session, raw, server.run))
    header = {"axis": segment_request.params.axis, "slices": [e.slice for e in segment_request.entries],
              "notes": segment_request.notes}
    return await _masks_response(server, header, masks)


@router.post(ROUTE_THRESHOLD)
async def threshold(session_id: str, request: Request, owner: str = Depends(caller)):
    server, session, raw = await _json_on_session(request, session_id, owner)

    def masks_envelope() -> bytes:  # one trip off the event loop: threshold and encode
        header, masks = server.sessions.threshold(session, raw)
        return wire.encode(header, masks.astype(MASK_DTYPE))

    return envelope_response(await server.run(masks_envelope))


@router.post(ROUTE_ALTERNATIVES)
async def alternatives(session_id: str, request: Request, owner: str = Depends(caller)):
    server, session, raw = await _json_on_session(request, session_id, owner)
    header, masks = await unless_disconnected(request, server.sessions.alternatives(session, raw, server.run))
    return await _masks_response(server, header, masks)


@router.post(ROUTE_PREFETCH, status_code=202)
async def prefetch(session_id: str, request: Request, owner: str = Depends(caller)):
    server, session, raw = await _json_on_session(request, session_id, owner)
    return job_status_body(await server.run(server.sessions.start_prefetch, session, raw))


@router.post(ROUTE_ANNOTATE, status_code=202)
async def annotate(session_id: str, request: Request, owner: str = Depends(caller)):
    server = _server(request)
    limits = server.settings.limits
    session = _session(request, session_id, owner)
    if media_type(request) != ENVELOPE_TYPE:
        header = await read_json(server, request, limits)
        return job_status_body(await server.run(server.sessions.start_annotate, session, header, None))
    async with charged_body(request, limits.max_body_bytes, owner) as body:  # with an existing labelmap
        existing_bytes = await server.run(existing_size, body, limits, session.array.shape[:3])
        charge = Charge(request.app.state.body_budget, owner)
        charge.add(existing_bytes)  # the labelmap decoded, until the job holds it
        try:
            header, existing = await server.run(wire.decode, body, limits, LABEL_DTYPES, False)
            del body
            return job_status_body(await server.run(server.sessions.start_annotate, session, header, existing))
        finally:
            charge.release()


def existing_size(body: bytes, limits: Limits, volume_shape: tuple) -> int:
    """Bytes an annotate request's existing labelmap decodes to, read from its header; refused before decoding
    unless it is a labelmap of the session's volume (its (k, j, i) shape)."""
    declared = wire.declared_array(body, limits, LABEL_DTYPES, False)
    if declared is None:
        return 0
    dtype, shape = declared
    check_existing_shape(shape, volume_shape)
    return math.prod(shape) * dtype.itemsize


@router.get(ROUTE_JOB)
async def job_status(session_id: str, job_id: str, request: Request, wait: float = 0.0,
                     owner: str = Depends(caller)):
    job = _session(request, session_id, owner).jobs.get(job_id)
    await job.wait(min(max(wait, 0.0), MAX_POLL_WAIT_SECONDS))
    return job_status_body(job)


@router.get(ROUTE_JOB_RESULT)
async def job_result(session_id: str, job_id: str, request: Request, owner: str = Depends(caller)):
    job = _session(request, session_id, owner).jobs.get(job_id)
    status = job.status()
    if job.active:
        raise NotFinished(f"job {job_id[:64]!r} is {status['state']} ({status['done']}/{status['total']}); "
                          "poll its status until it is done")
    if status["state"] == "failed":
        code, tag = status_for(job.error)
        return JSONResponse({"error": status["error"], "code": tag}, status_code=code)
    if status["state"] == "cancelled":
        raise Cancelled(f"job {job_id[:64]!r} was cancelled")
    if job.result is None:
        return status
    return envelope_response(job.result)


@router.delete(ROUTE_JOB)
async def cancel(session_id: str, job_id: str, request: Request, owner: str = Depends(caller)):
    job = _session(request, session_id, owner).jobs.get(job_id)
    job.cancel.set()
    return job_status_body(job)


def job_status_body(job: Job) -> dict:
    """A job's status, with the status code its error would have had as a request (``error_status``)."""
    status = job.status()
    status["error_status"] = status_for(job.error)[0] if job.error is not None else None
    return status
