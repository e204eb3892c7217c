"""SpanRuntime against tiny attention blocks: sessions, cache semantics, errors, priorities.

The reference for every cached step is the stateless forward of the blocks over the whole
sequence so far, so these tests check the caching itself, not only that two code paths
agree. The cache-semantics tests run three times: with one reservation per session
(growth pages longer than any session), with 2-token growth pages, so that the cache grows
under them, and with the default 16-token pool pages. Elsewhere the pool's pages hold 2
tokens, so that the budget numbers asserted here are not rounded (`test_page_budget`
covers the rounding).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from stamen.models.base import AnyCache, AnyContext, Block, KVShape, StepContext
from stamen.models.common import attend
from stamen.swarm_core.host.runtime import (
    CacheLimitExceeded,
    RuntimeLimits,
    SessionId,
    SpanRuntime,
    cache_bytes_per_token,
    measure_throughput,
)
from stamen.swarm_core.protocol.errors import (
    RemoteBadRequest,
    RemoteBusy,
    RemoteNotFound,
    RemoteTimeout,
    RemoteTooLarge,
)

C, H, D = 16, 2, 8  # hidden size, KV heads, head dim


class TinyBlock(Block):
    """Multi-head attention with a position-dependent input, following the block contract."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(C, 3 * H * D)
        self.out = nn.Linear(H * D, C)

    def forward(self, hidden: Tensor, cache: AnyCache | None, context: AnyContext) -> Tensor:
        B, T, _ = hidden.shape
        x = hidden + torch.sin(context.positions[..., None].to(hidden.dtype))  # (B, T, C)
        q, k, v = self.qkv(x).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # each (B, H, T, D)
        y = attend(q, k, v, cache, context)  # (B, H, T, D), over the pool on a host
        return hidden + self.out(y.transpose(1, 2).reshape(B, T, H * D))


@dataclass
class GateBlock(Block):
    """Identity that logs each call and, while `gate` is set, waits for it to open."""

    calls: list[str] = field(default_factory=list)
    gate: threading.Event | None = None
    entered: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        nn.Module.__init__(self)

    def forward(self, hidden: Tensor, cache: AnyCache | None, context: AnyContext) -> Tensor:
        self.calls.append("step" if cache is not None else f"forward{int(hidden[0, 0, 0])}")
        self.entered.set()
        if self.gate is not None and not self.gate.wait(timeout=20):
            raise RuntimeError("gate never opened")
        return hidden

    __hash__ = nn.Module.__hash__


class PoisonBlock(Block):
    """Identity that fails on NaN input, like a block hitting an error halfway through a span."""

    def forward(self, hidden: Tensor, cache: AnyCache | None, context: AnyContext) -> Tensor:
        if hidden.isnan().any():
            raise FloatingPointError("poisoned")
        return hidden


class TinyAdapter:
    def kv_shape(self, config: Any) -> KVShape:
        return KVShape(H, D)


@dataclass
class FakeSpan:
    blocks: nn.ModuleList
    config: Any = field(default_factory=lambda: type("Config", (), {"hidden_size": C})())
    adapter: Any = field(default_factory=TinyAdapter)
    start: int = 3
    end: int = 3

    def __post_init__(self) -> None:
        self.end = self.start + len(self.blocks)


def tiny_span(num_blocks: int = 3, *extra: Block) -> FakeSpan:
    torch.manual_seed(0)
    blocks = nn.ModuleList([*extra, *(TinyBlock() for _ in range(num_blocks))])
    blocks.requires_grad_(False)
    return FakeSpan(blocks)


def full_forward(span: FakeSpan, hidden: Tensor, padding_mask: Tensor | None = None) -> Tensor:
    """The blocks run directly over a whole sequence, no cache: the reference."""
    B, T, _ = hidden.shape
    context = StepContext.make(0, T, batch_size=B, key_padding_mask=padding_mask)
    with torch.no_grad():
        for block in span.blocks:
            hidden = block(hidden, None, context)
    return hidden


LIMITS = RuntimeLimits(
    max_cache_tokens=256, max_session_length=64, max_batch_size=4, kv_page_tokens=2
)
# 4-token growth pages, one session at most half of 64 tokens: growth and its limits show
# early.
GROWING = RuntimeLimits(
    max_cache_tokens=64,
    max_session_length=64,
    max_batch_size=4,
    cache_page_tokens=4,
    kv_page_tokens=2,
)


