"""The Noise Protocol Framework (revision 34), sans-IO, on `cryptography`'s primitives.

What this module gives:

- `CipherState`: an AEAD key and a 64-bit nonce counter, with `rekey` as the spec defines
  it (the first 32 bytes of encrypting 32 zero bytes under nonce 2^64-1).
- `SymmetricState`: the chaining key and handshake hash (MixKey, MixHash,
  MixKeyAndHash, EncryptAndHash, DecryptAndHash, Split), HKDF built from HMAC.
- `HandshakeState`: runs an interactive pattern, one message at a time. Patterns known
  here: `XX`, with any `pskN` modifiers; DH `25519`; ciphers `AESGCM`, `ChaChaPoly`;
  hashes `SHA256`, `SHA512`, `BLAKE2s`, `BLAKE2b`. A protocol is chosen by its full name,
  e.g. `Noise_XXpsk3_25519_AESGCM_SHA256`. Tests can inject the ephemeral key.

X25519 and the AEADs are `cryptography`'s; SHA-2, BLAKE2 and HMAC come from `hashlib` and
`hmac` (OpenSSL underneath too), whose one-shot calls suit the handshake's short inputs.

This module moves no bytes and knows nothing about sockets, framing or peer identities: the
caller carries each handshake message to the peer and decides what the payloads mean.
Checked against the published cacophony test vectors (tests/unit/test_noise_vectors.py).

Errors: `NoiseError` for misuse and malformed messages (wrong length, wrong turn,
exhausted nonces, a low-order DH result); a failed AEAD check raises
`cryptography.exceptions.InvalidTag` unchanged, so a caller can tell "garbage" from
"tampered or wrong key".
"""

from __future__ import annotations

import hashlib
import hmac
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

Buffer = bytes | bytearray | memoryview

KEY_BYTES = 32
TAG_BYTES = 16
DH_BYTES = 32  # X25519 public keys and shared secrets
MAX_NONCE = 2**64 - 1  # reserved for rekey; never used for a message
MAX_MESSAGE_BYTES = 65535  # the spec's limit on a handshake message


class NoiseError(Exception):
    """A Noise message was malformed, out of turn, or a state was misused."""


# --- cipher and hash functions -----------------------------------------------------------


@dataclass(frozen=True)
class CipherFunctions:
    """An AEAD as Noise names it: how to build it from a key and how nonces are encoded."""

    name: str
    new: Callable[[bytes], AESGCM | ChaCha20Poly1305]
    nonce: Callable[[int], bytes]


_AESGCM_NONCE = struct.Struct("!4xQ")  # 32 zero bits, then the counter big-endian
_CHACHA_NONCE = struct.Struct("<4xQ")  # 32 zero bits, then the counter little-endian

CIPHERS = {
    "AESGCM": CipherFunctions("AESGCM", AESGCM, _AESGCM_NONCE.pack),
    "ChaChaPoly": CipherFunctions("ChaChaPoly", ChaCha20Poly1305, _CHACHA_NONCE.pack),
}


@dataclass(frozen=True)
class HashFunctions:
    name: str
    hashlib_name: str
    hash_bytes: int  # HASHLEN


HASHES = {
    "SHA256": HashFunctions("SHA256", "sha256", 32),
    "SHA512": HashFunctions("SHA512", "sha512", 64),
    "BLAKE2s": HashFunctions("BLAKE2s", "blake2s", 32),
    "BLAKE2b": HashFunctions("BLAKE2b", "blake2b", 64),
}


def _hash(functions: HashFunctions, data: Buffer) -> bytes:
    return hashlib.new(functions.hashlib_name, data).digest()


def _hmac(functions: HashFunctions, key: bytes, data: bytes) -> bytes:
    return hmac.digest(key, data, functions.hashlib_name)


def hkdf(
    functions: HashFunctions, chaining_key: bytes, input_key_material: bytes, outputs: int
) -> list[bytes]:
    """The spec's HKDF: two or three HASHLEN outputs chained from one HMAC extract."""
    temp_key = _hmac(functions, chaining_key, input_key_material)
    results: list[bytes] = []
    previous = b""
    for index in range(1, outputs + 1):
        previous = _hmac(functions, temp_key, previous + bytes([index]))
        results.append(previous)
    return results


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The raw 32-byte X25519 public key."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(Encoding.Raw, PublicFormat.Raw)


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:  # a low-order point gives an all-zero secret
        raise NoiseError("bad DH public key") from exc


