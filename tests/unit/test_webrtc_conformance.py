"""The transport conformance suite against the WebRTC transport, over loopback via a relay.

Each case gets its own `SignalingRelay` on 127.0.0.1; peers use host ICE candidates only.
The big-message case moves 16 MiB instead of 64 MiB: aiortc's SCTP stack runs at a few
MB/s with both peers in one process on a shared 2-core machine (64 MiB is in the slow run).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from stamen.conformance.transport import CASES, MiB, TransportUnderTest, run_case
from stamen.transports.base import Connection, Credentials, Limits
from stamen.transports.signaling import SignalingRelay
from stamen.transports.webrtc import MuxConnection, MuxSettings, WebRTCConfig, WebRTCTransport

pytestmark = pytest.mark.webrtc

# Short liveness settings so that dead peers are noticed well inside the suite's timeout.
TEST_CONFIG = WebRTCConfig(
    mux=MuxSettings(keepalive_s=0.5, dead_after_s=2.5),
    host_addresses=("127.0.0.1",),  # traffic stays on loopback
)


@pytest.fixture
async def relay() -> AsyncIterator[SignalingRelay]:
    async with SignalingRelay() as relay:
        yield relay


async def kill_link(connection: Connection) -> None:
    """Drop this side's ICE sockets: no SCTP ABORT, no goodbye reaches the peer."""
    assert isinstance(connection, MuxConnection)
    ice = connection._pc.sctp.transport.transport
    for protocol in ice.iceGatherer._connection._protocols:
        protocol.transport.abort()


def silence(connection: Connection) -> None:
    """Stop reading and stop the keepalives, while the sockets stay up."""
    assert isinstance(connection, MuxConnection)
    connection._channel.remove_all_listeners("message")
    for task in connection._tasks:
        task.cancel()


async def closed_relay_address() -> str:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return f"webrtc://127.0.0.1:{port}/{os.urandom(32).hex()}"


def webrtc_under_test(relay: SignalingRelay, big_message_bytes: int) -> TransportUnderTest:
    return TransportUnderTest(
        name="webrtc",
        make_transport=lambda credentials: WebRTCTransport(credentials, config=TEST_CONFIG),
        listen_address=f"webrtc://{relay.address}",
        closed_address=closed_relay_address,
        kill=kill_link,
        silence=silence,
        big_message_bytes=big_message_bytes,
        max_buffered_bytes=8 * MiB,
        dead_peer_timeout_s=6.0,
        case_timeout_s=120.0,
    )


@pytest.mark.parametrize("case", CASES)
async def test_webrtc_conformance(case: str, relay: SignalingRelay) -> None:
    await run_case(case, webrtc_under_test(relay, big_message_bytes=16 * MiB))


@pytest.mark.slow
async def test_webrtc_64_mib_message(relay: SignalingRelay) -> None:
    await run_case("big_message", webrtc_under_test(relay, big_message_bytes=64 * MiB))


def test_limits_given_to_the_transport_are_the_ones_it_enforces() -> None:
    transport = WebRTCTransport(Credentials.generate(), limits=Limits(max_frames=3))
    assert transport.config.mux.limits == Limits(max_frames=3)
