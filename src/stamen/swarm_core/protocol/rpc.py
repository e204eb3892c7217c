"""Typed RPC over any transport `Connection`: one stream per call.

The dialer opens the first stream of every connection with a `Hello`; the listener
answers `HelloReply` or refuses another major protocol version (`VersionMismatch` on
both sides), and serves nothing before that. Then each call is its own stream:

- unary: the client sends one request and gets one reply (`RpcClient.call`);
- streaming: the client opens a stream whose first message picks the handler; the
  handler receives the later messages as an async iterator and yields replies
  (`RpcClient.open_stream`). Inference sessions are streaming calls, one per session.

The server dispatches on the first message's type (`RpcServer.add_unary/add_stream`).
A handler's lifetime is its stream's: when the client resets or closes the stream
(cancellation, timeout, exit), the handler task is cancelled. A handler raising a
`RemoteError` subclass sends that code; any other exception sends `internal` and is
logged; the server keeps serving. Every wait has a timeout (`RpcLimits`).

Stream limits are announced, never discovered by failure, and never close a connection:
the server runs at most `max_concurrent_streams` calls per connection and says so in its
`HelloReply`; the client sizes its call slots to the lower of its own cap and that
(`RpcClient.max_concurrent_calls`), so a call waits for a free slot within its timeout or
raises `SlotTimeout`. A stream beyond the server's limit (a client that ignores the
announcement, or a slot reused while the server still finishes the old stream) waits
`admission_wait_s` for a slot and is then answered `busy`; other streams carry on.

Errors raised on the client are `protocol.errors`' tree (an `ErrorReply` is raised as
the `RemoteError` subclass of its code, with its `retry_after_s`), `wire.VersionMismatch`
when the handshake fails (either side refused), and `transports.base.TransportError`
unchanged (stream or connection lost).

This module knows nothing about what the handlers compute or which transport is used.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
import torch

from stamen.swarm_core.protocol.codecs import Codec
from stamen.swarm_core.protocol.errors import (
    ErrorCode,
    ProtocolError,
    RemoteBadRequest,
    RemoteError,
    RemoteTimeout,
    RpcError,
    RpcTimeout,
    SlotTimeout,
    remote_error,
)
from stamen.swarm_core.protocol.wire import (
    Decoded,
    ErrorReply,
    Hello,
    HelloReply,
    Message,
    Ping,
    Pong,
    VersionMismatch,
    WireError,
    WireLimits,
    check_compatible,
    decode_message,
    encode_message,
)
from stamen.transports.base import Connection, Stream, Transport, TransportError

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


def raise_if_error(message: Message) -> None:
    """Raise the client-side exception an `ErrorReply` stands for."""
    if not isinstance(message, ErrorReply):
        return
    if message.code is ErrorCode.VERSION_MISMATCH:
        raise VersionMismatch(message.message)
    raise remote_error(message.code, message.message, message.retry_after_s)


@dataclass(frozen=True)
class Outgoing:
    """A reply (or request) with tensors; handlers may also return a bare message."""

    message: Message
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    codec: Codec | Mapping[str, Codec] = Codec.NONE

    def frames(self) -> list[Any]:
        return encode_message(self.message, self.tensors, codec=self.codec)


@dataclass(frozen=True)
class RpcLimits:
    """Per-connection caps and the server's timeouts."""

    max_concurrent_streams: int = 64  # per connection; announced in `HelloReply`
    admission_wait_s: float = 1.0  # a stream over the limit waits this long before `busy`
    handshake_timeout_s: float = 10.0
    first_message_timeout_s: float = 30.0  # a new stream must say what it wants
    unary_timeout_s: float = 300.0  # a unary handler's compute budget
    stream_idle_timeout_s: float = 600.0  # between two messages of a streaming call
    send_timeout_s: float = 60.0  # a reply waiting on a peer that does not read
    stream_queue_messages: int = 4  # received but not yet handled, per stream