# --- CipherState -------------------------------------------------------------------------


class CipherState:
    """One AEAD key and its nonce counter. Without a key, encryption is the identity
    (as during the first handshake messages)."""

    def __init__(self, cipher: CipherFunctions, key: bytes | None = None) -> None:
        self.cipher = cipher
        self._key: bytes | None = None
        self._aead: AESGCM | ChaCha20Poly1305 | None = None
        self.nonce = 0
        if key is not None:
            self.initialize_key(key)

    def initialize_key(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise NoiseError("a cipher key is 32 bytes")
        self._key = key
        self._aead = self.cipher.new(key)
        self.nonce = 0

    def has_key(self) -> bool:
        return self._aead is not None

    def _take_nonce(self) -> bytes:
        if self.nonce >= MAX_NONCE:
            raise NoiseError("nonces exhausted")
        return self.cipher.nonce(self.nonce)

    def encrypt_with_ad(self, ad: Buffer, plaintext: Buffer) -> bytes:
        if self._aead is None:
            return bytes(plaintext)
        ciphertext = self._aead.encrypt(self._take_nonce(), plaintext, ad)
        self.nonce += 1
        return ciphertext

    def decrypt_with_ad(self, ad: Buffer, ciphertext: Buffer) -> bytes:
        """Raises `InvalidTag` (and keeps the nonce) if the ciphertext does not verify."""
        if self._aead is None:
            return bytes(ciphertext)
        plaintext = self._aead.decrypt(self._take_nonce(), ciphertext, ad)
        self.nonce += 1
        return plaintext

    def encrypt_with_ad_into(self, ad: Buffer, plaintext: Buffer, out: memoryview) -> None:
        """`encrypt_with_ad` written into `out` (len(plaintext) + 16 bytes): no allocation."""
        if self._aead is None:
            raise NoiseError("encrypting in place needs a key")
        self._aead.encrypt_into(self._take_nonce(), plaintext, ad, out)
        self.nonce += 1

    def decrypt_with_ad_into(self, ad: Buffer, ciphertext: Buffer, out: memoryview) -> None:
        """`decrypt_with_ad` written into `out`; on `InvalidTag` `out` holds garbage."""
        if self._aead is None:
            raise NoiseError("decrypting in place needs a key")
        self._aead.decrypt_into(self._take_nonce(), ciphertext, ad, out)
        self.nonce += 1

    def rekey(self) -> None:
        """REKEY(k): the nonce is unchanged, only the key moves on."""
        if self._aead is None:
            raise NoiseError("rekey needs a key")
        new_key = self._aead.encrypt(self.cipher.nonce(MAX_NONCE), bytes(KEY_BYTES), b"")
        nonce = self.nonce
        self.initialize_key(new_key[:KEY_BYTES])
        self.nonce = nonce


# --- SymmetricState ----------------------------------------------------------------------


class SymmetricState:
    """The chaining key `ck`, the handshake hash `h` and the handshake's CipherState."""

    def __init__(self, protocol_name: bytes, cipher: CipherFunctions, hash_: HashFunctions) -> None:
        self.hash = hash_
        if len(protocol_name) <= hash_.hash_bytes:
            self.h = protocol_name.ljust(hash_.hash_bytes, b"\x00")
        else:
            self.h = _hash(hash_, protocol_name)
        self.ck = self.h
        self.cipher_state = CipherState(cipher)

    def mix_key(self, input_key_material: bytes) -> None:
        self.ck, temp_key = hkdf(self.hash, self.ck, input_key_material, 2)
        self.cipher_state.initialize_key(temp_key[:KEY_BYTES])

    def mix_hash(self, data: Buffer) -> None:
        self.h = _hash(self.hash, self.h + bytes(data))

    def mix_key_and_hash(self, input_key_material: bytes) -> None:
        self.ck, temp_h, temp_key = hkdf(self.hash, self.ck, input_key_material, 3)
        self.mix_hash(temp_h)
        self.cipher_state.initialize_key(temp_key[:KEY_BYTES])

    def encrypt_and_hash(self, plaintext: bytes) -> bytes:
        ciphertext = self.cipher_state.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: bytes) -> bytes:
        plaintext = self.cipher_state.decrypt_with_ad(self.h, ciphertext)
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        """(initiator -> responder, responder -> initiator)."""
        temp_k1, temp_k2 = hkdf(self.hash, self.ck, b"", 2)
        cipher = self.cipher_state.cipher
        return CipherState(cipher, temp_k1[:KEY_BYTES]), CipherState(cipher, temp_k2[:KEY_BYTES])


