"""What the adapters refuse, and how they say it."""

from __future__ import annotations

import pytest
import torch
from transformers import FalconConfig, LlamaConfig, MistralConfig, Qwen2Config

from stamen.conformance.adapters import VARIANTS, reference_for
from stamen.models.base import CheckpointError, UnsupportedModelError
from stamen.models.registry import get_adapter


def test_unknown_model_type_lists_supported_ones() -> None:
    with pytest.raises(
        UnsupportedModelError, match="'gpt2' is not supported; supported: bloom, falcon, llama"
    ):
        get_adapter("gpt2")


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (MistralConfig(sliding_window=128, max_position_embeddings=1024), "sliding_window"),
        (
            Qwen2Config(use_sliding_window=True, sliding_window=64, max_window_layers=0),
            "sliding_window",
        ),
        (
            LlamaConfig(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
            "rope_type 'yarn'",
        ),
        (LlamaConfig(hidden_act="gelu"), "hidden_act 'gelu'"),
        (FalconConfig(activation="relu"), "activation 'relu'"),
        (FalconConfig(new_decoder_architecture=True, parallel_attn=False), "parallel_attn=False"),
        (
            FalconConfig(multi_query=False, num_kv_heads=8, num_attention_heads=16, hidden_size=64),
            "num_kv_heads",
        ),
    ],
)
def test_unsupported_variant_names_the_field(config: object, field: str) -> None:
    with pytest.raises(UnsupportedModelError, match=field.replace("(", r"\(")):
        get_adapter(config)


def test_mistral_without_binding_window_is_accepted() -> None:
    get_adapter(MistralConfig(sliding_window=None))
    get_adapter(MistralConfig(sliding_window=4096, max_position_embeddings=4096))


def test_missing_block_tensor_is_named() -> None:
    ref = reference_for("llama-mha-untied")
    adapter = get_adapter(ref.config)
    weights = {
        n: ref.state_dict["model.layers.0." + n] for n in adapter.block_tensor_names(ref.config)
    }
    del weights["mlp.up_proj.weight"]
    with pytest.raises(CheckpointError, match="mlp.up_proj.weight"):
        adapter.build_block(ref.config, weights)


def test_untied_head_without_lm_head_is_refused() -> None:
    config = VARIANTS["llama-mha-untied"]()
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        get_adapter(config).build_head(
            config,
            {"model.embed_tokens.weight": torch.zeros(96, 64), "model.norm.weight": torch.ones(64)},
        )
