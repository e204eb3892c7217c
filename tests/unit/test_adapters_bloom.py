"""BLOOM blocks against transformers, plus ALiBi behaviour under padding."""

from __future__ import annotations

import pytest
import torch

from stamen.conformance.adapters import CHECKS, TOLERANCE, LocalChain, reference_for, variants_of
from stamen.models.base import StepContext
from stamen.models.common import alibi_slopes
from stamen.models.registry import get_adapter

BLOOM_VARIANTS = variants_of("bloom")


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("variant", BLOOM_VARIANTS)
def test_matches_transformers(variant: str, check: str) -> None:
    diff = CHECKS[check](reference_for(variant))
    assert diff <= TOLERANCE, f"{variant} / {check}: max abs diff {diff:.2e}"


def test_alibi_slopes() -> None:
    assert alibi_slopes(4).tolist() == [0.25, 0.0625, 0.015625, 0.00390625]
    # 6 heads: the 4-head series, then every other slope of the 8-head series
    assert alibi_slopes(6)[4:].tolist() == pytest.approx([2**-1, 2**-3])


def test_head_applies_embedding_layernorm() -> None:
    ref = reference_for("bloom")
    head = LocalChain.build(ref, range(0)).head
    ids = torch.tensor([[1, 2, 3]])
    embedded = head.embed(ids)
    raw = ref.state_dict["transformer.word_embeddings.weight"][ids]
    assert not torch.allclose(embedded, raw)
    assert embedded.mean(-1).abs().max() < 0.5  # normalised, then affine with small bias
    assert "transformer.word_embeddings_layernorm.weight" in get_adapter(
        ref.config
    ).head_tensor_names(ref.config)


def test_fully_masked_query_rows_stay_finite() -> None:
    ref = reference_for("bloom")
    block = LocalChain.build(ref, range(1)).blocks[0]
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool).tril()
    mask[0, 0, 0] = False
    positions = torch.arange(3)[None]
    context = StepContext(offset=0, positions=positions, key_positions=positions, attn_mask=mask)
    with torch.no_grad():
        out = block(torch.randn(1, 3, 64), None, context)
    assert torch.isfinite(out).all()
