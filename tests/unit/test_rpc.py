"""RPC over the in-process transport: unary and streaming calls, typed remote errors,
timeouts, cancellation reaching the server's handler, admission limits, the handshake."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import torch

from stamen.swarm_core.protocol.codecs import Codec
from stamen.swarm_core.protocol.errors import (
    ErrorCode,
    RemoteBadRequest,
    RemoteBusy,
    RemoteInternal,
    RemoteNotFound,
    RemoteTimeout,
    RemoteTooLarge,
    RpcTimeout,
    SlotTimeout,
)
from stamen.swarm_core.protocol.rpc import Outgoing, RpcClient, RpcLimits, RpcServer
from stamen.swarm_core.protocol.wire import (
    CloseSession,
    ErrorReply,
    Forward,
    ForwardResult,
    Hello,
    HelloReply,
    Info,
    OpenSession,
    Ping,
    Pong,
    SessionClosed,
    SessionId,
    SessionOpened,
    Step,
    StepResult,
    VersionMismatch,
    decode_message,
    encode_message,
)
from stamen.transports.base import ConnectionClosed, Credentials, Transport
from stamen.transports.memory import MemoryHub, MemoryTransport

SID = SessionId("s-1")
FORWARD = Forward(block_start=0, block_end=2)


class Probe:
    """What the test handlers saw, so tests can assert on the server side."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.cleaned_up = asyncio.Event()
        self.release = asyncio.Event()


async def double(request, context):
    return Outgoing(ForwardResult(), {"hidden": request.tensors["hidden"] * 2}, Codec.FLOAT16)


def blocking_handler(probe: Probe):
    async def handler(request, context):
        probe.started.set()
        try:
            await probe.release.wait()
        except asyncio.CancelledError:
            probe.cancelled.set()
            raise
        return Pong(nonce=1)

    return handler


def session_handler(probe: Probe):
    async def handler(first, requests, context):
        position = 0
        try:
            yield SessionOpened(session_id=SID, max_length=first.message.max_length)
            async for request in requests:
                match request.message:
                    case Step(start_position=start):
                        hidden = request.tensors["hidden"]
                        position = start + hidden.shape[1]
                        if position > first.message.max_length:
                            yield ErrorReply(code=ErrorCode.BAD_REQUEST, message="too long")
                            continue
                        yield Outgoing(
                            StepResult(session_id=SID, position=position), {"hidden": hidden + 1}
                        )
                    case CloseSession():
                        yield SessionClosed(session_id=SID)
                        return
                    case Info():
                        probe.started.set()
                        await probe.release.wait()
        finally:
            probe.cleaned_up.set()

    return handler


async def fail(request, context):
    raise ValueError("handler bug")


async def too_large(request, context):
    raise RemoteTooLarge("split it")


async def busy(request, context):
    raise RemoteBusy("cache full", retry_after_s=2.5)


@pytest.fixture
def probe():
    return Probe()


def make_transports(kind: str) -> tuple[Transport, Transport, str]:
    """(server transport, client transport, address to listen on)."""
    if kind == "memory":
        hub = MemoryHub()
        server = MemoryTransport(Credentials.generate(), hub=hub)
        return server, MemoryTransport(Credentials.generate(), hub=hub), "memory://"
    tcp = pytest.importorskip("stamen.transports.tcp")
    server = tcp.TcpTransport(Credentials.generate())
    return server, tcp.TcpTransport(Credentials.generate()), "tcp://127.0.0.1:0"


@pytest.fixture(params=["memory", "tcp"])
async def serve(request, probe):
    transports = []

    async def start(limits: RpcLimits | None = None, hello: HelloReply | None = None):
        server = RpcServer(hello or HelloReply.local("host"), limits=limits)
        server.add_unary(Forward, double)
        server.add_unary(Info, blocking_handler(probe))
        server.add_stream(OpenSession, session_handler(probe))
        server_transport, client_transport, address = make_transports(request.param)
        transports.extend([server_transport, client_transport])
        listener = await server_transport.listen(address, server.serve)
        return server, client_transport, listener.addresses[0]

    yield start
    for transport in transports:
        await transport.aclose()


async def connected(serve, **kwargs):
    server, transport, address = await serve(**kwargs)
    client = await RpcClient.connect(transport, address, Hello.local("client"), timeout_s=5)
    return server, client


