"""Steps forwarded host to host through real `swarm-host` processes on 127.0.0.1.

With forwarding on (the default), a decode step goes to the chain's first host, which
relays its output to the next host, and so on; every host also answers the client, which
keeps the hops' histories for failover. What a user relies on:

- greedy generation through a forwarding chain equals transformers' (the shared 2-host
  tcp swarm in the default run; 3 hosts over tcp and over WebRTC in the slow run), and
  the steps really went host to host (the session's `stats`);
- a middle host SIGKILLed mid-generation, with another host for its blocks up: the
  stream goes on with the same tokens (the client falls back to driving that step, bans
  the dead host, replays its history on the other one, and forwards again after).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import torch

from stamen.swarm_core.client.distributed import (
    AutoDistributedModelForCausalLM,
    DistributedModelForCausalLM,
)
from stamen.swarm_core.client.inference import StepStats
from stamen.swarm_core.client.swarm import ClientSettings
from stamen.swarm_core.protocol.errors import (
    RemoteBadRequest,
    RemoteNotFound,
    RemoteTimeout,
    RemoteTooLarge,
)
from stamen.swarm_core.protocol.identity import peer_id_of
from stamen.swarm_core.protocol.rpc import RpcClient
from stamen.swarm_core.protocol.wire import (
    AwaitStep,
    Hello,
    OpenSession,
    RelayAccepted,
    RelayStep,
    SessionId,
    SessionOpened,
    Step,
    StepResult,
)
from stamen.transports.base import Credentials
from stamen.transports.tcp import TcpTransport
from stamen.transports.webrtc_config import WebRTCConfig
from tests.integration.conftest import NEW_TOKENS, KillAfter, SwarmProcesses

HIDDEN_SIZE = 576  # SmolLM2-135M

LOOPBACK = ("--webrtc-host-address", "127.0.0.1")
THIRDS = ("0:10", "10:20", "20:30")


def generate(
    model: DistributedModelForCausalLM, prompt: torch.Tensor, streamer: Any = None
) -> tuple[torch.Tensor, StepStats, list[str]]:
    """Greedy tokens, how the steps travelled, and the route's peers at the end."""
    with model.inference_session(prompt.shape[1] + NEW_TOKENS) as session:
        out = model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
        return out, session.stats, [hop.peer_id for hop in session.route]


def test_greedy_generation_is_forwarded_host_to_host(
    smollm2_model: DistributedModelForCausalLM,
    smollm2_prompt: torch.Tensor,
    smollm2_expected: torch.Tensor,
) -> None:
    out, stats, route = generate(smollm2_model, smollm2_prompt)
    assert out.tolist() == smollm2_expected.tolist()
    assert len(route) == 2
    assert stats.forwarded >= NEW_TOKENS - 1
    assert stats.fallbacks == 0 and stats.client_driven == 0


async def _relay(
    rpc: RpcClient, session_id: str, start: int, hidden: torch.Tensor, nonce: int = 5
) -> object:
    message = RelayStep(session_id=SessionId(session_id), start_position=start, nonce=nonce)
    return (await rpc.call(message, {"hidden": hidden}, timeout_s=30)).message


async def test_a_host_refuses_relays_from_peers_the_client_did_not_name(
    smollm2_swarm: SwarmProcesses, smollm2_model: DistributedModelForCausalLM
) -> None:
    host = smollm2_swarm.hosts()[0]
    record = next(r for r in smollm2_model.swarm.records() if host.serves(r.peer_id))
    owner, stranger = TcpTransport(Credentials.generate()), TcpTransport(Credentials.generate())
    key = {"expected_public_key": record.public_key}
    try:
        async with (
            await RpcClient.connect(owner, record.addresses[0], Hello.local(), **key) as client,
            await RpcClient.connect(stranger, record.addresses[0], Hello.local(), **key) as peer,
            client.open_stream(timeout_s=30) as stream,
        ):
            with pytest.raises(RemoteNotFound):  # no such session on this host
                await _relay(peer, "no-such-session", 0, torch.zeros(1, 1, HIDDEN_SIZE))
            opened = await stream.call(OpenSession(*record.span, max_length=16))
            assert isinstance(opened.message, SessionOpened)
            session_id = opened.message.session_id
            with pytest.raises(RemoteTooLarge):  # past the session's max_length
                await _relay(peer, session_id, 0, torch.zeros(1, 64, HIDDEN_SIZE))
            with pytest.raises(RemoteBadRequest):  # not this span's hidden size
                await _relay(peer, session_id, 0, torch.zeros(1, 1, HIDDEN_SIZE + 1))
            # A forged header: a typed refusal, not a dropped connection.
            forged = msgspec.msgpack.encode(
                {"message": {"type": "relay_step", "session_id": session_id}, "tensors": []}
            )
            with pytest.raises(RemoteBadRequest):
                async with peer.open_stream(timeout_s=30) as raw:
                    await raw._stream.send([forged])
                    await raw.recv()
            # The client names another peer as the previous hop of its step.
            named = peer_id_of(Credentials.generate())
            await stream.send(
                AwaitStep(
                    session_id=session_id,
                    start_position=0,
                    num_tokens=1,
                    previous_peer_id=named,
                    nonce=5,
                )
            )
            await asyncio.sleep(0.2)
            with pytest.raises(RemoteBadRequest, match="not the previous hop"):
                await _relay(peer, session_id, 0, torch.zeros(1, 1, HIDDEN_SIZE))
            # The client moves on: the wait is answered, and a plain step is served.
            x = torch.randn(1, 2, HIDDEN_SIZE)
            await stream.send(Step(session_id=session_id, start_position=0), {"hidden": x})
            with pytest.raises(RemoteTimeout, match="no input"):
                await stream.recv()
            served = await stream.recv()
            assert isinstance(served.message, StepResult) and served.message.position == 2
            # Named as the previous hop, the stranger's input runs the client's step.
            await stream.send(
                AwaitStep(
                    session_id=session_id,
                    start_position=2,
                    num_tokens=1,
                    previous_peer_id=peer_id_of(stranger.credentials),
                    nonce=6,
                )
            )
            relayed = await _relay(peer, session_id, 2, torch.randn(1, 1, HIDDEN_SIZE), nonce=6)
            assert isinstance(relayed, RelayAccepted)
            result = await stream.recv()
            assert isinstance(result.message, StepResult) and result.message.position == 3
            assert result.tensors["hidden"].shape == (1, 1, HIDDEN_SIZE)
    finally:
        await owner.aclose()
        await stranger.aclose()