# --- handshake patterns ------------------------------------------------------------------

# Message patterns, initiator first, then alternating. Pre-messages are not needed for XX.
PATTERNS: dict[str, tuple[tuple[str, ...], ...]] = {
    "XX": (("e",), ("e", "ee", "s", "es"), ("s", "se")),
}


_HANDSHAKE_NAME = re.compile(r"([A-Z0-9]+)([a-z0-9+]*)")  # pattern, then modifiers


# DH tokens as (initiator's key, responder's key): "es" is the initiator's ephemeral with
# the responder's static key.
_DH_TOKENS = {"ee": ("e", "e"), "es": ("e", "s"), "se": ("s", "e"), "ss": ("s", "s")}


@dataclass(frozen=True)
class Protocol:
    """A parsed protocol name such as `Noise_XXpsk3_25519_AESGCM_SHA256`."""

    name: str
    messages: tuple[tuple[str, ...], ...]
    psk_count: int
    cipher: CipherFunctions
    hash: HashFunctions

    @classmethod
    def parse(cls, name: str) -> Protocol:
        parts = name.split("_")
        if len(parts) != 5 or parts[0] != "Noise":
            raise NoiseError(f"not a Noise protocol name: {name!r}")
        _, handshake, dh, cipher, hash_ = parts
        matched = _HANDSHAKE_NAME.fullmatch(handshake)
        if matched is None:
            raise NoiseError(f"not a Noise handshake name: {handshake!r}")
        base, modifier_names = matched.groups()
        modifiers = modifier_names.split("+") if modifier_names else []
        if base not in PATTERNS or dh != "25519" or cipher not in CIPHERS or hash_ not in HASHES:
            raise NoiseError(f"unsupported Noise protocol: {name!r}")
        messages = [list(message) for message in PATTERNS[base]]
        for modifier in modifiers:
            _apply_psk(messages, modifier, name)
        return cls(
            name,
            tuple(tuple(message) for message in messages),
            len(modifiers),
            CIPHERS[cipher],
            HASHES[hash_],
        )


def _apply_psk(messages: list[list[str]], modifier: str, name: str) -> None:
    """`psk0` puts a psk token at the start of the first message, `pskN` at the end of
    message N."""
    position = modifier.removeprefix("psk")
    if not modifier.startswith("psk") or not position.isdigit():
        raise NoiseError(f"unsupported modifier in {name!r}")
    index = int(position)
    if index > len(messages):
        raise NoiseError(f"{modifier} is past the last message of {name!r}")
    if index == 0:
        messages[0].insert(0, "psk")
    else:
        messages[index - 1].append("psk")


# --- HandshakeState ----------------------------------------------------------------------