@pytest.fixture(
    params=[
        LIMITS,
        dataclasses.replace(LIMITS, cache_page_tokens=2),
        dataclasses.replace(LIMITS, kv_page_tokens=16),
    ],
    ids=["one_allocation", "growing", "pool_pages_16"],
)
async def runtime(request: pytest.FixtureRequest):
    async with SpanRuntime(tiny_span(), request.param) as runtime:
        yield runtime


async def test_prefill_then_decode_equals_full_forward(runtime: SpanRuntime) -> None:
    x = torch.randn(2, 9, C)
    session = await runtime.open_session(max_length=16, batch_size=2)
    outs = [await runtime.step(session, x[:, :6], start_position=0)]
    for t in range(6, 9):
        outs.append(await runtime.step(session, x[:, t : t + 1], start_position=t))
    torch.testing.assert_close(torch.cat(outs, 1), full_forward(runtime.span, x))


async def test_rollback_and_replay_overwrite_later_entries(runtime: SpanRuntime) -> None:
    x, junk = torch.randn(1, 8, C), torch.randn(1, 3, C)
    session = await runtime.open_session(max_length=16)
    await runtime.step(session, x[:, :5], start_position=0)
    await runtime.step(session, junk, start_position=5)  # slots 5..7 hold junk
    # Roll back to 5: the junk must be forgotten.
    out = await runtime.step(session, x[:, 5:7], start_position=5)
    torch.testing.assert_close(out, full_forward(runtime.span, x[:, :7])[:, 5:7])
    # Replay from the start (a client re-sending history to a new host does this).
    replayed = await runtime.step(session, x, start_position=0)
    torch.testing.assert_close(replayed, full_forward(runtime.span, x))


async def test_left_padding_persists_across_steps(runtime: SpanRuntime) -> None:
    torch.manual_seed(1)
    short, long = torch.randn(1, 5, C), torch.randn(1, 7, C)
    pad = torch.zeros(1, 2, C)
    batch = torch.cat([torch.cat([pad, short[:, :3]], 1), long[:, :5]])  # (2, 5, C)
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    session = await runtime.open_session(max_length=8, batch_size=2)
    prefill = await runtime.step(session, batch, 0, padding_mask=mask)
    decode = [
        await runtime.step(
            session, torch.stack([short[0, t : t + 1], long[0, t + 2 : t + 3]]), t + 2
        )
        for t in (3, 4)
    ]
    # The padded row's real tokens come out as if that sequence had run alone.
    alone = full_forward(runtime.span, short)
    torch.testing.assert_close(torch.cat([prefill[:1, 2:], *(d[:1] for d in decode)], 1), alone)
    torch.testing.assert_close(
        torch.cat([prefill[1:], *(d[1:] for d in decode)], 1), full_forward(runtime.span, long)
    )


async def test_budget_exhaustion_is_busy_at_once_and_close_frees() -> None:
    async with SpanRuntime(tiny_span(1), LIMITS) as runtime:
        # Pages of 128 are longer than any session here: each reserves batch x max_length.
        first = await runtime.open_session(max_length=64, batch_size=2)  # 128 of 256 tokens
        await runtime.open_session(max_length=32, batch_size=3)  # 96 more
        with pytest.raises(RemoteBusy) as refused:
            await asyncio.wait_for(runtime.open_session(max_length=16, batch_size=3), 5)
        assert refused.value.retry_after_s == LIMITS.busy_retry_after_s
        assert runtime.info().cache_tokens_free == 32
        await runtime.close_session(first)
        assert runtime.info().cache_tokens_free == 160
        second = await runtime.open_session(max_length=32, batch_size=4)
        assert runtime.info().sessions_open == 2
        with pytest.raises(RemoteNotFound):
            await runtime.step(first, torch.randn(2, 1, C), 0)
        await runtime.step(second, torch.randn(4, 1, C), 0)
        await runtime.close_session(second)
        # More than one session may hold (half the budget) is refused even when free.
        assert runtime.info().cache_tokens_free == 160
        with pytest.raises(RemoteBusy, match="at most 128 per session"):
            await runtime.open_session(max_length=64, batch_size=3)


