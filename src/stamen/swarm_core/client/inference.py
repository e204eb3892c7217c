"""A fault-tolerant inference session over a chain of remote hosts.

`InferenceSession` drives hidden states through blocks `[start, end)`, hop by hop, each
hop an open `HopSession` on one host keeping its part of the KV cache. For every hop it
keeps the inputs it sent (the hidden states entering that hop, by position), so that when
a host fails it can:

1. ban that host's incarnation and close what is left of its session;
2. route that hop's blocks through other hosts, possibly several;
3. open sessions there and replay the hop's input history through them, rebuilding
   their caches (one step from position 0 per new hop);
4. retry the current step from that hop on.

The caller sees exactly the outputs of an undisturbed run. A host that says "busy" (no
cache or queue room) is load, not a failure: it is not banned; the session opens on
another replica instead, or waits with jittered backoff and asks again (a step refused
as busy left the host's session as it was, so the same step is simply retried). Each
`open` or `step` call keeps looking for a route, re-reading the swarm when none is left,
until `failover_timeout_s` has passed since the call began; then `SessionFailedError`
says which blocks could not be served and why, and the session refuses further steps.

Forwarded steps: when every hop's session takes them (`HopSession.forwarding`: the host
advertises it and `ClientSettings.forwarding` allows it), a step goes to the first hop
naming the next one, and at the same time every later hop is told to await its input
from the hop before it (`await_step`); hidden states then travel host to host, and each
host also answers the client with its output, off the critical path, for the histories.
If any hop does not answer in time, fails, or reports that it could not hand its output
on, the outputs that did come back (hops `0..i-1`) are kept and the step goes on from
hop `i` client-driven, with the failover above; abandoned calls are settled by the
sessions themselves, and positions keep every host's cache exact. `stats` counts both.

`step(..., start_position=p)` with `p <= position` rolls back: everything from `p` on is
forgotten (histories are truncated, hosts overwrite their cache from `p`).

Deep prompts (`prompts`, `(end - start, B or 1, P, C)`, fixed for the session's life)
belong to the session: every hop call that covers positions below `P` (the prefill, a
rollback or replay from position 0) carries that hop's slice of them, and calls past `P`
carry nothing, so decode steps cost no more than without prompts.

This module knows nothing about transports or discovery: hosts come from a `SwarmView`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import torch
from torch import Tensor

from stamen.swarm_core.client.remote import (
    Forwarded,
    HopError,
    HopSession,
    HostBusy,
    Incarnation,
    SwarmClientError,
    SwarmView,
)
from stamen.swarm_core.client.routing import BanList, NoRouteError, RouteHop, plan_latency_route

logger = logging.getLogger(__name__)


class InvalidStepError(SwarmClientError, ValueError):
    """The caller's step does not fit the session (shape, batch, position, length)."""


class SessionFailedError(SwarmClientError):
    """Blocks `[start, end)` could not be served within the failover budget.

    `causes` lists the failed attempts, oldest first (the last `MAX_CAUSES` of them).
    """

    def __init__(
        self, start: int, end: int, causes: Sequence[str], attempts: int | None = None
    ) -> None:
        attempts = len(causes) if attempts is None else attempts
        latest = "" if attempts == len(causes) else f" (the last {len(causes)})"
        super().__init__(
            f"blocks [{start}, {end}) could not be served after {attempts} failed "
            f"attempts{latest}: " + "; ".join(causes)
        )
        self.start = start
        self.end = end
        self.causes = list(causes)
        self.attempts = attempts


@dataclass
class _Entry:
    """Hidden states sent into a hop for positions `[start_position, end_position)`."""

    start_position: int
    hidden: Tensor  # (B, T, C)
    padding_mask: Tensor | None  # (B, T) bool, None = all real tokens

    @property
    def end_position(self) -> int:
        return self.start_position + self.hidden.shape[1]


@dataclass
class StepStats:
    """How this session's steps travelled: host to host throughout (`forwarded`), partly
    or wholly client-driven after a forwarded attempt failed (`fallbacks`), or
    client-driven from the start (`client_driven`: forwarding off or unsupported)."""

    forwarded: int = 0
    fallbacks: int = 0
    client_driven: int = 0


