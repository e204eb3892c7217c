"""Blocks `[start, end)` of the swarm as a differentiable function, for fine-tuning.

    spans = RemoteSpans(view, 0, num_blocks, max_chunk_tokens=4096)
    run = lambda c: asyncio.run_coroutine_threadsafe(c, loop).result()
    out = spans.apply(run, hidden, prompts, padding_mask)  # (B, T, C), differentiable
    loss_of(out).backward()  # gradients reach `hidden` and `prompts` through the hosts

What one call does:

1. The batch is cut into chunks of whole rows: at most `max_chunk_tokens` tokens each,
   and never more than a host of the chunk's route announced it takes
   (`HostInfo.max_request_tokens`).
2. Each chunk is routed by throughput (`routing.plan_throughput_route`) against the tokens
   already routed to each host by calls under way, so consecutive chunks land on
   different replicas of a span (data parallelism); chunks run concurrently.
3. Forward runs each chunk hop by hop and keeps each hop's input in the `Trace`: hosts
   keep no activations.
4. Backward routes each recorded hop's blocks again. When one host serves them all, one
   stateless `backward` call with the saved input; when they now need several hosts (the
   forward's host left), the intermediate inputs are recomputed with forwards along the
   new route and the gradient goes back hop by hop.

Failures, per chunk, follow the policy of inference sessions (`inference.Failover`): a
host that fails or times out is banned (by incarnation) and its hop's blocks are run again
from the saved input on a new route, possibly several hops; at most `max_retries`
failures and `failover_timeout_s` per chunk, then `SpanCallFailed` names the blocks and
the causes. A busy host is load, not failure: the chunk goes to another replica at once,
or waits with jittered backoff when no other is left; that costs time, never a retry or a
ban. A request refused as too large (`RequestTooLarge`) is sent again in two halves.

Deep prompts follow `remote`'s docstring: `prompts[a - start : b - start]` go with a hop
on blocks `[a, b)`; a batch of 1 stands for every row, and its gradient is summed over
the chunks.

This module knows nothing about transports, the wire or the model around the blocks:
hosts come from a `SwarmView`, and `apply`'s caller says how to run a coroutine on the
loop the swarm lives on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Container, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from stamen.swarm_core.client.inference import (
    VIEW_MAX_AGE_S,
    Avoid,
    Failover,
    SessionFailedError,
)
from stamen.swarm_core.client.remote import (
    HopError,
    HostBusy,
    Incarnation,
    RequestTooLarge,
    SwarmView,
)
from stamen.swarm_core.client.routing import BanList, NoRouteError, RouteHop, plan_throughput_route

logger = logging.getLogger(__name__)

_T = TypeVar("_T")


class Runner(Protocol):
    """Runs a coroutine on the swarm's event loop from another thread; returns its result."""

    def __call__(self, coroutine: Coroutine[Any, Any, _T], /) -> _T: ...


class SpanCallFailed(SessionFailedError):
    """A forward or backward through blocks `[start, end)` failed within its failover
    budget (retries or deadline), or a single row is over a host's request limit.
    `causes` lists the failed attempts, oldest first."""


@dataclass(frozen=True)
class HopRecord:
    """One hop of a chunk's forward: blocks `[start, end)` and the input they received."""

    start: int
    end: int
    hidden: Tensor  # (b, T, C), the chunk's rows entering block `start`


@dataclass
class ChunkTrace:
    """The forward of batch rows `rows`: its hops in order, then, when the chunk had to be
    split on the way (a smaller request cap, a `RequestTooLarge`), the rest of the blocks
    run as `pieces`, which cover `rows` in order."""

    rows: range
    hops: list[HopRecord] = field(default_factory=list)
    pieces: list[ChunkTrace] = field(default_factory=list)


@dataclass(frozen=True)
class Trace:
    """What `RemoteSpans.backward` needs from a forward: per chunk, per hop, the blocks and
    their saved input, plus the call's prompts and padding mask."""

    chunks: list[ChunkTrace]
    prompts: Tensor | None  # (n_blocks, B or 1, P, C), detached
    padding_mask: Tensor | None  # (B, T) bool
    shape: torch.Size  # (B, T, C) of the input
    dtype: torch.dtype


