"""Continuous batching on a host: sessions' decode steps merged into one pooled batch.

What a client relies on: its session's outputs do not depend on who else the host serves
at the same time. Every test here runs a script of steps twice, once with the steps of
each round queued together (so that the host merges them), once on a runtime with
`batching=False` taking each step alone, and compares every output, for a Llama, an ALiBi
Falcon and a BLOOM span. Batches are made deterministic by holding the compute thread
(a `Hold` block inside a stateless forward) while a round's steps queue up; the counters
in `info()` then say how many batches ran.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("transformers")

from stamen.conformance.adapters import LocalChain, reference_for
from stamen.models.loading import Span
from stamen.models.registry import get_adapter
from stamen.swarm_core.host.runtime import RuntimeLimits, SessionId, SpanRuntime
from stamen.swarm_core.protocol.errors import RemoteBadRequest, RemoteNotFound
from tests.unit.test_runtime import C as TINY_C
from tests.unit.test_runtime import TinyBlock

VARIANTS = ["llama-gqa-tied-bias", "falcon-alibi", "bloom"]
C = 64  # hidden size of those variants
TOLERANCE = 1e-5
LIMITS = RuntimeLimits(
    max_cache_tokens=2048, max_session_length=256, max_batch_size=4, max_session_cache_fraction=1
)


class Hold(nn.Module):
    """Identity; once armed, the next call waits (on the compute thread) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self._release = threading.Event()
        self._armed = False

    def arm(self) -> None:
        self.entered.clear()
        self._release.clear()
        self._armed = True

    def release(self) -> None:
        self._release.set()

    def forward(self, hidden: Tensor, cache: Any, context: Any) -> Tensor:
        if self._armed:
            self._armed = False
            self.entered.set()
            if not self._release.wait(timeout=20):
                raise RuntimeError("never released")
        return hidden


def model_span(variant: str, hold: Hold, num_blocks: int = 2) -> Span:
    ref = reference_for(variant)
    blocks = LocalChain.build(ref, range(num_blocks)).blocks
    return Span(
        ref.config, get_adapter(ref.config), 0, num_blocks + 1, nn.ModuleList([hold, *blocks])
    )


@dataclass
class Served:
    runtime: SpanRuntime
    hold: Hold
    hidden_size: int

    async def together(self, steps: Sequence[Callable[[], Awaitable[Tensor]]]) -> list[Any]:
        """Run `steps` with the compute thread held until all of them are queued; each
        result is its output or the exception it raised."""
        self.hold.arm()
        blocker = asyncio.create_task(self.runtime.forward(torch.zeros(1, 1, self.hidden_size)))
        assert await asyncio.to_thread(self.hold.entered.wait, 10)
        tasks = [asyncio.create_task(_settled(step)) for step in steps]
        for _ in range(1000):  # each task queues its step at its first await
            if self.runtime.info().queue_depth >= len(steps):
                break
            await asyncio.sleep(0)
        assert self.runtime.info().queue_depth == len(steps)
        self.hold.release()
        await blocker
        return await asyncio.gather(*tasks)


async def _settled(step: Callable[[], Awaitable[Tensor]]) -> Any:
    try:
        return await step()
    except Exception as error:
        return error


@pytest.fixture(params=VARIANTS)
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Served, Served]]:
    """A batching runtime and a reference that runs every step alone, over one span."""
    hold = Hold()
    span = model_span(request.param, hold)
    async with (
        SpanRuntime(span, LIMITS) as batched,
        SpanRuntime(span, dataclasses.replace(LIMITS, batching=False)) as alone,
    ):
        yield Served(batched, hold, C), Served(alone, hold, C)


Step = tuple[str, Tensor, int, Tensor | None]  # session name, hidden (B, T, C), start, mask


class Script:
    """Sessions by name and rounds of steps, played on a runtime: in a round, all steps
    queued together (`batched`) or one after another (the reference)."""

    def __init__(self, served: Served, *, batched: bool) -> None:
        self.served, self.batched = served, batched
        self.sessions: dict[str, SessionId] = {}

    async def open(
        self,
        name: str,
        batch_size: int = 1,
        max_length: int = 256,
        block_range: tuple[int, int] | None = None,
    ) -> None:
        runtime = self.served.runtime
        self.sessions[name] = await runtime.open_session(
            max_length, batch_size, block_range=block_range
        )

    async def close(self, name: str) -> None:
        await self.served.runtime.close_session(self.sessions.pop(name))

    def _call(self, name: str, hidden: Tensor, start: int, mask: Tensor | None):
        runtime = self.served.runtime
        session_id = self.sessions.get(name, SessionId(name))
        return lambda: runtime.step(session_id, hidden, start, padding_mask=mask)

    async def round(self, steps: Sequence[Step]) -> list[Any]:
        calls = [self._call(*step) for step in steps]
        if self.batched:
            return await self.served.together(calls)
        return [await _settled(call) for call in calls]


