"""SpanRuntime serving real Llama blocks (GQA, rotary) loaded from a tiny random checkpoint.

The span's output is checked against transformers' own model, so this covers loading,
the adapter and the runtime's cache handling together.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("stamen.models.llama")

from transformers import LlamaConfig, LlamaForCausalLM

from stamen.models.loading import load_span
from stamen.swarm_core.host.runtime import RuntimeLimits, SpanRuntime, measure_throughput


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path, model


async def test_llama_span_steps_match_transformers(checkpoint) -> None:
    path, model = checkpoint
    input_ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        states = model(input_ids, output_hidden_states=True).hidden_states
    # hidden_states[i] is the input of block i, the last one has the final norm applied.
    span = load_span(path, 1, 3)
    async with SpanRuntime(span, RuntimeLimits(max_cache_tokens=64)) as runtime:
        session = await runtime.open_session(max_length=8, batch_size=2)
        outs = [await runtime.step(session, states[1][:, :5], 0)]
        for t in (5, 6):
            outs.append(await runtime.step(session, states[1][:, t : t + 1], t))
        forward = await runtime.forward(states[1])
    expected = states[3]  # output of block 2
    torch.testing.assert_close(torch.cat(outs, 1), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(forward, expected, atol=1e-5, rtol=1e-4)


def test_throughput_of_a_llama_span(checkpoint) -> None:
    span = load_span(checkpoint[0], 0, 2)
    assert measure_throughput(span, kind="decode", duration_s=0.05) > 0