@dataclass
class _Hop:
    route: RouteHop
    session: HopSession
    history: list[_Entry] = field(default_factory=list)

    def truncate(self, position: int) -> None:
        """Forget inputs at positions `>= position`."""
        if not self.history or self.history[-1].end_position <= position:
            return  # the usual decode step appends: nothing to forget, no O(steps) scan
        kept = [e for e in self.history if e.start_position < position]
        if kept and kept[-1].end_position > position:
            last = kept[-1]
            T = position - last.start_position
            mask = None if last.padding_mask is None else last.padding_mask[:, :T]
            kept[-1] = _Entry(last.start_position, last.hidden[:, :T], mask)
        self.history = kept


MAX_CAUSES = 16  # failures a SessionFailedError reports (the newest)
# Sessions without a route want a view of the swarm at most this old (one DHT read per
# second, however many sessions are waiting).
VIEW_MAX_AGE_S = 1.0
# The route's hosts need room for the session's first tokens; the cache grows from there.
ROUTE_CACHE_TOKENS = 128


class Failover:
    """The failover budget of one `open` or `step` call (and of one chunk of a bulk
    call, `autograd.RemoteSpans`): attempts go on until `timeout_s` after the call began
    (and at most `max_attempts` failures, if set)."""

    def __init__(
        self, timeout_s: float, max_backoff_s: float, max_attempts: int | None = None
    ) -> None:
        self.deadline_s = time.monotonic() + timeout_s
        self.max_backoff_s = max_backoff_s
        self.max_attempts = max_attempts
        self.causes: list[str] = []
        self.attempts = 0
        self._waits = 0

    def remaining_s(self) -> float:
        return self.deadline_s - time.monotonic()

    def failed(self, start: int, end: int, peer_id: str | None, error: Exception) -> None:
        """Count one failure serving `[start, end)`; raise once the budget is spent."""
        if isinstance(error, NoRouteError):
            start, end = error.uncovered  # name the blocks nobody serves, not the whole range
        who = f"{peer_id}: " if peer_id else ""
        what = (
            "timed out" if isinstance(error, TimeoutError) else f"{type(error).__name__}: {error}"
        )
        self.causes = [*self.causes[-(MAX_CAUSES - 1) :], f"{who}{what}"]
        self.attempts += 1
        logger.info("blocks [%d, %d): %s%s", start, end, who, what)
        out_of_attempts = self.max_attempts is not None and self.attempts > self.max_attempts
        hopeless = isinstance(error, NoRouteError) and error.too_large  # no host takes it
        if out_of_attempts or hopeless or self.remaining_s() <= 0:
            raise SessionFailedError(start, end, self.causes, self.attempts) from error

    async def wait(self, hint_s: float | None = None) -> None:
        """Back off before asking again: doubling from 50 ms up to `max_backoff_s`, with
        jitter (so sessions refused together do not return together), never past the
        deadline. A host's `retry_after_s` hint, when smaller, wins."""
        backoff_s = min(self.max_backoff_s, 0.05 * 2**self._waits) * random.uniform(0.5, 1.0)
        self._waits += 1
        if hint_s is not None:
            backoff_s = min(backoff_s, hint_s)
        delay_s = min(backoff_s, self.remaining_s())
        if delay_s > 0:
            await asyncio.sleep(delay_s)


@dataclass(frozen=True)
class Avoid:
    """What routing skips in one call: banned incarnations and hosts that just said busy."""

    bans: BanList
    busy: set[Incarnation]

    def __contains__(self, incarnation: object) -> bool:
        return incarnation in self.busy or incarnation in self.bans


