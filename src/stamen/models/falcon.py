"""Falcon blocks: LayerNorm, fused query_key_value attention with rotary or ALiBi positions,
GELU MLP, parallel or sequential residual.

The checkpoint's fused `query_key_value` has a different row layout per variant:

- multi-query (Falcon-7B): `[q heads | k | v]`, one KV head;
- `new_decoder_architecture` (Falcon-40B/180B): per KV group, its query heads then one key
  and one value head (`(H_kv, G + 2, D)`);
- neither: per head `(q, k, v)` interleaved (`(H, 3, D)`).

Rows are reordered once at build time to `[q | k | v]`, so every variant runs the same
attention code and keeps only its real KV heads in the cache. Layer norms: `ln_attn` +
`ln_mlp` (new architecture, two norms), one `input_layernorm` (parallel attention), or
`input_layernorm` + `post_attention_layernorm` (sequential). ALiBi Falcon (`alibi=True`,
no rotary) is supported. This module knows nothing about where weights come from.
"""

from __future__ import annotations

import math
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
    rope_settings,
    shared_alibi,
    shared_rotary,
)

# Falcon's `activation` -> F.gelu's `approximate`
_GELU_APPROXIMATIONS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}


def _head_dim(config: Any) -> int:
    return config.hidden_size // config.num_attention_heads


def _num_kv_heads(config: Any) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def _norm_names(config: Any) -> list[str]:
    """The block's layer norms, in the order attention-side, MLP-side."""
    if not config.parallel_attn:
        return ["input_layernorm", "post_attention_layernorm"]
    if _two_parallel_norms(config):
        return ["ln_attn", "ln_mlp"]
    return ["input_layernorm"]


def _two_parallel_norms(config: Any) -> bool:
    # The reference treats an unset count as 2 for the new architecture.
    count = getattr(config, "num_ln_in_parallel_attn", None)
    return config.new_decoder_architecture and count in (None, 2)


def _qkv_row_order(config: Any) -> Tensor | None:
    H, D = config.num_attention_heads, _head_dim(config)
    if config.new_decoder_architecture:
        return interleaved_qkv_order(H, config.num_kv_heads, D)
    if config.multi_query:
        return None  # already [q | k | v]
    return interleaved_qkv_order(H, H, D)


class FalconBlock(Block):
    def __init__(self, config: Any, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        w, eps = weights, config.layer_norm_epsilon
        H, D = config.num_attention_heads, _head_dim(config)
        qkv_weight, qkv_bias = (
            w["self_attention.query_key_value.weight"],
            w.get("self_attention.query_key_value.bias"),
        )
        order = _qkv_row_order(config)
        if order is not None:
            qkv_weight = qkv_weight[order]
            qkv_bias = None if qkv_bias is None else qkv_bias[order]
        # The reference adds ALiBi to q.k before the 1/sqrt(D) scaling, in bfloat16.
        alibi = shared_alibi(H, 1 / math.sqrt(D), bfloat16_slopes=True) if config.alibi else None
        self.self_attention = SelfAttention(
            frozen_linear(qkv_weight, qkv_bias),
            frozen_linear(w["self_attention.dense.weight"], w.get("self_attention.dense.bias")),
            num_heads=H,
            num_kv_heads=_num_kv_heads(config),
            head_dim=D,
            rotary=None if config.alibi else shared_rotary(D, config),
            alibi=alibi,
        )
        # [attention-side, MLP-side], or one norm feeding both
        self.norms = nn.ModuleList(
            frozen_layer_norm(w[f"{n}.weight"], w[f"{n}.bias"], eps) for n in _norm_names(config)
        )
        self.parallel = bool(config.parallel_attn)
        self.dense_h_to_4h = frozen_linear(
            w["mlp.dense_h_to_4h.weight"], w.get("mlp.dense_h_to_4h.bias")
        )
        self.dense_4h_to_h = frozen_linear(
            w["mlp.dense_4h_to_h.weight"], w.get("mlp.dense_4h_to_h.bias")
        )
        self.gelu_approximate = _GELU_APPROXIMATIONS[config.activation]

    def mlp(self, x: Tensor) -> Tensor:
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x), approximate=self.gelu_approximate))

    def forward(self, hidden: Tensor, cache: AnyCache | None, context: AnyContext) -> Tensor:
        attn_in = self.norms[0](hidden)
        attn_out = self.self_attention(attn_in, cache, context)
        if not self.parallel:
            hidden = hidden + attn_out
            return hidden + self.mlp(self.norms[1](hidden))
        mlp_in = attn_in if len(self.norms) == 1 else self.norms[1](hidden)
        return hidden + attn_out + self.mlp(mlp_in)


