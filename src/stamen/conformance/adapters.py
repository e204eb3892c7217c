"""Block adapter conformance: our blocks against transformers' own models as the reference.

For a tiny random config, `Reference.build` makes the transformers model with a fixed seed
(every parameter re-drawn so that biases and norm weights are not trivially 0 or 1), and each
check splits its state dict into blocks and head the way a host and a client would, builds
ours through the registry and returns the largest absolute difference it measured:

1. `check_reference`: hidden states after every block and the final logits;
2. `check_incremental`: prefill, a chunk at offset > 0, then single-token decode steps ==
   one stateless forward == the reference's logits;
3. `check_left_padding`: a left-padded batch == each sequence run alone;
4. `check_spans`: the model cut into spans, each built from its own tensors only and
   chained, == the reference.

Everything runs in float32 on CPU; `TOLERANCE` is the bound the test suite holds us to.
`python -m stamen.conformance.adapters` prints the table for every variant in `VARIANTS`.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from stamen.models.base import Block, ClientHead, KVCache, StepContext
from stamen.models.registry import get_adapter

TOLERANCE = 1e-4
VOCAB_SIZE = 96


def _llama(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    base = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
    )
    return LlamaConfig(**{**base, **overrides})


def _falcon(**overrides: Any) -> Any:
    from transformers import FalconConfig

    base = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        ffn_hidden_size=128,
        max_position_embeddings=256,
    )
    return FalconConfig(**{**base, **overrides})


def _bloom(**overrides: Any) -> Any:
    from transformers import BloomConfig

    base = dict(vocab_size=VOCAB_SIZE, hidden_size=64, n_layer=3, n_head=4)
    return BloomConfig(**{**base, **overrides})


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        sliding_window=None,
    )


def _qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )


_LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=10000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=32,
)

# name -> tiny random config of one supported variant
VARIANTS: dict[str, Callable[[], Any]] = {
    "llama-mha-untied": lambda: _llama(tie_word_embeddings=False),
    "llama-gqa-tied-bias": lambda: _llama(
        num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True, mlp_bias=True
    ),
    "llama-mqa-head_dim": lambda: _llama(num_key_value_heads=1, head_dim=32),
    "llama-rope-llama3": lambda: _llama(num_key_value_heads=2, rope_parameters=_LLAMA3_ROPE),
    "llama-rope-linear": lambda: _llama(
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0)
    ),
    "mistral-gqa": _mistral,
    "qwen2-gqa": _qwen2,
    "falcon-7b-multi-query": lambda: _falcon(multi_query=True, parallel_attn=True),
    "falcon-40b-new-arch": lambda: _falcon(
        new_decoder_architecture=True, num_attention_heads=8, num_kv_heads=2
    ),
    "falcon-new-arch-one-norm": lambda: _falcon(
        new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1, bias=True
    ),
    "falcon-sequential-mha": lambda: _falcon(multi_query=False, parallel_attn=False, bias=True),
    "falcon-alibi": lambda: _falcon(alibi=True, multi_query=False, parallel_attn=False, bias=True),
    "falcon-alibi-multi-query": lambda: _falcon(alibi=True, multi_query=True, bias=True),
    "bloom": lambda: _bloom(),
    "bloom-6-heads-untied": lambda: _bloom(hidden_size=96, n_head=6, tie_word_embeddings=False),
    "bloom-residual-post-ln": lambda: _bloom(apply_residual_connection_post_layernorm=True),
}


# ----------------------------------------------------------------------------------------
# Building both sides


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Re-draw every parameter: norm weights near 1, biases and matrices of unit-ish scale."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 2:
                param.copy_(noise / param.shape[1] ** 0.5 if "embed" not in name else noise)
            elif name.endswith("weight"):
                param.copy_(1 + 0.2 * noise)
            else:
                param.copy_(0.2 * noise)


def _reference_attention(config: Any) -> str:
    # transformers' eager Falcon path adds ALiBi twice (into the scores and again through the
    # mask it folded ALiBi into); its SDPA path adds it once, as Falcon-RW was trained.
    if config.model_type == "falcon" and config.alibi:
        return "sdpa"
    return "eager"


@dataclass
class Reference:
    """A transformers model with random weights and the checkpoint it would be saved as."""

    config: Any
    model: Any
    state_dict: dict[str, Tensor]

    @classmethod
    def build(cls, config: Any, seed: int = 0) -> Reference:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            config, attn_implementation=_reference_attention(config), dtype=torch.float32
        )
        _randomize(model, seed)
        model.eval()
        return cls(config, model, {k: v.detach().clone() for k, v in model.state_dict().items()})

    @property
    def num_blocks(self) -> int:
        return get_adapter(self.config).num_blocks(self.config)

    def logits(self, input_ids: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(input_ids).logits

    def block_outputs(self, input_ids: Tensor) -> list[Tensor]:
        """Output hidden states of every block, captured with forward hooks."""
        adapter = get_adapter(self.config)
        outputs: list[Tensor] = []

        def capture(_module: Any, _args: Any, output: Any) -> None:
            outputs.append(output[0] if isinstance(output, tuple) else output)

        hooks = [
            self.model.get_submodule(adapter.block_prefix(i).rstrip(".")).register_forward_hook(
                capture
            )
            for i in range(self.num_blocks)
        ]
        try:
            self.logits(input_ids)
        finally:
            for hook in hooks:
                hook.remove()
        return outputs


class LocalChain:
    """Our head and a list of blocks (one span or the whole model) with their caches."""

    def __init__(self, head: ClientHead, blocks: Sequence[Block], config: Any) -> None:
        self.head, self.blocks, self.config = head, list(blocks), config
        self.caches: list[KVCache] = []

    @classmethod
    def build(cls, ref: Reference, block_range: range | None = None) -> LocalChain:
        """Build from only the tensors of `block_range` (all blocks by default) and the head."""
        config, state = ref.config, ref.state_dict
        adapter = get_adapter(config)
        blocks = []
        for index in block_range if block_range is not None else range(ref.num_blocks):
            prefix = adapter.block_prefix(index)
            names = adapter.block_tensor_names(config)
            blocks.append(adapter.build_block(config, {n: state[prefix + n] for n in names}))
        head = adapter.build_head(config, {n: state[n] for n in adapter.head_tensor_names(config)})
        return cls(head, blocks, config)

    def open(self, batch_size: int, max_length: int) -> None:
        adapter = get_adapter(self.config)
        self.caches = [
            adapter.empty_cache(self.config, batch_size, max_length, dtype=torch.float32)
            for _ in self.blocks
        ]

    def run(self, hidden: Tensor, context: StepContext, *, use_cache: bool = True) -> Tensor:
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                hidden = block(hidden, self.caches[i] if use_cache else None, context)
        return hidden


def _ids(batch_size: int, length: int, seed: int) -> Tensor:
    return torch.randint(
        0, VOCAB_SIZE, (batch_size, length), generator=torch.Generator().manual_seed(seed)
    )


def _max_diff(a: Tensor, b: Tensor) -> float:
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------
# Checks: each returns the largest absolute difference it measured


def check_reference(ref: Reference, length: int = 9) -> float:
    """Hidden states after each block and the logits, prefill into a cache, batch of 2."""
    ids = _ids(2, length, seed=1)
    expected_blocks, expected_logits = ref.block_outputs(ids), ref.logits(ids)
    ours = LocalChain.build(ref)
    ours.open(2, length)
    context = StepContext.make(0, length, batch_size=2)
    hidden, worst = ours.head.embed(ids), 0.0
    with torch.no_grad():
        for block, cache, expected in zip(ours.blocks, ours.caches, expected_blocks, strict=True):
            hidden = block(hidden, cache, context)
            worst = max(worst, _max_diff(hidden, expected))
        return max(worst, _max_diff(ours.head.logits(hidden), expected_logits))


def check_incremental(
    ref: Reference, prompt_length: int = 6, chunk_length: int = 3, decode_steps: int = 4
) -> float:
    """Prefill, one chunk at offset > 0, then single-token steps, against a stateless forward
    of the whole sequence and against the reference."""
    total = prompt_length + chunk_length + decode_steps
    ids = _ids(1, total, seed=2)
    ours = LocalChain.build(ref)
    with torch.no_grad():
        stateless = ours.head.logits(
            ours.run(ours.head.embed(ids), StepContext.make(0, total), use_cache=False)
        )
        ours.open(1, total + 2)  # a cache longer than the sequence, as hosts allocate
        pieces, offset = [], 0
        for length in [prompt_length, chunk_length] + [1] * decode_steps:
            context = StepContext.make(offset, length)
            hidden = ours.run(ours.head.embed(ids[:, offset : offset + length]), context)
            pieces.append(ours.head.logits(hidden))
            offset += length
        stepped = torch.cat(pieces, dim=1)
    return max(_max_diff(stepped, stateless), _max_diff(stepped, ref.logits(ids)))


def check_left_padding(
    ref: Reference, lengths: Sequence[int] = (7, 4, 1), decode_steps: int = 3
) -> float:
    """A left-padded batch (prefill, a 2-token chunk, then single-token steps) against each
    sequence run alone; only real tokens' logits are compared."""
    longest, B = max(lengths), len(lengths)
    new_tokens = 2 + decode_steps
    ids = _ids(B, longest + new_tokens, seed=3)
    valid = torch.zeros(B, longest + new_tokens, dtype=torch.bool)
    for b, length in enumerate(lengths):
        valid[b, longest - length :] = True
    ours = LocalChain.build(ref)
    ours.open(B, longest + new_tokens)
    batched, offset = [], 0
    with torch.no_grad():
        for length in [longest, 2] + [1] * decode_steps:
            end = offset + length
            context = StepContext.make(
                offset, length, batch_size=B, key_padding_mask=valid[:, :end]
            )
            hidden = ours.run(ours.head.embed(ids[:, offset:end]), context)
            batched.append(ours.head.logits(hidden))
            offset = end
        padded_logits = torch.cat(batched, dim=1)  # (B, longest + new_tokens, V)
        worst = 0.0
        for b, length in enumerate(lengths):
            alone_ids = ids[b : b + 1, longest - length :]
            alone = ours.head.logits(
                ours.run(
                    ours.head.embed(alone_ids),
                    StepContext.make(0, alone_ids.shape[1]),
                    use_cache=False,
                )
            )
            real = padded_logits[b : b + 1, longest - length :]
            if not torch.isfinite(padded_logits[b]).all():
                return float("inf")
            worst = max(worst, _max_diff(real, alone))
    return worst


