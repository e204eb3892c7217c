"""The TCP signalling relay: registration proofs, offer/answer routing, limits."""

from __future__ import annotations

import asyncio
import os

import pytest

from stamen.transports.base import ConnectError, Credentials
from stamen.transports.signaling import (
    Challenge,
    PeerUnreachable,
    Register,
    RelayLimits,
    RelaySignaling,
    SignalingError,
    SignalingRelay,
    _frame,
    _read_message,
)


@pytest.fixture
async def relay() -> SignalingRelay:
    async with SignalingRelay(RelayLimits(offer_timeout_s=1.0, max_registrations=2)) as relay:
        yield relay


async def _host(relay: SignalingRelay, credentials: Credentials | None = None) -> RelaySignaling:
    signaling = RelaySignaling(relay.address, credentials or Credentials.generate())
    await signaling.connect()
    await signaling.register()
    return signaling


async def test_offer_reaches_the_registered_key_and_the_answer_comes_back(relay) -> None:
    host_credentials = Credentials.generate()
    host = await _host(relay, host_credentials)
    dialer = RelaySignaling(relay.address, Credentials.generate())
    await dialer.connect()

    async def answer_one() -> None:
        offer = await host.next_offer()
        assert offer.sdp == "offer-sdp"
        await offer.answer("answer-sdp")

    answering = asyncio.create_task(answer_one())
    answer = await dialer.send_offer(host_credentials.public_key, "offer-sdp", timeout_s=5)
    assert answer == "answer-sdp"
    await answering
    await dialer.close()
    await host.close()


async def test_unknown_target_is_refused_at_once(relay) -> None:
    dialer = RelaySignaling(relay.address, Credentials.generate())
    await dialer.connect()
    with pytest.raises(PeerUnreachable):
        await dialer.send_offer(os.urandom(32), "sdp", timeout_s=5)
    await dialer.close()


async def test_host_refusal_and_silence_reach_the_dialer(relay) -> None:
    host_credentials = Credentials.generate()
    host = await _host(relay, host_credentials)
    dialer = RelaySignaling(relay.address, Credentials.generate())
    await dialer.connect()

    async def refuse_one() -> None:
        await (await host.next_offer()).refuse("busy")

    refusing = asyncio.create_task(refuse_one())
    with pytest.raises(PeerUnreachable, match="busy"):
        await dialer.send_offer(host_credentials.public_key, "sdp", timeout_s=5)
    await refusing
    # Nobody answers the next one: the relay expires it after offer_timeout_s.
    with pytest.raises(PeerUnreachable, match="in time"):
        await dialer.send_offer(host_credentials.public_key, "sdp", timeout_s=5)
    await dialer.close()
    await host.close()


async def test_registration_needs_a_signature_by_the_key(relay) -> None:
    reader, writer = await asyncio.open_connection(*relay.address.split(":"))
    challenge = await _read_message(reader, 65536)
    assert isinstance(challenge, Challenge)
    victim = Credentials.generate().public_key
    forged = Credentials.generate().private_key.sign(b"stamen-relay-register-v1" + challenge.nonce)
    writer.write(_frame(Register(victim, forged)))
    with pytest.raises(SignalingError):
        await _read_message(reader, 65536)  # the relay hangs up
    assert victim not in relay.registered_keys
    writer.close()


async def test_newer_registration_of_a_key_replaces_the_older(relay) -> None:
    credentials = Credentials.generate()
    first = await _host(relay, credentials)
    second = await _host(relay, credentials)
    async with asyncio.timeout(5):
        with pytest.raises(SignalingError):
            await first.next_offer()
    dialer = RelaySignaling(relay.address, Credentials.generate())
    await dialer.connect()
    answering = asyncio.create_task(_answer(second, "from second"))
    assert await dialer.send_offer(credentials.public_key, "x", timeout_s=5) == "from second"
    await answering
    for signaling in (dialer, second, first):
        await signaling.close()


async def _answer(host: RelaySignaling, sdp: str) -> None:
    await (await host.next_offer()).answer(sdp)


async def test_registrations_are_capped(relay) -> None:
    hosts = [await _host(relay), await _host(relay)]
    extra = RelaySignaling(relay.address, Credentials.generate())
    await extra.connect()
    with pytest.raises(SignalingError):
        await extra.register(timeout_s=5)
    assert len(relay.registered_keys) == 2
    for signaling in [*hosts, extra]:
        await signaling.close()


async def test_oversized_messages_are_refused_before_reading_them(relay) -> None:
    reader, writer = await asyncio.open_connection(*relay.address.split(":"))
    await _read_message(reader, 65536)
    writer.write((10**9).to_bytes(4, "big"))
    with pytest.raises(SignalingError):
        await _read_message(reader, 65536)
    writer.close()


async def test_unreachable_relay_is_a_connect_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    signaling = RelaySignaling(f"127.0.0.1:{port}", Credentials.generate())
    with pytest.raises(ConnectError):
        await signaling.connect(timeout_s=5)


async def test_silent_unregistered_peers_are_dropped() -> None:
    limits = RelayLimits(handshake_timeout_s=0.3)
    async with SignalingRelay(limits) as relay:
        reader, writer = await asyncio.open_connection(*relay.address.split(":"))
        await _read_message(reader, 65536)
        async with asyncio.timeout(5):
            with pytest.raises(SignalingError):
                await _read_message(reader, 65536)
        writer.close()
