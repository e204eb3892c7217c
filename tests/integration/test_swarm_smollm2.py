"""SmolLM2 served by a real swarm on 127.0.0.1 over tcp: a bootstrap node and two hosts
that choose their own blocks, reached by `AutoDistributedModelForCausalLM`.

The swarm is the package's (`conftest.smollm2_swarm`); tests that need more hosts (one
that leaves, one with a tiny cache, one killed mid-generation) start and stop them
themselves, and make the client prefer them where the test needs that.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from stamen.swarm_core.client.distributed import DistributedModelForCausalLM
from stamen.swarm_core.client.routing import BanList, NoRouteError, plan_latency_route
from stamen.swarm_core.protocol.records import HostState
from tests.integration.conftest import (
    NEW_TOKENS,
    FavouringView,
    KillAfter,
    SwarmProcesses,
    independent_client,
    refresh,
)

NUM_BLOCKS = 30


@pytest.fixture
def swarm(smollm2_swarm: SwarmProcesses) -> SwarmProcesses:
    return smollm2_swarm


@pytest.fixture
def model(smollm2_model: DistributedModelForCausalLM) -> DistributedModelForCausalLM:
    return smollm2_model


@pytest.fixture
def expected(smollm2_expected: torch.Tensor) -> torch.Tensor:
    return smollm2_expected


def test_hosts_started_without_blocks_cover_the_model(
    swarm: SwarmProcesses, model: DistributedModelForCausalLM
) -> None:
    first, second = swarm.hosts()[:2]
    assert sorted([first.blocks, second.blocks]) == [(0, 15), (15, NUM_BLOCKS)]
    assert model.swarm.covered()
    # What the client reads in the DHT agrees (other tests may have added hosts of theirs).
    ours = [h for h in model.swarm.hosts() if first.serves(h.peer_id) or second.serves(h.peer_id)]
    assert sorted((h.start, h.end, h.state) for h in ours) == [
        (0, 15, HostState.ONLINE),
        (15, NUM_BLOCKS, HostState.ONLINE),
    ]


def test_greedy_generation_equals_transformers(
    model: DistributedModelForCausalLM, smollm2_prompt: torch.Tensor, expected: torch.Tensor
) -> None:
    out = model.generate(smollm2_prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.tolist() == expected.tolist()


def test_eight_clients_generating_concurrently_all_get_correct_tokens(
    swarm: SwarmProcesses,
    model: DistributedModelForCausalLM,
    smollm2_prompt: torch.Tensor,
    expected: torch.Tensor,
) -> None:
    clients = [independent_client(model, [swarm.dht]) for _ in range(8)]
    start_together = threading.Barrier(len(clients))
    outputs: dict[int, Any] = {}

    def generate(index: int) -> None:
        start_together.wait(timeout=60)
        try:
            outputs[index] = clients[index].generate(
                smollm2_prompt, max_new_tokens=NEW_TOKENS, do_sample=False
            )
        except Exception as error:  # reported below with the others' results
            outputs[index] = error

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(len(clients))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=240)
    finally:
        for client in clients:
            client.close()
    results = [outputs.get(i) for i in range(len(clients))]
    assert all(isinstance(r, torch.Tensor) for r in results), results
    assert all(r.tolist() == expected.tolist() for r in results)


def test_a_host_with_a_full_cache_is_routed_around(
    swarm: SwarmProcesses,
    model: DistributedModelForCausalLM,
    smollm2_gguf: Path,
    smollm2_prompt: torch.Tensor,
    expected: torch.Tensor,
) -> None:
    max_length = smollm2_prompt.shape[1] + NEW_TOKENS
    full = swarm.start_host(
        smollm2_gguf, "--blocks", "0:30", "--max-cache-tokens", "8", "--dht-client"
    )
    client = independent_client(model, [swarm.dht])
    try:
        swarm.wait_ready(full)
        refresh(client)
        full_info = next(h for h in client.swarm.hosts() if full.serves(h.peer_id))
        full_id = full_info.peer_id
        # The honest view already steers around it: its record announces 8 free tokens.
        route = plan_latency_route(client.swarm.hosts(), 0, NUM_BLOCKS, min_cache_tokens=max_length)
        assert full_id not in {hop.peer_id for hop in route}
        # With records claiming room, the host itself refuses and the client goes elsewhere.
        client.swarm = FavouringView(client.swarm, full_id)  # type: ignore[assignment]
        assert plan_latency_route(client.swarm.hosts(), 0, NUM_BLOCKS)[0].peer_id == full_id
        with client.inference_session(max_length) as session:
            assert full_id not in {hop.peer_id for hop in session.route}
            # Refused as busy: load, not a failure, so it is not banned at all.
            assert full_info.incarnation not in client.ban_list
            assert client.ban_list.strikes(full_info.incarnation) == 0
            out = client.generate(smollm2_prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert out.tolist() == expected.tolist()
    finally:
        client.close()
        full.terminate()


def test_a_host_that_shuts_down_disappears_from_routing(
    swarm: SwarmProcesses, model: DistributedModelForCausalLM, smollm2_gguf: Path
) -> None:
    leaving = swarm.start_host(smollm2_gguf, "--blocks", "0:2", "--dht-client")
    swarm.wait_ready(leaving)
    refresh(model)
    infos = {h.peer_id: h for h in model.swarm.hosts()}
    leaving_id = next(p for p in infos if leaving.serves(p))
    assert infos[leaving_id].state is HostState.ONLINE
    # With the other host of blocks [0, 2) avoided, only the newcomer can serve them.
    others = BanList()
    for peer_id, info in infos.items():
        if peer_id != leaving_id and info.start < 2:
            others.ban(info.incarnation)
    route = plan_latency_route(model.swarm.hosts(), 0, 2, banned=others)
    assert [hop.peer_id for hop in route] == [leaving_id]

    assert leaving.terminate() == 0
    refresh(model)
    infos = {h.peer_id: h for h in model.swarm.hosts()}
    assert leaving_id not in infos  # its OFFLINE announcement removed it from the view
    with pytest.raises(NoRouteError):
        plan_latency_route(model.swarm.hosts(), 0, 2, banned=others)
    route = plan_latency_route(model.swarm.hosts(), 0, NUM_BLOCKS)
    assert leaving_id not in {hop.peer_id for hop in route}


def test_a_host_killed_mid_generation_changes_no_token(
    swarm: SwarmProcesses,
    model: DistributedModelForCausalLM,
    smollm2_gguf: Path,
    smollm2_prompt: torch.Tensor,
    expected: torch.Tensor,
) -> None:
    # A spare host serving everything, made the client's first choice; the shared hosts
    # [0, 15) and [15, 30) take over when it dies.
    spare = swarm.start_host(smollm2_gguf, "--blocks", "0:30", "--dht-client")
    client = independent_client(model, [swarm.dht])
    try:
        swarm.wait_ready(spare)
        refresh(client)
        spare_info = next(h for h in client.swarm.hosts() if spare.serves(h.peer_id))
        spare_id = spare_info.peer_id
        client.swarm = FavouringView(client.swarm, spare_id)  # type: ignore[assignment]
        max_length = smollm2_prompt.shape[1] + NEW_TOKENS
        with client.inference_session(max_length) as session:
            assert [hop.peer_id for hop in session.route] == [spare_id]
            streamer = KillAfter(5, lambda: spare)
            out = client.generate(
                smollm2_prompt, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer
            )
            assert streamer.killed is spare and not spare.alive
            assert spare_id not in {hop.peer_id for hop in session.route}
        assert spare_info.incarnation in client.ban_list
    finally:
        client.close()
        spare.terminate()
    assert out.tolist() == expected.tolist()
