"""Spans of blocks run in this process, one after another, with their KV caches.

`SpanCache` is the per-sequence-batch state of one span: a `KVCache` per block and the
key padding mask of every slot written so far. `SpanCache.grown` makes a longer copy of
it (new buffers, the filled prefix copied), so a host can allocate cache as a session
grows instead of its whole `max_length` up front. `run_span` steps one span; `run_blocks`
runs blocks statelessly (no cache; under autograd when the caller enables it); `LocalChain`
chains several spans in-process. Hosts use the same pieces for their sessions, and the
local chain is the reference the swarm is compared with in tests and benchmarks.

Deep prompts: both runners take an optional `prompts` tensor `(n_blocks, B or 1, P', C)`
already cut to the step's positions (P' <= T). Before block i, `prompts[i]` is added to the
first P' positions of its input, out of place, so the caller's tensors are never written
and autograd sees the addition. Without prompts the loops are exactly what they were.
Which positions a prompt covers (absolute `[0, P)`) is the caller's business.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from stamen.models.base import BlockAdapter, KVCache, StepContext


@dataclass
class SpanCache:
    caches: list[KVCache]  # one per block of the span
    key_padding_mask: Tensor  # (B, S_max) bool: True where a slot holds a real token
    # The first slot that may hold padding, None while every written slot is real: lets
    # a step skip reading the mask back (a device sync on GPU) when nothing is padded.
    padding_from: int | None = None

    @classmethod
    def empty(
        cls,
        adapter: BlockAdapter,
        config: object,
        num_blocks: int,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> SpanCache:
        caches = [
            adapter.empty_cache(config, batch_size, max_length, dtype=dtype, device=device)
            for _ in range(num_blocks)
        ]
        mask = torch.ones(batch_size, max_length, dtype=torch.bool, device=device)
        return cls(caches, mask)

    @property
    def max_length(self) -> int:
        return self.key_padding_mask.shape[1]

    def grown(
        self, adapter: BlockAdapter, config: object, max_length: int, *, filled: int
    ) -> SpanCache:
        """A cache of `max_length` slots holding this one's slots `[0, filled)`.

        Slots from `filled` on are left empty (a step is about to rewrite them). The old
        buffers stay valid until the caller drops them, so memory peaks at old + new.
        """
        if not 0 <= filled <= min(self.max_length, max_length):
            raise ValueError(
                f"cannot keep {filled} slots growing {self.max_length} -> {max_length}"
            )
        B = self.key_padding_mask.shape[0]
        like = self.caches[0].key  # (B, H_kv, S_max, D)
        bigger = SpanCache.empty(
            adapter, config, len(self.caches), B, max_length, dtype=like.dtype, device=like.device
        )
        for old, new in zip(self.caches, bigger.caches, strict=True):
            new.key[:, :, :filled] = old.key[:, :, :filled]
            new.value[:, :, :filled] = old.value[:, :, :filled]
        bigger.key_padding_mask[:, :filled] = self.key_padding_mask[:, :filled]
        if self.padding_from is not None and self.padding_from < filled:
            bigger.padding_from = self.padding_from
        return bigger


@torch.inference_mode()
def run_span(
    blocks: Iterable[nn.Module],
    cache: SpanCache,
    hidden: Tensor,
    offset: int,
    padding_mask: Tensor | None = None,
    prompts: Tensor | None = None,
) -> Tensor:
    """Write `hidden` (B, T, C) at slots `[offset, offset + T)` of every block's cache.

    `padding_mask` (B, T) is False for left-padding tokens; the span remembers it so that
    later steps attend only to real tokens. Slots past `offset + T` are ignored, which is
    what lets a caller roll back or replay by passing a smaller `offset`. `prompts`
    (n_blocks, B or 1, P', C), P' <= T, is added before each block to the step's first P'
    tokens (module docstring).
    """
    B, T, _ = hidden.shape
    end = offset + T
    if end > cache.max_length:
        raise ValueError(f"step ends at {end}, beyond the cache length {cache.max_length}")
    history = cache.key_padding_mask
    if cache.padding_from is not None and cache.padding_from >= offset:
        cache.padding_from = None  # every slot from `offset` on is being rewritten
    if padding_mask is not None:
        history[:, offset:end] = padding_mask
        if cache.padding_from is None and not bool(padding_mask.all()):
            cache.padding_from = offset
    else:
        history[:, offset:end] = True
    if cache.padding_from is None or cache.padding_from >= end:
        context = StepContext.make(offset, T, batch_size=B, device=hidden.device)
    else:
        context = StepContext.make(
            offset, T, batch_size=B, key_padding_mask=history[:, :end], device=hidden.device
        )
    if prompts is None:
        for block, block_cache in zip(blocks, cache.caches, strict=True):
            hidden = block(hidden, block_cache, context)
        return hidden
    _check_prompts_fit(prompts, hidden)
    for block, block_cache, prompt in zip(blocks, cache.caches, prompts, strict=True):
        hidden = block(add_prompt(hidden, prompt), block_cache, context)
    return hidden


def run_blocks(
    blocks: Iterable[nn.Module],
    hidden: Tensor,
    context: StepContext,
    prompts: Tensor | None = None,
) -> Tensor:
    """`hidden` (B, T, C) through `blocks` without a cache, `prompts` (n_blocks, B or 1,
    P', C) added before each block. Runs in whatever grad mode the caller chose."""
    if prompts is None:
        for block in blocks:
            hidden = block(hidden, None, context)
        return hidden
    _check_prompts_fit(prompts, hidden)
    for block, prompt in zip(blocks, prompts, strict=True):
        hidden = block(add_prompt(hidden, prompt), None, context)
    return hidden


def add_prompt(hidden: Tensor, prompt: Tensor) -> Tensor:
    """`hidden` (B, T, C) with `prompt` (B or 1, P', C) added to its first P' positions.

    A new tensor: the caller's `hidden` may be a view of a received frame or a leaf that
    autograd must differentiate through, so it is never written in place.
    """
    P = prompt.shape[1]
    prompted = hidden[:, :P] + prompt  # (B, P', C); a batch of 1 broadcasts
    return torch.cat([prompted, hidden[:, P:]], dim=1)  # (B, T, C)


def _check_prompts_fit(prompts: Tensor, hidden: Tensor) -> None:
    if prompts.dim() != 4 or prompts.shape[1] not in (1, hidden.shape[0]):
        raise ValueError(
            f"prompts of shape {tuple(prompts.shape)} for hidden {tuple(hidden.shape)}"
        )
    if prompts.shape[2] > hidden.shape[1] or prompts.shape[3] != hidden.shape[2]:
        raise ValueError(
            f"prompts of shape {tuple(prompts.shape)} for hidden {tuple(hidden.shape)}"
        )


class LocalChain:
    """Several spans run in this process as one chain; a `BlockChain` for decoding.

    Each step runs in a worker thread, so an event loop driving the chain (the API's, say)
    stays responsive during long prefills.
    """

    def __init__(self, spans: Iterable[tuple[Iterable[nn.Module], SpanCache]]) -> None:
        self._spans = list(spans)
        self._position = 0

    @property
    def position(self) -> int:
        return self._position

    async def step(self, hidden: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        hidden = await asyncio.to_thread(self._run, hidden, padding_mask, self._position)
        self._position += hidden.shape[1]
        return hidden

    def _run(self, hidden: Tensor, padding_mask: Tensor | None, offset: int) -> Tensor:
        for blocks, cache in self._spans:
            hidden = run_span(blocks, cache, hidden, offset, padding_mask)  # (B, T, C)
        return hidden
