"""The asyncio face of the multiplexer: `MuxStream` (a `base.Stream`) and `MuxSession`
(the part of a `base.Connection` both drivers share), a thin layer over `mux_core`.

The core decides everything; this layer only waits. A stream's `send` queues packets
through the core while it has credit and waits for `CreditAvailable` otherwise, `recv`
waits for `MessageReady` or `StreamEnded`, and the session turns the core's events into
wake-ups (`dispatch`) and its outbox into writes (`flush`, the driver's). A stream's
messages never interleave (a lock); different streams' packets do.

A driver subclasses `MuxSession` and supplies `flush` (write every packet in
`core.outbox`, in order), `drain` and `write_paused` (the pipe's backpressure), and
`on_peer_gone` (what to do with the pipe when the core says the peer left or broke the
protocol). After anything it feeds the core, it calls `dispatch` and then `flush`.
"""

from __future__ import annotations

import asyncio
from abc import abstractmethod
from collections import deque

from stamen.transports.base import Connection, Frames, Stream
from stamen.transports.flow import Signal, check_message
from stamen.transports.mux_core import (
    CreditAvailable,
    MessageReady,
    MuxCore,
    PeerGoingAway,
    ProtocolViolation,
    StreamEnded,
    StreamOpened,
    StreamState,
)


class MuxStream(Stream):
    """One stream of a `MuxSession`; its protocol state is the core's `StreamState`."""

    def __init__(self, session: MuxSession, state: StreamState) -> None:
        self._session = session
        self._core = session.core
        self._state = state
        self._send_lock = asyncio.Lock()
        self.changed = Signal(session.loop)
        state.waker = self.changed

    @property
    def stream_id(self) -> int:
        return self._state.stream_id

    async def send(self, frames: Frames) -> None:
        core, state, session = self._core, self._state, self._session
        core.check_sendable(state)
        views = check_message(frames, core.peer.limits)
        if not self._send_lock.locked() and core.send_whole(state, views):
            # The common message: one packet, no lock round, no chunking.
            session.flush()
            if session.write_paused:
                await session.drain()
            return
        async with self._send_lock:
            message = core.begin_message(state, views)
            while not message.done:
                if not core.push(state, message):
                    await self.changed.wait()  # credit, a reset, or the connection's end
                    continue
                session.flush()
                await session.drain()

    async def recv(self) -> list[bytes]:
        core, state = self._core, self._state
        while True:
            try:
                message = core.next_message(state)
            finally:
                if core.outbox:  # credit granted back, or our CLOSE after theirs
                    self._session.flush()
            if message is not None:
                return message
            await self.changed.waiter()

    async def close(self) -> None:
        if self._state.is_over:
            return
        async with self._send_lock:  # a message being sent goes out whole first
            self._core.close_stream(self._state)
            self._session.flush()
        self.changed.fire()

    def reset(self) -> None:
        if self._state.is_over:
            return
        self._core.reset_stream(self._state)
        self._session.flush()
        self.changed.fire()


class MuxSession(Connection):
    """Stream bookkeeping shared by the tcp and WebRTC connections. The driver sets
    `core` before it feeds the session anything."""

    core: MuxCore

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._incoming: deque[MuxStream] = deque()
        self.changed = Signal(self._loop)  # a stream arrived, or the connection ended

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    # --- what the driver supplies ----------------------------------------------------------

    @abstractmethod
    def flush(self) -> None:
        """Write every packet of `core.outbox`, in order, and empty it; never waits."""

    @abstractmethod
    async def drain(self) -> None:
        """Wait while the pipe's send buffer is full; raises `ConnectionClosed`."""

    @property
    @abstractmethod
    def write_paused(self) -> bool: ...

    @abstractmethod
    def on_peer_gone(self, reason: str, *, violation: bool) -> None:
        """The peer said goodbye (or broke the protocol): tear the pipe down."""

    # --- the Connection API ----------------------------------------------------------------

    @property
    def is_closed(self) -> bool:
        return self.core.is_closed

    def raise_if_closed(self) -> None:
        self.core.raise_if_closed()

    async def open_stream(self) -> MuxStream:
        state = self.core.open_stream()
        stream = MuxStream(self, state)
        # The peer learns of the stream from its first packet: when the caller sends at
        # once the SYN rides on that message, otherwise an empty packet carries it.
        self._loop.call_soon(self._announce, state.stream_id)
        return stream

    def _announce(self, stream_id: int) -> None:
        self.core.announce(stream_id)
        if self.core.outbox:
            self.flush()

    async def accept_stream(self) -> MuxStream:
        while True:
            if self._incoming:
                return self._incoming.popleft()
            self.raise_if_closed()
            await self.changed.wait()

    # --- events ----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Wake whoever waits for what the core just reported."""
        events = self.core.events
        if not events:
            return
        self.core.events = []
        for event in events:
            if type(event) is MessageReady:  # the hot one: first, and without a match
                waker = event.stream.waker
                if waker is not None:
                    waker.fire()
                continue
            match event:
                case CreditAvailable(stream) | StreamEnded(stream):
                    if stream.waker is not None:
                        stream.waker.fire()
                case StreamOpened(stream):
                    self._incoming.append(MuxStream(self, stream))
                    self.changed.fire()
                case PeerGoingAway():
                    self.on_peer_gone("the peer closed the connection", violation=False)
                case ProtocolViolation(reason):
                    self.on_peer_gone(f"protocol error: {reason}", violation=True)

    def end_session(self, reason: str) -> None:
        """The connection is over: every waiter sees `ConnectionClosed` (or its stream's
        `StreamClosed`)."""
        self.core.shutdown(reason)
        self.changed.fire()
        for state in list(self.core.streams.values()):
            if state.waker is not None:
                state.waker.fire()
