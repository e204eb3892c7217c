"""The memory transport lets go of closed connections (and the frames they hold)."""

import asyncio
import gc
import weakref

from stamen.transports.base import Credentials
from stamen.transports.memory import MemoryHub, MemoryTransport


async def _ignore(connection) -> None:
    await connection.close()


async def test_closed_connections_are_released():
    hub = MemoryHub()
    server = MemoryTransport(Credentials.generate(), hub=hub)
    client = MemoryTransport(Credentials.generate(), hub=hub)
    listener = await server.listen("memory://", _ignore)
    refs = []
    for _ in range(20):
        connection = await client.connect(listener.addresses[0])
        stream = await connection.open_stream()
        await stream.send([b"x" * 65536])  # frames the peer never reads
        refs.append(weakref.ref(connection))
        await connection.close()
        del connection, stream
    await asyncio.sleep(0.05)  # the listener's handler tasks finish
    gc.collect()
    assert all(ref() is None for ref in refs)
    await listener.close()
    await client.aclose()
    await server.aclose()
