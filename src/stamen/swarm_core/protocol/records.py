"""Host records: what a host announces about itself, signed with its key, and their checks.

A `HostRecord` says which blocks of which model a host serves and how to reach it. The host
signs the record's canonical msgpack encoding (struct fields in declaration order, dict keys
sorted) with its ed25519 key; the pair travels as a `SignedRecord`. `verify_record` is the
only way a received record becomes a `HostRecord`; it accepts it only if

1. the encoded record fits in `MAX_RECORD_BYTES` and decodes against the schema, whose
   bounds (string lengths, address and ping counts, block numbers) msgspec checks while
   decoding, before anything else is allocated;
2. the peer id in it is the one derived from the public key in it, and the signature is
   that key's (so a record signed by another key is refused);
3. its span is non-empty and at most `MAX_SPAN_BLOCKS` long, and its times are sane: not expired, not issued after it expires,
   not valid for longer than `MAX_TTL_S` (so a record cannot linger for days).

Spans are half-open block ranges `[start_block, end_block)`. Times are Unix seconds from the
host's wall clock: hosts whose clocks drift by more than a TTL publish records that others
see as expired. Between two valid records of one peer the newest (`issued_at_s`) wins; see
`newest_per_peer`.

Errors:

    RecordError (ValueError)
    ├── MalformedRecord    does not decode, breaks a bound, or has an impossible span/times
    ├── RecordTooLarge     encoded size above MAX_RECORD_BYTES
    ├── ForgedRecord       signature or peer id does not match the public key
    └── RecordExpired      expired (or valid for longer than MAX_TTL_S)

This module does not know where records are stored or how they travel (see `discovery`).
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

import msgspec

from stamen.swarm_core.protocol.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    PeerId,
    peer_id_from_public_key,
    peer_id_of,
    sign,
    verify_signature,
)
from stamen.transports.base import Credentials

MAX_RECORD_BYTES = 4096
MAX_TTL_S = 3600.0
DEFAULT_TTL_S = 180.0
MAX_BLOCK = 1 << 16  # no model has more blocks
MAX_SPAN_BLOCKS = 1024  # a host serving more is not plausible; bounds work per record
_SIGNATURE_DOMAIN = b"stamen/host-record/v1"

_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_ShortText = Annotated[str, msgspec.Meta(max_length=64)]
_Address = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Block = Annotated[int, msgspec.Meta(ge=0, le=MAX_BLOCK)]
_NonNegative = Annotated[float, msgspec.Meta(ge=0.0)]
_Time = Annotated[float, msgspec.Meta(ge=0.0, le=1e11)]


# A GGUF file's name often ends in its quantization (`.Q4_1`, `-Q4_K_M`, `.F16`): one model
# quantized two ways is still one model.
_QUANTIZATION_SUFFIX = re.compile(r"[.-](I?Q\d\w*|F16|F32|BF16)$", re.IGNORECASE)


def model_name_of(model_ref: str | Path) -> str:
    """The name of a model, where none is given: what hosts announce their records under,
    what clients look them up by and what the API lists. A hub id stays as it is; a local
    directory is named by its base name, a local file by its base name without extension or
    quantization suffix (`SmolLM2-135M-Instruct.Q4_1.gguf` -> `SmolLM2-135M-Instruct`)."""
    path = Path(model_ref).expanduser()
    if not path.exists():
        return str(model_ref)
    if path.is_dir():
        return path.name
    return _QUANTIZATION_SUFFIX.sub("", path.stem)


class HostState(enum.StrEnum):
    JOINING = "joining"  # loading weights; not ready for sessions yet
    ONLINE = "online"
    OFFLINE = "offline"  # announced on shutdown so clients stop routing here at once


class HostRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One host's announcement for one model span. Unknown fields are tolerated so that
    newer hosts can add some without breaking older readers."""

    peer_id: Annotated[PeerId, msgspec.Meta(min_length=1, max_length=64)]
    public_key: Annotated[
        bytes, msgspec.Meta(min_length=PUBLIC_KEY_BYTES, max_length=PUBLIC_KEY_BYTES)
    ]
    model: _Name
    start_block: _Block
    end_block: _Block  # exclusive
    state: HostState
    issued_at_s: _Time
    expires_at_s: _Time
    addresses: Annotated[tuple[_Address, ...], msgspec.Meta(max_length=8)] = ()
    throughput_tokens_per_s: _NonNegative = 0.0  # decode tokens/s through the whole span
    free_cache_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    # What one session may hold (batch x length); 0: not announced (older hosts).
    max_session_cache_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    # Tokens (batch x length) one forward / backward may carry; 0: not announced.
    max_request_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0
    dtype: _ShortText = ""
    quantization: _ShortText = ""  # "" (none), "int8", "nf4"
    next_hop_pings_s: Annotated[dict[_ShortText, _NonNegative], msgspec.Meta(max_length=32)] = {}
    version: _ShortText = ""
    public_name: _ShortText = ""
    # When this host process started serving: with `peer_id` it names one incarnation, so
    # a host restarted with the same identity is told apart from the one that failed.
    started_at_s: _Time = 0.0

    @property
    def span(self) -> tuple[int, int]:
        return (self.start_block, self.end_block)

    def freshness(self) -> tuple[float, float]:
        """Order of two records of one peer: the larger is newer."""
        return (self.issued_at_s, self.expires_at_s)


