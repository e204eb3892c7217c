"""ComputeScheduler.run_batched: lane items merged into batch_fn calls on the compute thread."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from stamen.swarm_core.host.scheduler import ComputeScheduler, Priority
from stamen.swarm_core.protocol.errors import RemoteBusy, RemoteTimeout
from tests.unit.test_runtime_scheduler import hold_worker


@pytest.fixture
async def scheduler():
    scheduler = ComputeScheduler(max_queued_jobs=16)
    scheduler.start()
    yield scheduler
    await scheduler.aclose()


class Recorder:
    """A batch_fn that records each batch it gets and returns `item * 10` per item."""

    def __init__(self, order: list[Any] | None = None, name: str = "") -> None:
        self.batches: list[list[Any]] = []
        self.threads: set[str] = set()
        self.order = order
        self.name = name

    def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.threads.add(threading.current_thread().name)
        if self.order is not None:
            self.order.append(self.name)
        return [item * 10 for item in items]


async def _until_queued(scheduler: ComputeScheduler, depth: int) -> None:
    """Let the tasks just created reach the queue (each queues before its first await)."""
    for _ in range(100):
        if scheduler.queue_depth == depth:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"queue depth {scheduler.queue_depth}, expected {depth}")


def _submit(
    scheduler: ComputeScheduler,
    lane: Any,
    item: Any,
    batch_fn: Callable[[list[Any]], list[Any]],
    *,
    weight: int = 1,
    max_weight: int = 64,
    queue_timeout_s: float = 10,
) -> asyncio.Task:
    return asyncio.create_task(
        scheduler.run_batched(
            lane,
            item,
            batch_fn,
            weight=weight,
            max_weight=max_weight,
            queue_timeout_s=queue_timeout_s,
        )
    )


async def test_a_lone_item_runs_at_once_in_a_batch_of_one(scheduler) -> None:
    depth_inside: list[int] = []

    def batch_fn(items: list[int]) -> list[int]:
        depth_inside.append(scheduler.queue_depth)
        return [item + 1 for item in items]

    start = time.monotonic()
    result = await scheduler.run_batched("decode", 41, batch_fn, max_weight=8, queue_timeout_s=10)
    waited_s = time.monotonic() - start
    assert result == 42
    assert depth_inside == [0]
    assert waited_s < 0.5  # no collection window: nothing waits for company
    assert (scheduler.batches_run, scheduler.items_batched) == (1, 1)


async def test_items_arriving_during_a_batch_merge_into_the_next(scheduler) -> None:
    entered, gate = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def batch_fn(items: list[int]) -> list[int]:
        batches.append(list(items))
        if len(batches) == 1:
            entered.set()
            gate.wait(10)
        return [item * 10 for item in items]

    first = _submit(scheduler, "decode", 1, batch_fn)
    await asyncio.to_thread(entered.wait, 10)
    later = [_submit(scheduler, "decode", i, batch_fn) for i in (2, 3, 4)]
    await _until_queued(scheduler, 3)
    gate.set()
    assert await first == 10
    assert await asyncio.gather(*later) == [20, 30, 40]
    assert batches == [[1], [2, 3, 4]]
    assert (scheduler.batches_run, scheduler.items_batched) == (2, 4)


async def test_batches_run_on_the_compute_thread(scheduler) -> None:
    recorder = Recorder()
    assert await _submit(scheduler, "decode", 3, recorder) == 30
    assert recorder.threads == {"stamen-compute"}


async def test_max_weight_splits_batches_in_arrival_order(scheduler) -> None:
    gate, recorder = threading.Event(), Recorder()
    blocker = await hold_worker(scheduler, gate)
    weights = [3, 1, 1, 2, 4]
    tasks = [
        _submit(scheduler, "decode", i, recorder, weight=w, max_weight=4)
        for i, w in enumerate(weights)
    ]
    await _until_queued(scheduler, len(weights))
    gate.set()
    await blocker
    assert await asyncio.gather(*tasks) == [0, 10, 20, 30, 40]
    assert recorder.batches == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize(("weight", "max_weight"), [(5, 4), (0, 4), (1, 0)])
async def test_a_weight_outside_one_to_max_weight_is_refused(
    scheduler, weight: int, max_weight: int
) -> None:
    recorder = Recorder()
    with pytest.raises(ValueError, match="weight"):
        await scheduler.run_batched(
            "decode", 1, recorder, weight=weight, max_weight=max_weight, queue_timeout_s=10
        )
    assert recorder.batches == []
    assert scheduler.queue_depth == 0


async def test_an_exception_result_fails_only_its_item(scheduler) -> None:
    gate = threading.Event()

    def batch_fn(items: list[int]) -> list[Any]:
        return [ValueError(f"bad {item}") if item == 2 else item * 10 for item in items]

    blocker = await hold_worker(scheduler, gate)
    tasks = [_submit(scheduler, "decode", i, batch_fn) for i in (1, 2, 3)]
    await _until_queued(scheduler, 3)
    gate.set()
    await blocker
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError) and str(results[1]) == "bad 2"
    assert scheduler.batches_run == 1


async def test_an_exception_raised_by_batch_fn_fails_every_item(scheduler) -> None:
    gate, calls = threading.Event(), []

    def batch_fn(items: list[int]) -> list[int]:
        calls.append(list(items))
        raise KeyError("inside")

    blocker = await hold_worker(scheduler, gate)
    tasks = [_submit(scheduler, "decode", i, batch_fn) for i in (1, 2)]
    await _until_queued(scheduler, 2)
    gate.set()
    await blocker
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, KeyError) for r in results)
    assert calls == [[1, 2]]
    assert await _submit(scheduler, "decode", 5, Recorder()) == 50  # still serving


async def test_a_wrong_number_of_results_fails_every_item(scheduler) -> None:
    with pytest.raises(RuntimeError, match="2 results for 1 items"):
        await scheduler.run_batched(
            "decode", 1, lambda items: [1, 2], max_weight=4, queue_timeout_s=10
        )


async def test_expired_and_cancelled_items_never_reach_batch_fn(scheduler) -> None:
    gate, recorder = threading.Event(), Recorder()
    blocker = await hold_worker(scheduler, gate)
    with pytest.raises(RemoteTimeout):
        await scheduler.run_batched("decode", 1, recorder, max_weight=8, queue_timeout_s=0.05)
    cancelled = _submit(scheduler, "decode", 2, recorder)
    kept = _submit(scheduler, "decode", 3, recorder)
    await _until_queued(scheduler, 2)
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    assert scheduler.queue_depth == 1
    gate.set()
    await blocker
    assert await kept == 30
    assert recorder.batches == [[3]]
    assert scheduler.items_batched == 1


async def test_an_item_past_its_deadline_when_the_worker_reaches_it_is_skipped(
    scheduler,
) -> None:
    # The event loop is held so the expiry timer cannot fire: the worker itself must see
    # the passed deadline and skip the item.
    gate, ran = threading.Event(), threading.Event()
    stale, fresh = Recorder(), Recorder()

    def fresh_fn(items: list[int]) -> list[int]:
        ran.set()
        return fresh(items)

    blocker = await hold_worker(scheduler, gate)
    expired = _submit(scheduler, "stale", 1, stale, queue_timeout_s=0.05)
    live = _submit(scheduler, "fresh", 2, fresh_fn)
    await _until_queued(scheduler, 2)
    time.sleep(0.1)  # noqa: ASYNC251 (holds the loop, and its timers, past the deadline)
    gate.set()
    assert ran.wait(10)
    await blocker
    with pytest.raises(RemoteTimeout):
        await expired
    assert await live == 20
    assert stale.batches == []
    assert fresh.batches == [[2]]


async def test_batches_and_inference_jobs_alternate_and_bulk_waits_for_both(
    scheduler,
) -> None:
    gate, order = threading.Event(), []

    def job(name: str) -> Callable[[], None]:
        return lambda: order.append(name)

    blocker = await hold_worker(scheduler, gate)
    jobs = [
        asyncio.create_task(scheduler.run(job("bulk"), priority=Priority.BULK, queue_timeout_s=10))
    ]
    jobs += [
        asyncio.create_task(
            scheduler.run(job(f"inference{i}"), priority=Priority.INFERENCE, queue_timeout_s=10)
        )
        for i in (1, 2, 3)
    ]
    lanes = [Recorder(order, name=f"batch{i}") for i in (1, 2, 3)]
    items = [_submit(scheduler, f"lane{i}", i, fn) for i, fn in enumerate(lanes)]
    await _until_queued(scheduler, 7)
    gate.set()
    await blocker
    await asyncio.gather(*jobs, *items)
    assert order == [
        "inference1",  # the oldest of the two kinds goes first after a bulk job
        "batch1",
        "inference2",
        "batch2",
        "inference3",
        "batch3",
        "bulk",
    ]


async def test_a_waiting_inference_job_runs_after_at_most_one_batch(scheduler) -> None:
    gate, order = threading.Event(), []
    blocker = await hold_worker(scheduler, gate)
    lanes = [Recorder(order, name=f"batch{i}") for i in (1, 2)]
    items = [_submit(scheduler, f"lane{i}", i, fn) for i, fn in enumerate(lanes)]
    inference = asyncio.create_task(
        scheduler.run(
            lambda: order.append("inference"), priority=Priority.INFERENCE, queue_timeout_s=10
        )
    )
    await _until_queued(scheduler, 3)
    gate.set()
    await blocker
    await asyncio.gather(inference, *items)
    assert order == ["batch1", "inference", "batch2"]


async def test_a_full_queue_is_busy_for_items_and_jobs() -> None:
    scheduler = ComputeScheduler(max_queued_jobs=3)
    scheduler.start()
    try:
        gate, recorder = threading.Event(), Recorder()
        blocker = await hold_worker(scheduler, gate)
        items = [_submit(scheduler, "decode", i, recorder) for i in (1, 2)]
        job = asyncio.create_task(
            scheduler.run(lambda: "job", priority=Priority.INFERENCE, queue_timeout_s=10)
        )
        await _until_queued(scheduler, 3)
        with pytest.raises(RemoteBusy):
            await scheduler.run_batched("decode", 3, recorder, max_weight=8, queue_timeout_s=10)
        with pytest.raises(RemoteBusy):
            await scheduler.run(lambda: None, priority=Priority.INFERENCE, queue_timeout_s=10)
        gate.set()
        await blocker
        assert await asyncio.gather(*items, job) == [10, 20, "job"]
        assert recorder.batches == [[1, 2]]
    finally:
        await scheduler.aclose()


async def test_aclose_fails_queued_items_with_busy() -> None:
    scheduler = ComputeScheduler(max_queued_jobs=8)
    scheduler.start()
    gate, recorder = threading.Event(), Recorder()
    blocker = await hold_worker(scheduler, gate)
    items = [_submit(scheduler, lane, 1, recorder) for lane in ("a", "b")]
    await _until_queued(scheduler, 2)
    closing = asyncio.create_task(scheduler.aclose())
    for item in items:
        with pytest.raises(RemoteBusy):
            await item
    gate.set()
    await closing
    assert await blocker == "held"
    assert recorder.batches == []
    assert scheduler.queue_depth == 0
    with pytest.raises(RemoteBusy):
        await scheduler.run_batched("a", 1, recorder, max_weight=8, queue_timeout_s=10)


async def test_different_lanes_are_never_merged(scheduler) -> None:
    gate, order = threading.Event(), []
    first, second = Recorder(order, name="first"), Recorder(order, name="second")
    blocker = await hold_worker(scheduler, gate)
    tasks = [
        _submit(scheduler, (0, 4), 1, first),
        _submit(scheduler, (4, 8), 2, second),
        _submit(scheduler, (0, 4), 3, first),
        _submit(scheduler, (4, 8), 4, second),
    ]
    await _until_queued(scheduler, 4)
    gate.set()
    await blocker
    assert await asyncio.gather(*tasks) == [10, 20, 30, 40]
    assert first.batches == [[1, 3]]
    assert second.batches == [[2, 4]]
    assert order == ["first", "second"]  # the lane whose first item waited longest goes first
    assert (scheduler.batches_run, scheduler.items_batched) == (2, 4)


# -- the collection window ---------------------------------------------------------------


class SlowRecorder(Recorder):
    """A Recorder whose batches take `seconds`, so the lane's last run time is known."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds

    def __call__(self, items: list[Any]) -> list[Any]:
        time.sleep(self.seconds)
        return super().__call__(items)


