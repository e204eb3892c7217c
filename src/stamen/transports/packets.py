"""The tcp transport's packet format (one packet per record when encrypted):

    u8 type | u8 flags | u16 reserved (0) | u32 stream_id | u64 payload_bytes | payload

    MSG     first packet of a message: u32 frame_count, u64 frame_bytes[frame_count],
            then the first bytes of the frames' concatenated data
    DATA    more of the current message's data
    CLOSE   the sender is done with the stream: deliver what came before, then closed
    RESET   abort the stream now
    WINDOW  u64: the receiver grants that many more payload bytes on the stream
    PING / PONG (stream 0): keepalive; GOAWAY (stream 0): the connection is closing
    HELLO / REFUSE (stream 0): a pipe's own handshake before the core runs (WebRTC's
            `Hello`, or why it was refused); the core itself refuses them

This one format serves both pipes: on tcp each packet is the plaintext of one sealed
record, on WebRTC each packet is one data-channel message (at most 64 KiB).

Lengths are u64 on the wire so that absurd values are seen and refused, never truncated.
This module only names things; `mux_core` gives them meaning.
"""

from __future__ import annotations

import functools
import struct

from stamen.transports.base import TransportError

PACKET = struct.Struct("!BBHIQ")
FRAME_COUNT = struct.Struct("!I")
FRAME_BYTES = struct.Struct("!Q")
WINDOW = struct.Struct("!Q")
CHUNK_BYTES = 256 * 1024  # data per packet: big enough to amortize, small enough to interleave
FLAG_SYN = 0x01  # first packet of a stream, sent by its opener
PING_BYTES = 8
MIN_WINDOW_BYTES = 64 * 1024


class Kind:
    """Packet types (plain ints: the hot path compares them per packet)."""

    MSG = 1
    DATA = 2
    CLOSE = 3
    RESET = 4
    WINDOW = 5
    PING = 6
    PONG = 7
    GOAWAY = 8
    HELLO = 16  # pipe handshake kinds, never given to the core
    REFUSE = 17


STREAM_KINDS = frozenset({Kind.MSG, Kind.DATA, Kind.CLOSE, Kind.RESET, Kind.WINDOW})
ALL_KINDS = (*STREAM_KINDS, Kind.PING, Kind.PONG, Kind.GOAWAY)  # the core's


class ProtocolError(TransportError):
    """The peer broke the packet protocol; its connection is dropped."""


@functools.cache
def message_packet(frame_count: int) -> struct.Struct:
    """PACKET, then a MSG payload's frame count and sizes, packed in one call."""
    return struct.Struct(f"!BBHIQI{frame_count}Q")


def message_header_bytes(max_frames: int) -> int:
    return FRAME_COUNT.size + FRAME_BYTES.size * max_frames
