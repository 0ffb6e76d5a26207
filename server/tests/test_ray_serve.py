"""``medsam serve --replicas 2`` for real: a local Ray cluster, two LiteMedSAM replicas on the CPU, the real CT.

One cluster for the module (starting Ray and two replicas costs about a minute on the shared 2-core
machine); a single-process server with the same settings runs beside it for the "same answers" checks.
Both sides name the backend (torch, one thread: the same kernels, so the same bits), not ``auto``, which
would give the replicas ONNX Runtime and the single process the torch model it is handed.
Model work is kept to a few 128x128 axial slices of slicerio's CTChest4.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need the ray extra: pip install -e 'server[ray]'")
serve = pytest.importorskip("ray.serve", reason="the Ray tests need the ray extra: pip install -e 'server[ray]'")

from engine_data import LEFT_LUNG, RIGHT_LUNG, bounding_box, ct_volume  # noqa: E402
from medsam_server.app import Settings  # noqa: E402
from medsam_server.ray_routing import Gate, Placement, Router  # noqa: E402
from medsam_server.ray_serve import APP_NAME, QUIET_CLUSTER, REPLICA_HEADER, ScaleOut, application, init_local  # noqa: E402
from medsam_server.worker import ENCODER_NICE, MAX_NICE, _yield_cpu_to_decoding  # noqa: E402
from server_harness import free_port, load_client_module, running_server  # noqa: E402

client_module = load_client_module()

ALICE, BOB, CAROL = "alice-" + "a" * 26, "bob-" + "b" * 28, "carol-" + "c" * 26
WINDOW = "ct-lung"
SLICES = slice(19, 21)  # two axial slices with both lungs
SLICES_RANGE = range(SLICES.start, SLICES.stop)
MAX_SESSIONS, PER_TOKEN = 3, 2
BACKEND = "torch"  # explicit on both sides: the single process is handed conftest's torch model


def settings() -> Settings:
    return Settings(tokens=(ALICE, BOB, CAROL), device="cpu", backend=BACKEND, max_upload_mb=1,
                    max_sessions=MAX_SESSIONS, max_sessions_per_token=PER_TOKEN)


class Recording(client_module.MedSAMClient):
    """The Slicer module's client, keeping every answer's replica header and its raw body."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.answers: list[tuple[str, str, str | None, bytes]] = []

    def _request(self, method, path, *args, **kwargs):
        status, headers, body = super()._request(method, path, *args, **kwargs)
        self.answers.append((method, path, headers.get(REPLICA_HEADER), body))
        return status, headers, body


