"""The wire protocol: typed messages plus tensor frames, as lists of byte frames.

A message on the wire is `[header, tensor_0, tensor_1, ...]`:

- `header` is msgpack of `{"message": <tagged struct>, "tensors": [TensorMeta, ...]}`;
  messages are frozen msgspec Structs forming one tagged union (`Message`, tag field
  `type`), so handlers `match` on them;
- each further frame holds one tensor's values, encoded by the codec its `TensorMeta`
  names (`codecs`). Tensors are named, and every message type declares which names it
  carries (`TENSORS`), so a `Step` without `hidden` never reaches a handler.

`decode_message` validates everything before it allocates anything: header size, frame
count, tag, field constraints, dtype allow-list, ndim and dims, element count, the exact
frame length implied by shape, dtype and codec, and total bytes (`WireLimits`). Every
problem raises a `WireError`; nothing from a peer is ever unpickled.

A field exists when a handler implements it. Requests (what a client asks a host) refuse
unknown fields and unknown tensor names (`MalformedMessage`, answered `bad_request`), so a
newer client learns at once that this host does not do what it asks, instead of being
silently ignored; a new field needs a new minor version that clients check first.
Replies and greetings tolerate unknown fields, so newer hosts can add some.

Protocol versions are `(major, minor)`: peers with a different major refuse each other
(`check_compatible`) in the `Hello` handshake that opens every connection (see `rpc`).

Errors:

    WireError                  the peer's bytes are not a valid message
    ├── MalformedMessage       bad msgpack, bad field, frames inconsistent with the header
    ├── UnknownMessageType     a tag this version does not know
    ├── LimitExceeded          a size, count or dimension is over `WireLimits`
    └── VersionMismatch        the peer speaks another major protocol version

This module knows nothing about transports, streams, call semantics or what a host does
with a message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, ClassVar, NamedTuple, NewType, Self

import msgspec
import torch

from stamen.swarm_core.protocol.codecs import (
    DTYPES,
    FLOATING_DTYPES,
    Codec,
    codec_applies,
    decode_tensor,
    dtype_name,
    effective_codec,
    encode_tensor,
    encoded_nbytes,
)
from stamen.swarm_core.protocol.errors import ErrorCode
from stamen.swarm_core.protocol.records import HostState
from stamen.version import __version__

# 1.1: deep prompts in Step / Forward / Backward served, grad_prompts, `too_large` errors.
# 2.0: requests refuse fields nothing implements.
# 2.1: server-to-server forwarding of steps (`FORWARDING`): `Step.next_hop`, `AwaitStep`,
#      `RelayStep` / `RelayAccepted`, `StepResult.forward_error`.
PROTOCOL_VERSION: tuple[int, int] = (2, 1)

# The capability of a host that serves `Step.next_hop`, `AwaitStep` and `RelayStep`.
# Clients send those only to hosts whose `HelloReply` names it.
FORWARDING = "forwarding"

Frame = bytes | bytearray | memoryview
Tensors = Mapping[str, torch.Tensor]

_MAX_NDIM = 8
_TensorName = Annotated[str, msgspec.Meta(pattern=r"^[a-z_][a-z0-9_]{0,31}$")]
_Dim = Annotated[int, msgspec.Meta(ge=0, le=2**40)]
_Name = Annotated[str, msgspec.Meta(max_length=128)]
_Text = Annotated[str, msgspec.Meta(max_length=4096)]
_Names = Annotated[tuple[_Name, ...], msgspec.Meta(max_length=64)]
_BlockIndex = Annotated[int, msgspec.Meta(ge=0, le=1 << 16)]
_Position = Annotated[int, msgspec.Meta(ge=0, le=1 << 24)]
_Seconds = Annotated[float, msgspec.Meta(gt=0, le=86400)]

SessionId = NewType("SessionId", str)
_SessionId = Annotated[SessionId, msgspec.Meta(min_length=1, max_length=64)]
_PeerIdText = Annotated[str, msgspec.Meta(pattern=r"^p[a-z2-7]{32}$")]  # identity.peer_id
_PublicKey = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]  # ed25519
_Address = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
_NumTokens = Annotated[int, msgspec.Meta(ge=1, le=1 << 24)]
# Names one forwarded step: drawn at random by the client for each step, copied by the
# previous host from its `NextHop` into its `RelayStep`, and matched by the next host
# against the client's `AwaitStep`, so a relay of an abandoned step (or from a third
# party, who cannot guess it) is never fed into another step at the same position.
_StepNonce = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]  # int64 (msgspec)


class WireError(Exception):
    """The peer's bytes are not a valid message."""


