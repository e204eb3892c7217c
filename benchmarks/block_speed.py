"""One SmolLM2-shaped Llama block: ours vs transformers' `LlamaDecoderLayer`, same weights.

Two steps, each timed side by side in one run (ours and theirs alternate round by round so
that load changes on a shared machine hit both alike), float32 on CPU:

- decode: one new token against a cache already holding 512 tokens;
- prefill: 512 tokens at offset 0 into an empty cache.

Each side's step includes its per-step position setup (our `StepContext.make`, transformers'
rotary embedding), as a one-block span would pay it. transformers runs its SDPA attention
with its default `DynamicCache`, rebuilt to 512 tokens before every decode round outside
the timed region. `benchmarks/test_block_speed.py` runs the same targets under
pytest-benchmark; `python -m benchmarks.block_speed` prints the ratios (theirs / ours,
> 1 means ours is faster) with the machine, versions and git revision.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from stamen.models.base import KVCache, StepContext
from stamen.models.registry import get_adapter
from stamen.testing import git_revision

CACHE_TOKENS = 512
PREFILL_TOKENS = 512
MAX_LENGTH = 1024


def smollm2_config() -> Any:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=1,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    return config


def llama7b_config() -> Any:
    """A Llama-2-7B-shaped block, for GPU runs."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=1,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    )
    config._attn_implementation = "sdpa"
    return config


SHAPES = {"smollm2": smollm2_config, "llama7b": llama7b_config}


@dataclass
class Pair:
    """Our block and transformers' layer built from the same random weights."""

    config: Any
    ours: torch.nn.Module
    theirs: torch.nn.Module
    rotary: torch.nn.Module  # transformers' LlamaRotaryEmbedding
    past_key: torch.Tensor  # (1, H_kv, CACHE_TOKENS, D)
    past_value: torch.Tensor
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    @classmethod
    def build(
        cls,
        seed: int = 0,
        *,
        shape: str = "smollm2",
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Pair:
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        torch.manual_seed(seed)
        config = SHAPES[shape]()
        theirs = LlamaDecoderLayer(config, layer_idx=0).eval()
        with torch.no_grad():
            for param in theirs.parameters():
                param.normal_(0.0, 0.05)
        ours = get_adapter(config).build_block(config, dict(theirs.state_dict())).eval()
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        kv_shape = (1, config.num_key_value_heads, CACHE_TOKENS, head_dim)
        target = torch.device(device)
        return cls(
            config,
            ours.to(target, dtype),
            theirs.to(target, dtype),
            LlamaRotaryEmbedding(config).to(target),
            torch.randn(kv_shape, device=target, dtype=dtype),
            torch.randn(kv_shape, device=target, dtype=dtype),
            target,
            dtype,
        )

    # --- ours

    def our_cache(self) -> KVCache:
        cache = get_adapter(self.config).empty_cache(
            self.config, 1, MAX_LENGTH, dtype=self.dtype, device=self.device
        )
        cache.key[:, :, :CACHE_TOKENS] = self.past_key
        cache.value[:, :, :CACHE_TOKENS] = self.past_value
        return cache

    def our_step(self, hidden: torch.Tensor, cache: KVCache, offset: int) -> torch.Tensor:
        with torch.no_grad():
            context = StepContext.make(offset, hidden.shape[1], device=self.device)
            return self.ours(hidden, cache, context)

    # --- theirs

    def their_cache(self, filled: bool) -> Any:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        if filled:
            cache.update(self.past_key.clone(), self.past_value.clone(), 0)
        return cache

    def their_step(self, hidden: torch.Tensor, cache: Any, offset: int) -> torch.Tensor:
        with torch.no_grad():
            position_ids = torch.arange(offset, offset + hidden.shape[1], device=self.device)[None]
            position_embeddings = self.rotary(hidden, position_ids)
            return self.theirs(
                hidden,
                position_ids=position_ids,
                cache=cache,
                position_embeddings=position_embeddings,
            )


def decode_inputs(pair: Pair) -> torch.Tensor:
    return torch.randn(1, 1, pair.config.hidden_size, device=pair.device, dtype=pair.dtype)


def prefill_inputs(pair: Pair) -> torch.Tensor:
    shape = (1, PREFILL_TOKENS, pair.config.hidden_size)
    return torch.randn(shape, device=pair.device, dtype=pair.dtype)


# (setup returning the step's arguments, untimed; the step, timed)
Case = tuple[Callable[[], tuple], Callable[..., torch.Tensor]]


def cases(pair: Pair) -> dict[str, dict[str, Case]]:
    """step name -> side ("ours", "transformers") -> Case."""
    decode, prefill = decode_inputs(pair), prefill_inputs(pair)
    # Our caches are preallocated: decode rewrites slot 512 and prefill slots [0, 512) every
    # round, so neither needs a reset between rounds.
    decode_cache, prefill_cache = pair.our_cache(), pair.our_cache()
    return {
        "decode": {
            "ours": (lambda: (decode, decode_cache, CACHE_TOKENS), pair.our_step),
            "transformers": (
                lambda: (decode, pair.their_cache(True), CACHE_TOKENS),
                pair.their_step,
            ),
        },
        "prefill": {
            "ours": (lambda: (prefill, prefill_cache, 0), pair.our_step),
            "transformers": (lambda: (prefill, pair.their_cache(False), 0), pair.their_step),
        },
    }


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_once(case: Case) -> float:
    setup, step = case
    args = setup()
    _synchronize()
    start = time.perf_counter()
    step(*args)
    _synchronize()  # CUDA kernels run asynchronously: time their completion
    return time.perf_counter() - start


def measure_interleaved(sides: dict[str, Case], rounds: int) -> dict[str, list[float]]:
    """Alternate the sides round by round, so load changes on the machine hit both alike."""
    for case in sides.values():
        for _ in range(3):
            time_once(case)  # warm-up
    samples: dict[str, list[float]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side, case in sides.items():
            samples[side].append(time_once(case))
    return samples


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ours vs transformers, one Llama block")
    parser.add_argument(
        "--rounds", type=int, default=200, help="decode rounds (prefill: rounds/10)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repetitions")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    args = parser.parse_args(argv)
    import transformers

    if args.threads:
        # On a busy shared machine, multi-threaded GEMMs spin-wait on preempted workers.
        torch.set_num_threads(args.threads)

    pair = Pair.build(shape=args.shape, device=args.device, dtype=getattr(torch, args.dtype))
    by_case = cases(pair)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, torch threads "
        f"{torch.get_num_threads()}; torch {torch.__version__}, transformers "
        f"{transformers.__version__}; git {git_revision()}; {args.shape} block, "
        f"{args.dtype} on {torch.cuda.get_device_name() if pair.device.type == 'cuda' else 'cpu'}"
    )
    print(f"{'step':8} {'ours median ms':>15} {'transformers ms':>16} {'ratio':>7}")
    for name, sides in by_case.items():
        rounds = args.rounds if name == "decode" else max(args.rounds // 20, 3)
        samples = measure_interleaved(sides, rounds)
        ours = statistics.median(samples["ours"])
        theirs = statistics.median(samples["transformers"])
        print(f"{name:8} {ours * 1e3:15.3f} {theirs * 1e3:16.3f} {theirs / ours:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
