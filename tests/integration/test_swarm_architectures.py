"""Every supported architecture through a real swarm, over tcp and over webrtc: greedy
generation through two `swarm-host` processes that choose their own blocks equals
transformers' `generate` on the same (tiny, random) weights.

Slow (two hosts start per case), so `make test-slow` runs it; the default run covers
SmolLM2 over both transports (test_swarm_smollm2.py, test_swarm_webrtc.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stamen.conformance.adapters import VARIANTS, Reference
from stamen.swarm_core.distributed import AutoDistributedModelForCausalLM
from tests.integration.conftest import SwarmProcesses

NEW_TOKENS = 12
ARCHITECTURES = ["llama-gqa-tied-bias", "falcon-7b-multi-query", "falcon-40b-new-arch", "bloom"]


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SwarmProcesses]:
    processes = SwarmProcesses(tmp_path_factory.mktemp("architectures"))
    try:
        processes.start_bootstrap()
        yield processes
    finally:
        processes.close()


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["tcp", pytest.param("webrtc", marks=pytest.mark.webrtc)])
@pytest.mark.parametrize("variant", ARCHITECTURES)
def test_greedy_generation_through_the_swarm_equals_transformers(
    bootstrap: SwarmProcesses, tmp_path: Path, variant: str, transport: str
) -> None:
    reference = Reference.build(VARIANTS[variant](), seed=3)
    # The directory name is the announced model name: one per case, so cases never mix.
    checkpoint = tmp_path / f"{variant}-{transport}"
    reference.model.save_pretrained(checkpoint, safe_serialization=True)
    num_blocks = reference.num_blocks
    assert num_blocks >= 3
    span = str(num_blocks - 1)  # two overlapping spans: together they cover every block
    webrtc = transport == "webrtc"
    # Client-mode DHT nodes: a server-mode node that leaves would slow the next cases'
    # lookups while everyone times out on it.
    flags = ("--num-blocks", span, "--dht-client")
    first = bootstrap.start_host(checkpoint, *flags, webrtc=webrtc)
    second = bootstrap.start_host(checkpoint, *flags, webrtc=webrtc)
    try:
        bootstrap.wait_ready(first, second)
        assert {first.blocks, second.blocks} == {(0, num_blocks - 1), (1, num_blocks)}
        input_ids = torch.randint(
            0, reference.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(5)
        )
        with torch.inference_mode():
            expected = reference.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
        with AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint, initial_peers=[bootstrap.dht]
        ) as model:
            schemes = {a.partition("://")[0] for r in model.swarm.records() for a in r.addresses}
            assert schemes == {transport}
            out = model.generate(input_ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert out.tolist() == expected.tolist()
    finally:
        first.terminate()
        second.terminate()