async def test_unary_call_returns_typed_reply_with_tensors(serve):
    _, client = await connected(serve)
    assert client.remote is not None and client.remote.public_name == "host"
    hidden = torch.randn(2, 3, 8)
    reply = await client.call(FORWARD, {"hidden": hidden}, timeout_s=5)
    assert isinstance(reply.message, ForwardResult)
    assert torch.allclose(reply.tensors["hidden"], hidden * 2, rtol=1e-3)
    assert (await client.call(Ping(nonce=42), timeout_s=5)).message == Pong(nonce=42)


async def test_streaming_session_steps_in_order_and_cleans_up(serve, probe):
    _, client = await connected(serve)
    async with client.open_stream(timeout_s=5) as stream:
        opened = await stream.call(OpenSession(block_start=0, block_end=2, max_length=8))
        assert opened.message == SessionOpened(session_id=SID, max_length=8)
        hidden = torch.zeros(1, 3, 4)
        for start in (0, 3):
            reply = await stream.call(
                Step(session_id=SID, start_position=start), {"hidden": hidden}
            )
            assert reply.message == StepResult(session_id=SID, position=start + 3)
            assert torch.equal(reply.tensors["hidden"], hidden + 1)
        # A handler may answer one request with an error and keep the session.
        with pytest.raises(RemoteBadRequest, match="too long"):
            await stream.call(Step(session_id=SID, start_position=6), {"hidden": hidden})
        closed = await stream.call(CloseSession(session_id=SID))
        assert closed.message == SessionClosed(session_id=SID)
    await asyncio.wait_for(probe.cleaned_up.wait(), 5)


async def test_handler_errors_are_typed_and_server_keeps_serving(serve):
    server, client = await connected(serve)
    server.add_unary(Ping, fail)
    with pytest.raises(RemoteInternal, match="ValueError"):
        await client.call(Ping(), timeout_s=5)
    server.add_unary(Ping, busy)
    with pytest.raises(RemoteBusy) as caught:
        await client.call(Ping(), timeout_s=5)
    assert caught.value.retry_after_s == 2.5 and caught.value.message == "cache full"
    server.add_unary(Ping, too_large)
    with pytest.raises(RemoteTooLarge) as refused:  # its own type, still a bad request
        await client.call(Ping(), timeout_s=5)
    assert isinstance(refused.value, RemoteBadRequest) and refused.value.message == "split it"
    with pytest.raises(RemoteNotFound, match="SessionClosed"):
        await client.call(SessionClosed(session_id=SID), timeout_s=5)
    reply = await client.call(FORWARD, {"hidden": torch.ones(1, 1, 2)}, timeout_s=5)
    assert isinstance(reply.message, ForwardResult)


async def test_client_timeout_cancels_the_server_handler(serve, probe):
    _, client = await connected(serve)
    with pytest.raises(RpcTimeout):
        await client.call(Info(), timeout_s=0.2)
    assert probe.started.is_set()
    await asyncio.wait_for(probe.cancelled.wait(), 5)


async def test_cancelling_a_call_cancels_the_server_handler(serve, probe):
    _, client = await connected(serve)
    call = asyncio.create_task(client.call(Info(), timeout_s=30))
    await asyncio.wait_for(probe.started.wait(), 5)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.wait_for(probe.cancelled.wait(), 5)


async def test_leaving_a_stream_cancels_its_handler_and_runs_cleanup(serve, probe):
    _, client = await connected(serve)
    async with client.open_stream(timeout_s=5) as stream:
        await stream.call(OpenSession(block_start=0, block_end=1, max_length=4))
        await stream.send(Info())
        await asyncio.wait_for(probe.started.wait(), 5)
    await asyncio.wait_for(probe.cleaned_up.wait(), 5)


async def test_server_timeouts_reply_with_timeout_errors(serve):
    limits = RpcLimits(unary_timeout_s=0.1, stream_idle_timeout_s=0.1)
    _, client = await connected(serve, limits=limits)
    with pytest.raises(RemoteTimeout):
        await client.call(Info(), timeout_s=5)
    async with client.open_stream(timeout_s=5) as stream:
        await stream.call(OpenSession(block_start=0, block_end=1, max_length=4))
        with pytest.raises(RemoteTimeout, match="idle"):
            await stream.recv()