class InferenceSession:
    """Hidden states through blocks `[start, end)` of the swarm, with failover.

    A `BlockChain` for `stamen.swarm_core.client.generation.decode`. Use as an async context
    manager; steps must not overlap (they are serialized).
    """

    def __init__(
        self,
        swarm_view: SwarmView,
        start: int,
        end: int,
        max_length: int,
        batch_size: int,
        *,
        failover_timeout_s: float = 60.0,
        max_retries: int | None = None,
        step_timeout_s: float = 30.0,
        open_timeout_s: float = 10.0,
        close_timeout_s: float = 5.0,
        retry_delay_s: float = 1.0,
        ban_list: BanList | None = None,
        prompts: Tensor | None = None,
    ) -> None:
        if not 0 <= start < end:
            raise ValueError(f"empty or negative block range [{start}, {end})")
        if max_length < 1 or batch_size < 1 or (max_retries is not None and max_retries < 0):
            raise ValueError("max_length and batch_size must be >= 1, max_retries >= 0")
        _check_prompts(prompts, end - start, batch_size)
        self._view = swarm_view
        self.start, self.end = start, end
        self.max_length, self.batch_size = max_length, batch_size
        self.failover_timeout_s = failover_timeout_s
        self.max_retries = max_retries  # a cap on failures per call besides the deadline
        self.step_timeout_s = step_timeout_s
        self.open_timeout_s = open_timeout_s
        self.close_timeout_s = close_timeout_s
        self.retry_delay_s = retry_delay_s  # the longest backoff between two attempts
        self.ban_list = ban_list if ban_list is not None else BanList()
        # Detached: a session only runs inference, and its prompts must not change under it.
        self._prompts = None if prompts is None else prompts.detach()  # (n, B or 1, P, C)
        self._hops: list[_Hop] = []
        self.stats = StepStats()
        # Pairs of hosts (by peer id) where the first could not reach the second: steps
        # through both go client-driven for the rest of the session.
        self._no_relay: set[tuple[str, str]] = set()
        self._position = 0
        self._hidden_size: int | None = None if prompts is None else prompts.shape[3]
        self._failure: SessionFailedError | None = None
        self._lock = asyncio.Lock()
        # Sessions on failed hosts close in the background, so failover does not wait for
        # a dead host's close to time out; `close` waits for them.
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def position(self) -> int:
        """Tokens processed so far (the next step's default `start_position`)."""
        return self._position

    @property
    def route(self) -> list[RouteHop]:
        """The hops currently carrying the session, in order."""
        return [hop.route for hop in self._hops]

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def open(self) -> None:
        """Route the blocks and open a session on every hop. Raises `SessionFailedError`."""
        if self._hops:
            raise RuntimeError("session already open")
        attempts = self._failover()
        try:
            self._hops = await self._build_chain(self.start, self.end, [], attempts)
        except SessionFailedError:
            await self.close()  # sessions on hosts that failed mid-way are still closing
            raise

    async def close(self) -> None:
        """Close every hop session, concurrently and best effort (each within
        `close_timeout_s`)."""
        hops, self._hops = self._hops, []
        for hop in hops:
            self._close_in_background(hop)
        await asyncio.gather(*self._closing)

    async def step(
        self,
        hidden: Tensor,
        padding_mask: Tensor | None = None,
        *,
        start_position: int | None = None,
    ) -> Tensor:
        """(B, T, C) -> (B, T, C) through every block, at positions from `start_position`
        (default: `position`). `padding_mask` (B, T) bool is False for left padding.
        Raises `InvalidStepError`, `SessionFailedError`."""
        async with self._lock:
            if self._failure is not None:
                failure = self._failure
                raise SessionFailedError(
                    failure.start, failure.end, failure.causes, failure.attempts
                )
            if not self._hops:
                raise RuntimeError("session is not open")
            position = self._check_step(hidden, padding_mask, start_position)
            for hop in self._hops:
                hop.truncate(position)
            attempts = self._failover()
            try:
                out = await self._run_step(hidden, position, padding_mask, attempts)
            except SessionFailedError as e:
                self._failure = e
                raise
            self._position = position + hidden.shape[1]
            return out

    def _check_step(
        self, hidden: Tensor, padding_mask: Tensor | None, start_position: int | None
    ) -> int:
        position = self._position if start_position is None else start_position
        if hidden.dim() != 3 or hidden.shape[0] != self.batch_size or hidden.shape[1] < 1:
            raise InvalidStepError(
                f"hidden must be (B={self.batch_size}, T>=1, C), got {tuple(hidden.shape)}"
            )
        B, T, C = hidden.shape
        if self._hidden_size is None:
            self._hidden_size = C
        elif C != self._hidden_size:
            raise InvalidStepError(
                f"hidden size {C} differs from the prompts' or earlier steps' {self._hidden_size}"
            )
        if not 0 <= position <= self._position:
            raise InvalidStepError(
                f"start_position {position} outside [0, {self._position}] (tokens so far)"
            )
        if position + T > self.max_length:
            raise InvalidStepError(
                f"step ends at {position + T}, beyond max_length {self.max_length}"
            )
        if padding_mask is not None and (
            tuple(padding_mask.shape) != (B, T) or padding_mask.dtype != torch.bool
        ):
            raise InvalidStepError(
                f"padding_mask must be ({B}, {T}) bool, got {tuple(padding_mask.shape)} "
                f"{padding_mask.dtype}"
            )
        return position

    def _failover(self) -> Failover:
        return Failover(self.failover_timeout_s, self.retry_delay_s, self.max_retries)

    async def _run_step(
        self, hidden: Tensor, position: int, padding_mask: Tensor | None, attempts: Failover
    ) -> Tensor:
        hops = self._hops
        if not self._forwardable():
            self.stats.client_driven += 1
            return await self._run_chain(hidden, position, padding_mask, attempts)
        done, relay_failed = await self._run_forwarded(hidden, position, padding_mask)
        if len(done) == len(hops):
            self.stats.forwarded += 1
            return done[-1]
        self.stats.fallbacks += 1
        if relay_failed:  # hop len(done)-1 is up, but its output did not reach the next one
            self._no_relay.add((hops[len(done) - 1].route.peer_id, hops[len(done)].route.peer_id))
        start = hidden if not done else done[-1]
        return await self._run_chain(start, position, padding_mask, attempts, index=len(done))

    def _forwardable(self) -> bool:
        """Whether every hop can hand its output to the next one: both forward, they
        share a transport, and that pair has not failed to relay in this session."""
        hops = self._hops
        return len(hops) >= 2 and all(
            a.session.can_relay_to(b.session)
            and (a.route.peer_id, b.route.peer_id) not in self._no_relay
            for a, b in zip(hops, hops[1:])
        )

    async def _run_forwarded(
        self, hidden: Tensor, position: int, padding_mask: Tensor | None
    ) -> tuple[list[Tensor], bool]:
        """One step host to host; the outputs of the leading hops that answered (each
        recorded in its hop's history), all of them when nothing went wrong, and whether
        the last of them failed to hand its output on (`_collect`)."""
        hops = self._hops
        T = hidden.shape[1]
        # nonces[i] names hop i's relay to hop i + 1 for this step only (`NextHop.nonce`).
        nonces = [secrets.randbits(63) for _ in hops]
        calls: list[asyncio.Task[Forwarded]] = [
            # Later hops first, so that their authorizations tend to be there first.
            asyncio.create_task(
                hop.session.await_step(
                    position,
                    T,
                    hops[i - 1].route.peer_id,
                    padding_mask,
                    self._prompts_for(hop.route, position),
                    hops[i + 1].session if i + 1 < len(hops) else None,
                    nonce=nonces[i - 1],
                    next_nonce=nonces[i],
                )
            )
            for i, hop in enumerate(hops)
            if i > 0
        ]
        first = hops[0]
        calls.insert(
            0,
            asyncio.create_task(
                first.session.step_and_forward(
                    hidden,
                    position,
                    padding_mask,
                    self._prompts_for(first.route, position),
                    hops[1].session,
                    next_nonce=nonces[0],
                )
            ),
        )
        try:
            answered, relay_failed = await self._collect(calls, hidden.shape)
        finally:
            for call in calls:
                call.cancel()  # a hop whose input never comes: its session settles it
            await asyncio.gather(*calls, return_exceptions=True)
        outputs = [out.to(hidden.dtype) for out in answered]
        for hop, hop_input in zip(hops[: len(outputs)], [hidden, *outputs]):
            hop.history.append(_Entry(position, hop_input, padding_mask))  # hop i's input
        return outputs, relay_failed

    async def _collect(
        self, calls: Sequence[asyncio.Task[Forwarded]], shape: torch.Size
    ) -> tuple[list[Tensor], bool]:
        """The outputs of the leading hops that answered in time, up to the first hop
        that failed, answered badly, or could not hand its output on; and whether the
        relay after the last of them failed (that hop said so in `forward_error`, or said
        nothing of it but the next hop failed or timed out without its input: a relay
        lost or refused on the way). Hop i has until `(i + 1) * step_timeout_s` after the
        start, as much as the client-driven chain gives the first i + 1 hops."""
        outputs: list[Tensor] = []
        loop = asyncio.get_running_loop()
        start_s = loop.time()
        for i, (call, hop) in enumerate(zip(calls, self._hops)):
            try:
                async with asyncio.timeout_at(start_s + (i + 1) * self.step_timeout_s):
                    out, forward_error = await asyncio.shield(call)
            except (HopError, TimeoutError) as error:
                logger.info("forwarded step: hop %d (%s): %r", i, hop.route.peer_id, error)
                return outputs, i > 0  # hop i - 1 relayed without complaint
            if out.shape != shape:
                logger.info("forwarded step: %s replied %s", hop.route.peer_id, out.shape)
                return outputs, False
            outputs.append(out)
            if forward_error is not None:
                logger.info("forwarded step: %s: %s", hop.route.peer_id, forward_error)
                return outputs, True
        return outputs, False

    async def _run_chain(
        self,
        hidden: Tensor,
        position: int,
        padding_mask: Tensor | None,
        attempts: Failover,
        *,
        index: int = 0,
    ) -> Tensor:
        """The step client-driven, hop by hop from hop `index` (whose input `hidden` is)."""
        while index < len(self._hops):
            hop = self._hops[index]
            try:
                out = await self._run_hop(hop, hidden, position, padding_mask)
            except HostBusy as e:
                # The host refused this step without running it (no room to grow its
                # cache, or its queue is full): its session is intact, ask again.
                attempts.failed(hop.route.start, hop.route.end, hop.route.peer_id, e)
                await attempts.wait(e.retry_after_s)
                continue
            except (HopError, TimeoutError) as e:
                self._ban(hop.route, e)
                self._close_in_background(hop)
                attempts.failed(hop.route.start, hop.route.end, hop.route.peer_id, e)
                replacement = await self._build_chain(
                    hop.route.start, hop.route.end, hop.history, attempts
                )
                self._hops[index : index + 1] = replacement
                logger.info(
                    "blocks [%d, %d) moved from %s to %s",
                    hop.route.start,
                    hop.route.end,
                    hop.route.peer_id,
                    [h.route.peer_id for h in replacement],
                )
                continue
            hop.history.append(_Entry(position, hidden, padding_mask))
            hidden = out
            index += 1
        return hidden

    async def _build_chain(
        self, start: int, end: int, history: Sequence[_Entry], attempts: Failover
    ) -> list[_Hop]:
        """Route `[start, end)`, open a session per hop and replay `history` through them.

        Hops that opened and replayed are kept when a later one fails; only the rest of
        the range is routed again.
        """
        replay = _concat(history)
        hops: list[_Hop] = []
        try:
            await self._extend_chain(hops, start, end, replay, attempts)
        except BaseException:
            for hop in hops:
                self._close_in_background(hop)
            raise
        return hops

    async def _extend_chain(
        self, hops: list[_Hop], start: int, end: int, replay: _Entry | None, attempts: Failover
    ) -> None:
        node = start
        avoid = Avoid(self.ban_list, set())
        while node < end:
            try:
                route = plan_latency_route(
                    self._view.hosts(),
                    node,
                    end,
                    banned=avoid,
                    min_cache_tokens=min(self.max_length, ROUTE_CACHE_TOKENS) * self.batch_size,
                    session_cache_tokens=self.max_length * self.batch_size,
                )
            except NoRouteError as e:
                attempts.failed(node, end, None, e)
                # Nothing to route around: re-read the swarm (a host may have restarted or
                # joined), give busy hosts another chance, and back off.
                avoid.busy.clear()
                await self._view.refresh(max_age_s=VIEW_MAX_AGE_S)
                await attempts.wait()
                continue
            for route_hop in route:
                try:
                    hop, replay = await self._open_hop(route_hop, replay)
                except HostBusy as e:
                    avoid.busy.add(route_hop.host.incarnation)  # try another replica first
                    attempts.failed(route_hop.start, route_hop.end, route_hop.peer_id, e)
                    break
                except (HopError, TimeoutError) as e:
                    self._ban(route_hop, e)
                    attempts.failed(route_hop.start, route_hop.end, route_hop.peer_id, e)
                    break
                hops.append(hop)
                node = route_hop.end

    async def _open_hop(
        self, route_hop: RouteHop, replay: _Entry | None
    ) -> tuple[_Hop, _Entry | None]:
        """Open `route_hop` and replay into it; returns the hop and the next hop's replay."""
        client = await asyncio.wait_for(
            self._view.connect(route_hop.peer_id), timeout=self.open_timeout_s
        )
        session = await asyncio.wait_for(
            client.open_session(route_hop.start, route_hop.end, self.max_length, self.batch_size),
            timeout=self.open_timeout_s,
        )
        hop = _Hop(route_hop, session)
        if replay is None:
            return hop, None
        try:
            out = await self._run_hop(hop, replay.hidden, 0, replay.padding_mask)
        except BaseException:
            self._close_in_background(hop)
            raise
        hop.history.append(replay)
        return hop, _Entry(0, out, replay.padding_mask)

    async def _run_hop(
        self, hop: _Hop, hidden: Tensor, position: int, padding_mask: Tensor | None
    ) -> Tensor:
        # asyncio.timeout, not wait_for: wait_for wraps the step in a task of its own,
        # which costs a task and extra event-loop turns on every hop of every step.
        prompts = self._prompts_for(hop.route, position)
        async with asyncio.timeout(self.step_timeout_s):
            out = await hop.session.step(hidden, position, padding_mask, prompts)
        if not isinstance(out, Tensor) or out.shape != hidden.shape or out.dtype != hidden.dtype:
            got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out)
            raise HopError(
                f"bad reply: expected {tuple(hidden.shape)} {hidden.dtype}, got {got}",
                peer_id=hop.route.peer_id,
            )
        return out

    def _prompts_for(self, route_hop: RouteHop, position: int) -> Tensor | None:
        """The hop's deep prompts (n_hop, B or 1, P, C) for a step from `position`, or None
        when the step lies past them (hosts would ignore them)."""
        if self._prompts is None or position >= self._prompts.shape[2]:
            return None
        return self._prompts[route_hop.start - self.start : route_hop.end - self.start]

    def _ban(self, route_hop: RouteHop, error: Exception) -> None:
        remaining_s = self.ban_list.ban(route_hop.host.incarnation)
        logger.debug("%s avoided for %.1f s after %r", route_hop.peer_id, remaining_s, error)

    def _close_in_background(self, hop: _Hop) -> None:
        task = asyncio.create_task(self._close_quietly(hop))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_quietly(self, hop: _Hop) -> None:
        try:
            await asyncio.wait_for(hop.session.close(), timeout=self.close_timeout_s)
        except (HopError, TimeoutError) as e:
            logger.debug("closing the session on %s failed: %r", hop.route.peer_id, e)
        except Exception:
            # Closing is best effort: a broken host must not stop the others from closing.
            logger.warning("closing the session on %s failed", hop.route.peer_id, exc_info=True)


