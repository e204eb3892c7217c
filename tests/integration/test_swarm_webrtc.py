"""SmolLM2 through two `swarm-host` processes reachable only over WebRTC (data channels,
signalled through the bootstrap node's relay on 127.0.0.1). The client dials the
`webrtc://` addresses it finds in the DHT by itself: nothing in the test names the
transport on the client side."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stamen.swarm_core.client.distributed import AutoDistributedModelForCausalLM
from stamen.transports.webrtc_config import WebRTCConfig
from tests.integration.conftest import NEW_TOKENS, SwarmProcesses

pytestmark = pytest.mark.webrtc
LOOPBACK = ("--webrtc-host-address", "127.0.0.1")  # hosts' traffic stays on 127.0.0.1


@pytest.fixture(scope="module")
def webrtc_swarm(
    tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path
) -> Iterator[SwarmProcesses]:
    processes = SwarmProcesses(tmp_path_factory.mktemp("smollm2-webrtc"))
    try:
        processes.start_bootstrap()
        first = processes.start_host(smollm2_gguf, "--num-blocks", "15", *LOOPBACK, webrtc=True)
        second = processes.start_host(smollm2_gguf, "--num-blocks", "15", *LOOPBACK, webrtc=True)
        processes.wait_ready(first, second)
        yield processes
    finally:
        processes.close()


@pytest.mark.slow  # ~35 s; the WebRTC transport conformance runs by default
def test_greedy_generation_over_webrtc_equals_transformers(
    webrtc_swarm: SwarmProcesses,
    smollm2_gguf: Path,
    smollm2_prompt: torch.Tensor,
    smollm2_expected: torch.Tensor,
) -> None:
    first, second = webrtc_swarm.hosts()
    assert sorted([first.blocks, second.blocks]) == [(0, 15), (15, 30)]
    assert first.address.startswith("webrtc://") and second.address.startswith("webrtc://")
    with AutoDistributedModelForCausalLM.from_pretrained(
        smollm2_gguf,
        initial_peers=[webrtc_swarm.dht],
        webrtc={"config": WebRTCConfig(host_addresses=("127.0.0.1",))},
    ) as model:
        with model.inference_session(smollm2_prompt.shape[1] + NEW_TOKENS) as session:
            out = model.generate(smollm2_prompt, max_new_tokens=NEW_TOKENS, do_sample=False)
            assert len(session.route) == 2
    assert out.tolist() == smollm2_expected.tolist()