class _HopFailed(Exception):
    """A hop call that failed, with the hop it failed on (internal)."""

    def __init__(self, hop: RouteHop, error: HopError | TimeoutError) -> None:
        super().__init__(f"{hop.peer_id}: {error!r}")
        self.hop = hop
        self.error = error


class _CallLoad:
    """The tokens one call routed to each host, added to the shared load (what throughput
    routing sees as queued) until the call ends."""

    def __init__(self, shared: dict[str, int]) -> None:
        self.shared = shared
        self._added: list[tuple[str, int]] = []

    def add(self, route: Sequence[RouteHop], tokens: int) -> None:
        for hop in route:
            self.shared[hop.peer_id] = self.shared.get(hop.peer_id, 0) + tokens
            self._added.append((hop.peer_id, tokens))

    def release(self) -> None:
        for peer_id, tokens in self._added:
            left = self.shared.get(peer_id, 0) - tokens
            if left > 0:
                self.shared[peer_id] = left
            else:
                self.shared.pop(peer_id, None)
        self._added = []


@dataclass
class _Call:
    """What the chunks of one forward or backward call share."""

    first_block: int  # block of prompts[0]
    row_tokens: int  # T: the tokens of one row
    prompts: Tensor | None  # (n_blocks, B or 1, P, C)
    padding_mask: Tensor | None  # (B, T) bool
    load: _CallLoad
    grad_prompts: Tensor | None = None  # accumulated by backward, like `prompts`

    def prompts_for(self, start: int, end: int, rows: range) -> Tensor | None:
        """(end - start, b or 1, P, C): the prompts a hop on `[start, end)` gets for `rows`."""
        if self.prompts is None:
            return None
        blocks = self.prompts[start - self.first_block : end - self.first_block]
        return blocks if blocks.shape[1] == 1 else blocks[:, rows.start : rows.stop]

    def mask_for(self, rows: range) -> Tensor | None:
        return None if self.padding_mask is None else self.padding_mask[rows.start : rows.stop]

    def add_prompt_grads(self, rows: range, grads: Iterable[tuple[RouteHop, Tensor]]) -> None:
        if self.grad_prompts is None:
            return
        for hop, grad in grads:
            target = self.grad_prompts[hop.start - self.first_block : hop.end - self.first_block]
            if target.shape[1] != 1:
                target = target[:, rows.start : rows.stop]
            target += grad.to(target.dtype)  # a batch-1 prompt sums over chunks