def hidden(B: int, T: int, seed: int) -> Tensor:
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(seed))


def assert_same(got: Sequence[Any], expected: Sequence[Any]) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        if isinstance(b, BaseException):
            assert type(a) is type(b), (a, b)
            continue
        assert isinstance(a, Tensor), a
        assert (a - b).abs().max().item() <= TOLERANCE


async def play(pair: tuple[Served, Served], scenario) -> tuple[list[Any], list[Any]]:
    """`scenario(script)` on both runtimes; every output of the batched one must equal
    the reference's."""
    batched, alone = pair
    got = await scenario(Script(batched, batched=True))
    expected = await scenario(Script(alone, batched=False))
    assert_same(got, expected)
    return got, expected


async def three_sessions(script: Script) -> list[Any]:
    """Three sessions (batch 1, 2, 1) prefill to different lengths, then decode together
    for four rounds."""
    await script.open("a")
    await script.open("b", batch_size=2)
    await script.open("c")
    lengths = {"a": 3, "b": 7, "c": 2}
    rows = {"a": 1, "b": 2, "c": 1}
    outs = await script.round(
        [(n, hidden(rows[n], t, i), 0, None) for i, (n, t) in enumerate(lengths.items())]
    )
    for r in range(4):
        outs += await script.round(
            [
                (n, hidden(rows[n], 1, 10 * r + i), lengths[n] + r, None)
                for i, n in enumerate(lengths)
            ]
        )
    return outs


async def test_batched_decode_steps_equal_each_session_alone(pair) -> None:
    batched, alone = pair
    await play(pair, three_sessions)
    info, reference = batched.runtime.info(), alone.runtime.info()
    # Four rounds, each one batch of the three sessions' four rows; alone, one per step.
    assert (info.batches, info.batched_rows) == (4, 16)
    assert (reference.batches, reference.batched_rows) == (12, 16)
    assert info.steps == reference.steps == 15
    assert info.graphs_captured == 0  # on the CPU decode batches run eagerly
    # Time in steps covers the decode compute inside them, which is not nothing.
    assert 0 < info.decode_seconds < info.step_seconds
    assert 0 < reference.decode_seconds < reference.step_seconds


async def test_sessions_join_and_leave_between_batches(pair) -> None:
    async def scenario(script: Script) -> list[Any]:
        await script.open("a")
        await script.open("b")
        outs = await script.round(
            [("a", hidden(1, 4, 1), 0, None), ("b", hidden(1, 2, 2), 0, None)]
        )
        outs += await script.round(
            [("a", hidden(1, 1, 3), 4, None), ("b", hidden(1, 1, 4), 2, None)]
        )
        await script.open("c", batch_size=2)  # joins: its prefill, then decode with the rest
        outs += await script.round([("c", hidden(2, 5, 5), 0, None)])
        outs += await script.round(
            [
                ("a", hidden(1, 1, 6), 5, None),
                ("b", hidden(1, 1, 7), 3, None),
                ("c", hidden(2, 1, 8), 5, None),
            ]
        )
        await script.close("b")  # leaves; its pages go back and may be reused
        await script.open("d")
        outs += await script.round([("d", hidden(1, 3, 9), 0, None)])
        outs += await script.round(
            [
                ("c", hidden(2, 1, 10), 6, None),
                ("a", hidden(1, 1, 11), 6, None),
                ("d", hidden(1, 1, 12), 3, None),
            ]
        )
        return outs

    await play(pair, scenario)


async def test_rollback_and_replay_inside_a_batch(pair) -> None:
    async def scenario(script: Script) -> list[Any]:
        await script.open("a")
        await script.open("b")
        x = hidden(1, 8, 1)
        outs = await script.round([("a", x[:, :6], 0, None), ("b", hidden(1, 6, 2), 0, None)])
        # a rolls back to 2 with another token while b decodes on; then a replays its
        # real slot 2 and goes on (its stale slots 3..5 must be invisible).
        outs += await script.round(
            [("a", hidden(1, 1, 3), 2, None), ("b", hidden(1, 1, 4), 6, None)]
        )
        outs += await script.round([("a", x[:, 2:3], 2, None), ("b", hidden(1, 1, 5), 7, None)])
        outs += await script.round([("a", x[:, 3:4], 3, None), ("b", hidden(1, 1, 6), 8, None)])
        return outs

    got, _ = await play(pair, scenario)
    # The replayed slots give what the first pass gave: rollback really forgot the junk.
    assert (got[4] - got[0][:, 2:3]).abs().max() <= TOLERANCE
    assert (got[6] - got[0][:, 3:4]).abs().max() <= TOLERANCE


