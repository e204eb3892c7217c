"""Weight quantization as a module-to-module transform on a built block.

`quantize_block(block, mode)` swaps every `nn.Linear` inside a block for its bitsandbytes
counterpart (`Linear8bitLt` for "int8", `Linear4bit` with NF4 for "nf4") on the device the
weights already live on; norms, embeddings and the KV cache stay as they are. Blocks never
know whether they were quantized: the calling convention is unchanged. bitsandbytes is
imported only when a quantized mode is asked for (it runs on CPU as well as CUDA).

This module knows nothing about architectures, checkpoints or hosts.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from torch import nn

from stamen.models.base import Block, ModelError

QuantizationMode = Literal["none", "int8", "nf4"]
QUANTIZATION_MODES: tuple[str, ...] = get_args(QuantizationMode)
# LLM.int8() keeps input columns with outliers above this magnitude in 16/32-bit.
INT8_OUTLIER_THRESHOLD = 6.0


class QuantizationError(ModelError, ValueError):
    """Unknown quantization mode, or a block that cannot be quantized."""


def quantize_block(block: Block, mode: str) -> Block:
    """Replace the block's linear layers in place for `mode` and return the block."""
    if mode not in QUANTIZATION_MODES:
        raise QuantizationError(
            f"quantization {mode!r} is not supported; supported: {', '.join(QUANTIZATION_MODES)}"
        )
    if mode == "none":
        return block
    import bitsandbytes as bnb

    convert = _to_int8 if mode == "int8" else _to_nf4
    for parent in list(block.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, convert(bnb, child))
    return block


def _frozen_bias(linear: nn.Linear) -> nn.Parameter | None:
    if linear.bias is None:
        return None
    return nn.Parameter(linear.bias.detach().clone(), requires_grad=False)


def _to_int8(bnb: Any, linear: nn.Linear) -> nn.Module:
    weight = linear.weight.detach()
    quantized = bnb.nn.Linear8bitLt(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        has_fp16_weights=False,
        threshold=INT8_OUTLIER_THRESHOLD,
        device="meta",
    )
    # Int8Params quantizes row-wise when moved to its device.
    quantized.weight = bnb.nn.Int8Params(
        weight.cpu().clone(), requires_grad=False, has_fp16_weights=False
    )
    quantized.bias = _frozen_bias(linear)
    return quantized.to(weight.device)


def _to_nf4(bnb: Any, linear: nn.Linear) -> nn.Module:
    weight = linear.weight.detach()
    quantized = bnb.nn.Linear4bit(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        compute_dtype=weight.dtype,
        quant_type="nf4",
        device="meta",
    )
    # Params4bit quantizes blockwise (64 values per absmax) when moved to its device.
    quantized.weight = bnb.nn.Params4bit(
        weight.cpu().clone(), requires_grad=False, quant_type="nf4"
    )
    quantized.bias = _frozen_bias(linear)
    return quantized.to(weight.device)


def quantized_nbytes(block: nn.Module) -> int:
    """Bytes held by the block's parameters and buffers after any quantization."""
    tensors = [*block.parameters(), *block.buffers()]
    return sum(t.nelement() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))
