"""`run_span` remembers padding across steps, rollbacks and replays.

The span cache tracks whether any written slot holds padding so that an unpadded decode
step need not read the mask back; these tests pin that a left-padded row still decodes as
if it ran alone, and that rolling back over padding and rewriting real tokens gives the
same output as a session that never saw the padding.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("stamen.models.llama")

from transformers import LlamaConfig, LlamaForCausalLM

from stamen.models.chain import SpanCache, run_span
from stamen.models.loading import Span, load_span

C = 32


@pytest.fixture(scope="module")
def span(tmp_path_factory: pytest.TempPathFactory) -> Span:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=C,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    path: Path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).eval().save_pretrained(path)
    return load_span(path, 0, 2)


def _cache(span: Span, batch_size: int) -> SpanCache:
    return SpanCache.empty(span.adapter, span.config, 2, batch_size, 16, dtype=torch.float32)


def test_left_padded_row_decodes_as_if_alone(span: Span) -> None:
    torch.manual_seed(1)
    prompt = torch.randn(1, 4, C)  # (B, T, C)
    tokens = [torch.randn(1, 1, C) for _ in range(3)]
    alone = _cache(span, 1)
    expected = [run_span(span.blocks, alone, prompt, 0)]
    expected += [run_span(span.blocks, alone, t, 4 + i) for i, t in enumerate(tokens)]

    padded = _cache(span, 1)
    mask = torch.tensor([[False, False, True, True, True, True]])
    prompt_padded = torch.cat([torch.zeros(1, 2, C), prompt], dim=1)
    got = [run_span(span.blocks, padded, prompt_padded, 0, mask)[:, 2:]]
    # Decode steps carry no mask: the padding of the prefill must still be honoured.
    got += [run_span(span.blocks, padded, t, 6 + i) for i, t in enumerate(tokens)]
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-4)


def test_rollback_over_padding_then_real_tokens_matches_a_fresh_cache(span: Span) -> None:
    torch.manual_seed(2)
    prefix, suffix, token = torch.randn(1, 3, C), torch.randn(1, 2, C), torch.randn(1, 1, C)
    cache = _cache(span, 1)
    run_span(span.blocks, cache, prefix, 0)
    run_span(span.blocks, cache, suffix, 3, torch.tensor([[False, True]]))
    run_span(span.blocks, cache, suffix, 3)  # roll back to 3 and rewrite as real tokens
    got = run_span(span.blocks, cache, token, 5)

    fresh = _cache(span, 1)
    run_span(span.blocks, fresh, torch.cat([prefix, suffix], dim=1), 0)
    torch.testing.assert_close(got, run_span(span.blocks, fresh, token, 5), atol=1e-5, rtol=1e-4)


def test_padding_in_the_kept_prefix_survives_a_rollback(span: Span) -> None:
    torch.manual_seed(3)
    prompt, a, b = torch.randn(2, 3, C), torch.randn(2, 1, C), torch.randn(2, 1, C)
    mask = torch.tensor([[False, True, True], [True, True, True]])
    cache = _cache(span, 2)
    run_span(span.blocks, cache, prompt, 0, mask)
    first = run_span(span.blocks, cache, a, 3)
    run_span(span.blocks, cache, b, 4)
    again = run_span(span.blocks, cache, a, 3)  # replay position 3: padding at 0 remains
    torch.testing.assert_close(again, first, atol=1e-6, rtol=1e-5)
    # Row 0 with its padding dropped is row 0 run alone.
    alone = _cache(span, 1)
    run_span(span.blocks, alone, prompt[:1, 1:], 0)
    torch.testing.assert_close(
        first[:1], run_span(span.blocks, alone, a[:1], 2), atol=1e-5, rtol=1e-4
    )