async def test_the_stream_limit_is_announced_and_sizes_the_client_slots(serve):
    server, client = await connected(serve, limits=RpcLimits(max_concurrent_streams=4))
    assert server.hello.max_concurrent_streams == 4
    assert client.remote is not None and client.remote.max_concurrent_streams == 4
    assert client.max_concurrent_calls == 4
    _, transport, address = await serve()  # the default limit, above a lower local cap
    small = await RpcClient.connect(
        transport, address, Hello.local(), timeout_s=5, max_concurrent_calls=3
    )
    assert small.remote is not None and small.remote.max_concurrent_streams == 64
    assert small.max_concurrent_calls == 3


def test_a_hello_reply_without_the_limit_still_decodes():
    old_peer = msgspec.structs.asdict(HelloReply.local("old"))
    del old_peer["max_concurrent_streams"]
    raw = msgspec.msgpack.encode({"type": "hello_reply", **old_peer})
    decoded = msgspec.msgpack.decode(raw, type=HelloReply)
    assert decoded.public_name == "old" and decoded.max_concurrent_streams is None


async def test_a_call_without_a_free_slot_fails_alone(serve, probe):
    _, client = await connected(serve, limits=RpcLimits(max_concurrent_streams=2))
    blocked = [asyncio.create_task(client.call(Info(), timeout_s=10)) for _ in range(2)]
    await asyncio.wait_for(probe.started.wait(), 5)
    with pytest.raises(SlotTimeout):
        await client.call(Ping(), timeout_s=0.2)
    assert not client.connection.is_closed
    probe.release.set()
    for call in blocked:
        assert (await call).message == Pong(nonce=1)
    assert isinstance((await client.call(Ping(), timeout_s=5)).message, Pong)


async def test_streams_beyond_the_server_limit_wait_then_get_busy(serve, probe):
    limits = RpcLimits(max_concurrent_streams=1, admission_wait_s=0.2)
    _, client = await connected(serve, limits=limits)
    async with client.open_stream(timeout_s=5) as session:
        await session.call(OpenSession(block_start=0, block_end=1, max_length=8))
        # A client that ignores the announced limit: its extra stream is refused alone.
        extra = await client.connection.open_stream()
        await extra.send(encode_message(Ping()))
        reply = decode_message(await asyncio.wait_for(extra.recv(), 5)).message
        assert isinstance(reply, ErrorReply) and reply.code is ErrorCode.BUSY
        step = await session.call(
            Step(session_id=SID, start_position=0), {"hidden": torch.ones(1, 1, 2)}
        )
        assert step.message == StepResult(session_id=SID, position=1)
        # A stream that arrives while the slot frees up is served once it is free.
        late = await client.connection.open_stream()
        await late.send(encode_message(Ping(nonce=7)))
    reply = decode_message(await asyncio.wait_for(late.recv(), 5)).message
    assert reply == Pong(nonce=7)


async def test_another_major_version_is_refused(serve):
    _, transport, address = await serve()
    local = Hello.local("future")
    future = msgspec.structs.replace(local, protocol_major=local.protocol_major + 1)
    with pytest.raises(VersionMismatch, match="protocol"):
        await RpcClient.connect(transport, address, future, timeout_s=5)
    newer_minor = msgspec.structs.replace(local, protocol_minor=local.protocol_minor + 1)
    client = await RpcClient.connect(transport, address, newer_minor, timeout_s=5)
    assert isinstance((await client.call(Ping(), timeout_s=5)).message, Pong)


async def test_connection_without_hello_is_refused(serve):
    _, transport, address = await serve()
    connection = await transport.connect(address)
    stream = await connection.open_stream()
    await stream.send(encode_message(Ping()))
    reply = decode_message(await asyncio.wait_for(stream.recv(), 5))
    assert reply.message.code is ErrorCode.BAD_REQUEST
    with pytest.raises(ConnectionClosed):  # the server hangs up
        await asyncio.wait_for(connection.accept_stream(), 5)


async def test_garbage_on_a_stream_gets_bad_request_and_others_still_work(serve):
    _, client = await connected(serve)
    stream = await client.connection.open_stream()
    await stream.send([b"\x93garbage", b"x"])
    reply = decode_message(await asyncio.wait_for(stream.recv(), 5))
    assert isinstance(reply.message, ErrorReply) and reply.message.code is ErrorCode.BAD_REQUEST
    assert isinstance((await client.call(Ping(), timeout_s=5)).message, Pong)


async def test_calls_require_the_handshake(serve):
    _, transport, address = await serve()
    client = RpcClient(await transport.connect(address), Hello.local())
    with pytest.raises(RuntimeError, match="handshake"):
        await client.call(Ping(), timeout_s=1)
