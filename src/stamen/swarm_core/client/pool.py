"""Connections to one host, shared by calls: every call leases a free call slot.

A host serves a bounded number of calls per connection (announced in its `HelloReply`,
mirrored by `RpcClient.max_concurrent_calls`), and an inference session holds its call
for as long as it lives. `HostConnections` keeps up to `max_connections` connections to
one host and hands each call a connection with a free slot (`lease`): the oldest first,
another one dialed when every open one is full and the cap allows, else a wait for a
slot to free up, within the caller's timeout. Every call on a pooled connection goes
through a lease, so the `RpcClient`'s own slot wait never blocks.

Contracts:

- a full pool never closes a connection: the one lease that finds no slot in time
  raises `SlotTimeout`, and every other call carries on;
- a closed connection is dropped at the next lease; what closes one is the transport (its
  keepalive, the peer) or `aclose`, never a failed call;
- `try_lease` never waits and never dials, and yields nothing while a lease is waiting:
  background work (pings) never takes a slot that a session needs.

This module knows nothing about what calls carry or where a host's addresses come from.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from stamen.swarm_core.protocol.errors import SlotTimeout
from stamen.swarm_core.protocol.rpc import RpcClient

Dial = Callable[[], Awaitable[RpcClient]]


async def _cannot_dial() -> RpcClient:
    raise RuntimeError("this pool was given its connection and cannot dial another")


class HostConnections:
    """Up to `max_connections` handshaken `RpcClient`s to one host, leased per call."""

    def __init__(self, dial: Dial, *, max_connections: int) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        self._dial = dial
        self.max_connections = max_connections
        self._calls: dict[RpcClient, int] = {}  # open connection -> leased slots
        self._dialing = asyncio.Lock()
        self._freed = asyncio.Event()
        self._waiting = 0

    @classmethod
    def of(cls, rpc: RpcClient) -> HostConnections:
        """A pool of one connection opened elsewhere (benchmarks, tests); never dials."""
        pool = cls(_cannot_dial, max_connections=1)
        pool._calls[rpc] = 0
        return pool

    @property
    def connections(self) -> list[RpcClient]:
        """The open connections, oldest first."""
        self._drop_closed()
        return list(self._calls)

    async def ensure_connected(self) -> None:
        """Dial the first connection unless one is open; raises what `dial` raises."""
        if self.connections:
            return
        async with self._dialing:
            if not self.connections:
                self._calls[await self._dial()] = 0

    @contextlib.asynccontextmanager
    async def lease(self, timeout_s: float) -> AsyncIterator[RpcClient]:
        """A connection with one slot reserved for the block. Raises `SlotTimeout` when no
        slot frees up within `timeout_s`, or what `dial` raises."""
        rpc = await self._take(timeout_s)
        try:
            yield rpc
        finally:
            self._give_back(rpc)

    @contextlib.asynccontextmanager
    async def try_lease(self) -> AsyncIterator[RpcClient | None]:
        """A free slot right now, or None (no free slot, or a lease is waiting for one)."""
        rpc = None if self._waiting else self._take_free()
        try:
            yield rpc
        finally:
            if rpc is not None:
                self._give_back(rpc)

    async def aclose(self) -> None:
        """Close every connection; leases still held fail with the transport's error."""
        connections, self._calls = list(self._calls), {}
        for rpc in connections:
            with contextlib.suppress(Exception):
                await rpc.close()

    async def _take(self, timeout_s: float) -> RpcClient:
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline:
                while (rpc := self._take_free()) is None:
                    if not await self._grow():
                        await self._wait_for_a_slot()
                return rpc
        except TimeoutError:
            if not deadline.expired():
                raise  # the dial's own timeout
            raise SlotTimeout(f"no free call slot within {timeout_s} s") from None

    def _take_free(self) -> RpcClient | None:
        self._drop_closed()
        for rpc, calls in self._calls.items():
            if calls < rpc.max_concurrent_calls:
                self._calls[rpc] = calls + 1
                return rpc
        return None

    async def _grow(self) -> bool:
        """Dial one more connection unless one has a free slot again or the cap is reached;
        False when the caller must wait for a slot."""
        async with self._dialing:
            if self._has_free_slot():
                return True  # another caller dialed, or a slot freed, meanwhile
            if len(self.connections) >= self.max_connections:
                return False
            self._calls[await self._dial()] = 0
            return True

    def _has_free_slot(self) -> bool:
        return any(self._calls[rpc] < rpc.max_concurrent_calls for rpc in self.connections)

    async def _wait_for_a_slot(self) -> None:
        # `set` wakes every waiter at once and each takes its turn to look again, so a
        # later `clear` cannot lose a wakeup.
        self._waiting += 1
        self._freed.clear()
        try:
            await self._freed.wait()
        finally:
            self._waiting -= 1

    def _give_back(self, rpc: RpcClient) -> None:
        if rpc in self._calls:
            self._calls[rpc] -= 1
        self._freed.set()

    def _drop_closed(self) -> None:
        for rpc in [rpc for rpc in self._calls if rpc.connection.is_closed]:
            del self._calls[rpc]