class MalformedMessage(WireError):
    """Bad msgpack, a bad field, or frames that do not match the header."""


class UnknownMessageType(WireError):
    """The message's tag is not one this protocol version knows."""


class LimitExceeded(WireError):
    """A size, count or dimension is over `WireLimits`."""


class VersionMismatch(WireError):
    """The peer speaks a different major protocol version."""


class WireLimits(msgspec.Struct, frozen=True):
    """Caps checked on every received message before any tensor is allocated."""

    max_header_bytes: int = 256 * 1024
    max_tensors: int = 8
    max_ndim: int = 6
    max_dim: int = 1 << 24
    max_tensor_bytes: int = 1 << 30
    max_message_bytes: int = 1 << 30


# -- messages ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSlot:
    """One named tensor a message type may carry, checked before it is allocated."""

    required: bool = True
    ndim: int | None = None
    floating: bool = False


_HIDDEN = TensorSlot(ndim=3, floating=True)  # (B, T, D)
_PROMPTS = TensorSlot(required=False, ndim=4, floating=True)  # (n_blocks, B, P, D)
_PADDING = TensorSlot(required=False, ndim=2)  # (B, T) bool/uint8: False = left padding


class _Message(msgspec.Struct, frozen=True, tag_field="type"):
    """Base of every message; `TENSORS` names the tensors a message type carries."""

    TENSORS: ClassVar[Mapping[str, TensorSlot]] = {}


class _SpanRequest(_Message, frozen=True):
    """A request for blocks `[block_start, block_end)` of the host's model."""

    block_start: _BlockIndex
    block_end: _BlockIndex

    def __post_init__(self) -> None:
        if self.block_end <= self.block_start:
            raise ValueError(f"empty block range [{self.block_start}, {self.block_end})")


class _PeerInfo(_Message, frozen=True):
    protocol_major: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)]
    protocol_minor: Annotated[int, msgspec.Meta(ge=0, le=1 << 16)]
    software_version: _Name
    public_name: _Name = ""
    capabilities: _Names = ()  # strings, not enums: a newer minor version may add some
    codecs: _Names = ()  # codecs this peer decodes

    @classmethod
    def local(cls, public_name: str = "", capabilities: Iterable[str] = ()) -> Self:
        """Our own greeting: this build's protocol and software version, every codec."""
        major, minor = PROTOCOL_VERSION
        return cls(
            protocol_major=major,
            protocol_minor=minor,
            software_version=__version__,
            public_name=public_name,
            capabilities=tuple(capabilities),
            codecs=tuple(codec.value for codec in Codec),
        )


class Hello(_PeerInfo, frozen=True, tag="hello"):
    """The dialer's greeting, first message of every connection."""


class HelloReply(_PeerInfo, frozen=True, tag="hello_reply"):
    """The listener's answer when it accepts the dialer's version. `max_concurrent_streams`
    is how many calls the listener serves at once on this connection (`RpcServer` stamps
    its limit in); None from a peer that predates the field."""

    max_concurrent_streams: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)] | None = None


class Ping(_Message, frozen=True, tag="ping", forbid_unknown_fields=True):
    nonce: int = 0


class Pong(_Message, frozen=True, tag="pong"):
    nonce: int = 0


class Info(_Message, frozen=True, tag="info", forbid_unknown_fields=True):
    """Ask a host what it serves."""


