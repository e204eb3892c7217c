"""A transparent TCP relay that delays each direction's bytes by a fixed time:

    python -m benchmarks.network.relay --listen 0.0.0.0:31500 --one-way-delay-ms 50

Runs in the router namespace, where iptables `nat PREROUTING REDIRECT` sends the hosts'
ports to it; each accepted connection's real destination comes from `SO_ORIGINAL_DST`, and
the relay dials it from the router (locally generated traffic skips PREROUTING, so there is
no loop). Each direction is a delay line, not a throttle: a chunk read at time t is written
at t + delay, however many chunks are in flight, so a round trip gains twice the delay and
throughput stays what the shaped links allow. A direction holds at most `MAX_BUFFERED_BYTES`
before it stops reading, which is TCP backpressure with a window far above
bandwidth x delay for the rates emulated here.

Not emulated: the TCP handshake's own round trip (the relay accepts locally at once; the
product keeps its connections open, so only the first message of a connection pays it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import struct
from collections.abc import Sequence

logger = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h
READ_BYTES = 1 << 16
MAX_BUFFERED_BYTES = 64 << 20
CONNECT_TIMEOUT_S = 10.0


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a REDIRECTed IPv4 connection was headed (a `sockaddr_in`)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack_from("!H", raw, 2)[0]
    return socket.inet_ntoa(raw[4:8]), port


class DelayLine:
    """One direction: chunks leave `delay_s` after they arrived, in order."""

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self._queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        self._buffered = 0
        self._room = asyncio.Event()
        self._room.set()

    async def pump_in(self, reader: asyncio.StreamReader) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await reader.read(READ_BYTES):
                self._queue.put_nowait((loop.time() + self.delay_s, data))
                self._buffered += len(data)
                if self._buffered >= MAX_BUFFERED_BYTES:
                    self._room.clear()
                    await self._room.wait()
        finally:
            self._queue.put_nowait(None)

    async def pump_out(self, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        while (item := await self._queue.get()) is not None:
            due, data = item
            if (wait_s := due - loop.time()) > 0:
                await asyncio.sleep(wait_s)
            writer.write(data)
            await writer.drain()
            self._buffered -= len(data)
            if self._buffered < MAX_BUFFERED_BYTES:
                self._room.set()
        if writer.can_write_eof():
            writer.write_eof()


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _direction(
    delay_s: float, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    line = DelayLine(delay_s)
    async with asyncio.TaskGroup() as tasks:
        tasks.create_task(line.pump_in(reader))
        tasks.create_task(line.pump_out(writer))


async def relay_connection(
    delay_s: float, down_reader: asyncio.StreamReader, down_writer: asyncio.StreamWriter
) -> None:
    """Dial the connection's original destination and delay both directions."""
    sock = down_writer.get_extra_info("socket")
    destination = original_destination(sock)
    try:
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(*destination), CONNECT_TIMEOUT_S
        )
    except (OSError, TimeoutError) as exc:
        logger.warning("cannot reach %s:%d: %s", *destination, exc)
        down_writer.close()
        return
    for writer in (down_writer, up_writer):
        _no_delay(writer)
    try:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(_direction(delay_s, down_reader, up_writer))
            tasks.create_task(_direction(delay_s, up_reader, down_writer))
    except* (ConnectionError, OSError) as group:
        logger.debug("connection to %s:%d ended: %s", *destination, group.exceptions[0])
    finally:
        for writer in (down_writer, up_writer):
            writer.close()


async def serve(host: str, port: int, delay_s: float) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await relay_connection(delay_s, reader, writer)

    server = await asyncio.start_server(handle, host, port)
    print(f"relay ready on {host}:{port} one-way delay {delay_s * 1000:.1f} ms", flush=True)
    async with server:
        await server.serve_forever()


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", type=_host_port, required=True, metavar="HOST:PORT")
    parser.add_argument("--one-way-delay-ms", type=float, required=True)
    args = parser.parse_args(argv)
    if args.one_way_delay_ms < 0:
        parser.error("--one-way-delay-ms must be >= 0")
    logging.basicConfig(level=logging.INFO)
    try:
        host, port = args.listen
        asyncio.run(serve(host, port, args.one_way_delay_ms / 1000))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
