"""Futures the model worker hands out: settled once (a cancelled one stays cancelled), or gathered from parts."""

from __future__ import annotations

import threading
from concurrent.futures import Future, InvalidStateError
from typing import Any, Optional

import numpy as np


def settle(future: Future, result: Any = None, error: Optional[BaseException] = None) -> None:
    """Set a future's outcome unless it was cancelled meanwhile (by a client that went away)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass


def gathered(parts: list[Future]) -> Future:
    """One future of the parts' results joined along the first axis; cancelling it cancels the parts."""
    whole: Future = Future()
    lock = threading.Lock()

    def settled(_: Future) -> None:
        with lock:
            failed = next((p for p in parts if p.done() and not p.cancelled() and p.exception() is not None), None)
            if whole.done() or (failed is None and not all(p.done() for p in parts)):
                return
            if failed is None and not any(p.cancelled() for p in parts):
                return settle(whole, np.concatenate([p.result() for p in parts]))
            if failed is None:
                whole.cancel()
            else:
                settle(whole, error=failed.exception())
        for part in parts:  # failed or cancelled: the other parts are not needed
            part.cancel()

    whole.add_done_callback(lambda _: [part.cancel() for part in parts] if whole.cancelled() else None)
    for part in parts:
        part.add_done_callback(settled)
    return whole
