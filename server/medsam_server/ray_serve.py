"""``medsam serve --replicas N``: the same HTTP API on N model replicas under Ray Serve, with session affinity.

Each replica is its own one-replica Serve deployment that builds the single-process server app in process
(its own model, worker, embedding cache and sessions) and answers requests forwarded to it unchanged
(method, path, query, headers, body -> status, headers, body): its answers are those of one ``medsam
serve`` by construction. One ingress deployment, an ASGI app, receives every HTTP request from Serve's
proxy, checks the caller as the single-process server does (``app.Callers``: API version, token in
constant time), enforces the limits that span replicas (sessions in all, sessions per token, body size),
and forwards each session's requests to the replica that created it.

Why N one-replica deployments and not Serve's model multiplexing (session id as the model id): multiplexed
routing only *prefers* the replica that has the id, it falls back to the least-loaded replica when that one
is busy or after a 1-2 s matching timeout, and learns a new id only when the replica reports it; a session
is state, not a cache entry, so a request that lands elsewhere would fail. A handle to each replica's
deployment reaches exactly one replica, that Serve restarts when it dies (stable public API; a custom
request router could do the same inside one deployment but is alpha).

A replica that dies takes its sessions with it: each replica has an incarnation id, the ingress records
the one that created each session, and a session whose replica died or was replaced raises
:class:`~.errors.SessionLost` (answered as ``{"code": "session_lost"}``); the client uploads again. Other
replicas' sessions are untouched, and new sessions go to the live replica with the fewest sessions. The
ingress's session map is a cache: a session it does not know (the ingress itself restarted) is looked up
on every replica.

No status code is chosen here: a replica's answer goes back with its own, and the ingress's own refusals
are domain errors that ``api.error_response`` turns into answers through ``api.ERRORS``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
from typing import Any, Optional

try:
    import ray
    from ray import serve
    from ray.exceptions import ActorUnavailableError, RayActorError
except ImportError as err:  # the single-process server needs no Ray
    raise ImportError("medsam serve --replicas/--ray needs Ray Serve: pip install './server[ray]' from the "
                      "MedSAMSlicer checkout") from err

from . import api, protocol, ray_asgi
from .app import Callers
from .errors import Busy, NoReplica, SessionLost, UnknownSession
from .ray_asgi import InProcessApp
from .ray_routing import LOST, Gate, Placement, Router, ScaleOut

log = logging.getLogger("medsam_server.ray")

APP_NAME = "medsam"
REPLICA_HEADER = protocol.REPLICA_HEADER.lower()  # on every forwarded answer (ASGI header names are lower case)
REPLICA_LOST = (RayActorError, ActorUnavailableError)
INFO_TIMEOUT_SECONDS = 5.0
PROBE_TIMEOUT_SECONDS = 2.0
UNKNOWN_SESSION_CODE = api.status_for(UnknownSession())[1]
SESSION_PREFIX = protocol.ROUTE_SESSIONS + "/"
Headers = list[tuple[bytes, bytes]]
Answer = tuple[int, Headers, bytes]
Call = tuple[str, str, bytes, Headers, bytes]  # method, path, query, headers, body


def server_app(settings):
    """The single-process server's ASGI app (it loads its model at start-up) and its :class:`~.app.Server`."""
    from .app import Server
    from .connections import LoopbackHostOnly

    server = Server(settings)
    app = api.create_app(server)
    return (app if settings.tokens else LoopbackHostOnly(app)), server  # as medsam serve: no DNS rebinding


#: Ray starts its worker processes at nice 15 by default (below its own daemons). Here they are the request path:
#: Serve's proxy, the ingress and the replica's event loop and decoder. The model worker runs its encoder 10 nicer
#: than its process (``worker.ENCODER_NICE``), so at 15 the encoder sat at 19, a 2.4:1 CPU share over the request
#: path instead of one process's 9:1. A local cluster of ours runs its workers at nice 0, as one process runs.
WORKER_NICENESS = {"RAY_worker_niceness": "0"}
#: What an idle local cluster spends CPU on, measured with one replica (``bench/ray_serve.py --idle``): Serve's
#: controller reconciling 10 times a second, Ray's metrics (GCS, dashboard agent) and each Serve actor's metrics
#: export 10 times a second: 5-6 % of a 2-core machine together, taken from the model. A local cluster of ours
#: reconciles twice a second (a dead replica is noticed up to 0.4 s later), collects no Prometheus metrics
#: (``/info`` reports ours) and exports Serve's once a second; a variable the user has set wins.
QUIET_CLUSTER = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5", "RAY_enable_metrics_collection": "0",
                 "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000"}
