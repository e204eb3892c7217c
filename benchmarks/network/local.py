"""The same blocks run in this one process, for the floors of the network table, and the
greedy decoding that both the swarm client and the local run use (so a difference in
tokens can only come from the chain).

Compute is measured with the shapes the swarm sees: a decode step at a given prefix length
(after a prefill of that length into a fixed-size cache) and a (B, T) prefill into a new
cache. The spans are one chain here; the hosts run the same blocks 10 at a time, in turn.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from stamen.models.base import ClientHead
from stamen.models.chain import LocalChain, SpanCache, run_span
from stamen.models.loading import Span, load_config, load_head, load_span
from stamen.models.registry import get_adapter
from stamen.swarm_core.client.generation import BlockChain, DecodingPlan, decode


async def greedy_tokens(
    head: ClientHead, chain: BlockChain, input_ids: torch.Tensor, new_tokens: int
) -> list[int]:
    """`new_tokens` greedy tokens after `input_ids` (1, T): no EOS stop, so both runs
    produce the same count."""
    plan = DecodingPlan(max_new_tokens=new_tokens)
    return [int(step.tokens[0]) async for step in decode(head, chain, input_ids, plan)]


@dataclass
class LocalModel:
    """Every block and the head of a checkpoint, in float32 on the CPU."""

    span: Span
    head: ClientHead

    @classmethod
    def load(cls, checkpoint: Path) -> LocalModel:
        span = load_span(checkpoint, 0, _num_blocks(checkpoint), dtype=torch.float32)
        return cls(span, load_head(checkpoint, dtype=torch.float32))

    @property
    def hidden_size(self) -> int:
        return int(self.span.config.hidden_size)

    def cache(self, batch: int, max_length: int) -> SpanCache:
        span = self.span
        return SpanCache.empty(
            span.adapter, span.config, len(span), batch, max_length, dtype=torch.float32
        )

    def chain(self, batch: int, max_length: int) -> LocalChain:
        return LocalChain([(self.span.blocks, self.cache(batch, max_length))])

    @torch.inference_mode()
    def decode_step_s(self, prefix: int, steps: int) -> float:
        """Median seconds of one single-sequence step after a `prefix`-token prefill.
        Timed in this thread, with no event loop: only the blocks' compute."""
        cache = self.cache(1, prefix + steps + 1)
        run_span(self.span.blocks, cache, torch.randn(1, prefix, self.hidden_size), 0)
        token = torch.randn(1, 1, self.hidden_size)
        times = []
        for position in range(prefix, prefix + steps + 1):
            began = time.perf_counter()
            run_span(self.span.blocks, cache, token, position)
            times.append(time.perf_counter() - began)
        return statistics.median(times[1:])

    @torch.inference_mode()
    def prefill_s(self, batch: int, tokens: int) -> float:
        """Seconds of one (B, T) step into a new cache."""
        cache = self.cache(batch, tokens)
        hidden = torch.randn(batch, tokens, self.hidden_size)
        began = time.perf_counter()
        run_span(self.span.blocks, cache, hidden, 0)
        return time.perf_counter() - began

    def greedy(self, input_ids: list[int], new_tokens: int) -> list[int]:
        chain = self.chain(1, len(input_ids) + new_tokens)
        return asyncio.run(greedy_tokens(self.head, chain, torch.tensor([input_ids]), new_tokens))


def _num_blocks(checkpoint: Path) -> int:
    config = load_config(checkpoint)
    return int(get_adapter(config).num_blocks(config))