async def test_idle_session_is_closed_and_its_cache_freed() -> None:
    limits = RuntimeLimits(max_cache_tokens=64, session_idle_timeout_s=0.2, reaper_interval_s=0.05)
    async with SpanRuntime(tiny_span(1), limits) as runtime:
        idle = await runtime.open_session(max_length=32)
        assert runtime.info().cache_tokens_free == 32
        for _ in range(200):
            if runtime.info().sessions_open == 0:
                break
            await asyncio.sleep(0.05)
        assert runtime.info().cache_tokens_free == 64
        with pytest.raises(RemoteNotFound):
            await runtime.step(idle, torch.randn(1, 1, C), 0)


async def test_bad_requests_get_typed_errors_and_runtime_keeps_serving(
    runtime: SpanRuntime,
) -> None:
    session = await runtime.open_session(max_length=8, batch_size=2)
    await runtime.step(session, torch.randn(2, 3, C), 0)
    bad_steps = [
        (torch.randn(3, 1, C), 3, None),  # batch differs from the session's
        (torch.randn(2, 1, C + 1), 3, None),  # hidden size
        (torch.randn(2, 0, C), 3, None),  # no tokens
        (torch.randn(2, C), 3, None),  # not (B, T, C)
        (torch.ones(2, 1, C, dtype=torch.long), 3, None),  # not floating
        ([[0.0] * C], 3, None),  # not a tensor
        (torch.randn(2, 1, C), 4, None),  # gap after the 3 cached tokens
        (torch.randn(2, 1, C), -1, None),
        (torch.randn(2, 1, C), 1.0, None),
        (torch.randn(2, 6, C), 3, None),  # beyond max_length 8
        (torch.randn(2, 1, C), 3, torch.ones(2, 2, dtype=torch.bool)),  # mask shape
        (torch.randn(2, 1, C), 3, torch.ones(2, 1)),  # float mask
    ]
    for hidden, position, mask in bad_steps:
        with pytest.raises(RemoteBadRequest):
            await runtime.step(session, hidden, position, padding_mask=mask)
    with pytest.raises(RemoteNotFound):
        await runtime.step(SessionId("nope"), torch.randn(2, 1, C), 3)
    with pytest.raises(RemoteNotFound):
        await runtime.close_session(SessionId("nope"))
    for max_length, batch_size in [(0, 1), (65, 1), (8, 5), (8, True), ("8", 1)]:
        with pytest.raises(RemoteBadRequest):
            await runtime.open_session(max_length, batch_size)  # type: ignore[arg-type]
    with pytest.raises(RemoteBadRequest):
        await runtime.backward(torch.randn(1, 4, C), torch.randn(1, 3, C))
    with pytest.raises(RemoteTooLarge) as too_large:
        await runtime.forward(torch.randn(1, LIMITS.max_bulk_tokens + 1, C))
    assert too_large.value.code == "too_large" and isinstance(too_large.value, RemoteBadRequest)
    x = torch.randn(2, 4, C)
    await runtime.step(session, x, 0)
    out = await runtime.step(session, x[:, 3:], 3)  # the session is intact
    torch.testing.assert_close(out, full_forward(runtime.span, x)[:, 3:])
    assert runtime.info().sessions_open == 1


async def test_interleaved_sessions_match_each_alone(runtime: SpanRuntime) -> None:
    xa, xb = torch.randn(1, 6, C), torch.randn(2, 5, C)
    a = await runtime.open_session(max_length=8)
    b = await runtime.open_session(max_length=8, batch_size=2)

    async def drive(session: SessionId, x: Tensor) -> Tensor:
        outs = [await runtime.step(session, x[:, :2], 0)]
        for t in range(2, x.shape[1]):
            outs.append(await runtime.step(session, x[:, t : t + 1], t))
        return torch.cat(outs, 1)

    out_a, out_b = await asyncio.gather(drive(a, xa), drive(b, xb))
    torch.testing.assert_close(out_a, full_forward(runtime.span, xa))
    torch.testing.assert_close(out_b, full_forward(runtime.span, xb))
    assert runtime.info().steps == 9


