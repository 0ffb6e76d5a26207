"""Server latency on loopback: a box on a cached 512x512 slice over HTTP, against the encoder and a direct decode.

Measured side by side in one run, with one LiteMedSAM instance shared by the
server (uvicorn in a thread of this process, on 127.0.0.1) and the direct calls:

- encoder: ``PromptableModel.embed`` of the slice (what an uncached slice costs);
- direct decode: ``SliceStack.decode`` on the cached embedding (the engine, no HTTP);
- HTTP segment: ``MedSAMClient.segment`` on the cached slice (JSON request, the
  request thread, the model worker, zlib-encoded mask, decoded by the client);
- HTTP null: ``MedSAMClient.health`` (the cost of a loopback request by itself).

The image is scikit-image's ``camera()`` (512x512, shipped in the wheel) as a
one-slice volume. Then, each on a fresh ``medsam serve`` child process:

- flood (``server_flood.py``, issue 13): p50/p95 of one user's cached-slice segment while a
  second user floods the server, as a ratio of the idle figure (goal <= 2x);
- upload: the server's peak RSS growth while it receives one ``--upload-mib`` int16 volume
  (CTChest4 upsampled to 512x512, with noise so that it compresses like a scan), against the
  volume's size and the body's.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/server.py [--only latency|flood|upload] [--repeats 30]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

import server_flood

REPO = Path(__file__).resolve().parent.parent
BOX = [190, 60, 330, 420]  # the cameraman, (u = column, v = row)


def load_client():
    """The Slicer module's client, imported as Slicer imports it (``MedSAMSlicerLib`` imports no qt or torch)."""
    sys.path.insert(0, str(REPO / "MedSAMSlicer"))
    from MedSAMSlicerLib import client

    return client


def timed(functions: dict, repeats: int) -> dict[str, list[float]]:
    """Milliseconds of each call, the functions interleaved (so that a shared machine's load hits all alike),
    after two warm-up rounds."""
    out: dict[str, list[float]] = {name: [] for name in functions}
    for round_ in range(repeats + 2):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            if round_ >= 2:
                out[name].append((time.perf_counter() - start) * 1e3)
    return out


def serve_in_thread(app):
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


def memory_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field + ":"))


def upload_peak(mib: int) -> None:
    """Peak RSS growth of a real ``medsam serve`` receiving one volume of ``mib`` MiB (Linux: /proc)."""
    import tempfile

    import httpx

    ct = server_flood.ct_volume()
    volume = np.repeat(np.repeat(np.resize(ct, (mib * 2, 128, 128)), 4, axis=1), 4, axis=2)  # 0.5 MiB a slice
    volume = (volume + np.random.default_rng(0).normal(0, 8, volume.shape)).astype(np.int16)
    body = server_flood.envelope(volume)
    with tempfile.TemporaryDirectory() as folder:
        process, url = server_flood.start_server(Path(folder))
        try:
            server_flood.wait_until_up(httpx, url, process)
            bob = server_flood.User(httpx, url, server_flood.BOB)
            bob.upload(ct[:1])  # the route warm
            time.sleep(1.0)
            base = memory_kib(process.pid, "VmRSS")
            with open(f"/proc/{process.pid}/clear_refs", "w") as handle:
                handle.write("5")  # VmHWM from here on
            bob.upload(volume)
            time.sleep(0.5)
            peak, held = memory_kib(process.pid, "VmHWM") - base, memory_kib(process.pid, "VmRSS") - base
        finally:
            process.terminate()
            process.wait(timeout=60)
    size, sent = volume.nbytes / 2**20, len(body) / 2**20
    print(f"upload of a {size:.0f} MiB int16 volume ({sent:.1f} MiB as sent): server RSS peak "
          f"+{peak / 1024:.0f} MiB = {peak / 1024 / size:.2f}x the volume ({peak / 1024 / sent:.2f}x the body), "
          f"+{held / 1024:.0f} MiB held after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("latency", "flood", "upload"), help="one part (default: all)")
    parser.add_argument("--upload-mib", type=int, default=96, help="the upload's volume in MiB (default 96)")
    server_flood.add_arguments(parser)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--encoder-repeats", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--backend", default="torch", choices=("torch", "onnx"))
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.only in (None, "latency"):
        latency(args)
    if args.only in (None, "flood"):
        server_flood.report(args, server_flood.measure(args))
    if args.only in (None, "upload"):
        upload_peak(args.upload_mib)


def latency(args: argparse.Namespace) -> None:
    import torch
    from skimage import data

    from medsam_server.app import Settings, build_app
    from medsam_server.embeddings import EmbeddingCache
    from medsam_server.models import load_model
    from medsam_server.stack import SliceStack

    if args.threads:
        torch.set_num_threads(args.threads)
    client_module = load_client()
    model = load_model("litemedsam", device=args.device, backend=args.backend)
    cache = EmbeddingCache()
    image = data.camera()[np.newaxis]  # (1, 512, 512) uint8
    server, thread, url = serve_in_thread(build_app(Settings(backend=args.backend), model=model, cache=cache))
    try:
        client = client_module.MedSAMClient(url)
        client.check_compatible()
        session = client.upload_volume(image)
        client.wait(session, client.prefetch(session))

        stack = SliceStack(image, np.eye(3), 2, "auto", model, cache)
        embedding, hits = stack.embeddings([0])
        assert hits == 1, "the server's prefetch should have cached the slice"
        view = stack.view.to_view(stack.u8[0])
        encoder = timed({"encoder": lambda: model.embed([view])}, args.encoder_repeats)["encoder"]
        masks = {}
        times = timed({"direct": lambda: stack.decode(embedding, np.array([BOX])),
                       "http": lambda: masks.update(client.segment(session, [{"slice": 0, "box": BOX}])),
                       "null": client.health}, args.repeats)
        direct, http, null = times["direct"], times["http"], times["null"]
        reference = stack.decode(embedding, np.array([BOX]))[0] > 0.5
        agree = float((masks[0] == reference).mean())
        client.delete(session)
    finally:
        server.should_exit = True
        thread.join(timeout=30)

    med = {name: statistics.median(v) for name, v in
           (("encoder", encoder), ("direct", direct), ("http", http), ("null", null))}
    p90 = float(np.percentile(http, 90))
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"{args.backend} backend on {model.device}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.1f}; 512x512 slice (skimage camera), {args.repeats} repeats, medians")
    print(f"  encoder, one slice (uncached)          {med['encoder']:9.1f} ms")
    print(f"  direct decode on the cached slice      {med['direct']:9.1f} ms")
    print(f"  HTTP segment on the cached slice       {med['http']:9.1f} ms   (p90 {p90:.1f} ms)")
    print(f"  HTTP null request (/health)            {med['null']:9.1f} ms")
    print(f"  HTTP overhead (segment - direct)       {med['http'] - med['direct']:9.1f} ms")
    print(f"  segment / encoder                      {med['http'] / med['encoder']:9.3f}")
    print(f"  segment / direct decode                {med['http'] / med['direct']:9.3f}")
    print(f"  target <= 20 ms for a cached segment:  {'met' if med['http'] <= 20 else 'not met on this machine'}")
    print(f"  HTTP mask == direct mask:              {agree:.5f} of pixels")


if __name__ == "__main__":
    main()
