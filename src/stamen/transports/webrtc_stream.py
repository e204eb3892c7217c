"""How a message looks on a WebRTC data channel, for readers of the old module name.

Since the multiplexer core (`mux_core`) serves both transports, a data-channel message is
exactly one core packet (`packets`) of at most `chunk_bytes`: a message's first packet is
a MSG (frame count, frame sizes, the first data), the rest are continuation (DATA)
packets. `wire_chunks` cuts a message with the core's own cutter, ignoring credit, and
`HEADER` reads the two fields of a packet header that route it. The pipe itself is
`webrtc_mux`; this module is not used by it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from stamen.transports.mux_state import Buffer, Outgoing
from stamen.transports.packets import PACKET
from stamen.transports.packets import Kind as PacketKind

HEADER = struct.Struct("!B3xI8x")  # (kind, stream_id) of a PACKET header
assert HEADER.size == PACKET.size


class Kind:
    """The core's message kinds under the data channel's old names."""

    MSG = PacketKind.MSG
    CONT = PacketKind.DATA


def wire_chunks(
    stream_id: int, head: bytes, views: list[memoryview] | list[Buffer], chunk_bytes: int
) -> Iterator[bytes]:
    """The data-channel messages (whole packets, at most `chunk_bytes`) of a message whose
    MSG payload starts with `head`."""
    message = Outgoing(head, views)
    while not message.done:
        kind, parts = message.take(chunk_bytes - PACKET.size)
        payload_bytes = sum(len(part) for part in parts)
        yield b"".join((PACKET.pack(kind, 0, 0, stream_id, payload_bytes), *parts))
