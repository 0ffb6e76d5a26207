"""``medsam serve --replicas N``: the same HTTP API on N model replicas under Ray Serve, with session affinity.

Each replica is its own one-replica Serve deployment that builds the single-process server app in process
(its own model, worker, embedding cache and sessions) and answers requests forwarded to it unchanged
(method, path, query, headers, body -> status, headers, body): its answers are those of one ``medsam
serve`` by construction. One ingress deployment receives every HTTP request from Serve's proxy, checks the
token (constant time), enforces the limits that span replicas (sessions in all, sessions per token, body
size), and forwards each session's requests to the replica that created it.

Why N one-replica deployments and not Serve's model multiplexing (session id as the model id): multiplexed
routing only *prefers* the replica that has the id, it falls back to the least-loaded replica when that one
is busy or after a 1-2 s matching timeout, and learns a new id only when the replica reports it; a session
is state, not a cache entry, so a request that lands elsewhere would fail. A handle to each replica's
deployment reaches exactly one replica, that Serve restarts when it dies (stable public API; a custom
request router could do the same inside one deployment but is alpha).

A replica that dies takes its sessions with it: each replica has an incarnation id, the ingress records
the one that created each session, and a session whose replica died or was replaced answers
``410 {"code": "session_lost"}``; the client uploads again. Other replicas' sessions are untouched, and new
sessions go to the live replica with the fewest sessions. The ingress's session map is a cache: a session
it does not know (the ingress itself restarted) is looked up on every replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import time
import uuid
from typing import Any, Optional

try:
    import ray
    from ray import serve
    from ray.exceptions import ActorUnavailableError, RayActorError
except ImportError as err:  # the single-process server needs no Ray
    raise ImportError("medsam serve --replicas/--ray needs Ray Serve: pip install 'medsam-slicer-server[ray]'") from err

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import protocol
from .ray_asgi import InProcessApp
from .ray_routing import LOST, Gate, Placement, Router, ScaleOut

log = logging.getLogger("medsam_server.ray")

APP_NAME = "medsam"
REPLICA_HEADER = protocol.REPLICA_HEADER.lower()  # on every forwarded answer (ASGI header names are lower case)
REPLICA_LOST = (RayActorError, ActorUnavailableError)
INFO_TIMEOUT_SECONDS = 5.0
PROBE_TIMEOUT_SECONDS = 2.0
Headers = list[tuple[bytes, bytes]]


def server_app(settings):
    """The single-process server's ASGI app (loads its model at start-up)."""
    from .app import build_app
    from .connections import LoopbackHostOnly

    app = build_app(settings)
    return app if settings.tokens else LoopbackHostOnly(app)  # as medsam serve: no DNS rebinding without a token


QUIET = {"enable_access_log": False}  # a log line per request and hop costs more than the hop on a small machine


@serve.deployment(max_ongoing_requests=1000, health_check_period_s=2.0, logging_config=QUIET)
class ModelReplica:
    """One single-process server inside a Serve replica."""

    async def __init__(self, settings, index: int, threads: int):
        import torch

        torch.set_num_threads(max(1, threads))
        self.index, self.incarnation = index, uuid.uuid4().hex
        self.app = InProcessApp(server_app(settings), (settings.host, settings.port))
        await self.app.start()
        log.info("replica %d ready (incarnation %s)", index, self.incarnation[:8])

    def identity(self) -> tuple[int, str]:
        return self.index, self.incarnation

    async def forward(self, incarnation: Optional[str], method: str, path: str, query: bytes, headers: Headers,
                      body: bytes) -> tuple[str, Optional[tuple[int, Headers, bytes]]]:
        """The app's answer; None when ``incarnation`` names an earlier life of this replica (session lost)."""
        if incarnation is not None and incarnation != self.incarnation:
            return self.incarnation, None
        return self.incarnation, await self.app.request(method, path, query, headers, body)

    async def __del__(self):
        await self.app.stop()


def _error(status: int, message: str, code: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status, headers=headers)


def _lost(session_id: str) -> JSONResponse:
    return _error(410, f"the server lost session {session_id[:64]!r} (its replica stopped): upload the volume "
                       "again", "session_lost")


def _response(replica: int, answer: tuple[int, Headers, bytes]) -> Response:
    status, headers, body = answer
    response = Response(body, status_code=status)
    response.raw_headers = [*headers, (REPLICA_HEADER.encode(), str(replica).encode())]
    return response


