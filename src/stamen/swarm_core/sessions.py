"""Inference sessions of a host: ids, the KV-cache token budget, request errors, validation.

A session reserves `max_length * batch_size` cache tokens in every block of the span from
one global `CacheBudget` when it opens, and gives them back when it closes. The buffers
themselves are allocated by the runtime's compute thread on the first step.

Errors raised to whoever calls the runtime form one small tree; each carries a `code` that
the RPC glue maps to the wire's remote error codes:

    RuntimeRequestError          code
     +-- Busy                    "busy"         no cache or queue room now; try another host
     +-- BadRequest              "bad_request"  malformed shape, dtype, position or size
     +-- NotFound                "not_found"    unknown, closed or expired session id
     +-- Timeout                 "timeout"      waited too long in the compute queue

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
from stamen.swarm_core.wire import SessionId


def new_session_id() -> SessionId:
    """128 random bits, URL-safe: unguessable, so a session id works as a bearer token."""
    return SessionId(secrets.token_urlsafe(16))


class RuntimeRequestError(Exception):
    """A request the runtime refused; the runtime itself keeps serving."""

    code = "runtime_error"


class Busy(RuntimeRequestError):
    code = "busy"


class BadRequest(RuntimeRequestError):
    code = "bad_request"


class NotFound(RuntimeRequestError):
    code = "not_found"


class Timeout(RuntimeRequestError):
    code = "timeout"


class CacheBudget:
    """Cache tokens (per block) shared by all sessions; touched from the event loop only."""

    def __init__(self, total_tokens: int) -> None:
        if total_tokens < 0:
            raise ValueError(f"total_tokens must be >= 0, got {total_tokens}")
        self.total_tokens = total_tokens
        self.free_tokens = total_tokens

    def try_reserve(self, num_tokens: int) -> bool:
        if num_tokens > self.free_tokens:
            return False
        self.free_tokens -= num_tokens
        return True

    def release(self, num_tokens: int) -> None:
        self.free_tokens = min(self.total_tokens, self.free_tokens + num_tokens)


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
    # Compute-thread state. Slots [0, length) of every block's cache hold valid entries.
    length: int = 0
    cache: SpanCache | None = None

    @property
    def reserved_tokens(self) -> int:
        return self.batch_size * self.max_length

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
        raise BadRequest(f"{name} must be a tensor, got {type(hidden).__name__}")
    if hidden.dim() != 3:
        raise BadRequest(f"{name} must be (B, T, C), got shape {tuple(hidden.shape)}")
    if not hidden.dtype.is_floating_point:
        raise BadRequest(f"{name} must be a floating-point tensor, got {hidden.dtype}")
    B, T, C = hidden.shape
    if C != hidden_size:
        raise BadRequest(f"{name} has hidden size {C}, this span expects {hidden_size}")
    if T < 1 or B < 1:
        raise BadRequest(f"{name} must hold at least one token, got shape {tuple(hidden.shape)}")
    if batch_size is not None and B != batch_size:
        raise BadRequest(f"{name} has batch {B}, the session was opened with {batch_size}")
    return hidden


def check_padding_mask(mask: object, batch_size: int, num_tokens: int) -> Tensor | None:
    """None, or a bool / 0-1 integer tensor of shape (B, T)."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise BadRequest(f"padding_mask must be a tensor, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise BadRequest(f"padding_mask must be bool or integer, got {mask.dtype}")
    if tuple(mask.shape) != (batch_size, num_tokens):
        raise BadRequest(
            f"padding_mask has shape {tuple(mask.shape)}, expected {(batch_size, num_tokens)}"
        )
    return mask.to(torch.bool)


def check_positive_int(value: object, name: str, *, maximum: int) -> int:
    # bool is an int subclass; True as a batch size is a client bug, not a 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadRequest(f"{name} must be an integer, got {type(value).__name__}")
    if not 1 <= value <= maximum:
        raise BadRequest(f"{name} must be in [1, {maximum}], got {value}")
    return value


def check_step_position(session: Session, start_position: object, num_tokens: int) -> int:
    """Static checks (the gap check needs the session's length and runs at compute time)."""
    if not isinstance(start_position, int) or isinstance(start_position, bool):
        raise BadRequest(f"start_position must be an integer, got {type(start_position).__name__}")
    if start_position < 0:
        raise BadRequest(f"start_position must be >= 0, got {start_position}")
    if start_position + num_tokens > session.max_length:
        raise BadRequest(
            f"step writes slots [{start_position}, {start_position + num_tokens}), "
            f"beyond the session's max_length {session.max_length}"
        )
    return start_position
