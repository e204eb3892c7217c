"""tcp transport behaviour beyond the shared conformance suite: addresses, the factory,
limits announced in the handshake, encryption on the wire. The handshake's own failures are
in test_tcp_handshake.py, an active attacker in test_tcp_attacker.py."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator

import pytest

from stamen.transports.base import (
    ConnectError,
    Connection,
    Credentials,
    HandshakeError,
    Limits,
    MessageTooLarge,
    Stream,
    StreamClosed,
    TransportError,
)
from stamen.transports.factory import add_transport_arguments, make_transport, transport_from_args
from stamen.transports.memory import MemoryTransport
from stamen.transports.tcp import TcpOptions, TcpTransport, format_address, parse_address

SECRET = b"attack at dawn, bring the good tensors"


async def echo_handler(connection: Connection) -> None:
    async def echo(stream: Stream) -> None:
        try:
            while True:
                await stream.send(await stream.recv())
        except TransportError:
            await stream.close()

    async with asyncio.TaskGroup() as group:
        while True:
            try:
                group.create_task(echo(await connection.accept_stream()))
            except Exception:
                return


@pytest.fixture
async def server() -> AsyncIterator[tuple[TcpTransport, str]]:
    transport = TcpTransport(Credentials.generate(), TcpOptions(limits=Limits(max_streams=4)))
    listener = await transport.listen("tcp://127.0.0.1:0", echo_handler)
    yield transport, listener.addresses[0]
    await transport.aclose()


def test_addresses_parse_and_format() -> None:
    assert parse_address("tcp://127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_address("tcp://[::1]:9") == ("::1", 9)
    assert format_address("::1", 9) == "tcp://[::1]:9"
    for bad in ("udp://1.2.3.4:5", "tcp://nohost", "tcp://h:99999", "tcp://:80", "tcp://h:x"):
        with pytest.raises(ConnectError):
            parse_address(bad)


async def test_listener_reports_the_real_port(server: tuple[TcpTransport, str]) -> None:
    _, address = server
    assert parse_address(address)[1] != 0


async def test_sender_refuses_messages_over_the_peers_announced_limit() -> None:
    small = TcpOptions(limits=Limits(max_message_bytes=1000, max_frames=2))
    server = TcpTransport(Credentials.generate(), small)
    client = TcpTransport(Credentials.generate())
    listener = await server.listen("tcp://127.0.0.1:0", echo_handler)
    try:
        connection = await client.connect(listener.addresses[0])
        stream = await connection.open_stream()
        with pytest.raises(MessageTooLarge):
            await stream.send([b"x" * 1001])
        with pytest.raises(MessageTooLarge):
            await stream.send([b"a", b"b", b"c"])
        await stream.send([b"x" * 1000])
        assert await stream.recv() == [b"x" * 1000]
    finally:
        await client.aclose()
        await server.aclose()


async def test_stream_limit_of_the_peer_is_enforced(server: tuple[TcpTransport, str]) -> None:
    client = TcpTransport(Credentials.generate())
    try:
        connection = await client.connect(server[1])
        streams = [await connection.open_stream() for _ in range(4)]
        with pytest.raises(StreamClosed):
            await connection.open_stream()
        for stream in streams:
            await stream.send([b"in limit"])
            assert await stream.recv() == [b"in limit"]
        await streams[0].close()
        # The slot counts as free only once the server closed its end too; from then on a
        # new stream is never refused by the server.
        async with asyncio.timeout(5.0):
            while True:
                try:
                    extra = await connection.open_stream()
                    break
                except StreamClosed:
                    await asyncio.sleep(0.01)
        await extra.send([b"ok"])
        assert await extra.recv() == [b"ok"]
    finally:
        await client.aclose()


async def test_a_slot_freed_by_the_opener_is_free_for_the_acceptor_too(
    server: tuple[TcpTransport, str],
) -> None:
    """The opener closes first and opens again at once, at the server's stream limit: a
    stream that `open_stream` hands out must work, never be refused by the server."""
    client = TcpTransport(Credentials.generate())
    try:
        connection = await client.connect(server[1])
        streams = [await connection.open_stream() for _ in range(4)]
        for round_ in range(100):
            await streams.pop(0).close()
            while True:
                try:
                    stream = await connection.open_stream()
                    break
                except StreamClosed:  # refused locally until the server closed its end
                    await asyncio.sleep(0)
            message = [round_.to_bytes(2, "big")]
            await stream.send(message)
            async with asyncio.timeout(5.0):
                assert await stream.recv() == message
            streams.append(stream)
    finally:
        await client.aclose()


async def _sniffed_exchange() -> bytes:
    """Send SECRET through a relay that records the bytes on the wire."""
    wire = bytearray()
    server = TcpTransport(Credentials.generate())
    client = TcpTransport(Credentials.generate())
    listener = await server.listen("tcp://127.0.0.1:0", echo_handler)
    target = parse_address(listener.addresses[0])

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            wire.extend(data)
            writer.write(data)
        writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*target)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    proxy = await asyncio.start_server(relay, "127.0.0.1", 0)
    try:
        port = proxy.sockets[0].getsockname()[1]
        connection = await client.connect(f"tcp://127.0.0.1:{port}")
        stream = await connection.open_stream()
        await stream.send([SECRET])
        assert await stream.recv() == [SECRET]
        await connection.close()
    finally:
        await client.aclose()
        await server.aclose()
        proxy.close()
    return bytes(wire)


async def test_encrypted_traffic_hides_the_payload() -> None:
    wire = await _sniffed_exchange()
    assert len(wire) > len(SECRET)  # the sniffer saw the exchange ...
    assert SECRET not in wire  # ... but not the secret


async def test_silent_listener_times_out_the_handshake() -> None:
    mute = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    client = TcpTransport(Credentials.generate())
    try:
        port = mute.sockets[0].getsockname()[1]
        with pytest.raises(HandshakeError):
            await client.connect(f"tcp://127.0.0.1:{port}", timeout_s=0.5)
    finally:
        mute.close()
        await client.aclose()


def test_factory_builds_by_name_and_refuses_unknown_options() -> None:
    credentials = Credentials.generate()
    tcp = make_transport("tcp", credentials, window_bytes=1024 * 1024)
    assert isinstance(tcp, TcpTransport) and tcp.options.window_bytes == 1024 * 1024
    assert isinstance(make_transport("memory", credentials), MemoryTransport)
    with pytest.raises(ValueError):
        make_transport("carrier-pigeon", credentials)
    with pytest.raises(ValueError):
        make_transport("tcp", credentials, encrypt=False)  # there is no plaintext mode
    with pytest.raises(ValueError):
        make_transport("tcp", credentials, keepalive_interval_s=5.0, keepalive_timeout_s=1.0)


def test_command_line_flags_choose_the_transport() -> None:
    parser = argparse.ArgumentParser()
    add_transport_arguments(parser)
    args = parser.parse_args(["--keepalive-timeout-s", "3", "--max-streams", "7"])
    transport = transport_from_args(args, Credentials.generate())
    assert isinstance(transport, TcpTransport)
    assert transport.options.keepalive_timeout_s == 3.0
    assert transport.options.limits.max_streams == 7
    default = transport_from_args(parser.parse_args([]), Credentials.generate())
    assert isinstance(default, TcpTransport)
    with pytest.raises(SystemExit):  # the plaintext mode is gone
        parser.parse_args(["--tcp-plaintext"])
