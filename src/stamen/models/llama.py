"""Llama-family blocks (also Mistral and Qwen2 checkpoints): pre-norm RMSNorm, rotary
attention with grouped KV heads, SwiGLU MLP.

Checkpoint names are Hugging Face's (`model.layers.{i}.self_attn.q_proj.weight`, ...). At
build time q/k/v are fused into one linear and gate/up into another, so a step runs two
matmuls where the checkpoint has five. Supported: MHA and GQA, explicit `head_dim`, rope
types default/linear/llama3, `attention_bias` / `mlp_bias` (Qwen2: q/k/v biases), tied or
untied embeddings. Refused with `UnsupportedModelError`: sliding-window attention that can
bind, activations other than SiLU, other rope types.

This module knows nothing about where weights come from or how blocks are scheduled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
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
    RMSNorm,
    SelfAttention,
    frozen_linear,
    lm_head_for,
    require_weights,
    rope_settings,
    shared_rotary,
)

_PROJECTIONS = ("q_proj", "k_proj", "v_proj")


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _num_kv_heads(config: Any) -> int:
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads


def _qkv_bias(config: Any) -> bool:
    # Qwen2 always has q/k/v biases (and none on o_proj); Llama and Mistral say so per config.
    return config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))


def _out_bias(config: Any) -> bool:
    return config.model_type != "qwen2" and bool(getattr(config, "attention_bias", False))


class LlamaBlock(Block):
    def __init__(self, config: Any, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        w = weights
        eps = config.rms_norm_eps
        head_dim = _head_dim(config)
        attn = "self_attn."
        qkv_weight = torch.cat([w[f"{attn}{p}.weight"] for p in _PROJECTIONS])
        qkv_bias = (
            torch.cat([w[f"{attn}{p}.bias"] for p in _PROJECTIONS]) if _qkv_bias(config) else None
        )
        self.input_layernorm = RMSNorm(w["input_layernorm.weight"], eps)
        self.self_attn = SelfAttention(
            frozen_linear(qkv_weight, qkv_bias),
            frozen_linear(w[f"{attn}o_proj.weight"], w.get(f"{attn}o_proj.bias")),
            num_heads=config.num_attention_heads,
            num_kv_heads=_num_kv_heads(config),
            head_dim=head_dim,
            rotary=shared_rotary(head_dim, config),
        )
        self.post_attention_layernorm = RMSNorm(w["post_attention_layernorm.weight"], eps)
        mlp_bias = bool(getattr(config, "mlp_bias", False))
        gate_up_weight = torch.cat([w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"]])
        gate_up_bias = (
            torch.cat([w["mlp.gate_proj.bias"], w["mlp.up_proj.bias"]]) if mlp_bias else None
        )
        self.gate_up_proj = frozen_linear(gate_up_weight, gate_up_bias)
        self.down_proj = frozen_linear(w["mlp.down_proj.weight"], w.get("mlp.down_proj.bias"))

    def forward(self, hidden: Tensor, cache: AnyCache | None, context: AnyContext) -> Tensor:
        hidden = hidden + self.self_attn(self.input_layernorm(hidden), cache, context)
        gate, up = self.gate_up_proj(self.post_attention_layernorm(hidden)).chunk(2, dim=-1)
        return hidden + self.down_proj(F.silu(gate) * up)


class LlamaHead(ClientHead):
    def __init__(self, config: Any, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        embedding = weights["model.embed_tokens.weight"]
        self.embed_tokens = nn.Embedding.from_pretrained(embedding, freeze=True)
        self.norm = RMSNorm(weights["model.norm.weight"], config.rms_norm_eps)
        self.lm_head = lm_head_for(self.embed_tokens, weights, config.tie_word_embeddings)

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(self.norm(hidden))


class LlamaAdapter(BlockAdapter):
    model_type = "llama"

    def check_config(self, config: Any) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r} is not supported (only 'silu')")
        window = getattr(config, "sliding_window", None)
        uses_window = getattr(config, "use_sliding_window", config.model_type == "mistral")
        max_positions = getattr(config, "max_position_embeddings", None)
        if window is not None and uses_window and (max_positions is None or window < max_positions):
            raise UnsupportedModelError(
                f"sliding_window={window} (< max_position_embeddings={max_positions}) is not supported"
            )
        layer_types = getattr(config, "layer_types", None) or []
        if any(kind != "full_attention" for kind in layer_types):
            raise UnsupportedModelError(f"layer_types {sorted(set(layer_types))} is not supported")
        if config.num_attention_heads % _num_kv_heads(config):
            raise UnsupportedModelError(
                "num_attention_heads must be a multiple of num_key_value_heads"
            )
        rope_settings(config)

    def num_blocks(self, config: Any) -> int:
        return config.num_hidden_layers

    def block_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    def block_tensor_names(self, config: Any) -> list[str]:
        names = ["input_layernorm.weight", "post_attention_layernorm.weight"]
        names += [f"self_attn.{p}.weight" for p in (*_PROJECTIONS, "o_proj")]
        if _qkv_bias(config):
            names += [f"self_attn.{p}.bias" for p in _PROJECTIONS]
        if _out_bias(config):
            names.append("self_attn.o_proj.bias")
        mlp = ("gate_proj", "up_proj", "down_proj")
        names += [f"mlp.{p}.weight" for p in mlp]
        if getattr(config, "mlp_bias", False):
            names += [f"mlp.{p}.bias" for p in mlp]
        return names

    def head_tensor_names(self, config: Any) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        return names if config.tie_word_embeddings else [*names, "lm_head.weight"]

    def build_block(self, config: Any, weights: Mapping[str, Tensor]) -> LlamaBlock:
        self.check_config(config)
        require_weights(weights, self.block_tensor_names(config), f"{config.model_type} block")
        return LlamaBlock(config, weights)

    def build_head(self, config: Any, weights: Mapping[str, Tensor]) -> LlamaHead:
        require_weights(weights, self.head_tensor_names(config), f"{config.model_type} head")
        return LlamaHead(config, weights)

    def kv_shape(self, config: Any) -> KVShape:
        return KVShape(num_kv_heads=_num_kv_heads(config), head_dim=_head_dim(config))


ADAPTER = LlamaAdapter()
