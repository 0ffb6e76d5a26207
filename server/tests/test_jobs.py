"""Jobs: the state machine, and waiting for a job's end on the event loop without polling."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from medsam_server.errors import Busy, Cancelled, InputError, UnknownJob
from medsam_server.jobs import FINISHED_JOBS_KEPT, Job, JobBook, run_job


def test_waiting_returns_as_soon_as_the_job_ends_and_not_before():
    job = Job("annotate", "s")
    threading.Timer(0.3, job.finish, kwargs={"result": b"envelope"}).start()

    async def waited() -> float:
        started = time.monotonic()
        await job.wait(30.0)
        return time.monotonic() - started

    seconds = asyncio.run(waited())
    assert job.status()["state"] == "done" and job.result == b"envelope"
    assert 0.25 < seconds < 10.0  # woken by finish(), not by the 30 s timeout


def test_waiting_on_a_running_job_gives_up_after_the_timeout():
    job = Job("prefetch", "s")

    async def waited() -> float:
        started = time.monotonic()
        await job.wait(0.2)
        return time.monotonic() - started

    assert asyncio.run(waited()) >= 0.19 and job.active and job._waiters == []


def test_a_failed_job_keeps_its_error_and_names_internal_ones_as_such():
    bad, broken, stopped = Job("annotate", "s"), Job("annotate", "s"), Job("annotate", "s")
    run_job(bad, lambda job: (_ for _ in ()).throw(InputError("segment 'x': needs a box")))
    run_job(broken, lambda job: 1 / 0)
    stopped.cancel.set()
    run_job(stopped, lambda job: b"never")
    assert bad.status()["state"] == "failed" and bad.status()["error"] == "segment 'x': needs a box"
    assert isinstance(broken.error, ZeroDivisionError)
    assert broken.status()["error"] == "internal error (ZeroDivisionError): division by zero"
    assert stopped.status()["state"] == "cancelled" and stopped.result is None


def test_the_job_book_limits_active_jobs_and_keeps_the_last_finished_ones():
    book = JobBook("s", max_active=2)
    first, second = book.new("prefetch"), book.new("prefetch")
    with pytest.raises(Busy, match="already runs 2 jobs"):
        book.new("annotate")
    first.finish(Cancelled("stopped"))
    assert book.get(second.id) is second and book.busy
    finished = [first]
    for _ in range(FINISHED_JOBS_KEPT + 2):
        job = book.new("prefetch")
        job.finish(result=b"")
        finished.append(job)
    with pytest.raises(UnknownJob, match="unknown job"):
        book.get(first.id)
    assert book.get(finished[-1].id).status()["state"] == "done"
