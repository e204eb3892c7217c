"""The swarm on a GPU: decode steps/s of hosts serving CUDA bf16 spans vs the same blocks
in one local process, side by side in one run.

    python -m benchmarks.gpu_swarm_speed [--hidden 2048 --layers 16] [--steps 200]

The model is a random Llama (TinyLlama-like shape by default) saved as safetensors in a
temporary directory, so the run needs no hub. Two `swarm-host` processes (`--device cuda
--dtype bfloat16`) split its blocks on 127.0.0.1 over tcp; the client keeps float32
hidden states on the CPU, as a real client does. Two local baselines run the same blocks
on the same GPU in this process, with their hidden states already on the GPU: eager
(`LocalChain` over a contiguous `SpanCache`) and graph-captured (`DecodeGraphs` over a
`KVPool`, what a host with CUDA graphs runs per decode step). The report gives the ms each
swarm hop adds over both, next to the RPC ping; `--json` writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.swarm_speed import (
    PREFILL_TOKENS,
    _decode_steps_s,
    host_infos,
    host_time_per_step,
    ping_s,
)
from stamen.models.chain import LocalChain, SpanCache
from stamen.models.loading import Span, load_span
from stamen.models.paged import DecodeGraphs, KVPool, pages_for, run_paged_span
from stamen.swarm_core.client.distributed import AutoDistributedModelForCausalLM
from stamen.swarm_core.client.inference import InferenceSession
from stamen.swarm_core.local_swarm import LocalSwarm


def save_random_llama(directory: Path, hidden: int, layers: int) -> int:
    """A random bf16 Llama checkpoint in `directory`: config.json and safetensors shards
    of at most 8 blocks with their index. Tensors are drawn on the GPU when there is one
    (a 32-block, 4096-wide model is 12 GB: instantiating it through transformers took
    longer than a benchmark step's time limit on the H200 machine)."""
    import json

    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device=device).manual_seed(0)
    kv, inner = config.num_key_value_heads * 64, config.intermediate_size

    def random(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=generator, device=device, dtype=torch.float32)
        return (x * 0.02).to(torch.bfloat16).cpu()

    def block(i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        return {
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": random(hidden, hidden),
            p + "self_attn.k_proj.weight": random(kv, hidden),
            p + "self_attn.v_proj.weight": random(kv, hidden),
            p + "self_attn.o_proj.weight": random(hidden, hidden),
            p + "mlp.gate_proj.weight": random(inner, hidden),
            p + "mlp.up_proj.weight": random(inner, hidden),
            p + "mlp.down_proj.weight": random(hidden, inner),
        }

    groups = [list(range(i, min(i + 8, layers))) for i in range(0, layers, 8)]
    weight_map: dict[str, str] = {}
    total = 0
    for n, group in enumerate([[-1], *groups]):  # -1: the head
        if group == [-1]:
            tensors = {
                "model.embed_tokens.weight": random(config.vocab_size, hidden),
                "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                "lm_head.weight": random(config.vocab_size, hidden),
            }
        else:
            tensors = {name: t for i in group for name, t in block(i).items()}
        shard = f"model-{n + 1:05d}-of-{len(groups) + 1:05d}.safetensors"
        save_file(tensors, directory / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.nelement() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return layers


@dataclass(frozen=True)
class Target:
    """Where the hosts and the local baselines run (`--device`): bf16 on CUDA, float32
    on the CPU (a reduced smoke run)."""

    device: torch.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def host_args(self) -> tuple[str, ...]:
        return ("--device", self.device.type, "--dtype", str(self.dtype).removeprefix("torch."))

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def name(self) -> str:
        return torch.cuda.get_device_name() if self.device.type == "cuda" else "cpu"


async def _local(span: Span, layers: int, steps: int, target: Target) -> float:
    cache = SpanCache.empty(
        span.adapter,
        span.config,
        layers,
        1,
        PREFILL_TOKENS + steps,
        dtype=target.dtype,
        device=target.device,
    )
    chain = LocalChain([(span.blocks, cache)])

    async def step(hidden: torch.Tensor) -> torch.Tensor:
        out = await chain.step(hidden.to(target.device, target.dtype))
        target.synchronize()
        return out

    return await _decode_steps_s(step, span.config.hidden_size, steps)


class GraphChain:
    """The span's blocks stepped in this process as a graph-capturing host steps them:
    prefill through `run_paged_span`, single tokens through `DecodeGraphs` (one row)."""

    def __init__(self, span: Span, layers: int, max_length: int, target: Target) -> None:
        self.target = target
        self.pool = KVPool(
            span.adapter,
            span.config,
            layers,
            pages_for(max_length, 16) + 1,
            dtype=target.dtype,
            device=target.device,
        )
        self.pool.clear_pages(range(self.pool.num_pages))
        self.table = torch.arange(1, self.pool.num_pages)[None]  # (1, n_p) CPU
        self.blocks = span.blocks
        self.hidden_size = int(span.config.hidden_size)
        self.graphs = DecodeGraphs(span.blocks, self.pool)
        self.position = 0
        self._run(torch.zeros(1, 1, span.config.hidden_size))  # capture outside the timing

    def _run(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.to(self.target.device, self.target.dtype)  # (1, T, C)
        start = torch.tensor([self.position])
        if x.shape[1] == 1:
            out = self.graphs.run(x, self.table, start)
        else:
            device = self.target.device
            out = run_paged_span(self.blocks, self.pool, x, self.table.to(device), start.to(device))
        self.target.synchronize()
        self.position += x.shape[1]
        return out

    async def step(self, hidden: torch.Tensor) -> torch.Tensor:
        # In a worker thread, as `LocalChain.step` runs: the two baselines differ in compute only.
        return await asyncio.to_thread(self._run, hidden)


async def _local_graphs(chain: GraphChain, steps: int) -> float:
    chain.position = 0  # rewriting from slot 0 is a legal rollback
    return await _decode_steps_s(chain.step, chain.hidden_size, steps)


def progress(began_s: float, what: str) -> None:
    """A line on stderr with the seconds since `began_s`: where a run that times out was."""
    print(f"[{time.monotonic() - began_s:6.1f} s] {what}", file=sys.stderr, flush=True)


async def run(args: argparse.Namespace, model_dir: Path) -> None:
    layers, target = args.layers, Target(torch.device(args.device))
    began_s = time.monotonic()
    host_logs = Path(args.host_logs) if getattr(args, "host_logs", None) else None
    if host_logs is not None:
        host_logs.mkdir(parents=True, exist_ok=True)
    # One event loop owns the host processes from start to stop; the client keeps its own.
    swarm = LocalSwarm(
        model_dir, layers, num_hosts=2, host_args=target.host_args(), log_dir=host_logs
    )
    async with swarm:
        progress(began_s, "hosts online")
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

        progress(began_s, "client ready")
        span = load_span(model_dir, 0, layers, dtype=target.dtype, device=target.device)
        graph_chain = GraphChain(span, layers, PREFILL_TOKENS + args.steps, target)
        progress(began_s, "local baselines loaded and captured")
        rates: dict[str, list[float]] = {"local": [], "local-graphs": [], "swarm": []}
        hosts: list[dict] = []
        for _ in range(args.rounds):
            rates["local"].append(await _local(span, layers, args.steps, target))
            rates["local-graphs"].append(await _local_graphs(graph_chain, args.steps))
            before = await asyncio.to_thread(host_infos, model)
            rates["swarm"].append(await asyncio.to_thread(model._loop.run, remote()))
            after = await asyncio.to_thread(host_infos, model)
            hosts.append(host_time_per_step(before, after))
            progress(began_s, f"round {len(hosts)} of {args.rounds} done")
        rtt = await asyncio.to_thread(ping_s, model)
        await asyncio.to_thread(model.close)
    medians = {name: statistics.median(v) for name, v in rates.items()}
    report(args, target, medians, rtt, hosts)


def report(
    args: argparse.Namespace,
    target: Target,
    rates: dict[str, float],
    rtt_s: float,
    hosts: list[dict],
) -> None:
    local, graphs, swarm = rates["local"], rates["local-graphs"], rates["swarm"]
    added = {  # the swarm's step minus one local step, over the 2 hops
        "eager": (1 / swarm - 1 / local) * 1e3 / 2,
        "graphs": (1 / swarm - 1 / graphs) * 1e3 / 2,
    }
    print(
        f"{target.name()}, torch {torch.__version__}; random Llama hidden "
        f"{args.hidden}, {args.layers} blocks, {target.dtype}; 2 hosts over tcp on 127.0.0.1; "
        f"medians of {args.rounds} rounds of {args.steps} steps"
    )
    print(f"{'':<22}{'steps/s':>10}{'ms/step':>10}{'swarm ratio':>13}")
    for name, rate in rates.items():
        print(f"{name:<22}{rate:>10.1f}{1e3 / rate:>10.2f}{swarm / rate:>12.2f}x")
    print(
        f"added per hop: {added['eager']:.2f} ms over eager local, {added['graphs']:.2f} ms "
        f"over graph-captured local; RPC ping {rtt_s * 1e3:.2f} ms"
    )
    # The hosts' own view of a swarm step (both hosts summed), from their Info counters.
    runtime_ms = statistics.median(h["runtime_ms"] for h in hosts)
    decode_ms = statistics.median(h["decode_ms"] for h in hosts)
    print(
        f"hosts per swarm step: {runtime_ms:.2f} ms in their runtimes, {decode_ms:.2f} ms "
        f"of it decode compute; outside the runtimes (RPC, codecs, client, network) "
        f"{1e3 / swarm - runtime_ms:.2f} ms; graphs captured {hosts[-1]['graphs_captured']}, "
        f"decode batches per round {hosts[-1]['decode_batches']}"
    )
    if args.json:
        numbers = {
            "rates_steps_s": rates,
            "added_ms_per_hop": added,
            "ping_ms": rtt_s * 1e3,
            "hosts": {
                "runtime_ms": runtime_ms,
                "decode_ms": decode_ms,
                "outside_ms": 1e3 / swarm - runtime_ms,
                "rounds": hosts,
            },
        }
        Path(args.json).write_text(json.dumps({"args": vars(args), **numbers}, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048, help="model width (heads of 64)")
    parser.add_argument("--layers", type=int, default=16, help="blocks, split over 2 hosts")
    parser.add_argument("--steps", type=int, default=200, help="decode steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians reported)")
    parser.add_argument("--json", default=None, help="also write the numbers here")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a reduced smoke run")
    parser.add_argument("--host-logs", default=None, help="keep the hosts' logs in this folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "random-llama"
        began_s = time.monotonic()
        save_random_llama(model_dir, args.hidden, args.layers)
        progress(began_s, f"checkpoint written ({args.layers} blocks of {args.hidden})")
        asyncio.run(run(args, model_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