class SignedRecord(msgspec.Struct, frozen=True):
    """A host record as signed: the exact encoded bytes and the signature over them."""

    record: Annotated[bytes, msgspec.Meta(max_length=MAX_RECORD_BYTES)]
    signature: Annotated[
        bytes, msgspec.Meta(min_length=SIGNATURE_BYTES, max_length=SIGNATURE_BYTES)
    ]


class RecordError(ValueError):
    """A host record was refused."""


class MalformedRecord(RecordError):
    """Does not decode, breaks a schema bound, or has an impossible span or times."""


class RecordTooLarge(RecordError):
    """Encoded size above `MAX_RECORD_BYTES`."""


class ForgedRecord(RecordError):
    """Not signed by the key it names, or its peer id is not that key's."""


class RecordExpired(RecordError):
    """Expired, or claims a validity longer than `MAX_TTL_S`."""


_encoder = msgspec.msgpack.Encoder(order="deterministic")
_record_decoder = msgspec.msgpack.Decoder(HostRecord)
_signed_decoder = msgspec.msgpack.Decoder(SignedRecord)


def new_host_record(
    credentials: Credentials,
    *,
    model: str,
    start_block: int,
    end_block: int,
    state: HostState = HostState.ONLINE,
    addresses: Iterable[str] = (),
    ttl_s: float = DEFAULT_TTL_S,
    now_s: float | None = None,
    started_at_s: float | None = None,
) -> HostRecord:
    """A record for this peer, issued now and valid for `ttl_s`; `started_at_s` defaults
    to now (a new incarnation). Set the optional fields with `msgspec.structs.replace`;
    refresh times with `restamped`."""
    now_s = time.time() if now_s is None else now_s
    return HostRecord(
        started_at_s=now_s if started_at_s is None else started_at_s,
        peer_id=peer_id_of(credentials),
        public_key=credentials.public_key,
        model=model,
        start_block=start_block,
        end_block=end_block,
        state=state,
        addresses=tuple(addresses),
        issued_at_s=now_s,
        expires_at_s=now_s + ttl_s,
    )


def restamped(
    record: HostRecord, ttl_s: float = DEFAULT_TTL_S, now_s: float | None = None
) -> HostRecord:
    """The same record, issued now and valid for `ttl_s` (before each re-announce)."""
    now_s = time.time() if now_s is None else now_s
    return msgspec.structs.replace(record, issued_at_s=now_s, expires_at_s=now_s + ttl_s)


