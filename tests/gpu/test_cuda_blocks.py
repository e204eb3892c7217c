"""CUDA paths: our blocks, spans and quantization on a GPU against the CPU float32
reference. Marked `gpu` (skipped by the default run; `make test-gpu` runs them)."""

from __future__ import annotations

import pytest
import torch

from stamen.conformance.adapters import LocalChain, reference_for
from stamen.models.base import StepContext
from stamen.models.chain import SpanCache, run_span
from stamen.models.quantization import quantize_block
from stamen.models.registry import get_adapter

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

VARIANTS = ["llama-gqa-tied-bias", "falcon-40b-new-arch", "bloom"]


def _ids(length: int = 24) -> torch.Tensor:
    return torch.randint(0, 96, (2, length), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-3), (torch.bfloat16, 0.15)])
def test_blocks_on_cuda_match_cpu_reference(variant, dtype, tolerance):
    ref = reference_for(variant)
    ids = _ids()
    expected = ref.logits(ids)
    ours = LocalChain.build(ref)
    head = ours.head.to("cuda", dtype)
    blocks = [block.to("cuda", dtype) for block in ours.blocks]
    with torch.no_grad():
        hidden = head.embed(ids.cuda())
        context = StepContext.make(0, ids.shape[1], batch_size=2, device="cuda")
        for block in blocks:
            hidden = block(hidden, None, context)
        logits = head.logits(hidden).float().cpu()
    scale = expected.abs().max().item()
    assert (logits - expected).abs().max().item() <= tolerance * max(scale, 1.0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_decode_on_cuda_equals_stateless_forward(variant):
    ref = reference_for(variant)
    ours = LocalChain.build(ref)
    head = ours.head.to("cuda")
    blocks = [block.to("cuda") for block in ours.blocks]
    ids = _ids(16).cuda()
    with torch.no_grad():
        full = head.embed(ids)
        context = StepContext.make(0, 16, batch_size=2, device="cuda")
        for block in blocks:
            full = block(full, None, context)
        cache = SpanCache.empty(
            get_adapter(ref.config),
            ref.config,
            len(blocks),
            2,
            32,
            dtype=torch.float32,
            device="cuda",
        )
        stepped = [run_span(blocks, cache, head.embed(ids[:, :12]), 0)]
        for position in range(12, 16):
            stepped.append(
                run_span(blocks, cache, head.embed(ids[:, position : position + 1]), position)
            )
    assert torch.allclose(torch.cat(stepped, dim=1), full, atol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_quantized_llama_on_cuda_stays_close(mode):
    pytest.importorskip("bitsandbytes")
    ref = reference_for("llama-gqa-tied-bias")
    ids = _ids()
    expected = ref.logits(ids)
    ours = LocalChain.build(ref)
    head = ours.head.to("cuda")
    blocks = [quantize_block(block.to("cuda"), mode) for block in ours.blocks]
    with torch.no_grad():
        hidden = head.embed(ids.cuda())
        context = StepContext.make(0, ids.shape[1], batch_size=2, device="cuda")
        for block in blocks:
            hidden = block(hidden, None, context)
        logits = head.logits(hidden).float().cpu()
    relative = ((logits - expected).norm() / expected.norm()).item()
    assert relative < {"int8": 0.03, "nf4": 0.35}[mode]
