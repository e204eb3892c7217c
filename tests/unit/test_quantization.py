"""Quantizing built blocks: what changes (the linear layers, the bytes) and by how much the
output moves against float32 on a tiny random Llama.

Measured here (bitsandbytes 0.50.2, CPU, 3 blocks, hidden 128, GQA 4/2, seed 5): relative L2
error of the logits vs float32 is 0.0136 for int8 (max abs 0.053 on logits up to 4.0) and 0.187
for nf4 (max abs 0.83); one block's update (output minus input) moves by 0.012 (int8) and
0.169 (nf4). A block keeps 0.253 (int8) and 0.129 (nf4) of its float32 bytes. The bounds
below leave about 2x.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from stamen.conformance.adapters import LocalChain, Reference, _llama
from stamen.models.base import StepContext
from stamen.models.quantization import QuantizationError, quantize_block, quantized_nbytes

# bitsandbytes' own modules still use torch.jit.script_method
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

# mode -> (bound on relative logits error, bound on bytes relative to float32)
BOUNDS = {"int8": (0.03, 0.30), "nf4": (0.35, 0.15)}


@pytest.fixture(scope="module")
def reference() -> Reference:
    config = _llama(
        hidden_size=128, intermediate_size=256, num_key_value_heads=2, attention_bias=True
    )
    return Reference.build(config, seed=5)


def _logits(chain: LocalChain, ids: torch.Tensor) -> torch.Tensor:
    context = StepContext.make(0, ids.shape[1], batch_size=ids.shape[0])
    with torch.no_grad():
        return chain.head.logits(chain.run(chain.head.embed(ids), context, use_cache=False))


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_model_stays_close_to_float32(reference: Reference, mode: str) -> None:
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    full = LocalChain.build(reference)
    quantized = LocalChain.build(reference)
    fp32_bytes = quantized_nbytes(quantized.blocks[0])
    for block in quantized.blocks:
        quantize_block(block, mode)
    error = _relative_error(_logits(quantized, ids), _logits(full, ids))
    error_bound, bytes_bound = BOUNDS[mode]
    assert 0 < error <= error_bound, f"{mode}: relative logits error {error:.4f}"
    assert quantized_nbytes(quantized.blocks[0]) <= bytes_bound * fp32_bytes
    assert not any(type(m) is nn.Linear for block in quantized.blocks for m in block.modules())


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_block_decodes_with_cache(reference: Reference, mode: str) -> None:
    chain = LocalChain.build(reference, range(1))
    quantize_block(chain.blocks[0], mode)
    chain.open(batch_size=1, max_length=6)
    ids = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(1))
    prefill = chain.run(chain.head.embed(ids[:, :5]), StepContext.make(0, 5))
    step = chain.run(chain.head.embed(ids[:, 5:]), StepContext.make(5, 1))
    assert prefill.shape == (1, 5, 128) and step.shape == (1, 1, 128)
    assert torch.isfinite(step).all()
    assert chain.caches[0].key[:, :, :6].abs().sum(-1).gt(0).all()


def test_none_leaves_the_block_alone(reference: Reference) -> None:
    block = LocalChain.build(reference, range(1)).blocks[0]
    before = {name: type(m) for name, m in block.named_modules()}
    assert quantize_block(block, "none") is block
    assert {name: type(m) for name, m in block.named_modules()} == before


def test_unknown_mode_is_refused(reference: Reference) -> None:
    block = LocalChain.build(reference, range(1)).blocks[0]
    with pytest.raises(
        QuantizationError, match="'int4' is not supported; supported: none, int8, nf4"
    ):
        quantize_block(block, "int4")
