"""The swarm on a GPU: decode steps/s of hosts serving CUDA bf16 spans vs the same blocks
in one local process, side by side in one run.

    python benchmarks/gpu_swarm_speed.py [--hidden 2048 --layers 16] [--steps 200]

The model is a random Llama (TinyLlama-like shape by default) saved as safetensors in a
temporary directory, so the run needs no hub. Two `swarm-host` processes (`--device cuda
--dtype bfloat16`) split its blocks on 127.0.0.1 over tcp; the client keeps float32
hidden states on the CPU, as a real client does. The local baseline runs the same blocks
on the same GPU in this process, with its hidden states already on the GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.swarm_speed import PREFILL_TOKENS, _decode_steps_s, ping_s
from stamen.models.chain import LocalChain, SpanCache
from stamen.models.loading import Span, load_span
from stamen.swarm_core.client.distributed import AutoDistributedModelForCausalLM
from stamen.swarm_core.client.inference import InferenceSession
from stamen.swarm_core.local_swarm import LocalSwarm


def save_random_llama(directory: Path, hidden: int, layers: int) -> int:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(directory, safe_serialization=True)
    return layers


async def _local(span: Span, layers: int, steps: int) -> float:
    cache = SpanCache.empty(
        span.adapter,
        span.config,
        layers,
        1,
        PREFILL_TOKENS + steps,
        dtype=torch.bfloat16,
        device="cuda",
    )
    chain = LocalChain([(span.blocks, cache)])

    async def step(hidden: torch.Tensor) -> torch.Tensor:
        out = await chain.step(hidden.to("cuda", torch.bfloat16))
        torch.cuda.synchronize()
        return out

    return await _decode_steps_s(step, span.config.hidden_size, steps)


async def run(args: argparse.Namespace, model_dir: Path) -> None:
    layers = args.layers
    # One event loop owns the host processes from start to stop; the client keeps its own.
    async with LocalSwarm(
        model_dir, layers, num_hosts=2, host_args=("--device", "cuda", "--dtype", "bfloat16")
    ) as swarm:
        model = await asyncio.to_thread(
            AutoDistributedModelForCausalLM.from_pretrained,
            model_dir,
            initial_peers=swarm.initial_peers,
        )

        async def remote() -> float:
            session = InferenceSession(
                model.swarm, 0, layers, PREFILL_TOKENS + args.steps, 1, ban_list=model.ban_list
            )
            async with session:
                return await _decode_steps_s(session.step, args.hidden, args.steps)

        span = load_span(model_dir, 0, layers, dtype=torch.bfloat16, device="cuda")
        local_rates, swarm_rates = [], []
        for _ in range(args.rounds):
            local_rates.append(await _local(span, layers, args.steps))
            swarm_rates.append(await asyncio.to_thread(model._loop.run, remote()))
        rtt = await asyncio.to_thread(ping_s, model)
        await asyncio.to_thread(model.close)
    local, remote_rate = statistics.median(local_rates), statistics.median(swarm_rates)
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}; random Llama hidden "
        f"{args.hidden}, {layers} blocks, bf16; 2 hosts over tcp on 127.0.0.1; "
        f"medians of {args.rounds} rounds of {args.steps} steps"
    )
    print(
        f"decode steps/s: local {local:.1f}, swarm {remote_rate:.1f} ({remote_rate / local:.2f}x)"
    )
    added_ms = (1 / remote_rate - 1 / local) * 1e3 / 2
    print(f"added per hop: {added_ms:.2f} ms; RPC ping {rtt * 1e3:.2f} ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "random-llama"
        save_random_llama(model_dir, args.hidden, args.layers)
        asyncio.run(run(args, model_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
