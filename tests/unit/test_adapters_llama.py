"""Llama-family blocks (llama, mistral, qwen2) against transformers, plus Llama behaviour."""

from __future__ import annotations

import pytest
import torch

from stamen.conformance.adapters import CHECKS, TOLERANCE, LocalChain, reference_for, variants_of
from stamen.models.base import KVCache, StepContext
from stamen.models.common import StepShapeError
from stamen.models.registry import get_adapter

VARIANTS = variants_of("llama") + variants_of("mistral") + variants_of("qwen2")


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_transformers(variant: str, check: str) -> None:
    diff = CHECKS[check](reference_for(variant))
    assert diff <= TOLERANCE, f"{variant} / {check}: max abs diff {diff:.2e}"


def test_gqa_cache_keeps_only_kv_heads_in_canonical_layout() -> None:
    ref = reference_for("llama-gqa-tied-bias")
    chain = LocalChain.build(ref)
    chain.open(batch_size=2, max_length=10)
    ids = torch.randint(0, 96, (2, 4))
    chain.run(chain.head.embed(ids), StepContext.make(0, 4, batch_size=2))
    cache = chain.caches[0]
    assert cache.key.shape == (2, 2, 10, 16)  # (B, H_kv, S_max, D), not 4 query heads
    assert cache.key[:, :, :4].abs().sum(-1).gt(0).all()
    assert cache.key[:, :, 4:].eq(0).all() and cache.value[:, :, 4:].eq(0).all()


def test_tied_head_shares_the_embedding_and_skips_lm_head_tensor() -> None:
    ref = reference_for("llama-gqa-tied-bias")
    adapter = get_adapter(ref.config)
    assert "lm_head.weight" not in adapter.head_tensor_names(ref.config)
    head = LocalChain.build(ref).head
    assert head.lm_head.weight.data_ptr() == head.embed_tokens.weight.data_ptr()


def test_untied_head_uses_lm_head_tensor() -> None:
    ref = reference_for("llama-mha-untied")
    assert "lm_head.weight" in get_adapter(ref.config).head_tensor_names(ref.config)


def test_fully_masked_query_rows_stay_finite() -> None:
    ref = reference_for("llama-mha-untied")
    block = LocalChain.build(ref, range(1)).blocks[0]
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    mask[0, 0, 0] = False  # a padding query that may attend nothing
    positions = torch.arange(3)[None]
    context = StepContext(offset=0, positions=positions, key_positions=positions, attn_mask=mask)
    with torch.no_grad():
        out = block(torch.randn(1, 3, 64), None, context)
    assert torch.isfinite(out).all()


def test_step_beyond_cache_is_refused() -> None:
    ref = reference_for("llama-mha-untied")
    block = LocalChain.build(ref, range(1)).blocks[0]
    cache = KVCache.empty(1, 4, 4, 16, dtype=torch.float32)
    with pytest.raises(StepShapeError, match="beyond cache length 4"):
        block(torch.randn(1, 2, 64), cache, StepContext.make(3, 2))


def test_chunk_without_mask_is_refused_rather_than_misaligned() -> None:
    ref = reference_for("llama-mha-untied")
    block = LocalChain.build(ref, range(1)).blocks[0]
    cache = KVCache.empty(1, 4, 8, 16, dtype=torch.float32)
    positions = torch.arange(2, 5)[None]
    context = StepContext(
        offset=2, positions=positions, key_positions=torch.arange(5)[None], attn_mask=None
    )
    with pytest.raises(StepShapeError, match="attn_mask"):
        block(torch.randn(1, 3, 64), cache, context)
