"""The page-backed cache budget: which pool pages a session holds, and when.

A host's KV cache is one pool of 16-token pages; a session row holds whole pages, so every
reservation is rounded up to them. These tests pin the rounding, the growth rules, the
hand-over of pages to be cleared, and, through a runtime, that pages reused after another
session wrote garbage into them give correct results.
"""

from __future__ import annotations

import pytest
import torch

from stamen.models.paged import NULL_PAGE
from stamen.swarm_core.host.runtime import RuntimeLimits, SpanRuntime
from stamen.swarm_core.host.sessions import (
    CacheBudget,
    CacheLimitExceeded,
    Session,
    SessionId,
)
from stamen.swarm_core.protocol.errors import RemoteBusy
from tests.unit.test_runtime import C, full_forward, tiny_span


def session(max_length: int, batch_size: int = 1) -> Session:
    return Session(SessionId("s"), batch_size, max_length, (0, 1))


def opened(budget: CacheBudget, max_length: int, batch_size: int = 1) -> Session:
    s = session(max_length, batch_size)
    budget.first_page(s)
    return s


def all_pages(s: Session) -> list[int]:
    return [page for row in s.pages for page in row]


def test_a_first_page_rounds_each_row_up_to_whole_pool_pages() -> None:
    budget = CacheBudget(65, page_tokens=16, growth_tokens=128)  # 64 pages of 16 tokens
    assert (budget.total_tokens, budget.free_tokens) == (1024, 1024)
    s = opened(budget, max_length=10, batch_size=2)
    # 10 slots need one 16-token page per row: 2 pages, 32 tokens, capacity 16.
    assert (s.capacity, s.reserved_tokens, s.row_pages) == (16, 32, 1)
    assert budget.free_tokens == 1024 - 32
    long = opened(budget, max_length=1000, batch_size=1)  # min(1000, 128) = 8 pages
    assert (long.capacity, budget.free_pages) == (128, 64 - 2 - 8)


def test_pages_are_distinct_never_the_null_page_and_queued_for_clearing() -> None:
    budget = CacheBudget(17, page_tokens=4, growth_tokens=8)
    a, b = opened(budget, 64, batch_size=3), opened(budget, 64, batch_size=2)
    pages = all_pages(a) + all_pages(b)
    assert len(pages) == len(set(pages)) == 10 and NULL_PAGE not in pages
    assert sorted(a.take_pages_to_clear()) == sorted(all_pages(a))
    assert a.take_pages_to_clear() == [] and len(b.pages_to_clear) == 4


def test_growth_doubles_in_growth_pages_and_only_appends() -> None:
    budget = CacheBudget(65, page_tokens=16, growth_tokens=16)
    s = opened(budget, max_length=200, batch_size=2)
    s.take_pages_to_clear()
    capacities = [s.capacity]
    for needed in (10, 17, 33, 40, 65, 130):
        before = [list(row) for row in s.pages]
        budget.grow(s, needed)
        capacities.append(s.capacity)
        for old, row in zip(before, s.pages, strict=True):
            assert row[: len(old)] == old  # nothing moves: no copy on growth
        new = [page for old, row in zip(before, s.pages, strict=True) for page in row[len(old) :]]
        assert sorted(s.take_pages_to_clear()) == sorted(new)
    # 16 -> 32 -> 64 -> 128, then capped by max_length 200, rounded up to 13 pages.
    assert capacities == [16, 16, 32, 64, 64, 128, 208]
    assert budget.free_pages == 64 - 2 * 13


def test_growth_tokens_that_are_not_whole_pages_round_up() -> None:
    budget = CacheBudget(65, page_tokens=16, growth_tokens=24)
    s = opened(budget, max_length=100)
    assert s.capacity == 32  # 24 slots take two pages
    budget.grow(s, 33)  # doubled 64, a multiple of 24 is 72: five pages
    assert s.capacity == 80


def test_growth_without_free_pages_is_busy_and_changes_nothing() -> None:
    budget = CacheBudget(9, page_tokens=16, growth_tokens=16, retry_after_s=2.5)  # 8 pages
    s = opened(budget, max_length=128, batch_size=2)
    hog = opened(budget, max_length=128, batch_size=1)
    budget.grow(hog, 80)  # 5 pages (doubling to 32 is less than the step needs)
    assert budget.free_pages == 1
    pages, queued = [list(row) for row in s.pages], list(s.pages_to_clear)
    with pytest.raises(RemoteBusy, match="no room to grow") as refused:
        budget.grow(s, 17)  # one more page per row: two needed, one free
    assert refused.value.retry_after_s == 2.5
    assert (s.pages, list(s.pages_to_clear), s.capacity) == (pages, queued, 16)
    assert budget.free_pages == 1


