"""ComputeScheduler: one compute thread, priority order, queue limits, cancellation."""

from __future__ import annotations

import asyncio
import threading

import pytest

from stamen.swarm_core.host.scheduler import ComputeScheduler, Priority
from stamen.swarm_core.protocol.errors import RemoteBusy, RemoteTimeout


@pytest.fixture
async def scheduler():
    scheduler = ComputeScheduler(max_queued_jobs=3)
    scheduler.start()
    yield scheduler
    await scheduler.aclose()


async def hold_worker(scheduler: ComputeScheduler, gate: threading.Event) -> asyncio.Task:
    """A bulk job that keeps the worker busy until `gate` is set (also used by
    `test_scheduler_batching`)."""
    entered = threading.Event()

    def hold() -> str:
        entered.set()
        gate.wait(10)
        return "held"

    task = asyncio.create_task(scheduler.run(hold, priority=Priority.BULK, queue_timeout_s=10))
    await asyncio.to_thread(entered.wait, 10)
    return task


async def test_jobs_run_on_one_thread_that_is_not_the_event_loop(scheduler) -> None:
    names = await asyncio.gather(
        *(
            scheduler.run(lambda: threading.current_thread().name, priority=p, queue_timeout_s=5)
            for p in (Priority.BULK, Priority.INFERENCE)
        )
    )
    assert set(names) == {"stamen-compute"}


async def test_exceptions_reach_the_caller(scheduler) -> None:
    def fail() -> None:
        raise KeyError("inside")

    with pytest.raises(KeyError, match="inside"):
        await scheduler.run(fail, priority=Priority.INFERENCE, queue_timeout_s=5)
    assert await scheduler.run(lambda: 7, priority=Priority.INFERENCE, queue_timeout_s=5) == 7


async def test_full_queue_is_busy_and_cancelled_jobs_never_run(scheduler) -> None:
    gate, ran = threading.Event(), []
    blocker = await hold_worker(scheduler, gate)
    queued = [
        asyncio.create_task(
            scheduler.run(lambda i=i: ran.append(i), priority=Priority.BULK, queue_timeout_s=10)
        )
        for i in range(3)
    ]
    await asyncio.sleep(0.05)
    with pytest.raises(RemoteBusy):
        await scheduler.run(lambda: None, priority=Priority.INFERENCE, queue_timeout_s=10)
    queued[1].cancel()
    await asyncio.gather(queued[1], return_exceptions=True)
    assert scheduler.queue_depth == 2
    gate.set()
    assert await blocker == "held"
    await asyncio.gather(queued[0], queued[2])
    assert ran == [0, 2]


async def test_aclose_fails_queued_jobs_with_busy() -> None:
    scheduler = ComputeScheduler(max_queued_jobs=8)
    scheduler.start()
    gate = threading.Event()
    blocker = await hold_worker(scheduler, gate)
    queued = asyncio.create_task(
        scheduler.run(lambda: None, priority=Priority.INFERENCE, queue_timeout_s=10)
    )
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(scheduler.aclose())
    with pytest.raises(RemoteBusy):
        await queued
    gate.set()
    await closing
    assert await blocker == "held"


async def test_queue_timeout_only_applies_before_a_job_starts(scheduler) -> None:
    gate = threading.Event()
    blocker = await hold_worker(scheduler, gate)
    with pytest.raises(RemoteTimeout):
        await scheduler.run(lambda: None, priority=Priority.INFERENCE, queue_timeout_s=0.05)
    started = threading.Event()

    def slow() -> str:
        started.set()
        gate.wait(10)
        return "finished"

    gate.set()
    await blocker
    gate.clear()
    # Runs past its queue timeout once started: the caller still gets the result.
    job = asyncio.create_task(scheduler.run(slow, priority=Priority.BULK, queue_timeout_s=0.05))
    await asyncio.to_thread(started.wait, 10)
    await asyncio.sleep(0.1)
    gate.set()
    assert await job == "finished"


async def test_a_job_that_timed_out_in_the_queue_never_runs(scheduler) -> None:
    gate, ran = threading.Event(), []
    blocker = await hold_worker(scheduler, gate)
    with pytest.raises(RemoteTimeout):
        await scheduler.run(
            lambda: ran.append(1), priority=Priority.INFERENCE, queue_timeout_s=0.05
        )
    assert scheduler.queue_depth == 0
    gate.set()
    await blocker
    assert await scheduler.run(
        lambda: "after", priority=Priority.INFERENCE, queue_timeout_s=10
    ) == ("after")
    assert ran == []


async def test_a_caller_cancelled_mid_job_leaves_the_worker_serving(scheduler) -> None:
    gate = threading.Event()
    running = await hold_worker(scheduler, gate)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
    assert running.cancelled()
    gate.set()  # the job finishes on the worker; its result has nobody to go to
    result = await scheduler.run(lambda: "next", priority=Priority.INFERENCE, queue_timeout_s=10)
    assert result == "next"
