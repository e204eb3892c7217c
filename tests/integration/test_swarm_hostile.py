"""Hostile and broken peers against the shared SmolLM2 swarm on 127.0.0.1 (tcp).

- bad RPC input sent straight to a `swarm-host` process gets typed errors, and the host
  keeps serving;
- a host that answers steps with the wrong shapes is banned and routed around.

Forged DHT records are test_swarm_trust.py's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import msgspec
import pytest
import torch

from stamen.swarm_core.client.distributed import DistributedModelForCausalLM
from stamen.swarm_core.client.remote import Incarnation
from stamen.swarm_core.client.routing import plan_latency_route
from stamen.swarm_core.protocol.discovery import Discovery
from stamen.swarm_core.protocol.errors import (
    RemoteBadRequest,
    RemoteBusy,
    RemoteError,
    RemoteNotFound,
)
from stamen.swarm_core.protocol.records import (
    HostRecord,
    HostState,
    new_host_record,
    restamped,
)
from stamen.swarm_core.protocol.rpc import CallContext, Outgoing, Reply, RpcClient, RpcServer
from stamen.swarm_core.protocol.wire import (
    CloseSession,
    Decoded,
    Forward,
    ForwardResult,
    Hello,
    HelloReply,
    Info,
    InfoReply,
    OpenSession,
    SessionClosed,
    SessionOpened,
    Step,
    StepResult,
)
from stamen.transports.base import Credentials
from stamen.transports.tcp import TcpTransport
from tests.integration.conftest import (
    NEW_TOKENS,
    SwarmProcesses,
    independent_client,
)

HIDDEN_SIZE = 576  # SmolLM2-135M


def _record_of(model: DistributedModelForCausalLM, swarm: SwarmProcesses) -> HostRecord:
    host = swarm.hosts()[0]
    return next(r for r in model.swarm.records() if host.serves(r.peer_id))


@pytest.fixture
async def host_rpc(
    smollm2_swarm: SwarmProcesses, smollm2_model: DistributedModelForCausalLM
) -> AsyncIterator[tuple[RpcClient, tuple[int, int]]]:
    record = _record_of(smollm2_model, smollm2_swarm)
    transport = TcpTransport(Credentials.generate())
    try:
        rpc = await RpcClient.connect(
            transport, record.addresses[0], Hello.local(), expected_public_key=record.public_key
        )
        async with rpc:
            yield rpc, record.span
    finally:
        await transport.aclose()


async def _forward(rpc: RpcClient, start: int, end: int, **tensors: torch.Tensor) -> Decoded:
    return await rpc.call(Forward(block_start=start, block_end=end), tensors, timeout_s=60)


async def _step_in_new_session(
    rpc: RpcClient, span: tuple[int, int], max_length: int, step: Step | None, hidden: Any
) -> None:
    async with rpc.open_stream(timeout_s=60) as stream:
        opened = await stream.call(
            OpenSession(block_start=span[0], block_end=span[1], max_length=max_length)
        )
        assert isinstance(opened.message, SessionOpened)
        message = step or Step(session_id=opened.message.session_id, start_position=0)
        await stream.call(message, {"hidden": hidden})


async def test_bad_rpc_input_gets_typed_errors_and_the_host_keeps_serving(
    host_rpc: tuple[RpcClient, tuple[int, int]],
) -> None:
    rpc, (start, end) = host_rpc
    hidden = torch.randn(1, 3, HIDDEN_SIZE)
    bad_forwards: list[tuple[tuple[int, int], dict[str, torch.Tensor]]] = [
        ((start, end), {"hidden": torch.randn(1, 3, HIDDEN_SIZE + 1)}),  # wrong hidden size
        ((start, end), {"hidden": torch.randn(3, HIDDEN_SIZE)}),  # wrong rank
        ((start, end), {"hidden": torch.ones(1, 3, HIDDEN_SIZE, dtype=torch.int64)}),
        ((start, end + 1), {"hidden": hidden}),  # a block this host does not serve
        ((end, end + 2), {"hidden": hidden}),  # entirely outside the span
        ((start, end), {"hidden": torch.zeros(2, 10_000, HIDDEN_SIZE)}),  # too many tokens
    ]
    for (block_start, block_end), tensors in bad_forwards:
        with pytest.raises(RemoteBadRequest):
            await _forward(rpc, block_start, block_end, **tensors)

    # Sessions: a step past max_length, a wrong hidden size, someone else's session id.
    with pytest.raises(RemoteBadRequest):
        await _step_in_new_session(rpc, (start, end), 2, None, hidden)
    with pytest.raises(RemoteBadRequest):
        await _step_in_new_session(rpc, (start, end), 8, None, torch.randn(1, 1, 7))
    with pytest.raises(RemoteNotFound):
        await _step_in_new_session(
            rpc, (start, end), 8, Step(session_id="no-such-session", start_position=0), hidden
        )
    with pytest.raises((RemoteBadRequest, RemoteBusy)):  # more cache than the host has
        await _step_in_new_session(rpc, (start, end), 1 << 20, None, hidden)
    with pytest.raises(RemoteError):  # a step without opening a session first
        await rpc.call(Step(session_id="s", start_position=0), {"hidden": hidden}, timeout_s=60)

    # Still serving, correctly shaped.
    info = await rpc.call(Info(), timeout_s=30)
    assert isinstance(info.message, InfoReply) and info.message.state == "online"
    reply = await _forward(rpc, start, end, hidden=hidden)
    assert isinstance(reply.message, ForwardResult)
    assert reply.tensors["hidden"].shape == hidden.shape
    assert torch.isfinite(reply.tensors["hidden"]).all()


def _garbage_server() -> RpcServer:
    """Opens sessions like a host, then answers every step with (1, 1, 7) zeros."""

    async def session(
        first: Decoded, requests: AsyncIterator[Decoded], context: CallContext
    ) -> AsyncGenerator[Reply]:
        assert isinstance(first.message, OpenSession)
        yield SessionOpened(session_id="garbage", max_length=first.message.max_length)
        async for decoded in requests:
            if isinstance(decoded.message, CloseSession):
                yield SessionClosed(session_id="garbage")
                return
            yield Outgoing(
                StepResult(session_id="garbage", position=1), {"hidden": torch.zeros(1, 1, 7)}
            )

    server = RpcServer(HelloReply.local("garbage", ("inference", "forward")))
    server.add_stream(OpenSession, session)
    return server


async def test_a_host_answering_garbage_is_banned_and_routed_around(
    smollm2_swarm: SwarmProcesses,
    smollm2_model: DistributedModelForCausalLM,
    smollm2_prompt: torch.Tensor,
    smollm2_expected: torch.Tensor,
) -> None:
    credentials = Credentials.generate()
    transport = TcpTransport(credentials)
    listener = await transport.listen("tcp://127.0.0.1:0", _garbage_server().serve)
    genuine = new_host_record(
        credentials,
        model=smollm2_model.swarm.model_name,
        start_block=0,
        end_block=smollm2_model.num_blocks,
        addresses=listener.addresses,
        ttl_s=120,
    )
    # Announced as far faster than anyone, with room for anything: routing prefers it.
    record = msgspec.structs.replace(
        genuine, throughput_tokens_per_s=1e6, free_cache_tokens=1 << 20
    )
    discovery = Discovery(
        credentials, listen_host="127.0.0.1", initial_peers=[smollm2_swarm.dht], client_mode=True
    )
    async with discovery:
        await discovery.announce(record)
        client = await asyncio.to_thread(independent_client, smollm2_model, [smollm2_swarm.dht])
        try:
            route = plan_latency_route(client.swarm.hosts(), 0, client.num_blocks)
            assert [hop.peer_id for hop in route] == [record.peer_id]
            out = await asyncio.to_thread(
                client.generate, smollm2_prompt, max_new_tokens=NEW_TOKENS, do_sample=False
            )
            liar = Incarnation(record.peer_id, record.started_at_s)
            assert liar in client.ban_list
            assert client.ban_list.strikes(liar) == 1
        finally:
            await asyncio.to_thread(client.close)
            await discovery.announce(
                restamped(msgspec.structs.replace(record, state=HostState.OFFLINE))
            )
    await listener.close()
    await transport.aclose()
    assert out.tolist() == smollm2_expected.tolist()