@pytest.mark.parametrize("page_tokens", [128, 2], ids=["one_allocation", "growing"])
async def test_a_failed_step_invalidates_the_slots_it_was_rewriting(page_tokens: int) -> None:
    torch.manual_seed(0)
    span = FakeSpan(nn.ModuleList([TinyBlock(), PoisonBlock(), TinyBlock()]))
    async with SpanRuntime(span, dataclasses.replace(LIMITS, cache_page_tokens=page_tokens)) as rt:
        x = torch.randn(1, 6, C)
        session = await rt.open_session(max_length=8)
        await rt.step(session, x[:, :4], 0)
        # Block 0 overwrites slots 3..4 with NaN-derived keys (growing the cache past 4
        # slots first, with 2-token pages) before block 1 fails.
        with pytest.raises(FloatingPointError):
            await rt.step(session, torch.full((1, 2, C), float("nan")), 3)
        with pytest.raises(RemoteBadRequest, match="gap"):
            await rt.step(session, x[:, 4:5], 4)
        out = await rt.step(session, x[:, 3:6], 3)
        torch.testing.assert_close(out, full_forward(span, x)[:, 3:])


async def test_event_loop_keeps_running_during_a_long_forward() -> None:
    # The forward cannot finish until the event loop has ticked a few times: if compute
    # blocked the loop, this would deadlock and time out.
    gate = threading.Event()
    span = tiny_span(1, GateBlock(gate=gate))
    async with SpanRuntime(span, LIMITS) as runtime:
        forward = asyncio.create_task(runtime.forward(torch.zeros(1, 4, C)))
        ticks = 0
        await asyncio.to_thread(span.blocks[0].entered.wait, 10)
        while ticks < 5:
            await asyncio.sleep(0.01)
            ticks += 1
        assert not forward.done()
        gate.set()
        await asyncio.wait_for(forward, 10)


async def test_inference_steps_run_before_queued_forwards() -> None:
    gate = threading.Event()
    gate_block = GateBlock(gate=gate)
    async with SpanRuntime(tiny_span(1, gate_block), LIMITS) as runtime:
        session = await runtime.open_session(max_length=4)
        blocker = asyncio.create_task(runtime.forward(torch.zeros(1, 1, C)))
        await asyncio.to_thread(gate_block.entered.wait, 10)
        forwards = [
            asyncio.create_task(runtime.forward(torch.full((1, 1, C), float(i + 1))))
            for i in range(4)
        ]
        await asyncio.sleep(0.05)  # the forwards are queued first
        step = asyncio.create_task(runtime.step(session, torch.zeros(1, 1, C), 0))
        await asyncio.sleep(0.05)
        assert runtime.info().queue_depth == 5
        gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, step, *forwards), 10)
    assert gate_block.calls == ["forward0", "step", "forward1", "forward2", "forward3", "forward4"]


async def test_step_waiting_too_long_in_the_queue_times_out() -> None:
    gate = threading.Event()
    gate_block = GateBlock(gate=gate)
    limits = RuntimeLimits(max_cache_tokens=8, step_timeout_s=0.1, kv_page_tokens=4)
    async with SpanRuntime(tiny_span(1, gate_block), limits) as runtime:
        session = await runtime.open_session(max_length=4)
        blocker = asyncio.create_task(runtime.forward(torch.zeros(1, 1, C)))
        await asyncio.to_thread(gate_block.entered.wait, 10)
        with pytest.raises(RemoteTimeout):
            await runtime.step(session, torch.zeros(1, 1, C), 0)
        gate.set()
        await blocker
        # The expired step never ran, so the session is still empty and still usable.
        assert gate_block.calls == ["forward0"]
        await runtime.step(session, torch.zeros(1, 2, C), 0)


async def test_session_closed_while_its_step_is_queued_is_not_found() -> None:
    gate = threading.Event()
    gate_block = GateBlock(gate=gate)
    async with SpanRuntime(tiny_span(1, gate_block), LIMITS) as runtime:
        session = await runtime.open_session(max_length=4)
        blocker = asyncio.create_task(runtime.forward(torch.zeros(1, 1, C)))
        await asyncio.to_thread(gate_block.entered.wait, 10)
        step = asyncio.create_task(runtime.step(session, torch.zeros(1, 1, C), 0))
        await asyncio.sleep(0.02)
        await runtime.close_session(session)
        gate.set()
        await blocker
        with pytest.raises(RemoteNotFound):
            await step
        assert runtime.info().cache_tokens_free == LIMITS.max_cache_tokens


async def test_backward_equals_autograd_on_the_blocks(runtime: SpanRuntime) -> None:
    x, grad_output = torch.randn(2, 5, C), torch.randn(2, 5, C)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]])
    grad, grad_prompts = await runtime.backward(x, grad_output, padding_mask=mask)
    assert grad_prompts is None

    leaf = x.clone().requires_grad_(True)
    context = StepContext.make(0, 5, batch_size=2, key_padding_mask=mask)
    y = leaf
    for block in runtime.span.blocks:
        y = block(y, None, context)
    (y * grad_output).sum().backward()
    assert leaf.grad is not None
    torch.testing.assert_close(grad, leaf.grad)
    assert all(p.grad is None for p in runtime.span.blocks.parameters())
    torch.testing.assert_close(await runtime.forward(x, mask), y.detach())


