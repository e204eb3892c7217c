"""Many sessions to one host: the pool spreads them over connections within the host's
announced stream limit, a full pool fails one lease (never a connection), and the
swarm client's pings neither close connections nor take slots that sessions need."""

from __future__ import annotations

import asyncio

import pytest
import torch

from stamen.swarm_core.client.pool import HostConnections
from stamen.swarm_core.client.swarm import ClientSettings, SwarmClient
from stamen.swarm_core.protocol.errors import SlotTimeout
from stamen.swarm_core.protocol.rpc import Outgoing, RpcClient, RpcLimits, RpcServer
from stamen.swarm_core.protocol.wire import (
    CloseSession,
    Hello,
    HelloReply,
    OpenSession,
    Ping,
    Pong,
    SessionClosed,
    SessionId,
    SessionOpened,
    Step,
    StepResult,
)
from stamen.transports.base import Credentials, Transport
from stamen.transports.memory import MemoryHub, MemoryTransport

STREAM_LIMIT = 4
OPEN = OpenSession(block_start=0, block_end=1, max_length=8)


async def echo_session(first, requests, context):
    session_id = SessionId("s")
    yield SessionOpened(session_id=session_id, max_length=first.message.max_length)
    async for request in requests:
        match request.message:
            case Step(start_position=start):
                hidden = request.tensors["hidden"]
                position = start + hidden.shape[1]
                yield Outgoing(
                    StepResult(session_id=session_id, position=position), {"hidden": hidden}
                )
            case CloseSession():
                yield SessionClosed(session_id=session_id)
                return


class Host:
    """An `RpcServer` with a small stream limit, and a way to dial it."""

    def __init__(self, server: RpcServer, client_transport: Transport, address: str) -> None:
        self.server = server
        self.client_transport = client_transport
        self.address = address
        self.dials = 0

    async def dial(self) -> RpcClient:
        self.dials += 1
        return await RpcClient.connect(
            self.client_transport, self.address, Hello.local("client"), timeout_s=5
        )


@pytest.fixture(params=["memory", "tcp"])
async def host(request):
    server = RpcServer(
        HelloReply.local("host"),
        limits=RpcLimits(max_concurrent_streams=STREAM_LIMIT, admission_wait_s=0.2),
    )
    server.add_stream(OpenSession, echo_session)
    if request.param == "memory":
        hub = MemoryHub()
        server_transport: Transport = MemoryTransport(Credentials.generate(), hub=hub)
        client_transport: Transport = MemoryTransport(Credentials.generate(), hub=hub)
        address = "memory://"
    else:
        tcp = pytest.importorskip("stamen.transports.tcp")
        server_transport = tcp.TcpTransport(Credentials.generate())
        client_transport = tcp.TcpTransport(Credentials.generate())
        address = "tcp://127.0.0.1:0"
    listener = await server_transport.listen(address, server.serve)
    yield Host(server, client_transport, listener.addresses[0])
    for transport in (server_transport, client_transport):
        await transport.aclose()


async def session(pool: HostConnections, opened: asyncio.Barrier, *, timeout_s: float = 5):
    """Open a session, wait until every other one is open too, step it, close it."""
    async with pool.lease(timeout_s) as rpc, rpc.open_stream(timeout_s=5) as stream:
        assert isinstance((await stream.call(OPEN)).message, SessionOpened)
        await asyncio.wait_for(opened.wait(), 10)
        hidden = torch.zeros(1, 2, 4)
        reply = await stream.call(
            Step(session_id=SessionId("s"), start_position=0), {"hidden": hidden}
        )
        assert reply.message.position == 2
        assert isinstance(
            (await stream.call(CloseSession(session_id=SessionId("s")))).message, SessionClosed
        )


async def hold_sessions(pool: HostConnections, count: int):
    """`count` open sessions, each holding its slot until `release` is set."""
    release, all_open = asyncio.Event(), asyncio.Event()
    opened = 0

    async def hold():
        nonlocal opened
        async with pool.lease(5) as rpc, rpc.open_stream(timeout_s=5) as stream:
            await stream.call(OPEN)
            opened += 1
            if opened == count:
                all_open.set()
            await release.wait()
            step = Step(session_id=SessionId("s"), start_position=0)
            return (await stream.call(step, {"hidden": torch.zeros(1, 1, 4)})).message

    tasks = [asyncio.create_task(hold()) for _ in range(count)]
    await asyncio.wait_for(all_open.wait(), 10)
    return release, tasks