class HandshakeState:
    """One side of one handshake. Call `write_message` / `read_message` in the pattern's
    order; once `is_complete`, `split` gives the transport CipherStates."""

    def __init__(
        self,
        protocol_name: str,
        *,
        initiator: bool,
        prologue: bytes = b"",
        static_key: X25519PrivateKey | None = None,
        psks: Sequence[bytes] = (),
        ephemeral_key: X25519PrivateKey | None = None,
    ) -> None:
        self.protocol = Protocol.parse(protocol_name)
        if len(psks) != self.protocol.psk_count or any(len(psk) != KEY_BYTES for psk in psks):
            raise NoiseError(f"{protocol_name} needs {self.protocol.psk_count} 32-byte PSKs")
        self.initiator = initiator
        self.symmetric = SymmetricState(
            protocol_name.encode(), self.protocol.cipher, self.protocol.hash
        )
        self.symmetric.mix_hash(prologue)
        self.s = static_key
        self.e = ephemeral_key  # None: generated when the pattern sends "e"
        self.rs: bytes | None = None  # the remote static public key, once received
        self.re: bytes | None = None
        self._psks = list(psks)
        # In a psk handshake every `e` token also does MixKey, before and after the PSKs
        # are used up (spec section 9.2).
        self._psk_handshake = self.protocol.psk_count > 0
        self._message_index = 0

    @property
    def is_complete(self) -> bool:
        return self._message_index == len(self.protocol.messages)

    @property
    def handshake_hash(self) -> bytes:
        return self.symmetric.h

    @property
    def my_turn(self) -> bool:
        """Whether the next message is ours to write."""
        return (self._message_index % 2 == 0) == self.initiator

    def _next_tokens(self, writing: bool) -> tuple[str, ...]:
        if self.is_complete:
            raise NoiseError("the handshake is already complete")
        if self.my_turn != writing:
            raise NoiseError("not this side's turn")
        tokens = self.protocol.messages[self._message_index]
        self._message_index += 1
        return tokens

    def write_message(self, payload: bytes = b"") -> bytes:
        message = bytearray()
        for token in self._next_tokens(writing=True):
            message += self._write_token(token)
        message += self.symmetric.encrypt_and_hash(payload)
        if len(message) > MAX_MESSAGE_BYTES:
            raise NoiseError("handshake message over 65535 bytes")
        return bytes(message)

    def read_message(self, message: bytes) -> bytes:
        """The payload; raises `NoiseError` if malformed, `InvalidTag` if it fails its AEAD
        check (a wrong PSK shows here)."""
        if len(message) > MAX_MESSAGE_BYTES:
            raise NoiseError("handshake message over 65535 bytes")
        view = memoryview(message)
        for token in self._next_tokens(writing=False):
            view = self._read_token(token, view)
        return self.symmetric.decrypt_and_hash(bytes(view))

    def _write_token(self, token: str) -> bytes:
        if token == "e":
            if self.e is None:
                self.e = X25519PrivateKey.generate()
            public = public_bytes(self.e)
            self.symmetric.mix_hash(public)
            if self._psk_handshake:
                self.symmetric.mix_key(public)
            return public
        if token == "s":
            if self.s is None:
                raise NoiseError("the pattern sends a static key but none was given")
            return self.symmetric.encrypt_and_hash(public_bytes(self.s))
        self._mix_token(token)
        return b""

    def _read_token(self, token: str, view: memoryview) -> memoryview:
        if token == "e":
            if len(view) < DH_BYTES:
                raise NoiseError("message too short for an ephemeral key")
            self.re = bytes(view[:DH_BYTES])
            self.symmetric.mix_hash(self.re)
            if self._psk_handshake:
                self.symmetric.mix_key(self.re)
            return view[DH_BYTES:]
        if token == "s":
            sealed_bytes = DH_BYTES + (TAG_BYTES if self.symmetric.cipher_state.has_key() else 0)
            if len(view) < sealed_bytes:
                raise NoiseError("message too short for a static key")
            self.rs = self.symmetric.decrypt_and_hash(bytes(view[:sealed_bytes]))
            return view[sealed_bytes:]
        self._mix_token(token)
        return view

    def _mix_token(self, token: str) -> None:
        """The DH and psk tokens, the same whichever side writes the message."""
        if token == "psk":
            self.symmetric.mix_key_and_hash(self._psks.pop(0))
            return
        if token not in _DH_TOKENS:
            raise NoiseError(f"unknown token {token!r}")
        local, remote = _DH_TOKENS[token]
        if not self.initiator:
            local, remote = remote, local
        private = self.e if local == "e" else self.s
        public = self.re if remote == "e" else self.rs
        if private is None or public is None:
            raise NoiseError(f"token {token!r} before its keys")
        self.symmetric.mix_key(_dh(private, public))

    def split(self) -> tuple[CipherState, CipherState]:
        """(send, receive) CipherStates for this side, after the last message."""
        if not self.is_complete:
            raise NoiseError("the handshake is not complete")
        initiator_to_responder, responder_to_initiator = self.symmetric.split()
        if self.initiator:
            return initiator_to_responder, responder_to_initiator
        return responder_to_initiator, initiator_to_responder