class InfoReply(_Message, frozen=True, tag="info_reply"):
    model: _Name
    block_start: _BlockIndex
    block_end: _BlockIndex
    state: HostState
    torch_dtype: _Name
    quantization: _Name | None = None
    cache_tokens_left: Annotated[int, msgspec.Meta(ge=0)] = 0
    max_batch_size: Annotated[int, msgspec.Meta(ge=0)] = 0
    throughput_tokens_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    # 2.1: forwarded steps this host took from a previous host / handed to the next one.
    relays_received: Annotated[int, msgspec.Meta(ge=0)] = 0
    relays_sent: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Counters of the host's runtime since it started (`host.runtime.RuntimeInfo`), for
    # operators and benchmarks: steps, decode batches, CUDA graphs captured, and wall
    # seconds in steps and in decode compute. Older clients ignore them.
    steps: Annotated[int, msgspec.Meta(ge=0)] = 0
    decode_batches: Annotated[int, msgspec.Meta(ge=0)] = 0
    graphs_captured: Annotated[int, msgspec.Meta(ge=0)] = 0
    step_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    decode_seconds: Annotated[float, msgspec.Meta(ge=0)] = 0.0


class OpenSession(_SpanRequest, frozen=True, tag="open_session", forbid_unknown_fields=True):
    """Open an inference session (one stream); the host reserves its KV cache."""

    max_length: Annotated[int, msgspec.Meta(ge=1, le=1 << 20)]
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=1 << 12)] = 1
    reply_codec: Codec = Codec.NONE


class SessionOpened(_Message, frozen=True, tag="session_opened"):
    session_id: _SessionId
    max_length: Annotated[int, msgspec.Meta(ge=1)]


class NextHop(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a host sends a step's output on: the next host's identity (its peer id and
    the ed25519 key it must prove on the connection), the session the client opened
    there, and the addresses of its record (the first the sender's transport can dial
    is used). `nonce` names the step (`_StepNonce`): the sender copies it into its
    `RelayStep`."""

    peer_id: _PeerIdText
    public_key: _PublicKey
    session_id: _SessionId
    addresses: Annotated[tuple[_Address, ...], msgspec.Meta(min_length=1, max_length=8)]
    nonce: _StepNonce = 0


class Step(_Message, frozen=True, tag="step", forbid_unknown_fields=True, omit_defaults=True):
    """Hidden states for positions `[start_position, start_position + T)`; a position
    below the session's current length rolls the cache back (replay after failover).

    With `next_hop` (2.1, `FORWARDING` hosts only; omitted from the encoding when None,
    so 2.0 hosts read the same bytes as before), the host first sends its output to that
    host as a `RelayStep`, then answers this request with the same output."""

    TENSORS: ClassVar[Mapping[str, TensorSlot]] = {
        "hidden": _HIDDEN,
        "prompts": _PROMPTS,
        "padding_mask": _PADDING,
    }
    session_id: _SessionId
    start_position: _Position
    next_hop: NextHop | None = None


class AwaitStep(_Message, frozen=True, tag="await_step", forbid_unknown_fields=True):
    """The client's side of a forwarded step (2.1, `FORWARDING`): this session's input
    for `[start_position, start_position + num_tokens)` comes from `previous_peer_id`
    as a `RelayStep`, and from no one else. The host runs it with this message's own
    `prompts` / `padding_mask`, relays its output to `next_hop` if any, and answers with
    a `StepResult`. Any later message on the session's stream ends the wait (answered
    `timeout`) before it is handled."""

    TENSORS: ClassVar[Mapping[str, TensorSlot]] = {
        "prompts": _PROMPTS,
        "padding_mask": _PADDING,
    }
    session_id: _SessionId
    start_position: _Position
    num_tokens: _NumTokens
    previous_peer_id: _PeerIdText
    nonce: _StepNonce  # the `NextHop.nonce` the client gave the previous hop for this step
    next_hop: NextHop | None = None


class StepResult(_Message, frozen=True, tag="step_result"):
    """`forward_error` says why the output could not be handed to the `next_hop` the
    request named (unreachable, refused); None when it was, or when none was named."""

    TENSORS: ClassVar[Mapping[str, TensorSlot]] = {"hidden": _HIDDEN}
    session_id: _SessionId
    position: _Position  # the session's length after this step
    forward_error: _Text | None = None


class RelayStep(_Message, frozen=True, tag="relay_step", forbid_unknown_fields=True):
    """Host to host (2.1, `FORWARDING`): a step's output, sent to the host of the next
    hop as input of its session `session_id` at `start_position`. Accepted only from
    the peer that the client's `AwaitStep` names, for a session open on this host."""

    TENSORS: ClassVar[Mapping[str, TensorSlot]] = {"hidden": _HIDDEN}
    session_id: _SessionId
    start_position: _Position
    nonce: _StepNonce  # copied from the sender's `NextHop`


