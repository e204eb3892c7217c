"""The transport conformance suite against the in-process and tcp transports."""

from __future__ import annotations

import socket
import uuid

import pytest

from stamen.conformance.transport import (
    CASES,
    TransportUnderTest,
    run_case,
)
from stamen.transports.base import Connection
from stamen.transports.memory import MemoryHub, MemoryTransport
from stamen.transports.mux import MuxConnection
from stamen.transports.tcp import TcpOptions, TcpTransport

MiB = 1024 * 1024


def memory_under_test() -> TransportUnderTest:
    hub = MemoryHub()

    async def closed_address() -> str:
        return f"memory://nobody-{uuid.uuid4().hex}"

    return TransportUnderTest(
        name="memory",
        make_transport=lambda credentials: MemoryTransport(credentials, hub=hub),
        listen_address="memory://",
        closed_address=closed_address,
        kill=lambda connection: connection.close(),
    )


async def closed_tcp_address() -> str:
    """A port that was just bound and released: nothing listens there."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"tcp://127.0.0.1:{port}"


def _abort(connection: Connection) -> None:
    assert isinstance(connection, MuxConnection)
    connection.abort()


def _stop_responding(connection: Connection) -> None:
    assert isinstance(connection, MuxConnection)
    connection.stop_responding()


def tcp_under_test() -> TransportUnderTest:
    options = TcpOptions(keepalive_interval_s=0.2, keepalive_timeout_s=1.0)
    return TransportUnderTest(
        name="tcp",
        make_transport=lambda credentials: TcpTransport(credentials, options),
        listen_address="tcp://127.0.0.1:0",
        closed_address=closed_tcp_address,
        kill=_abort,
        silence=_stop_responding,
        max_buffered_bytes=2 * options.window_bytes + MiB,
        dead_peer_timeout_s=3.0,
    )


TRANSPORTS = {
    "memory": memory_under_test,
    "tcp": tcp_under_test,
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_conformance(transport: str, case: str) -> None:
    await run_case(case, TRANSPORTS[transport]())
