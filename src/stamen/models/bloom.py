"""BLOOM blocks: LayerNorm, fused query_key_value attention with ALiBi, tanh-GELU MLP.

ALiBi biases come from `StepContext.key_positions` (positions counted over real tokens), so
left-padded batches give each sequence the scores it would get alone. The checkpoint's fused
`query_key_value` interleaves `(q, k, v)` per head; rows are reordered to `[q | k | v]` once
at build time. The client head applies `word_embeddings_layernorm` after the embedding.
`apply_residual_connection_post_layernorm` is supported; `pretraining_tp` only changes the
order of additions, so it is ignored. This module knows nothing about where weights come from.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from stamen.models.base import (
    AnyCache,
    AnyContext,
    Block,
    BlockAdapter,
    ClientHead,
    KVShape,
    UnsupportedModelError,
)
from stamen.models.common import (
    SelfAttention,
    frozen_layer_norm,
    frozen_linear,
    interleaved_qkv_order,
    lm_head_for,
    require_weights,
    shared_alibi,
)

_LINEARS = (
    "self_attention.query_key_value",
    "self_attention.dense",
    "mlp.dense_h_to_4h",
    "mlp.dense_4h_to_h",
)
_NORMS = ("input_layernorm", "post_attention_layernorm")


def _head_dim(config: Any) -> int:
    return config.hidden_size // config.n_head


class BloomBlock(Block):
    def __init__(self, config: Any, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        w, eps = weights, config.layer_norm_epsilon
        H, D = config.n_head, _head_dim(config)
        order = interleaved_qkv_order(H, H, D)
        self.input_layernorm = frozen_layer_norm(
            w["input_layernorm.weight"], w["input_layernorm.bias"], eps
        )
        self.self_attention = SelfAttention(
            frozen_linear(
                w["self_attention.query_key_value.weight"][order],
                w["self_attention.query_key_value.bias"][order],
            ),
            frozen_linear(w["self_attention.dense.weight"], w["self_attention.dense.bias"]),
            num_heads=H,
            num_kv_heads=H,
            head_dim=D,
            alibi=shared_alibi(H, 1.0),
        )
        self.post_attention_layernorm = frozen_layer_norm(
            w["post_attention_layernorm.weight"], w["post_attention_layernorm.bias"], eps
        )
        self.dense_h_to_4h = frozen_linear(
            w["mlp.dense_h_to_4h.weight"], w["mlp.dense_h_to_4h.bias"]
        )
        self.dense_4h_to_h = frozen_linear(
            w["mlp.dense_4h_to_h.weight"], w["mlp.dense_4h_to_h.bias"]
        )
        self.residual_after_norm = bool(config.apply_residual_connection_post_layernorm)

    def forward(self, hidden: Tensor, cache: AnyCache | None, context: AnyContext) -> Tensor:
        normed = self.input_layernorm(hidden)
        residual = normed if self.residual_after_norm else hidden
        hidden = residual + self.self_attention(normed, cache, context)
        normed = self.post_attention_layernorm(hidden)
        residual = normed if self.residual_after_norm else hidden
        mlp_out = self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(normed), approximate="tanh"))
        return residual + mlp_out


class BloomHead(ClientHead):
    def __init__(self, config: Any, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        eps = config.layer_norm_epsilon
        embedding = weights["transformer.word_embeddings.weight"]
        self.word_embeddings = nn.Embedding.from_pretrained(embedding, freeze=True)
        self.word_embeddings_layernorm = frozen_layer_norm(
            weights["transformer.word_embeddings_layernorm.weight"],
            weights["transformer.word_embeddings_layernorm.bias"],
            eps,
        )
        self.ln_f = frozen_layer_norm(
            weights["transformer.ln_f.weight"], weights["transformer.ln_f.bias"], eps
        )
        self.lm_head = lm_head_for(self.word_embeddings, weights, config.tie_word_embeddings)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.word_embeddings_layernorm(self.word_embeddings(input_ids))

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(hidden))


class BloomAdapter(BlockAdapter):
    model_type = "bloom"

    def check_config(self, config: Any) -> None:
        if config.hidden_size % config.n_head:
            raise UnsupportedModelError("hidden_size must be a multiple of n_head")

    def num_blocks(self, config: Any) -> int:
        return config.n_layer

    def block_prefix(self, index: int) -> str:
        return f"transformer.h.{index}."

    def block_tensor_names(self, config: Any) -> list[str]:
        return [f"{name}.{kind}" for name in (*_LINEARS, *_NORMS) for kind in ("weight", "bias")]

    def head_tensor_names(self, config: Any) -> list[str]:
        names = [
            f"transformer.{module}.{kind}"
            for module in ("word_embeddings_layernorm", "ln_f")
            for kind in ("weight", "bias")
        ]
        names.insert(0, "transformer.word_embeddings.weight")
        return names if config.tie_word_embeddings else [*names, "lm_head.weight"]

    def build_block(self, config: Any, weights: Mapping[str, Tensor]) -> BloomBlock:
        self.check_config(config)
        require_weights(weights, self.block_tensor_names(config), "bloom block")
        return BloomBlock(config, weights)

    def build_head(self, config: Any, weights: Mapping[str, Tensor]) -> BloomHead:
        require_weights(weights, self.head_tensor_names(config), "bloom head")
        return BloomHead(config, weights)

    def kv_shape(self, config: Any) -> KVShape:
        return KVShape(num_kv_heads=config.n_head, head_dim=_head_dim(config))


ADAPTER = BloomAdapter()
