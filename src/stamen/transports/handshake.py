"""The handshake that opens every tcp connection (Noise XXpsk3), and its record cipher.

On the wire, in order:

1. Both sides send an 8-byte preamble, `b"STAMEN\\x00"` + the version (3). A peer with
   another version is refused with a `HandshakeError` naming both versions; version 2 (the
   bespoke key exchange this replaced) starts with the same 7 bytes, and both of its roles
   receive at least its 41-byte hello from us, so it too sees a magic it does not know and
   refuses us by name.
2. `Noise_XXpsk3_25519_AESGCM_SHA256` (see `stamen.transports.noise`), each message as
   `u16 length | message`. The prologue is `PROLOGUE` (protocol and version). The PSK is
   32 bytes derived from the swarm key, or the public `OPEN_SWARM_PSK` in an open swarm.
   - message 1, dialer -> listener: `e`, empty payload.
   - message 2, listener -> dialer: `e, ee, s, es` and the listener's identity payload.
   - message 3, dialer -> listener: `s, se, psk` and the dialer's identity payload.
   The identity payload (encrypted, like everything after `ee`) is the peer's ed25519
   public key, its signature over `SIGNATURE_CONTEXT + role + Noise static public key`,
   and the `Limits` and flow-control window it enforces on what it receives. Noise proves
   that the sender holds the static key; the signature proves the ed25519 key vouches for
   it. The dialer checks the listener's payload (and `expected_public_key`) before it sends
   message 3, so it never shows its own identity to a peer it has not authenticated.
3. The listener answers message 3 with one record holding `CONFIRM`: psk3 is mixed in only
   with message 3, so without this record a dialer with the wrong swarm key would only
   learn it from a hang-up after `connect` had already returned.

What an outsider learns: anyone who dials sees the listener's ed25519 public key (message
2 comes before the PSK is checked). Listeners publish that key with their address anyway
(it is their peer id); a dialer's identity is sealed under the PSK.

The Noise static key is fresh per connection: the signature then covers a key that lives
for one connection only, so a static secret leaked from memory cannot impersonate the peer
anywhere else, and no key cache is shared between transports. It costs one X25519 key and
one ed25519 signature per connection (80 us here), small beside the whole connect: 2.4 ms
on loopback with both ends in one process (two round trips, four DH, sign and verify).

After the handshake, Split gives one CipherState per direction. Records are our own
framing, as WireGuard and libp2p frame their Noise transport messages themselves:
`u64 length | AEAD(packet)` with the length prefix as associated data, so that a record
can hold a whole multiplexer packet (256 KiB and more, above Noise's 64 KiB message
limit). Nonces follow Noise (a per-direction counter from 0; 2^64-1 is never used), so
records can be neither read, forged, reordered, dropped unnoticed nor replayed. Each
direction `rekey`s after every `REKEY_INTERVAL_RECORDS` records, counted alike by both
ends, so no signal is needed.

AES-256-GCM was chosen as the AEAD because it is the fastest in `cryptography` on the
machines we measured (AES-NI): encrypting a 256 KB record ran at 3.9 GB/s against 2.1 GB/s
for ChaCha20-Poly1305 (x86_64, 2 vCPUs, cryptography 50), and big records are where the
cipher's time goes. The handshake itself is checked against the published vectors of
both (tests/unit/test_noise_vectors.py).

This module knows nothing about streams or packets; `mux` does.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from stamen.transports.base import Credentials, HandshakeError, IdentityMismatch, Limits
from stamen.transports.noise import CipherState, HandshakeState, NoiseError, public_bytes

Buffer = bytes | bytearray | memoryview

VERSION = 3
MAGIC_PREFIX = b"STAMEN\x00"  # shared with version 2, whose hello was MAGIC_PREFIX + b"\x02"
PREAMBLE = MAGIC_PREFIX + bytes([VERSION])
V2_HELLO_BYTES = 41  # version 2's hello: magic, flags, X25519 key
NOISE_PROTOCOL = "Noise_XXpsk3_25519_AESGCM_SHA256"
PROLOGUE = b"stamen-tcp/3 " + NOISE_PROTOCOL.encode()
SIGNATURE_CONTEXT = b"stamen-tcp/3 noise static key\x00"
PSK_CONTEXT = b"stamen-tcp/3 swarm key psk\x00"
OPEN_SWARM_PSK = hashlib.sha256(b"stamen-tcp/3 open swarm psk").digest()  # public on purpose
CONFIRM = b"stamen-tcp/3 confirm"

MESSAGE_LENGTH = struct.Struct("!H")
MAX_HANDSHAKE_MESSAGE_BYTES = 1024  # ours are 48, 216 and 184 bytes
IDENTITY = struct.Struct("!32s64sIQIQ")  # ed25519 key, signature, max_frames,
# max_message_bytes, max_streams, window_bytes
ROLE_DIALER, ROLE_LISTENER = b"D", b"L"

RECORD_PREFIX = struct.Struct("!Q")  # sealed length; u64 so absurd values are refused, not cut
TAG_BYTES = 16
BIG_RECORD_BYTES = 64 * 1024  # from here on, reused buffers beat fresh allocations
# 2^20 records of at most ~256 KiB are 2^34 AES blocks per key, TLS 1.3's bound for
# AES-GCM (RFC 8446 5.5: 2^24.5 records of 2^10 blocks). Tests lower it (read at setup).
REKEY_INTERVAL_RECORDS = 2**20


@dataclass(frozen=True)
class PeerParams:
    """What a peer proved and announced in the handshake."""

    public_key: bytes
    limits: Limits
    window_bytes: int


class RecordCipher:
    """One direction of one connection: a Noise CipherState sealing length-prefixed
    records, rekeyed every `rekey_interval_records` records.

    Records of `BIG_RECORD_BYTES` and more are built in reusable buffers: allocating a
    fresh 256 KiB buffer (page-faulted in each time) costs about as much as encrypting it.
    """

    def __init__(
        self, cipher_state: CipherState, rekey_interval_records: int | None = None
    ) -> None:
        if not cipher_state.has_key():
            raise ValueError("a record cipher needs a keyed CipherState")
        self._state = cipher_state
        self._rekey_interval = rekey_interval_records or REKEY_INTERVAL_RECORDS
        self._records_left = self._rekey_interval
        self._plaintext = bytearray()  # where a big record's parts are gathered
        # Bound once: they run per record (rekeying replaces the state's AEAD, not these).
        self._encrypt = cipher_state.encrypt_with_ad
        self._decrypt_into = cipher_state.decrypt_with_ad_into

    def _count_record(self) -> None:
        self._records_left -= 1
        if self._records_left == 0:
            self._rekey()

    def _rekey(self) -> None:
        self._state.rekey()
        self._records_left = self._rekey_interval

    def seal(self, plaintext: Buffer) -> bytes | memoryview:
        """`u64 length | ciphertext+tag`, ready to write."""
        return self.seal_parts((plaintext,), len(plaintext))

    def seal_parts(
        self, parts: Sequence[Buffer], plaintext_bytes: int, spare: bytearray | None = None
    ) -> bytes | memoryview:
        """One record whose plaintext is the concatenation of `parts`. A big record is
        written into `spare` when it is large enough (the caller owns it and must not
        reuse it while the record is still queued)."""
        prefix = RECORD_PREFIX.pack(plaintext_bytes + TAG_BYTES)
        if plaintext_bytes < BIG_RECORD_BYTES:
            plaintext = parts[0] if len(parts) == 1 else b"".join(parts)
            record = prefix + self._encrypt(prefix, plaintext)
            self._records_left -= 1  # _count_record, inlined on the per-message path
            if self._records_left == 0:
                self._rekey()
            return record
        if len(self._plaintext) < plaintext_bytes:
            self._plaintext = bytearray(plaintext_bytes)
        gathered = memoryview(self._plaintext)[:plaintext_bytes]
        position = 0
        for part in parts:
            gathered[position : position + len(part)] = part
            position += len(part)
        record_bytes = RECORD_PREFIX.size + plaintext_bytes + TAG_BYTES
        if spare is None or len(spare) < record_bytes:
            spare = bytearray(record_bytes)
        big_record = memoryview(spare)[:record_bytes]
        big_record[: RECORD_PREFIX.size] = prefix
        self._state.encrypt_with_ad_into(prefix, gathered, big_record[RECORD_PREFIX.size :])
        self._count_record()
        return big_record

    def open(self, prefix: Buffer, sealed: Buffer) -> bytes:
        """The plaintext of one record; raises `InvalidTag` if it was tampered with."""
        plaintext = self._state.decrypt_with_ad(prefix, sealed)
        self._count_record()
        return plaintext

    def open_into(self, prefix: Buffer, sealed: Buffer, out: memoryview) -> None:
        """Decrypt one record into `out` (exactly its plaintext's size): no allocation, so
        a big record costs its decryption only. Raises `InvalidTag` if tampered with;
        then `out` holds garbage."""
        self._decrypt_into(prefix, sealed, out)
        self._records_left -= 1  # _count_record, inlined on the per-message path
        if self._records_left == 0:
            self._rekey()


@dataclass
class HandshakeResult:
    remote: PeerParams
    send_cipher: RecordCipher
    recv_cipher: RecordCipher


def swarm_psk(swarm_key: bytes | None) -> bytes:
    """The 32-byte Noise PSK for a swarm key (`OPEN_SWARM_PSK` without one)."""
    if swarm_key is None:
        return OPEN_SWARM_PSK
    return hashlib.sha256(PSK_CONTEXT + swarm_key).digest()


async def read_sealed(
    reader: asyncio.StreamReader, cipher: RecordCipher, max_plaintext_bytes: int
) -> bytes:
    """Read and open one record, refusing a length prefix over the limit before reading."""
    prefix = await reader.readexactly(RECORD_PREFIX.size)
    (sealed_bytes,) = RECORD_PREFIX.unpack(prefix)
    if not TAG_BYTES <= sealed_bytes <= max_plaintext_bytes + TAG_BYTES:
        raise HandshakeError(f"record of {sealed_bytes} bytes refused")
    return cipher.open(prefix, await reader.readexactly(sealed_bytes))


def _framed(message: bytes) -> bytes:
    return MESSAGE_LENGTH.pack(len(message)) + message


async def _read_message(reader: asyncio.StreamReader) -> bytes:
    (length,) = MESSAGE_LENGTH.unpack(await reader.readexactly(MESSAGE_LENGTH.size))
    if length > MAX_HANDSHAKE_MESSAGE_BYTES:
        raise HandshakeError(f"handshake message of {length} bytes refused")
    return await reader.readexactly(length)


async def _read_preamble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    preamble = await reader.readexactly(len(PREAMBLE))
    if preamble == PREAMBLE:
        return
    if preamble.startswith(MAGIC_PREFIX):
        # A version 2 dialer waits for a whole 41-byte hello before it checks the magic:
        # send that much, so that it too refuses by name instead of seeing a hang-up.
        writer.write(PREAMBLE.ljust(V2_HELLO_BYTES, b"\x00"))
        raise HandshakeError(
            f"the peer speaks stamen-tcp version {preamble[-1]}; this is version {VERSION}"
        )
    raise HandshakeError("the peer does not speak stamen-tcp")


def _identity_payload(
    credentials: Credentials, role: bytes, static_public: bytes, limits: Limits, window_bytes: int
) -> bytes:
    signature = credentials.private_key.sign(SIGNATURE_CONTEXT + role + static_public)
    return IDENTITY.pack(
        credentials.public_key,
        signature,
        limits.max_frames,
        limits.max_message_bytes,
        limits.max_streams,
        window_bytes,
    )


def _check_identity(payload: bytes, role: bytes, static_public: bytes | None) -> PeerParams:
    if len(payload) != IDENTITY.size or static_public is None:
        raise HandshakeError("malformed identity payload")
    key, signature, max_frames, max_message_bytes, max_streams, window_bytes = IDENTITY.unpack(
        payload
    )
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(
            signature, SIGNATURE_CONTEXT + role + static_public
        )
    except (InvalidSignature, ValueError) as exc:
        raise HandshakeError("the peer's signature does not cover its Noise static key") from exc
    if window_bytes == 0 or max_frames == 0:
        raise HandshakeError("the peer announced unusable limits")
    return PeerParams(key, Limits(max_frames, max_message_bytes, max_streams), window_bytes)


@dataclass(frozen=True)
class _Local:
    credentials: Credentials
    limits: Limits
    window_bytes: int


async def _dial(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    local: _Local,
    expected_public_key: bytes | None,
) -> HandshakeResult:
    static = X25519PrivateKey.generate()
    state = HandshakeState(
        NOISE_PROTOCOL,
        initiator=True,
        prologue=PROLOGUE,
        static_key=static,
        psks=[swarm_psk(local.credentials.swarm_key)],
    )
    writer.write(PREAMBLE + _framed(state.write_message(b"")))
    await _read_preamble(reader, writer)
    remote = _check_identity(
        state.read_message(await _read_message(reader)), ROLE_LISTENER, state.rs
    )
    if expected_public_key is not None and remote.public_key != expected_public_key:
        raise IdentityMismatch("the peer authenticated with another key")
    payload = _identity_payload(
        local.credentials, ROLE_DIALER, public_bytes(static), local.limits, local.window_bytes
    )
    writer.write(_framed(state.write_message(payload)))
    send_state, recv_state = state.split()
    result = HandshakeResult(remote, RecordCipher(send_state), RecordCipher(recv_state))
    try:
        confirm = await read_sealed(reader, result.recv_cipher, len(CONFIRM))
    except asyncio.IncompleteReadError as exc:
        raise HandshakeError("the peer hung up after message 3 (wrong swarm key?)") from exc
    if confirm != CONFIRM:
        raise HandshakeError("the peer did not confirm the handshake")
    return result


async def _accept(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, local: _Local
) -> HandshakeResult:
    static = X25519PrivateKey.generate()
    state = HandshakeState(
        NOISE_PROTOCOL,
        initiator=False,
        prologue=PROLOGUE,
        static_key=static,
        psks=[swarm_psk(local.credentials.swarm_key)],
    )
    await _read_preamble(reader, writer)
    if state.read_message(await _read_message(reader)):
        raise HandshakeError("unexpected payload in message 1")
    payload = _identity_payload(
        local.credentials, ROLE_LISTENER, public_bytes(static), local.limits, local.window_bytes
    )
    writer.write(PREAMBLE + _framed(state.write_message(payload)))
    try:
        dialer_payload = state.read_message(await _read_message(reader))
    except InvalidTag as exc:
        raise HandshakeError(
            "message 3 did not decrypt: another swarm key, or replayed or altered bytes"
        ) from exc
    remote = _check_identity(dialer_payload, ROLE_DIALER, state.rs)
    send_state, recv_state = state.split()
    result = HandshakeResult(remote, RecordCipher(send_state), RecordCipher(recv_state))
    writer.write(result.send_cipher.seal(CONFIRM))
    return result


async def handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    credentials: Credentials,
    is_dialer: bool,
    limits: Limits,
    window_bytes: int,
    expected_public_key: bytes | None = None,
) -> HandshakeResult:
    """Run the exchange described in the module docstring. The caller bounds its time.

    Raises `HandshakeError` (garbage, truncation, wrong swarm key, wrong version, EOF) or
    `IdentityMismatch`."""
    local = _Local(credentials, limits, window_bytes)
    try:
        if is_dialer:
            result = await _dial(reader, writer, local, expected_public_key)
        else:
            result = await _accept(reader, writer, local)
        await writer.drain()
    except asyncio.IncompleteReadError as exc:
        raise HandshakeError("the peer hung up during the handshake") from exc
    except InvalidTag as exc:
        raise HandshakeError("a handshake message did not decrypt (tampered with?)") from exc
    except NoiseError as exc:
        raise HandshakeError(f"malformed handshake: {exc}") from exc
    except OSError as exc:
        raise HandshakeError(f"handshake failed: {exc}") from exc
    return result
