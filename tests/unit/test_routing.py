"""Routing: least-latency chains, skipped hosts, spreading, and growing bans."""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stamen.swarm_core.client.remote import HostInfo, Incarnation
from stamen.swarm_core.client.routing import (
    BanList,
    NoRouteError,
    RouteHop,
    plan_latency_route,
    plan_spread_route,
    plan_throughput_route,
    route_latency_s,
)
from stamen.swarm_core.protocol.records import HostState


def host(
    peer_id: str,
    start: int,
    end: int,
    *,
    throughput: float = 1000.0,
    ping_s: float | None = 0.01,
    free: int = 10_000,
    state: HostState = HostState.ONLINE,
) -> HostInfo:
    return HostInfo(peer_id, start, end, throughput, free, state, ping_s)


def inc(peer_id: str, started_at_s: float = 0.0) -> Incarnation:
    return Incarnation(peer_id, started_at_s)


def spans(route: list[RouteHop]) -> list[tuple[str, int, int]]:
    return [(hop.peer_id, hop.start, hop.end) for hop in route]


def assert_valid_chain(route: list[RouteHop], start: int, end: int) -> None:
    assert route[0].start == start and route[-1].end == end
    for prev, nxt in zip(route, route[1:]):
        assert prev.end == nxt.start
    for hop in route:
        assert hop.host.start <= hop.start < hop.end <= hop.host.end


def test_fast_hosts_beat_one_slow_host_covering_everything() -> None:
    hosts = [
        host("slow", 0, 8, throughput=10.0),  # 0.1 s per block
        host("fast-a", 0, 4, throughput=1000.0),
        host("fast-b", 4, 8, throughput=1000.0),
    ]
    assert spans(plan_latency_route(hosts, 0, 8)) == [("fast-a", 0, 4), ("fast-b", 4, 8)]


def test_one_hop_preferred_over_two_equally_fast_hops() -> None:
    hosts = [host("a", 0, 4), host("b", 4, 8), host("whole", 0, 8)]
    assert spans(plan_latency_route(hosts, 0, 8)) == [("whole", 0, 8)]


def test_far_host_avoided_when_a_near_one_serves_the_same_blocks() -> None:
    hosts = [host("far", 0, 8, ping_s=0.5), host("near", 0, 8, ping_s=0.01)]
    assert spans(plan_latency_route(hosts, 0, 8)) == [("near", 0, 8)]


def test_unmeasured_ping_counts_as_the_default() -> None:
    hosts = [host("unknown", 0, 8, ping_s=None), host("measured", 0, 8, ping_s=0.05)]
    assert spans(plan_latency_route(hosts, 0, 8, default_ping_s=0.01)) == [("unknown", 0, 8)]
    assert spans(plan_latency_route(hosts, 0, 8, default_ping_s=0.2)) == [("measured", 0, 8)]


def test_hosts_entered_and_left_inside_their_spans() -> None:
    # The fast host serves 2..10 but only 3..7 is asked for beyond the slow host's part.
    hosts = [host("slow", 0, 5, throughput=10.0), host("fast", 2, 10, throughput=1000.0)]
    route = plan_latency_route(hosts, 1, 7)
    assert spans(route) == [("slow", 1, 2), ("fast", 2, 7)]
    assert_valid_chain(route, 1, 7)


@pytest.mark.parametrize(
    "skipped",
    [
        {"state": HostState.OFFLINE},
        {"state": HostState.JOINING},
        {"free": 99},
    ],
)
def test_unusable_hosts_are_skipped(skipped: dict) -> None:
    hosts = [host("best", 0, 8, **skipped), host("a", 0, 4), host("b", 4, 8)]
    route = plan_latency_route(hosts, 0, 8, min_cache_tokens=100)
    assert spans(route) == [("a", 0, 4), ("b", 4, 8)]


def test_banned_hosts_are_skipped() -> None:
    hosts = [host("best", 0, 8), host("a", 0, 4), host("b", 4, 8)]
    bans = BanList()
    bans.ban(inc("best"))
    assert spans(plan_latency_route(hosts, 0, 8, banned=bans)) == [("a", 0, 4), ("b", 4, 8)]


def test_a_restarted_host_is_not_banned_for_its_previous_incarnation() -> None:
    bans = BanList()
    bans.ban(inc("best", started_at_s=100.0))
    restarted = HostInfo("best", 0, 8, 1000.0, 10_000, ping_s=0.01, started_at_s=200.0)
    hosts = [restarted, host("a", 0, 4), host("b", 4, 8)]
    assert spans(plan_latency_route(hosts, 0, 8, banned=bans)) == [("best", 0, 8)]
    assert inc("best", 100.0) in bans and restarted.incarnation not in bans


