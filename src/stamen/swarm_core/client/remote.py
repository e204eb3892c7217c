"""The client's view of remote hosts: what routing and inference sessions rely on.

Three seams, implemented by the glue over RPC and discovery, and by in-memory fakes in
tests:

- `HostInfo`: what the client believes about one host (span, state, speed, free cache,
  measured ping), built from discovery records plus pings;
- `SpanClient` / `HopSession`: a handle on one host, and one inference session on a range
  of that host's blocks (hidden states in, hidden states out, KV cache kept remotely);
- `SwarmView`: the current snapshot of hosts for one model, and a way to reach them.

Hidden states are `(B, T, C)` tensors. A hop's `step` writes its `T` tokens at positions
`[start_position, start_position + T)` of the remote cache, so passing a smaller
`start_position` than before rolls back (or replays). `padding_mask` is `(B, T)` bool for
the new tokens only, False for left padding; the host remembers it for later steps, as
`stamen.models.chain.run_span` does.

Deep prompts (`prompts`, `(n_blocks, B or 1, P, C)` for the call's blocks `[start, end)`,
a batch of 1 standing for every row) are trainable per-block tensors that the host adds
to the hidden states at absolute positions `[0, P)` before each block. A stateless
`forward` / `backward` starts at position 0 and needs `T >= P`; a session step at
`start_position = s` adds `prompts[:, :, s:min(P, s + T)]` to its first tokens when
`s < P` and ignores them otherwise, so a rollback or replay from position 0 sends them
again and later decode steps need not carry them at all. `backward` recomputes the
blocks from the `hidden` the client kept (hosts keep no activations) and returns the
gradients of `hidden` and of `prompts`; the host's weights never change.

Errors raised by implementations (this module knows nothing about how they are detected):

    SwarmClientError
    ├── HopError           this host failed: connection lost, timeout, remote error,
    │   │                  garbage reply. The caller bans it and routes around.
    │   ├── HostBusy       the host refused for lack of capacity (cache, queue); it is
    │   │                  healthy: load, never a ban. The caller goes to another
    │   │                  replica or waits and retries
    │   └── RequestTooLarge  the request is over a limit the host announced
    │                      (`max_request_tokens`): the caller's fault, never a ban;
    │                      split it, do not resend it
    ├── NoRouteError       (routing) no chain of usable hosts covers the blocks
    └── SessionFailedError (inference) retries exhausted

This module knows nothing about transports or wire formats; of discovery records it
shares only `HostState`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple, Protocol, Self

from torch import Tensor

from stamen.swarm_core.protocol.records import HostState


class SwarmClientError(Exception):
    """Base of the errors the client side of the swarm raises."""


class HopError(SwarmClientError):
    """One host failed to serve a request. `peer_id` names it when known."""

    def __init__(self, message: str, *, peer_id: str | None = None) -> None:
        super().__init__(message)
        self.peer_id = peer_id


class HostBusy(HopError):
    """The host is alive but refused the request for lack of capacity. `retry_after_s` is
    the host's hint of when to try again, when it gave one."""

    def __init__(
        self, message: str, *, peer_id: str | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message, peer_id=peer_id)
        self.retry_after_s = retry_after_s


class RequestTooLarge(HopError):
    """The host refused a request over one of its announced size limits (tokens per
    forward / backward call). Sending it again will fail again; split it instead."""


class Incarnation(NamedTuple):
    """One run of a host: its peer id and when that process started serving. A host that
    restarts (even with the same identity) is a new incarnation, so what the client held
    against the old one (a ban) does not follow it."""

    peer_id: str
    started_at_s: float


@dataclass(frozen=True)
class HostInfo:
    """What the client knows about one host serving blocks `[start, end)`.

    `throughput_tokens_s` is how many tokens per second one of the host's blocks processes
    (its announced compute throughput); `ping_s` is the round trip the client measured, or
    None before any measurement. `free_cache_tokens` is how many more tokens of KV cache
    the host can hold per block, `max_session_cache_tokens` how many one session may hold
    (batch x length). `started_at_s` tells this incarnation of the host from
    earlier ones (see `Incarnation`).
    """

    peer_id: str
    start: int
    end: int
    throughput_tokens_s: float
    free_cache_tokens: int
    state: HostState = HostState.ONLINE
    ping_s: float | None = None
    started_at_s: float = 0.0
    max_session_cache_tokens: int | None = None  # one session's cap; None: not announced
    max_request_tokens: int | None = None  # B x T of one forward / backward; None: not announced

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(
                f"host {self.peer_id}: empty or negative span [{self.start}, {self.end})"
            )
        if not self.throughput_tokens_s > 0:
            raise ValueError(f"host {self.peer_id}: throughput must be positive")

    @property
    def incarnation(self) -> Incarnation:
        return Incarnation(self.peer_id, self.started_at_s)

    @property
    def compute_s_per_block(self) -> float:
        """Seconds one block of this host spends on one token."""
        return 1.0 / self.throughput_tokens_s


