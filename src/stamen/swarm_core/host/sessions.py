"""Inference sessions of a host: ids, the KV-cache token budget, request errors, validation.

Cache follows use. A session holds `capacity * batch_size` cache tokens in every block of
the span, taken from one global `CacheBudget`:

1. at open, one page: `capacity = min(max_length, page_tokens)`; `RemoteBusy` if even that is
   not free (or one page is more than one session may hold);
2. a step that writes past `capacity` first grows it: doubled, rounded up to whole pages,
   at most `max_length` and the per-session cap. Growth that is not free is `RemoteBusy` and
   growth past the cap is `CacheLimitExceeded`; either way nothing is reserved and the
   session is left as it was;
3. a reservation never shrinks while the session is open, and all of it returns to the
   budget at once when the session closes.

The budget only counts tokens; the runtime's compute thread allocates (and grows) the
buffers to match.

Refusals are `protocol.errors`' `RemoteError`s, raised here and sent by the RPC server
as they are: `RemoteBusy` (no cache or queue room now), `RemoteBadRequest` (malformed
shape, dtype, position or size; `CacheLimitExceeded` for a session outgrowing its share of
the budget), `RemoteTooLarge` (more tokens in one forward / backward than the host
announces), `RemoteNotFound` (unknown, closed or expired session id), `RemoteTimeout`
(waited too long in the compute queue).

Validation here looks only at metadata (dim counts, dtypes, sizes): nothing is allocated
for a request that fails it. This module knows nothing about networking or model code.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from stamen.models.chain import SpanCache
from stamen.swarm_core.protocol.errors import (
    RemoteBadRequest,
    RemoteBusy,
)
from stamen.swarm_core.protocol.wire import SessionId


def new_session_id() -> SessionId:
    """128 random bits, URL-safe: unguessable, so a session id works as a bearer token."""
    return SessionId(secrets.token_urlsafe(16))


class CacheLimitExceeded(RemoteBadRequest):
    """A session needs more cache than one session may hold on this host."""


class CacheBudget:
    """Cache tokens (per block) shared by all sessions; touched from the event loop only.

    `max_session_tokens` caps what one session may hold (`capacity * batch_size`), so
    that one request never takes the whole budget while others wait.
    """

    def __init__(
        self,
        total_tokens: int,
        *,
        page_tokens: int = 128,
        max_session_tokens: int | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        if total_tokens < 0:
            raise ValueError(f"total_tokens must be >= 0, got {total_tokens}")
        if page_tokens < 1:
            raise ValueError(f"page_tokens must be >= 1, got {page_tokens}")
        self.total_tokens = total_tokens
        self.free_tokens = total_tokens
        self.page_tokens = page_tokens
        self.max_session_tokens = total_tokens if max_session_tokens is None else max_session_tokens
        self.retry_after_s = retry_after_s

    def first_page(self, max_length: int, batch_size: int) -> int:
        """Reserve a new session's first page; returns its capacity (slots per sequence)."""
        capacity = min(max_length, self.page_tokens)
        num_tokens = capacity * batch_size
        if num_tokens > min(self.free_tokens, self.max_session_tokens):
            raise RemoteBusy(
                f"no room for a first page of {num_tokens} cache tokens "
                f"(batch {batch_size} x {capacity}): {self._room()}",
                retry_after_s=self.retry_after_s,
            )
        self.free_tokens -= num_tokens
        return capacity

    def grow(self, session: Session, needed_length: int) -> None:
        """Make `session.capacity >= needed_length` (<= its max_length), or raise and
        reserve nothing."""
        if needed_length <= session.capacity:
            return
        B = session.batch_size
        if needed_length * B > self.max_session_tokens:
            raise CacheLimitExceeded(
                f"the step needs {needed_length * B} cache tokens (batch {B} x length "
                f"{needed_length}); one session may hold at most {self.max_session_tokens} "
                f"of this host's {self.total_tokens} (max_session_cache_fraction)"
            )
        capacity = self._grown_capacity(session, needed_length)
        extra_tokens = (capacity - session.capacity) * B
        if extra_tokens > self.free_tokens:
            raise RemoteBusy(
                f"no room to grow the session's cache by {extra_tokens} tokens to "
                f"{capacity * B}: {self._room()}",
                retry_after_s=self.retry_after_s,
            )
        self.free_tokens -= extra_tokens
        session.capacity = capacity

    def _grown_capacity(self, session: Session, needed_length: int) -> int:
        # Doubling keeps the number of grow-and-copy rounds logarithmic in the length;
        # whole pages keep the allocations few sizes. Never less than the step needs,
        # never more than the session may hold or the budget has free.
        doubled = max(needed_length, 2 * session.capacity)
        paged = -(-doubled // self.page_tokens) * self.page_tokens
        affordable = session.capacity + self.free_tokens // session.batch_size
        allowed = self.max_session_tokens // session.batch_size
        return max(needed_length, min(paged, session.max_length, allowed, affordable))

    def release(self, num_tokens: int) -> None:
        self.free_tokens = min(self.total_tokens, self.free_tokens + num_tokens)

    def _room(self) -> str:
        return (
            f"{self.free_tokens} of {self.total_tokens} free, at most "
            f"{self.max_session_tokens} per session"
        )


@dataclass(eq=False)
class Session:
    """One open session.

    The event loop owns the bookkeeping fields (`closed`, `in_flight`, `last_active_s`);
    the compute thread owns the cache state (`length`, `cache`), so
    neither needs a lock: a step reads `closed` once before it starts.
    """

    session_id: SessionId
    batch_size: int
    max_length: int
    block_range: tuple[int, int]  # absolute block indices [start, end) this session runs
    peer_label: str | None = None
    opened_s: float = field(default_factory=time.monotonic)
    last_active_s: float = field(default_factory=time.monotonic)
    in_flight: int = 0
    closed: bool = False
    tokens_processed: int = 0
    capacity: int = 0  # slots per sequence reserved in the budget (event loop's)
    # Compute-thread state. Slots [0, length) of every block's cache hold valid entries;
    # the buffers hold at most `capacity` slots, allocated as steps need them.
    length: int = 0
    cache: SpanCache | None = None

    @property
    def reserved_tokens(self) -> int:
        return self.batch_size * self.capacity

    def touch(self) -> None:
        self.last_active_s = time.monotonic()


def check_hidden(
    hidden: object,
    *,
    hidden_size: int,
    batch_size: int | None = None,
    name: str = "hidden",
) -> Tensor:
    """A floating `(B, T, C)` tensor with T >= 1, C = `hidden_size`, and B as required."""
    if not isinstance(hidden, Tensor):
        raise RemoteBadRequest(f"{name} must be a tensor, got {type(hidden).__name__}")
    if hidden.dim() != 3:
        raise RemoteBadRequest(f"{name} must be (B, T, C), got shape {tuple(hidden.shape)}")
    if not hidden.dtype.is_floating_point:
        raise RemoteBadRequest(f"{name} must be a floating-point tensor, got {hidden.dtype}")
    B, T, C = hidden.shape
    if C != hidden_size:
        raise RemoteBadRequest(f"{name} has hidden size {C}, this span expects {hidden_size}")
    if T < 1 or B < 1:
        raise RemoteBadRequest(
            f"{name} must hold at least one token, got shape {tuple(hidden.shape)}"
        )
    if batch_size is not None and B != batch_size:
        raise RemoteBadRequest(f"{name} has batch {B}, the session was opened with {batch_size}")
    return hidden


def check_padding_mask(mask: object, batch_size: int, num_tokens: int) -> Tensor | None:
    """None, or a bool / 0-1 integer tensor of shape (B, T)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise RemoteBadRequest(f"padding_mask must be a tensor, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise RemoteBadRequest(f"padding_mask must be bool or integer, got {mask.dtype}")
    if tuple(mask.shape) != (batch_size, num_tokens):
        raise RemoteBadRequest(
            f"padding_mask has shape {tuple(mask.shape)}, expected {(batch_size, num_tokens)}"
        )
    return mask.to(torch.bool)


def check_positive_int(value: object, name: str, *, maximum: int) -> int:
    # bool is an int subclass; True as a batch size is a client bug, not a 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise RemoteBadRequest(f"{name} must be an integer, got {type(value).__name__}")
    if not 1 <= value <= maximum:
        raise RemoteBadRequest(f"{name} must be in [1, {maximum}], got {value}")
    return value


def check_step_position(session: Session, start_position: object, num_tokens: int) -> int:
    """Static checks (the gap check needs the session's length: `check_no_gap`)."""
    if not isinstance(start_position, int) or isinstance(start_position, bool):
        raise RemoteBadRequest(
            f"start_position must be an integer, got {type(start_position).__name__}"
        )
    if start_position < 0:
        raise RemoteBadRequest(f"start_position must be >= 0, got {start_position}")
    if start_position + num_tokens > session.max_length:
        raise RemoteBadRequest(
            f"step writes slots [{start_position}, {start_position + num_tokens}), "
            f"beyond the session's max_length {session.max_length}"
        )
    return start_position


def check_no_gap(session: Session, start_position: int) -> None:
    """A step may roll back or replay, never start past the tokens the session holds."""
    if start_position > session.length:
        raise RemoteBadRequest(
            f"start_position {start_position} would leave a gap: the session holds "
            f"{session.length} tokens"
        )


def check_prompts(
    prompts: object,
    *,
    num_blocks: int,
    batch_size: int,
    hidden_size: int,
    max_tokens: int,
    num_tokens: int | None = None,
) -> Tensor | None:
    """None, or floating deep prompts `(num_blocks, B or 1, P, C)` with
    `1 <= P <= max_tokens`, and `P <= num_tokens` when given (a stateless call starts at
    position 0, so every prompt position must fall on one of its tokens)."""
    if prompts is None:
        return None
    if not isinstance(prompts, Tensor):
        raise RemoteBadRequest(f"prompts must be a tensor, got {type(prompts).__name__}")
    if prompts.dim() != 4:
        raise RemoteBadRequest(
            f"prompts must be (n_blocks, B, P, C), got shape {tuple(prompts.shape)}"
        )
    if not prompts.dtype.is_floating_point:
        raise RemoteBadRequest(f"prompts must be a floating-point tensor, got {prompts.dtype}")
    n, B, P, C = prompts.shape
    if n != num_blocks:
        raise RemoteBadRequest(f"prompts are for {n} blocks, the request runs {num_blocks}")
    if B not in (1, batch_size):
        raise RemoteBadRequest(f"prompts have batch {B}, expected 1 or {batch_size}")
    if C != hidden_size:
        raise RemoteBadRequest(f"prompts have hidden size {C}, this span expects {hidden_size}")
    if not 1 <= P <= max_tokens:
        raise RemoteBadRequest(f"prompts must hold 1 to {max_tokens} positions, got {P}")
    if num_tokens is not None and P > num_tokens:
        raise RemoteBadRequest(
            f"prompts cover {P} positions but the request has only {num_tokens} tokens"
        )
    return prompts