def test_no_route_names_the_first_uncovered_blocks_and_why() -> None:
    hosts = [
        host("a", 0, 4),
        host("down", 4, 6, state=HostState.OFFLINE),
        host("full", 4, 5, free=0),
        host("c", 6, 8),
    ]
    with pytest.raises(NoRouteError) as info:
        plan_latency_route(hosts, 0, 8, min_cache_tokens=10)
    assert info.value.uncovered == (4, 6)
    assert info.value.skipped == {"down": "offline", "full": "0 free cache tokens < 10"}
    assert "blocks [4, 6)" in str(info.value)


def test_hosts_whose_session_cap_is_too_small_are_skipped_before_the_session_runs() -> None:
    small = HostInfo("small", 0, 8, 5000.0, 10_000, ping_s=0.01, max_session_cache_tokens=512)
    unannounced = host("old", 0, 8, throughput=10.0)  # an older host that says nothing
    route = plan_latency_route([small, unannounced], 0, 8, session_cache_tokens=512)
    assert spans(route) == [("small", 0, 8)]
    route = plan_latency_route([small, unannounced], 0, 8, session_cache_tokens=513)
    assert spans(route) == [("old", 0, 8)]
    with pytest.raises(NoRouteError) as info:
        plan_latency_route([small], 0, 8, session_cache_tokens=1024)
    assert info.value.skipped == {"small": "sessions limited to 512 cache tokens < 1024"}
    assert info.value.too_large  # no wait will make this session fit
    bans = BanList()
    bans.ban(unannounced.incarnation)
    with pytest.raises(NoRouteError) as info:
        plan_latency_route([small, unannounced], 0, 8, banned=bans, session_cache_tokens=1024)
    assert not info.value.too_large  # the banned host could take it once its ban ends


def test_no_route_at_the_end_of_the_range() -> None:
    with pytest.raises(NoRouteError) as info:
        plan_latency_route([host("a", 0, 7)], 0, 8)
    assert info.value.uncovered == (7, 8)
    assert "block 7" in str(info.value)


def test_spread_route_covers_the_range_and_favours_throughput() -> None:
    hosts = [host("big", 0, 8, throughput=900.0), host("small", 0, 8, throughput=100.0)]
    rng = random.Random(1234)
    picks = Counter()
    for _ in range(400):
        route = plan_spread_route(hosts, 0, 8, rng=rng)
        assert_valid_chain(route, 0, 8)
        picks[route[0].peer_id] += 1
    assert picks["small"] > 0
    assert picks["big"] > 3 * picks["small"]


def test_spread_route_skips_banned_and_reports_gaps() -> None:
    hosts = [host("a", 0, 4), host("b", 4, 8), host("b2", 4, 8)]
    route = plan_spread_route(hosts, 0, 8, banned={inc("b")}, rng=random.Random(0))
    assert spans(route) == [("a", 0, 4), ("b2", 4, 8)]
    with pytest.raises(NoRouteError) as info:
        plan_spread_route(hosts, 0, 8, banned={inc("b"), inc("b2")})
    assert info.value.uncovered == (4, 8)


def test_throughput_route_sends_each_next_chunk_to_the_replica_with_less_queued() -> None:
    hosts = [host("a", 0, 4), host("b1", 4, 8), host("b2", 4, 8)]
    load: Counter[str] = Counter()
    for _ in range(6):
        route = plan_throughput_route(hosts, 0, 8, load=load, tokens=100)
        assert_valid_chain(route, 0, 8)
        for hop in route:
            load[hop.peer_id] += 100
    assert load == {"a": 600, "b1": 300, "b2": 300}


def test_throughput_route_shares_chunks_in_proportion_to_throughput() -> None:
    hosts = [host("fast", 0, 8, throughput=3000.0), host("slow", 0, 8, throughput=1000.0)]
    load: Counter[str] = Counter()
    for _ in range(40):
        (hop,) = plan_throughput_route(hosts, 0, 8, load=load, tokens=10)
        load[hop.peer_id] += 10
    assert load["fast"] == 3 * load["slow"]


def test_throughput_route_prefers_two_idle_hosts_to_one_busy_host() -> None:
    hosts = [host("whole", 0, 8), host("a", 0, 4), host("b", 4, 8)]
    assert spans(plan_throughput_route(hosts, 0, 8, tokens=10)) == [("whole", 0, 8)]
    busy = plan_throughput_route(hosts, 0, 8, load={"whole": 1000}, tokens=10)
    assert spans(busy) == [("a", 0, 4), ("b", 4, 8)]


def test_throughput_route_skips_hosts_whose_request_cap_is_below_one_row() -> None:
    small = HostInfo("small", 0, 8, 5000.0, 10_000, ping_s=0.01, max_request_tokens=64)
    other = host("other", 0, 8, throughput=10.0)
    assert spans(plan_throughput_route([small, other], 0, 8, min_request_tokens=64)) == [
        ("small", 0, 8)
    ]
    assert spans(plan_throughput_route([small, other], 0, 8, min_request_tokens=65)) == [
        ("other", 0, 8)
    ]
    with pytest.raises(NoRouteError) as info:
        plan_throughput_route([small], 0, 8, min_request_tokens=65)
    assert info.value.skipped == {"small": "requests limited to 64 tokens < 65"}
    assert info.value.too_large


