"""WebRTC transport vs a raw aiortc data-channel pair, measured side by side in one run.

Run: `.venv/bin/python benchmarks/webrtc_speed.py [--rounds N]`

Both pairs live in this process on loopback (host ICE candidates only, no STUN). The raw
pair exchanges SDPs directly and echoes bytes on one data channel, sending 64 KiB messages
with `bufferedAmount` backpressure: the best a caller of aiortc can do by hand. Ours goes
through a `SignalingRelay`, the identity handshake, the stream mux and flow control.

Reports the median round trip for 1 KB / 16 KB / 256 KB messages and the one-way throughput
of a 16 MiB message, with ratios ours / raw (goals: round trip <= 1.5x, throughput >= 0.8x).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import platform
import statistics
import sys
import time

import aiortc
from aiortc import RTCConfiguration, RTCPeerConnection

from stamen.testing import git_revision
from stamen.transports.base import Credentials, TransportError
from stamen.transports.signaling import SignalingRelay
from stamen.transports.webrtc import WebRTCTransport

CHUNK_BYTES = 64 * 1024
HIGH_WATER_BYTES = 1024 * 1024
SIZES = (1_000, 16_000, 256_000)
BULK_BYTES = 16 * 1024 * 1024


class RawPair:
    """Two aiortc peers and one data channel; `b` echoes whole messages back to `a`."""

    async def start(self) -> None:
        config = RTCConfiguration(iceServers=[])
        self.pc_a, self.pc_b = RTCPeerConnection(config), RTCPeerConnection(config)
        self.a = self.pc_a.createDataChannel("raw", negotiated=True, id=0)
        self.b = self.pc_b.createDataChannel("raw", negotiated=True, id=0)
        self.a.bufferedAmountLowThreshold = HIGH_WATER_BYTES // 4
        self.b.bufferedAmountLowThreshold = HIGH_WATER_BYTES // 4
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.a.on("message", self.inbox.put_nowait)
        self.echo = True
        self.received_bytes = 0
        self.b.on("message", self._on_b)
        opened = asyncio.Event()
        self.a.on("open", opened.set)
        await self.pc_a.setLocalDescription(await self.pc_a.createOffer())
        await self.pc_b.setRemoteDescription(self.pc_a.localDescription)
        await self.pc_b.setLocalDescription(await self.pc_b.createAnswer())
        await self.pc_a.setRemoteDescription(self.pc_b.localDescription)
        await opened.wait()

    def _on_b(self, message: bytes) -> None:
        if self.echo:
            self.b.send(message)
        else:
            self.received_bytes += len(message)
            if self.received_bytes >= self.expected_bytes:
                self.done.set()

    async def round_trip(self, size: int) -> float:
        """Send `size` bytes in <= 64 KiB messages and wait for all of them to come back."""
        start = time.perf_counter()
        payload = b"x" * CHUNK_BYTES
        for offset in range(0, size, CHUNK_BYTES):
            self.a.send(payload[: min(CHUNK_BYTES, size - offset)])
        got = 0
        while got < size:
            got += len(await self.inbox.get())
        return time.perf_counter() - start

    async def one_way(self, total_bytes: int) -> float:
        self.echo, self.received_bytes, self.expected_bytes = False, 0, total_bytes
        self.done = asyncio.Event()
        low = asyncio.Event()
        self.a.on("bufferedamountlow", low.set)
        payload = b"y" * CHUNK_BYTES
        start = time.perf_counter()
        for _ in range(total_bytes // CHUNK_BYTES):
            while self.a.bufferedAmount > HIGH_WATER_BYTES:
                low.clear()
                await low.wait()
            self.a.send(payload)
        await self.done.wait()
        self.echo = True
        return time.perf_counter() - start

    async def close(self) -> None:
        await self.pc_a.close()
        await self.pc_b.close()


class OurPair:
    """Two `WebRTCTransport`s through a relay; the server echoes on every stream."""

    async def start(self) -> None:
        self.relay = SignalingRelay()
        await self.relay.start()
        self.server = WebRTCTransport(Credentials.generate())
        self.client = WebRTCTransport(Credentials.generate())
        self.sink_done: asyncio.Queue[float] = asyncio.Queue()

        async def handler(connection) -> None:  # type: ignore[no-untyped-def]
            echo = await connection.accept_stream()
            sink = await connection.accept_stream()
            with contextlib.suppress(TransportError, ExceptionGroup):
                async with asyncio.TaskGroup() as group:
                    group.create_task(self._echo(echo))
                    group.create_task(self._sink(sink))

        self.listener = await self.server.listen(f"webrtc://{self.relay.address}", handler)
        self.connection = await self.client.connect(self.listener.addresses[0])
        self.stream = await self.connection.open_stream()
        self.bulk = await self.connection.open_stream()

    async def _echo(self, stream) -> None:  # type: ignore[no-untyped-def]
        while True:
            await stream.send(await stream.recv())

    async def _sink(self, stream) -> None:  # type: ignore[no-untyped-def]
        while True:
            await stream.recv()
            self.sink_done.put_nowait(time.perf_counter())

    async def round_trip(self, size: int) -> float:
        payload = b"x" * size
        start = time.perf_counter()
        await self.stream.send([payload])
        await self.stream.recv()
        return time.perf_counter() - start

    async def one_way(self, total_bytes: int) -> float:
        payload = b"y" * total_bytes
        start = time.perf_counter()
        await self.bulk.send([payload])
        return await self.sink_done.get() - start

    async def close(self) -> None:
        await self.connection.close()
        await self.listener.close()
        await self.client.aclose()
        await self.server.aclose()
        await self.relay.close()


async def measure(rounds: int) -> list[tuple[str, float, float]]:
    raw, ours = RawPair(), OurPair()
    await raw.start()
    await ours.start()
    rows = []
    try:
        for size in SIZES:
            # Interleaved so that drift in machine load hits both sides alike.
            raw_s, our_s = [], []
            for _ in range(rounds):
                raw_s.append(await raw.round_trip(size))
                our_s.append(await ours.round_trip(size))
            rows.append((f"round trip {size // 1000} KB (ms)", *_median_ms(raw_s, our_s)))
        raw_mbs, our_mbs = [], []
        for _ in range(max(3, rounds // 10)):
            raw_mbs.append(BULK_BYTES / 1e6 / await raw.one_way(BULK_BYTES))
            our_mbs.append(BULK_BYTES / 1e6 / await ours.one_way(BULK_BYTES))
        rows.append(
            ("one-way 16 MiB (MB/s)", statistics.median(raw_mbs), statistics.median(our_mbs))
        )
    finally:
        await ours.close()
        await raw.close()
    return rows


def _median_ms(raw_s: list[float], our_s: list[float]) -> tuple[float, float]:
    return statistics.median(raw_s) * 1e3, statistics.median(our_s) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args(argv)
    rows = asyncio.run(measure(args.rounds))
    revision = git_revision()
    print(
        f"# {platform.node()} {platform.processor() or platform.machine()}, "
        f"python {sys.version.split()[0]}, aiortc {aiortc.__version__}, git {revision}"
    )
    print(f"{'metric':<28} {'raw aiortc':>12} {'stamen webrtc':>14} {'ratio':>7}")
    for name, raw, ours in rows:
        print(f"{name:<28} {raw:>12.2f} {ours:>14.2f} {ours / raw:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
