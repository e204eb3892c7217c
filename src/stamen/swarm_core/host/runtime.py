"""The host runtime: serve one span of blocks to many clients, without networking.

`SpanRuntime` is what a host's RPC handlers call:

    async with SpanRuntime(span, RuntimeLimits(max_cache_tokens=8192)) as runtime:
        session_id = await runtime.open_session(max_length=512, batch_size=1)
        out = await runtime.step(session_id, hidden, start_position=0)   # (B, T, C)
        await runtime.close_session(session_id)
        out = await runtime.forward(hidden, prompts=prompts)  # stateless, no cache
        grad_hidden, grad_prompts = await runtime.backward(hidden, grad_output, prompts=prompts)

Contract:

1. One KV cache per host: a `models.paged.KVPool` of `max_cache_tokens // kv_page_tokens`
   pages (plus the null page), allocated once by the compute thread when the runtime
   starts, before any other job. Cache follows use (`sessions.CacheBudget`): `open_session`
   hands each row the pages for `min(max_length, cache_page_tokens)` slots or raises
   `RemoteBusy` at once; `max_length` is only the session's upper bound. A step that
   writes past the session's capacity first grows it (doubling, in whole
   `cache_page_tokens`, up to `max_length`, rounded up to whole pool pages); if that is not
   free the step is refused with `RemoteBusy` (and a `retry_after_s` hint) before
   anything runs, and the session stays valid at its old length, so the same step may be
   retried. One session may address at most `max_session_cache_fraction` of the budget
   (batch x length); more is `CacheLimitExceeded` (a `RemoteBadRequest`). Growth copies
   nothing (a row's page list gets longer); new pages are zeroed on the compute thread
   before the first step that uses them. Closing a session returns its pages at once:
   every pool access runs on the compute thread, a queued step of a closed session fails
   `RemoteNotFound` before touching the pool, and the next owner of a page zeroes it
   first.
2. `step` writes the cache at `[start_position, start_position + T)`. `start_position` may
   roll back or replay (entries at and beyond it are overwritten or ignored) but never skip
   past the session's length. The pool keeps which slots hold padding, so a left-padded
   batch stays correct across steps.
3. All compute runs on one thread (`scheduler.ComputeScheduler`). Decode steps (T == 1, no
   deep-prompt slice) of sessions over the same block range are batched continuously:
   each is an item of that range's lane, and one batch runs every row queued there
   (up to `max_batch_rows`) as one `DecodeGraphs.run` (CUDA graphs on a GPU, for the whole
   span's range only; common buckets are captured at start), each row at its own
   position. A lane waits up to `batch_window_s` for the sessions of its last batch, never
   for a lone session (`scheduler`). Every other step (prefill, replay, prompts) runs in chunks of at
   most `prefill_chunk_tokens` rows x tokens, each chunk its own inference job, so decode
   batches run between the chunks of a long prefill. Forward / backward come after both.
   Anything waiting too long in the queue fails with `RemoteTimeout`. A step that fails
   midway shrinks the session's valid length to its start (a chunked step stopped between
   chunks keeps the chunks that ran). Idle sessions are closed by a reaper task owned by
   the runtime. `batching=False` runs each decode step as a job of its own (still over the
   pool); `cuda_graphs=False` runs decode batches eagerly.
4. Every request is validated before anything is allocated; refusals are
   `protocol.errors.RemoteError`s (sent to the client as they are) and the runtime keeps
   serving. A forward / backward of more than `max_bulk_tokens` tokens (B x T, what a
   host announces as `max_request_tokens`) is `RemoteTooLarge` (code "too_large").
5. Deep prompts `(n_blocks of the range, B or 1, P, C)`, P <= `max_prompt_tokens`, are
   added to the hidden states at absolute positions `[0, P)` before each block
   (`stamen.models.chain`). `forward` / `backward` start at position 0 and need P <= T. A
   step at `start_position = s` adds `prompts[:, :, s:min(P, s + T)]` when s < P and
   ignores them otherwise, so a replay from 0 that resends them rebuilds the same cache.
   Prompts are cast to the span's dtype and device; results come back in the dtype (and
   on the device) the request's tensors came in. On a GPU, decode batches go through
   pinned host buffers with one device synchronisation per batch.
6. `backward` keeps nothing between calls: it recomputes the blocks from the client's
   `hidden` under autograd and returns `(grad_hidden, grad_prompts)`, `grad_prompts`
   shaped like the prompts (a batch-1 prompt gets the gradient summed over rows; None
   without prompts). Only the inputs are differentiated: no parameter gets a `.grad`
   and no weight changes, float, int8 and nf4 spans alike.

This module knows nothing about networking, peers (a peer id is only a log label) or
where the span's weights came from.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Protocol

import torch
from torch import Tensor, nn

from stamen.models.base import BlockAdapter, StepContext
from stamen.models.chain import run_blocks
from stamen.models.paged import (
    DEFAULT_PAGE_TOKENS,
    NULL_PAGE,
    DecodeGraphs,
    KVPool,
    pages_for,
    run_paged_span,
)
from stamen.swarm_core.host.scheduler import ComputeScheduler, Priority
from stamen.swarm_core.host.sessions import (
    CacheBudget,
    CacheLimitExceeded,
    Session,
    SessionId,
    check_hidden,
    check_no_gap,
    check_padding_mask,
    check_positive_int,
    check_prompts,
    check_step_position,
    new_session_id,
)
from stamen.swarm_core.protocol.errors import (
    RemoteBadRequest,
    RemoteNotFound,
    RemoteTooLarge,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CacheLimitExceeded",
    "RuntimeInfo",
    "RuntimeLimits",
    "SessionId",
    "ServedSpan",
    "SpanRuntime",
    "cache_bytes_per_token",
    "measure_throughput",
]


class ServedSpan(Protocol):
    """What the runtime needs of a loaded span (`stamen.models.loading.Span` fits)."""

    config: Any
    adapter: BlockAdapter
    start: int
    end: int
    blocks: nn.ModuleList


@dataclass(frozen=True)
class RuntimeLimits:
    max_cache_tokens: int  # per block, shared by all sessions (rounded down to pool pages)
    cache_page_tokens: int = 128  # a session's first reservation; growth rounds to these
    max_session_cache_fraction: float = 0.5  # of max_cache_tokens, for any one session
    busy_retry_after_s: float = 1.0  # the hint sent with a cache refusal
    session_idle_timeout_s: float = 300.0
    step_timeout_s: float = 30.0  # longest wait in the queue before a step (chunk) starts
    bulk_timeout_s: float = 120.0  # same for forward / backward
    max_batch_size: int = 64
    max_session_length: int = 8192
    max_bulk_tokens: int = 16384  # B * T of one forward / backward: max_request_tokens
    max_prompt_tokens: int = 1024  # P of deep prompts
    max_queued_jobs: int = 1024
    reaper_interval_s: float = 1.0
    batching: bool = True  # merge sessions' decode steps into one batch per block range
    max_batch_rows: int = 64  # rows (sessions x their batch) in one decode batch
    prefill_chunk_tokens: int = 512  # rows x tokens of one prefill chunk
    cuda_graphs: bool = True  # replay decode batches as CUDA graphs (on a GPU)
    kv_page_tokens: int = DEFAULT_PAGE_TOKENS  # slots per pool page
    # a decode batch waits up to this long for the rest of its last batch's sessions
    # (never when a single session is active: scheduler.ComputeScheduler)
    batch_window_s: float = 0.005
    compile: bool = False  # torch.compile each captured decode bucket (GPU; slow first use)

    def __post_init__(self) -> None:
        if self.max_cache_tokens < 0:
            raise ValueError(f"max_cache_tokens must be >= 0, got {self.max_cache_tokens}")
        for name in (
            "cache_page_tokens",
            "max_batch_size",
            "max_session_length",
            "max_bulk_tokens",
            "max_prompt_tokens",
            "max_queued_jobs",
            "max_batch_rows",
            "prefill_chunk_tokens",
            "kv_page_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "session_idle_timeout_s",
            "step_timeout_s",
            "bulk_timeout_s",
            "busy_retry_after_s",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.batch_window_s <= 1:
            raise ValueError(f"batch_window_s must be in [0, 1], got {self.batch_window_s}")
        if not self.reaper_interval_s > 0:
            raise ValueError(f"reaper_interval_s must be > 0, got {self.reaper_interval_s}")
        if not 0 < self.max_session_cache_fraction <= 1:
            raise ValueError(
                "max_session_cache_fraction must be in (0, 1], "
                f"got {self.max_session_cache_fraction}"
            )

    @property
    def max_session_cache_tokens(self) -> int:
        """The most cache tokens (batch x length, per block) one session may address."""
        return int(self.max_cache_tokens * self.max_session_cache_fraction)

    @property
    def num_pages(self) -> int:
        """Pages of the host's pool, the null page included."""
        return self.max_cache_tokens // self.kv_page_tokens + 1


