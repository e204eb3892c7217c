"""One compute thread fed by a priority queue, awaited from asyncio.

`ComputeScheduler.run(fn, priority=..., queue_timeout_s=...)` queues a synchronous
function and awaits its result. Jobs run one at a time on a dedicated thread, so model
compute never blocks the event loop, and a single thread owns every tensor it touches
(sessions' caches need no locks). Order: lowest `Priority` first, then arrival order, so
inference steps overtake bulk forward/backward jobs and concurrent sessions take turns.

A job still queued when its `queue_timeout_s` runs out fails with `RemoteTimeout` and never runs;
a job already running is never interrupted (compute cannot be preempted) and its caller
gets the result. A caller cancelled while its job is queued removes the job.

This module knows nothing about models, sessions or networking.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, TypeVar

from stamen.swarm_core.protocol.errors import RemoteBusy, RemoteTimeout

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Priority(IntEnum):
    INFERENCE = 0
    BULK = 1


class _State(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DROPPED = "dropped"  # cancelled or expired before it started


@dataclass(eq=False)
class _Job:
    fn: Callable[[], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    deadline_s: float
    state: _State = _State.QUEUED


class ComputeScheduler:
    def __init__(self, *, max_queued_jobs: int, thread_name: str = "stamen-compute") -> None:
        self.max_queued_jobs = max_queued_jobs
        self._thread_name = thread_name
        self._heap: list[tuple[int, int, _Job]] = []  # (priority, arrival, job)
        self._queued = 0  # jobs in the heap still QUEUED (dropped ones wait to be popped)
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = False

    @property
    def queue_depth(self) -> int:
        return self._queued

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._work, name=self._thread_name, daemon=True)
        self._thread.start()

    async def aclose(self) -> None:
        """Fail queued jobs with `RemoteBusy`, let the running one finish, join the thread."""
        with self._cond:
            self._closing = True
            dropped = [job for _, _, job in self._heap if job.state is _State.QUEUED]
            for job in dropped:
                job.state = _State.DROPPED
            self._heap.clear()
            self._queued = 0
            self._cond.notify_all()
        for job in dropped:
            _resolve(job, None, RemoteBusy("the host is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def run(self, fn: Callable[[], T], *, priority: Priority, queue_timeout_s: float) -> T:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        job = _Job(fn, future, loop, time.monotonic() + queue_timeout_s)
        with self._cond:
            if self._closing or self._thread is None:
                raise RemoteBusy("the compute queue is not running")
            if self._queued >= self.max_queued_jobs:
                raise RemoteBusy(f"the compute queue is full ({self.max_queued_jobs} jobs)")
            heapq.heappush(self._heap, (int(priority), next(self._seq), job))
            self._queued += 1
            self._cond.notify()
        # The queue deadline is a timer that drops the job only while it is still queued;
        # the future itself is awaited directly. (wait_for over a shield cost two extra
        # futures and two extra event-loop turns on every step.) Cancelling the caller
        # cancels the future, so the worker's result for it is dropped.
        expiry = loop.call_later(queue_timeout_s, self._expire, job, queue_timeout_s)
        try:
            return await future
        except asyncio.CancelledError:
            self._drop_if_queued(job)
            raise
        finally:
            expiry.cancel()

    def _expire(self, job: _Job, queue_timeout_s: float) -> None:
        if self._drop_if_queued(job) and not job.future.done():
            job.future.set_exception(
                RemoteTimeout(
                    f"waited {queue_timeout_s:.3g} s in the compute queue without starting"
                )
            )

    def _drop_if_queued(self, job: _Job) -> bool:
        with self._cond:
            if job.state is not _State.QUEUED:
                return False
            job.state = _State.DROPPED
            self._queued -= 1
            return True

    def _next_job(self) -> _Job | None:
        """Pop the next runnable job (marking it RUNNING), or None once closing."""
        with self._cond:
            while True:
                while not self._heap and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return None
                _, _, job = heapq.heappop(self._heap)
                if job.state is not _State.QUEUED:
                    continue
                self._queued -= 1
                if time.monotonic() > job.deadline_s:
                    job.state = _State.DROPPED
                    _resolve(job, None, RemoteTimeout("waited too long in the compute queue"))
                    continue
                job.state = _State.RUNNING
                return job

    def _work(self) -> None:
        while (job := self._next_job()) is not None:
            try:
                result, error = job.fn(), None
            except BaseException as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            _resolve(job, result, error)


def _resolve(job: _Job, result: Any, error: BaseException | None) -> None:
    try:
        job.loop.call_soon_threadsafe(_settle, job.future, result, error)
    except RuntimeError:  # the event loop is closed: nobody is waiting any more
        logger.debug("dropping the result of a job whose event loop has closed")


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled (or the job expired)
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
