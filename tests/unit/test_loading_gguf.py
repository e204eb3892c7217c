"""GGUF loading of the bundled SmolLM2-135M-Instruct against transformers' own GGUF loader.

Both dequantize the same blocks, so tensors must match exactly; the reference model is
loaded once per session (about 20 s) and shared.
"""

from __future__ import annotations

import pytest
import torch

from stamen.models.base import StepContext
from stamen.models.gguf_checkpoint import GGUFCheckpoint, unpermute_rotary_rows
from stamen.models.loading import load_span, load_tokenizer

# fields transformers adds while loading weights, not part of the model's shape
_LOAD_ONLY_FIELDS = {"_name_or_path", "_model_name_or_path", "dtype", "quantization_config"}


@pytest.fixture(scope="session")
def reference(smollm2_reference):
    return smollm2_reference


@pytest.fixture(scope="module")
def checkpoint(smollm2_gguf) -> GGUFCheckpoint:
    return GGUFCheckpoint(smollm2_gguf)


def test_config_matches_transformers(checkpoint, reference):
    ours = {k: v for k, v in checkpoint.config().to_dict().items() if k not in _LOAD_ONLY_FIELDS}
    theirs = {k: v for k, v in reference.config.to_dict().items() if k not in _LOAD_ONLY_FIELDS}
    assert ours == theirs
    assert (ours["num_hidden_layers"], ours["hidden_size"], ours["tie_word_embeddings"]) == (
        30,
        576,
        True,
    )


def test_span_and_head_tensors_equal_transformers(checkpoint, reference):
    expected = reference.state_dict()
    names = [n for n in expected if n.startswith(("model.layers.0.", "model.layers.29."))]
    names += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    assert any("q_proj" in n for n in names) and any("k_proj" in n for n in names)
    tensors = checkpoint.read(names, dtype=torch.float32)
    for name in names:
        torch.testing.assert_close(tensors[name], expected[name], rtol=0, atol=1e-6, msg=name)
    # no output.weight in the file: the LM head is the token embedding
    assert torch.equal(tensors["lm_head.weight"], tensors["model.embed_tokens.weight"])


def test_unpermute_inverts_the_converters_rotary_permutation():
    # llama.cpp's converter: each head's rows viewed as (2, D/2), swapped to (D/2, 2)
    num_heads, head_dim, columns = 3, 8, 5
    weight = torch.randn(num_heads * head_dim, columns)
    permuted = weight.reshape(num_heads, 2, head_dim // 2, columns).transpose(1, 2)
    permuted = permuted.reshape(weight.shape)
    assert not torch.equal(permuted, weight)
    assert torch.equal(unpermute_rotary_rows(permuted, num_heads), weight)


def test_loaded_span_reproduces_transformers_hidden_states(smollm2_gguf, reference):
    span = load_span(smollm2_gguf, 26, 28)
    assert (span.start, span.end, len(span.blocks)) == (26, 28, 2)
    input_ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253]])  # (B, T)
    context = StepContext.make(0, input_ids.shape[1])
    with torch.no_grad():
        states = reference(input_ids, output_hidden_states=True).hidden_states
        hidden = states[26]  # (B, T, C): the input of block 26
        for block in span.blocks:
            hidden = block(hidden, None, context)
    torch.testing.assert_close(hidden, states[28], rtol=1e-4, atol=1e-4)


def test_head_built_from_gguf_tensors_matches_transformers(checkpoint, reference):
    from stamen.models.registry import get_adapter

    config = checkpoint.config()
    adapter = get_adapter(config)
    head = adapter.build_head(
        config, checkpoint.read(adapter.head_tensor_names(config), dtype=torch.float32)
    )
    input_ids = torch.tensor([[1, 504, 3458]])  # (B, T)
    hidden = torch.randn(1, 3, 576)  # (B, T, C)
    with torch.no_grad():
        torch.testing.assert_close(head.embed(input_ids), reference.model.embed_tokens(input_ids))
        expected = reference.lm_head(reference.model.norm(hidden))  # (B, T, V)
        torch.testing.assert_close(head.logits(hidden), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_tokenizer_from_gguf_has_chat_template(smollm2_gguf):
    tokenizer = load_tokenizer(smollm2_gguf)
    ids = tokenizer("Hello world").input_ids
    assert tokenizer.decode(ids) == "Hello world"
    assert tokenizer.chat_template
