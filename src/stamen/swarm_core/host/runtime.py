"""The host runtime: serve one span of blocks to many clients, without networking.

`SpanRuntime` is what a host's RPC handlers call:

    async with SpanRuntime(span, RuntimeLimits(max_cache_tokens=8192)) as runtime:
        session_id = await runtime.open_session(max_length=512, batch_size=1)
        out = await runtime.step(session_id, hidden, start_position=0)   # (B, T, C)
        await runtime.close_session(session_id)
        out = await runtime.forward(hidden, prompts=prompts)  # stateless, no cache
        grad_hidden, grad_prompts = await runtime.backward(hidden, grad_output, prompts=prompts)

Contract:

1. Cache follows use (`sessions.CacheBudget`). `open_session` reserves one page
   (`min(max_length, cache_page_tokens) * batch_size` tokens in every block) or raises
   `RemoteBusy` at once; `max_length` is only the session's upper bound. A step that writes
   past the session's capacity first grows the reservation (doubling, in whole pages,
   up to `max_length`); if that is not free the step is refused with `RemoteBusy` (and a
   `retry_after_s` hint) before anything runs, and the session stays valid at its old
   length, so the same step may be retried. One session may hold at most
   `max_session_cache_fraction` of the budget; growth past that is `CacheLimitExceeded`
   (a `RemoteBadRequest`). Closing a session returns all of it to the budget at once.
   Buffers are allocated, and grown (new buffers, filled prefix copied), by the compute
   thread when a step needs them: an open costs ~12 us and no memory, and zero-filling
   a large cache (94 MB for SmolLM2's 30 blocks at 2048 tokens: ~70-140 ms on a loaded
   2-core CPU) never runs on the event loop.
2. `step` writes the cache at `[start_position, start_position + T)`. `start_position` may
   roll back or replay (entries at and beyond it are overwritten or ignored) but never skip
   past the session's length. The session keeps its key padding mask history, so a
   left-padded batch stays correct across steps.
3. All compute runs on one thread (`scheduler.ComputeScheduler`): inference steps before
   forward/backward, each job failing with `RemoteTimeout` if it waits too long in the queue.
   Idle sessions are closed by a reaper task owned by the runtime.
4. Every request is validated before anything is allocated; refusals are
   `protocol.errors.RemoteError`s (sent to the client as they are) and the runtime keeps
   serving. A forward / backward of more than `max_bulk_tokens` tokens (B x T, what a
   host announces as `max_request_tokens`) is `RemoteTooLarge` (code "too_large").
5. Deep prompts `(n_blocks of the range, B or 1, P, C)`, P <= `max_prompt_tokens`, are
   added to the hidden states at absolute positions `[0, P)` before each block
   (`stamen.models.chain`). `forward` / `backward` start at position 0 and need P <= T. A
   step at `start_position = s` adds `prompts[:, :, s:min(P, s + T)]` when s < P and
   ignores them otherwise, so a replay from 0 that resends them rebuilds the same cache.
   Prompts are cast to the span's dtype and device; results come back in the dtype the
   request's tensors came in.
6. `backward` keeps nothing between calls: it recomputes the blocks from the client's
   `hidden` under autograd and returns `(grad_hidden, grad_prompts)`, `grad_prompts`
   shaped like the prompts (a batch-1 prompt gets the gradient summed over rows; None
   without prompts). Only the inputs are differentiated: no parameter gets a `.grad`
   and no weight changes, float, int8 and nf4 spans alike.

Not done: continuous batching of different sessions' decode steps into one block call.
The block contract takes one `KVCache` and one `StepContext` with a single `offset`, while
each session owns its own buffers at its own length; merging them would copy every
session's cache per step (doubling the memory traffic that bounds decode) unless the
cache becomes a shared paged pool with per-row offsets, which is a change to
`stamen.models.base`. Until then concurrent sessions take turns, one step per job.

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
from stamen.models.chain import SpanCache, run_blocks, run_span
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
    max_cache_tokens: int  # per block, shared by all sessions
    cache_page_tokens: int = 128  # a session's first reservation; growth rounds to pages
    max_session_cache_fraction: float = 0.5  # of max_cache_tokens, for any one session
    busy_retry_after_s: float = 1.0  # the hint sent with a cache refusal
    session_idle_timeout_s: float = 300.0
    step_timeout_s: float = 30.0  # longest wait in the queue before a step starts
    bulk_timeout_s: float = 120.0  # same for forward / backward
    max_batch_size: int = 64
    max_session_length: int = 8192
    max_bulk_tokens: int = 16384  # B * T of one forward / backward: max_request_tokens
    max_prompt_tokens: int = 1024  # P of deep prompts
    max_queued_jobs: int = 1024
    reaper_interval_s: float = 1.0

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
        if not self.reaper_interval_s > 0:
            raise ValueError(f"reaper_interval_s must be > 0, got {self.reaper_interval_s}")
        if not 0 < self.max_session_cache_fraction <= 1:
            raise ValueError(
                "max_session_cache_fraction must be in (0, 1], "
                f"got {self.max_session_cache_fraction}"
            )

    @property
    def max_session_cache_tokens(self) -> int:
        """The most cache tokens (batch x length, per block) one session may hold."""
        return int(self.max_cache_tokens * self.max_session_cache_fraction)


@dataclass(frozen=True)
class RuntimeInfo:
    start: int
    end: int
    sessions_open: int
    cache_tokens_total: int
    cache_tokens_free: int
    session_cache_tokens_max: int  # what one session may hold (batch x length)
    queue_depth: int
    steps: int
    tokens_processed: int  # by steps, forward and backward together


def cache_bytes_per_token(span: ServedSpan) -> int:
    """KV-cache bytes one token takes across the whole span (to size `max_cache_tokens`)."""
    shape = span.adapter.kv_shape(span.config)
    element_bytes = torch.empty((), dtype=_span_dtype(span)).element_size()
    return 2 * shape.num_kv_heads * shape.head_dim * element_bytes * len(span.blocks)


def _span_dtype(span: ServedSpan) -> torch.dtype:
    for param in span.blocks[0].parameters():
        if param.dtype.is_floating_point:
            return param.dtype
    return torch.float32


def _span_device(span: ServedSpan) -> torch.device:
    for param in span.blocks[0].parameters():
        return param.device
    return torch.device("cpu")


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
            limits.max_cache_tokens,
            page_tokens=limits.cache_page_tokens,
            max_session_tokens=limits.max_session_cache_tokens,
            retry_after_s=limits.busy_retry_after_s,
        )
        self._sessions: dict[SessionId, Session] = {}
        self._block_slices: dict[tuple[int, int], nn.ModuleList] = {}
        self._scheduler = ComputeScheduler(max_queued_jobs=limits.max_queued_jobs)
        self._reaper: asyncio.Task[None] | None = None
        self._steps = 0
        self._tokens_processed = 0

    # -- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._scheduler.start()
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
        reserving its first cache page. A client may enter a host anywhere inside its span."""
        check_positive_int(max_length, "max_length", maximum=self.limits.max_session_length)
        check_positive_int(batch_size, "batch_size", maximum=self.limits.max_batch_size)
        blocks = self.block_range(block_range)
        capacity = self._budget.first_page(max_length, batch_size)
        session = Session(new_session_id(), batch_size, max_length, blocks, peer_label)
        session.capacity = capacity
        self._sessions[session.session_id] = session
        logger.info(
            "session %s opened: blocks [%d, %d), batch %d x length %d of up to %d reserved, "
            "peer %s",
            session.session_id,
            *blocks,
            batch_size,
            capacity,
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
        # The compute thread may still hold the buffers for a running step; refcounting
        # frees them when it lets go.
        session.cache = None
        self._budget.release(session.reserved_tokens)
        logger.info(
            "session %s closed (%s): blocks [%d, %d), %d cache tokens, %d tokens processed, "
            "open %.1f s, peer %s",
            session_id,
            reason,
            *session.block_range,
            session.reserved_tokens,
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
        capacity = session.capacity
        session.in_flight += 1
        session.touch()
        try:
            return await self._scheduler.run(
                lambda: self._compute_step(session, hidden, start, mask, capacity, step_prompts),
                priority=Priority.INFERENCE,
                queue_timeout_s=self.limits.step_timeout_s,
            )
        finally:
            session.in_flight -= 1
            session.touch()

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

    def _compute_step(
        self,
        session: Session,
        hidden: Tensor,
        start: int,
        mask: Tensor | None,
        capacity: int,
        prompts: Tensor | None,
    ) -> Tensor:
        """`capacity`: slots per sequence reserved for this session when the step was
        queued (at least `start + T`); the buffers grow to it if they are shorter.
        `prompts`: the slice for this step's positions, or None."""
        if session.closed:
            raise RemoteNotFound(f"session {session.session_id!r} was closed before its step ran")
        check_no_gap(session, start)
        B, T, _ = hidden.shape
        blocks = self._blocks(session.block_range)
        session.cache = self._cache_for(session, len(blocks), start, start + T, capacity)
        # Slots from `start` on are being rewritten: if a block fails midway they are
        # neither old nor new, so the valid prefix shrinks first.
        session.length = start
        x = _on(hidden, self.device, self.dtype)  # (B, T, C)
        mask = None if mask is None else mask.to(self.device)
        p = None if prompts is None else _on(prompts, self.device, self.dtype)
        x = run_span(blocks, session.cache, x, start, mask, p)
        session.length = start + T
        session.tokens_processed += B * T
        self._steps += 1
        self._tokens_processed += B * T
        return _on(x, hidden.device, hidden.dtype)

    def _cache_for(
        self, session: Session, num_blocks: int, start: int, end: int, capacity: int
    ) -> SpanCache:
        """The session's buffers for a step writing `[start, end)`: allocated, or grown to
        `capacity` when `end` is past them."""
        cache = session.cache
        if cache is not None and cache.max_length >= end:
            return cache
        if cache is None:
            return SpanCache.empty(
                self.span.adapter,
                self.span.config,
                num_blocks,
                session.batch_size,
                capacity,
                dtype=self.dtype,
                device=self.device,
            )
        # Slots from the step's start on are rewritten by it: only the prefix before is kept.
        filled = min(session.length, start)
        return cache.grown(self.span.adapter, self.span.config, capacity, filled=filled)

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
) -> float:
    """Tokens per second through the whole span, measured for about `duration_s`.

    "decode" runs single-token cached steps (what a generating client sees); "forward"
    runs stateless forwards of `forward_tokens` tokens (fine-tuning, prefill-like work).
    One untimed warm-up call comes first; at least one timed call always runs.
    """
    dtype, device = _span_dtype(span), _span_device(span)
    C = int(span.config.hidden_size)
    run: Callable[[int], None]
    if kind == "decode":
        max_length = 64
        cache = SpanCache.empty(
            span.adapter,
            span.config,
            len(span.blocks),
            batch_size,
            max_length,
            dtype=dtype,
            device=device,
        )
        x = torch.randn(batch_size, 1, C, dtype=dtype, device=device)  # (B, 1, C)

        def run(i: int) -> None:
            # Positions wrap around: rewriting old slots is a legal rollback.
            run_span(span.blocks, cache, x, i % max_length)

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
