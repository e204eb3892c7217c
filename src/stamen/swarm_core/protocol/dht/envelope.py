"""Sealed DHT datagrams: `[version, flags, HMAC tag (16 B), payload]`.

The MAC key derives from the swarm key, so datagrams of another private swarm (or of the
public one) are dropped before any parsing. The `CLIENT` flag tells the receiver the
sender is in client mode (never to be added to a routing table). Replayed datagrams gain
nothing: stores carry signed records where the newest wins, and answers must match a
pending request; neither is this module's concern.

This module does not know what the payload means (rpcudp's framing) nor who the peers are.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any


class Envelope:
    """Seals datagrams as [version, flags, 16-byte HMAC-SHA256 tag, payload]."""

    VERSION = 1
    FLAG_CLIENT = 0x01
    TAG_BYTES = 16
    HEADER_BYTES = 2 + TAG_BYTES

    def __init__(self, swarm_key: bytes | None) -> None:
        self._mac_key = hashlib.sha256(b"stamen/dht/v1\x00" + (swarm_key or b"")).digest()

    def seal(self, payload: bytes, *, from_client: bool) -> bytes:
        header = bytes([self.VERSION, self.FLAG_CLIENT if from_client else 0])
        return header + self._tag(header, payload) + payload

    def open(self, datagram: bytes) -> tuple[bytes, bool] | None:
        """(payload, sent by a client) if authentic, else None."""
        if len(datagram) < self.HEADER_BYTES or datagram[0] != self.VERSION:
            return None
        header, tag = datagram[:2], datagram[2 : self.HEADER_BYTES]
        payload = datagram[self.HEADER_BYTES :]
        if not hmac.compare_digest(tag, self._tag(header, payload)):
            return None
        return payload, bool(header[1] & self.FLAG_CLIENT)

    def _tag(self, header: bytes, payload: bytes) -> bytes:
        return hmac.digest(self._mac_key, header + payload, "sha256")[: self.TAG_BYTES]


class SealingTransport:
    """The UDP transport as rpcudp sees it: every datagram sent is sealed."""

    def __init__(self, inner: asyncio.DatagramTransport, envelope: Envelope, client_mode: bool):
        self._inner, self._envelope, self._client_mode = inner, envelope, client_mode

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if not self._inner.is_closing():
            self._inner.sendto(self._envelope.seal(data, from_client=self._client_mode), addr)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)
