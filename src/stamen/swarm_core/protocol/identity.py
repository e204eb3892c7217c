"""Peer identity: ed25519 keys on disk, peer ids derived from public keys, signatures.

A peer is its ed25519 key. Its `PeerId` is a short text name derived from the public key
(the first 20 bytes of its SHA-256 digest, base32, after a version letter), so anyone holding the
public key can check that a claimed id belongs to it; the 20-byte digest doubles as the
peer's Kademlia node id. `load_or_create_identity` keeps the private key in a PKCS#8 PEM
file that only its owner may read: the file is created with mode 0600 on first start, and a
key readable by group or others, or a corrupt file, is refused with `IdentityError` instead
of being silently replaced.

Signatures are domain-separated (`sign(..., domain=b"...")`) so that a signature made for
one purpose (a host record, say) can never be replayed as another.

This module does not know what is signed, how peers talk, or what a swarm key protects; it
only hands the key (and the swarm key, if any) to `Credentials`.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import NewType

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from stamen.transports.base import Credentials

logger = logging.getLogger(__name__)

PeerId = NewType("PeerId", str)
"""`"p"` + lowercase base32 of SHA-256(public key)[:20]: 33 characters. The "p" marks
this scheme's version; another derivation would get another letter."""

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
PEER_ID_DIGEST_BYTES = 20
PEER_ID_CHARS = 33  # "p" + base32 of 20 bytes (160 bits -> 32 chars, no padding)
_PEER_ID_PREFIX = "p"
_SHORT_CHARS = 8
_MAX_KEY_FILE_BYTES = 16 * 1024


class IdentityError(Exception):
    """A key file is unsafe (readable by others), corrupt, or not an ed25519 key."""


def peer_id_digest(public_key: bytes) -> bytes:
    """The 20-byte digest behind a peer id (also used as the peer's Kademlia node id)."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(
            f"an ed25519 public key has {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}"
        )
    return hashlib.sha256(public_key).digest()[:PEER_ID_DIGEST_BYTES]


def peer_id_from_public_key(public_key: bytes) -> PeerId:
    """The peer id of a raw 32-byte ed25519 public key."""
    text = base64.b32encode(peer_id_digest(public_key)).decode("ascii").lower()
    return PeerId(_PEER_ID_PREFIX + text)


def peer_id_of(credentials: Credentials) -> PeerId:
    return peer_id_from_public_key(credentials.public_key)


def short_peer_id(peer_id: PeerId) -> str:
    """A display form (logs, dashboards): enough characters to tell peers apart by eye."""
    return peer_id[len(_PEER_ID_PREFIX) : len(_PEER_ID_PREFIX) + _SHORT_CHARS]


def sign(private_key: Ed25519PrivateKey, message: bytes, *, domain: bytes) -> bytes:
    """Sign `message` for the purpose named by `domain` (e.g. b"stamen/host-record/v1")."""
    return private_key.sign(_domain_separated(domain, message))


def verify_signature(public_key: bytes, message: bytes, signature: bytes, *, domain: bytes) -> bool:
    """True when `signature` is `public_key`'s signature of `message` under `domain`."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key)
        key.verify(signature, _domain_separated(domain, message))
    except (InvalidSignature, ValueError):
        return False
    return True


def _domain_separated(domain: bytes, message: bytes) -> bytes:
    # A length prefix keeps (domain, message) pairs unambiguous.
    return len(domain).to_bytes(2, "big") + domain + message


def read_swarm_key(path: str | Path) -> bytes:
    """A private swarm's key from its file, the same way for every command: surrounding
    whitespace (a trailing newline, an editor's indent) is not part of the key, and an
    empty file is refused rather than taken as a key anyone could guess.

    Raises `IdentityError` for an empty file and `OSError` if it cannot be read."""
    key = Path(path).expanduser().read_bytes().strip()
    if not key:
        raise IdentityError(f"swarm key file {path} is empty")
    return key


def load_or_create_identity(path: str | Path, swarm_key: bytes | None = None) -> Credentials:
    """Load the ed25519 key at `path`, or create it (mode 0600, parent dirs 0700) if absent.

    Raises `IdentityError` if the file is readable or writable by group/others, is not a
    PEM-encoded unencrypted ed25519 private key, or cannot be read.
    """
    path = Path(path).expanduser()
    if not path.exists():
        _create_key_file(path)
    return Credentials(_read_key_file(path), swarm_key)


def _create_key_file(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # Write a private temporary file, then hard-link it into place: the key appears whole
    # or not at all, and if another process created one meanwhile, theirs wins.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(pem)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(tmp, path)
            logger.info("created a new peer identity at %s", path)
        except FileExistsError:
            logger.info("another process created %s first; using its key", path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_key_file(path: Path) -> Ed25519PrivateKey:
    try:
        mode = path.stat().st_mode
        if not stat.S_ISREG(mode):
            raise IdentityError(f"{path} is not a regular file")
        if mode & 0o077:
            raise IdentityError(
                f"{path} is accessible by group or others (mode {stat.S_IMODE(mode):o}); "
                f"a private key must be readable by its owner only: chmod 600 {path}"
            )
        with path.open("rb") as file:
            data = file.read(_MAX_KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise IdentityError(f"cannot read the identity file {path}: {exc}") from exc
    if len(data) > _MAX_KEY_FILE_BYTES:
        raise IdentityError(f"{path} is too large to be an ed25519 key file")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise IdentityError(
            f"{path} is not an unencrypted PEM private key (corrupt file?): {exc}; "
            "move it away to create a new identity"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"{path} holds a {type(key).__name__}, not an ed25519 key")
    return key