def _start_thirds(swarm: SwarmProcesses, model: Path, *extra: str, webrtc: bool = False) -> None:
    swarm.start_bootstrap()
    hosts = [
        swarm.start_host(model, "--blocks", blocks, *extra, webrtc=webrtc) for blocks in THIRDS
    ]
    swarm.wait_ready(*hosts)


@pytest.fixture(scope="module")
def thirds_swarm(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path
) -> Iterator[SwarmProcesses]:
    """Three tcp hosts of 10 blocks each: every chain has three hops."""
    processes = SwarmProcesses(tmp_path_factory.mktemp("smollm2-thirds"))
    try:
        _start_thirds(processes, smollm2_gguf)
        yield processes
    finally:
        processes.close()


@pytest.mark.slow
def test_greedy_generation_through_three_forwarding_hosts(
    thirds_swarm: SwarmProcesses,
    smollm2_gguf: Path,
    smollm2_prompt: torch.Tensor,
    smollm2_expected: torch.Tensor,
) -> None:
    with AutoDistributedModelForCausalLM.from_pretrained(
        smollm2_gguf, initial_peers=[thirds_swarm.dht]
    ) as model:
        out, stats, route = generate(model, smollm2_prompt)
    assert out.tolist() == smollm2_expected.tolist()
    assert len(route) == 3
    assert stats.forwarded >= NEW_TOKENS - 1 and stats.fallbacks == 0


@pytest.mark.slow
def test_a_middle_host_killed_mid_generation_changes_no_token(
    thirds_swarm: SwarmProcesses,
    smollm2_gguf: Path,
    smollm2_prompt: torch.Tensor,
    smollm2_expected: torch.Tensor,
) -> None:
    spare = thirds_swarm.start_host(smollm2_gguf, "--blocks", "10:20", "--dht-client")
    thirds_swarm.wait_ready(spare)
    try:
        with AutoDistributedModelForCausalLM.from_pretrained(
            smollm2_gguf,
            initial_peers=[thirds_swarm.dht],
            settings=ClientSettings(refresh_interval_s=1.0),
        ) as model:
            model._loop.run(model.swarm.wait_for_coverage(30.0))
            with model.inference_session(smollm2_prompt.shape[1] + NEW_TOKENS) as session:
                middle = session.route[1].peer_id
                streamer = KillAfter(5, lambda: thirds_swarm.host_of(middle))
                out = model.generate(
                    smollm2_prompt, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer
                )
                stats, route = session.stats, [hop.peer_id for hop in session.route]
        assert streamer.killed is not None and not streamer.killed.alive
        assert middle not in route and len(route) == 3
        assert stats.fallbacks >= 1
        assert stats.forwarded >= NEW_TOKENS - 1 - 2 * stats.fallbacks  # forwarding resumed
    finally:
        spare.terminate()
    assert out.tolist() == smollm2_expected.tolist()


@pytest.mark.slow
@pytest.mark.webrtc
def test_greedy_generation_through_three_forwarding_webrtc_hosts(
    tmp_path_factory: pytest.TempPathFactory,
    smollm2_gguf: Path,
    smollm2_prompt: torch.Tensor,
    smollm2_expected: torch.Tensor,
) -> None:
    processes = SwarmProcesses(tmp_path_factory.mktemp("smollm2-webrtc-thirds"))
    try:
        _start_thirds(processes, smollm2_gguf, *LOOPBACK, webrtc=True)
        assert all(host.address.startswith("webrtc://") for host in processes.hosts())
        with AutoDistributedModelForCausalLM.from_pretrained(
            smollm2_gguf,
            initial_peers=[processes.dht],
            webrtc={"config": WebRTCConfig(host_addresses=("127.0.0.1",))},
        ) as model:
            out, stats, route = generate(model, smollm2_prompt)
    finally:
        processes.close()
    assert out.tolist() == smollm2_expected.tolist()
    assert len(route) == 3
    assert stats.forwarded >= NEW_TOKENS - 1 and stats.fallbacks == 0