QUIET = {"enable_access_log": False}  # a log line per request and hop costs more than the hop on a small machine


@serve.deployment(max_ongoing_requests=1000, health_check_period_s=2.0, logging_config=QUIET)
class ModelReplica:
    """One single-process server inside a Serve replica, its model limited to the replica's CPU share."""

    async def __init__(self, settings, index: int, threads: int):
        import torch

        self.threads = max(1, threads)
        torch.set_num_threads(self.threads)
        settings = dataclasses.replace(settings, threads=settings.threads or self.threads)  # ONNX Runtime's too
        self.index, self.incarnation = index, uuid.uuid4().hex
        app, self.server = server_app(settings)
        self.app = InProcessApp(app, (settings.host, settings.port))
        await self.app.start()
        log.info("replica %d ready (incarnation %s, %d threads)", index, self.incarnation[:8], settings.threads)

    def identity(self) -> tuple[int, str]:
        return self.index, self.incarnation

    def load(self) -> dict:
        """This replica's aggregate figures (``app.Server.load``) and its threads: nothing of any one session."""
        return {**self.server.load(), "threads": self.server.settings.threads}

    async def forward(self, incarnation: Optional[str], method: str, path: str, query: bytes, headers: Headers,
                      body: bytes) -> tuple[str, Optional[Answer]]:
        """The app's answer; None when ``incarnation`` names an earlier life of this replica (session lost)."""
        if incarnation is not None and incarnation != self.incarnation:
            return self.incarnation, None
        return self.incarnation, await self.app.request(method, path, query, headers, body)

    async def __del__(self):
        await self.app.stop()


def _lost(session_id: str) -> SessionLost:
    return SessionLost(f"the server lost session {session_id[:64]!r} (its replica stopped): upload the volume again")


def _no_replica() -> NoReplica:
    return NoReplica("no model replica is running; Ray Serve is starting them again, retry shortly")


def _session_id(path: str) -> Optional[str]:
    if not path.startswith(SESSION_PREFIX):
        return None
    return path[len(SESSION_PREFIX):].split("/")[0] or None


def _error_code(answer: Answer) -> Optional[str]:
    """The ``code`` of an error answer (``{"error": ..., "code": ...}``), None for any other answer."""
    _, headers, body = answer
    if dict(headers).get(b"content-type", b"").split(b";")[0] != protocol.JSON_TYPE.encode():
        return None
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document.get("code", "") if isinstance(document, dict) and "error" in document else None


@serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0}, logging_config=QUIET)
@serve.ingress()
class Ingress:
    """Every HTTP request of the application (as ASGI): the caller, the limits, affinity; forwards to replicas."""

    async def __init__(self, gate: Gate, *replicas):
        self.replicas = replicas
        self.router = Router(len(replicas), gate)
        self.callers = Callers(gate.tokens)  # the single-process server's own check
        self.max_body = gate.max_body_bytes
        self.watch = asyncio.get_running_loop().create_task(self._watch_replicas())

    def __serve_build_asgi_app__(self):
        async def app(scope: dict, receive, send) -> None:  # a coroutine function: ASGI 3 to uvicorn's eyes
            await self.asgi(scope, receive, send)

        return app

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

    async def asgi(self, scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await ray_asgi.lifespan(receive, send)
        try:
            replica, answer = await self._answer(scope, receive)
        except Exception as err:  # a domain error becomes its answer through api.ERRORS
            if not isinstance(err, tuple(api.ERRORS)):
                log.error("unexpected error on %s %s", scope["method"], scope["path"], exc_info=err)
            return await api.error_response(err)(scope, receive, send)
        status, headers, body = answer
        if replica is not None:
            headers = [*headers, (REPLICA_HEADER.encode(), str(replica).encode())]
        await ray_asgi.send_answer(send, status, headers, body)

    async def _answer(self, scope: dict, receive) -> tuple[Optional[int], Answer]:
        method, path = scope["method"], scope["path"]
        if path == protocol.ROUTE_HEALTH:
            return await self._anywhere((method, path, scope["query_string"], list(scope["headers"]), b""))
        owner = self.callers.owner(ray_asgi.header(scope, "authorization") or "",
                                   ray_asgi.header(scope, protocol.API_VERSION_HEADER))
        body = await ray_asgi.read_body(scope, receive, self.max_body)
        call = (method, path, scope["query_string"], list(scope["headers"]), body)
        if path == protocol.ROUTE_INFO and method == "GET":
            return await self._info(call)
        if path == protocol.ROUTE_SESSIONS and method == "POST":
            return await self._create(call, owner)
        session_id = _session_id(path)
        if session_id is None:
            return await self._anywhere(call)
        return await self._session(session_id, call, owner)

    async def _forward(self, replica: int, incarnation: Optional[str], call: Call) -> tuple[str, Optional[Answer]]:
        return await self.replicas[replica].forward.remote(incarnation, *call)

    async def _create(self, call: Call, owner: str) -> tuple[int, Answer]:
        refusal = self.router.refusal(owner)
        if refusal:
            raise Busy(refusal)
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
            if _error_code(answer) is None:  # created: the answer names the session
                session_id = json.loads(answer[2])["session"]
                self.router.sessions[session_id] = Placement(replica, incarnation, owner)
            return replica, answer
        raise _no_replica()

    async def _session(self, session_id: str, call: Call, owner: str) -> tuple[int, Answer]:
        placement = self.router.sessions.get(session_id)
        if placement is None:
            placement = await self._find(session_id, call, owner)
            if placement is None:
                return await self._anywhere(call)  # the replica's own "unknown session" answer
        if placement.incarnation == LOST:
            raise _lost(session_id)
        placement.last_used = time.monotonic()
        try:
            incarnation, answer = await self._forward(placement.replica, placement.incarnation, call)
        except REPLICA_LOST:
            self.router.died(placement.replica, placement.incarnation)
            raise _lost(session_id) from None
        if answer is None:  # the replica was replaced since the upload
            self.router.died(placement.replica, placement.incarnation)
            self.router.seen(placement.replica, incarnation)
            raise _lost(session_id)
        if placement.owner == owner and _forgotten(answer, call, session_id):
            self.router.sessions.pop(session_id, None)
        return placement.replica, answer

    async def _find(self, session_id: str, call: Call, owner: str) -> Optional[Placement]:
        """Ask every replica whether it holds the session (with the caller's own key and token)."""
        headers = call[3]
        probe = ("GET", protocol.ROUTE_SESSION.format(session_id=session_id), b"", headers, b"")
        for replica in range(len(self.replicas)):
            try:
                incarnation, answer = await self._forward(replica, None, probe)
            except REPLICA_LOST:
                continue
            if _error_code(answer) is None:  # the caller's token and key opened it: the caller owns it
                placement = Placement(replica, incarnation, owner)
                self.router.sessions[session_id] = placement
                return placement
        return None

    async def _anywhere(self, call: Call) -> tuple[int, Answer]:
        for replica in self.router.order():
            try:
                _, answer = await self._forward(replica, None, call)
                return replica, answer
            except REPLICA_LOST:
                continue
        raise _no_replica()

    async def _info(self, call: Call) -> tuple[Optional[int], Answer]:
        """The first live replica's /info with every replica's sessions, cache and worker as the caller may
        see them, and each replica's aggregate ``load`` (``app.Server.load``: counts and bytes only)."""
        async def one(index: int):
            try:
                (incarnation, answer), load = await asyncio.wait_for(asyncio.gather(
                    self._forward(index, None, call), self.replicas[index].load.remote()), INFO_TIMEOUT_SECONDS)
            except (asyncio.TimeoutError, *REPLICA_LOST):
                return None, None
            self.router.seen(index, incarnation)
            return answer, load

        answers, loads = zip(*await asyncio.gather(*(one(i) for i in range(len(self.replicas)))))
        live = [answer for answer in answers if answer is not None]
        if not live:
            raise _no_replica()
        if _error_code(live[0]) is not None:  # e.g. a version mismatch: the replica's own answer
            return answers.index(live[0]), live[0]
        infos = [json.loads(answer[2]) if answer is not None else None for answer in answers]
        merged = dict(next(info for info in infos if info is not None))  # a copy: infos stay per replica
        merged["sessions"] = sum(info["sessions"] for info in infos if info)
        merged["cache"] = {k: sum(info["cache"][k] for info in infos if info) if _count(v) else v
                           for k, v in merged["cache"].items()}  # with tokens, a replica shows only sizes
        merged["replicas"] = [{"replica": i, "alive": info is not None, "incarnation": self.router.incarnations[i],
                               **({k: info[k] for k in ("sessions", "cache", "worker", "device")} if info else {}),
                               **({"load": load} if load else {})}
                              for i, (info, load) in enumerate(zip(infos, loads))]
        merged["load"] = {k: sum(load[k] for load in loads if load) for k in next(filter(None, loads))}
        merged["max_sessions_per_token"] = self.router.per_token
        status, headers, _ = live[0]
        body = json.dumps(merged).encode()
        headers = [(k, str(len(body)).encode() if k == b"content-length" else v) for k, v in headers]
        return None, (status, headers, body)


def _count(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _forgotten(answer: Answer, call: Call, session_id: str) -> bool:
    """Whether the replica no longer holds the session after its owner's request (deleted or expired)."""
    code = _error_code(answer)
    deleted = call[0] == "DELETE" and call[1] == protocol.ROUTE_SESSION.format(session_id=session_id)
    return (deleted and code is None) or code == UNKNOWN_SESSION_CODE


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


def init_local(num_cpus: int, **options: Any) -> None:
    """Start a local Ray cluster for the server: no dashboard (it accepts jobs from whoever reaches its port),
    Ray's worker processes at the nice value of this one (``WORKER_NICENESS``), little idle work (``QUIET_CLUSTER``)."""
    os.environ.update(WORKER_NICENESS)  # read by the raylet and by each worker process it starts
    for name, value in QUIET_CLUSTER.items():
        os.environ.setdefault(name, value)
    ray.init(include_dashboard=False, num_cpus=num_cpus, **options)


def _stop_on_signals(stop: threading.Event, blocking: bool) -> None:
    if blocking:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: stop.set())


def run(settings, scale: ScaleOut, address: Optional[str] = None, blocking: bool = True,
        watch_pid: Optional[int] = None) -> None:
    """Start a local Ray cluster (or join one at ``address``) and serve the app on settings.host:port.

    With device auto/cuda and GPUs in the cluster, each replica asks for its own GPU (a share of one
    where there are fewer GPUs than replicas); Ray hands each replica its GPU as cuda:0. ``blocking``:
    serve until SIGTERM, SIGINT or the end of process ``watch_pid``, then stop what this call started (the
    local cluster, all its processes, as ``ray stop`` would; on a joined cluster, only this application)."""
    stop = threading.Event()  # set by SIGTERM/SIGINT: a signal during start-up stops cleanly too
    _stop_on_signals(stop, blocking)
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            init_local(max(os.cpu_count() or 1, math.ceil(scale.replicas * scale.num_cpus)))
    _stop_on_signals(stop, blocking)  # again: ray.init installs its own SIGTERM handler (it aborts the driver)
    gpus = ray.cluster_resources().get("GPU", 0)
    if not scale.num_gpus and gpus and settings.device in ("auto", "cuda"):
        scale = dataclasses.replace(scale, num_gpus=min(1.0, gpus / scale.replicas))
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(application(settings, scale), name=APP_NAME, route_prefix="/", blocking=False)
    if not blocking:
        return
    if watch_pid is not None:
        from .commands.serve import watch_process

        watch_process(watch_pid, stop.set)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        log.info("medsam serve: stopping the Ray Serve application")
        if address:
            serve.delete(APP_NAME)  # the cluster is someone else's: take only this application off it
        else:
            serve.shutdown()
        ray.shutdown()  # a cluster this call started goes with all its processes