@dataclass(frozen=True)
class CallContext:
    """Who is calling: handed to every handler."""

    peer: Hello
    remote_public_key: bytes
    remote_address: str


Reply = Message | Outgoing
UnaryHandler = Callable[[Decoded, CallContext], Awaitable[Reply]]
StreamHandler = Callable[[Decoded, AsyncIterator[Decoded], CallContext], AsyncGenerator[Reply]]


@dataclass(frozen=True)
class _Route:
    handler: Any
    streaming: bool


async def _pong(request: Decoded, context: CallContext) -> Reply:
    nonce = request.message.nonce if isinstance(request.message, Ping) else 0
    return Pong(nonce=nonce)


def _frames_of(reply: Reply) -> list[Any]:
    return reply.frames() if isinstance(reply, Outgoing) else encode_message(reply)


async def _with_timeout(timeout_s: float, awaitable: Awaitable[_T]) -> _T:
    async with asyncio.timeout(timeout_s):
        return await awaitable


class RpcServer:
    """Serves registered handlers on every connection given to `serve`."""

    def __init__(
        self,
        hello: HelloReply,
        *,
        limits: RpcLimits | None = None,
        wire_limits: WireLimits | None = None,
    ) -> None:
        self.limits = limits or RpcLimits()
        self.hello = msgspec.structs.replace(
            hello, max_concurrent_streams=self.limits.max_concurrent_streams
        )
        self.wire_limits = wire_limits or WireLimits()
        self._routes: dict[type, _Route] = {Ping: _Route(_pong, streaming=False)}

    def add_unary(self, request_type: type, handler: UnaryHandler) -> None:
        self._routes[request_type] = _Route(handler, streaming=False)

    def add_stream(self, request_type: type, handler: StreamHandler) -> None:
        self._routes[request_type] = _Route(handler, streaming=True)

    async def serve(self, connection: Connection) -> None:
        """Handshake, then serve the connection's streams until it closes.
        Usable directly as the `handler` of `Transport.listen`."""
        try:
            peer = await self._handshake(connection)
        except (TransportError, TimeoutError, WireError, RemoteError) as e:
            logger.info("handshake with %s failed: %s", connection.remote_address, e)
            return
        context = CallContext(peer, connection.remote_public_key, connection.remote_address)
        slots = asyncio.Semaphore(self.limits.max_concurrent_streams)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                stream = await connection.accept_stream()
                if len(tasks) >= 2 * self.limits.max_concurrent_streams:
                    stream.reset()  # a flood: not even worth a `busy` reply
                    continue
                task = asyncio.create_task(self._admit(stream, context, slots))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        except TransportError:
            logger.debug("connection from %s ended", connection.remote_address)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _admit(self, stream: Stream, context: CallContext, slots: asyncio.Semaphore) -> None:
        """Serve `stream` in a free slot, or answer it `busy` if none frees up in time.
        The wait covers a client that reused a slot as soon as it closed its stream,
        while this side was still finishing that stream."""
        try:
            await _with_timeout(self.limits.admission_wait_s, slots.acquire())
        except TimeoutError:
            await self._reject_busy(stream)
            return
        try:
            await self._serve_stream(stream, context)
        finally:
            slots.release()

    async def _handshake(self, connection: Connection) -> Hello:
        timeout_s = self.limits.handshake_timeout_s
        stream = await _with_timeout(timeout_s, connection.accept_stream())
        refusal: RemoteError | None = None
        try:
            frames = await _with_timeout(timeout_s, stream.recv())
            try:
                peer = self._check_greeting(frames)
            except RemoteError as e:
                refusal = e
                await self._send_error(stream, e.code, e.message)
            else:
                await _with_timeout(timeout_s, stream.send(encode_message(self.hello)))
        except BaseException:
            stream.reset()
            raise
        await stream.close()  # graceful, so that a refusal reaches the peer
        if refusal is not None:
            raise refusal
        return peer

    def _check_greeting(self, frames: list[bytes]) -> Hello:
        """The dialer's `Hello`; raises the `RemoteError` to refuse it with."""
        try:
            message = decode_message(frames, self.wire_limits).message
        except WireError as e:
            raise RemoteBadRequest(str(e)) from None
        if not isinstance(message, Hello):
            raise RemoteBadRequest(f"expected hello, got {type(message).__name__}")
        try:
            check_compatible(self.hello, message)
        except VersionMismatch as e:
            refusal = RemoteError(str(e))
            refusal.code = ErrorCode.VERSION_MISMATCH
            raise refusal from None
        return message

    async def _serve_stream(self, stream: Stream, context: CallContext) -> None:
        try:
            frames = await _with_timeout(self.limits.first_message_timeout_s, stream.recv())
            try:
                first = decode_message(frames, self.wire_limits)
            except WireError as e:
                await self._send_error(stream, ErrorCode.BAD_REQUEST, str(e))
                return
            route = self._routes.get(type(first.message))
            if route is None:
                name = type(first.message).__name__
                await self._send_error(stream, ErrorCode.NOT_FOUND, f"no handler for {name}")
                return
            if route.streaming:
                await self._run_stream(route.handler, first, stream, context)
            else:
                await self._run_unary(route.handler, first, stream, context)
        except (TransportError, TimeoutError) as e:
            logger.debug("stream %d ended: %r", stream.stream_id, e)
        except Exception:
            logger.exception("serving stream %d failed", stream.stream_id)
        finally:
            with contextlib.suppress(TransportError):
                await stream.close()

    async def _run_unary(
        self, handler: UnaryHandler, first: Decoded, stream: Stream, context: CallContext
    ) -> None:
        work = asyncio.create_task(
            _with_timeout(self.limits.unary_timeout_s, handler(first, context))
        )
        # The client sends nothing more on a unary stream: recv returns only when the
        # client goes away (reset, cancellation), which must cancel the work.
        watch = asyncio.create_task(stream.recv())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                logger.debug("client left stream %d; handler cancelled", stream.stream_id)
            await asyncio.gather(work, watch, return_exceptions=True)
        if not work.cancelled():
            await self._send_outcome(stream, work)

    async def _send_outcome(self, stream: Stream, work: asyncio.Task[Reply]) -> None:
        try:
            frames = _frames_of(work.result())  # an unencodable reply is the handler's bug
        except Exception as e:  # every handler failure becomes a typed reply
            await self._send_failure(stream, e)
            return
        await self._send(stream, frames)

    async def _run_stream(
        self, handler: StreamHandler, first: Decoded, stream: Stream, context: CallContext
    ) -> None:
        queue: asyncio.Queue[Decoded | WireError] = asyncio.Queue(self.limits.stream_queue_messages)

        async def requests() -> AsyncIterator[Decoded]:
            while True:
                try:
                    item = await _with_timeout(self.limits.stream_idle_timeout_s, queue.get())
                except TimeoutError:
                    raise RemoteTimeout("no message within the idle timeout") from None
                if isinstance(item, WireError):
                    raise RemoteBadRequest(str(item))
                yield item

        async def drive() -> None:
            replies = handler(first, requests(), context)
            try:
                while True:
                    try:
                        frames = _frames_of(await anext(replies))
                    except StopAsyncIteration:
                        return
                    except Exception as e:  # every handler failure becomes a typed reply
                        await self._send_failure(stream, e)
                        return
                    await self._send(stream, frames)
            finally:
                await replies.aclose()  # run the handler's cleanup (free its cache) now

        async def pump() -> None:
            while True:
                frames = await stream.recv()
                try:
                    await queue.put(decode_message(frames, self.wire_limits))
                except WireError as e:
                    await queue.put(e)
                    return

        driver = asyncio.create_task(drive())
        pumper = asyncio.create_task(pump())
        try:
            await asyncio.wait({driver, pumper}, return_when=asyncio.FIRST_COMPLETED)
            if pumper.done() and not driver.done() and pumper.exception() is not None:
                driver.cancel()  # the client closed or reset: nobody will read replies
            else:
                await driver
        finally:
            for task in (driver, pumper):
                task.cancel()
            await asyncio.gather(driver, pumper, return_exceptions=True)

    async def _send(self, stream: Stream, frames: list[Any]) -> None:
        await _with_timeout(self.limits.send_timeout_s, stream.send(frames))

    async def _send_failure(self, stream: Stream, error: BaseException) -> None:
        if isinstance(error, RemoteError):
            code, text, retry = error.code, error.message, error.retry_after_s
        elif isinstance(error, TimeoutError):
            code, text, retry = ErrorCode.TIMEOUT, "the handler timed out", None
        else:
            logger.error("handler failed on stream %d", stream.stream_id, exc_info=error)
            code, text, retry = ErrorCode.INTERNAL, type(error).__name__, None
        await self._send_error(stream, code, text, retry)

    async def _send_error(
        self, stream: Stream, code: ErrorCode, text: str, retry_after_s: float | None = None
    ) -> None:
        reply = ErrorReply(code=code, message=text[:4096], retry_after_s=retry_after_s)
        with contextlib.suppress(TransportError, TimeoutError):
            await self._send(stream, encode_message(reply))

    async def _reject_busy(self, stream: Stream) -> None:
        try:
            text = f"more than {self.limits.max_concurrent_streams} concurrent calls"
            await self._send_error(stream, ErrorCode.BUSY, text, retry_after_s=1.0)
        finally:
            with contextlib.suppress(TransportError):
                await stream.close()


