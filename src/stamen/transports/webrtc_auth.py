"""The WebRTC identity proof: who is at the other end of this DTLS session.

DTLS encrypts, and aiortc checks the peer's certificate against the SDP fingerprint. What
DTLS does not say is which swarm peer holds that certificate, so each side sends a `Hello`
(the first frame over the data channel) carrying:

1. its ed25519 public key and a signature over the transcript `role | offer fingerprints |
   answer fingerprints` (role `O` for the offerer, `A` for the answerer);
2. an HMAC-SHA256 of the same transcript under the swarm key, when one is set;
3. the limits it enforces as a receiver (window, largest packet, frames, message size,
   streams).

A relay that swaps SDPs changes the fingerprints, so the signatures no longer verify; a
proof replayed under the other role does not verify either. This module knows nothing
about data channels, streams or signalling: it maps SDP text and credentials to bytes.
"""

from __future__ import annotations

import hmac
import re

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from stamen.transports.base import Credentials, HandshakeError, IdentityMismatch
from stamen.transports.webrtc_config import MuxSettings

# v2: the multiplexer core's packet format (`packets`) replaced WebRTC's own frames; the
# version is in the signed transcript, so a v1 peer's Hello fails to verify and is refused.
_AUTH_CONTEXT = b"stamen-webrtc-auth-v2"
_SWARM_CONTEXT = b"stamen-webrtc-swarm-v2"
_FINGERPRINT = re.compile(r"^a=fingerprint:(\S+) (\S+)\s*$", re.MULTILINE)

OFFERER_ROLE = b"O"
ANSWERER_ROLE = b"A"


class Hello(msgspec.Struct, frozen=True):
    """First frame each way: the sender's key, its proof, and the limits it enforces."""

    public_key: bytes
    signature: bytes
    swarm_mac: bytes | None
    window_bytes: int
    max_packet_bytes: int
    max_frames: int
    max_message_bytes: int
    max_streams: int


def fingerprints(sdp: str) -> bytes:
    """The DTLS certificate fingerprints an SDP commits to, in a canonical form."""
    found = sorted(f"{alg.lower()} {value.upper()}" for alg, value in _FINGERPRINT.findall(sdp))
    if not found:
        raise HandshakeError("SDP carries no DTLS fingerprint")
    return ",".join(found).encode()


def _transcript(role: bytes, offer_sdp: str, answer_sdp: str) -> bytes:
    return b"|".join((role, fingerprints(offer_sdp), fingerprints(answer_sdp)))


def make_hello(
    credentials: Credentials, role: bytes, offer_sdp: str, answer_sdp: str, settings: MuxSettings
) -> Hello:
    """This side's `Hello` as `role` in the session these SDPs describe."""
    transcript = _transcript(role, offer_sdp, answer_sdp)
    swarm_mac = None
    if credentials.swarm_key is not None:
        swarm_mac = hmac.digest(credentials.swarm_key, _SWARM_CONTEXT + transcript, "sha256")
    limits = settings.limits
    return Hello(
        public_key=credentials.public_key,
        signature=credentials.private_key.sign(_AUTH_CONTEXT + transcript),
        swarm_mac=swarm_mac,
        window_bytes=settings.window_bytes,
        max_packet_bytes=settings.chunk_bytes,
        max_frames=limits.max_frames,
        max_message_bytes=limits.max_message_bytes,
        max_streams=limits.max_streams,
    )


def verify_hello(
    hello: Hello,
    credentials: Credentials,
    peer_role: bytes,
    offer_sdp: str,
    answer_sdp: str,
    expected_key: bytes | None,
) -> None:
    """Raise `HandshakeError`/`IdentityMismatch` unless `hello` proves its key for these SDPs."""
    transcript = _transcript(peer_role, offer_sdp, answer_sdp)
    try:
        Ed25519PublicKey.from_public_bytes(hello.public_key).verify(
            hello.signature, _AUTH_CONTEXT + transcript
        )
    except (InvalidSignature, ValueError) as exc:
        raise HandshakeError("the peer's key signature does not cover this DTLS session") from exc
    own, theirs = credentials.swarm_key, hello.swarm_mac
    if own is None and theirs is not None or own is not None and theirs is None:
        raise HandshakeError("swarm key presence differs")
    if own is not None and theirs is not None:
        want = hmac.digest(own, _SWARM_CONTEXT + transcript, "sha256")
        if not hmac.compare_digest(want, theirs):
            raise HandshakeError("swarm key differs")
    if expected_key is not None and hello.public_key != expected_key:
        raise IdentityMismatch("the peer authenticated with another key")