def test_growth_takes_what_is_free_when_doubling_is_not() -> None:
    budget = CacheBudget(7, page_tokens=16, growth_tokens=16)  # 6 pages
    s = opened(budget, max_length=256)
    budget.grow(s, 17)
    budget.grow(s, 33)  # 4 pages now, 2 free: doubling to 8 pages does not fit
    budget.grow(s, 65)
    assert (s.capacity, budget.free_pages) == (96, 0)  # the need (5 pages) and the rest


def test_the_per_session_cap_counts_the_tokens_a_step_addresses() -> None:
    budget = CacheBudget(65, page_tokens=16, growth_tokens=16, max_session_tokens=100)
    s = opened(budget, max_length=512, batch_size=2)
    budget.grow(s, 50)  # 2 x 50 = 100 tokens: allowed, held as 2 x 4 pages (128 tokens)
    assert s.capacity == 64
    budget.grow(s, 64)  # within the pages it holds: nothing to check, nothing moves
    assert (s.capacity, budget.free_pages) == (64, 64 - 8)
    with pytest.raises(CacheLimitExceeded, match="max_session_cache_fraction"):
        budget.grow(s, 65)
    with pytest.raises(RemoteBusy, match="at most 100 per session"):
        opened(budget, max_length=512, batch_size=8)  # 8 x 16 > 100 at open


def test_release_returns_every_page_and_reuse_queues_them_again() -> None:
    budget = CacheBudget(5, page_tokens=16, growth_tokens=16)
    s = opened(budget, max_length=64, batch_size=2)
    budget.grow(s, 20)
    assert budget.free_pages == 0
    with pytest.raises(RemoteBusy, match="first page"):
        opened(budget, max_length=16)
    held = set(all_pages(s))
    tables = [list(row) for row in s.pages]
    budget.release(s)
    assert (budget.free_pages, s.capacity) == (4, 0)
    # The closed session's page lists stay readable: a batch being built on the compute
    # thread may still read them (it then drops the closed session's item).
    assert s.pages == tables
    t = opened(budget, max_length=64, batch_size=4)
    assert set(all_pages(t)) == held == set(t.pages_to_clear)


def test_a_pool_of_only_the_null_page_refuses_every_session() -> None:
    budget = CacheBudget(1, page_tokens=16)
    assert budget.total_tokens == 0
    with pytest.raises(RemoteBusy):
        opened(budget, max_length=1)


async def test_the_runtime_rounds_its_budget_to_pool_pages() -> None:
    limits = RuntimeLimits(max_cache_tokens=100, max_session_length=64)  # 6 pages of 16
    async with SpanRuntime(tiny_span(1), limits) as runtime:
        assert runtime.info().cache_tokens_total == 96
        session_id = await runtime.open_session(max_length=10, batch_size=2)
        assert runtime.info().cache_tokens_free == 96 - 2 * 16
        await runtime.step(session_id, torch.randn(2, 10, C), 0)  # within the pages held
        assert runtime.info().cache_tokens_free == 64
        await runtime.close_session(session_id)
        assert runtime.info().cache_tokens_free == 96


async def test_pages_written_with_garbage_by_a_closed_session_are_cleared_for_the_next() -> None:
    span = tiny_span()
    limits = RuntimeLimits(
        max_cache_tokens=32, max_session_length=32, max_session_cache_fraction=1.0
    )  # two pages, both for one session
    x = torch.randn(1, 6, C)
    async with SpanRuntime(span, limits) as runtime:
        dirty = await runtime.open_session(max_length=32)
        out = await runtime.step(dirty, torch.full((1, 32, C), float("nan")), 0)
        assert out.isnan().all()
        await runtime.close_session(dirty)
        clean = await runtime.open_session(max_length=32)  # the same two pages
        outs = [await runtime.step(clean, x[:, :3], 0)]
        outs += [await runtime.step(clean, x[:, t : t + 1], t) for t in range(3, 6)]
    torch.testing.assert_close(torch.cat(outs, 1), full_forward(span, x))
