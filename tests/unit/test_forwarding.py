"""Server-to-server forwarding of inference steps, with hosts in-process.

Three hosts serve one block each of a tiny Llama over the memory transport; the client
is the real `InferenceSession` over `RpcSpanClient`s. What a user relies on:

- a forwarded chain gives the outputs of the client-driven one, and the hidden states
  really went host to host (the hosts' relay counters, the session's `stats`);
- a host that vanishes mid-chain costs a fallback, not a wrong output;
- a host accepts relayed input only for a session it holds, from the previous hop the
  client named, at the announced position and shape, within its size limits, and keeps
  serving after refusing;
- the new wire messages validate their fields.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from stamen.conformance.adapters import LocalChain, reference_for
from stamen.models.loading import Span
from stamen.models.registry import get_adapter
from stamen.swarm_core.client.inference import InferenceSession
from stamen.swarm_core.client.pool import HostConnections
from stamen.swarm_core.client.remote import HopError, HostInfo, SpanClient
from stamen.swarm_core.client.swarm import ClientSettings, RpcHopSession, RpcSpanClient, host_info
from stamen.swarm_core.host.relay import NextHops, RelayInbox, RelayLimits, _Link
from stamen.swarm_core.host.runtime import RuntimeLimits, SpanRuntime
from stamen.swarm_core.host.server import Host, HostSettings
from stamen.swarm_core.protocol.codecs import Codec
from stamen.swarm_core.protocol.errors import (
    RemoteBadRequest,
    RemoteBusy,
    RemoteNotFound,
    RemoteTooLarge,
)
from stamen.swarm_core.protocol.identity import peer_id_of
from stamen.swarm_core.protocol.records import HostRecord, HostState, new_host_record
from stamen.swarm_core.protocol.rpc import RpcClient
from stamen.swarm_core.protocol.wire import (
    FORWARDING,
    AwaitStep,
    Decoded,
    Hello,
    Info,
    InfoReply,
    MalformedMessage,
    NextHop,
    RelayAccepted,
    RelayStep,
    SessionId,
    Step,
    StepResult,
    decode_message,
    encode_message,
)
from stamen.transports.base import Credentials
from stamen.transports.memory import MemoryHub, MemoryTransport

VARIANT = "llama-gqa-tied-bias"
C = 64  # the variant's hidden size
LIMITS = RuntimeLimits(max_cache_tokens=512, max_session_length=64, max_batch_size=4)


def span_of(start: int, end: int) -> Span:
    ref = reference_for(VARIANT)
    blocks = LocalChain.build(ref, range(start, end)).blocks
    return Span(ref.config, get_adapter(ref.config), start, end, nn.ModuleList(blocks))


@dataclass
class Served:
    host: Host
    record: HostRecord
    stop: contextlib.AsyncExitStack


class View:
    """A `SwarmView` over in-process hosts: their records, and pooled connections."""

    def __init__(self, transport: MemoryTransport, settings: ClientSettings) -> None:
        self.transport = transport
        self.settings = settings
        self.records: dict[str, HostRecord] = {}  # what hosts are told about each other
        self.dial: dict[str, str] = {}  # where this client reaches them
        self.pools: dict[str, HostConnections] = {}

    def hosts(self) -> list[HostInfo]:
        return [info for r in self.records.values() if (info := host_info(r, 1e-3))]

    async def connect(self, peer_id: str) -> SpanClient:
        address = self.dial.get(peer_id) or self.records[peer_id].addresses[0]
        if peer_id not in self.pools:

            async def dial() -> RpcClient:
                return await RpcClient.connect(self.transport, address, Hello.local(), timeout_s=5)

            self.pools[peer_id] = HostConnections(dial, max_connections=2)
        await self.pools[peer_id].ensure_connected()
        return RpcSpanClient(
            peer_id, self.pools[peer_id], self.settings, lambda: self.records.get(peer_id)
        )

    async def refresh(self, max_age_s: float = 0.0) -> None:
        await asyncio.sleep(0.05)

    async def aclose(self) -> None:
        for pool in self.pools.values():
            await pool.aclose()


@contextlib.asynccontextmanager
async def serving(
    hub: MemoryHub, start: int, end: int, relay_limits: RelayLimits | None = None
) -> AsyncIterator[Served]:
    transport = MemoryTransport(Credentials.generate(), hub=hub)
    settings = HostSettings(model_ref="tiny", model_name="tiny", relay_limits=relay_limits)
    host = Host(settings, transport.credentials, transport)
    async with contextlib.AsyncExitStack() as stack:
        runtime = await stack.enter_async_context(SpanRuntime(span_of(start, end), LIMITS))
        host.runtime, host.span_range, host.state = runtime, (start, end), HostState.ONLINE
        host.throughput_tokens_s = 100.0
        listener = await transport.listen("memory://", host._server().serve)
        stack.push_async_callback(transport.aclose)
        stack.push_async_callback(host.next_hops.aclose)
        stack.push_async_callback(listener.close)
        record = new_host_record(
            transport.credentials,
            model="tiny",
            start_block=start,
            end_block=end,
            addresses=listener.addresses,
        )
        record = msgspec.structs.replace(
            record, throughput_tokens_per_s=100.0, free_cache_tokens=512
        )
        yield Served(host, record, stack)


@contextlib.asynccontextmanager
async def chain(
    *spans: tuple[int, int], forwarding: bool = True
) -> AsyncIterator[tuple[View, list[Served]]]:
    hub = MemoryHub()
    async with contextlib.AsyncExitStack() as stack:
        served = [await stack.enter_async_context(serving(hub, *span)) for span in spans]
        client = MemoryTransport(Credentials.generate(), hub=hub)
        stack.push_async_callback(client.aclose)
        view = View(client, ClientSettings(forwarding=forwarding, step_timeout_s=5.0))
        stack.push_async_callback(view.aclose)
        view.records = {s.record.peer_id: s.record for s in served}
        yield view, served


async def generate_hidden(view: View, steps: int = 6) -> tuple[torch.Tensor, InferenceSession]:
    """A prefill of 4 tokens, then `steps` single-token steps; the outputs, concatenated."""
    torch.manual_seed(3)
    x = torch.randn(2, 4 + steps, C)
    async with InferenceSession(view, 0, 3, max_length=32, batch_size=2) as session:
        outs = [await session.step(x[:, :4])]
        for t in range(4, 4 + steps):
            outs.append(await session.step(x[:, t : t + 1]))
    return torch.cat(outs, 1), session


async def test_a_forwarded_chain_equals_the_client_driven_one() -> None:
    async with chain((0, 1), (1, 2), (2, 3), forwarding=False) as (view, _):
        expected, plain = await generate_hidden(view)
    assert plain.stats.client_driven == 7 and plain.stats.forwarded == 0
    async with chain((0, 1), (1, 2), (2, 3)) as (view, served):
        out, session = await generate_hidden(view)
        relays = [(s.host.next_hops.sent, s.host._inbox().accepted) for s in served]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert session.stats.forwarded == 7 and session.stats.fallbacks == 0
    assert relays == [(7, 0), (7, 7), (0, 7)]  # every step went host to host


async def test_a_hosts_info_reports_its_runtime_counters() -> None:
    async with chain((0, 1), (1, 2), (2, 3), forwarding=False) as (view, served):
        await generate_hidden(view)  # a prefill, then 6 single-token steps of 2 rows
        address = served[1].record.addresses[0]
        rpc = await RpcClient.connect(view.transport, address, Hello.local(), timeout_s=5)
        try:
            reply = await rpc.call(Info(), timeout_s=5)
        finally:
            await rpc.close()
    info = reply.message
    assert isinstance(info, InfoReply)
    assert (info.steps, info.decode_batches, info.graphs_captured) == (7, 6, 0)
    assert 0 < info.decode_seconds < info.step_seconds


async def test_a_middle_host_that_vanishes_costs_a_fallback_not_a_token() -> None:
    async with chain((0, 1), (1, 2), (2, 3)) as (view, _):
        expected, _ = await generate_hidden(view)
    async with chain((0, 1), (1, 2), (2, 3), (1, 2)) as (view, served):
        spare = served[3].record.peer_id
        middle = served[1]
        view.records.pop(spare)  # routing takes the first middle host
        torch.manual_seed(3)
        x = torch.randn(2, 10, C)
        async with InferenceSession(view, 0, 3, max_length=32, batch_size=2) as session:
            outs = [await session.step(x[:, :4])]
            for t in range(4, 7):
                outs.append(await session.step(x[:, t : t + 1]))
            view.records[spare] = served[3].record
            await middle.stop.aclose()  # the middle host is gone, connections and all
            for t in range(7, 10):
                outs.append(await session.step(x[:, t : t + 1]))
            assert spare in [hop.peer_id for hop in session.route]
    torch.testing.assert_close(torch.cat(outs, 1), expected, atol=1e-5, rtol=1e-5)
    assert session.stats.fallbacks == 1 and session.stats.forwarded == 6


async def test_a_relay_lost_on_the_way_makes_that_pair_client_driven() -> None:
    async with chain((0, 1), (1, 2), (2, 3)) as (view, _):
        expected, _ = await generate_hidden(view, steps=2)
    async with chain((0, 1), (1, 2), (2, 3)) as (view, served):
        # The middle host says its relays went out, but none arrives: the last host
        # answers its `AwaitStep` `timeout`, while the middle one reported no error.
        async def lost(*args: object, **kwargs: object) -> None:
            return None

        served[1].host.next_hops.relay = lost  # type: ignore[method-assign]
        served[2].host.inbox = RelayInbox(C, RelayLimits(wait_s=0.3))
        out, session = await generate_hidden(view, steps=2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # One step pays for the lost relay; the rest do not wait for it again.
    assert session.stats.fallbacks == 1 and session.stats.client_driven == 2


async def test_each_hop_of_a_forwarded_step_has_its_own_step_timeout() -> None:
    async with chain((0, 1), (1, 2), (2, 3)) as (view, served):
        runtime = served[2].host.runtime
        assert runtime is not None
        compute = runtime.step

        async def slow(*args: Any, **kwargs: Any) -> torch.Tensor:
            await asyncio.sleep(1.3)  # past one step timeout, well within three
            return await compute(*args, **kwargs)

        runtime.step = slow  # type: ignore[method-assign]
        x = torch.randn(2, 5, C)
        async with InferenceSession(
            view, 0, 3, max_length=32, batch_size=2, step_timeout_s=1.0, failover_timeout_s=5.0
        ) as session:
            await session.step(x[:, :4])
            await session.step(x[:, 4:])
    assert session.stats.forwarded == 2 and session.stats.fallbacks == 0


async def test_an_unreachable_next_hop_is_reported_and_the_step_completes() -> None:
    async with chain((0, 1), (1, 2), (2, 3)) as (view, _):
        expected, _ = await generate_hidden(view, steps=1)
    async with chain((0, 1), (1, 2), (2, 3)) as (view, served):
        # The last host's record names an address where nobody listens: the middle host
        # says so at once and the client carries that hop itself, then every step.
        last = served[2].record
        view.dial[last.peer_id] = last.addresses[0]
        view.records[last.peer_id] = msgspec.structs.replace(last, addresses=("memory://nowhere",))
        out, session = await generate_hidden(view, steps=1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # The first step falls back; the pair that cannot relay is not asked again.
    assert session.stats.fallbacks == 1 and session.stats.client_driven == 1


# -- a hostile peer relaying into a host ------------------------------------------------


async def _relay(
    rpc: RpcClient, session_id: str, start: int, hidden: torch.Tensor, nonce: int = 7
) -> object:
    message = RelayStep(session_id=SessionId(session_id), start_position=start, nonce=nonce)
    reply = await rpc.call(message, {"hidden": hidden}, timeout_s=5)
    return reply.message


async def test_a_host_refuses_relays_it_was_not_told_to_expect() -> None:
    hub = MemoryHub()
    limits = RelayLimits(max_held_messages=2, max_held_bytes=4096, hold_s=5.0)
    async with serving(hub, 0, 1, limits) as target:
        stranger = MemoryTransport(Credentials.generate(), hub=hub)
        client = MemoryTransport(Credentials.generate(), hub=hub)
        address = target.record.addresses[0]
        rpc = await RpcClient.connect(stranger, address, Hello.local(), timeout_s=5)
        owner = await RpcClient.connect(client, address, Hello.local(), timeout_s=5)
        try:
            assert FORWARDING in (owner.remote.capabilities if owner.remote else ())
            with pytest.raises(RemoteNotFound):
                await _relay(rpc, "no-such-session", 0, torch.zeros(1, 1, C))
            clients = View(client, ClientSettings())
            clients.records = {target.record.peer_id: target.record}
            span_client = await clients.connect(target.record.peer_id)
            session = await span_client.open_session(0, 1, max_length=16, batch_size=1)
            session_id = session.session_id
            # Before the client's authorization, a little is held, and no more.
            assert isinstance(await _relay(rpc, session_id, 0, torch.zeros(1, 1, C)), RelayAccepted)
            with pytest.raises(RemoteTooLarge):
                await _relay(rpc, session_id, 0, torch.zeros(1, 32, C))  # > held bytes
            with pytest.raises(RemoteBadRequest):
                await _relay(rpc, session_id, 0, torch.zeros(1, 1, C + 1))  # wrong width
            with pytest.raises(RemoteBadRequest):
                await _relay(rpc, session_id, 0, torch.zeros(3, 1, C))  # wrong batch
            assert isinstance(await _relay(rpc, session_id, 1, torch.zeros(1, 1, C)), RelayAccepted)
            with pytest.raises(RemoteBusy):  # max_held_messages=2 are held already
                await _relay(rpc, session_id, 2, torch.zeros(1, 1, C))
            # The client names another peer as the previous hop: the stranger's held input
            # is not used, and its relays are refused while the step waits.
            named = peer_id_of(Credentials.generate())
            waiting = asyncio.create_task(
                session.await_step(0, 1, named, None, None, None, nonce=7, next_nonce=0)
            )
            await asyncio.sleep(0.1)
            with pytest.raises(RemoteBadRequest, match="not the previous hop"):
                await _relay(rpc, session_id, 0, torch.zeros(1, 1, C))
            assert not waiting.done()
            waiting.cancel()
            await asyncio.gather(waiting, return_exceptions=True)
            # The session still serves (the abandoned wait is settled first).
            x = torch.randn(1, 2, C)
            out = await session.step(x, 0)
            assert out.shape == x.shape
            # Named as the previous hop, the stranger's relay at the wrong position or
            # length is refused, and fails the client's step at once (the client then
            # drives it); the right one runs the step.
            stranger_id = peer_id_of(stranger.credentials)
            for nonce, (start, tokens) in enumerate(((5, 1), (2, 2)), start=10):
                waiting = asyncio.create_task(
                    session.await_step(
                        2, 1, stranger_id, None, None, None, nonce=nonce, next_nonce=0
                    )
                )
                await asyncio.sleep(0.1)
                with pytest.raises(RemoteBadRequest, match="announced"):
                    await _relay(rpc, session_id, start, torch.zeros(1, tokens, C), nonce=nonce)
                with pytest.raises(HopError, match="announced"):
                    await asyncio.wait_for(waiting, 5)
            waiting = asyncio.create_task(
                session.await_step(2, 1, stranger_id, None, None, None, nonce=8, next_nonce=0)
            )
            await asyncio.sleep(0.1)
            assert isinstance(
                await _relay(rpc, session_id, 2, torch.ones(1, 1, C), nonce=8), RelayAccepted
            )
            result = await asyncio.wait_for(waiting, 5)
            assert result.hidden.shape == (1, 1, C) and result.forward_error is None
            await session.close()
            with pytest.raises(RemoteNotFound):
                await _relay(rpc, session_id, 3, torch.zeros(1, 1, C))
        finally:
            await rpc.close()
            await owner.close()
            await stranger.aclose()
            await client.aclose()


# -- wire -------------------------------------------------------------------------------


def _next_hop(**overrides: object) -> NextHop:
    fields: dict[str, object] = {
        "peer_id": peer_id_of(Credentials.generate()),
        "public_key": bytes(32),
        "session_id": "s",
        "addresses": ("tcp://127.0.0.1:1",),
    }
    fields.update(overrides)
    return NextHop(**fields)


def test_a_plain_step_encodes_as_protocol_2_0_did() -> None:
    """`next_hop` is left out when None, so hosts without forwarding read plain steps."""
    frames = encode_message(
        Step(session_id=SessionId("s"), start_position=3), {"hidden": torch.zeros(1, 1, 2)}
    )
    header = msgspec.msgpack.decode(frames[0])
    assert header["message"] == {"type": "step", "session_id": "s", "start_position": 3}


def test_forwarding_messages_round_trip() -> None:
    hop = _next_hop()
    step = Step(session_id=SessionId("s"), start_position=0, next_hop=hop)
    frames = encode_message(step, {"hidden": torch.zeros(1, 2, 4)})
    assert decode_message(frames).message == step
    awaited = AwaitStep(
        session_id=SessionId("s"),
        start_position=4,
        num_tokens=1,
        previous_peer_id=hop.peer_id,
        nonce=(1 << 63) - 1,
    )
    assert decode_message(encode_message(awaited)).message == awaited
    relay = RelayStep(session_id=SessionId("s"), start_position=4, nonce=3)
    assert decode_message(encode_message(relay, {"hidden": torch.zeros(1, 1, 4)})).message == relay


@pytest.mark.parametrize(
    "bad",
    [
        {"peer_id": "not-a-peer-id"},
        {"public_key": bytes(31)},
        {"addresses": ()},
        {"addresses": ("x" * 600,)},
        {"addresses": tuple(f"tcp://h:{i}" for i in range(9))},
        {"session_id": ""},
        {"nonce": 1 << 63},
        {"nonce": -1},
    ],
)
def test_a_bad_next_hop_is_malformed(bad: dict[str, object]) -> None:
    good = msgspec.to_builtins(_next_hop())
    good.update(msgspec.to_builtins(bad))
    raw = {"type": "step", "session_id": "s", "start_position": 0, "next_hop": good}
    meta = {"name": "hidden", "dtype": "float32", "shape": [1, 1, 1], "codec": "none", "nbytes": 4}
    frames = [msgspec.msgpack.encode({"message": raw, "tensors": [meta]}), bytes(4)]
    with pytest.raises(MalformedMessage):
        decode_message(frames)


def test_await_step_carries_no_hidden_states_and_needs_tokens() -> None:
    peer = peer_id_of(Credentials.generate())
    awaited = AwaitStep(
        session_id=SessionId("s"), start_position=0, num_tokens=1, previous_peer_id=peer, nonce=1
    )
    with pytest.raises(ValueError, match="unexpected tensor"):
        encode_message(awaited, {"hidden": torch.zeros(1, 1, 2)})
    raw = msgspec.to_builtins(awaited) | {"num_tokens": 0}
    with pytest.raises(MalformedMessage):
        decode_message([msgspec.msgpack.encode({"message": raw, "tensors": []})])


class _ScriptedStream:
    """A relay stream whose answers the test hands over one by one."""

    def __init__(self) -> None:
        self.answers: asyncio.Queue[object] = asyncio.Queue()
        self.was_reset = False

    async def send(self, *args: object, **kwargs: object) -> None:
        return None

    async def recv(self, timeout_s: float | None = None) -> object:
        message = await self.answers.get()
        if isinstance(message, BaseException):
            raise message
        return type("Answer", (), {"message": message})()

    def reset(self) -> None:
        self.was_reset = True


async def test_a_late_answer_after_a_relay_timeout_keeps_the_shared_stream() -> None:
    stream = _ScriptedStream()
    link = _Link(rpc=None)  # type: ignore[arg-type]  # the stream is already open
    link.stream = stream  # type: ignore[assignment]
    link.reader = asyncio.create_task(link._read(stream))  # type: ignore[arg-type]
    hops = NextHops(MemoryTransport(Credentials.generate()), Hello.local(), RelayLimits())
    hops.limits = RelayLimits(relay_timeout_s=0.05)
    message = RelayStep(session_id=SessionId("a"), start_position=0, nonce=1)
    first = await link.send(message, torch.zeros(1, 1, C), None, 1.0)  # type: ignore[arg-type]
    await hops._watch("p" * 40, first)  # gives up on the answer
    second = await link.send(message, torch.zeros(1, 1, C), None, 1.0)  # type: ignore[arg-type]
    stream.answers.put_nowait(RelayAccepted())  # the first relay's late answer
    stream.answers.put_nowait(RelayAccepted())
    assert isinstance(await asyncio.wait_for(second, 1.0), RelayAccepted)
    assert not stream.was_reset and link.stream is stream
    link.reader.cancel()
    await asyncio.gather(link.reader, return_exceptions=True)


# -- the inbox and the pool, alone ------------------------------------------------------

PREVIOUS = "p" + "a" * 32


async def test_a_stale_relay_is_never_fed_into_a_later_step_at_its_position() -> None:
    inbox = RelayInbox(hidden_size=C)
    session_id = SessionId("s")
    inbox.open(session_id, batch_size=1, max_length=64)
    # A step at 5 is given up on; its relay comes late, and is held.
    inbox.expect(session_id, 5, 1, PREVIOUS, nonce=1)
    inbox.cancel(session_id)
    stale = torch.full((1, 1, C), 1.0)
    inbox.deliver(PREVIOUS, RelayStep(session_id=session_id, start_position=5, nonce=1), stale)
    # The client rolls back to 5 and forwards another token: the new step waits for its own.
    arrived = inbox.expect(session_id, 5, 1, PREVIOUS, nonce=2)
    assert not arrived.done()
    fresh = torch.full((1, 1, C), 2.0)
    inbox.deliver(PREVIOUS, RelayStep(session_id=session_id, start_position=5, nonce=2), fresh)
    assert torch.equal(await asyncio.wait_for(arrived, 1.0), fresh)


async def test_the_step_of_a_refused_relay_fails_at_once() -> None:
    inbox = RelayInbox(hidden_size=C, limits=RelayLimits(max_held_bytes=1024))
    session_id = SessionId("s")
    inbox.open(session_id, batch_size=1, max_length=64)
    big = torch.zeros(1, 8, C)
    with pytest.raises(RemoteTooLarge):
        inbox.deliver(PREVIOUS, RelayStep(session_id=session_id, start_position=0, nonce=9), big)
    other = inbox.expect(session_id, 0, 8, PREVIOUS, nonce=10)  # another step: still waits
    assert not other.done()
    arrived = inbox.expect(session_id, 0, 8, PREVIOUS, nonce=9)
    with pytest.raises(RemoteBadRequest, match="refused"):
        await asyncio.wait_for(arrived, 1.0)


async def test_a_failed_dial_keeps_no_lock_tells_the_client_no_detail_and_ends_dialing() -> None:
    hub = MemoryHub()
    async with serving(hub, 0, 1) as served:
        hops = served.host.next_hops
        target = Credentials.generate()
        next_hop = NextHop(
            peer_id=peer_id_of(target),
            public_key=target.public_key,
            session_id=SessionId("s"),
            addresses=("memory://nowhere", "memory://elsewhere"),
            nonce=1,
        )
        session_id = SessionId("mine")
        hidden = torch.zeros(1, 1, C)
        error = await served.host._relay_to(next_hop, 0, hidden, Codec.NONE, for_session=session_id)
        assert error is not None and "nowhere" not in error and "elsewhere" not in error
        assert not hops._dialing and not hops._links
        # That session may not have the host dial that peer again, at any address; another
        # session may, and each session only a few new peers.
        other = msgspec.structs.replace(next_hop, addresses=("memory://third",))
        error = await hops.relay(other, 0, hidden, Codec.NONE, for_session=session_id)
        assert error is not None and "one failed" in error
        error = await hops.relay(other, 0, hidden, Codec.NONE, for_session=SessionId("b"))
        assert error is not None and "third" in error  # dialed, and logged in detail
        for _ in range(hops.limits.max_dials_per_session - 1):  # one is spent above
            stranger = Credentials.generate()
            fresh = msgspec.structs.replace(
                other, peer_id=peer_id_of(stranger), public_key=stranger.public_key
            )
            assert "no more" not in str(
                await hops.relay(fresh, 0, hidden, Codec.NONE, for_session=session_id)
            )
        stranger = Credentials.generate()
        fresh = msgspec.structs.replace(
            other, peer_id=peer_id_of(stranger), public_key=stranger.public_key
        )
        error = await hops.relay(fresh, 0, hidden, Codec.NONE, for_session=session_id)
        assert error is not None and "no more dials for this session" in error
        hops.forget(session_id)
        assert not any(key[0] == session_id for key in hops._failed_dials)


class _StalledStream:
    """A session stream whose first send stalls (a full window), and whose replies are
    queued by the test."""

    def __init__(self) -> None:
        self.replies: asyncio.Queue[object] = asyncio.Queue()
        self.sends = 0
        self.was_reset = False

    async def send(self, *args: object, **kwargs: object) -> None:
        self.sends += 1
        if self.sends == 1:
            await asyncio.Event().wait()

    async def recv(self, timeout_s: float | None = None) -> object:
        return await self.replies.get()

    def reset(self) -> None:
        self.was_reset = True


async def test_a_step_cut_off_while_sent_loses_the_session_not_a_reply() -> None:
    stream = _StalledStream()
    session = RpcHopSession(
        PREVIOUS,
        contextlib.AsyncExitStack(),
        stream,  # type: ignore[arg-type]
        SessionId("s"),
        relay_target=None,
    )
    x = torch.zeros(1, 1, C)
    cut = asyncio.create_task(session.step_and_forward(x, 0, None, None, None, next_nonce=1))
    await asyncio.sleep(0.05)
    cut.cancel()
    await asyncio.gather(cut, return_exceptions=True)
    # Had the host got the request, its reply would come first: no call may take it.
    stale = StepResult(session_id=SessionId("s"), position=1)
    stream.replies.put_nowait(Decoded(stale, {"hidden": torch.ones(1, 1, C)}))
    with pytest.raises(HopError):
        await asyncio.wait_for(session.step_and_forward(x, 0, None, None, None, next_nonce=2), 1.0)
    assert stream.was_reset


async def test_a_relay_stream_that_ends_gives_its_slot_back() -> None:
    stream = _ScriptedStream()
    link = _Link(rpc=None)  # type: ignore[arg-type]  # the stream is already open
    released: list[bool] = []
    link.stack = contextlib.AsyncExitStack()
    link.stack.callback(released.append, True)
    link.stream = stream  # type: ignore[assignment]
    pending = asyncio.get_running_loop().create_future()
    link.answers.append(pending)
    link.reader = asyncio.create_task(link._read(stream))  # type: ignore[arg-type]
    stream.answers.put_nowait(ConnectionResetError("gone"))  # recv raises it: the end
    await asyncio.wait_for(link.reader, 1.0)
    assert isinstance(pending.result(), ConnectionResetError)
    assert released == [True] and link.stream is None and link.stack is None
