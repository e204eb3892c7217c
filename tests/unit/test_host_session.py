"""A host's session stream over RPC (memory transport), without DHT or a model checkpoint.

What a client relies on when a host runs short of cache mid-session: the refused step
arrives as `RemoteBusy` with the runtime's `retry_after_s`, the stream and the session stay
open, and the same step sent again once there is room gives the same hidden states as a
session that never ran short. Also the host's announcement timing settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import torch

from stamen.swarm_core.host.runtime import SpanRuntime
from stamen.swarm_core.host.server import Host, HostSettings
from stamen.swarm_core.protocol import wire
from stamen.swarm_core.protocol.errors import RemoteBadRequest, RemoteBusy
from stamen.swarm_core.protocol.records import HostState
from stamen.swarm_core.protocol.rpc import RpcClient, RpcStream
from stamen.swarm_core.protocol.wire import (
    CloseSession,
    Hello,
    OpenSession,
    SessionClosed,
    SessionOpened,
    Step,
    StepResult,
)
from stamen.transports.base import Credentials
from stamen.transports.memory import MemoryHub, MemoryTransport
from tests.unit.test_runtime import GROWING, C, full_forward, tiny_span

SETTINGS = HostSettings(model_ref="tiny", model_name="tiny")


@pytest.fixture
async def client_and_span() -> AsyncIterator[tuple[RpcClient, object]]:
    hub = MemoryHub()
    server_transport = MemoryTransport(Credentials.generate(), hub=hub)
    client_transport = MemoryTransport(Credentials.generate(), hub=hub)
    span = tiny_span()
    host = Host(SETTINGS, server_transport.credentials, server_transport)
    async with SpanRuntime(span, GROWING) as runtime:
        host.runtime, host.span_range, host.state = (
            runtime,
            (span.start, span.end),
            HostState.ONLINE,
        )
        listener = await server_transport.listen("memory://", host._server().serve)
        client = await RpcClient.connect(
            client_transport, listener.addresses[0], Hello.local("client"), timeout_s=5
        )
        try:
            yield client, span
        finally:
            await client.close()
            await listener.close()
            await client_transport.aclose()
            await server_transport.aclose()


@contextlib.asynccontextmanager
async def session(client: RpcClient, max_length: int) -> AsyncIterator[tuple[RpcStream, str]]:
    async with client.open_stream(timeout_s=5) as stream:
        request = OpenSession(block_start=3, block_end=6, max_length=max_length)
        opened = (await stream.call(request)).message
        assert isinstance(opened, SessionOpened)
        yield stream, opened.session_id
        closed = await stream.call(CloseSession(session_id=opened.session_id))
        assert isinstance(closed.message, SessionClosed)


async def step(stream: RpcStream, session_id: str, hidden: torch.Tensor, start: int):
    reply = await stream.call(Step(session_id=session_id, start_position=start), {"hidden": hidden})
    assert isinstance(reply.message, StepResult)
    assert reply.message.position == start + hidden.shape[1]
    return reply.tensors["hidden"]


async def test_a_busy_step_keeps_the_session_and_can_be_sent_again(client_and_span) -> None:
    client, span = client_and_span
    x = torch.randn(1, 8, C)
    async with session(client, 32) as (stream, session_id):
        outs = [await step(stream, session_id, x[:, :4], 0)]  # fills its first page
        async with session(client, 32) as (hog, hog_id):
            await step(hog, hog_id, torch.randn(1, 32, C), 0)
            async with session(client, 32) as (hog2, hog2_id):
                await step(hog2, hog2_id, torch.randn(1, 28, C), 0)  # budget now full
                with pytest.raises(RemoteBusy, match="no room to grow") as refused:
                    await step(stream, session_id, x[:, 4:5], 4)
                assert refused.value.retry_after_s == GROWING.busy_retry_after_s
        # Room again (the hogs closed): the same step, on the same stream and session.
        for t in range(4, 8):
            outs.append(await step(stream, session_id, x[:, t : t + 1], t))
    torch.testing.assert_close(torch.cat(outs, 1), full_forward(span, x))


class _OpenSessionOfOldClients(wire._SpanRequest, frozen=True, tag="open_session"):
    """What protocol 1.x clients sent: an `adapter` field that no host implemented."""

    max_length: int
    adapter: str | None = None


async def test_a_field_nothing_implements_is_refused_and_the_host_serves_on(
    client_and_span,
) -> None:
    client, span = client_and_span
    request = _OpenSessionOfOldClients(block_start=3, block_end=6, max_length=8, adapter="lora")
    with pytest.raises(RemoteBadRequest, match="adapter"):
        await client.call(request, timeout_s=5)  # type: ignore[arg-type]
    async with session(client, max_length=8) as (stream, session_id):
        hidden = torch.randn(1, 2, C)
        assert torch.allclose(await step(stream, session_id, hidden, 0), full_forward(span, hidden))


def test_announcements_outpace_record_expiry() -> None:
    assert (SETTINGS.announce_interval_s, SETTINGS.record_ttl_s) == (5.0, 15.0)
    with pytest.raises(ValueError, match="record_ttl_s"):
        HostSettings(model_ref="tiny", model_name="tiny", announce_interval_s=20.0)