async def test_a_session_far_along_batched_with_a_new_one(pair) -> None:
    async def scenario(script: Script) -> list[Any]:
        await script.open("old")
        outs = await script.round([("old", hidden(1, 150, 1), 0, None)])  # ten pages
        await script.open("new")
        outs += await script.round([("new", hidden(1, 1, 2), 0, None)])
        for r in range(3):
            outs += await script.round(
                [
                    ("old", hidden(1, 1, 10 + r), 150 + r, None),
                    ("new", hidden(1, 1, 20 + r), 1 + r, None),
                ]
            )
        return outs

    await play(pair, scenario)


async def test_a_left_padded_batch_of_two_batched_with_a_batch_of_one(pair) -> None:
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])

    async def scenario(script: Script) -> list[Any]:
        await script.open("padded", batch_size=2)
        await script.open("single")
        outs = await script.round(
            [("padded", hidden(2, 5, 1), 0, mask), ("single", hidden(1, 4, 2), 0, None)]
        )
        for r in range(3):
            outs += await script.round(
                [
                    ("padded", hidden(2, 1, 10 + r), 5 + r, None),
                    ("single", hidden(1, 1, 20 + r), 4 + r, None),
                ]
            )
        return outs

    got, _ = await play(pair, scenario)
    # The padded row's real tokens come out as if that sequence had run alone.
    batched, _ = pair
    script = Script(batched, batched=False)
    await script.open("row0")
    row0 = await script.round(
        [("row0", hidden(2, 5, 1)[:1, 2:], 0, None)]
        + [("row0", hidden(2, 1, 10 + r)[:1], 3 + r, None) for r in range(3)]
    )
    assert (got[0][:1, 2:] - row0[0]).abs().max() <= TOLERANCE
    for r in range(3):
        assert (got[2 + 2 * r][:1] - row0[1 + r]).abs().max() <= TOLERANCE


async def test_sessions_over_other_block_ranges_are_batched_apart(pair) -> None:
    async def scenario(script: Script) -> list[Any]:
        await script.open("whole")
        await script.open("tail", block_range=(1, 3))  # a client entering mid-span
        await script.open("tail2", batch_size=2, block_range=(1, 3))
        outs = await script.round(
            [("whole", hidden(1, 3, 1), 0, None), ("tail", hidden(1, 5, 2), 0, None)]
            + [("tail2", hidden(2, 2, 3), 0, None)]
        )
        for r in range(2):
            outs += await script.round(
                [
                    ("whole", hidden(1, 1, 10 + r), 3 + r, None),
                    ("tail", hidden(1, 1, 20 + r), 5 + r, None),
                    ("tail2", hidden(2, 1, 30 + r), 2 + r, None),
                ]
            )
        return outs

    batched, _ = pair
    await play(pair, scenario)
    # Each round: one batch for the whole span (1 row), one for blocks [1, 3) (3 rows).
    assert (batched.runtime.info().batches, batched.runtime.info().batched_rows) == (4, 8)


async def test_a_closed_session_fails_not_found_and_the_rest_of_its_batch_runs(pair) -> None:
    batched, alone = pair
    outs = {}
    for served in pair:
        script = Script(served, batched=served is batched)
        for name in "abc":
            await script.open(name)
            await script.round([(name, hidden(1, 3, ord(name)), 0, None)])
        steps = [(n, hidden(1, 1, 10 + i), 3, None) for i, n in enumerate("abc")]
        if served is batched:
            calls = [script._call(*step) for step in steps]
            served.hold.arm()
            blocker = asyncio.create_task(served.runtime.forward(torch.zeros(1, 1, C)))
            assert await asyncio.to_thread(served.hold.entered.wait, 10)
            tasks = [asyncio.create_task(_settled(call)) for call in calls]
            for _ in range(1000):
                if served.runtime.info().queue_depth >= 3:
                    break
                await asyncio.sleep(0)
            before = served.runtime.info()
            await script.close("b")  # while its item waits in the batch
            served.hold.release()
            await blocker
            outs[served is batched] = await asyncio.gather(*tasks)
            after = served.runtime.info()
            assert (after.batches - before.batches, after.batched_rows - before.batched_rows) == (
                1,
                2,
            )
        else:
            await script.close("b")
            outs[False] = await script.round(steps)
    got, expected = outs[True], outs[False]
    assert isinstance(got[1], RemoteNotFound) and isinstance(expected[1], RemoteNotFound)
    assert_same(got, expected)


