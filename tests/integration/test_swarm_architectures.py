"""Every supported architecture through a real swarm, over tcp and over webrtc: greedy
generation through two `swarm-host` processes that choose their own blocks equals
transformers' `generate` on the same (tiny, random) weights.

Random tiny models with tied embeddings copy the last prompt token forever: the unit-scale
embedding dominates the residual stream, so the blocks barely move the logits and a swarm
that skipped or garbled a block would still match. Each case therefore scales what every
block writes into the residual stream (`_amplify_blocks`), uses a seed whose reference
continuation is varied, and asserts that it is before comparing.

Slow (two hosts start per case), so `make test-slow` runs it; the default run covers
SmolLM2 over both transports (test_swarm_smollm2.py, test_swarm_webrtc.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stamen.conformance.adapters import VARIANTS, Reference
from stamen.swarm_core.client.distributed import AutoDistributedModelForCausalLM
from tests.integration.conftest import SwarmProcesses

NEW_TOKENS = 12
MIN_DISTINCT_NEW_TOKENS = 3
# variant -> weight seed whose greedy continuation of the prompt below is varied (4 to 6
# distinct tokens, no EOS, top-2 logit margins of at least 0.14 at every step)
MODEL_SEEDS = {
    "llama-gqa-tied-bias": 6,
    "falcon-7b-multi-query": 6,
    "falcon-40b-new-arch": 1,
    "bloom": 5,
}
PROMPT_SEED = 5
BLOCK_OUTPUT_SCALE = 8.0
# The projections through which a block writes into the residual stream (llama; falcon, bloom)
_RESIDUAL_WRITERS = ("o_proj", "down_proj", "self_attention.dense", "dense_4h_to_h")


def _amplify_blocks(reference: Reference, factor: float) -> None:
    """Scale every block's residual writes by `factor`, so each block shapes the logits."""
    scaled = 0
    with torch.no_grad():
        for name, module in reference.model.named_modules():
            if name.endswith(_RESIDUAL_WRITERS):
                module.weight.mul_(factor)
                if getattr(module, "bias", None) is not None:
                    module.bias.mul_(factor)
                scaled += 1
    # Attention and MLP out of every block: a renamed module must not make this a no-op.
    assert scaled == 2 * reference.num_blocks, f"scaled {scaled} projections"


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
@pytest.mark.parametrize("variant", list(MODEL_SEEDS))
def test_greedy_generation_through_the_swarm_equals_transformers(
    bootstrap: SwarmProcesses, tmp_path: Path, variant: str, transport: str
) -> None:
    reference = Reference.build(VARIANTS[variant](), seed=MODEL_SEEDS[variant])
    _amplify_blocks(reference, BLOCK_OUTPUT_SCALE)
    input_ids = torch.randint(
        0, reference.config.vocab_size, (1, 7), generator=torch.Generator().manual_seed(PROMPT_SEED)
    )
    with torch.inference_mode():
        expected = reference.model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
        )
    # A continuation of one repeated token would let a broken swarm pass by luck.
    expected_new_tokens = expected[0, input_ids.shape[1] :].tolist()
    assert len(expected_new_tokens) == NEW_TOKENS, f"reference stopped early: {expected}"
    assert len(set(expected_new_tokens)) >= MIN_DISTINCT_NEW_TOKENS, (
        f"degenerate reference continuation {expected_new_tokens}: pick another seed"
    )
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