async def test_info_reports_span_budget_and_counters() -> None:
    async with SpanRuntime(tiny_span(), LIMITS) as runtime:
        session = await runtime.open_session(max_length=10, batch_size=2)
        await runtime.step(session, torch.randn(2, 4, C), 0)
        await runtime.step(session, torch.randn(2, 1, C), 4)
        await runtime.forward(torch.randn(1, 3, C))
        info = runtime.info()
    assert (info.start, info.end) == (3, 6)
    assert (info.sessions_open, info.cache_tokens_total, info.cache_tokens_free) == (1, 256, 236)
    assert info.session_cache_tokens_max == 128
    assert (info.steps, info.tokens_processed, info.queue_depth) == (2, 13, 0)


async def test_aclose_closes_sessions_and_refuses_new_work() -> None:
    runtime = SpanRuntime(tiny_span(1), LIMITS)
    await runtime.start()
    await runtime.open_session(max_length=8)
    await runtime.aclose()
    assert runtime.info().sessions_open == 0
    assert runtime.info().cache_tokens_free == LIMITS.max_cache_tokens
    with pytest.raises(RemoteBusy):
        await runtime.forward(torch.randn(1, 1, C))


def test_measure_throughput_and_cache_size() -> None:
    span = tiny_span(2)
    for kind in ("decode", "forward"):
        assert measure_throughput(span, kind=kind, duration_s=0.05) > 0
    assert cache_bytes_per_token(span) == 2 * H * D * 4 * 2


@pytest.mark.parametrize(
    "field_name, value",
    [
        ("max_cache_tokens", -1),
        ("max_batch_size", 0),
        ("step_timeout_s", 0.0),
        ("cache_page_tokens", 0),
        ("max_session_cache_fraction", 0.0),
        ("max_session_cache_fraction", 1.5),
    ],
)
def test_limits_refuse_nonsense(field_name: str, value: float) -> None:
    with pytest.raises(ValueError, match=field_name):
        RuntimeLimits(**{"max_cache_tokens": 8, field_name: value})


# -- cache that follows use -------------------------------------------------------------


async def test_open_reserves_one_page_and_steps_grow_it() -> None:
    async with SpanRuntime(tiny_span(), GROWING) as runtime:
        x = torch.randn(2, 16, C)
        session = await runtime.open_session(max_length=64, batch_size=2)
        free = [runtime.info().cache_tokens_free]  # one page: 2 x 4 of 64
        with pytest.raises(RemoteBadRequest, match="gap"):  # refused before any growth
            await runtime.step(session, x[:, :1], 8)
        outs = [await runtime.step(session, x[:, :3], 0)]
        free.append(runtime.info().cache_tokens_free)
        for t in range(3, 16):
            outs.append(await runtime.step(session, x[:, t : t + 1], t))
            free.append(runtime.info().cache_tokens_free)
        # Doubling in 4-token pages: 4 slots until position 4, 8 until 8, then 16.
        assert free == [56, 56, 56] + [48] * 4 + [32] * 8
        torch.testing.assert_close(torch.cat(outs, 1), full_forward(runtime.span, x))
        await runtime.close_session(session)
        assert runtime.info().cache_tokens_free == 64


async def test_many_sessions_fit_where_max_length_up_front_did_not() -> None:
    x = torch.randn(1, 8, C)
    for page_tokens, fits in [(64, 4), (8, 32)]:  # 64 = the whole max_length up front
        limits = dataclasses.replace(LIMITS, cache_page_tokens=page_tokens)
        async with SpanRuntime(tiny_span(1), limits) as runtime:
            sessions = [await runtime.open_session(max_length=64) for _ in range(fits)]
            assert runtime.info().cache_tokens_free == 0
            with pytest.raises(RemoteBusy):
                await runtime.open_session(max_length=64)
            for session in sessions:
                out = await runtime.step(session, x, 0)
                torch.testing.assert_close(out, full_forward(runtime.span, x))
            for session in sessions:
                await runtime.close_session(session)
            assert runtime.info().cache_tokens_free == LIMITS.max_cache_tokens