@pytest.fixture(scope="module")
def cluster():
    init_local(2, object_store_memory=200 * 2**20, log_to_driver=False, configure_logging=False)  # as serve's
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(application(settings(), ScaleOut(replicas=2)), name=APP_NAME, route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:  # also when the deployment fails: no Ray process of this test outlives it
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single(litemedsam):
    import torch

    assert litemedsam.backend == BACKEND
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # as each replica (one CPU each): the same kernels, so the same bits
    with running_server(settings(), model=litemedsam) as (url, _):
        yield url
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def scan():
    volume, labels, direction = ct_volume()
    sub = np.ascontiguousarray(volume[SLICES])
    boxes = [{lung: bounding_box(labels[SLICES][k] == lung).tolist() for lung in (RIGHT_LUNG, LEFT_LUNG)}
             for k in range(sub.shape[0])]
    return sub, direction, boxes


def reader_script(client, session, boxes) -> None:
    """What a reader does: boxes on each slice, a corrected box on a cached slice, a propagated annotation."""
    for k, lungs in enumerate(boxes):
        client.segment(session, [{"slice": k, "box": lungs[RIGHT_LUNG]}], window=WINDOW)
    client.segment(session, [{"slice": 0, "box": np.add(boxes[0][LEFT_LUNG], [1, -1, 2, 1]).tolist()}],
                   window=WINDOW)
    document = {"axis": 2, "window": WINDOW, "segments": [
        {"name": "left lung", "label": 6, "boxes": [{"slice": k, "box": lungs[LEFT_LUNG]}
                                                    for k, lungs in enumerate(boxes)]}]}
    client.annotate(session, document)


def envelopes(client) -> list[tuple[str, dict, bytes]]:
    """The model's answers: masks and labelmaps (envelopes; JSON answers carry random ids), the header without
    the run's timings, and the array's bytes."""
    answers = []
    for method, _, _, body in client.answers:
        if body[:4] == b"MSW1":
            header, array = client_module.decode_envelope(body, ("uint8", "uint16"))
            header.get("summary", {}).pop("seconds", None)
            answers.append((method, header, array.tobytes()))
    return answers


def info(url: str, token: str = ALICE) -> dict:
    return client_module.MedSAMClient(url, token=token).info()


def replica_of(client, session) -> int:
    replicas = {replica for _, path, replica, _ in client.answers if session.id in path}
    assert len(replicas) == 1, f"session {session.id} was served by replicas {replicas}"
    replica = replicas.pop()
    assert session.replica == replica  # the upload's answer named it; the Slicer module logs it
    return int(replica)


def test_each_session_stays_on_its_replica_and_answers_bit_identically_to_one_process(cluster, single, scan):
    sub, direction, boxes = scan
    alone = Recording(single, token=ALICE)
    reader_script(alone, alone.upload_volume(sub, direction=direction), boxes)

    alice, bob = Recording(cluster, token=ALICE), Recording(cluster, token=BOB)
    with ThreadPoolExecutor(2) as pool:  # at once: an upload under way counts for the replica it goes to
        sessions = list(pool.map(lambda client: client.upload_volume(sub, direction=direction), (alice, bob)))
    expected = envelopes(alone)
    assert len(expected) == len(boxes) + 2  # a mask per segment call and the annotation's labelmap
    assert [np.frombuffer(array, np.uint8).any() for _, _, array in expected] == [True] * len(expected)
    for client, session in zip((alice, bob), sessions):
        reader_script(client, session, boxes)
        assert envelopes(client) == expected  # headers and the arrays' bytes: masks and labelmap, bit for bit
    assert {info(url)["backend"] for url in (single, cluster)} == {BACKEND}

    # Affinity: every request of a session reached one replica; the two new sessions went to different ones.
    # (The annotate summaries above carry the cache's hits and misses: the same as in one process.)
    assert {replica_of(alice, sessions[0]), replica_of(bob, sessions[1])} == {0, 1}
    for token, client, session in ((ALICE, alice, sessions[0]), (BOB, bob, sessions[1])):
        status = info(cluster, token)  # with tokens, each caller sees its own sessions only, on each replica
        assert [r["sessions"] for r in status["replicas"]] == [int(replica_of(client, session) == i) for i in (0, 1)]
        assert status["sessions"] == 1 and all(r["alive"] for r in status["replicas"])
        assert status["cache"]["budget_bytes"] == sum(r["cache"]["budget_bytes"] for r in status["replicas"])
    check_load_figures(info(cluster, ALICE), sessions, bob)
    alice.delete(sessions[0])
    bob.delete(sessions[1])
    assert info(cluster)["sessions"] == 0


def check_load_figures(status: dict, sessions, other) -> None:
    """Alice's /info: each replica's aggregate load (everyone's sessions, cache bytes, hits and misses, one
    thread each), and nothing of Bob's session (its id, its owner, its shape)."""
    loads = [r["load"] for r in status["replicas"]]
    assert [load["sessions"] for load in loads] == [1, 1]  # alice's and bob's, one on each replica
    assert [load["threads"] for load in loads] == [1, 1]  # num_cpus 1 each: torch and ONNX Runtime threads
    for load in loads:  # each replica encoded its session's slices once, and reused them
        assert load["encoded_slices"] == len(SLICES_RANGE) and load["cache_bytes"] > 0
        assert load["cache_misses"] >= 1 and load["cache_hits"] >= 1
    assert status["load"]["sessions"] == 2 and status["load"]["cache_bytes"] == sum(x["cache_bytes"] for x in loads)
    assert set(loads[0]) == {"sessions", "cache_bytes", "cache_hits", "cache_misses", "encoded_slices", "queued",
                             "threads"}
    text = json.dumps(status)
    assert [secret for secret in (sessions[1].id, sessions[1].key, sessions[1].digest, BOB) if secret in text] == []
    assert other.session_info(sessions[1])["session"] == sessions[1].id  # bob's session is there all the same


def _nice(pid: int, tid: int) -> int:
    with open(f"/proc/{pid}/task/{tid}/stat") as handle:
        return int(handle.read().rsplit(")", 1)[1].split()[16])


def _descendants() -> dict[int, str]:
    """This test's own processes (Ray's, started by ``init_local``): pid -> command line (a worker's title)."""
    parents, commands = {}, {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as stat, open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
                commands[int(entry)] = cmdline.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:  # ended meanwhile
            continue

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    return {pid: command for pid, command in commands.items() if ours(pid)}


def test_the_request_path_runs_at_our_priority_and_each_replica_encodes_below_it(cluster):
    """Ray starts its workers at nice 15; on our local cluster Serve's proxy, the ingress and the replicas run at
    this process's nice value, and each replica's encoder thread 10 nicer, as in one process: a box on a cached
    slice is not slowed by background embedding (the encoder at nice 10 once ran above all of them at 15)."""
    own = os.getpriority(os.PRIO_PROCESS, 0)
    processes = _descendants()
    path = {name: [pid for pid, command in processes.items() if name in command]
            for name in ("ray::ProxyActor", f"ray::ServeReplica:{APP_NAME}:MedSAMIngress",
                         f"ray::ServeReplica:{APP_NAME}:MedSAMReplica")}
    assert [len(pids) for pids in path.values()] == [1, 1, 2], processes
    for pid in sum(path.values(), []):
        assert _nice(pid, pid) == own, processes[pid]
    encoder = min(MAX_NICE, own + ENCODER_NICE)
    for pid in path[f"ray::ServeReplica:{APP_NAME}:MedSAMReplica"]:  # the process's threads and its encoder's
        assert {_nice(pid, int(tid)) for tid in os.listdir(f"/proc/{pid}/task")} == {own, encoder}


def test_the_local_cluster_runs_serve_with_little_idle_work(cluster):
    """Serve's controller reconciles twice a second, not ten times, and Ray collects no Prometheus metrics: the
    settings reach the processes that read them (``bench/ray_serve.py --idle`` measures what they save)."""
    processes = _descendants()
    serve_processes = [pid for pid, command in processes.items()
                       if command.startswith(("ray::ServeController", "ray::ProxyActor", "ray::ServeReplica"))]
    assert len(serve_processes) == 5, processes  # the controller, the proxy, the ingress, 2 model replicas
    for pid in serve_processes + [pid for pid, command in processes.items() if "gcs_server" in command]:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            environment = dict(entry.split(b"=", 1) for entry in handle.read().split(b"\0") if b"=" in entry)
        for name, value in QUIET_CLUSTER.items():
            assert environment.get(name.encode()) == value.encode(), (processes[pid], name)


def test_on_a_cluster_of_nice_15_workers_the_encoder_still_yields_to_the_decoder():
    """On a joined cluster (``--ray``) Ray's workers keep nice 15: the encoder thread goes to 19, not to 10."""
    seen = {}

    def encoder_thread() -> None:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 15)  # a Ray worker's (this thread only)
        _yield_cpu_to_decoding(model=None)
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    thread = threading.Thread(target=encoder_thread)
    thread.start()
    thread.join()
    assert seen == {"nice": MAX_NICE}


def test_tokens_and_limits_hold_across_replicas(cluster, scan):
    sub, direction, _ = scan
    assert httpx.get(cluster + "/health").json() == {"status": "ok"}
    assert httpx.get(cluster + "/info").status_code == 401
    wrong = httpx.get(cluster + "/info", headers={"Authorization": "Bearer " + "x" * 32})
    assert wrong.status_code == 403 and wrong.json()["code"] == "forbidden"

    alice, bob, carol = (client_module.MedSAMClient(cluster, token=t) for t in (ALICE, BOB, CAROL))
    mine = [alice.upload_volume(sub[:1], direction=direction) for _ in range(PER_TOKEN)]
    with pytest.raises(client_module.ServerError, match="this token holds its maximum of 2") as refused:
        alice.upload_volume(sub[:1], direction=direction)
    assert refused.value.status == 429
    with pytest.raises(client_module.UnknownSession):  # another token cannot use alice's session
        bob.session_info(mine[0])
    bobs = bob.upload_volume(sub[:1], direction=direction)
    with pytest.raises(client_module.ServerError, match="maximum of 3 sessions") as full:
        carol.upload_volume(sub[:1], direction=direction)
    assert full.value.status == 429
    assert [r["sessions"] for r in info(cluster, ALICE)["replicas"]] == [1, 1]  # spread, least loaded first

    too_big = httpx.post(cluster + "/sessions", content=b"\0" * (2 * 2**20), headers={
        "Authorization": f"Bearer {CAROL}", "Content-Type": "application/vnd.medsam.array"})
    assert too_big.status_code == 413 and too_big.json()["code"] == "too_large"

    for session in mine:
        alice.delete(session)
    bob.delete(bobs)
    carol.delete(carol.upload_volume(sub[:1], direction=direction))  # room again once sessions are deleted
    assert info(cluster)["sessions"] == 0


def test_the_ingress_count_forgets_idle_sessions_and_those_of_a_replaced_replica():
    router = Router(2, Gate((), max_sessions=1, max_sessions_per_token=None, idle_seconds=60, max_body_bytes=1))
    router.incarnations = ["a", "b"]
    router.sessions["s"] = Placement(0, "a", "", last_used=time.monotonic())
    assert "maximum of 1 sessions" in router.refusal("")
    router.expire(now=time.monotonic() + 61)
    assert router.refusal("") is None and router.order() == [0, 1]

    router.sessions["t"] = Placement(1, "b", "")
    assert router.order() == [0, 1] and router.refusal("") is not None
    router.seen(1, "b2")  # replica 1 answered as a new incarnation: its old sessions are lost, not held
    assert router.sessions["t"].incarnation == "lost" and router.refusal("") is None


def _kill_replica(index: int) -> None:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{APP_NAME}#MedSAMReplica{index}#"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
            return
    raise AssertionError(f"no actor of replica {index}")


def test_a_killed_replica_loses_only_its_sessions_and_is_replaced(cluster, scan):
    sub, direction, boxes = scan
    alice, bob = Recording(cluster, token=ALICE), Recording(cluster, token=BOB)
    doomed, kept = alice.upload_volume(sub[:1], direction=direction), bob.upload_volume(sub[:1], direction=direction)
    request = [{"slice": 0, "box": boxes[0][RIGHT_LUNG]}]
    before = {s.id: c.segment(s, request, window=WINDOW)[0] for c, s in ((alice, doomed), (bob, kept))}
    victim = replica_of(alice, doomed)
    old = info(cluster)["replicas"][victim]["incarnation"]
    assert replica_of(bob, kept) != victim

    _kill_replica(victim)
    with pytest.raises(client_module.ServerError, match="lost session") as lost:
        alice.segment(doomed, request, window=WINDOW)
    assert lost.value.status == 410 and lost.value.code == "session_lost"
    np.testing.assert_array_equal(bob.segment(kept, request, window=WINDOW)[0], before[kept.id])
    with pytest.raises(client_module.ServerError, match="lost session"):  # and stays lost, quickly
        alice.session_info(doomed)

    deadline = time.monotonic() + 120
    while True:  # Serve starts a new replica in its place
        status = info(cluster)["replicas"][victim]
        if status["alive"] and status["incarnation"] not in (None, old):
            break
        assert time.monotonic() < deadline, "Ray Serve did not replace the killed replica within 120 s"
        time.sleep(1.0)
    again = alice.upload_volume(sub[:1], direction=direction)  # the fresh replica holds fewest: it takes it
    np.testing.assert_array_equal(alice.segment(again, request, window=WINDOW)[0], before[doomed.id])
    assert replica_of(alice, again) == victim
    alice.delete(again)
    bob.delete(kept)


SERVE_CONFIG = """
proxy_location: EveryNode
http_options: {host: 0.0.0.0, port: 8765}
applications:
  - name: medsam
    route_prefix: /
    import_path: medsam_server.ray_serve:build
    args: {replicas: 4, num_gpus: 1, device: cuda, token_file: TOKENS, max_sessions: 64, cache_gb: 16}
"""


def test_the_readme_serve_config_builds_the_application_with_the_token_file(tmp_path, monkeypatch):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from medsam_server.errors import InputError
    from medsam_server.ray_serve import build

    token_file = tmp_path / "tokens"
    token_file.write_text(f"# readers\n{ALICE}\n{BOB}\n")
    token_file.chmod(0o600)
    config = ServeDeploySchema.model_validate(yaml.safe_load(SERVE_CONFIG.replace("TOKENS", str(token_file))))
    args = config.applications[0].args
    assert isinstance(build(args), serve.Application)
    monkeypatch.delenv("MEDSAM_TOKEN", raising=False)
    with pytest.raises(InputError, match="refusing to listen on 0.0.0.0 without a token"):
        build({**args, "token_file": None})  # http_options' bind is not seen here: taken as exposed