async def test_a_second_step_of_one_session_runs_after_its_first(pair) -> None:
    """Two items of one session in a batch (a client that does not wait for its step):
    in order, never in one block call; a gap is refused for that item only."""
    batched, _ = pair

    async def scenario(script: Script) -> list[Any]:
        await script.open("a")
        await script.open("b")
        outs = await script.round(
            [("a", hidden(1, 2, 1), 0, None), ("b", hidden(1, 2, 2), 0, None)]
        )
        outs += await script.round(
            [
                ("a", hidden(1, 1, 3), 2, None),
                ("a", hidden(1, 1, 4), 3, None),
                ("b", hidden(1, 1, 5), 2, None),
            ]
        )
        outs += await script.round(
            [("a", hidden(1, 1, 6), 4, None), ("a", hidden(1, 1, 7), 7, None)]
        )
        return outs

    before = batched.runtime.info()
    got, _ = await play(pair, scenario)
    assert isinstance(got[-1], RemoteBadRequest) and "gap" in str(got[-1])
    after = batched.runtime.info()
    # Round two: [a@2, b@2] then [a@3]; round three: [a@4], and a@7 refused.
    assert (after.batches - before.batches, after.batched_rows - before.batched_rows) == (3, 4)


# -- a long prefill next to a decoding session (tiny blocks: fast) --------------------


class ChunkGate(nn.Module):
    """Identity that logs each call and makes every multi-token call (a prefill chunk)
    wait for the test's permission."""

    def __init__(self) -> None:
        super().__init__()
        self.log: list[str] = []
        self.entered = threading.Semaphore(0)
        self.allowed = threading.Semaphore(0)
        self.active = True

    def forward(self, hidden: Tensor, cache: Any, context: Any) -> Tensor:
        if not self.active:
            return hidden
        if hidden.shape[1] == 1:
            self.log.append("decode")
            return hidden
        self.log.append("chunk")
        self.entered.release()
        if not self.allowed.acquire(timeout=20):
            raise RuntimeError("chunk never allowed")
        return hidden


async def test_a_long_prefill_lets_other_sessions_decode_between_its_chunks() -> None:
    from tests.unit.test_runtime import FakeSpan, full_forward

    torch.manual_seed(0)
    gate = ChunkGate()
    span = FakeSpan(nn.ModuleList([gate, TinyBlock(), TinyBlock()]))
    span.blocks.requires_grad_(False)
    limits = RuntimeLimits(max_cache_tokens=256, max_session_length=64, prefill_chunk_tokens=4)
    x, y = torch.randn(1, 16, TINY_C), torch.randn(1, 5, TINY_C)
    async with SpanRuntime(span, limits) as runtime:
        decoding = await runtime.open_session(max_length=64)
        first = [await runtime.step(decoding, y[:, :1], 0)]
        long = await runtime.open_session(max_length=64)
        prefill = asyncio.create_task(runtime.step(long, x, 0))  # four chunks of 4
        decodes = []
        for t in range(1, 4):
            assert await asyncio.to_thread(gate.entered.acquire, True, 10)  # chunk t runs
            decode = asyncio.create_task(runtime.step(decoding, y[:, t : t + 1], t))
            for _ in range(1000):
                if runtime.info().queue_depth == 1:
                    break
                await asyncio.sleep(0)
            gate.allowed.release()
            # Completes while the prefill still has chunks to go.
            decodes.append(await asyncio.wait_for(decode, 10))
            assert not prefill.done()
        assert await asyncio.to_thread(gate.entered.acquire, True, 10)
        gate.allowed.release()
        out = await asyncio.wait_for(prefill, 10)
    gate.active = False
    assert gate.log == ["decode"] + ["chunk", "decode"] * 3 + ["chunk"]
    torch.testing.assert_close(out, full_forward(span, x))
    torch.testing.assert_close(torch.cat(first + decodes, 1), full_forward(span, y[:, :4]))


# -- on a GPU: pinned staging, CUDA graphs ----------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
async def test_on_cuda_graph_replayed_batches_equal_eager_steps_alone(dtype) -> None:
    hold = Hold()
    span = model_span("llama-gqa-tied-bias", hold)
    span.blocks.to(device="cuda", dtype=dtype)
    eager_alone = dataclasses.replace(LIMITS, batching=False, cuda_graphs=False)
    async with SpanRuntime(span, LIMITS) as batched, SpanRuntime(span, eager_alone) as alone:
        # Every output is compared after the last round: a result that were a view of a
        # reused staging or graph buffer would have been overwritten by then.
        got = await three_sessions(Script(Served(batched, hold, C), batched=True))
        expected = await three_sessions(Script(Served(alone, hold, C), batched=False))
        info = batched.info()
    assert info.graphs_captured >= 1 and (info.batches, info.batched_rows) == (4, 16)
    for a, b in zip(got, expected, strict=True):
        assert a.device.type == "cpu" and a.dtype == torch.float32  # as the request came
        bound = 1e-4 if dtype == torch.float32 else 3e-2 * float(b.abs().max())
        assert (a - b).abs().max().item() <= bound