def check_spans(
    ref: Reference, num_spans: int = 3, prompt_length: int = 5, decode_steps: int = 3
) -> float:
    """The model cut into `num_spans` spans, each built from its own tensors, chained through
    prefill and decode steps, against the reference's logits."""
    total = prompt_length + decode_steps
    ids = _ids(1, total, seed=4)
    bounds = torch.linspace(0, ref.num_blocks, num_spans + 1).round().long().tolist()
    spans = [
        LocalChain.build(ref, range(lo, hi)) for lo, hi in zip(bounds, bounds[1:], strict=False)
    ]
    for span in spans:
        span.open(1, total)
    head = spans[0].head
    pieces, offset = [], 0
    with torch.no_grad():
        for length in [prompt_length] + [1] * decode_steps:
            context = StepContext.make(offset, length)
            hidden = head.embed(ids[:, offset : offset + length])
            for span in spans:
                hidden = span.run(hidden, context)
            pieces.append(head.logits(hidden))
            offset += length
    return _max_diff(torch.cat(pieces, dim=1), ref.logits(ids))


CHECKS: dict[str, Callable[[Reference], float]] = {
    "reference": check_reference,
    "incremental": check_incremental,
    "left_padding": check_left_padding,
    "spans": check_spans,
}


@dataclass(frozen=True)
class Result:
    variant: str
    check: str
    max_abs_diff: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= TOLERANCE


@functools.lru_cache(maxsize=4)
def reference_for(variant: str, seed: int = 0) -> Reference:
    """The reference of a named variant, built once per process (checks never modify it)."""
    return Reference.build(VARIANTS[variant](), seed)


def variants_of(model_type: str) -> list[str]:
    return [name for name in VARIANTS if VARIANTS[name]().model_type == model_type]


def run_variant(name: str, seed: int = 0) -> list[Result]:
    ref = reference_for(name, seed)
    return [Result(name, check, run(ref)) for check, run in CHECKS.items()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="*", choices=[[], *VARIANTS], help="default: all")
    args = parser.parse_args(argv)
    names = args.variants or list(VARIANTS)
    print(f"{'variant':28}" + "".join(f"{check:>14}" for check in CHECKS))
    failed = False
    for name in names:
        results = run_variant(name)
        failed |= not all(r.passed for r in results)
        print(f"{name:28}" + "".join(f"{r.max_abs_diff:>14.2e}" for r in results))
    print(f"tolerance {TOLERANCE:.0e}: {'FAIL' if failed else 'ok'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
