"""Ending a non-streamed generation early: its client left, or the server is stopping.

A streamed response notices a disconnect itself (Litestar cancels the stream), but a
handler awaiting a whole completion does not: nothing reads the connection until the
answer is sent. `unless_abandoned` runs the work beside a watch on the ASGI `receive`
channel (the body is already read, so the next message is `http.disconnect`) and on the
app's `stopping` event, and cancels the work as soon as either fires. Cancelling leaves
the engine's `open_chain`, which closes the chain and frees the hosts' cache.

The client that left gets `client_closed()` (499, for logs and metrics), the one whose
server is stopping `shutting_down()` (503 with Retry-After).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

from litestar.types import Receive

from stamen.api.errors import client_closed, shutting_down

T = TypeVar("T")


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_abandoned(
    work: Coroutine[Any, Any, T],
    *,
    receive: Receive,
    stopping: asyncio.Event,
    retry_after_s: int,
) -> T:
    """`await work`, unless the client disconnects or `stopping` is set first."""
    job = asyncio.create_task(work)
    left = asyncio.create_task(_disconnected(receive))
    stopped = asyncio.create_task(stopping.wait())
    tasks = (job, left, stopped)
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if not job.cancelled():
        return job.result()
    if stopped.done() and not stopped.cancelled():
        raise shutting_down(retry_after_s)
    raise client_closed()
