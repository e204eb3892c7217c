"""`transports.flow.Signal`: a broadcast wake-up whose abandoned waiters do not pile up."""

from __future__ import annotations

import asyncio

import pytest

from stamen.transports.flow import Signal


async def test_fire_releases_every_current_waiter_and_only_those() -> None:
    signal = Signal(asyncio.get_running_loop())
    first, second = signal.waiter(), signal.waiter()
    signal.fire()
    assert first.done() and second.done()
    later = signal.waiter()
    assert not later.done()
    signal.fire()
    assert later.done()


async def test_abandoned_waiters_are_dropped() -> None:
    signal = Signal()
    for _ in range(100):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(signal.wait(), 0.001)
    assert signal._waiters == []  # wait() removes its own future when cancelled
    for _ in range(100):
        signal.waiter().cancel()  # a hot path that awaited the future directly
    kept = signal.waiter()
    assert signal._waiters == [kept]  # cancelled ones dropped on the next waiter()
