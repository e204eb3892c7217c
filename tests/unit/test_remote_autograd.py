"""RemoteSpans against in-process fake hosts running real tiny Llama blocks.

Every fake host computes with `stamen.models.chain.run_blocks`, the code real hosts run
(prompts added at positions [0, P) before each block), forward under no_grad and backward
by local autograd. The reference is plain autograd through the same blocks in one go, so
any chunk routed wrong, gradient lost, summed twice or computed from the wrong saved
input shows up as a difference.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

from stamen.models.base import StepContext
from stamen.models.chain import run_blocks
from stamen.swarm_core.client.autograd import RemoteSpans, Runner, SpanCallFailed
from stamen.swarm_core.client.remote import (
    HopError,
    HopSession,
    HostBusy,
    HostInfo,
    RequestTooLarge,
    SpanClient,
)
from stamen.swarm_core.client.routing import BanList

NUM_BLOCKS = 4
B, T, C, P = 4, 5, 64, 2


@pytest.fixture(scope="module")
def blocks() -> list[nn.Module]:
    from transformers import LlamaConfig

    from stamen.conformance.adapters import LocalChain, Reference

    config = LlamaConfig(
        vocab_size=96,
        hidden_size=C,
        intermediate_size=96,
        num_hidden_layers=NUM_BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    built = LocalChain.build(Reference.build(config, seed=5))
    for block in built.blocks:
        block.requires_grad_(False)  # hosts never train weights
    return list(built.blocks)


@pytest.fixture
def run() -> Iterator[Runner]:
    """Coroutines run on a loop in another thread, as the swarm's loop is for training."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield lambda coroutine: asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=60)
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
    loop.close()


def compute(
    blocks: list[nn.Module], hidden: Tensor, prompts: Tensor | None, mask: Tensor | None
) -> Tensor:
    context = StepContext.make(
        0, hidden.shape[1], batch_size=hidden.shape[0], key_padding_mask=mask
    )
    return run_blocks(blocks, hidden, context, prompts)


