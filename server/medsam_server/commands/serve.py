"""``medsam serve``: the inference server (the app of ``app.build_app`` under uvicorn).

Binds 127.0.0.1 by default; any other address needs a token. Tokens come from
``--token-file`` (one token per line, e.g. one per user: each token owns its
sessions; blank lines and ``#`` comments are skipped) or the ``MEDSAM_TOKEN``
environment variable, never from the command line, where other users could read it.

``--watch-pid PID`` ties the server's life to another process (the Slicer module passes
Slicer's own pid): once that process is gone, or a zombie, the server shuts down cleanly
within about a second.
"""

from __future__ import annotations

import argparse
import logging
import os
import stat
import sys
import threading
from collections.abc import Callable

from ..errors import InputError
from ..models import add_model_arguments
from ..protocol import DEFAULT_HOST, DEFAULT_PORT

WATCH_PERIOD_SECONDS = 0.5

TOKEN_ENV = "MEDSAM_TOKEN"


def register(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Serve a model over HTTP: upload a volume once, then boxes -> masks in milliseconds on "
                          "cached slices. Binds 127.0.0.1 unless told otherwise; another address needs a token.")
    parser.add_argument("--host", default=DEFAULT_HOST, help="address to bind (default %(default)s)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="TCP port (default %(default)s)")
    add_model_arguments(parser)
    parser.add_argument("--token-file", metavar="FILE",
                        help=f"file of bearer tokens, one per line (or set {TOKEN_ENV}); needed off loopback")
    parser.add_argument("--cache-gb", type=float, default=2.0, help="embedding cache size in GiB (default 2)")
    parser.add_argument("--cache-fp16", action="store_true", help="store embeddings as fp16 (half the memory)")
    parser.add_argument("--max-upload-mb", type=float, default=1024.0,
                        help="largest request body in MiB, as sent (compressed) (default 1024)")
    parser.add_argument("--idle-minutes", type=float, default=60.0,
                        help="a session unused this long is dropped (default 60)")
    parser.add_argument("--max-sessions", type=int, default=16, help="sessions held at once (default 16)")
    parser.add_argument("--max-sessions-per-token", type=int, metavar="N",
                        help="sessions one token may hold (default: half of --max-sessions with several tokens)")
    parser.add_argument("--share-cache", action="store_true",
                        help="let tokens reuse each other's embeddings (by default each token has its own, so that "
                             "no user can learn by timing which scans another opened)")
    parser.add_argument("--watch-pid", type=int, metavar="PID",
                        help="exit by itself once process PID has ended (e.g. the Slicer that started it)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    parser.add_argument("--replicas", type=int, metavar="N",
                        help="N model replicas on Ray Serve, each with its own worker and cache (and GPU where there "
                             "are several); a session stays on its replica (needs the ray extra)")
    parser.add_argument("--ray", metavar="ADDRESS",
                        help="join the Ray cluster at ADDRESS (e.g. auto, or head-host:6379) instead of starting one")
    parser.set_defaults(func=run)


def read_tokens(token_file: str | None) -> tuple[str, ...]:
    """Tokens from a file (one per line) or the environment; empty when neither is given."""
    if token_file:
        try:
            mode = os.stat(token_file).st_mode
            with open(token_file, encoding="utf-8") as handle:
                lines = handle.read().splitlines()
        except OSError as err:
            raise InputError(f"cannot read the token file {token_file}: {err.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            print(f"medsam serve: warning: {token_file} is readable by other users; chmod 600 it", file=sys.stderr)
        tokens = tuple(line.strip() for line in lines if line.strip() and not line.strip().startswith("#"))
        if not tokens:
            raise InputError(f"the token file {token_file} holds no token")
        return tokens
    token = os.environ.get(TOKEN_ENV, "").strip()
    return (token,) if token else ()


def process_alive(pid: int) -> bool:
    """Is process ``pid`` running (a zombie or a dead one is not)?"""
    if os.name == "nt":
        return _windows_process_alive(pid)
    stat_file = f"/proc/{pid}/stat"
    if os.path.isdir("/proc/self"):
        try:
            with open(stat_file, encoding="ascii", errors="replace") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]  # the field after "(command name)"
        except (OSError, IndexError):
            return False
        return state not in ("Z", "X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, and belongs to someone else
    return _ps_state(pid) not in ("Z", "")  # no /proc (macOS): a zombie still answers kill(pid, 0)


def _ps_state(pid: int) -> str:
    """The first letter of ``ps``'s state of ``pid`` ("" when ps knows no such process); "?" if ps fails."""
    import subprocess

    try:
        out = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "?"  # cannot tell: count it as alive rather than stop a server that is in use
    return out.stdout.strip()[:1]


def _windows_process_alive(pid: int) -> bool:
    import ctypes

    still_active, query_limited_information = 259, 0x1000
    kernel32 = ctypes.windll.kernel32
    handle = kernel32.OpenProcess(query_limited_information, False, pid)
    if not handle:
        return False
    try:
        code = ctypes.c_ulong()
        return bool(kernel32.GetExitCodeProcess(handle, ctypes.byref(code))) and code.value == still_active
    finally:
        kernel32.CloseHandle(handle)


def watch_process(pid: int, on_gone: Callable[[], None], period: float = WATCH_PERIOD_SECONDS) -> threading.Thread:
    """Call ``on_gone()`` once, from a daemon thread, when process ``pid`` has ended."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(period):
            if not process_alive(pid):
                print(f"medsam serve: process {pid} has ended; shutting down", file=sys.stderr)
                on_gone()
                return

    thread = threading.Thread(target=watch, name=f"medsam-watch-{pid}", daemon=True)
    thread.start()
    return thread


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..app import Settings, build_app
    from ..connections import LoopbackHostOnly, uvicorn_options
    from ..models import load_model

    settings = Settings(host=args.host, port=args.port, model=args.model, checkpoint=args.checkpoint,
                        backend=args.backend, precision=args.precision, threads=args.threads, device=args.device,
                        tokens=read_tokens(args.token_file),
                        cache_gb=args.cache_gb, cache_fp16=args.cache_fp16, max_upload_mb=args.max_upload_mb,
                        session_idle_seconds=args.idle_minutes * 60.0, max_sessions=args.max_sessions,
                        max_sessions_per_token=args.max_sessions_per_token, share_cache=args.share_cache)
    settings.validate()  # refuse an exposed bind before spending time on the model
    if args.replicas is not None or args.ray:
        return _run_on_ray(settings, args)
    if args.watch_pid is not None and not process_alive(args.watch_pid):
        raise InputError(f"--watch-pid {args.watch_pid}: no such process")
    # Load here, not at app start-up, so that a bad checkpoint or device is a one-line error (exit 2).
    model = load_model(settings.model, settings.checkpoint, settings.device, settings.backend,
                       precision=settings.precision, threads=settings.threads)
    app = build_app(settings, model=model)
    if not settings.tokens:  # a web page in the user's browser must not reach it through DNS rebinding
        app = LoopbackHostOnly(app)
    auth = f"{len(settings.tokens)} token(s)" if settings.tokens else "no token (loopback only)"
    print(f"medsam serve: {model.name} on {model.device}, http://{args.host}:{args.port}, {auth}", file=sys.stderr)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level,
                                           server_header=False, proxy_headers=False, timeout_graceful_shutdown=5,
                                           **uvicorn_options()))
    gone = threading.Event()
    if args.watch_pid is not None:
        watch_process(args.watch_pid, lambda: (gone.set(), setattr(server, "should_exit", True)))
    server.run()
    if gone.is_set():
        # Shut down cleanly above (requests answered, jobs cancelled, worker stopped). Whoever started
        # us is gone, so skip the interpreter's teardown, which takes seconds with torch loaded.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _run_on_ray(settings, args: argparse.Namespace) -> int:
    """The same API on Ray Serve replicas (``ray_serve.py``); each replica loads its own model."""
    if args.replicas is not None and args.replicas < 1:
        raise InputError("--replicas must be at least 1")
    if args.watch_pid is not None and not process_alive(args.watch_pid):
        raise InputError(f"--watch-pid {args.watch_pid}: no such process")
    try:
        from .. import ray_serve
    except ImportError as err:
        raise InputError(str(err)) from None
    print(f"medsam serve: {args.replicas or 1} replica(s) on Ray Serve, http://{args.host}:{args.port}",
          file=sys.stderr)
    # Serves until SIGTERM/SIGINT or the end of --watch-pid, then stops the Ray processes it started.
    ray_serve.run(settings, ray_serve.ScaleOut(replicas=args.replicas or 1), address=args.ray,
                  watch_pid=args.watch_pid)
    return 0
