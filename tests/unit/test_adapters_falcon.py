"""Falcon blocks (multi-query, new decoder architecture, sequential, ALiBi) against transformers."""

from __future__ import annotations

import pytest

from stamen.conformance.adapters import CHECKS, TOLERANCE, VARIANTS, reference_for, variants_of
from stamen.models.base import KVShape
from stamen.models.registry import get_adapter

FALCON_VARIANTS = variants_of("falcon")


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("variant", FALCON_VARIANTS)
def test_matches_transformers(variant: str, check: str) -> None:
    diff = CHECKS[check](reference_for(variant))
    assert diff <= TOLERANCE, f"{variant} / {check}: max abs diff {diff:.2e}"


@pytest.mark.parametrize(
    ("variant", "shape"),
    [
        ("falcon-7b-multi-query", KVShape(num_kv_heads=1, head_dim=16)),
        ("falcon-40b-new-arch", KVShape(num_kv_heads=2, head_dim=8)),
        ("falcon-sequential-mha", KVShape(num_kv_heads=4, head_dim=16)),
    ],
)
def test_cache_holds_only_real_kv_heads(variant: str, shape: KVShape) -> None:
    config = VARIANTS[variant]()
    assert get_adapter(config).kv_shape(config) == shape


def test_norm_tensor_names_follow_the_variant() -> None:
    names = {
        v: set(get_adapter(VARIANTS[v]()).block_tensor_names(VARIANTS[v]()))
        for v in FALCON_VARIANTS
    }
    assert {"ln_attn.weight", "ln_mlp.bias"} <= names["falcon-40b-new-arch"]
    assert "input_layernorm.weight" in names["falcon-7b-multi-query"]
    assert "post_attention_layernorm.weight" not in names["falcon-7b-multi-query"]
    assert "post_attention_layernorm.weight" in names["falcon-sequential-mha"]
    assert "self_attention.query_key_value.bias" in names["falcon-sequential-mha"]