class RpcStream:
    """The client's end of a streaming call; every wait has a timeout."""

    def __init__(self, stream: Stream, wire_limits: WireLimits, timeout_s: float) -> None:
        self._stream = stream
        self._wire_limits = wire_limits
        self.timeout_s = timeout_s

    async def send(
        self,
        message: Message,
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        codec: Codec | Mapping[str, Codec] = Codec.NONE,
        timeout_s: float | None = None,
    ) -> None:
        frames = encode_message(message, tensors, codec=codec)
        await _client_wait(timeout_s or self.timeout_s, self._stream.send(frames))

    async def recv(self, *, timeout_s: float | None = None) -> Decoded:
        """The next reply; raises the `RemoteError` an `ErrorReply` stands for."""
        frames = await _client_wait(timeout_s or self.timeout_s, self._stream.recv())
        return self._decode(frames)

    def _decode(self, frames: list[bytes]) -> Decoded:
        try:
            decoded = decode_message(frames, self._wire_limits)
        except WireError as e:
            self._stream.reset()
            raise ProtocolError(f"invalid reply: {e}") from e
        raise_if_error(decoded.message)
        return decoded

    async def call(
        self,
        message: Message,
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        codec: Codec | Mapping[str, Codec] = Codec.NONE,
        timeout_s: float | None = None,
    ) -> Decoded:
        """Send one message and wait for its reply, both within one `timeout_s`."""
        frames = encode_message(message, tensors, codec=codec)
        timeout_s = timeout_s or self.timeout_s
        # One deadline for the round trip: a deadline costs a timer and a context per
        # await, paid on every step of every hop.
        try:
            async with asyncio.timeout(timeout_s):
                await self._stream.send(frames)
                reply = await self._stream.recv()
        except TimeoutError:
            raise RpcTimeout(f"no answer within {timeout_s} s") from None
        return self._decode(reply)

    def reset(self) -> None:
        self._stream.reset()

    async def close(self) -> None:
        with contextlib.suppress(TransportError):
            await self._stream.close()


