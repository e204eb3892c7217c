"""Inference sessions of a host: ids, the page-backed KV-cache budget, request errors, validation.

Cache follows use. The host's KV cache is one pool of fixed-size pages (`page_tokens`
slots each, per block; page 0 is the null page and never handed out). A session row of
capacity `c` holds `ceil(c / page_tokens)` pages of it, and `capacity` is what those pages
hold; `CacheBudget` keeps the free list of page ids:

1. at open, the first reservation: every row gets the pages for
   `min(max_length, growth_tokens)` slots; `RemoteBusy` if they are not free (or if
   `batch x min(max_length, growth_tokens)` is more than one session may hold);
2. a step that writes past `capacity` first grows it: doubled, rounded up to whole
   `growth_tokens`, at most `max_length` and the per-session cap, then to whole pages.
   Growth that is not free is `RemoteBusy`, and a step needing more than the per-session cap
   (`batch x length`, the tokens it addresses) is `CacheLimitExceeded`; either way no page
   moves and the session is left as it was;
3. a reservation never shrinks while the session is open, and all its pages return to the
   free list at once when the session closes.

Growth copies nothing: a row's page list only gets longer. Pages handed to a session hold
whatever their last owner (or nobody) wrote, so they also go on the session's
`pages_to_clear`, which the compute thread drains (zeroing them) before the session's next
step; a row's pages are appended to its list only after they are queued for clearing, so a
step never sees a page that it has not cleared. The budget reports tokens as pages x
`page_tokens`.

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
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from stamen.models.paged import pages_for
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
    """The pool's pages (1 .. num_pages - 1) shared by all sessions; event loop only.

    `max_session_tokens` caps what one session may address (`batch x length`), so that one
    request never takes the whole pool while others wait.
    """

    def __init__(
        self,
        num_pages: int,
        *,
        page_tokens: int = 16,
        growth_tokens: int = 128,
        max_session_tokens: int | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1 (page 0 is the null page), got {num_pages}")
        for name, value in (("page_tokens", page_tokens), ("growth_tokens", growth_tokens)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.num_pages = num_pages
        self.page_tokens = page_tokens
        self.growth_tokens = growth_tokens
        self.total_tokens = (num_pages - 1) * page_tokens
        self.max_session_tokens = (
            self.total_tokens if max_session_tokens is None else max_session_tokens
        )
        self.retry_after_s = retry_after_s
        self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low ids first

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def free_tokens(self) -> int:
        return len(self._free) * self.page_tokens

    def first_page(self, session: Session) -> None:
        """Give a new session its first reservation (sets `pages` and `capacity`)."""
        B = session.batch_size
        length = min(session.max_length, self.growth_tokens)
        row_pages = pages_for(length, self.page_tokens)
        if length * B > self.max_session_tokens or row_pages * B > len(self._free):
            raise RemoteBusy(
                f"no room for a first page of {row_pages * self.page_tokens * B} cache "
                f"tokens (batch {B} x {row_pages * self.page_tokens}): {self._room()}",
                retry_after_s=self.retry_after_s,
            )
        session.pages = [[] for _ in range(B)]
        self._hand_out(session, row_pages)

    def grow(self, session: Session, needed_length: int) -> None:
        """Make `session.capacity >= needed_length` (<= its max_length), or raise and
        hand out nothing."""
        if needed_length <= session.capacity:
            return
        B = session.batch_size
        if needed_length * B > self.max_session_tokens:
            raise CacheLimitExceeded(
                f"the step needs {needed_length * B} cache tokens (batch {B} x length "
                f"{needed_length}); one session may hold at most {self.max_session_tokens} "
                f"of this host's {self.total_tokens} (max_session_cache_fraction)"
            )
        extra = self._grown_row_pages(session, needed_length) - session.row_pages
        if extra * B > len(self._free):
            raise RemoteBusy(
                f"no room to grow the session's cache by {extra * B * self.page_tokens} "
                f"tokens to {(session.row_pages + extra) * B * self.page_tokens}: "
                f"{self._room()}",
                retry_after_s=self.retry_after_s,
            )
        self._hand_out(session, extra)

    def release(self, session: Session) -> None:
        """Return all of a session's pages to the free list (at close)."""
        for row in session.pages:
            self._free.extend(row)
        # `session.pages` stays as it was: the compute thread may be building a batch's
        # table from it right now (its item fails or is dropped once it sees `closed`).
        session.capacity = 0

    def _grown_row_pages(self, session: Session, needed_length: int) -> int:
        # Doubling keeps the number of growth rounds logarithmic in the length; whole
        # growth pages keep the reservations few sizes. Never less than the step needs,
        # never more than the session may hold or the pool has free.
        doubled = max(needed_length, 2 * session.capacity)
        rounded = -(-doubled // self.growth_tokens) * self.growth_tokens
        allowed = self.max_session_tokens // session.batch_size
        wanted = pages_for(min(rounded, session.max_length, allowed), self.page_tokens)
        affordable = session.row_pages + len(self._free) // session.batch_size
        return max(pages_for(needed_length, self.page_tokens), min(wanted, affordable))

    def _hand_out(self, session: Session, row_pages: int) -> None:
        """`row_pages` more pages for every row; queued for clearing before they are
        visible in the rows (the compute thread reads the rows concurrently)."""
        new_rows = [[self._free.pop() for _ in range(row_pages)] for _ in session.pages]
        for row in new_rows:
            session.pages_to_clear.extend(row)
        for row, new in zip(session.pages, new_rows, strict=True):
            row.extend(new)
        session.capacity = session.row_pages * self.page_tokens

    def _room(self) -> str:
        return (
            f"{self.free_tokens} of {self.total_tokens} free, at most "
            f"{self.max_session_tokens} per session"
        )


@dataclass(eq=False)
class Session:
    """One open session.

    The event loop owns the bookkeeping fields (`closed`, `in_flight`, `last_active_s`,
    `capacity`) and appends to `pages` and `pages_to_clear`; the compute thread owns
    `length`, reads `pages` and drains `pages_to_clear`, so neither needs a lock: a step
    reads `closed` once before it starts, and a step of a closed session never runs.
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
    # Pool page ids of each row, in slot order: row b's slot s lives in page
    # pages[b][s // page_tokens]. Every row holds the same number of pages.
    pages: list[list[int]] = field(default_factory=list)
    # Pages handed out but not yet zeroed by the compute thread (deque: thread-safe ends).
    pages_to_clear: deque[int] = field(default_factory=deque)
    capacity: int = 0  # slots per row the pages hold
    # Compute-thread state: slots [0, length) of every row hold valid entries.
    length: int = 0

    @property
    def row_pages(self) -> int:
        return len(self.pages[0]) if self.pages else 0

    @property
    def reserved_tokens(self) -> int:
        return self.batch_size * self.capacity

    def touch(self) -> None:
        self.last_active_s = time.monotonic()

    def take_pages_to_clear(self) -> list[int]:
        """Pop every page queued for clearing (compute thread)."""
        pages = []
        while self.pages_to_clear:
            pages.append(self.pages_to_clear.popleft())
        return pages


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