def sign_record(
    record: HostRecord, credentials: Credentials, *, now_s: float | None = None
) -> SignedRecord:
    """Encode and sign `record`. Raises `RecordError` if the record is not one that
    `verify_record` would accept (wrong key, bounds, span, times)."""
    if record.public_key != credentials.public_key:
        raise ForgedRecord("the record names another public key than the signing key's")
    encoded = _encoder.encode(record)
    signed = SignedRecord(
        record=encoded,
        signature=sign(credentials.private_key, encoded, domain=_SIGNATURE_DOMAIN),
    )
    verify_record(signed, now_s=now_s)  # the schema bounds are only checked on decode
    return signed


def encode_signed(signed: SignedRecord) -> bytes:
    return _encoder.encode(signed)


MAX_SIGNED_RECORD_BYTES = MAX_RECORD_BYTES + SIGNATURE_BYTES + 32  # + msgpack framing


def decode_signed(data: bytes) -> SignedRecord:
    if len(data) > MAX_SIGNED_RECORD_BYTES:
        raise RecordTooLarge(f"signed record of {len(data)} bytes > {MAX_SIGNED_RECORD_BYTES}")
    try:
        return _signed_decoder.decode(data)
    except ValueError as exc:  # msgspec's errors, and UnicodeDecodeError for bad UTF-8
        raise MalformedRecord(f"bad signed record: {exc}") from exc


def verify_record(signed: SignedRecord, *, now_s: float | None = None) -> HostRecord:
    """The record inside `signed`, if it passes every check in the module docstring."""
    return check_fresh(open_record(signed), now_s=now_s)


def open_record(signed: SignedRecord) -> HostRecord:
    """The checks of `verify_record` that do not depend on the time (decoding, bounds, key,
    signature, span): their result for given bytes never changes, so callers may cache it.
    Follow with `check_fresh`."""
    if len(signed.record) > MAX_RECORD_BYTES:
        raise RecordTooLarge(f"record of {len(signed.record)} bytes > {MAX_RECORD_BYTES}")
    try:
        record = _record_decoder.decode(signed.record)
    except ValueError as exc:  # msgspec's errors, and UnicodeDecodeError for bad UTF-8
        raise MalformedRecord(f"bad host record: {exc}") from exc
    if record.peer_id != peer_id_from_public_key(record.public_key):
        raise ForgedRecord(f"peer id {record.peer_id} does not belong to the record's key")
    if not verify_signature(
        record.public_key, signed.record, signed.signature, domain=_SIGNATURE_DOMAIN
    ):
        raise ForgedRecord(f"record of {record.peer_id} is not signed by its key")
    if not 0 < record.end_block - record.start_block <= MAX_SPAN_BLOCKS:
        raise MalformedRecord(
            f"span [{record.start_block}, {record.end_block}) is empty or over "
            f"{MAX_SPAN_BLOCKS} blocks"
        )
    if record.issued_at_s > record.expires_at_s:
        raise MalformedRecord("record issued after it expires")
    return record


def check_fresh(record: HostRecord, *, now_s: float | None = None) -> HostRecord:
    """`record` if it is unexpired and valid for at most `MAX_TTL_S` from `now_s`."""
    now_s = time.time() if now_s is None else now_s
    if record.expires_at_s <= now_s:
        raise RecordExpired(
            f"record of {record.peer_id} expired {now_s - record.expires_at_s:.1f} s ago"
        )
    if record.expires_at_s > now_s + MAX_TTL_S:
        raise RecordExpired(f"record of {record.peer_id} claims validity beyond {MAX_TTL_S:.0f} s")
    return record


def newest_per_peer(records: Iterable[HostRecord]) -> dict[PeerId, HostRecord]:
    """Keep each peer's newest record (ties go to the later expiry)."""
    newest: dict[PeerId, HostRecord] = {}
    for record in records:
        current = newest.get(record.peer_id)
        if current is None or record.freshness() > current.freshness():
            newest[record.peer_id] = record
    return newest
