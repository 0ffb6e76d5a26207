"""One user's cached-slice segment while a second user floods the server, as a ratio of the idle figure.

A real ``medsam serve`` (LiteMedSAM, a child process on 127.0.0.1, two tokens) and two
users, measured side by side in one run:

- bob: a box on a one-slice session whose embedding is cached (what an annotator does
  all day), ``--requests`` times while the server is idle, then as many times while
- alice floods: ``--flooders`` threads each sending segment requests on slices nobody
  has embedded (a noise volume of ``--slices`` slices) and giving up on each after
  ``--patience`` seconds, as an impatient or hostile client would, plus prefetch jobs.

Prints bob's p50/p95 idle and flooded and their ratio (issue 13's goal: at most 2x),
and what became of alice's requests. ``bench/server.py`` runs it after its latency figures
(``--only flood`` for this part alone); run by itself (one torch thread: the server's two model
threads share the cores, as in the tests):
``OMP_NUM_THREADS=1 .venv/bin/python bench/server_flood.py [--requests 30] [--flooders 8]``.
Before issue 13 bob's first request under the flood did not answer within 300 s; the README
has the figures measured since.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np

ALICE, BOB = "alice-" + "a" * 26, "bob-" + "b" * 28
ENVELOPE = "application/vnd.medsam.array"
BOX = [30, 30, 100, 100]


def envelope(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    text = json.dumps({"array": {"dtype": array.dtype.name, "shape": list(array.shape)}}).encode()
    return b"MSW1" + len(text).to_bytes(4, "big") + text + zlib.compress(array.tobytes(), 1)


class User:
    def __init__(self, httpx, url: str, token: str):
        self.httpx, self.url, self.token = httpx, url, token

    def headers(self, key=None, **extra) -> dict:
        return {"Authorization": f"Bearer {self.token}", **({"X-MedSAM-Session-Key": key} if key else {}), **extra}

    def upload(self, array: np.ndarray) -> tuple[str, str]:
        answer = self.httpx.post(f"{self.url}/sessions", content=envelope(array), timeout=120,
                                 headers=self.headers(**{"Content-Type": ENVELOPE}))
        answer.raise_for_status()
        return answer.json()["session"], answer.json()["key"]

    def post(self, session, route: str, body: dict, timeout: float):
        return self.httpx.post(f"{self.url}/sessions/{session[0]}/{route}", content=json.dumps(body).encode(),
                               headers=self.headers(session[1], **{"Content-Type": "application/json"}),
                               timeout=timeout)

    def segment(self, session, index: int, timeout: float = 300.0) -> float:
        start = time.perf_counter()
        answer = self.post(session, "segment", {"window": "ct-lung", "boxes": [{"slice": index, "box": BOX}]},
                           timeout)
        answer.raise_for_status()
        return (time.perf_counter() - start) * 1e3


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    tokens = folder / "tokens"
    tokens.write_text(f"{ALICE}\n{BOB}\n")
    tokens.chmod(0o600)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = open(folder / "server.log", "wb")  # noqa: SIM115 - held by the child for its life
    process = subprocess.Popen(
        [sys.executable, "-m", "medsam_server.cli", "serve", "--port", str(port), "--device", "cpu",
         "--log-level", "warning", "--token-file", str(tokens)], stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "MEDSAM_TOKEN": ""})
    return process, f"http://127.0.0.1:{port}"


def wait_until_up(httpx, url: str, process: subprocess.Popen) -> None:
    for _ in range(720):
        if process.poll() is not None:
            raise SystemExit(f"medsam serve exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit("medsam serve did not start in 3 minutes")


def flood(alice: User, session, slices: int, patience: float, stop: threading.Event, counts: dict) -> None:
    rng = random.Random(threading.get_ident())
    while not stop.is_set():
        try:
            alice.segment(session, rng.randrange(slices), timeout=patience)
            counts["answered"] += 1
        except alice.httpx.TimeoutException:
            counts["abandoned"] += 1
        except alice.httpx.HTTPStatusError:
            counts["refused"] += 1
        except alice.httpx.HTTPError:  # the server is going away at the end
            return


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--requests", type=int, default=30, help="bob's segments per phase (default 30)")
    parser.add_argument("--flooders", type=int, default=8, help="alice's threads (default 8)")
    parser.add_argument("--slices", type=int, default=400, help="slices of alice's noise volume (default 400)")
    parser.add_argument("--patience", type=float, default=2.0, help="alice gives up after this many s (default 2)")
    parser.add_argument("--give-up", type=float, default=120.0,
                        help="bob's segment counts as failed after this many s (default 120)")


def ct_volume() -> np.ndarray:
    """slicerio's CTChest4, (k, j, i) int16 HU (34 axial slices of 128 x 128)."""
    import SimpleITK as sitk
    import slicerio

    path = os.path.join(os.path.dirname(slicerio.__file__), "data", "CTChest4.nrrd")
    return sitk.GetArrayFromImage(sitk.ReadImage(path)).astype(np.int16)


