"""Transport speed side by side with a raw asyncio TCP socket pair, in one run.

    .venv/bin/python benchmarks/transport_speed.py [--rounds 7] [--only tcp]

Cases: round trip of a 1 KB, 16 KB and 256 KB message (echoed back), and one-way
throughput of a 16 MB message (acknowledged by a tiny reply). Every subject runs both
ends in this process on one event loop, exactly like the raw baseline, which does the
same length-prefixed echo with `StreamReader.readexactly`. Rounds alternate between
subjects so that noise from other work on the machine hits all of them alike; the table
shows medians and the ratio to raw.

The allocator is settled first (`settle_allocator`), so that raw is measured at its
fast time whatever ran before. Without it the raw baseline was bimodal (1 KB round trip
48-51 us or 110-127 us, CPU-bound both ways): asyncio's socket reads `recv(256 KiB)`,
which glibc's malloc serves from a fresh mmap, shrunk by mremap and freed by munmap,
once per message, while its dynamic mmap threshold is at the default 128 KiB. The
threshold rises only when an mmapped chunk of at most 32 MiB is freed, so the mode
depended on what the process had allocated before (the order the links were created
and measured in). `strace -f -c` of 6,200 raw 1 KB round trips: 12,404 mremap, 12,558
mmap and 12,415 munmap unsettled; 7 munmap and no mremap settled, with the same 12,409
sendto, 12,408 recvfrom and 24,844 epoll_wait (2 vCPU VM, glibc 2.36, Python 3.11).
Every subject runs under the same settled allocator. Bigger cases moved too: raw's 256 KB
round trip read 618 us unsettled and 205-242 us settled (stamen tcp: 705 and 520 us).

To add a row, register an async context manager yielding a `Link` in `SUBJECTS` (see
`transport_link` for any `stamen.transports.base.Transport`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Protocol

from stamen.testing import git_revision
from stamen.transports.base import Connection, Credentials, Stream, StreamClosed, Transport
from stamen.transports.memory import MemoryTransport
from stamen.transports.tcp import TcpTransport

KB = 1000
MB = 1000 * 1000
LENGTH = struct.Struct("!Q")
SETTLE_BYTES = 24 * 1024 * 1024  # see settle_allocator


class Link(Protocol):
    async def round_trip(self, payload: bytes) -> None: ...

    async def one_way(self, payload: bytes) -> None: ...


# --- raw baseline ------------------------------------------------------------------------


class RawLink:
    """Length-prefixed messages over a bare asyncio stream pair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def _send(self, payload: bytes) -> None:
        if len(payload) <= 64 * 1024:
            self.writer.write(LENGTH.pack(len(payload)) + payload)  # one syscall
        else:
            self.writer.write(LENGTH.pack(len(payload)))  # a second syscall beats a copy
            self.writer.write(payload)
        await self.writer.drain()

    async def _recv(self) -> bytes:
        (size,) = LENGTH.unpack(await self.reader.readexactly(LENGTH.size))
        return await self.reader.readexactly(size)

    async def round_trip(self, payload: bytes) -> None:
        await self._send(payload)
        assert len(await self._recv()) == len(payload)

    async def one_way(self, payload: bytes) -> None:
        await self._send(payload)
        await self._recv()


async def _raw_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    link = RawLink(reader, writer)
    try:
        while True:
            message = await link._recv()
            # Bulk messages are acknowledged, not echoed: the case measures one direction.
            await link._send(b"k" if len(message) > 1 * MB else message)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


@asynccontextmanager
async def raw_tcp_link() -> AsyncIterator[Link]:
    server = await asyncio.start_server(_raw_server, "127.0.0.1", 0, limit=1024 * 1024)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1024 * 1024)
    try:
        yield RawLink(reader, writer)
    finally:
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.05)  # let the server side see EOF and end its task
        server.close()


# --- any stamen transport ------------------------------------------------------------------


class StreamLink:
    def __init__(self, stream: Stream) -> None:
        self.stream = stream

    async def round_trip(self, payload: bytes) -> None:
        await self.stream.send([payload])
        assert len((await self.stream.recv())[0]) == len(payload)

    async def one_way(self, payload: bytes) -> None:
        await self.stream.send([payload])
        await self.stream.recv()


async def _stream_server(connection: Connection) -> None:
    stream = await connection.accept_stream()
    try:
        while True:
            message = await stream.recv()
            await stream.send([b"k"] if len(message[0]) > 1 * MB else message)
    except StreamClosed:
        await stream.close()


