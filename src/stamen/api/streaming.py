"""Server-Sent Events for streamed completions, with keep-alive comments and error events.

`sse_stream` runs a chunk producer in a task it owns and relays its chunks as `data:`
events (orjson-encoded), ending with `data: [DONE]`. While the producer is silent (a long
prefill) it sends a comment line every `keepalive_s` so proxies and clients keep the
connection open. If the producer fails mid-stream, the client gets one `data:` event with
an OpenAI error object (the SDK raises it) and no `[DONE]`.

When the response is abandoned (a client disconnect cancels Litestar's stream), the
`finally` cancels the producer, which closes its chain and frees the hosts' cache. When
the server stops (`stopping` is set), the producer is cancelled the same way and the
client gets a `service_unavailable` error event in place of the chunks not yet sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import orjson
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from stamen.api.engine import EngineUnavailable
from stamen.api.errors import APIError, shutting_down, unavailable

logger = logging.getLogger(__name__)

_END = object()


async def _pump(chunks: AsyncIterator[dict], queue: asyncio.Queue[object]) -> None:
    try:
        async for chunk in chunks:
            await queue.put(chunk)
            # Let the relay send this chunk before the producer starts the next token: that
            # work (embedding, the next step's send or thread) would otherwise delay it.
            await asyncio.sleep(0)
    except asyncio.CancelledError:
        raise
    except APIError as error:
        await queue.put(error)
    except EngineUnavailable as error:
        logger.warning("stream stopped: %s", error)
        await queue.put(unavailable(error, retry_after_s=5))
    except Exception as error:
        logger.exception("generation failed mid-stream")
        await queue.put(
            APIError(
                500, f"The generation failed: {error}", type="server_error", code="stream_error"
            )
        )
    else:
        await queue.put(_END)


async def _stop_on(
    stopping: asyncio.Event,
    producer: asyncio.Task[None],
    queue: asyncio.Queue[object],
    retry_after_s: int,
) -> None:
    await stopping.wait()
    producer.cancel()
    while not queue.empty():  # the stream ends now, not after the chunks already queued
        queue.get_nowait()
    queue.put_nowait(shutting_down(retry_after_s))


async def _events(
    chunks: AsyncIterator[dict],
    keepalive_s: float,
    on_close: Callable[[], None],
    stopping: asyncio.Event,
    retry_after_s: int,
) -> AsyncIterator[ServerSentEventMessage]:
    # Bounded: a client that reads slowly makes the producer wait instead of buffering.
    queue: asyncio.Queue[object] = asyncio.Queue(maxsize=64)
    producer = asyncio.create_task(_pump(chunks, queue))
    stopper = asyncio.create_task(_stop_on(stopping, producer, queue, retry_after_s))
    try:
        while True:
            try:
                # A timeout scope, not `wait_for`: no task is created per relayed chunk.
                async with asyncio.timeout(keepalive_s):
                    item = await queue.get()
            except TimeoutError:
                yield ServerSentEventMessage(data=None, comment="keep-alive")
                continue
            if item is _END:
                yield ServerSentEventMessage(data="[DONE]")
                return
            if isinstance(item, APIError):
                yield ServerSentEventMessage(data=orjson.dumps(item.body()).decode())
                return
            yield ServerSentEventMessage(data=orjson.dumps(item).decode())
    finally:
        producer.cancel()
        stopper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        with contextlib.suppress(asyncio.CancelledError):
            await stopper
        on_close()


def sse_stream(
    chunks: AsyncIterator[dict],
    *,
    keepalive_s: float,
    on_close: Callable[[], None],
    stopping: asyncio.Event,
    retry_after_s: int,
) -> ServerSentEvent:
    """An SSE response relaying `chunks` until they end or `stopping` is set; `on_close`
    runs once the stream is over."""
    return ServerSentEvent(_events(chunks, keepalive_s, on_close, stopping, retry_after_s))
