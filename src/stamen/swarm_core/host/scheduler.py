"""One compute thread fed by a priority queue and batch lanes, awaited from asyncio.

`ComputeScheduler.run(fn, priority=..., queue_timeout_s=...)` queues a synchronous
function and awaits its result. Work runs one piece at a time on a dedicated thread, so
model compute never blocks the event loop, and a single thread owns every tensor it
touches (sessions' caches need no locks). Jobs go lowest `Priority` first, then in arrival
order, so inference steps overtake bulk forward/backward jobs and sessions take turns.

`ComputeScheduler.run_batched(lane, item, batch_fn, max_weight=..., ...)` queues one item
in the FIFO of `lane`. When the worker picks a lane (the one whose first item has waited
longest), it takes that lane's items in arrival order while their total `weight` stays
within the first item's `max_weight`, and makes one `batch_fn(items)` call, which returns
one result per item, in order. A result that is a `BaseException` instance fails only its
item; an exception raised by `batch_fn` (or a wrong number of results, `RuntimeError`)
fails every item of the batch. Items of different lanes are never merged.

Collection window: a lane remembers the weight of its last batch. When the worker picks
the lane and less than that weight is queued, it waits for the rest, up to `batch_window_s`
(and at most half the last batch's run time), then takes what has come. A lone session
(last batch of weight 1) never waits: its item starts at once. Sessions that answer a batch
at slightly different moments (the client's next step crosses the network) are gathered
back into one batch instead of splitting into a batch of the early ones and one of the
late ones; with `batch_window_s=0` items that arrive while a batch runs simply make up the
next one.

Order when several kinds wait: batches and `Priority.INFERENCE` jobs alternate (a waiting
inference job runs after at most one batch, a waiting batch after at most one inference
job; after a bulk job, the one that arrived first); `Priority.BULK` jobs run only when
neither waits.

Jobs and items alike: one still queued when its `queue_timeout_s` runs out fails with
`RemoteTimeout` and never runs; one already running is never interrupted (compute cannot
be preempted) and its caller gets the result. A caller cancelled while its job or item is
queued removes it. At most `max_queued_jobs` jobs and items wait together (`RemoteBusy`
past that), `queue_depth` counts both, and `aclose()` fails all queued ones with
`RemoteBusy`.

This module knows nothing about models, sessions or networking.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, TypeVar

from stamen.swarm_core.protocol.errors import RemoteBusy, RemoteTimeout

logger = logging.getLogger(__name__)

T = TypeVar("T")

BatchFn = Callable[[list[Any]], list[Any]]


class Priority(IntEnum):
    INFERENCE = 0
    BULK = 1


class _State(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DROPPED = "dropped"  # cancelled or expired before it started


@dataclass(eq=False, kw_only=True)
class _Entry:
    """What a caller awaits: a queued job or lane item."""

    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    deadline_s: float
    arrival: int
    state: _State = _State.QUEUED


@dataclass(eq=False, kw_only=True)
class _Job(_Entry):
    fn: Callable[[], Any]


@dataclass(eq=False, kw_only=True)
class _Item(_Entry):
    value: Any
    batch_fn: BatchFn
    weight: int
    max_weight: int


@dataclass(eq=False)
class _Batch:
    items: list[_Item]
    batch_fn: BatchFn
    lane: Hashable


class ComputeScheduler:
    def __init__(
        self,
        *,
        max_queued_jobs: int,
        thread_name: str = "stamen-compute",
        batch_window_s: float = 0.0,
    ) -> None:
        if batch_window_s < 0:
            raise ValueError(f"batch_window_s must be >= 0, got {batch_window_s}")
        self.max_queued_jobs = max_queued_jobs
        self.batch_window_s = batch_window_s
        # lane -> (total weight, run time in s) of its last batch; worker thread only
        self._last_batch: dict[Hashable, tuple[int, float]] = {}
        self._thread_name = thread_name
        self._heap: list[tuple[int, int, _Job]] = []  # (priority, arrival, job)
        self._lanes: dict[Hashable, deque[_Item]] = {}  # lane -> items in arrival order
        self._queued = 0  # jobs and items still QUEUED (dropped ones wait to be popped)
        self._cond = threading.Condition()
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closing = False
        # Whose turn it is when a batch and an inference job both wait; None after a
        # bulk job (or at start): then the one that arrived first goes.
        self._batch_turn: bool | None = None
        self._batches_run = 0  # written by the worker thread only
        self._items_batched = 0

    @property
    def queue_depth(self) -> int:
        """Jobs and lane items waiting to start."""
        return self._queued

    @property
    def batches_run(self) -> int:
        """`batch_fn` calls made so far."""
        return self._batches_run

    @property
    def items_batched(self) -> int:
        """Items passed to `batch_fn` calls so far."""
        return self._items_batched

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._work, name=self._thread_name, daemon=True)
        self._thread.start()

    async def aclose(self) -> None:
        """Fail queued jobs and items with `RemoteBusy`, let the running work finish,
        join the thread."""
        with self._cond:
            self._closing = True
            queued: list[_Entry] = [job for _, _, job in self._heap]
            for lane in self._lanes.values():
                queued.extend(lane)
            dropped = [entry for entry in queued if entry.state is _State.QUEUED]
            for entry in dropped:
                entry.state = _State.DROPPED
            self._heap.clear()
            self._lanes.clear()
            self._queued = 0
            self._cond.notify_all()
        for entry in dropped:
            _resolve(entry, None, RemoteBusy("the host is shutting down"))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def run(self, fn: Callable[[], T], *, priority: Priority, queue_timeout_s: float) -> T:
        """Run `fn()` on the compute thread and return its result (or raise its exception)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        deadline_s = time.monotonic() + queue_timeout_s
        with self._cond:
            self._check_open()
            job = _Job(
                future=future, loop=loop, deadline_s=deadline_s, arrival=next(self._seq), fn=fn
            )
            heapq.heappush(self._heap, (int(priority), job.arrival, job))
            self._queued += 1
            self._cond.notify()
        return await self._await(job, queue_timeout_s)

    async def run_batched(
        self,
        lane: Hashable,
        item: Any,
        batch_fn: BatchFn,
        *,
        weight: int = 1,
        max_weight: int,
        queue_timeout_s: float,
    ) -> Any:
        """Queue `item` in `lane` and return its result from a `batch_fn(items)` call made
        on the compute thread with this lane's items merged (module docstring).

        Callers of one lane pass the same `batch_fn` and `max_weight` (the first item's
        are the ones used). `weight` must be in `[1, max_weight]`: `ValueError` otherwise.
        """
        if max_weight < 1 or not 1 <= weight <= max_weight:
            raise ValueError(f"need 1 <= weight <= max_weight, got {weight} and {max_weight}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        deadline_s = time.monotonic() + queue_timeout_s
        with self._cond:
            self._check_open()
            entry = _Item(
                future=future,
                loop=loop,
                deadline_s=deadline_s,
                arrival=next(self._seq),
                value=item,
                batch_fn=batch_fn,
                weight=weight,
                max_weight=max_weight,
            )
            self._lanes.setdefault(lane, deque()).append(entry)
            self._queued += 1
            self._cond.notify()
        return await self._await(entry, queue_timeout_s)

    def _check_open(self) -> None:
        """Refuse new work while closed or full (call with the lock held)."""
        if self._closing or self._thread is None:
            raise RemoteBusy("the compute queue is not running")
        if self._queued >= self.max_queued_jobs:
            raise RemoteBusy(f"the compute queue is full ({self.max_queued_jobs} jobs)")

    async def _await(self, entry: _Entry, queue_timeout_s: float) -> Any:
        # The queue deadline is a timer that drops the entry only while it is still queued;
        # the future itself is awaited directly. (wait_for over a shield cost two extra
        # futures and two extra event-loop turns on every step.) Cancelling the caller
        # cancels the future, so the worker's result for it is dropped.
        expiry = entry.loop.call_later(queue_timeout_s, self._expire, entry, queue_timeout_s)
        try:
            return await entry.future
        except asyncio.CancelledError:
            self._drop_if_queued(entry)
            raise
        finally:
            expiry.cancel()

    def _expire(self, entry: _Entry, queue_timeout_s: float) -> None:
        if self._drop_if_queued(entry) and not entry.future.done():
            entry.future.set_exception(
                RemoteTimeout(
                    f"waited {queue_timeout_s:.3g} s in the compute queue without starting"
                )
            )

    def _drop_if_queued(self, entry: _Entry) -> bool:
        with self._cond:
            if entry.state is not _State.QUEUED:
                return False
            entry.state = _State.DROPPED
            self._queued -= 1
            return True

    # Everything below runs on the worker thread, with the lock held unless it says not.

    def _next_work(self) -> _Job | _Batch | None:
        """Take the next job or batch (marked RUNNING), waiting for one; None once closing."""
        with self._cond:
            while True:
                while not self._heap and not self._lanes and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return None
                work = self._pick()
                if work is not None:
                    return work

    def _pick(self) -> _Job | _Batch | None:
        """One scheduling decision; None when what was looked at had all expired or been
        dropped (each call removes what it looked at, so the caller's loop ends)."""
        self._prune_heap()
        lane = self._oldest_lane()
        job_head = self._heap[0] if self._heap else None
        if lane is not None and (
            job_head is None
            or job_head[0] != Priority.INFERENCE
            or self._batch_goes_first(lane, job_head)
        ):
            self._gather(lane)
            if lane not in self._lanes:  # everything in it expired or was cancelled
                return None
            return self._take_batch(lane)
        if job_head is not None:
            return self._take_job()
        return None

    def _gather(self, lane: Hashable) -> None:
        """Wait (lock released) until the lane holds its last batch's weight again, or the
        window closes."""
        last = self._last_batch.get(lane)
        if last is None or self.batch_window_s == 0:
            return
        target, last_run_s = last
        window_ends = time.monotonic() + min(self.batch_window_s, 0.5 * last_run_s)
        while not self._closing and lane in self._lanes:
            if self._queued_weight(lane) >= target:
                return
            left = window_ends - time.monotonic()
            if left <= 0:
                return
            self._cond.wait(left)
            self._oldest_lane()  # drop cancelled or expired heads; an empty lane goes

    def _queued_weight(self, lane: Hashable) -> int:
        items = self._lanes.get(lane, ())
        return sum(item.weight for item in items if item.state is _State.QUEUED)

    def _batch_goes_first(self, lane: Hashable, job_head: tuple[int, int, _Job]) -> bool:
        if self._batch_turn is not None:
            return self._batch_turn
        return self._lanes[lane][0].arrival < job_head[1]

    def _prune_heap(self) -> None:
        while self._heap and self._heap[0][2].state is not _State.QUEUED:
            heapq.heappop(self._heap)

    def _oldest_lane(self) -> Hashable | None:
        """The lane whose first queued item arrived first; empty lanes are removed."""
        for lane in list(self._lanes):
            items = self._lanes[lane]
            while items and items[0].state is not _State.QUEUED:
                items.popleft()
            if not items:
                del self._lanes[lane]
        return min(self._lanes, key=lambda lane: self._lanes[lane][0].arrival, default=None)

    def _take_job(self) -> _Job | None:
        priority, _, job = heapq.heappop(self._heap)
        self._queued -= 1
        if self._expired(job):
            return None
        job.state = _State.RUNNING
        self._batch_turn = True if priority == Priority.INFERENCE else None
        return job

    def _take_batch(self, lane: Hashable) -> _Batch | None:
        """The lane's items in arrival order, up to the first one's max_weight in total."""
        items = self._lanes[lane]
        taken: list[_Item] = []
        total = 0
        while items:
            item = items[0]
            if item.state is not _State.QUEUED:
                items.popleft()
                continue
            limit = taken[0].max_weight if taken else item.max_weight
            if total + item.weight > limit:
                break
            items.popleft()
            self._queued -= 1
            if self._expired(item):
                continue
            item.state = _State.RUNNING
            taken.append(item)
            total += item.weight
        if not items:
            del self._lanes[lane]
        if not taken:
            return None
        self._batch_turn = False
        return _Batch(taken, taken[0].batch_fn, lane)

    def _expired(self, entry: _Entry) -> bool:
        """Fail an entry just taken off a queue whose deadline has passed."""
        if time.monotonic() <= entry.deadline_s:
            return False
        entry.state = _State.DROPPED
        _resolve(entry, None, RemoteTimeout("waited too long in the compute queue"))
        return True

    def _work(self) -> None:
        """The worker thread's loop (runs work without the lock)."""
        while (work := self._next_work()) is not None:
            if isinstance(work, _Job):
                _run_job(work)
            else:
                self._run_batch(work)

    def _run_batch(self, batch: _Batch) -> None:
        values = [item.value for item in batch.items]
        began_s = time.monotonic()
        try:
            results: list[Any] = list(batch.batch_fn(values))
        except BaseException as exc:  # handed to every awaiting coroutine
            results = [exc] * len(values)
        weight = sum(item.weight for item in batch.items)
        with self._cond:
            self._last_batch[batch.lane] = (weight, time.monotonic() - began_s)
        if len(results) != len(values):
            error = RuntimeError(
                f"batch_fn returned {len(results)} results for {len(values)} items"
            )
            results = [error] * len(values)
        # Counted before any caller can see its result, so a caller reads them up to date.
        self._batches_run += 1
        self._items_batched += len(values)
        for item, result in zip(batch.items, results, strict=True):
            if isinstance(result, BaseException):
                _resolve(item, None, result)
            else:
                _resolve(item, result, None)


def _run_job(job: _Job) -> None:
    try:
        result, error = job.fn(), None
    except BaseException as exc:  # handed to the awaiting coroutine
        result, error = None, exc
    _resolve(job, result, error)


def _resolve(entry: _Entry, result: Any, error: BaseException | None) -> None:
    try:
        entry.loop.call_soon_threadsafe(_settle, entry.future, result, error)
    except RuntimeError:  # the event loop is closed: nobody is waiting any more
        logger.debug("dropping the result of work whose event loop has closed")


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():  # the caller was cancelled (or the entry expired)
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