@dataclass(frozen=True)
class RuntimeInfo:
    start: int
    end: int
    sessions_open: int
    cache_tokens_total: int  # the pool's pages (the null page aside) x kv_page_tokens
    cache_tokens_free: int
    session_cache_tokens_max: int  # what one session may address (batch x length)
    queue_depth: int
    steps: int
    tokens_processed: int  # by steps, forward and backward together
    batches: int  # decode batches run (one per DecodeGraphs.run)
    batched_rows: int  # rows in them, over all batches
    graphs_captured: int  # CUDA graphs captured for decode batches
    # Wall seconds, summed: in `step` (queueing included), and the compute thread's in
    # decode batches (device synchronisation included). Per step, their difference is what
    # the runtime adds around the compute; the server's RPC handling comes on top.
    step_seconds: float
    decode_seconds: float


def cache_bytes_per_token(span: ServedSpan) -> int:
    """KV-cache bytes one token takes across the whole span (to size `max_cache_tokens`)."""
    shape = span.adapter.kv_shape(span.config)
    element_bytes = torch.empty((), dtype=_span_dtype(span)).element_size()
    return 2 * shape.num_kv_heads * shape.head_dim * element_bytes * len(span.blocks)


def _span_dtype(span: ServedSpan) -> torch.dtype:
    for param in span.blocks.parameters():  # a block may have none (an identity, say)
        if param.dtype.is_floating_point:
            return param.dtype
    return torch.float32