class RemoteSpans:
    """Blocks `[start, end)` of the swarm as a differentiable function (module docstring).

    `max_chunk_tokens` bounds one chunk (B_chunk x T, at least one row); None leaves the
    bound to the hosts' announced limits. `call_timeout_s` bounds one hop call; a call
    past it counts as that host failing. `retry_delay_s` is the longest backoff.
    """

    def __init__(
        self,
        view: SwarmView,
        start: int,
        end: int,
        *,
        ban_list: BanList | None = None,
        failover_timeout_s: float = 60.0,
        max_retries: int = 3,
        max_chunk_tokens: int | None = None,
        call_timeout_s: float = 120.0,
        retry_delay_s: float = 1.0,
    ) -> None:
        if not 0 <= start < end:
            raise ValueError(f"empty or negative block range [{start}, {end})")
        if max_retries < 0 or (max_chunk_tokens is not None and max_chunk_tokens < 1):
            raise ValueError("max_retries must be >= 0 and max_chunk_tokens >= 1")
        self._view = view
        self.start, self.end = start, end
        self.ban_list = ban_list if ban_list is not None else BanList()
        self.failover_timeout_s = failover_timeout_s
        self.max_retries = max_retries
        self.max_chunk_tokens = max_chunk_tokens
        self.call_timeout_s = call_timeout_s
        self.retry_delay_s = retry_delay_s
        self._load: dict[str, int] = {}  # peer id -> tokens routed there by calls under way

    # -- autograd ---------------------------------------------------------------------------

    def apply(
        self,
        run: Runner,
        hidden: Tensor,
        prompts: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """(B, T, C) -> (B, T, C) through the blocks, differentiable in `hidden` and
        `prompts`. Call from a thread that is not the swarm's loop; `run` takes coroutines
        there. Without grad (or nothing requiring it) only the forward runs."""
        wants_grad = hidden.requires_grad or (prompts is not None and prompts.requires_grad)
        if not (torch.is_grad_enabled() and wants_grad):
            out, _ = run(self.forward(hidden, prompts, padding_mask))
            return out
        return cast(Tensor, _SpansFunction.apply(hidden, prompts, padding_mask, self, run))

    # -- forward ----------------------------------------------------------------------------

    async def forward(
        self, hidden: Tensor, prompts: Tensor | None = None, padding_mask: Tensor | None = None
    ) -> tuple[Tensor, Trace]:
        """`hidden` (B, T, C) through the blocks, and the `Trace` backward needs. `prompts`
        (end - start, B or 1, P <= T, C), `padding_mask` (B, T) bool (False = padding).
        Raises `ValueError` for inputs that do not fit, `SpanCallFailed`."""
        self._check_inputs(hidden, prompts, padding_mask)
        hidden = hidden.detach()
        prompts = None if prompts is None else prompts.detach()
        B, T, _ = hidden.shape
        call = _Call(self.start, T, prompts, padding_mask, _CallLoad(self._load))
        try:
            results = await _all(
                self._budgeted(
                    self._forward_from(call, rows, hidden[rows.start : rows.stop], route, f)
                )
                for rows, route, f in self._plan_chunks(call, B)
            )
        finally:
            call.load.release()
        out = torch.cat([chunk_out for chunk_out, _ in results])  # (B, T, C)
        trace = Trace([t for _, t in results], prompts, padding_mask, hidden.shape, hidden.dtype)
        return out, trace

    def _plan_chunks(
        self, call: _Call, batch_size: int
    ) -> list[tuple[range, list[RouteHop] | None, Failover]]:
        """Cut the batch into chunks and route each (adding its tokens to the load before
        the next is routed, so replicas share the work). A chunk without a route now
        looks for one under its own failover budget."""
        T = call.row_tokens
        per_chunk = batch_size if self.max_chunk_tokens is None else self.max_chunk_tokens // T
        per_chunk = max(1, per_chunk)
        chunks: list[tuple[range, list[RouteHop] | None, Failover]] = []
        row = 0
        while row < batch_size:
            rows = min(per_chunk, batch_size - row)
            route: list[RouteHop] | None
            try:
                route = self._plan(call, self.start, self.end, rows, self.ban_list)
            except NoRouteError:
                route = None
            else:
                rows = min(rows, _rows_fitting(route, T))
                call.load.add(route, rows * T)
            chunks.append((range(row, row + rows), route, self._failover()))
            row += rows
        return chunks

    async def _forward_from(
        self,
        call: _Call,
        rows: range,
        hidden: Tensor,
        route: list[RouteHop] | None,
        failover: Failover,
        node: int | None = None,
    ) -> tuple[Tensor, ChunkTrace]:
        """`hidden` (b, T, C), batch rows `rows`, from block `node` (default: the first)
        to the end, along `route` when given, re-routing around failures."""
        node = self.start if node is None else node
        trace = ChunkTrace(rows)
        avoid = Avoid(self.ban_list, set())
        hops = list(route or [])
        while node < self.end:
            if not hops:
                hops = await self._route(call, node, self.end, len(rows), avoid, failover)
            fit = _rows_fitting(hops, call.row_tokens)
            if fit < len(rows):  # the new route has a host with a smaller announced cap
                return await self._forward_pieces(call, trace, hidden, node, fit, failover)
            hop = hops[0]
            try:
                out = await self._call_forward(call, hop, rows, hidden)
            except _HopFailed as failure:
                if isinstance(failure.error, RequestTooLarge):
                    half = self._half(rows, failure, failover)
                    return await self._forward_pieces(call, trace, hidden, node, half, failover)
                self._count(failure, avoid, failover)
                replacement = await self._route(
                    call, hop.start, hop.end, len(rows), avoid, failover
                )
                logger.info(
                    "blocks [%d, %d) of rows [%d, %d) moved from %s to %s",
                    hop.start,
                    hop.end,
                    rows.start,
                    rows.stop,
                    hop.peer_id,
                    [h.peer_id for h in replacement],
                )
                hops = replacement + hops[1:]
                continue
            trace.hops.append(HopRecord(hop.start, hop.end, hidden))
            hidden, node, hops = out, hop.end, hops[1:]
        return hidden, trace

    async def _forward_pieces(
        self,
        call: _Call,
        trace: ChunkTrace,
        hidden: Tensor,
        node: int,
        rows_per_piece: int,
        failover: Failover,
    ) -> tuple[Tensor, ChunkTrace]:
        """The rest of `trace`'s chunk from block `node` on, split into pieces of
        `rows_per_piece` rows, each routed on its own."""
        r0 = trace.rows.start
        results = await _all(
            self._forward_from(
                call, piece, hidden[piece.start - r0 : piece.stop - r0], None, failover, node
            )
            for piece in _split(trace.rows, rows_per_piece)
        )
        trace.pieces = [piece_trace for _, piece_trace in results]
        return torch.cat([out for out, _ in results]), trace

    # -- backward ---------------------------------------------------------------------------

    async def backward(self, trace: Trace, grad_output: Tensor) -> tuple[Tensor, Tensor | None]:
        """Gradients `(d hidden (B, T, C), d prompts like the forward's prompts or None)`
        given `grad_output` (B, T, C), the gradient of the forward's output. The hosts
        recompute from the inputs saved in `trace`. Raises `SpanCallFailed`."""
        if tuple(grad_output.shape) != tuple(trace.shape):
            raise ValueError(
                f"grad_output {tuple(grad_output.shape)} for an output {tuple(trace.shape)}"
            )
        grad_output = grad_output.detach().to(trace.dtype)
        grad_prompts = None if trace.prompts is None else torch.zeros_like(trace.prompts)
        call = _Call(
            self.start,
            trace.shape[1],
            trace.prompts,
            trace.padding_mask,
            _CallLoad(self._load),
            grad_prompts,
        )
        try:
            grads = await _all(
                self._budgeted(
                    self._backward_chunk(
                        call,
                        chunk,
                        grad_output[chunk.rows.start : chunk.rows.stop],
                        self._failover(),
                    )
                )
                for chunk in trace.chunks
            )
        finally:
            call.load.release()
        return torch.cat(grads), grad_prompts  # (B, T, C)

    async def _backward_chunk(
        self, call: _Call, chunk: ChunkTrace, grad: Tensor, failover: Failover
    ) -> Tensor:
        """`grad` (b, T, C) at the chunk's output -> at its input."""
        if chunk.pieces:
            r0 = chunk.rows.start
            grad = torch.cat(
                await _all(
                    self._backward_chunk(
                        call, piece, grad[piece.rows.start - r0 : piece.rows.stop - r0], failover
                    )
                    for piece in chunk.pieces
                )
            )
        for record in reversed(chunk.hops):
            grad = await self._backward_hop(call, chunk.rows, record, grad, failover)
        return grad

    async def _backward_hop(
        self, call: _Call, rows: range, record: HopRecord, grad: Tensor, failover: Failover
    ) -> Tensor:
        """`grad` (b, T, C) at the output of `record`'s blocks -> at their input, on
        whichever hosts serve those blocks now."""
        avoid = Avoid(self.ban_list, set())
        while True:
            route = await self._route(call, record.start, record.end, len(rows), avoid, failover)
            fit = _rows_fitting(route, call.row_tokens)
            if fit < len(rows):
                return await self._backward_pieces(call, rows, record, grad, fit, failover)
            try:
                return await self._backward_route(call, rows, record.hidden, grad, route)
            except _HopFailed as failure:
                if isinstance(failure.error, RequestTooLarge):
                    half = self._half(rows, failure, failover)
                    return await self._backward_pieces(call, rows, record, grad, half, failover)
                self._count(failure, avoid, failover)

    async def _backward_pieces(
        self,
        call: _Call,
        rows: range,
        record: HopRecord,
        grad: Tensor,
        rows_per_piece: int,
        failover: Failover,
    ) -> Tensor:
        def part(piece: range, tensor: Tensor) -> Tensor:
            return tensor[piece.start - rows.start : piece.stop - rows.start]

        pieces = _split(rows, rows_per_piece)
        grads = await _all(
            self._backward_hop(
                call,
                piece,
                HopRecord(record.start, record.end, part(piece, record.hidden)),
                part(piece, grad),
                failover,
            )
            for piece in pieces
        )
        return torch.cat(grads)

    async def _backward_route(
        self, call: _Call, rows: range, hidden: Tensor, grad: Tensor, route: list[RouteHop]
    ) -> Tensor:
        """Backward through `route` from its saved input `hidden`: forwards first to
        recompute what enters each later hop, then backward hop by hop in reverse.
        Prompt gradients count only once the whole route went through."""
        inputs = [hidden]  # (b, T, C) entering each hop
        for hop in route[:-1]:
            inputs.append(await self._call_forward(call, hop, rows, inputs[-1]))
        prompt_grads: list[tuple[RouteHop, Tensor]] = []
        for hop, hop_input in zip(reversed(route), reversed(inputs), strict=True):
            grad, grad_prompts = await self._call_backward(call, hop, rows, hop_input, grad)
            if grad_prompts is not None:
                prompt_grads.append((hop, grad_prompts))
        call.add_prompt_grads(rows, prompt_grads)
        return grad

    # -- one hop ----------------------------------------------------------------------------

    async def _call_forward(
        self, call: _Call, hop: RouteHop, rows: range, hidden: Tensor
    ) -> Tensor:
        prompts = call.prompts_for(hop.start, hop.end, rows)
        try:
            async with asyncio.timeout(self.call_timeout_s):
                client = await self._view.connect(hop.peer_id)
                out = await client.forward(hop.start, hop.end, hidden, prompts, call.mask_for(rows))
        except (HopError, TimeoutError) as e:
            raise _HopFailed(hop, e) from e
        _check_reply(hop, "output", out, hidden.shape)
        return out.to(hidden.dtype)

    async def _call_backward(
        self, call: _Call, hop: RouteHop, rows: range, hidden: Tensor, grad: Tensor
    ) -> tuple[Tensor, Tensor | None]:
        prompts = call.prompts_for(hop.start, hop.end, rows)
        try:
            async with asyncio.timeout(self.call_timeout_s):
                client = await self._view.connect(hop.peer_id)
                grad_hidden, grad_prompts = await client.backward(
                    hop.start, hop.end, hidden, grad, prompts, call.mask_for(rows)
                )
        except (HopError, TimeoutError) as e:
            raise _HopFailed(hop, e) from e
        _check_reply(hop, "grad_hidden", grad_hidden, hidden.shape)
        if prompts is None:
            return grad_hidden.to(hidden.dtype), None
        _check_reply(hop, "grad_prompts", grad_prompts, prompts.shape)
        return grad_hidden.to(hidden.dtype), grad_prompts

    # -- routing and failures ---------------------------------------------------------------

    def _plan(
        self, call: _Call, start: int, end: int, num_rows: int, avoid: Container[Incarnation]
    ) -> list[RouteHop]:
        return plan_throughput_route(
            self._view.hosts(),
            start,
            end,
            banned=avoid,
            load=call.load.shared,
            tokens=num_rows * call.row_tokens,
            min_request_tokens=call.row_tokens,
        )

    async def _route(
        self, call: _Call, start: int, end: int, num_rows: int, avoid: Avoid, failover: Failover
    ) -> list[RouteHop]:
        """A route for `num_rows` rows over `[start, end)`, its tokens added to the load.
        Waits (within the budget) when every usable host is busy or none is left."""
        while True:
            try:
                route = self._plan(call, start, end, num_rows, avoid)
            except NoRouteError as e:
                if avoid.busy:
                    # Only hosts that just said busy are left: wait for them; not a failure.
                    avoid.busy.clear()
                    await failover.wait()
                    continue
                failover.failed(start, end, None, e)
                await self._view.refresh(max_age_s=VIEW_MAX_AGE_S)
                await failover.wait()
                continue
            call.load.add(route, num_rows * call.row_tokens)
            return route

    def _count(self, failure: _HopFailed, avoid: Avoid, failover: Failover) -> None:
        """Account for a failed hop call: busy is avoided for now and costs only time;
        anything else bans the host's incarnation and costs a retry. Raises
        `SessionFailedError` once the budget is spent."""
        hop, error = failure.hop, failure.error
        if isinstance(error, HostBusy):
            avoid.busy.add(hop.host.incarnation)
            if failover.remaining_s() <= 0:
                failover.failed(hop.start, hop.end, hop.peer_id, error)
            return
        self.ban_list.ban(hop.host.incarnation)
        failover.failed(hop.start, hop.end, hop.peer_id, error)

    def _half(self, rows: range, failure: _HopFailed, failover: Failover) -> int:
        """Rows per piece after `RequestTooLarge`; a single row cannot be split."""
        if len(rows) > 1:
            return (len(rows) + 1) // 2
        hop = failure.hop
        cause = f"{hop.peer_id}: {type(failure.error).__name__}: {failure.error}"
        raise SpanCallFailed(hop.start, hop.end, [*failover.causes, cause]) from failure.error

    def _failover(self) -> Failover:
        return Failover(self.failover_timeout_s, self.retry_delay_s, self.max_retries)

    async def _budgeted(self, work: Coroutine[Any, Any, _T]) -> _T:
        """One chunk's work, its spent failover budget raised as `SpanCallFailed`."""
        try:
            return await work
        except SpanCallFailed:
            raise
        except SessionFailedError as e:
            raise SpanCallFailed(e.start, e.end, e.causes, e.attempts) from e

    def _check_inputs(
        self, hidden: Tensor, prompts: Tensor | None, padding_mask: Tensor | None
    ) -> None:
        if hidden.dim() != 3 or min(hidden.shape) < 1:
            raise ValueError(f"hidden must be (B, T, C), got {tuple(hidden.shape)}")
        B, T, C = hidden.shape
        n = self.end - self.start
        if prompts is not None and (
            prompts.dim() != 4
            or prompts.shape[0] != n
            or prompts.shape[1] not in (1, B)
            or not 1 <= prompts.shape[2] <= T
            or prompts.shape[3] != C
        ):
            raise ValueError(
                f"prompts must be ({n}, {B} or 1, P <= {T}, {C}), got {tuple(prompts.shape)}"
            )
        if padding_mask is not None and (
            tuple(padding_mask.shape) != (B, T) or padding_mask.dtype != torch.bool
        ):
            raise ValueError(
                f"padding_mask must be ({B}, {T}) bool, got {tuple(padding_mask.shape)} "
                f"{padding_mask.dtype}"
            )


class _SpansFunction(torch.autograd.Function):
    """`RemoteSpans` for autograd: forward and backward run on the swarm's loop."""

    @staticmethod
    def forward(
        ctx: Any,
        hidden: Tensor,
        prompts: Tensor | None,
        padding_mask: Tensor | None,
        spans: RemoteSpans,
        run: Runner,
    ) -> Tensor:
        out, trace = run(spans.forward(hidden, prompts, padding_mask))
        ctx.spans, ctx.run, ctx.trace = spans, run, trace
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_hidden, grad_prompts = ctx.run(ctx.spans.backward(ctx.trace, grad_output))
        return grad_hidden, grad_prompts, None, None, None


def _rows_fitting(route: Sequence[RouteHop], row_tokens: int) -> int:
    """How many rows one request along `route` may carry (at least 1: routing already
    skipped hosts that cannot take one)."""
    caps = [hop.host.max_request_tokens for hop in route]
    announced = [cap for cap in caps if cap is not None]
    return max(1, min(announced) // row_tokens) if announced else 2**62


def _split(rows: range, rows_per_piece: int) -> list[range]:
    return [
        range(a, min(a + rows_per_piece, rows.stop))
        for a in range(rows.start, rows.stop, rows_per_piece)
    ]


def _check_reply(hop: RouteHop, name: str, got: object, shape: torch.Size) -> None:
    if not isinstance(got, Tensor) or got.shape != shape:
        what = tuple(got.shape) if isinstance(got, Tensor) else type(got).__name__
        raise _HopFailed(
            hop, HopError(f"bad reply: {name} {what}, expected {tuple(shape)}", peer_id=hop.peer_id)
        )


async def _all(coroutines: Iterable[Coroutine[Any, Any, _T]]) -> list[_T]:
    """Run concurrently; the first failure cancels the others and is raised as itself."""
    pending = list(coroutines)
    if len(pending) == 1:
        return [await pending[0]]
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(c) for c in pending]
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0]  # noqa: B904 (the group is the context, kept)
    return [task.result() for task in tasks]
