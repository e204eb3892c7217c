"""What an emulated network really gives between two namespaces, measured over TCP:

    python -m benchmarks.network.probe serve --host 10.98.1.2 --port 31401
    python -m benchmarks.network.probe measure --host 10.98.1.2 --port 31401 [--bulk-mb 8]

`serve` answers two kinds of connection on one port, told apart by the first byte: `E`
echoes every byte back (round trip), `B` reads a length and then that many bytes and
answers one byte (bulk upload). `measure` prints one JSON line: the median round trip of a
64-byte echo on an open connection, and the upload bandwidth, which is the bytes over the
time from the first byte sent to the answer minus one round trip (the answer's way back and
the last byte's way out). The probe port is redirected through the relay like the hosts'
ports, so both figures include everything the product's traffic goes through.
"""

from __future__ import annotations

import argparse
import json
import socket
import socketserver
import statistics
import struct
import time
from collections.abc import Sequence

ECHO, BULK = b"E", b"B"
ECHO_BYTES = 64
MAX_BULK_BYTES = 1 << 30
TIMEOUT_S = 60.0


class _Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(TIMEOUT_S)
        kind = _read_exactly(sock, 1)
        if kind == ECHO:
            while data := sock.recv(1 << 16):
                sock.sendall(data)
        elif kind == BULK:
            (size,) = struct.unpack("!Q", _read_exactly(sock, 8))
            if size > MAX_BULK_BYTES:
                return
            left = size
            while left > 0:
                data = sock.recv(min(left, 1 << 20))
                if not data:
                    return
                left -= len(data)
            sock.sendall(b"k")


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    chunks, left = [], size
    while left:
        data = sock.recv(left)
        if not data:
            raise ConnectionError(f"peer closed with {left} of {size} bytes unread")
        chunks.append(data)
        left -= len(data)
    return b"".join(chunks)


def _connect(host: str, port: int) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=TIMEOUT_S)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def round_trip_s(host: str, port: int, samples: int = 20) -> float:
    """Median time of a 64-byte echo on one open connection (the first one warms it)."""
    payload = b"x" * ECHO_BYTES
    with _connect(host, port) as sock:
        sock.sendall(ECHO)
        times = []
        for _ in range(samples + 1):
            began = time.perf_counter()
            sock.sendall(payload)
            _read_exactly(sock, ECHO_BYTES)
            times.append(time.perf_counter() - began)
    return statistics.median(times[1:])


def upload_bit_s(host: str, port: int, size_bytes: int, rtt_s: float) -> float:
    """Bits per second of one bulk upload of `size_bytes`."""
    block = b"\0" * (1 << 20)
    with _connect(host, port) as sock:
        sock.sendall(BULK + struct.pack("!Q", size_bytes))
        began = time.perf_counter()
        left = size_bytes
        while left > 0:
            sent = sock.send(block[: min(left, len(block))])
            left -= sent
        _read_exactly(sock, 1)
        elapsed = time.perf_counter() - began
    return 8 * size_bytes / max(elapsed - rtt_s, 1e-9)


def measure(host: str, port: int, bulk_bytes: int) -> dict[str, float]:
    rtt = round_trip_s(host, port)
    return {"rtt_s": rtt, "upload_bit_s": upload_bit_s(host, port, bulk_bytes, rtt)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("serve", "measure"))
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--bulk-mb", type=float, default=8.0, help="upload size (measure)")
    args = parser.parse_args(argv)
    if args.mode == "serve":
        with _Server((args.host, args.port), _Handler) as server:
            print(f"probe ready on {args.host}:{args.port}", flush=True)
            server.serve_forever()
        return 0
    size = int(args.bulk_mb * 1e6)
    if not 0 < size <= MAX_BULK_BYTES:
        parser.error(f"--bulk-mb must be in (0, {MAX_BULK_BYTES / 1e6:.0f}]")
    print(json.dumps(measure(args.host, args.port, size)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