@asynccontextmanager
async def transport_link(
    make_transport: Callable[[Credentials], Transport], listen_address: str
) -> AsyncIterator[Link]:
    server = make_transport(Credentials.generate())
    client = make_transport(Credentials.generate())
    try:
        listener = await server.listen(listen_address, _stream_server)
        connection = await client.connect(listener.addresses[0])
        stream = await connection.open_stream()
        yield StreamLink(stream)
        await stream.close()
    finally:
        await client.aclose()
        await server.aclose()


SUBJECTS: dict[str, Callable[[], AbstractAsyncContextManager[Link]]] = {
    "raw asyncio tcp": raw_tcp_link,
    # Always Noise-encrypted (AES-256-GCM records); there is no plaintext mode to compare.
    "stamen tcp": lambda: transport_link(TcpTransport, "tcp://127.0.0.1:0"),
    "stamen memory": lambda: transport_link(MemoryTransport, "memory://"),
}
BASELINE = "raw asyncio tcp"

# name -> (payload bytes, operations per batch, round trip?)
CASES: dict[str, tuple[int, int, bool]] = {
    "round trip 1 KB": (1 * KB, 200, True),
    "round trip 16 KB": (16 * KB, 100, True),
    "round trip 256 KB": (256 * KB, 30, True),
    "one way 16 MB": (16 * MB, 3, False),
}


async def _batch_s(link: Link, payload: bytes, operations: int, round_trip: bool) -> float:
    """Seconds per operation, averaged over one batch."""
    action = link.round_trip if round_trip else link.one_way
    start = time.perf_counter()
    for _ in range(operations):
        await action(payload)
    return (time.perf_counter() - start) / operations


def settle_allocator() -> None:
    """Raise glibc malloc's dynamic mmap threshold for the rest of the process by freeing
    one big mmapped buffer (see the module docstring). The buffer must be at most 32 MiB
    (glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: a 64 MiB one leaves the threshold
    alone) and bigger than what the cases allocate at once (a 16 MB message). Harmless
    with other allocators."""
    buffer = bytearray(SETTLE_BYTES)
    del buffer


async def measure(subjects: list[str], rounds: int) -> dict[tuple[str, str], float]:
    """Median seconds per operation for each (case, subject)."""
    samples: dict[tuple[str, str], list[float]] = {}
    async with AsyncExitStack() as stack:
        links = {name: await stack.enter_async_context(SUBJECTS[name]()) for name in subjects}
        for case, (size, operations, round_trip) in CASES.items():
            payload = os.urandom(size)
            for link in links.values():  # warm-up: buffers, credit windows, caches
                await _batch_s(link, payload, max(1, operations // 10), round_trip)
            for _ in range(rounds):
                for name, link in links.items():
                    seconds = await _batch_s(link, payload, operations, round_trip)
                    samples.setdefault((case, name), []).append(seconds)
    return {key: statistics.median(values) for key, values in samples.items()}


def render(results: dict[tuple[str, str], float], subjects: list[str]) -> str:
    lines = [
        f"# {platform.node()} {platform.machine()} {os.cpu_count()} cpus, "
        f"Python {sys.version.split()[0]}, git {git_revision()}",
        f"{'case':<20} {'subject':<26} {'median':>12} {'vs raw':>8}",
    ]
    for case, (size, _, round_trip) in CASES.items():
        baseline = results.get((case, BASELINE))
        for name in subjects:
            seconds = results[(case, name)]
            shown = f"{seconds * 1e6:9.1f} us" if round_trip else f"{size / seconds / MB:7.0f} MB/s"
            if baseline is None:
                ratio = ""
            elif round_trip:
                ratio = f"{seconds / baseline:7.2f}x"  # time: lower is better
            else:
                ratio = f"{baseline / seconds:7.2f}x"  # throughput: higher is better
            lines.append(f"{case:<20} {name:<26} {shown:>12} {ratio:>8}")
    lines.append("round trips: time ratio (lower is better); one way: throughput ratio")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", action="append", help="substring of subjects to run")
    args = parser.parse_args(argv)
    subjects = [
        name
        for name in SUBJECTS
        if name == BASELINE or not args.only or any(part in name for part in args.only)
    ]
    settle_allocator()
    results = asyncio.run(measure(subjects, args.rounds))
    print(render(results, subjects))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