def _check_prompts(prompts: Tensor | None, num_blocks: int, batch_size: int) -> None:
    if prompts is None:
        return
    batch_ok = prompts.dim() == 4 and prompts.shape[1] in (1, batch_size)
    if not batch_ok or prompts.shape[0] != num_blocks:
        raise ValueError(
            f"prompts must be ({num_blocks}, {batch_size} or 1, P, C) for the session's "
            f"blocks, got {tuple(prompts.shape)}"
        )
    if prompts.shape[2] < 1 or prompts.shape[3] < 1:
        raise ValueError(f"prompts must have P >= 1 and C >= 1, got {tuple(prompts.shape)}")


def _concat(history: Sequence[_Entry]) -> _Entry | None:
    """The whole history as one step from position 0 (entries are contiguous from 0)."""
    if not history:
        return None
    hidden = torch.cat([e.hidden for e in history], dim=1)  # (B, S, C)
    if all(e.padding_mask is None for e in history):
        return _Entry(0, hidden, None)
    masks = [
        e.padding_mask
        if e.padding_mask is not None
        else torch.ones(e.hidden.shape[:2], dtype=torch.bool, device=e.hidden.device)
        for e in history
    ]
    return _Entry(0, hidden, torch.cat(masks, dim=1))  # (B, S)