def _span_device(span: ServedSpan) -> torch.device:
    for param in span.blocks.parameters():
        return param.device
    return torch.device("cpu")


def _batch_buckets(max_rows: int) -> tuple[int, ...]:
    """Powers of two up to the first one holding `max_rows` rows."""
    return tuple(1 << i for i in range((max_rows - 1).bit_length() + 1))


@dataclass(eq=False)
class _Decode:
    """One session's decode step, as queued in its block range's lane."""

    session: Session
    hidden: Tensor  # (B, 1, C) as the request sent it
    start: int
    mask: Tensor | None  # (B, 1) bool, or None: every row real


class _Staging:
    """Pinned host buffers for the rows of decode batches on a GPU, reused across batches.

    A batch fills `input` from its requests (the one cast to the span's dtype), the device
    reads it asynchronously, and the output comes back into `output` with one
    synchronisation, which also guarantees the input copy is done before the next batch
    writes `input` again.
    """

    def __init__(self, rows: int, hidden_size: int, dtype: torch.dtype) -> None:
        shape = (rows, 1, hidden_size)
        self.input = torch.empty(shape, dtype=dtype, pin_memory=True)  # (rows, 1, C)
        self.output = torch.empty(shape, dtype=dtype, pin_memory=True)

    @property
    def rows(self) -> int:
        return self.input.shape[0]


