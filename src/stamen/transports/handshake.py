"""The authenticated key exchange that opens every tcp connection, and its record cipher.

1. Each side sends a hello: magic + version, flags (encrypt or not), an ephemeral X25519
   public key. Both sides must agree on the flags: an encrypting peer never talks to a
   plaintext one.
2. Both derive two AES-256-GCM keys (one per direction) with HKDF-SHA256 from the X25519
   secret; the transcript hash of both hellos is the HKDF info and the swarm key (if any)
   is mixed into the salt, so a peer without the same swarm key cannot produce a record
   the other side accepts.
3. Each side sends one sealed auth record: its static ed25519 public key, a signature over
   the transcript hash (binding the key to this very exchange, so nobody can relay it),
   and the limits it will enforce on what it receives. The dialer goes first; the acceptor
   answers only after checking it.

After the handshake, `RecordCipher` seals each packet as `u64 length | AES-GCM(packet)`
with a per-direction counter nonce and the length as associated data, so records can be
neither read, forged, reordered nor replayed. With `encrypt=False` the auth records are
still sealed (identity and swarm key are still proven) but packets then travel in clear.

This module knows nothing about streams or packets; `mux` does.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from stamen.transports.base import Credentials, HandshakeError, IdentityMismatch, Limits

Buffer = bytes | bytearray | memoryview

MAGIC = b"STAMEN\x00\x02"  # protocol name + version 2 (v2: both ends acknowledge a close)
FLAG_ENCRYPT = 0x01
HELLO = struct.Struct("!8sB32s")  # magic, flags, ephemeral X25519 public key
AUTH = struct.Struct("!32s64sIQIQ")  # key, signature, max_frames, max_message_bytes,
# max_streams, window_bytes
RECORD_PREFIX = struct.Struct("!Q")  # sealed length; u64 so absurd values are refused, not cut
TAG_BYTES = 16
NONCE = struct.Struct("!4xQ")  # 96-bit GCM nonce: a 64-bit record counter, zero-padded
BIG_RECORD_BYTES = 64 * 1024  # from here on, reused buffers beat fresh allocations
MAX_AUTH_RECORD_BYTES = AUTH.size + TAG_BYTES
KEY_INFO = b"stamen-tcp-v1 keys"
SIGNATURE_CONTEXT = b"stamen-tcp-v1 auth"


@dataclass(frozen=True)
class PeerParams:
    """What a peer proved and announced in the handshake."""

    public_key: bytes
    limits: Limits
    window_bytes: int


class RecordCipher:
    """AES-256-GCM for one direction of one connection; nonces are a record counter.

    Records of `BIG_RECORD_BYTES` and more are built in reusable buffers: allocating a
    fresh 256 KiB buffer (page-faulted in each time) costs about as much as encrypting it.
    """

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0
        self._plaintext = bytearray()  # where a big record's parts are gathered

    def _next_nonce(self) -> bytes:
        nonce = NONCE.pack(self._counter)
        self._counter += 1
        return nonce

    def seal(self, plaintext: bytes | bytearray | memoryview) -> bytes | memoryview:
        """`u64 length | ciphertext+tag`, ready to write."""
        return self.seal_parts((plaintext,), len(plaintext))

    def seal_parts(
        self, parts: Sequence[Buffer], plaintext_bytes: int, spare: bytearray | None = None
    ) -> bytes | memoryview:
        """One record whose plaintext is the concatenation of `parts`. A big record is
        written into `spare` when it is large enough (the caller owns it and must not
        reuse it while the record is still queued)."""
        prefix = RECORD_PREFIX.pack(plaintext_bytes + TAG_BYTES)
        nonce = self._next_nonce()
        if plaintext_bytes < BIG_RECORD_BYTES:
            plaintext = parts[0] if len(parts) == 1 else b"".join(parts)
            return prefix + self._aead.encrypt(nonce, plaintext, prefix)
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
        record = memoryview(spare)[:record_bytes]
        record[: RECORD_PREFIX.size] = prefix
        self._aead.encrypt_into(nonce, gathered, prefix, record[RECORD_PREFIX.size :])
        return record

    def open(self, prefix: Buffer, sealed: Buffer) -> bytes:
        """The plaintext of one record; raises `InvalidTag` if it was tampered with."""
        return self._aead.decrypt(self._next_nonce(), sealed, prefix)

    def open_into(self, prefix: Buffer, sealed: Buffer, out: memoryview) -> None:
        """Decrypt one record into `out` (exactly its plaintext's size): no allocation, so
        a big record costs its decryption only. Raises `InvalidTag` if tampered with;
        then `out` holds garbage."""
        self._aead.decrypt_into(self._next_nonce(), sealed, prefix, out)


@dataclass
class HandshakeResult:
    remote: PeerParams
    send_cipher: RecordCipher | None  # None in plaintext mode
    recv_cipher: RecordCipher | None


async def read_sealed(
    reader: asyncio.StreamReader, cipher: RecordCipher, max_plaintext_bytes: int
) -> bytes:
    """Read and open one record, refusing a length prefix over the limit before reading."""
    prefix = await reader.readexactly(RECORD_PREFIX.size)
    (sealed_bytes,) = RECORD_PREFIX.unpack(prefix)
    if not TAG_BYTES <= sealed_bytes <= max_plaintext_bytes + TAG_BYTES:
        raise HandshakeError(f"record of {sealed_bytes} bytes refused")
    return cipher.open(prefix, await reader.readexactly(sealed_bytes))


def _raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _derive_keys(shared: bytes, transcript: bytes, swarm_key: bytes | None) -> tuple[bytes, bytes]:
    salt = hashlib.sha256(b"stamen swarm key\x00" + (swarm_key or b"")).digest()
    if swarm_key is None:
        salt = b"\x00" * 32
    okm = HKDF(hashes.SHA256(), length=64, salt=salt, info=KEY_INFO + transcript).derive(shared)
    return okm[:32], okm[32:]  # dialer -> acceptor, acceptor -> dialer


def _auth_payload(
    credentials: Credentials, role: bytes, transcript: bytes, limits: Limits, window_bytes: int
) -> bytes:
    signature = credentials.private_key.sign(SIGNATURE_CONTEXT + role + transcript)
    return AUTH.pack(
        credentials.public_key,
        signature,
        limits.max_frames,
        limits.max_message_bytes,
        limits.max_streams,
        window_bytes,
    )


def _check_auth(payload: bytes, role: bytes, transcript: bytes) -> PeerParams:
    if len(payload) != AUTH.size:
        raise HandshakeError("malformed auth record")
    key, signature, max_frames, max_message_bytes, max_streams, window_bytes = AUTH.unpack(payload)
    try:
        Ed25519PublicKey.from_public_bytes(key).verify(
            signature, SIGNATURE_CONTEXT + role + transcript
        )
    except (InvalidSignature, ValueError) as exc:
        raise HandshakeError("the peer's signature does not match its key") from exc
    if window_bytes == 0 or max_frames == 0:
        raise HandshakeError("the peer announced unusable limits")
    return PeerParams(key, Limits(max_frames, max_message_bytes, max_streams), window_bytes)


async def handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    credentials: Credentials,
    is_dialer: bool,
    encrypt: bool,
    limits: Limits,
    window_bytes: int,
    expected_public_key: bytes | None = None,
) -> HandshakeResult:
    """Run the exchange described in the module docstring. The caller bounds its time.

    Raises `HandshakeError` (garbage, wrong swarm key, mode mismatch, EOF) or
    `IdentityMismatch`."""
    ephemeral = X25519PrivateKey.generate()
    flags = FLAG_ENCRYPT if encrypt else 0
    local_hello = HELLO.pack(MAGIC, flags, _raw_public(ephemeral.public_key()))
    try:
        writer.write(local_hello)
        remote_hello = await reader.readexactly(HELLO.size)
        magic, remote_flags, remote_ephemeral = HELLO.unpack(remote_hello)
        if magic != MAGIC:
            raise HandshakeError("the peer does not speak stamen-tcp v2")
        if remote_flags != flags:
            raise HandshakeError("the peers disagree on encryption")
        try:
            shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(remote_ephemeral))
        except ValueError as exc:  # low-order point
            raise HandshakeError("bad ephemeral key") from exc
        hellos = (local_hello, remote_hello) if is_dialer else (remote_hello, local_hello)
        transcript = hashlib.sha256(b"".join(hellos)).digest()
        forward_key, backward_key = _derive_keys(shared, transcript, credentials.swarm_key)
        send_key, recv_key = (
            (forward_key, backward_key) if is_dialer else (backward_key, forward_key)
        )
        send_cipher, recv_cipher = RecordCipher(send_key), RecordCipher(recv_key)
        local_role, remote_role = (b"D", b"A") if is_dialer else (b"A", b"D")
        local_auth = _auth_payload(credentials, local_role, transcript, limits, window_bytes)
        if is_dialer:
            writer.write(send_cipher.seal(local_auth))
        remote_auth = await read_sealed(reader, recv_cipher, AUTH.size)
        remote = _check_auth(remote_auth, remote_role, transcript)
        if is_dialer and expected_public_key is not None:
            if remote.public_key != expected_public_key:
                raise IdentityMismatch("the peer authenticated with another key")
        if not is_dialer:
            writer.write(send_cipher.seal(local_auth))
        await writer.drain()
    except asyncio.IncompleteReadError as exc:
        raise HandshakeError("the peer hung up during the handshake") from exc
    except InvalidTag as exc:
        raise HandshakeError("the peer's auth record did not decrypt (swarm key?)") from exc
    except OSError as exc:
        raise HandshakeError(f"handshake failed: {exc}") from exc
    if not encrypt:
        return HandshakeResult(remote, None, None)
    return HandshakeResult(remote, send_cipher, recv_cipher)