def test_bans_double_on_repeated_failures_up_to_a_cap() -> None:
    now = [0.0]
    bans = BanList(base_ban_s=15.0, max_ban_s=100.0, clock=lambda: now[0])
    durations = []
    for _ in range(5):
        durations.append(bans.ban(inc("x")))
        now[0] += durations[-1]  # each failure after the previous ban ended
    assert durations == [15.0, 30.0, 60.0, 100.0, 100.0]
    now[0] = 0.0
    bans = BanList(base_ban_s=15.0, max_ban_s=100.0, clock=lambda: now[0])
    bans.ban(inc("x"))
    assert inc("x") in bans and inc("y") not in bans
    now[0] = 14.9
    assert inc("x") in bans
    now[0] = 15.0
    assert inc("x") not in bans
    assert bans.ban(inc("x")) == 30.0  # strikes are remembered for a while after the ban
    now[0] += 1000.0
    assert bans.strikes(inc("x")) == 0
    assert bans.ban(inc("x")) == 15.0  # ...and forgotten after a long quiet period


def test_failures_while_banned_are_one_outage_not_many_strikes() -> None:
    """64 sessions on one broken connection report 64 failures within milliseconds: that
    is one failure of the host, not 64 doublings of its ban."""
    now = [0.0]
    bans = BanList(base_ban_s=15.0, max_ban_s=300.0, clock=lambda: now[0])
    for i in range(64):
        now[0] = i * 0.001
        bans.ban(inc("x"))
    assert bans.strikes(inc("x")) == 1
    assert bans.remaining_s(inc("x")) == pytest.approx(15.0, abs=0.1)


def _brute_force_latency_s(hosts: list[HostInfo], start: int, end: int) -> float:
    """Dijkstra over every block boundary (no shortcuts), as a reference."""
    return _brute_force_cost(
        hosts, start, end, lambda h, n: (h.ping_s or 0.0) + h.compute_s_per_block * n
    )


def _brute_force_cost(
    hosts: list[HostInfo], start: int, end: int, hop_cost: Callable[[HostInfo, int], float]
) -> float:
    best = {start: 0.0}
    heap = [(0.0, start)]
    while heap:
        cost, node = heapq.heappop(heap)
        if cost > best[node]:
            continue
        for h in hosts:
            if h.start <= node < h.end:
                for exit_node in range(node + 1, min(h.end, end) + 1):
                    new = cost + hop_cost(h, exit_node - node)
                    if new < best.get(exit_node, float("inf")):
                        best[exit_node] = new
                        heapq.heappush(heap, (new, exit_node))
    return best.get(end, float("inf"))


@st.composite
def swarms(draw: st.DrawFn) -> list[HostInfo]:
    count = draw(st.integers(1, 6))
    out = []
    for i in range(count):
        a = draw(st.integers(0, 9))
        b = draw(st.integers(a + 1, 10))
        out.append(
            host(
                f"h{i}",
                a,
                b,
                throughput=draw(st.sampled_from([5.0, 20.0, 100.0, 1000.0])),
                ping_s=draw(st.sampled_from([0.0, 0.01, 0.05, 0.3])),
            )
        )
    return out


@settings(max_examples=150, deadline=None)
@given(swarms(), st.integers(0, 9), st.integers(1, 10))
def test_route_is_as_fast_as_the_best_chain_over_all_boundaries(
    hosts: list[HostInfo], start: int, length: int
) -> None:
    end = min(start + length, 10)
    reference_s = _brute_force_latency_s(hosts, start, end)
    if reference_s == float("inf"):
        with pytest.raises(NoRouteError):
            plan_latency_route(hosts, start, end)
        return
    route = plan_latency_route(hosts, start, end)
    assert_valid_chain(route, start, end)
    assert route_latency_s(route) == pytest.approx(reference_s)


@settings(max_examples=150, deadline=None)
@given(
    swarms(),
    st.integers(0, 9),
    st.integers(1, 10),
    st.dictionaries(st.sampled_from([f"h{i}" for i in range(6)]), st.integers(0, 500)),
    st.integers(1, 64),
)
def test_throughput_route_is_the_cheapest_chain_over_all_boundaries(
    hosts: list[HostInfo], start: int, length: int, load: dict[str, int], tokens: int
) -> None:
    end = min(start + length, 10)

    def cost_s(h: HostInfo, n: int) -> float:
        return (h.ping_s or 0.0) + (load.get(h.peer_id, 0) + tokens) * n / h.throughput_tokens_s

    reference_s = _brute_force_cost(hosts, start, end, cost_s)
    if reference_s == float("inf"):
        with pytest.raises(NoRouteError):
            plan_throughput_route(hosts, start, end, load=load, tokens=tokens)
        return
    route = plan_throughput_route(hosts, start, end, load=load, tokens=tokens)
    assert_valid_chain(route, start, end)
    assert sum(cost_s(hop.host, hop.num_blocks) for hop in route) == pytest.approx(reference_s)
