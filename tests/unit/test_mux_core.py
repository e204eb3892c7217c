"""The multiplexer core without any I/O: two `MuxCore`s wired back to back, packets moved
by hand, time given by the test. Windows, acknowledged close/reset and slot release,
limits refused before allocation, protocol errors and keepalive timing."""

from __future__ import annotations

import tracemalloc
from dataclasses import dataclass, field

import pytest

from stamen.transports.base import Limits, MessageTooLarge, StreamClosed
from stamen.transports.mux_core import (
    CoreSettings,
    CreditAvailable,
    Event,
    Liveness,
    MessageReady,
    MuxCore,
    OutPacket,
    PeerGoingAway,
    PeerSettings,
    ProtocolViolation,
    StreamEnded,
    StreamOpened,
    StreamState,
)
from stamen.transports.packets import (
    FLAG_SYN,
    FRAME_BYTES,
    FRAME_COUNT,
    PACKET,
    WINDOW,
    Kind,
)

KiB = 1024
WINDOW_BYTES = 64 * KiB
PAYLOAD_BYTES = 16 * KiB
DEFAULT_LIMITS = Limits()


def settings(limits: Limits = DEFAULT_LIMITS, window_bytes: int = WINDOW_BYTES) -> CoreSettings:
    return CoreSettings(limits, window_bytes, PAYLOAD_BYTES + 1024, 1.0, 5.0)


@dataclass
class Link:
    """A dialer and an acceptor core whose outboxes are delivered by `pump`."""

    dialer: MuxCore
    acceptor: MuxCore
    sent: dict[str, list[bytes]] = field(default_factory=lambda: {"dialer": [], "acceptor": []})

    def pump(self) -> None:
        """Deliver packets both ways until both outboxes are empty."""
        while self.dialer.outbox or self.acceptor.outbox:
            for name, source, target in (
                ("dialer", self.dialer, self.acceptor),
                ("acceptor", self.acceptor, self.dialer),
            ):
                outbox, source.outbox = source.outbox, []
                for packet in outbox:
                    wire = wire_bytes(packet)
                    self.sent[name].append(wire)
                    target.receive_packet(memoryview(bytearray(wire)))


def wire_bytes(packet: OutPacket) -> bytes:
    head, parts, _ = packet
    return b"".join((head, *parts))


def make_link(
    dialer_limits: Limits = DEFAULT_LIMITS,
    acceptor_limits: Limits = DEFAULT_LIMITS,
    window_bytes: int = WINDOW_BYTES,
) -> Link:
    dialer_settings = settings(dialer_limits, window_bytes)
    acceptor_settings = settings(acceptor_limits, window_bytes)

    def peer_of(own: CoreSettings) -> PeerSettings:
        return PeerSettings(own.limits, own.window_bytes, own.max_payload_bytes)

    dialer = MuxCore(dialer_settings, peer_of(acceptor_settings), is_dialer=True, now_s=0.0)
    acceptor = MuxCore(acceptor_settings, peer_of(dialer_settings), is_dialer=False, now_s=0.0)
    return Link(dialer, acceptor)


def take_events(core: MuxCore) -> list[Event]:
    events, core.events = core.events, []
    return events


def send(core: MuxCore, stream: StreamState, frames: list[bytes]) -> int:
    """Queue as much of a message as the credit allows; how many packets went."""
    if core.send_whole(stream, frames):
        return 1
    message, packets = core.begin_message(stream, frames), 0
    while not message.done and core.push(stream, message):
        packets += 1
    return packets


def accepted(link: Link) -> StreamState:
    (opened,) = [event for event in take_events(link.acceptor) if isinstance(event, StreamOpened)]
    return opened.stream


def test_a_message_crosses_and_ids_follow_the_roles() -> None:
    link = make_link()
    first, second = link.dialer.open_stream(), link.dialer.open_stream()
    assert (first.stream_id, second.stream_id) == (1, 3)
    send(link.dialer, second, [b"hello", b"", b"world"])
    link.pump()
    events = take_events(link.acceptor)
    # The older stream's SYN goes first, so the acceptor sees ids in increasing order.
    assert [type(event) for event in events] == [StreamOpened, StreamOpened, MessageReady]
    assert [event.stream.stream_id for event in events[:2]] == [1, 3]
    assert link.acceptor.next_message(events[1].stream) == [b"hello", b"", b"world"]
    assert link.acceptor.next_message(events[0].stream) is None
    assert link.acceptor.open_stream().stream_id == 2


