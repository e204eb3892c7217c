"""Host candidates come from `WebRTCConfig.host_addresses` only, per peer connection:
gathered candidates, concurrent connections with different settings, a real data channel
over 127.0.0.1, and the command-line flag and environment variable."""

from __future__ import annotations

import argparse
import asyncio

import pytest
from aiortc import RTCDataChannel, RTCPeerConnection

from stamen.transports.base import Credentials
from stamen.transports.factory import add_transport_arguments, transport_from_args
from stamen.transports.webrtc_candidates import HostAddressPeerConnection
from stamen.transports.webrtc_config import WebRTCConfig, new_peer_connection

pytestmark = pytest.mark.webrtc

LOOPBACK = WebRTCConfig(host_addresses=("127.0.0.1",))


async def _host_candidates(pc: RTCPeerConnection) -> list[str]:
    """Gather (as an offer does) and return the host candidates' addresses."""
    pc.createDataChannel("probe")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    return [
        line.split()[4]
        for line in sdp.splitlines()
        if line.startswith("a=candidate:") and line.split()[7] == "host"
    ]


async def test_host_addresses_limit_the_gathered_candidates() -> None:
    pc = new_peer_connection(LOOPBACK)
    try:
        assert isinstance(pc, HostAddressPeerConnection)
        assert set(await _host_candidates(pc)) == {"127.0.0.1"}
    finally:
        await pc.close()


async def test_the_default_is_aioices_gathering() -> None:
    """Without the setting nothing changes: aioice never offers 127.0.0.1 (which is why
    the setting exists)."""
    pc = new_peer_connection(WebRTCConfig())
    try:
        assert type(pc) is RTCPeerConnection
        assert "127.0.0.1" not in await _host_candidates(pc)
    finally:
        await pc.close()


async def test_concurrent_peer_connections_keep_their_own_addresses() -> None:
    one = new_peer_connection(LOOPBACK)
    other = new_peer_connection(WebRTCConfig(host_addresses=("127.0.0.2",)))
    default = new_peer_connection(WebRTCConfig())
    try:
        gathered = await asyncio.gather(*(_host_candidates(pc) for pc in (one, other, default)))
        assert set(gathered[0]) == {"127.0.0.1"}
        assert set(gathered[1]) == {"127.0.0.2"}
        assert not {"127.0.0.1", "127.0.0.2"} & set(gathered[2])
    finally:
        for pc in (one, other, default):
            await pc.close()


async def test_a_data_channel_runs_over_loopback() -> None:
    offerer, answerer = new_peer_connection(LOOPBACK), new_peer_connection(LOOPBACK)
    received: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @answerer.on("datachannel")
    def on_channel(channel: RTCDataChannel) -> None:
        @channel.on("message")
        def on_message(message: str) -> None:
            if not received.done():
                received.set_result(message)

    try:
        channel = offerer.createDataChannel("test")
        channel.on("open", lambda: channel.send("over loopback"))
        await offerer.setLocalDescription(await offerer.createOffer())
        await answerer.setRemoteDescription(offerer.localDescription)
        await answerer.setLocalDescription(await answerer.createAnswer())
        await offerer.setRemoteDescription(answerer.localDescription)
        async with asyncio.timeout(10.0):
            assert await received == "over loopback"
        assert offerer.sctp is not None
        pair = offerer.sctp.transport.transport._connection._nominated[1]  # component 1
        assert (pair.local_candidate.host, pair.remote_candidate.host) == ("127.0.0.1",) * 2
    finally:
        await offerer.close()
        await answerer.close()


def test_addresses_must_be_ip_literals() -> None:
    with pytest.raises(ValueError):
        WebRTCConfig(host_addresses=("localhost",))
    assert WebRTCConfig(host_addresses=("::1", "10.0.0.7")).host_addresses == ("::1", "10.0.0.7")


def _parsed(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_transport_arguments(parser)
    return parser.parse_args(["--transport", "webrtc", *argv])


def test_the_flag_and_the_environment_set_the_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    flags = ["--webrtc-host-address", "127.0.0.1", "--webrtc-host-address", "::1"]
    transport = transport_from_args(_parsed(flags), Credentials.generate())
    assert transport.config.host_addresses == ("127.0.0.1", "::1")  # type: ignore[attr-defined]
    monkeypatch.setenv("STAMEN_WEBRTC_HOST_ADDRESSES", "127.0.0.1 127.0.0.2")
    transport = transport_from_args(_parsed([]), Credentials.generate())
    assert transport.config.host_addresses == ("127.0.0.1", "127.0.0.2")  # type: ignore[attr-defined]
    transport = transport_from_args(_parsed(flags[:2]), Credentials.generate())  # flag wins
    assert transport.config.host_addresses == ("127.0.0.1",)  # type: ignore[attr-defined]
    monkeypatch.delenv("STAMEN_WEBRTC_HOST_ADDRESSES")
    transport = transport_from_args(_parsed([]), Credentials.generate())
    assert transport.config.host_addresses == ()  # type: ignore[attr-defined]