class Forwarded(NamedTuple):
    """A hop's answer to a forwarded step: its output, and why it could not hand that
    output to the next hop (None when it did, or when there is none)."""

    hidden: Tensor  # (B, T, C)
    forward_error: str | None


class HopSession(ABC):
    """An inference session on one host's blocks `[start, end)`, with its remote KV cache.

    Sessions whose `forwarding` is True also take forwarded steps: `step_and_forward`
    (the chain's first hop: input from the client, output handed on to the next hop's
    session as well as returned) and `await_step` (a later hop: input from the previous
    hop's host, which the call authorizes). A forwarded call given up by the caller
    (cancelled, timed out) leaves the session usable: its next call first settles the
    abandoned one.
    """

    @property
    def forwarding(self) -> bool:
        """Whether this session's host takes forwarded steps (and the client allows them)."""
        return False

    def can_relay_to(self, next_session: HopSession) -> bool:
        """Whether this session's host can reach `next_session`'s host to hand it a step
        (both forward, and this host's transport speaks one of the other's addresses)."""
        return False

    async def step_and_forward(
        self,
        hidden: Tensor,
        start_position: int,
        padding_mask: Tensor | None,
        prompts: Tensor | None,
        next_session: HopSession | None,
        *,
        next_nonce: int,
    ) -> Forwarded:
        """`step`, the host also relaying its output to `next_session`, naming the relay
        `next_nonce` (drawn at random for each step). Raises `HopError`."""
        raise NotImplementedError("this session does not forward steps")

    async def await_step(
        self,
        start_position: int,
        num_tokens: int,
        previous_peer_id: str,
        padding_mask: Tensor | None,
        prompts: Tensor | None,
        next_session: HopSession | None,
        *,
        nonce: int,
        next_nonce: int,
    ) -> Forwarded:
        """A step whose `num_tokens` inputs from `start_position` come from the host
        `previous_peer_id`, in the relay named `nonce` (the previous hop's `next_nonce`);
        relayed on to `next_session` if given, named `next_nonce`. Raises `HopError`."""
        raise NotImplementedError("this session does not forward steps")

    @abstractmethod
    async def step(
        self,
        hidden: Tensor,
        start_position: int,
        padding_mask: Tensor | None = None,
        prompts: Tensor | None = None,
    ) -> Tensor:
        """(B, T, C) -> (B, T, C) through the session's blocks, writing the cache at
        `[start_position, start_position + T)`, deep `prompts` added where the step covers
        positions below P (module docstring). Raises `HopError`."""

    @abstractmethod
    async def close(self) -> None:
        """Free the remote cache. Best effort: may raise `HopError` if the host is gone."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class SpanClient(ABC):
    """A handle on one host. Connections belong to the `SwarmView` that handed it out."""

    @property
    @abstractmethod
    def peer_id(self) -> str: ...

    @abstractmethod
    async def open_session(
        self, start: int, end: int, max_length: int, batch_size: int
    ) -> HopSession:
        """Reserve cache for `batch_size` sequences of up to `max_length` tokens on blocks
        `[start, end)` (any sub-range of the host's span). Raises `HostBusy` when the host
        has no room, `HopError` on any other failure."""

    @abstractmethod
    async def forward(
        self,
        start: int,
        end: int,
        hidden: Tensor,
        prompts: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Stateless (B, T, C) -> (B, T, C) through blocks `[start, end)`, no cache kept.
        Raises `HopError` (`RequestTooLarge` over the host's `max_request_tokens`)."""

    @abstractmethod
    async def backward(
        self,
        start: int,
        end: int,
        hidden: Tensor,
        grad_output: Tensor,
        prompts: Tensor | None = None,
        padding_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Gradients `(d hidden (B, T, C), d prompts (n_blocks, B or 1, P, C) or None)` of
        blocks `[start, end)` run on `hidden`, given the output's gradient `grad_output`
        (B, T, C). Stateless: the host recomputes the blocks. Raises `HopError`."""


class SwarmView(Protocol):
    """The client's current picture of the swarm serving one model."""

    def hosts(self) -> list[HostInfo]:
        """A snapshot of known hosts; refreshed in the background by the implementation."""
        ...

    async def connect(self, peer_id: str) -> SpanClient:
        """A handle on `peer_id`, reusing a pooled connection when there is one.
        Raises `HopError` when the host cannot be reached."""
        ...

    async def refresh(self, max_age_s: float = 0.0) -> None:
        """Make the snapshot one read at most `max_age_s` before this call (no route was
        found in it). Implementations share one read among concurrent callers."""
        ...
