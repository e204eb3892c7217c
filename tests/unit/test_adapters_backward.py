"""Gradients through our blocks (fine-tuning runs backward through remote spans)."""

from __future__ import annotations

import pytest
import torch

from stamen.conformance.adapters import LocalChain, reference_for
from stamen.models.base import StepContext


@pytest.mark.parametrize("variant", ["llama-gqa-tied-bias", "falcon-40b-new-arch", "bloom"])
def test_input_gradient_matches_finite_differences(variant: str) -> None:
    block = LocalChain.build(reference_for(variant), range(1)).blocks[0].double()
    context = StepContext.make(0, 3)
    hidden = torch.randn(1, 3, 64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: block(x, None, context), (hidden,), eps=1e-6, atol=1e-5
    )


def test_gradient_reaches_the_input_through_a_padded_batch() -> None:
    chain = LocalChain.build(reference_for("llama-mha-untied"))
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    context = StepContext.make(0, 4, batch_size=2, key_padding_mask=valid)
    hidden = torch.randn(2, 4, 64, requires_grad=True)
    out = hidden
    for block in chain.blocks:
        out = block(out, None, context)
    out[valid].sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    # padding never feeds real tokens, so it gets no gradient from them
    assert hidden.grad[0, :2].abs().max() == 0
    assert hidden.grad[valid].abs().min() > 0