async def test_twenty_sessions_spread_over_connections_within_the_announced_limit(host):
    pool = HostConnections(host.dial, max_connections=8)
    await pool.ensure_connected()
    rpc = pool.connections[0]
    assert rpc.remote is not None and rpc.remote.max_concurrent_streams == STREAM_LIMIT
    assert rpc.max_concurrent_calls == STREAM_LIMIT
    opened = asyncio.Barrier(20)
    await asyncio.gather(*(session(pool, opened) for _ in range(20)))
    assert len(pool.connections) == 20 // STREAM_LIMIT == host.dials
    assert all(not rpc.connection.is_closed for rpc in pool.connections)
    await pool.aclose()


async def test_sessions_reuse_freed_slots_without_busy_answers(host):
    pool = HostConnections(host.dial, max_connections=1)
    for _ in range(3):  # slots are reused the moment a session closes
        opened = asyncio.Barrier(STREAM_LIMIT)
        await asyncio.gather(*(session(pool, opened) for _ in range(STREAM_LIMIT)))
    opened = asyncio.Barrier(1)
    await asyncio.gather(*(session(pool, opened) for _ in range(3 * STREAM_LIMIT)))
    assert host.dials == 1
    await pool.aclose()


async def test_a_full_pool_fails_one_lease_and_keeps_every_connection(host):
    pool = HostConnections(host.dial, max_connections=2)
    release, held = await hold_sessions(pool, 2 * STREAM_LIMIT)
    connections = pool.connections
    with pytest.raises(SlotTimeout):
        async with pool.lease(0.2):
            pass
    async with pool.try_lease() as rpc:
        assert rpc is None
    assert pool.connections == connections and len(connections) == 2
    release.set()
    replies = await asyncio.gather(*held)
    assert all(isinstance(reply, StepResult) for reply in replies)
    async with pool.lease(1) as rpc:
        assert (await rpc.call(Ping(nonce=3), timeout_s=5)).message == Pong(nonce=3)
    await pool.aclose()


async def test_a_lease_waits_for_a_slot_that_frees_up(host):
    pool = HostConnections(host.dial, max_connections=1)
    release, held = await hold_sessions(pool, STREAM_LIMIT)

    async def lease_one() -> RpcClient:
        async with pool.lease(5) as rpc:
            return rpc

    waiting = asyncio.create_task(lease_one())
    await asyncio.sleep(0.1)
    assert not waiting.done()
    async with pool.try_lease() as rpc:
        assert rpc is None  # a ping must not jump the queue of a waiting session
    release.set()
    rpc = await asyncio.wait_for(waiting, 5)
    assert rpc is pool.connections[0]
    await asyncio.gather(*held)
    await pool.aclose()


async def test_closed_connections_leave_the_pool(host):
    pool = HostConnections(host.dial, max_connections=2)
    await pool.ensure_connected()
    await pool.connections[0].close()
    assert pool.connections == []
    async with pool.lease(5) as rpc:
        assert isinstance((await rpc.call(Ping(), timeout_s=5)).message, Pong)
    assert host.dials == 2
    await pool.aclose()


def swarm_with(pool: HostConnections, **settings) -> SwarmClient:
    swarm = SwarmClient(
        "model",
        1,
        MemoryTransport(Credentials.generate(), hub=MemoryHub()),
        Credentials.generate(),
        initial_peers=(),
        settings=ClientSettings(**settings),
    )
    swarm._connections["host"] = pool
    return swarm


async def test_a_ping_without_a_free_slot_leaves_sessions_and_connection_alone(host):
    pool = HostConnections(host.dial, max_connections=1)
    swarm = swarm_with(pool, ping_timeout_s=0.2)
    release, held = await hold_sessions(pool, STREAM_LIMIT)
    rpc = pool.connections[0]
    await asyncio.wait_for(swarm._ping("host"), 1)
    assert "host" not in swarm._pings and not rpc.connection.is_closed
    release.set()
    assert all(isinstance(reply, StepResult) for reply in await asyncio.gather(*held))
    await swarm._ping("host")
    assert swarm._pings["host"] > 0
    await swarm.aclose()
    assert rpc.connection.is_closed


async def test_a_ping_that_times_out_keeps_the_connection(host):
    async def never_answer(request, context):
        await asyncio.Event().wait()

    host.server.add_unary(Ping, never_answer)
    pool = HostConnections(host.dial, max_connections=1)
    swarm = swarm_with(pool, ping_timeout_s=0.2)
    release, held = await hold_sessions(pool, 2)
    swarm._pings["host"] = 0.5
    await swarm._ping("host")
    assert swarm._pings["host"] == 0.5
    assert pool.connections and not pool.connections[0].connection.is_closed
    release.set()
    assert all(isinstance(reply, StepResult) for reply in await asyncio.gather(*held))
    await swarm.aclose()