def measure(args: argparse.Namespace) -> dict:
    """Bob's idle and flooded latencies (ms) and what became of alice's requests, on a fresh ``medsam serve``."""
    import httpx

    ct = ct_volume()
    noise = np.random.default_rng(0).integers(-1000, 1000, (args.slices, 128, 128), dtype=np.int16)
    with tempfile.TemporaryDirectory() as folder:
        process, url = start_server(Path(folder))
        try:
            wait_until_up(httpx, url, process)
            alice, bob = User(httpx, url, ALICE), User(httpx, url, BOB)
            mine = bob.upload(ct[20:21])
            for _ in range(3):  # the first embeds the slice; the others warm the decoder
                bob.segment(mine, 0)
            idle = [bob.segment(mine, 0) for _ in range(args.requests)]
            theirs = alice.upload(noise)
            alice.post(theirs, "prefetch", {"window": "ct-lung"}, 60).raise_for_status()
            stop, counts = threading.Event(), {"answered": 0, "abandoned": 0, "refused": 0}
            threads = [threading.Thread(target=flood, args=(alice, theirs, args.slices, args.patience, stop, counts),
                                        daemon=True) for _ in range(args.flooders)]
            for thread in threads:
                thread.start()
            time.sleep(args.patience + 1)  # the flood in full swing: every flooder has a request waiting
            flooded = []
            for _ in range(args.requests):
                try:
                    flooded.append(bob.segment(mine, 0, timeout=args.give_up))
                except httpx.TimeoutException:
                    flooded.append(float("inf"))
                    break  # one is enough to show it; the rest would take as long
            stop.set()
            for thread in threads:
                thread.join(timeout=args.patience + 30)
        finally:
            process.terminate()
            process.wait(timeout=60)
    return {"idle": idle, "flooded": flooded, "counts": counts}


def report(args: argparse.Namespace, result: dict) -> None:
    (idle50, idle95), (flood50, flood95) = percentiles(result["idle"]), percentiles(result["flooded"])
    counts = result["counts"]
    print(f"bob's segment on a cached slice, {args.requests} requests a phase "
          f"(alice: {args.flooders} threads, gives up after {args.patience:.0f} s, plus a prefetch):")
    print(f"  idle     p50 {idle50:8.1f} ms   p95 {idle95:8.1f} ms")
    print(f"  flooded  p50 {flood50:8.1f} ms   p95 {flood95:8.1f} ms")
    print(f"  ratio    p50 {flood50 / idle50:8.2f} x    p95 {flood95 / idle95:8.2f} x   (goal <= 2 x)")
    print(f"alice's requests: {counts['answered']} answered, {counts['abandoned']} abandoned, "
          f"{counts['refused']} refused (429: too many slices waiting)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    report(args, measure(args))


if __name__ == "__main__":
    main()