class RelayAccepted(_Message, frozen=True, tag="relay_accepted"):
    """The `RelayStep` was taken (handed to its waiting step, or held for it)."""


class CloseSession(_Message, frozen=True, tag="close_session", forbid_unknown_fields=True):
    session_id: _SessionId


class SessionClosed(_Message, frozen=True, tag="session_closed"):
    session_id: _SessionId


class Forward(_SpanRequest, frozen=True, tag="forward", forbid_unknown_fields=True):
    """Stateless forward of a batch through the span (fine-tuning, bulk scoring)."""

    TENSORS: ClassVar[Mapping[str, TensorSlot]] = {
        "hidden": _HIDDEN,
        "prompts": _PROMPTS,
        "padding_mask": _PADDING,
    }
    reply_codec: Codec = Codec.NONE


class ForwardResult(_Message, frozen=True, tag="forward_result"):
    TENSORS: ClassVar[Mapping[str, TensorSlot]] = {"hidden": _HIDDEN}


class Backward(_SpanRequest, frozen=True, tag="backward", forbid_unknown_fields=True):
    """Gradients of the span's inputs (and deep prompts) given the output gradient."""

    TENSORS: ClassVar[Mapping[str, TensorSlot]] = {
        "hidden": _HIDDEN,
        "grad_output": _HIDDEN,
        "prompts": _PROMPTS,
        "padding_mask": _PADDING,
    }
    reply_codec: Codec = Codec.NONE


class BackwardResult(_Message, frozen=True, tag="backward_result"):
    TENSORS: ClassVar[Mapping[str, TensorSlot]] = {"grad_hidden": _HIDDEN, "grad_prompts": _PROMPTS}


class ErrorReply(_Message, frozen=True, tag="error"):
    """A typed failure; the client raises the matching `errors.RemoteError` subclass."""

    code: ErrorCode
    message: _Text = ""
    retry_after_s: _Seconds | None = None


Message = (
    Hello
    | HelloReply
    | Ping
    | Pong
    | Info
    | InfoReply
    | OpenSession
    | SessionOpened
    | Step
    | AwaitStep
    | StepResult
    | RelayStep
    | RelayAccepted
    | CloseSession
    | SessionClosed
    | Forward
    | ForwardResult
    | Backward
    | BackwardResult
    | ErrorReply
)
MESSAGE_TYPES: dict[str, type[_Message]] = {
    cls.__struct_config__.tag: cls for cls in Message.__args__
}


# -- frames -----------------------------------------------------------------------------


class TensorMeta(msgspec.Struct, frozen=True):
    """How one tensor frame is to be read: logical dtype, shape, codec, exact length."""

    name: _TensorName
    dtype: str
    shape: Annotated[tuple[_Dim, ...], msgspec.Meta(max_length=_MAX_NDIM)]
    codec: Codec
    nbytes: Annotated[int, msgspec.Meta(ge=0)]


class Decoded(NamedTuple):
    """A received message and its tensors (views of the frames; see `decode_message`)."""

    message: Message
    tensors: dict[str, torch.Tensor]


class _HeaderOut(msgspec.Struct):
    message: Message
    tensors: list[TensorMeta]


