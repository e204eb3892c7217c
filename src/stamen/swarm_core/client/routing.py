"""Client-side routing: which hosts carry blocks `[start, end)`, and which hosts to avoid.

- `plan_latency_route` picks the chain with the least expected latency for inference:
  each hop costs its ping (or `DEFAULT_PING_S` when unmeasured) plus the host's compute
  time per block times the blocks it takes. A host may be entered at any block inside its
  span and left at any block up to its end, so this is a shortest path over block
  boundaries.
- `plan_throughput_route` routes one chunk of bulk (stateless) forward/backward work:
  the same shortest path, but a hop costs its ping plus the time the host needs for the
  tokens already queued on it (`load`, which the caller keeps) and this chunk's, so
  chunks routed one after another spread over replicas like data parallelism.
- `plan_spread_route` spreads bulk work at random: at each block it picks among the
  covering hosts, weighted by throughput.
- `BanList` remembers failed host incarnations, with ban durations that double on
  repeated failures.

Hosts that are not online, banned (`banned` holds `Incarnation`s), (for inference)
without room for the session's cache, or (for bulk work) announcing a request cap below
one row of the call are skipped; when what is left does not cover the blocks,
`NoRouteError` names the first uncovered ones. This module knows nothing about
connections, sessions or discovery.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import random
import time
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass

from stamen.swarm_core.client.remote import HostInfo, Incarnation, SwarmClientError
from stamen.swarm_core.protocol.records import HostState

logger = logging.getLogger(__name__)

# Assumed round trip to a host the client has not pinged yet: pessimistic enough that a
# measured nearby host wins, small enough that an unmeasured fast host is still tried.
DEFAULT_PING_S = 0.1


@dataclass(frozen=True)
class RouteHop:
    """Blocks `[start, end)` served by `host` (a sub-range of the host's span)."""

    host: HostInfo
    start: int
    end: int

    @property
    def peer_id(self) -> str:
        return self.host.peer_id

    @property
    def num_blocks(self) -> int:
        return self.end - self.start


class NoRouteError(SwarmClientError):
    """No chain of usable hosts covers the requested blocks.

    `uncovered` is the first gap `[a, b)`; `skipped` maps peer ids of hosts overlapping it
    to why they were not usable (banned, offline, no free cache...). `too_large` is True
    when every host there was skipped only because of an announced cap (the session
    could outgrow the per-session cache cap, one row of a bulk call is over the request
    cap): waiting will not help.
    """

    def __init__(
        self, uncovered: tuple[int, int], skipped: dict[str, str], *, too_large: bool = False
    ) -> None:
        a, b = uncovered
        blocks = f"block {a}" if b - a == 1 else f"blocks [{a}, {b})"
        reasons = ", ".join(f"{peer} ({why})" for peer, why in sorted(skipped.items()))
        super().__init__(
            f"no usable host serves {blocks}" + (f"; skipped: {reasons}" if reasons else "")
        )
        self.uncovered = uncovered
        self.skipped = skipped
        self.too_large = too_large


def plan_latency_route(
    hosts: Iterable[HostInfo],
    start: int,
    end: int,
    *,
    banned: Container[Incarnation] = (),
    min_cache_tokens: int = 0,
    session_cache_tokens: int = 0,
    default_ping_s: float = DEFAULT_PING_S,
) -> list[RouteHop]:
    """The chain of hops covering `[start, end)` with the least expected latency.

    `min_cache_tokens` is what the session reserves when it opens (its first page); hosts
    with less free cache are skipped. `session_cache_tokens` is the most it may grow to
    (`max_length * batch_size`); hosts whose announced per-session cap is smaller are
    skipped too, so the limit is known before the session runs into it. Among equally
    fast chains the one with fewer hops wins. Raises `NoRouteError`.
    """

    def latency_s(host: HostInfo, num_blocks: int) -> float:
        ping_s = default_ping_s if host.ping_s is None else host.ping_s
        return ping_s + host.compute_s_per_block * num_blocks

    where = _Filter(banned, min_cache_tokens, session_cache_tokens)
    return _cheapest_chain(hosts, start, end, where, latency_s)


def plan_throughput_route(
    hosts: Iterable[HostInfo],
    start: int,
    end: int,
    *,
    banned: Container[Incarnation] = (),
    load: Mapping[str, float] | None = None,
    tokens: int = 1,
    min_request_tokens: int = 0,
    default_ping_s: float = DEFAULT_PING_S,
) -> list[RouteHop]:
    """The cheapest chain covering `[start, end)` for a stateless call of `tokens` tokens.

    A hop costs its ping plus the compute time of what the host already has queued
    (`load[peer_id]` tokens, 0 when absent) and these `tokens`:
    `(load + tokens) * blocks / throughput_tokens_s`. A caller that adds each routed
    chunk's tokens to `load` sends the next chunk to a replica with less queued.
    Hosts announcing `max_request_tokens` below `min_request_tokens` (one row of the
    call: it cannot be split further) are skipped. Raises `NoRouteError`.
    """
    queued = load or {}

    def busy_s(host: HostInfo, num_blocks: int) -> float:
        ping_s = default_ping_s if host.ping_s is None else host.ping_s
        work = queued.get(host.peer_id, 0.0) + tokens
        return ping_s + work * num_blocks * host.compute_s_per_block

    where = _Filter(banned, request_tokens=min_request_tokens)
    return _cheapest_chain(hosts, start, end, where, busy_s)


def _cheapest_chain(
    hosts: Iterable[HostInfo],
    start: int,
    end: int,
    where: _Filter,
    hop_cost: Callable[[HostInfo, int], float],
) -> list[RouteHop]:
    """Shortest path over block boundaries, a hop through `host` for `n` blocks costing
    `hop_cost(host, n)` (linear in `n`). Fewer hops win among equal costs."""
    _check_range(start, end)
    hosts = list(hosts)
    usable = where.usable(hosts, start, end)
    # Some optimal chain switches hosts only where a span starts or ends: moving a switch
    # point between two such boundaries changes the cost linearly, so one end is no worse.
    nodes = sorted(
        {start, end} | {max(h.start, start) for h in usable} | {min(h.end, end) for h in usable}
    )
    best: dict[int, tuple[float, int]] = {start: (0.0, 0)}  # node -> (cost, hops)
    came_from: dict[int, RouteHop] = {}
    heap: list[tuple[float, int, int]] = [(0.0, 0, start)]
    while heap:
        cost, hops, node = heapq.heappop(heap)
        if node == end:
            break
        if (cost, hops) > best[node]:
            continue
        for host in usable:
            if not host.start <= node < host.end:
                continue
            last = bisect.bisect_right(nodes, min(host.end, end))
            for exit_node in nodes[bisect.bisect_right(nodes, node) : last]:
                new = (cost + hop_cost(host, exit_node - node), hops + 1)
                if exit_node not in best or new < best[exit_node]:
                    best[exit_node] = new
                    came_from[exit_node] = RouteHop(host, node, exit_node)
                    heapq.heappush(heap, (*new, exit_node))
    if end not in best:
        raise where.no_route(hosts, start, end)
    route: list[RouteHop] = []
    node = end
    while node != start:
        hop = came_from[node]
        route.append(hop)
        node = hop.start
    route.reverse()
    logger.debug("route [%d, %d): %s, cost %.3f s", start, end, route, best[end][0])
    return route


def plan_spread_route(
    hosts: Iterable[HostInfo],
    start: int,
    end: int,
    *,
    banned: Container[Incarnation] = (),
    rng: random.Random | None = None,
) -> list[RouteHop]:
    """A chain for stateless bulk work, spreading load: from each block, a host covering
    it is drawn with probability proportional to its throughput and carries the blocks
    up to its end. Raises `NoRouteError`."""
    _check_range(start, end)
    rng = rng or random.Random()
    where = _Filter(banned)
    hosts = list(hosts)
    usable = where.usable(hosts, start, end)
    route: list[RouteHop] = []
    node = start
    while node < end:
        covering = [h for h in usable if h.start <= node < h.end]
        if not covering:
            raise where.no_route(hosts, start, end)
        (host,) = rng.choices(covering, weights=[h.throughput_tokens_s for h in covering])
        route.append(RouteHop(host, node, min(host.end, end)))
        node = route[-1].end
    return route


def route_latency_s(route: Sequence[RouteHop], default_ping_s: float = DEFAULT_PING_S) -> float:
    """The expected latency of one step along `route`, as `plan_latency_route` counts it."""
    return sum(
        (default_ping_s if hop.host.ping_s is None else hop.host.ping_s)
        + hop.host.compute_s_per_block * hop.num_blocks
        for hop in route
    )


def _check_range(start: int, end: int) -> None:
    if not 0 <= start < end:
        raise ValueError(f"empty or negative block range [{start}, {end})")


@dataclass(frozen=True)
class _Filter:
    """Which hosts a route may use: online, not banned, with room for the session's first
    tokens now, a per-session cap that fits the whole session, and a request cap that
    fits one row of a bulk call."""

    banned: Container[Incarnation] = ()
    min_cache_tokens: int = 0
    session_cache_tokens: int = 0
    request_tokens: int = 0

    def cap_too_small(self, host: HostInfo) -> bool:
        """An announced cap the request can never fit under (waiting will not help)."""
        session_cap, request_cap = host.max_session_cache_tokens, host.max_request_tokens
        return (session_cap is not None and session_cap < self.session_cache_tokens) or (
            request_cap is not None and request_cap < self.request_tokens
        )

    def skip_reason(self, host: HostInfo) -> str | None:
        if host.state is not HostState.ONLINE:
            return str(host.state)
        if host.incarnation in self.banned:
            return "banned"
        if host.free_cache_tokens < self.min_cache_tokens:
            return f"{host.free_cache_tokens} free cache tokens < {self.min_cache_tokens}"
        session_cap, request_cap = host.max_session_cache_tokens, host.max_request_tokens
        if session_cap is not None and session_cap < self.session_cache_tokens:
            return f"sessions limited to {session_cap} cache tokens < {self.session_cache_tokens}"
        if request_cap is not None and request_cap < self.request_tokens:
            return f"requests limited to {request_cap} tokens < {self.request_tokens}"
        return None

    def usable(self, hosts: Iterable[HostInfo], start: int, end: int) -> list[HostInfo]:
        """Hosts overlapping `[start, end)` that may be used, in a stable order."""
        return sorted(
            (h for h in hosts if h.start < end and h.end > start and self.skip_reason(h) is None),
            key=lambda h: h.peer_id,
        )

    def no_route(self, hosts: Iterable[HostInfo], start: int, end: int) -> NoRouteError:
        hosts = list(hosts)
        covered_to = start
        gap = (start, end)
        for host in sorted(self.usable(hosts, start, end), key=lambda h: h.start):
            if host.start > covered_to:
                gap = (covered_to, host.start)
                break
            covered_to = max(covered_to, host.end)
        else:
            gap = (covered_to, end)
        skipped: dict[str, str] = {}
        too_large = True
        for host in hosts:
            reason = self.skip_reason(host)
            if reason is not None and host.start < gap[1] and host.end > gap[0]:
                skipped[host.peer_id] = reason
                too_large = (
                    too_large and host.state is HostState.ONLINE and self.cap_too_small(host)
                )
        return NoRouteError(gap, skipped, too_large=bool(skipped) and too_large)


@dataclass
class _BanRecord:
    strikes: int
    last_failure_s: float
    until_s: float


class BanList:
    """Host incarnations to avoid for a while, because they failed.

    A failure bans an incarnation (`remote.Incarnation`: peer id plus start time) for
    `base_ban_s`, doubling with each further failure up to `max_ban_s`. Failures reported
    while it is still banned add nothing: they are the same outage seen by other sessions
    (one broken connection carries many), not new evidence. An incarnation with no failure
    for `forget_after_s` starts over, and a host that restarts is a new incarnation, so it
    is tried again as soon as it re-announces. "Busy" is load, not failure, and is never
    banned. `clock` returns seconds (monotonic); tests inject their own. Use
    `incarnation in ban_list` to test.
    """

    def __init__(
        self,
        *,
        base_ban_s: float = 15.0,
        max_ban_s: float = 300.0,
        forget_after_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < base_ban_s <= max_ban_s:
            raise ValueError("need 0 < base_ban_s <= max_ban_s")
        self.base_ban_s = base_ban_s
        self.max_ban_s = max_ban_s
        self.forget_after_s = 2 * max_ban_s if forget_after_s is None else forget_after_s
        self._clock = clock
        self._records: dict[Incarnation, _BanRecord] = {}

    def ban(self, incarnation: Incarnation) -> float:
        """Record a failure of `incarnation`; returns the seconds it stays banned."""
        now_s = self._clock()
        self._forget_old(now_s)
        record = self._records.get(incarnation)
        if record is not None and now_s < record.until_s:
            return record.until_s - now_s  # already banned: the same outage
        strikes = 1 if record is None else record.strikes + 1
        duration_s = min(self.base_ban_s * 2 ** (strikes - 1), self.max_ban_s)
        self._records[incarnation] = _BanRecord(strikes, now_s, now_s + duration_s)
        logger.info(
            "banned %s (started %.0f) for %.1f s (failure %d)",
            incarnation.peer_id,
            incarnation.started_at_s,
            duration_s,
            strikes,
        )
        return duration_s

    def __contains__(self, incarnation: object) -> bool:
        record = self._records.get(incarnation) if isinstance(incarnation, Incarnation) else None
        return record is not None and self._clock() < record.until_s

    def remaining_s(self, incarnation: Incarnation) -> float:
        record = self._records.get(incarnation)
        return 0.0 if record is None else max(0.0, record.until_s - self._clock())

    def strikes(self, incarnation: Incarnation) -> int:
        self._forget_old(self._clock())
        record = self._records.get(incarnation)
        return 0 if record is None else record.strikes

    def _forget_old(self, now_s: float) -> None:
        stale = [
            key
            for key, r in self._records.items()
            if now_s >= r.until_s and now_s - r.last_failure_s >= self.forget_after_s
        ]
        for key in stale:
            del self._records[key]