class SpanRuntime:
    def __init__(self, span: ServedSpan, limits: RuntimeLimits) -> None:
        if not span.blocks:
            raise ValueError("a span needs at least one block")
        self.span = span
        self.limits = limits
        self.hidden_size = int(span.config.hidden_size)
        self.dtype = _span_dtype(span)
        self.device = _span_device(span)
        self._budget = CacheBudget(
            limits.num_pages,
            page_tokens=limits.kv_page_tokens,
            growth_tokens=limits.cache_page_tokens,
            max_session_tokens=limits.max_session_cache_tokens,
            retry_after_s=limits.busy_retry_after_s,
        )
        self._sessions: dict[SessionId, Session] = {}
        self._block_slices: dict[tuple[int, int], nn.ModuleList] = {}
        self._scheduler = ComputeScheduler(
            max_queued_jobs=limits.max_queued_jobs, batch_window_s=limits.batch_window_s
        )
        self._reaper: asyncio.Task[None] | None = None
        self._steps = 0
        self._tokens_processed = 0
        # Compute-thread state: the pool, one DecodeGraphs per block range, GPU staging.
        self._pool: KVPool | None = None
        self._decoders: dict[tuple[int, int], DecodeGraphs] = {}
        self._staging: _Staging | None = None
        self._batches = 0
        self._batched_rows = 0
        self._step_s = 0.0
        self._decode_s = 0.0
        self._graphs_captured = 0  # summed here, so info() never walks the decoders

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._scheduler.start()
        if self._pool is None:
            # Nothing is queued ahead of it, so the deadline only bounds a stuck thread.
            await self._scheduler.run(
                self._allocate_pool,
                priority=Priority.INFERENCE,
                queue_timeout_s=self.limits.bulk_timeout_s,
            )
        if self.device.type == "cuda" and self.limits.cuda_graphs:
            await self._scheduler.run(
                self._prepare_graphs,
                priority=Priority.INFERENCE,
                queue_timeout_s=self.limits.bulk_timeout_s,
            )
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap_idle(), name="stamen-session-reaper")

    async def aclose(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        for session_id in list(self._sessions):
            self._close(session_id, reason="runtime closed")
        await self._scheduler.aclose()
        # The compute thread is gone: let the pool, the graphs and the staging go.
        self._pool, self._staging = None, None
        self._decoders.clear()

    async def __aenter__(self) -> SpanRuntime:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def info(self) -> RuntimeInfo:
        return RuntimeInfo(
            start=self.span.start,
            end=self.span.end,
            sessions_open=len(self._sessions),
            cache_tokens_total=self._budget.total_tokens,
            cache_tokens_free=self._budget.free_tokens,
            session_cache_tokens_max=self._budget.max_session_tokens,
            queue_depth=self._scheduler.queue_depth,
            steps=self._steps,
            tokens_processed=self._tokens_processed,
            batches=self._batches,
            batched_rows=self._batched_rows,
            graphs_captured=self._graphs_captured,
            step_seconds=self._step_s,
            decode_seconds=self._decode_s,
        )

    # -- sessions -----------------------------------------------------------------------

    def block_range(self, requested: tuple[int, int] | None) -> tuple[int, int]:
        """Validate absolute block indices `[start, end)` inside the span (None: all)."""
        if requested is None:
            return self.span.start, self.span.end
        start, end = requested
        if not self.span.start <= start < end <= self.span.end:
            raise RemoteBadRequest(
                f"blocks [{start}, {end}) are not inside this host's span "
                f"[{self.span.start}, {self.span.end})"
            )
        return start, end

    def _blocks(self, block_range: tuple[int, int]) -> nn.ModuleList:
        # Slicing a ModuleList builds a new module each time (~15 us); steps ask for the
        # same few ranges over and over.
        blocks = self._block_slices.get(block_range)
        if blocks is None:
            start, end = block_range
            blocks = self.span.blocks[start - self.span.start : end - self.span.start]
            self._block_slices[block_range] = blocks
        return blocks

    async def open_session(
        self,
        max_length: int,
        batch_size: int = 1,
        *,
        block_range: tuple[int, int] | None = None,
        peer_label: str | None = None,
    ) -> SessionId:
        """Open a session over `block_range` (absolute indices; default: the whole span),
        reserving its first pages. A client may enter a host anywhere inside its span."""
        check_positive_int(max_length, "max_length", maximum=self.limits.max_session_length)
        check_positive_int(batch_size, "batch_size", maximum=self.limits.max_batch_size)
        blocks = self.block_range(block_range)
        session = Session(new_session_id(), batch_size, max_length, blocks, peer_label)
        self._budget.first_page(session)
        self._sessions[session.session_id] = session
        logger.info(
            "session %s opened: blocks [%d, %d), batch %d x %d slots reserved "
            "(max_length %d), peer %s",
            session.session_id,
            *blocks,
            batch_size,
            session.capacity,
            max_length,
            peer_label or "-",
        )
        return session.session_id

    async def close_session(self, session_id: SessionId) -> None:
        self._session(session_id)
        self._close(session_id, reason="closed by client")

    def _session(self, session_id: object) -> Session:
        session = self._sessions.get(SessionId(session_id)) if isinstance(session_id, str) else None
        if session is None:
            raise RemoteNotFound(
                f"no open session {session_id!r} (never opened, closed or expired)"
            )
        return session

    def _close(self, session_id: SessionId, *, reason: str) -> None:
        session = self._sessions.pop(session_id)
        session.closed = True
        reserved = session.reserved_tokens
        # Safe while a step of it runs: whoever gets these pages next zeroes them on the
        # compute thread, after that step.
        self._budget.release(session)
        logger.info(
            "session %s closed (%s): blocks [%d, %d), %d cache tokens, %d tokens processed, "
            "open %.1f s, peer %s",
            session_id,
            reason,
            *session.block_range,
            reserved,
            session.tokens_processed,
            time.monotonic() - session.opened_s,
            session.peer_label or "-",
        )

    async def _reap_idle(self) -> None:
        timeout_s = self.limits.session_idle_timeout_s
        while True:
            await asyncio.sleep(min(self.limits.reaper_interval_s, timeout_s))
            now = time.monotonic()
            for session in list(self._sessions.values()):
                if session.in_flight == 0 and now - session.last_active_s > timeout_s:
                    self._close(session.session_id, reason=f"idle for over {timeout_s:g} s")

    # -- requests -----------------------------------------------------------------------

    async def step(
        self,
        session_id: SessionId,
        hidden: Tensor,
        start_position: int,
        padding_mask: Tensor | None = None,
        prompts: Tensor | None = None,
    ) -> Tensor:
        """Run `hidden` (B, T, C) through the session's blocks, caching its keys and values;
        `prompts` (n_blocks, B or 1, P, C) count from position 0 (contract, 5)."""
        session = self._session(session_id)
        hidden = check_hidden(hidden, hidden_size=self.hidden_size, batch_size=session.batch_size)
        B, T, _ = hidden.shape
        mask = check_padding_mask(padding_mask, B, T)
        start = check_step_position(session, start_position, T)
        prompts = self._check_prompts(prompts, session.block_range, B)
        step_prompts = None
        if prompts is not None and start < prompts.shape[2]:
            step_prompts = prompts[:, :, start : start + T]  # (n, B or 1, P', C), a view
        if session.in_flight == 0:
            # Nothing of this session is queued or running, so its length is settled:
            # refuse a gap before growing the reservation for it.
            check_no_gap(session, start)
        self._budget.grow(session, start + T)  # or RemoteBusy / CacheLimitExceeded; nothing ran
        session.in_flight += 1
        session.touch()
        began_s = time.perf_counter()
        try:
            if T == 1 and step_prompts is None:
                return await self._decode(_Decode(session, hidden, start, mask))
            return await self._prefill(session, hidden, start, mask, step_prompts)
        finally:
            session.in_flight -= 1
            session.touch()
            self._step_s += time.perf_counter() - began_s

    async def _decode(self, item: _Decode) -> Tensor:
        limits = self.limits
        if limits.batching and item.session.batch_size <= limits.max_batch_rows:
            result: Tensor = await self._scheduler.run_batched(
                item.session.block_range,
                item,
                self._compute_decode_batch,
                weight=item.session.batch_size,
                max_weight=limits.max_batch_rows,
                queue_timeout_s=limits.step_timeout_s,
            )
            return result
        return await self._scheduler.run(
            lambda: _result_of(self._compute_decode_batch([item])[0]),
            priority=Priority.INFERENCE,
            queue_timeout_s=limits.step_timeout_s,
        )

    async def _prefill(
        self,
        session: Session,
        hidden: Tensor,
        start: int,
        mask: Tensor | None,
        prompts: Tensor | None,
    ) -> Tensor:
        """The step in chunks of at most `prefill_chunk_tokens` rows x tokens, each its own
        inference job, written into one output tensor."""
        B, T, C = hidden.shape
        chunk = max(1, self.limits.prefill_chunk_tokens // B)
        if chunk >= T:
            return await self._run_chunk(session, hidden, start, (0, T), mask, prompts, None)
        out = torch.empty(B, T, C, dtype=hidden.dtype, device=hidden.device)  # (B, T, C)
        for first in range(0, T, chunk):
            piece = (first, min(T, first + chunk))
            await self._run_chunk(session, hidden, start, piece, mask, prompts, out)
        return out

    async def _run_chunk(
        self,
        session: Session,
        hidden: Tensor,
        start: int,
        piece: tuple[int, int],
        mask: Tensor | None,
        prompts: Tensor | None,
        out: Tensor | None,
    ) -> Tensor:
        result: Tensor = await self._scheduler.run(
            lambda: self._compute_chunk(session, hidden, start, piece, mask, prompts, out),
            priority=Priority.INFERENCE,
            queue_timeout_s=self.limits.step_timeout_s,
        )
        return result

    async def forward(
        self,
        hidden: Tensor,
        padding_mask: Tensor | None = None,
        prompts: Tensor | None = None,
        *,
        block_range: tuple[int, int] | None = None,
    ) -> Tensor:
        """Stateless forward over `block_range` (no cache); lower priority than steps."""
        blocks_range = self.block_range(block_range)
        hidden, mask, prompts = self._check_bulk(hidden, padding_mask, prompts, blocks_range)
        blocks = self._blocks(blocks_range)
        return await self._scheduler.run(
            lambda: self._compute_forward(blocks, hidden, mask, prompts),
            priority=Priority.BULK,
            queue_timeout_s=self.limits.bulk_timeout_s,
        )

    async def backward(
        self,
        hidden: Tensor,
        grad_output: Tensor,
        padding_mask: Tensor | None = None,
        prompts: Tensor | None = None,
        *,
        block_range: tuple[int, int] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Gradients `(d hidden (B, T, C), d prompts or None)` of the output of
        `block_range` run on `hidden`, given `grad_output` (B, T, C) (contract, 6)."""
        blocks_range = self.block_range(block_range)
        hidden, mask, prompts = self._check_bulk(hidden, padding_mask, prompts, blocks_range)
        blocks = self._blocks(blocks_range)
        grad_output = check_hidden(grad_output, hidden_size=self.hidden_size, name="grad_output")
        if grad_output.shape != hidden.shape:
            raise RemoteBadRequest(
                f"grad_output has shape {tuple(grad_output.shape)}, "
                f"hidden has {tuple(hidden.shape)}"
            )
        return await self._scheduler.run(
            lambda: self._compute_backward(blocks, hidden, grad_output, mask, prompts),
            priority=Priority.BULK,
            queue_timeout_s=self.limits.bulk_timeout_s,
        )

    def _check_bulk(
        self,
        hidden: Tensor,
        padding_mask: Tensor | None,
        prompts: Tensor | None,
        block_range: tuple[int, int],
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        hidden = check_hidden(hidden, hidden_size=self.hidden_size)
        B, T, _ = hidden.shape
        if B * T > self.limits.max_bulk_tokens:
            raise RemoteTooLarge(
                f"{B * T} tokens (batch {B} x {T}) in one request; this host takes at most "
                f"{self.limits.max_bulk_tokens} (max_request_tokens): split the batch"
            )
        mask = check_padding_mask(padding_mask, B, T)
        return hidden, mask, self._check_prompts(prompts, block_range, B, num_tokens=T)

    def _check_prompts(
        self,
        prompts: Tensor | None,
        block_range: tuple[int, int],
        batch_size: int,
        *,
        num_tokens: int | None = None,
    ) -> Tensor | None:
        start, end = block_range
        return check_prompts(
            prompts,
            num_blocks=end - start,
            batch_size=batch_size,
            hidden_size=self.hidden_size,
            max_tokens=self.limits.max_prompt_tokens,
            num_tokens=num_tokens,
        )

    # -- compute (runs on the scheduler's thread only) ----------------------------------

    def _allocate_pool(self) -> None:
        if self.device.type == "cuda":
            # The compute thread's current device is the span's: streams, events and graph
            # captures made without naming a device land on it.
            torch.cuda.set_device(self.device)
        limits = self.limits
        self._pool = KVPool(
            self.span.adapter,
            self.span.config,
            len(self.span.blocks),
            limits.num_pages,
            page_tokens=limits.kv_page_tokens,
            dtype=self.dtype,
            device=self.device,
        )
        logger.info(
            "KV pool: %d pages of %d tokens, %.1f MiB on %s",
            limits.num_pages - 1,
            limits.kv_page_tokens,
            self._pool.nbytes() / 2**20,
            self.device,
        )

    def _pool_for(self, session: Session) -> KVPool:
        """The pool, with the session's newly handed pages zeroed (closed: NotFound)."""
        if session.closed:
            raise RemoteNotFound(f"session {session.session_id!r} was closed before its step ran")
        pool = self._pool
        assert pool is not None, "the runtime was not started"
        pool.clear_pages(session.take_pages_to_clear())
        return pool

    def _table(self, session: Session, num_pages: int, width: int) -> list[list[int]]:
        """Each row's first `num_pages` pages, padded with the null page to `width`."""
        if session.row_pages < num_pages:  # the budget grows a session before its step
            raise RuntimeError(f"session holds {session.row_pages} pages, needs {num_pages}")
        padding = [NULL_PAGE] * (width - num_pages)
        return [row[:num_pages] + padding for row in session.pages]

    def _compute_chunk(
        self,
        session: Session,
        hidden: Tensor,
        step_start: int,
        piece: tuple[int, int],
        mask: Tensor | None,
        prompts: Tensor | None,
        out: Tensor | None,
    ) -> Tensor:
        """Tokens `[first, end)` of a step starting at `step_start`, written into `out`
        (the whole step's output) when given. `prompts`: the step's slice, or None."""
        pool = self._pool_for(session)
        first, end = piece
        chunk_start = step_start + first
        check_no_gap(session, chunk_start)
        B = session.batch_size
        num_pages = pages_for(step_start + end, pool.page_tokens)
        table = torch.tensor(self._table(session, num_pages, num_pages), device=pool.device)
        start = torch.full((B,), chunk_start, dtype=torch.long, device=pool.device)
        valid = None if mask is None else mask[:, first:end].to(pool.device)
        p = None
        if prompts is not None and first < prompts.shape[2]:
            p = _on(prompts[:, :, first:end], pool.device, pool.dtype)
        # Slots from the chunk's start on are being rewritten: if a block fails midway
        # they are neither old nor new, and the whole step has failed.
        session.length = chunk_start
        try:
            x = _on(hidden[:, first:end], pool.device, pool.dtype)  # (B, t, C)
            y = run_paged_span(
                self._blocks(session.block_range),
                pool,
                x,
                table,
                start,
                valid,
                p,
                block_offset=session.block_range[0] - self.span.start,
            )
        except BaseException:
            session.length = step_start
            raise
        session.length = step_start + end
        tokens = B * (end - first)
        session.tokens_processed += tokens
        self._tokens_processed += tokens
        if end == hidden.shape[1]:
            self._steps += 1
        if out is None:
            return _on(y, hidden.device, hidden.dtype)
        out[:, first:end] = y
        return out

    def _compute_decode_batch(self, items: list[_Decode]) -> list[Tensor | BaseException]:
        """The batch function of the decode lanes: one result per item, in order.

        A session's second item (which a client waiting for its steps never sends) runs
        after its first, in a batch of its own."""
        results: list[Tensor | BaseException] = [RemoteNotFound("not run")] * len(items)
        pending = list(range(len(items)))
        while pending:
            wave: list[int] = []
            later: list[int] = []
            seen: set[int] = set()
            for index in pending:
                key = id(items[index].session)
                (later if key in seen else wave).append(index)
                seen.add(key)
            self._run_decode_wave(items, wave, results)
            pending = later
        return results

    def _run_decode_wave(
        self, items: list[_Decode], indices: list[int], results: list[Tensor | BaseException]
    ) -> None:
        """One decode batch of items of distinct sessions; fills their `results`."""
        live: list[int] = []
        for index in indices:
            item = items[index]
            try:
                self._pool_for(item.session)  # NotFound once closed
                check_no_gap(item.session, item.start)
            except (RemoteNotFound, RemoteBadRequest) as error:  # this item only
                results[index] = error
                continue
            live.append(index)
        if not live:
            return
        batch = [items[index] for index in live]
        for item in batch:
            item.session.length = item.start  # its slot is being rewritten
        began_s = time.perf_counter()
        try:
            outputs = self._run_decode_rows(batch)
        except Exception as error:  # every item of this batch failed
            for index in live:
                results[index] = error
            return
        finally:
            self._decode_s += time.perf_counter() - began_s
        for index, item, output in zip(live, batch, outputs, strict=True):
            session = item.session
            session.length = item.start + 1
            session.tokens_processed += session.batch_size
            results[index] = output
        rows = sum(item.session.batch_size for item in batch)
        self._steps += len(batch)
        self._tokens_processed += rows
        self._batches += 1
        self._batched_rows += rows
        self._graphs_captured = sum(d.graphs_captured for d in self._decoders.values())

    def _run_decode_rows(self, batch: list[_Decode]) -> list[Tensor]:
        """One `DecodeGraphs.run` over the rows of `batch` (all of one block range);
        returns each item's (B, 1, C) in its request's dtype and device."""
        pool = self._pool
        assert pool is not None
        table, start, valid = self._decode_meta(batch, pool.page_tokens)
        decoder = self._decoder(batch[0].session.block_range)
        if pool.device.type == "cuda" and all(item.hidden.device.type == "cpu" for item in batch):
            return self._decode_staged(decoder, batch, table, start, valid)
        x = torch.cat([_on(item.hidden, pool.device, pool.dtype) for item in batch])  # (rows, 1, C)
        y = decoder.run(x, table, start, valid)  # (rows, 1, C)
        # Copies: the decoder's output may be a static buffer that the next batch reuses.
        return [
            y[rows].to(device=item.hidden.device, dtype=item.hidden.dtype, copy=True)
            for item, rows in zip(batch, _row_slices(batch), strict=True)
        ]

    def _decode_meta(
        self, batch: list[_Decode], page_tokens: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """CPU tensors of a batch's rows: table (rows, n_p), each row's pages padded with the
        null page to the widest; start (rows,); new_valid (rows, 1), None if all real."""
        needed = [pages_for(item.start + 1, page_tokens) for item in batch]
        width = max(needed)
        pages = [
            row
            for item, n in zip(batch, needed, strict=True)
            for row in self._table(item.session, n, width)
        ]
        table = torch.tensor(pages, dtype=torch.long)  # (rows, width)
        starts = [item.start for item in batch for _ in range(item.session.batch_size)]
        start = torch.tensor(starts, dtype=torch.long)  # (rows,)
        if all(item.mask is None for item in batch):
            return table, start, None
        masks = [
            torch.ones(item.session.batch_size, 1, dtype=torch.bool)
            if item.mask is None
            else item.mask
            for item in batch
        ]
        return table, start, torch.cat(masks)  # (rows, 1)

    def _decode_staged(
        self,
        decoder: DecodeGraphs,
        batch: list[_Decode],
        table: Tensor,
        start: Tensor,
        valid: Tensor | None,
    ) -> list[Tensor]:
        """`_run_decode_rows` for CPU requests on a GPU: rows in and out through pinned
        buffers, asynchronous copies, one synchronisation."""
        rows = table.shape[0]
        staging = self._staging
        if staging is None or staging.rows < rows:
            size = max(rows, self.limits.max_batch_rows)
            staging = self._staging = _Staging(size, self.hidden_size, self.dtype)
        x = staging.input[:rows]  # (rows, 1, C) pinned
        slices = _row_slices(batch)
        for item, item_rows in zip(batch, slices, strict=True):
            x[item_rows].copy_(item.hidden)  # the one cast into the span's dtype
        y = decoder.run(x, table, start, valid)  # (rows, 1, C) on the GPU
        host = staging.output[:rows]
        host.copy_(y, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        # Copies: the staging buffer is reused by the next batch.
        return [
            host[item_rows].to(dtype=item.hidden.dtype, copy=True)
            for item, item_rows in zip(batch, slices, strict=True)
        ]

    def _prepare_graphs(self) -> None:
        """Capture the whole span's common decode buckets before serving: batches up to 8
        rows, contexts up to 256 tokens (up to 4 pages, batch 1, when compiling). Others
        are captured when first used."""
        decoder = self._decoder((self.span.start, self.span.end))
        began_s = time.monotonic()
        if self.limits.compile:
            decoder.prepare(self.hidden_size, (1,), (1, 2, 4))
        else:
            decoder.prepare(self.hidden_size, (1, 2, 4, 8), (1, 2, 4, 8, 16))
        logger.info(
            "decode graphs: %d buckets captured in %.1f s",
            decoder.graphs_captured,
            time.monotonic() - began_s,
        )

    def _decoder(self, block_range: tuple[int, int]) -> DecodeGraphs:
        decoder = self._decoders.get(block_range)
        if decoder is None:
            pool = self._pool
            assert pool is not None
            limits = self.limits
            # Graphs for the whole span only: a client may open sessions over any of its
            # sub-ranges, and each would otherwise keep graphs (and their memory) of its
            # own. Sessions entering mid-span decode eagerly, still batched.
            whole = block_range == (self.span.start, self.span.end)
            decoder = DecodeGraphs(
                self._blocks(block_range),
                pool,
                block_offset=block_range[0] - self.span.start,
                batch_buckets=_batch_buckets(max(limits.max_batch_rows, limits.max_batch_size)),
                use_graphs=None if limits.cuda_graphs and whole else False,
                compile=limits.compile,
            )
            self._decoders[block_range] = decoder
        return decoder

    def _bulk_context(self, hidden: Tensor, mask: Tensor | None) -> StepContext:
        B, T, _ = hidden.shape
        return StepContext.make(0, T, batch_size=B, key_padding_mask=mask, device=self.device)

    def _compute_forward(
        self,
        blocks: Iterable[nn.Module],
        hidden: Tensor,
        mask: Tensor | None,
        prompts: Tensor | None,
    ) -> Tensor:
        context = self._bulk_context(hidden, mask)
        with torch.inference_mode():
            x = _on(hidden, self.device, self.dtype)  # (B, T, C)
            p = None if prompts is None else _on(prompts, self.device, self.dtype)
            x = run_blocks(blocks, x, context, p)
        self._tokens_processed += hidden.shape[0] * hidden.shape[1]
        return x.to(device=hidden.device, dtype=hidden.dtype)

    def _compute_backward(
        self,
        blocks: Iterable[nn.Module],
        hidden: Tensor,
        grad_output: Tensor,
        mask: Tensor | None,
        prompts: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        context = self._bulk_context(hidden, mask)
        # Fresh leaves (detached views): the caller's tensors get no autograd history.
        x = _on(hidden, self.device, self.dtype).detach().requires_grad_(True)  # (B, T, C)
        p = None
        if prompts is not None:
            p = _on(prompts, self.device, self.dtype).detach().requires_grad_(True)
        inputs = (x,) if p is None else (x, p)
        with torch.enable_grad():
            y = run_blocks(blocks, x, context, p)  # (B, T, C)
            # Gradients w.r.t. the inputs only: parameters stay frozen, no .grad is written.
            grads = torch.autograd.grad(y, inputs, _on(grad_output, y.device, y.dtype))
        self._tokens_processed += hidden.shape[0] * hidden.shape[1]
        grad_hidden = grads[0].to(device=hidden.device, dtype=hidden.dtype)
        if prompts is None:
            return grad_hidden, None
        # A batch-1 prompt broadcast over B rows: autograd already summed its gradient.
        return grad_hidden, grads[1].to(device=prompts.device, dtype=prompts.dtype)


def _row_slices(batch: list[_Decode]) -> list[slice]:
    """Where each item's rows lie in its batch."""
    slices, first = [], 0
    for item in batch:
        slices.append(slice(first, first + item.session.batch_size))
        first += item.session.batch_size
    return slices


def _result_of(result: Tensor | BaseException) -> Tensor:
    if isinstance(result, BaseException):
        raise result
    return result


def _on(tensor: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """`tensor` on `device` as `dtype`, skipping `.to` (a dispatcher round) when it is."""
    if tensor.dtype == dtype and tensor.device == device:
        return tensor
    return tensor.to(device=device, dtype=dtype)


def measure_throughput(
    span: ServedSpan,
    *,
    kind: Literal["decode", "forward"] = "decode",
    batch_size: int = 1,
    forward_tokens: int = 32,
    duration_s: float = 0.5,
    cuda_graphs: bool = True,
) -> float:
    """Tokens per second through the whole span, measured for about `duration_s`.

    "decode" runs single-token steps the way a host serves them: `batch_size` rows over a
    page pool through `DecodeGraphs` (CUDA graphs on a GPU unless `cuda_graphs=False`),
    hidden states sent from and returned to host memory. "forward" runs stateless
    forwards of `forward_tokens` tokens (fine-tuning, prefill-like work). One untimed
    warm-up call comes first; at least one timed call always runs.
    """
    dtype, device = _span_dtype(span), _span_device(span)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this thread's, as on the compute thread
    C = int(span.config.hidden_size)
    run: Callable[[int], None]
    if kind == "decode":
        max_length, page_tokens = 64, DEFAULT_PAGE_TOKENS
        row_pages = pages_for(max_length, page_tokens)
        pool = KVPool(
            span.adapter,
            span.config,
            len(span.blocks),
            1 + batch_size * row_pages,
            page_tokens=page_tokens,
            dtype=dtype,
            device=device,
        )
        pages = list(range(1, pool.num_pages))
        pool.clear_pages(pages)
        table = torch.tensor(pages).view(batch_size, row_pages)  # (B, n_p)
        decoder = DecodeGraphs(span.blocks, pool, use_graphs=None if cuda_graphs else False)
        pinned = device.type == "cuda"
        x = torch.randn(batch_size, 1, C, dtype=dtype, pin_memory=pinned)  # (B, 1, C)
        out = torch.empty_like(x, pin_memory=pinned)

        def run(i: int) -> None:
            # Positions wrap around: rewriting old slots is a legal rollback.
            start = torch.full((batch_size,), i % max_length, dtype=torch.long)
            out.copy_(decoder.run(x, table, start), non_blocking=pinned)
            _synchronize(device)

        tokens_per_call = batch_size
    elif kind == "forward":
        x = torch.randn(batch_size, forward_tokens, C, dtype=dtype, device=device)  # (B, T, C)
        context = StepContext.make(0, forward_tokens, batch_size=batch_size, device=device)

        def run(i: int) -> None:
            h = x
            for block in span.blocks:
                h = block(h, None, context)

        tokens_per_call = batch_size * forward_tokens
    else:
        raise ValueError(f"kind must be 'decode' or 'forward', got {kind!r}")

    with torch.inference_mode():
        run(0)
        _synchronize(device)
        calls, started_s = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - started_s < duration_s:
            run(calls + 1)
            calls += 1
        _synchronize(device)
        elapsed_s = time.perf_counter() - started_s
    return calls * tokens_per_call / elapsed_s


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