class _HeaderIn(msgspec.Struct):
    message: msgspec.Raw
    tensors: Annotated[list[TensorMeta], msgspec.Meta(max_length=64)]


class _Tag(msgspec.Struct):
    type: str


_encoder = msgspec.msgpack.Encoder()
_header_decoder = msgspec.msgpack.Decoder(_HeaderIn)
_tag_decoder = msgspec.msgpack.Decoder(_Tag)
_message_decoders: dict[str, msgspec.msgpack.Decoder[Message]] = {
    tag: msgspec.msgpack.Decoder(cls) for tag, cls in MESSAGE_TYPES.items()
}


def encode_message(
    message: Message,
    tensors: Tensors | None = None,
    *,
    codec: Codec | Mapping[str, Codec] = Codec.NONE,
) -> list[Frame]:
    """Frames for `message` and its named `tensors`.

    `codec` applies to every floating tensor (integer and bool tensors always go raw), or
    per tensor name. Raw frames are views of the tensors' memory: leave the tensors alone
    until the frames are sent. Raises `TypeError`/`ValueError` for a message its own type
    forbids (missing or unknown tensor names, dtypes outside the allow-list).
    """
    tensors = tensors or {}
    _check_names(type(message).TENSORS, tensors.keys(), error=ValueError)
    metas: list[TensorMeta] = []
    frames: list[Frame] = [b""]
    for name, tensor in tensors.items():
        name_of_dtype = dtype_name(tensor.dtype)
        chosen = codec.get(name, Codec.NONE) if isinstance(codec, Mapping) else codec
        if not codec_applies(chosen, name_of_dtype):
            chosen = Codec.NONE
        chosen = effective_codec(chosen, tensor.dtype)
        frame = encode_tensor(tensor, chosen)
        shape = tuple(tensor.shape)
        metas.append(TensorMeta(name, name_of_dtype, shape, chosen, frame.nbytes))
        frames.append(frame)
    frames[0] = _encoder.encode(_HeaderOut(message, metas))
    return frames


def decode_message(
    frames: Sequence[Frame],
    limits: WireLimits | None = None,
    *,
    copy: bool = False,
) -> Decoded:
    """The message and tensors held by `frames`; raises only `WireError`.

    Raw (`none` codec) tensors are zero-copy views of their frames unless `copy=True`
    (small frames are copied anyway; see `codecs.ZERO_COPY_MIN_BYTES`): clone them before
    writing in place.
    """
    limits = limits or WireLimits()
    if not frames:
        raise MalformedMessage("a message needs at least a header frame")
    if len(frames) > limits.max_tensors + 1:
        raise LimitExceeded(f"{len(frames) - 1} tensor frames > max_tensors={limits.max_tensors}")
    header_bytes = memoryview(frames[0]).nbytes
    if header_bytes > limits.max_header_bytes:
        raise LimitExceeded(f"header of {header_bytes} bytes > {limits.max_header_bytes}")
    header = _decode_header(frames[0])
    message = _decode_body(header.message)
    metas = header.tensors
    if len(metas) != len(frames) - 1:
        raise MalformedMessage(f"header lists {len(metas)} tensors, {len(frames) - 1} sent")
    _check_names(type(message).TENSORS, [meta.name for meta in metas], error=MalformedMessage)
    total_bytes = header_bytes
    slots = type(message).TENSORS
    for meta, frame in zip(metas, frames[1:]):
        _check_meta(meta, slots[meta.name], memoryview(frame).nbytes, limits)
        total_bytes += meta.nbytes
    if total_bytes > limits.max_message_bytes:
        raise LimitExceeded(f"message of {total_bytes} bytes > {limits.max_message_bytes}")
    tensors = {
        meta.name: _decode_frame(frame, meta, copy=copy) for meta, frame in zip(metas, frames[1:])
    }
    return Decoded(message, tensors)


def check_compatible(local: Hello | HelloReply, remote: Hello | HelloReply) -> None:
    """Raises `VersionMismatch` unless both peers speak the same major protocol version."""
    if local.protocol_major != remote.protocol_major:
        raise VersionMismatch(
            f"peer {remote.public_name!r} speaks protocol {remote.protocol_major}."
            f"{remote.protocol_minor}, we speak {local.protocol_major}.{local.protocol_minor}"
        )


