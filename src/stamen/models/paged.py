"""One KV cache for a whole host: pages shared by every session, batched steps over them,
and single-token steps captured in CUDA graphs.

A `KVPool` holds, for each block of a span, keys and values in pages of `page_tokens`
slots: `(num_pages, page_tokens, H_kv, D)`. A sequence (a row) owns a list of pages, its
table; slot `s` of the row lives at `table[s // page_tokens]`, slot `s % page_tokens`.
Which pages a row owns is the caller's business (a host's budget, on its event loop);
this module only reads and writes them. Page 0 (`NULL_PAGE`) is never handed out: tables
are padded with it and rows that only pad a batch read and write it, masked away.

`run_paged_span` steps B rows at once, row b writing slots `[start[b], start[b] + T)` and
attending to its own written, non-padding slots. Everything it computes per step (write
pages and slots, masks, positions counted over real tokens) is derived on the device from
the table and start tensors, so a step never waits for the device; it equals running each
row alone on its own contiguous cache (`chain.run_span`).

`DecodeGraphs` serves single-token steps (decode) of any number of rows: rows are padded
to a batch bucket and tables to a power-of-two number of pages, and on CUDA each (batch
bucket, page bucket) is captured once in a CUDA graph and replayed, which removes the
per-kernel launch cost that dominates a decode step on a fast GPU. On the CPU, or when a
capture fails (bitsandbytes layers, say), it runs the same step eagerly.

This module knows nothing about sessions, budgets or networking.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from stamen.models.base import BlockAdapter, PagedKV, PagedStep
from stamen.models.chain import _check_prompts_fit, add_prompt

logger = logging.getLogger(__name__)

NULL_PAGE = 0
DEFAULT_PAGE_TOKENS = 16
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def pages_for(num_tokens: int, page_tokens: int) -> int:
    """Pages needed to hold `num_tokens` slots."""
    return -(-num_tokens // page_tokens)


class KVPool:
    """Keys and values of every block of a span, in pages shared by all sequences.

    Buffers are allocated once, uninitialised (on a GPU this is the host's cache budget
    taken up front); `clear_pages` zeroes pages before a sequence first uses them, since
    attention reads whole pages and never-written memory may hold NaN.
    """

    def __init__(
        self,
        adapter: BlockAdapter,
        config: object,
        num_blocks: int,
        num_pages: int,
        *,
        page_tokens: int = DEFAULT_PAGE_TOKENS,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or num_pages < 1 or page_tokens < 1:
            raise ValueError(
                f"a pool needs >= 1 block, page and slot per page, got {num_blocks} blocks, "
                f"{num_pages} pages of {page_tokens}"
            )
        shape = adapter.kv_shape(config)
        layout = (num_pages, page_tokens, shape.num_kv_heads, shape.head_dim)
        self.num_blocks, self.num_pages, self.page_tokens = num_blocks, num_pages, page_tokens
        self.dtype, self.device = dtype, torch.device(device)
        self.keys = [torch.empty(layout, dtype=dtype, device=device) for _ in range(num_blocks)]
        self.values = [torch.empty(layout, dtype=dtype, device=device) for _ in range(num_blocks)]
        self.valid = torch.zeros(num_pages, page_tokens, dtype=torch.bool, device=device)
        self.clear_pages([NULL_PAGE])

    @staticmethod
    def bytes_per_page(
        adapter: BlockAdapter, config: object, num_blocks: int, page_tokens: int, dtype: torch.dtype
    ) -> int:
        shape = adapter.kv_shape(config)
        element_bytes = torch.empty((), dtype=dtype).element_size()
        return 2 * num_blocks * page_tokens * shape.num_kv_heads * shape.head_dim * element_bytes

    def nbytes(self) -> int:
        per_block = self.keys[0].nelement() * self.keys[0].element_size()
        return 2 * self.num_blocks * per_block + self.valid.nelement()

    def layer(self, index: int) -> PagedKV:
        return PagedKV(self.keys[index], self.values[index])

    def clear_pages(self, pages: Sequence[int]) -> None:
        """Zero the keys, values and validity of `pages` (before a sequence uses them)."""
        if not pages:
            return
        index = torch.tensor(list(pages), dtype=torch.long, device=self.device)
        for key, value in zip(self.keys, self.values, strict=True):
            key.index_fill_(0, index, 0)
            value.index_fill_(0, index, 0)
        self.valid.index_fill_(0, index, False)


def paged_step(pool: KVPool, table: Tensor, start: Tensor, num_new_tokens: int) -> PagedStep:
    """The context of writing `num_new_tokens` tokens per row at slots `start[b] + t`.

    Reads `pool.valid`, so the new tokens' validity must be written first (as
    `run_paged_span` does). Mirrors `StepContext.make`: positions count real tokens only,
    and a padding query still sees itself so that its softmax stays finite.
    """
    B, n_p = table.shape
    page, device = pool.page_tokens, table.device
    S = n_p * page
    write_at = start[:, None] + torch.arange(num_new_tokens, device=device)  # (B, T)
    write_pages = table.gather(1, write_at // page)  # (B, T)
    write_slots = write_at % page
    valid = pool.valid[table].view(B, S)  # (B, S)
    key_positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
    positions = key_positions.gather(1, write_at)  # (B, T)
    slots = torch.arange(S, device=device)
    written = slots[None, None, :] <= write_at[:, :, None]  # (B, T, S): causal, own row only
    mask = (written & valid[:, None, :]) | (slots[None, None, :] == write_at[:, :, None])
    mask = mask[:, None]  # (B, 1, T, S)
    bias = torch.zeros(mask.shape, dtype=pool.dtype, device=device).masked_fill(~mask, -math.inf)
    return PagedStep(positions, key_positions, mask, bias, write_pages, write_slots, table)


def run_paged_span(
    blocks: Iterable[nn.Module],
    pool: KVPool,
    hidden: Tensor,
    table: Tensor,
    start: Tensor,
    new_valid: Tensor | None = None,
    prompts: Tensor | None = None,
    *,
    block_offset: int = 0,
) -> Tensor:
    """Run `hidden` (B, T, C) through `blocks`, row b at slots `[start[b], start[b] + T)`.

    `table` (B, n_p) long: row b's pages in slot order, padded with `NULL_PAGE`; `start`
    (B,) long; `new_valid` (B, T) bool, False for left padding (None: all real). All on
    `pool.device`. `blocks[0]` is pool layer `block_offset`. `prompts` (n_blocks, B or 1,
    P', C) are added before each block to the first P' new tokens, as in `run_span`. The
    caller guarantees `n_p * page_tokens >= max(start) + T`: checking it here would sync.
    """
    with torch.inference_mode():
        return _paged_span(blocks, pool, hidden, table, start, new_valid, prompts, block_offset)


def _paged_span(
    blocks: Iterable[nn.Module],
    pool: KVPool,
    hidden: Tensor,
    table: Tensor,
    start: Tensor,
    new_valid: Tensor | None,
    prompts: Tensor | None,
    block_offset: int,
) -> Tensor:
    blocks = list(blocks)
    if block_offset < 0 or block_offset + len(blocks) > pool.num_blocks:
        raise ValueError(
            f"{len(blocks)} blocks from layer {block_offset} do not fit a pool of {pool.num_blocks}"
        )
    T = hidden.shape[1]
    write_at = start[:, None] + torch.arange(T, device=table.device)  # (B, T)
    page = pool.page_tokens
    pages = table.gather(1, write_at // page)
    if new_valid is None:
        pool.valid[pages, write_at % page] = True
    else:
        pool.valid[pages, write_at % page] = new_valid
    context = paged_step(pool, table, start, T)
    layers = range(block_offset, block_offset + len(blocks))
    if prompts is None:
        for block, index in zip(blocks, layers, strict=True):
            hidden = block(hidden, pool.layer(index), context)
        return hidden
    _check_prompts_fit(prompts, hidden)
    for block, index, prompt in zip(blocks, layers, prompts, strict=True):
        hidden = block(add_prompt(hidden, prompt), pool.layer(index), context)
    return hidden


def _has_quantized_layers(blocks: nn.Module) -> bool:
    return any(type(m).__module__.startswith("bitsandbytes") for m in blocks.modules())


@dataclass
class _Captured:
    """One replayable decode step for a (batch bucket, page bucket)."""

    meta: Tensor  # (B, P + 2) long on the device: table | start | valid
    hidden: Tensor  # (B, 1, C) static input
    output: Tensor  # (B, 1, C) static output
    graph: torch.cuda.CUDAGraph | None  # None: run eagerly from the static buffers


class DecodeGraphs:
    """Single-token steps of up to `max_batch` rows over one span of a pool.

    `run` copies the rows into static buffers padded to a bucket (padding rows use the null
    page), then replays that bucket's CUDA graph, capturing it on first use. One host-to-
    device copy carries every row's table, start and validity. Results are views of the
    bucket's static output: read them before the next `run`.
    """

    def __init__(
        self,
        blocks: Iterable[nn.Module],
        pool: KVPool,
        *,
        block_offset: int = 0,
        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
        use_graphs: bool | None = None,
        compile: bool = False,
        max_graph_pages: int = 128,
        graph_pool: Any = None,
    ) -> None:
        self.blocks = nn.ModuleList(blocks)
        self.pool = pool
        self.block_offset = block_offset
        self.batch_buckets = tuple(sorted(set(batch_buckets)))
        if not self.batch_buckets or self.batch_buckets[0] < 1:
            raise ValueError(f"batch buckets must be >= 1, got {batch_buckets}")
        on_cuda = pool.device.type == "cuda"
        self.use_graphs = on_cuda if use_graphs is None else (use_graphs and on_cuda)
        if self.use_graphs and _has_quantized_layers(self.blocks):
            # Measured on an H200: capturing int8 layers fails (they sync), and the failed
            # capture left the CUDA generator in capture state, so later steps went wrong.
            logger.info("the span has bitsandbytes layers: decode steps run eagerly")
            self.use_graphs = False
        self._captured: dict[tuple[int, int], _Captured] = {}
        # The memory pool every captured graph shares (several decoders may pass one in:
        # graphs are replayed one at a time and their outputs read before the next).
        self._graph_pool: Any = graph_pool
        # Longer tables run eagerly: a graph keeps its gathered keys and values reserved.
        self.max_graph_pages = max_graph_pages
        self._staging: dict[tuple[int, int], Tensor] = {}
        self._copied: torch.cuda.Event | None = None
        # torch.compile before capture fuses the many small kernels of a block (norms,
        # rotary, residuals); off by default: each bucket then compiles for seconds on
        # first use, and a bucket inductor cannot compile is captured uncompiled.
        self.compile = compile and self.use_graphs
        self._compiled: Any = None
        self.buckets_compiled = 0

    @property
    def max_batch(self) -> int:
        return self.batch_buckets[-1]

    @property
    def graphs_captured(self) -> int:
        return sum(1 for captured in self._captured.values() if captured.graph is not None)

    def run(
        self,
        hidden: Tensor,
        table: Tensor,
        start: Tensor,
        new_valid: Tensor | None = None,
    ) -> Tensor:
        """`hidden` (b, 1, C) on any device; `table` (b, n_p), `start` (b,) long and
        `new_valid` (b, 1) bool or None on the CPU. Returns (b, 1, C) on the pool's device in
        its dtype, possibly a view of a static buffer (valid until the next `run`)."""
        b, n_p = table.shape
        if hidden.shape[0] != b or hidden.shape[1] != 1 or start.shape != (b,):
            raise ValueError(
                f"decode rows disagree: hidden {tuple(hidden.shape)}, table "
                f"{tuple(table.shape)}, start {tuple(start.shape)}"
            )
        if not self.use_graphs or b > self.max_batch or n_p > self.max_graph_pages:
            return self._eager(hidden, table, start, new_valid)
        B = next(size for size in self.batch_buckets if size >= b)
        P = 1 << max(0, n_p - 1).bit_length()
        captured = self._captured.get((B, P))
        if captured is None:
            captured = self._capture(B, P, hidden.shape[2])
            if captured is None:
                return self._eager(hidden, table, start, new_valid)
        self._load(captured, B, P, hidden, table, start, new_valid)
        assert captured.graph is not None
        captured.graph.replay()
        return captured.output[:b]

    def prepare(
        self, hidden_size: int, batch_sizes: Iterable[int], page_counts: Iterable[int]
    ) -> int:
        """Capture the buckets holding these batch sizes and page counts now, so that the
        first steps of a host's sessions do not pay for the captures (tens of ms each).
        Returns how many buckets are captured in all; nothing happens without graphs."""
        pages = list(page_counts)
        for b in batch_sizes:
            if not self.use_graphs or b > self.max_batch:
                break
            B = next(size for size in self.batch_buckets if size >= b)
            for n_p in pages:
                if n_p > self.max_graph_pages:
                    break
                P = 1 << max(0, n_p - 1).bit_length()
                if (B, P) not in self._captured and self._capture(B, P, hidden_size) is None:
                    return self.graphs_captured
        return self.graphs_captured

    # -- eager ---------------------------------------------------------------------------

    def _eager(
        self, hidden: Tensor, table: Tensor, start: Tensor, new_valid: Tensor | None
    ) -> Tensor:
        device, pool = self.pool.device, self.pool
        x = hidden.to(device=device, dtype=pool.dtype)
        valid = None if new_valid is None else new_valid.to(device)
        return run_paged_span(
            self.blocks,
            pool,
            x,
            table.to(device),
            start.to(device),
            valid,
            block_offset=self.block_offset,
        )

    # -- graphs ---------------------------------------------------------------------------

    def _step_from(self, meta: Tensor, hidden: Tensor, P: int) -> Tensor:
        table, start = meta[:, :P], meta[:, P]
        valid = meta[:, P + 1 :] != 0  # (B, 1)
        with torch.inference_mode():
            return _paged_span(
                self.blocks, self.pool, hidden, table, start, valid, None, self.block_offset
            )

    def _compiled_step_from(self, meta: Tensor, hidden: Tensor, P: int) -> Tensor:
        table, start = meta[:, :P], meta[:, P]
        valid = meta[:, P + 1 :] != 0  # (B, 1)
        # no_grad, not inference_mode: dynamo cannot trace the latter
        with torch.inference_mode(False), torch.no_grad():
            return _paged_span(
                self.blocks, self.pool, hidden, table, start, valid, None, self.block_offset
            )

    def _record(self, step: Any, meta: Tensor, hidden: Tensor, P: int) -> tuple[Any, Tensor]:
        device = self.pool.device
        # On the pool's device, explicitly: the capture stream is made on the current
        # device, and a pool on cuda:1 captured from cuda:0 records an empty graph.
        with torch.cuda.device(device):
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(2):  # lazy initialisation (cuBLAS handles, constants) first
                    step(meta, hidden, P)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(
                graph,
                pool=self._graph_pool,
                stream=torch.cuda.Stream(device),
                capture_error_mode="thread_local",
            ):
                output = step(meta, hidden, P)
        return graph, output

    def _capture(self, B: int, P: int, C: int) -> _Captured | None:
        """Capture the (B, P) step, with every row on the null page so no sequence's
        cache is touched; None (and eager from now on) if this span cannot be captured."""
        device, dtype = self.pool.device, self.pool.dtype
        with torch.inference_mode(False):  # normal tensors: a compiled step may read them
            meta = torch.zeros(B, P + 2, dtype=torch.long, device=device)
            hidden = torch.zeros(B, 1, C, dtype=dtype, device=device)
        graph = None
        if self.compile and self.pool.keys[0].is_inference():
            logger.warning("the pool was made under inference_mode: not compiling its steps")
            self.compile = False
        if self.compile:
            if self._compiled is None:
                self._compiled = torch.compile(self._compiled_step_from, dynamic=False)
            try:
                graph, output = self._record(self._compiled, meta, hidden, P)
                self.buckets_compiled += 1
            except Exception:
                logger.warning(
                    "torch.compile failed for batch %d x %d pages; capturing it uncompiled",
                    B,
                    P,
                    exc_info=True,
                )
        if graph is None:
            try:
                graph, output = self._record(self._step_from, meta, hidden, P)
            except Exception:  # a layer that syncs or allocates on the host cannot be captured
                logger.warning(
                    "cannot capture the decode step in a CUDA graph; running it eagerly",
                    exc_info=True,
                )
                self.use_graphs = False
                return None
        self._graph_pool = graph.pool()
        captured = _Captured(meta, hidden, output, graph)
        self._captured[(B, P)] = captured
        logger.info("captured the decode step for batch %d x %d pages", B, P)
        return captured

    def _load(
        self,
        captured: _Captured,
        B: int,
        P: int,
        hidden: Tensor,
        table: Tensor,
        start: Tensor,
        new_valid: Tensor | None,
    ) -> None:
        b, n_p = table.shape
        staging = self._staging.get((B, P))
        if staging is None:
            staging = torch.zeros(B, P + 2, dtype=torch.long, pin_memory=True)
            self._staging[(B, P)] = staging
        if self._copied is not None:
            self._copied.synchronize()  # the last copy out of a staging buffer is done
        staging.zero_()  # padding rows: the null page, start 0, not valid
        staging[:b, :n_p] = table
        staging[:b, P] = start
        staging[:b, P + 1] = 1 if new_valid is None else new_valid.view(b)
        captured.meta.copy_(staging, non_blocking=True)
        captured.hidden[:b].copy_(hidden, non_blocking=True)
        # Padding rows write the null page, which every padded table reads: never let an
        # earlier batch's row (a NaN from a client, say) reach it.
        captured.hidden[b:].zero_()
        self._copied = torch.cuda.Event()
        self._copied.record(torch.cuda.current_stream(self.pool.device))