def _session_id(path: str) -> Optional[str]:
    parts = path.split("/")
    return parts[2] if len(parts) >= 3 and parts[1] == "sessions" and parts[2] else None


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0}, logging_config=QUIET)
class Ingress:
    """Every HTTP request of the application: auth, limits, affinity; forwards to the replicas."""

    async def __init__(self, gate: Gate, *replicas):
        self.replicas = replicas
        self.router = Router(len(replicas), gate)
        self.tokens = [(t.encode(), hashlib.sha256(t.encode()).hexdigest()) for t in gate.tokens]
        self.max_body = gate.max_body_bytes
        self.watch = asyncio.get_running_loop().create_task(self._watch_replicas())

    async def _watch_replicas(self) -> None:
        """Learn which replicas are up (and their incarnations), so new sessions skip a dead one."""
        while True:
            for index, handle in enumerate(self.replicas):
                if self.router.incarnations[index] is None:
                    try:
                        _, incarnation = await asyncio.wait_for(handle.identity.remote(), PROBE_TIMEOUT_SECONDS)
                        self.router.seen(index, incarnation)
                    except (asyncio.TimeoutError, *REPLICA_LOST):
                        pass
            await asyncio.sleep(1.0)

    def owner(self, headers) -> Optional[str | Response]:
        """The caller's owner id, or the 401/403 answer."""
        if not self.tokens:
            return ""
        scheme, _, presented = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return _error(401, "this server needs a token: send 'Authorization: Bearer <token>'", "unauthorized",
                          {"WWW-Authenticate": "Bearer"})
        presented_bytes, owner = presented.strip().encode("utf-8", "surrogateescape"), ""
        for token, token_owner in self.tokens:  # every token compared, in constant time each
            if hmac.compare_digest(presented_bytes, token):
                owner = token_owner
        return owner or _error(403, "wrong token", "forbidden")

    async def __call__(self, request: Request) -> Response:
        path = request.url.path
        if path == "/health":
            return JSONResponse({"status": "ok"})
        owner = self.owner(request.headers)
        if isinstance(owner, Response):
            return owner
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        call = (request.method, path, request.scope.get("query_string", b""), list(request.scope["headers"]), body)
        session_id = _session_id(path)
        if path == "/info" and request.method == "GET":
            return await self._info(call)
        if path == "/sessions" and request.method == "POST":
            return await self._create(call, owner)
        if session_id is None:
            return await self._anywhere(call)
        return await self._session(session_id, call, owner)

    async def _body(self, request: Request) -> bytes | Response:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body:
                return _error(413, f"the request is longer than the {self.max_body} bytes this server accepts "
                                   "(medsam serve --max-upload-mb)", "too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _forward(self, replica: int, incarnation: Optional[str], call) -> tuple[str, Optional[tuple]]:
        return await self.replicas[replica].forward.remote(incarnation, *call)

    async def _create(self, call, owner: str) -> Response:
        refusal = self.router.refusal(owner)
        if refusal:
            return _error(429, refusal, "busy")
        ticket = uuid.uuid4().hex
        for replica in self.router.order():
            self.router.uploading[ticket] = Placement(replica, "uploading", owner)
            try:
                incarnation, answer = await self._forward(replica, None, call)
            except REPLICA_LOST:
                self.router.died(replica, self.router.incarnations[replica])
                continue  # nothing was created: the next replica takes the upload
            finally:
                self.router.uploading.pop(ticket, None)
            self.router.seen(replica, incarnation)
            if answer[0] == 201:
                session_id = json.loads(answer[2])["session"]
                self.router.sessions[session_id] = Placement(replica, incarnation, owner)
            return _response(replica, answer)
        return _error(503, "no model replica is running; Ray Serve is starting them again, retry shortly",
                      "no_replica")

    async def _session(self, session_id: str, call, owner: str) -> Response:
        placement = self.router.sessions.get(session_id)
        if placement is None:
            placement = await self._find(session_id, call, owner)
            if placement is None:
                return await self._anywhere(call)  # the replica's own "unknown session" answer
        if placement.incarnation == LOST:
            return _lost(session_id)
        placement.last_used = time.monotonic()
        try:
            incarnation, answer = await self._forward(placement.replica, placement.incarnation, call)
        except REPLICA_LOST:
            self.router.died(placement.replica, placement.incarnation)
            return _lost(session_id)
        if answer is None:  # the replica was replaced since the upload
            self.router.died(placement.replica, placement.incarnation)
            self.router.seen(placement.replica, incarnation)
            return _lost(session_id)
        if placement.owner == owner and _forgotten(answer, call):
            self.router.sessions.pop(session_id, None)
        return _response(placement.replica, answer)

    async def _find(self, session_id: str, call, owner: str) -> Optional[Placement]:
        """Ask every replica whether it holds the session (with the caller's own key and token)."""
        method, path, query, headers, body = call
        probe = ("GET", f"/sessions/{session_id}", b"", headers, b"")
        for replica in range(len(self.replicas)):
            try:
                incarnation, answer = await self._forward(replica, None, probe)
            except REPLICA_LOST:
                continue
            if answer[0] == 200:  # the caller's token and key opened it: the caller owns it
                placement = Placement(replica, incarnation, owner)
                self.router.sessions[session_id] = placement
                return placement
        return None

    async def _anywhere(self, call) -> Response:
        for replica in self.router.order():
            try:
                _, answer = await self._forward(replica, None, call)
                return _response(replica, answer)
            except REPLICA_LOST:
                continue
        return _error(503, "no model replica is running; retry shortly", "no_replica")

    async def _info(self, call) -> Response:
        """The first live replica's /info, with every replica's sessions, cache and worker added."""
        async def one(index: int):
            try:
                incarnation, answer = await asyncio.wait_for(self._forward(index, None, call), INFO_TIMEOUT_SECONDS)
            except (asyncio.TimeoutError, *REPLICA_LOST):
                return None
            self.router.seen(index, incarnation)
            return answer

        answers = await asyncio.gather(*(one(i) for i in range(len(self.replicas))))
        live = [answer for answer in answers if answer is not None]
        if not live:
            return _error(503, "no model replica is running; retry shortly", "no_replica")
        if live[0][0] != 200:  # e.g. a version mismatch: the replica's own answer
            return _response(answers.index(live[0]), live[0])
        infos = [json.loads(answer[2]) if answer is not None else None for answer in answers]
        merged = dict(next(info for info in infos if info is not None))  # a copy: infos stay per replica
        merged["sessions"] = sum(info["sessions"] for info in infos if info)
        merged["cache"] = {k: sum(info["cache"][k] for info in infos if info) if _count(v) else v
                           for k, v in merged["cache"].items()}  # with tokens, a replica shows only sizes
        merged["replicas"] = [{"replica": i, "alive": info is not None, "incarnation": self.router.incarnations[i],
                               **({k: info[k] for k in ("sessions", "cache", "worker", "device")} if info else {})}
                              for i, info in enumerate(infos)]
        merged["max_sessions_per_token"] = self.router.per_token
        return JSONResponse(merged)


def _count(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _forgotten(answer: tuple, call) -> bool:
    """Whether the replica no longer holds the session after its owner's request (deleted or expired)."""
    status, _, body = answer
    if call[0] == "DELETE" and status == 204 and call[1].count("/") == 2:
        return True
    return status == 404 and b'"unknown_session"' in body


def application(settings, scale: ScaleOut) -> serve.Application:
    """The Serve application: ``replicas`` one-replica model deployments behind one ingress."""
    replicas = [
        ModelReplica.options(name=f"MedSAMReplica{i}", ray_actor_options={"num_cpus": scale.num_cpus,
                                                                          "num_gpus": scale.num_gpus})
        .bind(settings, i, int(scale.num_cpus) or 1)
        for i in range(scale.replicas)]
    return Ingress.options(name="MedSAMIngress").bind(Gate.of(settings), *replicas)


def build(args: dict[str, Any]) -> serve.Application:
    """``serve deploy`` entry point (``import_path: medsam_server.ray_serve:build``); ``args`` are Settings
    fields, ScaleOut fields (``replicas``, ``num_cpus``, ``num_gpus``) and ``token_file`` (read where the
    application is built, as ``medsam serve --token-file`` reads it; tokens never sit in the config).
    ``host``/``port`` should repeat http_options' (without a token, only host 127.0.0.1 is accepted)."""
    from .app import Settings
    from .commands.serve import read_tokens

    args = {"host": "0.0.0.0", **args}  # the bind is in http_options, out of sight: exposed unless args say not
    tokens = read_tokens(args.pop("token_file", None))
    scale_fields = {f.name for f in dataclasses.fields(ScaleOut)}
    scale = ScaleOut(**{k: v for k, v in args.items() if k in scale_fields})
    settings = Settings(**{k: v for k, v in args.items() if k not in scale_fields}, tokens=tokens)
    settings.validate()
    return application(settings, scale)


def run(settings, scale: ScaleOut, address: Optional[str] = None, blocking: bool = True) -> None:
    """Start a local Ray cluster (or join one at ``address``) and serve the app on settings.host:port.

    With device auto/cuda and GPUs in the cluster, each replica asks for its own GPU (a share of one
    where there are fewer GPUs than replicas); Ray hands each replica its GPU as cuda:0."""
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:  # no dashboard: it accepts jobs from whoever reaches its port
            cores = os.cpu_count() or 1
            ray.init(include_dashboard=False, num_cpus=max(cores, math.ceil(scale.replicas * scale.num_cpus)))
    gpus = ray.cluster_resources().get("GPU", 0)
    if not scale.num_gpus and gpus and settings.device in ("auto", "cuda"):
        scale = dataclasses.replace(scale, num_gpus=min(1.0, gpus / scale.replicas))
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings, scale), name=APP_NAME, route_prefix="/", blocking=blocking)
