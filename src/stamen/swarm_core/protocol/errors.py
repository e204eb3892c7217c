"""One error tree for the swarm protocol, from the wire's error codes to the exceptions
raised on both sides.

A host's runtime raises a `RemoteError` subclass to refuse a request; the RPC server
sends its `code` (and `retry_after_s`) as an `ErrorReply`; the RPC client raises the
same class again from that reply (`remote_error`). Nothing maps one tree onto another on
the way. The client side turns these into its per-host `HopError`s (`client.remote`)
by class, because what a client does about a refusal depends on which host sent it.

    RpcError
    ├── RemoteError             code            the peer refused or failed the request
    │   ├── RemoteBusy          busy            no capacity now (cache, streams, queue):
    │   │                                       retry later or on another host
    │   ├── RemoteBadRequest    bad_request     invalid request; resending it cannot help
    │   │   └── RemoteTooLarge  too_large       over a size limit the host announces
    │   ├── RemoteNotFound      not_found       unknown session, method, model or span
    │   ├── RemoteTimeout       timeout         the host gave up waiting (compute queue,
    │   │                                       the next message of a stream)
    │   └── RemoteInternal      internal        the host failed; it keeps serving
    ├── RpcTimeout              (local)         our own deadline passed (a `TimeoutError`)
    │   └── SlotTimeout                         ... waiting for a free call slot: nothing sent
    └── ProtocolError           (local)         the peer sent something invalid or unexpected

`version_mismatch` is the handshake's refusal, raised as `wire.VersionMismatch`.
This module knows nothing about what hosts compute or how bytes travel.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    BUSY = "busy"
    BAD_REQUEST = "bad_request"
    TOO_LARGE = "too_large"
    NOT_FOUND = "not_found"
    TIMEOUT = "timeout"
    INTERNAL = "internal"
    VERSION_MISMATCH = "version_mismatch"


class RpcError(Exception):
    """Base of the errors raised by RPC calls."""


class RpcTimeout(RpcError, TimeoutError):
    """Our deadline passed before the peer answered."""


class SlotTimeout(RpcTimeout):
    """Every call slot stayed taken until the deadline; the request was not sent."""


class ProtocolError(RpcError):
    """The peer sent a malformed or unexpected message."""


class RemoteError(RpcError):
    """A refusal or failure that travels as an `ErrorReply` with this class's `code`.
    `retry_after_s` hints when trying again could succeed."""

    code = ErrorCode.INTERNAL

    def __init__(self, message: str = "", *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class RemoteBusy(RemoteError):
    code = ErrorCode.BUSY


class RemoteBadRequest(RemoteError):
    code = ErrorCode.BAD_REQUEST


class RemoteTooLarge(RemoteBadRequest):
    """Over a size limit the host announced (`max_request_tokens`): the client must split
    the request; sending it again fails again."""

    code = ErrorCode.TOO_LARGE


class RemoteNotFound(RemoteError):
    code = ErrorCode.NOT_FOUND


class RemoteTimeout(RemoteError):
    code = ErrorCode.TIMEOUT


class RemoteInternal(RemoteError):
    code = ErrorCode.INTERNAL


_BY_CODE: dict[ErrorCode, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        RemoteBusy,
        RemoteBadRequest,
        RemoteTooLarge,
        RemoteNotFound,
        RemoteTimeout,
        RemoteInternal,
    )
}


def remote_error(code: ErrorCode, message: str, retry_after_s: float | None = None) -> RemoteError:
    """The exception an `ErrorReply` with `code` stands for (`internal` if unknown)."""
    return _BY_CODE.get(code, RemoteInternal)(message, retry_after_s=retry_after_s)