def _decode_header(frame: Frame) -> _HeaderIn:
    try:
        return _header_decoder.decode(frame)
    # RecursionError: msgspec walks nested arrays recursively; a peer can nest deeply.
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError) as e:
        raise MalformedMessage(f"bad header: {e}") from None


def _decode_body(raw: msgspec.Raw) -> Message:
    try:
        tag = _tag_decoder.decode(raw).type
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError, ValueError) as e:
        raise MalformedMessage(f"message without a type tag: {e}") from None
    decoder = _message_decoders.get(tag)
    if decoder is None:
        raise UnknownMessageType(f"unknown message type {tag[:64]!r}")
    try:
        return decoder.decode(raw)
    # __post_init__ checks (an empty block range, say) raise ValueError.
    except (
        msgspec.DecodeError,
        msgspec.ValidationError,
        ValueError,
        TypeError,
        RecursionError,
    ) as e:
        raise MalformedMessage(f"bad {tag} message: {e}") from None


def _check_names(slots: Mapping[str, TensorSlot], names: object, *, error: type[Exception]) -> None:
    seen: set[str] = set()
    for name in names:  # type: ignore[attr-defined]
        if name not in slots:
            raise error(f"unexpected tensor {name!r}; this message carries {sorted(slots)}")
        if name in seen:
            raise error(f"tensor {name!r} appears twice")
        seen.add(name)
    missing = [name for name, slot in slots.items() if slot.required and name not in seen]
    if missing:
        raise error(f"missing tensors {missing}")


def _check_meta(meta: TensorMeta, slot: TensorSlot, frame_bytes: int, limits: WireLimits) -> None:
    """Everything about one tensor that can be checked without touching its values."""
    if meta.dtype not in DTYPES:
        raise MalformedMessage(f"dtype {meta.dtype[:32]!r} is not allowed")
    if slot.floating and meta.dtype not in FLOATING_DTYPES:
        raise MalformedMessage(f"{meta.name} must be floating, got {meta.dtype}")
    if slot.ndim is not None and len(meta.shape) != slot.ndim:
        raise MalformedMessage(f"{meta.name} must have {slot.ndim} dims, got {len(meta.shape)}")
    if not codec_applies(meta.codec, meta.dtype):
        raise MalformedMessage(f"codec {meta.codec} cannot carry {meta.dtype}")
    if len(meta.shape) > limits.max_ndim:
        raise LimitExceeded(f"{meta.name}: {len(meta.shape)} dims > max_ndim={limits.max_ndim}")
    numel = 1
    for dim in meta.shape:
        if dim > limits.max_dim:
            raise LimitExceeded(f"{meta.name}: dim {dim} > max_dim={limits.max_dim}")
        numel *= dim  # Python ints: no overflow, the byte limit below bounds it
    expected = encoded_nbytes(meta.codec, meta.dtype, numel)
    if expected > limits.max_tensor_bytes:
        raise LimitExceeded(f"{meta.name}: {expected} bytes > {limits.max_tensor_bytes}")
    if meta.nbytes != expected or frame_bytes != expected:
        raise MalformedMessage(
            f"{meta.name}: shape {meta.shape} as {meta.dtype}/{meta.codec} needs {expected}"
            f" bytes; header says {meta.nbytes}, frame has {frame_bytes}"
        )


def _decode_frame(frame: Frame, meta: TensorMeta, *, copy: bool) -> torch.Tensor:
    tensor = decode_tensor(frame, meta.dtype, meta.shape, meta.codec, copy=copy)
    # Any byte other than 0/1 in a bool tensor is undefined behaviour for torch kernels.
    if tensor.dtype is torch.bool and tensor.numel() and tensor.view(torch.uint8).max() > 1:
        raise MalformedMessage(f"{meta.name}: bool tensor holds bytes other than 0 and 1")
    return tensor