async def _client_wait(timeout_s: float, awaitable: Awaitable[_T]) -> _T:
    try:
        return await _with_timeout(timeout_s, awaitable)
    except TimeoutError:
        raise RpcTimeout(f"no answer within {timeout_s} s") from None


class RpcClient:
    """Calls a peer's `RpcServer` over one connection, after the `Hello` handshake."""

    def __init__(
        self,
        connection: Connection,
        hello: Hello,
        *,
        max_concurrent_calls: int = 64,
        wire_limits: WireLimits | None = None,
    ) -> None:
        self.connection = connection
        self.hello = hello
        self.wire_limits = wire_limits or WireLimits()
        self.remote: HelloReply | None = None
        self.max_concurrent_calls = max_concurrent_calls  # lowered to the peer's at handshake
        self._slots = asyncio.Semaphore(max_concurrent_calls)

    @classmethod
    async def connect(
        cls,
        transport: Transport,
        address: str,
        hello: Hello,
        *,
        expected_public_key: bytes | None = None,
        timeout_s: float = 10.0,
        **kwargs: Any,
    ) -> RpcClient:
        """Dial `address` and complete the handshake (closing the connection on failure)."""
        connection = await transport.connect(
            address, expected_public_key=expected_public_key, timeout_s=timeout_s
        )
        client = cls(connection, hello, **kwargs)
        try:
            await client.handshake(timeout_s=timeout_s)
        except BaseException:
            await connection.close()
            raise
        return client

    async def handshake(self, *, timeout_s: float = 10.0) -> HelloReply:
        """Greet the server; raises `VersionMismatch` when either side refuses."""
        async with self._stream(timeout_s) as stream:
            await stream.send(self.hello)
            reply = (await stream.recv()).message
        if not isinstance(reply, HelloReply):
            raise ProtocolError(f"expected hello_reply, got {type(reply).__name__}")
        check_compatible(self.hello, reply)
        self.remote = reply
        self._size_slots(reply.max_concurrent_streams)
        return reply

    def _size_slots(self, announced: int | None) -> None:
        """Take the peer's announced limit; before any call, so no slot is held."""
        if announced is not None and announced < self.max_concurrent_calls:
            self.max_concurrent_calls = announced
            self._slots = asyncio.Semaphore(announced)

    async def call(
        self,
        message: Message,
        tensors: Mapping[str, torch.Tensor] | None = None,
        *,
        timeout_s: float,
        codec: Codec | Mapping[str, Codec] = Codec.NONE,
    ) -> Decoded:
        """One request, one reply, within `timeout_s` (waiting for a free slot included).
        Cancelling it resets the stream, which cancels the server's handler."""
        self._require_handshake()
        stream: RpcStream | None = None
        try:
            async with asyncio.timeout(timeout_s), self._stream(timeout_s) as stream:
                return await stream.call(message, tensors, codec=codec)
        except TimeoutError as e:
            if isinstance(e, RpcError):
                raise
            if stream is None:  # nothing was sent
                raise SlotTimeout(f"no free call slot within {timeout_s} s") from None
            raise RpcTimeout(f"{type(message).__name__} got no answer in {timeout_s} s") from None

    @contextlib.asynccontextmanager
    async def open_stream(self, *, timeout_s: float = 60.0) -> AsyncIterator[RpcStream]:
        """A streaming call; `timeout_s` is the default for each send and recv. Leaving the
        block closes the stream (resets it on error or cancellation)."""
        self._require_handshake()
        async with self._stream(timeout_s) as stream:
            yield stream

    async def close(self) -> None:
        await self.connection.close()

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def _require_handshake(self) -> None:
        if self.remote is None:
            raise RuntimeError("call handshake() (or RpcClient.connect) first")

    @contextlib.asynccontextmanager
    async def _stream(self, timeout_s: float) -> AsyncIterator[RpcStream]:
        slots = self._slots  # the handshake's stream releases the slot it took
        try:
            await _with_timeout(timeout_s, slots.acquire())
        except TimeoutError:
            raise SlotTimeout(f"no free call slot within {timeout_s} s") from None
        try:
            raw = await _client_wait(timeout_s, self.connection.open_stream())
            stream = RpcStream(raw, self.wire_limits, timeout_s)
            try:
                yield stream
            except BaseException:
                stream.reset()
                raise
            await stream.close()
        finally:
            slots.release()