class FalconHead(ClientHead):
    def __init__(self, config: Any, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        embedding = weights["transformer.word_embeddings.weight"]
        self.word_embeddings = nn.Embedding.from_pretrained(embedding, freeze=True)
        self.ln_f = frozen_layer_norm(
            weights["transformer.ln_f.weight"],
            weights["transformer.ln_f.bias"],
            config.layer_norm_epsilon,
        )
        self.lm_head = lm_head_for(self.word_embeddings, weights, config.tie_word_embeddings)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.word_embeddings(input_ids)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(hidden))


class FalconAdapter(BlockAdapter):
    model_type = "falcon"

    def check_config(self, config: Any) -> None:
        if config.activation not in _GELU_APPROXIMATIONS:
            raise UnsupportedModelError(
                f"activation {config.activation!r} is not supported; supported: "
                + ", ".join(sorted(_GELU_APPROXIMATIONS))
            )
        if config.hidden_size % config.num_attention_heads:
            raise UnsupportedModelError("hidden_size must be a multiple of num_attention_heads")
        if config.new_decoder_architecture:
            if not config.parallel_attn:
                raise UnsupportedModelError(
                    "new_decoder_architecture with parallel_attn=False is not supported"
                )
            if config.num_attention_heads % config.num_kv_heads:
                raise UnsupportedModelError(
                    "num_attention_heads must be a multiple of num_kv_heads"
                )
        else:
            if getattr(config, "num_ln_in_parallel_attn", None) == 2:
                raise UnsupportedModelError(
                    "num_ln_in_parallel_attn=2 needs new_decoder_architecture=True"
                )
            if not config.multi_query and config.num_kv_heads != config.num_attention_heads:
                raise UnsupportedModelError(
                    "num_kv_heads != num_attention_heads needs new_decoder_architecture=True"
                )
        if not config.alibi:
            rope_settings(config)

    def num_blocks(self, config: Any) -> int:
        return config.num_hidden_layers

    def block_prefix(self, index: int) -> str:
        return f"transformer.h.{index}."

    def block_tensor_names(self, config: Any) -> list[str]:
        linears = [
            "self_attention.query_key_value",
            "self_attention.dense",
            "mlp.dense_h_to_4h",
            "mlp.dense_4h_to_h",
        ]
        names = [f"{n}.weight" for n in linears]
        if config.bias:
            names += [f"{n}.bias" for n in linears]
        for norm in _norm_names(config):
            names += [f"{norm}.weight", f"{norm}.bias"]
        return names

    def head_tensor_names(self, config: Any) -> list[str]:
        names = [
            "transformer.word_embeddings.weight",
            "transformer.ln_f.weight",
            "transformer.ln_f.bias",
        ]
        return names if config.tie_word_embeddings else [*names, "lm_head.weight"]

    def build_block(self, config: Any, weights: Mapping[str, Tensor]) -> FalconBlock:
        self.check_config(config)
        require_weights(weights, self.block_tensor_names(config), "falcon block")
        return FalconBlock(config, weights)

    def build_head(self, config: Any, weights: Mapping[str, Tensor]) -> FalconHead:
        require_weights(weights, self.head_tensor_names(config), "falcon head")
        return FalconHead(config, weights)

    def kv_shape(self, config: Any) -> KVShape:
        return KVShape(num_kv_heads=_num_kv_heads(config), head_dim=_head_dim(config))


ADAPTER = FalconAdapter()