async def test_growth_without_room_is_busy_and_the_same_step_works_later() -> None:
    x = torch.randn(1, 12, C)
    async with SpanRuntime(tiny_span(), GROWING) as runtime:
        session = await runtime.open_session(max_length=32)
        outs = [await runtime.step(session, x[:, :4], 0)]  # fills its first page
        hogs = [await runtime.open_session(max_length=32) for _ in range(2)]
        await runtime.step(hogs[0], torch.randn(1, 32, C), 0)  # 4 + 32 + 4 of 64 held
        await runtime.step(hogs[1], torch.randn(1, 28, C), 0)  # the last 24 too
        assert runtime.info().cache_tokens_free == 0
        for _ in range(2):  # refused as often as asked, the session untouched
            with pytest.raises(RemoteBusy, match="no room to grow") as refused:
                await runtime.step(session, x[:, 4:5], 4)
            assert refused.value.retry_after_s == GROWING.busy_retry_after_s
        assert runtime.info().cache_tokens_free == 0
        assert runtime.info().steps == 3
        await runtime.close_session(hogs[1])
        assert runtime.info().cache_tokens_free == 28
        for t in range(4, 12):
            outs.append(await runtime.step(session, x[:, t : t + 1], t))
    async with SpanRuntime(runtime.span, LIMITS) as reference:  # never short of cache
        untroubled = await reference.open_session(max_length=32)
        expected = [await reference.step(untroubled, x[:, :4], 0)]
        for t in range(4, 12):
            expected.append(await reference.step(untroubled, x[:, t : t + 1], t))
    torch.testing.assert_close(torch.cat(outs, 1), torch.cat(expected, 1))
    torch.testing.assert_close(torch.cat(outs, 1), full_forward(runtime.span, x))


async def test_one_session_holds_at_most_its_share_of_the_budget() -> None:
    x = torch.randn(2, 17, C)
    async with SpanRuntime(tiny_span(), GROWING) as runtime:
        session = await runtime.open_session(max_length=64, batch_size=2)
        await runtime.step(session, x[:, :16], 0)  # 2 x 16 = 32, half of 64
        with pytest.raises(CacheLimitExceeded, match="max_session_cache_fraction"):
            await runtime.step(session, x[:, 16:17], 16)
        assert issubclass(CacheLimitExceeded, RemoteBadRequest)
        assert runtime.info().cache_tokens_free == 32
        # Within its share the session still works: rewrite its last slot.
        out = await runtime.step(session, x[:, 15:16], 15)
        torch.testing.assert_close(out, full_forward(runtime.span, x[:, :16])[:, 15:])
        # The other half is there for someone else.
        other = await runtime.open_session(max_length=64, batch_size=2)
        await runtime.step(other, x[:, :16], 0)
        assert runtime.info().cache_tokens_free == 0


async def test_rollback_replay_and_padding_after_growth_equal_one_allocation() -> None:
    torch.manual_seed(2)
    x, junk = torch.randn(2, 20, C), torch.randn(2, 6, C)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, :3] = False  # row 0 is left-padded

    async def script(runtime: SpanRuntime) -> list[Tensor]:
        session = await runtime.open_session(max_length=32, batch_size=2)
        outs = [await runtime.step(session, x[:, :5], 0, padding_mask=mask[:, :5])]
        for t in range(5, 10):
            outs.append(await runtime.step(session, x[:, t : t + 1], t))
        await runtime.step(session, junk, 10)  # slots 10..15, then forgotten
        outs.append(await runtime.step(session, x[:, 10:12], 10))
        outs.append(await runtime.step(session, x, 0, padding_mask=mask))  # replay all
        return outs

    span = tiny_span()
    async with SpanRuntime(span, dataclasses.replace(LIMITS, cache_page_tokens=2)) as growing:
        grown = await script(growing)
        # Grew 2 -> 6 -> 12 -> 24 slots (doubling past the need, in 2-token pages).
        assert growing.info().cache_tokens_free == 256 - 2 * 24
    async with SpanRuntime(span, LIMITS) as single:
        expected = await script(single)
    for out, reference in zip(grown, expected, strict=True):
        torch.testing.assert_close(out, reference)
    torch.testing.assert_close(grown[-1][1:], full_forward(span, x[1:]))
    torch.testing.assert_close(grown[-1][:1, 3:], full_forward(span, x[:1, 3:]))
