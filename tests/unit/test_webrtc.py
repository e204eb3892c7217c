"""WebRTC-specific behaviour beyond the conformance suite: addresses, the identity proof
bound to the DTLS session, and reaching a host through a relay after the relay restarts."""

from __future__ import annotations

import asyncio
import os

import pytest

from stamen.transports.base import ConnectError, Credentials, HandshakeError, IdentityMismatch
from stamen.transports.signaling import PeerUnreachable, SignalingRelay
from stamen.transports.webrtc import (
    MuxSettings,
    WebRTCConfig,
    WebRTCTransport,
    make_hello,
    parse_address,
    verify_hello,
)

OFFER = "v=0\r\na=fingerprint:sha-256 AA:BB\r\n"
ANSWER = "v=0\r\na=fingerprint:sha-256 CC:DD\r\n"
MITM_ANSWER = "v=0\r\na=fingerprint:sha-256 EE:FF\r\n"
LOOPBACK = WebRTCConfig(host_addresses=("127.0.0.1",))  # traffic stays on 127.0.0.1


def test_address_names_relay_and_key() -> None:
    key = os.urandom(32)
    assert parse_address(f"webrtc://10.0.0.1:7000/{key.hex()}") == ("10.0.0.1:7000", key)
    assert parse_address("webrtc://10.0.0.1:7000") == ("10.0.0.1:7000", None)
    for bad in ("tcp://1.2.3.4:5", "webrtc://h:1/zz", f"webrtc://h:1/{os.urandom(8).hex()}"):
        with pytest.raises(ConnectError):
            parse_address(bad)


def test_hello_proves_the_key_for_this_dtls_session_only() -> None:
    alice, bob = Credentials.generate(), Credentials.generate()
    hello = make_hello(alice, b"O", OFFER, ANSWER, MuxSettings())
    verify_hello(hello, bob, b"O", OFFER, ANSWER, alice.public_key)
    # A relay that swapped the answer (man in the middle) changes the fingerprints.
    with pytest.raises(HandshakeError):
        verify_hello(hello, bob, b"O", OFFER, MITM_ANSWER, None)
    # Replaying the offerer's proof as the answerer's does not verify either.
    with pytest.raises(HandshakeError):
        verify_hello(hello, bob, b"A", OFFER, ANSWER, None)
    # Claiming another key with this signature fails.
    forged = type(hello)(**{**_fields(hello), "public_key": bob.public_key})
    with pytest.raises(HandshakeError):
        verify_hello(forged, alice, b"O", OFFER, ANSWER, None)
    with pytest.raises(IdentityMismatch):
        verify_hello(hello, bob, b"O", OFFER, ANSWER, bob.public_key)


def test_hello_checks_the_swarm_key() -> None:
    swarm_key = os.urandom(32)
    member, other = Credentials.generate(swarm_key), Credentials.generate(swarm_key)
    stranger = Credentials.generate(os.urandom(32))
    hello = make_hello(member, b"A", OFFER, ANSWER, MuxSettings())
    verify_hello(hello, other, b"A", OFFER, ANSWER, None)
    with pytest.raises(HandshakeError):
        verify_hello(hello, stranger, b"A", OFFER, ANSWER, None)
    with pytest.raises(HandshakeError):
        verify_hello(hello, Credentials.generate(), b"A", OFFER, ANSWER, None)


def _fields(hello: object) -> dict[str, object]:
    return {name: getattr(hello, name) for name in hello.__struct_fields__}  # type: ignore[attr-defined]


@pytest.mark.webrtc
async def test_unregistered_key_fails_fast() -> None:
    async with SignalingRelay() as relay:
        transport = WebRTCTransport(Credentials.generate(), config=LOOPBACK)
        async with asyncio.timeout(5):
            with pytest.raises(PeerUnreachable):
                await transport.connect(f"webrtc://{relay.address}/{os.urandom(32).hex()}")
        await transport.aclose()


@pytest.mark.webrtc
async def test_listener_reregisters_after_the_relay_restarts() -> None:
    relay = SignalingRelay()
    await relay.start()
    host, port = relay.address.split(":")
    server = WebRTCTransport(Credentials.generate(), config=LOOPBACK)
    client = WebRTCTransport(Credentials.generate(), config=LOOPBACK)
    served = asyncio.Event()

    async def handler(connection) -> None:  # type: ignore[no-untyped-def]
        stream = await connection.accept_stream()
        await stream.send(await stream.recv())
        served.set()
        await stream.close()

    listener = await server.listen(f"webrtc://{relay.address}", handler)
    await relay.close()
    relay = SignalingRelay()
    await relay.start(host, int(port))
    try:
        async with asyncio.timeout(10):
            # The relay exposes no registration event; the listener retries with backoff.
            while server.credentials.public_key not in relay.registered_keys:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        connection = await client.connect(listener.addresses[0])
        stream = await connection.open_stream()
        await stream.send([b"ping"])
        assert await stream.recv() == [b"ping"]
        await connection.close()
    finally:
        await listener.close()
        await client.aclose()
        await server.aclose()
        await relay.close()