class BlockHost(SpanClient):
    """A host serving real blocks `[start, end)` statelessly, with failures on demand."""

    def __init__(
        self,
        peer_id: str,
        start: int,
        end: int,
        blocks: list[nn.Module],
        *,
        throughput: float = 1000.0,
        announced_max_tokens: int | None = None,
        refuse_over_tokens: int | None = None,
    ) -> None:
        self.info = HostInfo(
            peer_id,
            start,
            end,
            throughput,
            free_cache_tokens=10_000,
            ping_s=0.01,
            max_request_tokens=announced_max_tokens,
        )
        self.blocks = blocks  # the whole model's; this host runs only its span
        self.refuse_over_tokens = refuse_over_tokens or announced_max_tokens
        self.fail = Counter[str]()  # kind -> calls still to fail with HopError
        self.busy = 0  # calls still to refuse as busy
        self.hang = Counter[str]()  # kind -> calls still to never answer
        self.served: list[tuple[str, int, int, int]] = []  # (kind, start, end, rows)

    @property
    def peer_id(self) -> str:
        return self.info.peer_id

    async def open_session(
        self, start: int, end: int, max_length: int, batch_size: int
    ) -> HopSession:
        raise NotImplementedError

    async def _admit(self, kind: str, start: int, end: int, hidden: Tensor) -> None:
        await asyncio.sleep(0)  # a real call yields to the loop
        assert self.info.start <= start < end <= self.info.end, "routed outside the span"
        if self.busy > 0:
            self.busy -= 1
            raise HostBusy("queue full", peer_id=self.peer_id, retry_after_s=0.0)
        tokens = hidden.shape[0] * hidden.shape[1]
        if self.refuse_over_tokens is not None and tokens > self.refuse_over_tokens:
            raise RequestTooLarge(f"{tokens} tokens > {self.refuse_over_tokens}")
        if self.hang[kind] > 0:
            self.hang[kind] -= 1
            await asyncio.sleep(3600)
        if self.fail[kind] > 0:
            self.fail[kind] -= 1
            raise HopError("connection lost", peer_id=self.peer_id)
        self.served.append((kind, start, end, hidden.shape[0]))

    async def forward(
        self,
        start: int,
        end: int,
        hidden: Tensor,
        prompts: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        await self._admit("forward", start, end, hidden)
        with torch.no_grad():
            return compute(self.blocks[start:end], hidden, prompts, padding_mask)

    async def backward(
        self,
        start: int,
        end: int,
        hidden: Tensor,
        grad_output: Tensor,
        prompts: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        await self._admit("backward", start, end, hidden)
        with torch.enable_grad():
            x = hidden.detach().requires_grad_()
            p = None if prompts is None else prompts.detach().requires_grad_()
            out = compute(self.blocks[start:end], x, p, padding_mask)
            wrt = [x] if p is None else [x, p]
            grads = torch.autograd.grad(out, wrt, grad_output)
        return grads[0], (grads[1] if p is not None else None)

    def rows_served(self, kind: str) -> int:
        return sum(rows for k, _, _, rows in self.served if k == kind)


class FakeSwarm:
    def __init__(self, *hosts: BlockHost) -> None:
        self.by_id = {h.peer_id: h for h in hosts}

    def hosts(self) -> list[HostInfo]:
        return [h.info for h in self.by_id.values()]

    async def connect(self, peer_id: str) -> SpanClient:
        if peer_id not in self.by_id:
            raise HopError("unreachable", peer_id=peer_id)
        return self.by_id[peer_id]

    async def refresh(self, max_age_s: float = 0.0) -> None:
        pass


def inputs(
    prompt_batch: int | None, seed: int = 0, padded: bool = False
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """hidden (B, T, C), prompts (n, prompt_batch, P, C) or None, mask, loss weights."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g)
    prompts = None
    if prompt_batch is not None:
        prompts = 0.5 * torch.randn(NUM_BLOCKS, prompt_batch, P, C, generator=g)
    mask = None
    if padded:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[1, :2] = False  # left padding: row 1 has 3 real tokens
    return hidden, prompts, mask, torch.randn(B, T, C, generator=g)


def local_grads(
    blocks: list[nn.Module], hidden: Tensor, prompts: Tensor | None, mask: Tensor | None, w: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    x = hidden.clone().requires_grad_()
    p = None if prompts is None else prompts.clone().requires_grad_()
    out = compute(blocks, x, p, mask)
    (out * w).sum().backward()
    return out.detach(), x.grad, None if p is None else p.grad  # type: ignore[return-value]


def remote_grads(
    spans: RemoteSpans,
    run: Runner,
    hidden: Tensor,
    prompts: Tensor | None,
    mask: Tensor | None,
    w: Tensor,
) -> tuple[Tensor, Tensor, Tensor | None]:
    x = hidden.clone().requires_grad_()
    p = None if prompts is None else prompts.clone().requires_grad_()
    out = spans.apply(run, x, p, mask)
    (out * w).sum().backward()
    return out.detach(), x.grad, None if p is None else p.grad  # type: ignore[return-value]


def assert_close(got: Tensor | None, want: Tensor | None, rel: float = 1e-5) -> None:
    assert got is not None and want is not None
    assert got.shape == want.shape
    assert ((got - want).norm() / want.norm()).item() <= rel


def assert_same_grads(got: tuple, want: tuple) -> None:
    for g, w in zip(got, want, strict=True):
        if w is None:
            assert g is None
        else:
            assert_close(g, w)


def spans_over(swarm: FakeSwarm, **kw: object) -> RemoteSpans:
    kw.setdefault("retry_delay_s", 0.0)
    return RemoteSpans(swarm, 0, NUM_BLOCKS, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("prompt_batch", "padded", "max_chunk_tokens"),
    [(None, False, None), (1, False, None), (1, True, 2 * T), (B, False, T), (B, True, 3 * T)],
    ids=["no-prompts", "deep-prompts", "deep-padded-chunked", "per-row-chunked", "uneven"],
)
def test_gradients_through_two_hosts_equal_local_autograd(
    blocks: list[nn.Module],
    run: Runner,
    prompt_batch: int | None,
    padded: bool,
    max_chunk_tokens: int | None,
) -> None:
    swarm = FakeSwarm(BlockHost("a", 0, 2, blocks), BlockHost("b", 2, 4, blocks))
    hidden, prompts, mask, w = inputs(prompt_batch, padded=padded)
    spans = spans_over(swarm, max_chunk_tokens=max_chunk_tokens)
    got = remote_grads(spans, run, hidden, prompts, mask, w)
    assert_same_grads(got, local_grads(blocks, hidden, prompts, mask, w))
    a, b = swarm.by_id["a"], swarm.by_id["b"]
    chunk_rows = B if max_chunk_tokens is None else max_chunk_tokens // T
    assert max(rows for _, _, _, rows in a.served + b.served) == chunk_rows
    assert a.rows_served("backward") == b.rows_served("backward") == B


def test_adam_on_deep_prompts_follows_the_local_run(blocks: list[nn.Module], run: Runner) -> None:
    swarm = FakeSwarm(
        BlockHost("a", 0, 2, blocks), BlockHost("b1", 2, 4, blocks), BlockHost("b2", 2, 4, blocks)
    )
    spans = spans_over(swarm, max_chunk_tokens=T)
    hidden, _, mask, target = inputs(None, seed=3, padded=True)

    def train(forward: object) -> list[float]:
        prompts = nn.Parameter(torch.zeros(NUM_BLOCKS, 1, P, C))
        optimizer = torch.optim.Adam([prompts], lr=1e-2)
        losses = []
        for _ in range(20):
            out = forward(hidden, prompts)  # type: ignore[operator]
            loss = ((out - target) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses

    local = train(lambda x, p: compute(blocks, x, p, mask))
    remote = train(lambda x, p: spans.apply(run, x, p, mask))
    assert local[-1] < local[0]  # the prompts learn something
    assert remote == pytest.approx(local, rel=1e-4, abs=1e-4)
    assert swarm.by_id["b1"].served and swarm.by_id["b2"].served


def test_chunks_spread_over_both_replicas_of_a_span(blocks: list[nn.Module], run: Runner) -> None:
    b1, b2 = BlockHost("b1", 2, 4, blocks), BlockHost("b2", 2, 4, blocks)
    swarm = FakeSwarm(BlockHost("a", 0, 2, blocks), b1, b2)
    hidden, prompts, mask, w = inputs(1)
    got = remote_grads(spans_over(swarm, max_chunk_tokens=T), run, hidden, prompts, mask, w)
    assert_same_grads(got, local_grads(blocks, hidden, prompts, mask, w))
    for kind in ("forward", "backward"):
        assert b1.rows_served(kind) == b2.rows_served(kind) == B // 2


def test_a_faster_replica_takes_more_chunks(blocks: list[nn.Module], run: Runner) -> None:
    fast = BlockHost("fast", 0, 4, blocks, throughput=3000.0)
    slow = BlockHost("slow", 0, 4, blocks, throughput=1000.0)
    hidden = torch.randn(8, T, C)
    out, _ = run(spans_over(FakeSwarm(fast, slow), max_chunk_tokens=T).forward(hidden))
    assert_close(out, compute(blocks, hidden, None, None))
    assert fast.rows_served("forward") == 6 and slow.rows_served("forward") == 2


@pytest.mark.parametrize("kind", ["forward", "backward"])
def test_a_host_failing_once_is_banned_and_gradients_stay_exact(
    blocks: list[nn.Module], run: Runner, kind: str
) -> None:
    b1, b2 = BlockHost("b1", 2, 4, blocks), BlockHost("b2", 2, 4, blocks)
    b1.fail[kind] = 1
    swarm = FakeSwarm(BlockHost("a", 0, 2, blocks), b1, b2)
    bans = BanList()
    spans = spans_over(swarm, ban_list=bans, max_chunk_tokens=T, max_retries=1)
    hidden, prompts, mask, w = inputs(1, padded=True)
    got = remote_grads(spans, run, hidden, prompts, mask, w)
    assert_same_grads(got, local_grads(blocks, hidden, prompts, mask, w))
    assert b1.info.incarnation in bans and bans.strikes(b1.info.incarnation) == 1
    assert b1.rows_served(kind) < B // 2  # it served no more chunks of that pass
    assert b2.rows_served(kind) + b1.rows_served(kind) == B


def test_a_host_that_stops_answering_times_out_and_is_banned(
    blocks: list[nn.Module], run: Runner
) -> None:
    stuck = BlockHost("stuck", 0, 4, blocks, throughput=5000.0)
    stuck.hang["forward"] = 1
    backup = BlockHost("backup", 0, 4, blocks)
    bans = BanList()
    spans = spans_over(FakeSwarm(stuck, backup), ban_list=bans, call_timeout_s=0.2)
    hidden, prompts, mask, w = inputs(B)
    got = remote_grads(spans, run, hidden, prompts, mask, w)
    assert_same_grads(got, local_grads(blocks, hidden, prompts, mask, w))
    assert stuck.info.incarnation in bans
    assert backup.rows_served("forward") == B


def test_busy_is_never_a_ban_and_costs_no_retries(blocks: list[nn.Module], run: Runner) -> None:
    only = BlockHost("only", 0, 4, blocks)
    only.busy = 5  # more refusals than max_retries allows failures
    bans = BanList()
    spans = spans_over(FakeSwarm(only), ban_list=bans, max_retries=1)
    hidden, prompts, mask, w = inputs(1)
    got = remote_grads(spans, run, hidden, prompts, mask, w)
    assert_same_grads(got, local_grads(blocks, hidden, prompts, mask, w))
    assert only.info.incarnation not in bans and bans.strikes(only.info.incarnation) == 0


def test_a_busy_host_sends_the_chunk_to_another_replica(
    blocks: list[nn.Module], run: Runner
) -> None:
    busy, other = BlockHost("busy", 0, 4, blocks), BlockHost("other", 0, 4, blocks)
    busy.busy = 100
    hidden = torch.randn(B, T, C)
    bans = BanList()
    out, _ = run(spans_over(FakeSwarm(busy, other), ban_list=bans).forward(hidden))
    assert_close(out, compute(blocks, hidden, None, None))
    assert other.rows_served("forward") == B and busy.info.incarnation not in bans


def test_request_too_large_splits_the_chunk(blocks: list[nn.Module], run: Runner) -> None:
    # Caps the hosts never announced: each refusal halves the rows.
    a = BlockHost("a", 0, 2, blocks, refuse_over_tokens=2 * T)
    b = BlockHost("b", 2, 4, blocks, refuse_over_tokens=T)
    bans = BanList()
    spans = spans_over(FakeSwarm(a, b), ban_list=bans)
    hidden, prompts, mask, w = inputs(B, padded=True)
    got = remote_grads(spans, run, hidden, prompts, mask, w)
    assert_same_grads(got, local_grads(blocks, hidden, prompts, mask, w))
    assert {rows for _, _, _, rows in a.served} == {2}
    assert {rows for _, _, _, rows in b.served} == {1}
    assert a.info.incarnation not in bans and b.info.incarnation not in bans


def test_announced_request_caps_size_the_chunks_up_front(
    blocks: list[nn.Module], run: Runner
) -> None:
    a = BlockHost("a", 0, 4, blocks, announced_max_tokens=3 * T)
    hidden = torch.randn(B, T, C)
    out, _ = run(spans_over(FakeSwarm(a)).forward(hidden))
    assert_close(out, compute(blocks, hidden, None, None))
    assert [rows for _, _, _, rows in a.served] == [3, 1]


def test_a_single_row_too_large_fails_naming_the_blocks(
    blocks: list[nn.Module], run: Runner
) -> None:
    b = BlockHost("b", 2, 4, blocks, refuse_over_tokens=T - 1)
    spans = spans_over(FakeSwarm(BlockHost("a", 0, 2, blocks), b))
    with pytest.raises(SpanCallFailed) as info:
        run(spans.forward(torch.randn(B, T, C)))
    assert "blocks [2, 4)" in str(info.value) and "RequestTooLarge" in str(info.value)


def test_exhausted_retries_name_the_blocks_and_the_causes(
    blocks: list[nn.Module], run: Runner
) -> None:
    hosts = [BlockHost(f"b{i}", 2, 4, blocks) for i in range(4)]
    for host in hosts:
        host.fail["forward"] = 1
    spans = spans_over(FakeSwarm(BlockHost("a", 0, 2, blocks), *hosts), max_retries=2)
    with pytest.raises(SpanCallFailed) as info:
        spans.apply(run, torch.randn(B, T, C, requires_grad=True))
    error = info.value
    assert (error.start, error.end) == (2, 4)
    assert error.attempts == 3
    assert all("connection lost" in cause for cause in error.causes)
    assert len({cause.split(":")[0] for cause in error.causes}) == 3  # three hosts tried


def test_no_route_left_fails_within_the_deadline(blocks: list[nn.Module], run: Runner) -> None:
    dying = BlockHost("b", 2, 4, blocks)
    dying.fail["forward"] = 100
    spans = spans_over(
        FakeSwarm(BlockHost("a", 0, 2, blocks), dying),
        failover_timeout_s=0.3,
        max_retries=10_000,
        retry_delay_s=0.05,
    )
    began_s = time.monotonic()
    with pytest.raises(SpanCallFailed) as info:
        run(spans.forward(torch.randn(B, T, C)))
    assert 0.3 <= time.monotonic() - began_s < 1.0  # the deadline ends it, not a count
    assert (info.value.start, info.value.end) == (2, 4)
    assert "no usable host serves blocks [2, 4)" in str(info.value)


def test_route_change_between_forward_and_backward_keeps_gradients_exact(
    blocks: list[nn.Module], run: Runner
) -> None:
    whole = BlockHost("whole", 1, 4, blocks)
    swarm = FakeSwarm(BlockHost("a", 0, 1, blocks), whole)
    spans = spans_over(swarm)
    hidden, prompts, mask, w = inputs(1, padded=True)
    x = hidden.clone().requires_grad_()
    p = prompts.clone().requires_grad_()  # type: ignore[union-attr]
    out = spans.apply(run, x, p, mask)
    # The forward's host for blocks [1, 4) leaves; two others now cover the range.
    del swarm.by_id["whole"]
    c, d = BlockHost("c", 1, 3, blocks), BlockHost("d", 3, 4, blocks)
    swarm.by_id.update(c=c, d=d)
    (out * w).sum().backward()
    got = (out.detach(), x.grad, p.grad)
    assert_same_grads(got, local_grads(blocks, hidden, prompts, mask, w))
    assert whole.rows_served("backward") == 0
    assert c.served == [("forward", 1, 3, B), ("backward", 1, 3, B)]  # recomputed, then back
    assert d.served == [("backward", 3, 4, B)]


def test_without_grad_only_the_forward_runs(blocks: list[nn.Module], run: Runner) -> None:
    host = BlockHost("a", 0, 4, blocks)
    hidden, prompts, mask, _ = inputs(1)
    with torch.no_grad():
        out = spans_over(FakeSwarm(host)).apply(run, hidden.requires_grad_(), prompts, mask)
    assert out.grad_fn is None
    assert_close(out, compute(blocks, hidden.detach(), prompts, mask))
    assert [kind for kind, *_ in host.served] == ["forward"]


def test_inputs_that_do_not_fit_are_refused_before_any_host_is_called(
    blocks: list[nn.Module], run: Runner
) -> None:
    host = BlockHost("a", 0, 4, blocks)
    spans = spans_over(FakeSwarm(host))
    with pytest.raises(ValueError, match="prompts"):
        run(spans.forward(torch.randn(B, T, C), torch.zeros(NUM_BLOCKS - 1, 1, P, C)))
    with pytest.raises(ValueError, match="prompts"):
        run(spans.forward(torch.randn(B, 1, C), torch.zeros(NUM_BLOCKS, 1, P, C)))  # T < P
    with pytest.raises(ValueError, match="padding_mask"):
        run(spans.forward(torch.randn(B, T, C), None, torch.ones(B, T)))
    assert host.served == []