def test_a_message_larger_than_the_window_flows_while_nothing_waits_unread() -> None:
    link = make_link()
    stream = link.dialer.open_stream()
    payload = bytes(range(256)) * (4 * WINDOW_BYTES // 256)
    message = link.dialer.begin_message(stream, [payload])
    while not message.done:
        if not link.dialer.push(stream, message):
            link.pump()  # the grants come back without anyone calling next_message
    link.pump()
    incoming = accepted(link)
    assert link.acceptor.next_message(incoming) == [payload]
    assert all(len(wire) - PACKET.size <= PAYLOAD_BYTES + 1024 for wire in link.sent["dialer"])


def test_a_stalled_reader_holds_credit_and_blocks_only_its_stream() -> None:
    link = make_link()
    slow, other = link.dialer.open_stream(), link.dialer.open_stream()
    send(link.dialer, slow, [b"unread"])
    link.pump()
    slow_in = accepted(link)
    big = link.dialer.begin_message(slow, [bytes(3 * WINDOW_BYTES)])
    for _ in range(1000):  # bounded: a core that never holds credit would loop forever
        if big.done or not link.dialer.push(slow, big):
            break
        link.pump()
    assert not big.done, "the sender was never stopped by a reader that does not read"
    assert slow.send_credit < PAYLOAD_BYTES
    send(link.dialer, other, [b"still flows"])
    link.pump()
    other_in = accepted(link)
    assert link.acceptor.next_message(other_in) == [b"still flows"]
    # Reading the waiting message releases the held credit to the sender.
    assert link.acceptor.next_message(slow_in) == [b"unread"]
    take_events(link.dialer)
    link.pump()
    assert any(isinstance(event, CreditAvailable) for event in take_events(link.dialer))
    while not big.done:
        if not link.dialer.push(slow, big):
            link.pump()
    link.pump()
    assert link.acceptor.next_message(slow_in) == [bytes(3 * WINDOW_BYTES)]


def test_close_is_acknowledged_before_the_slot_is_free() -> None:
    link = make_link(acceptor_limits=Limits(max_streams=1))
    stream = link.dialer.open_stream()
    send(link.dialer, stream, [b"last words"])
    link.dialer.close_stream(stream)
    with pytest.raises(StreamClosed):
        link.dialer.open_stream()  # our CLOSE is not answered yet: the slot is taken
    link.pump()
    incoming = accepted(link)
    assert link.acceptor.next_message(incoming) == [b"last words"]
    with pytest.raises(StreamClosed):
        link.acceptor.next_message(incoming)  # read to the end: answers with its CLOSE
    link.pump()
    assert link.dialer.open_stream().stream_id == 3


def test_reset_is_answered_and_frees_both_slots() -> None:
    link = make_link(acceptor_limits=Limits(max_streams=1))
    stream = link.dialer.open_stream()
    send(link.dialer, stream, [b"x"])
    link.pump()
    incoming = accepted(link)
    link.dialer.reset_stream(stream)
    with pytest.raises(StreamClosed):
        link.dialer.open_stream()
    link.pump()
    assert StreamEnded(incoming, reset=True) in take_events(link.acceptor)
    with pytest.raises(StreamClosed):
        link.acceptor.next_message(incoming)
    assert [PACKET.unpack_from(wire)[0] for wire in link.sent["acceptor"]][-1] == Kind.RESET
    link.dialer.announce(link.dialer.open_stream().stream_id)  # the acceptor's RESET freed it
    link.pump()
    assert isinstance(take_events(link.acceptor)[0], StreamOpened)  # and its slot too


def test_a_stream_reset_before_its_first_packet_costs_nothing() -> None:
    link = make_link(acceptor_limits=Limits(max_streams=1))
    link.dialer.reset_stream(link.dialer.open_stream())
    link.dialer.announce(1)
    assert not link.dialer.outbox
    link.dialer.open_stream()


def test_streams_beyond_the_acceptors_limit_are_reset() -> None:
    link = make_link(dialer_limits=Limits(max_streams=4), acceptor_limits=Limits(max_streams=1))
    link.acceptor.peer = PeerSettings(Limits(max_streams=4), WINDOW_BYTES, PAYLOAD_BYTES)
    link.dialer.peer = PeerSettings(Limits(max_streams=4), WINDOW_BYTES, PAYLOAD_BYTES)
    first, second = link.dialer.open_stream(), link.dialer.open_stream()
    send(link.dialer, first, [b"a"])
    send(link.dialer, second, [b"b"])
    link.pump()
    assert StreamEnded(second, reset=True) in take_events(link.dialer)
    with pytest.raises(StreamClosed):
        link.dialer.next_message(second)


def test_sender_side_header_must_fit_a_packet() -> None:
    link = make_link(acceptor_limits=Limits(max_frames=4096))
    stream = link.dialer.open_stream()
    with pytest.raises(MessageTooLarge):
        link.dialer.begin_message(stream, [b"x"] * 4096)  # 32 KiB of sizes > a packet


def packet(kind: int, stream_id: int, payload: bytes = b"", flags: int = 0) -> memoryview:
    return memoryview(PACKET.pack(kind, flags, 0, stream_id, len(payload)) + payload)


def msg_payload(*sizes: int, count: int | None = None, data: bytes = b"") -> bytes:
    frame_count = len(sizes) if count is None else count
    return FRAME_COUNT.pack(frame_count) + b"".join(FRAME_BYTES.pack(s) for s in sizes) + data


HOSTILE = {
    "length disagrees": memoryview(PACKET.pack(Kind.PING, 0, 0, 0, 9) + bytes(8)),
    "frame count over the limit": packet(Kind.MSG, 2, msg_payload(count=2**32 - 1), FLAG_SYN),
    "message over the limit": packet(Kind.MSG, 2, msg_payload(2**40, 1), FLAG_SYN),
    "data beyond the declared size": packet(Kind.MSG, 2, msg_payload(1, data=b"xy"), FLAG_SYN),
    "unknown stream": packet(Kind.DATA, 8, b"x"),
    "our own parity": packet(Kind.MSG, 1, msg_payload(1, data=b"x"), FLAG_SYN),
    "stream 0": packet(Kind.MSG, 0, msg_payload(1, data=b"x"), FLAG_SYN),
    "unknown kind": packet(99, 0),
    "handshake kind": packet(Kind.HELLO, 0, b"hi"),
    "unknown flag": packet(Kind.PING, 0, bytes(8), flags=0x80),
    "window overflow": packet(Kind.WINDOW, 2, WINDOW.pack(2**64 - 1), FLAG_SYN),
    "oversized packet": packet(Kind.MSG, 2, msg_payload(20 * KiB, data=bytes(20 * KiB)), FLAG_SYN),
    "truncated": memoryview(b"\x01\x00"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_protocol_errors_end_the_connection(case: str) -> None:
    core = make_link(acceptor_limits=Limits(max_frames=8, max_message_bytes=KiB)).dialer
    core.settings = settings(Limits(max_frames=8, max_message_bytes=KiB))
    core.receive_packet(HOSTILE[case])
    assert isinstance(take_events(core)[-1], ProtocolViolation)
    assert core.is_closed
    core.receive_packet(packet(Kind.PING, 0, bytes(8)))  # nothing more is taken in
    assert not core.outbox and not core.events


def test_sending_beyond_the_window_is_a_protocol_error() -> None:
    link = make_link()
    stream = link.dialer.open_stream()
    send(link.dialer, stream, [b"unread"])  # the acceptor now holds its credit
    stream.send_credit = 10 * WINDOW_BYTES  # a dialer that ignores the acceptor's window
    message = link.dialer.begin_message(stream, [bytes(2 * WINDOW_BYTES)])
    while not message.done:
        link.dialer.push(stream, message)
    link.pump()
    assert any(isinstance(event, ProtocolViolation) for event in take_events(link.acceptor))


def test_declared_sizes_are_not_allocated_ahead_of_the_data() -> None:
    core = make_link().acceptor
    tracemalloc.start()
    try:
        core.receive_packet(packet(Kind.MSG, 1, msg_payload(200 * 1024 * KiB, data=b"x"), FLAG_SYN))
        core.receive_packet(packet(Kind.MSG, 3, msg_payload(count=10**6), FLAG_SYN))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_bytes < 64 * KiB
    assert isinstance(core.events[-1], ProtocolViolation)  # the second: 10**6 frames


def test_ping_is_answered_and_goaway_is_reported() -> None:
    core = make_link().acceptor
    core.receive_packet(packet(Kind.PING, 0, b"12345678"))
    (pong,) = core.outbox
    assert wire_bytes(pong) == bytes(packet(Kind.PONG, 0, b"12345678"))
    core.receive_packet(packet(Kind.GOAWAY, 0))
    assert take_events(core) == [PeerGoingAway()]
    assert core.is_closed


def test_keepalive_pings_after_an_interval_and_declares_silence_after_the_timeout() -> None:
    core = make_link().dialer  # interval 1 s, timeout 5 s, created at t=0
    assert core.liveness(0.9) is Liveness.HEARD
    assert not core.outbox
    assert core.liveness(1.0) is Liveness.PINGED
    assert PACKET.unpack_from(core.outbox.pop()[0])[0] == Kind.PING
    core.heard(1.5)
    assert core.liveness(2.4) is Liveness.HEARD
    assert core.liveness(6.0) is Liveness.PINGED
    assert core.liveness(6.6) is Liveness.SILENT
    assert core.silent_s(6.6) == pytest.approx(5.1)


def test_data_channel_sized_packets_carry_the_message_in_order() -> None:
    chunk_bytes = 64 * KiB
    own = CoreSettings(Limits(), 4 * 1024 * KiB, chunk_bytes - PACKET.size, 1.0, 5.0)
    peer = PeerSettings(Limits(), 4 * 1024 * KiB, chunk_bytes - PACKET.size)
    dialer = MuxCore(own, peer, is_dialer=True, now_s=0.0)
    acceptor = MuxCore(own, peer, is_dialer=False, now_s=0.0)
    link = Link(dialer, acceptor)
    frames = [bytes([i]) * size for i, size in enumerate((70_000, 0, 200_000, 1))]
    stream = dialer.open_stream()
    send(dialer, stream, frames)
    link.pump()
    assert all(len(wire) <= chunk_bytes for wire in link.sent["dialer"])
    kinds = [PACKET.unpack_from(wire)[0] for wire in link.sent["dialer"]]
    assert kinds == [Kind.MSG] + [Kind.DATA] * (len(kinds) - 1)
    assert acceptor.next_message(accepted(link)) == frames