@pytest.fixture
async def windowed():
    """A scheduler whose lanes wait up to 5 s for the sessions of their last batch."""
    scheduler = ComputeScheduler(max_queued_jobs=16, batch_window_s=5.0)
    scheduler.start()
    yield scheduler
    await scheduler.aclose()


async def _first_batch(scheduler: ComputeScheduler, record: Recorder, count: int) -> None:
    """Run items 0 .. count-1 as one batch of the lane (all queued behind a held worker)."""
    gate = threading.Event()
    held = await hold_worker(scheduler, gate)
    first = [_submit(scheduler, "lane", i, record) for i in range(count)]
    await _until_queued(scheduler, count)
    gate.set()
    await asyncio.gather(held, *first)


async def test_the_window_gathers_the_sessions_of_the_last_batch(windowed):
    scheduler, record = windowed, SlowRecorder(0.2)
    await _first_batch(scheduler, record, 3)
    # Now the three come back one by one, 20 ms apart: without a window the first
    # would run alone; with it, the worker waits for the other two.
    late = []
    for i in range(3):
        late.append(_submit(scheduler, "lane", 10 + i, record))
        await asyncio.sleep(0.02)
    assert await asyncio.gather(*late) == [100, 110, 120]
    assert record.batches == [[0, 1, 2], [10, 11, 12]]


async def test_a_lone_session_never_waits_for_the_window(windowed):
    scheduler, record = windowed, SlowRecorder(0.0)
    for i in range(5):
        began = time.monotonic()
        assert await _submit(scheduler, "lane", i, record) == 10 * i
        assert time.monotonic() - began < 1.0  # far below the 5 s window
    assert record.batches == [[0], [1], [2], [3], [4]]


async def test_the_window_closes_after_half_the_last_run_and_takes_what_came(windowed):
    scheduler, record = windowed, SlowRecorder(0.1)
    await _first_batch(scheduler, record, 2)
    # Only one of the two comes back: it runs after at most ~half the last run time
    # (0.1 s), not the 5 s window.
    began = time.monotonic()
    assert await _submit(scheduler, "lane", 7, record) == 70
    assert time.monotonic() - began < 2.0
    assert record.batches[-1] == [7]
