"""Fuzz a listening RPC server with malformed, truncated and oversized messages while a
well-behaved client keeps calling it.

Every bad message must get a typed error reply or a closed stream, never a hang; the good
client must see every call answered correctly; memory and task counts must stay flat.
Runs for `STAMEN_FUZZ_SECONDS` per transport (default 6 s).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import msgspec
import psutil
import pytest
import torch

from stamen.swarm_core.protocol.codecs import Codec
from stamen.swarm_core.protocol.rpc import Outgoing, RpcClient, RpcServer
from stamen.swarm_core.protocol.wire import (
    MESSAGE_TYPES,
    ErrorReply,
    Forward,
    ForwardResult,
    Hello,
    HelloReply,
    Pong,
    SessionClosed,
    SessionId,
    WireError,
    decode_message,
    encode_message,
)
from stamen.transports.base import (
    ConnectionClosed,
    Credentials,
    MessageTooLarge,
    StreamClosed,
    Transport,
)
from stamen.transports.memory import MemoryHub, MemoryTransport

logger = logging.getLogger(__name__)

FORWARD = Forward(block_start=0, block_end=2)
REPLY_TIMEOUT_S = 10.0
MAX_RSS_GROWTH_BYTES = 96 * 1024 * 1024


def fuzz_seconds() -> float:
    return float(os.environ.get("STAMEN_FUZZ_SECONDS", "6"))


def make_transports(kind: str) -> tuple[Transport, Transport, str]:
    if kind == "memory":
        hub = MemoryHub()
        server = MemoryTransport(Credentials.generate(), hub=hub)
        return server, MemoryTransport(Credentials.generate(), hub=hub), "memory://"
    tcp = pytest.importorskip("stamen.transports.tcp")
    server = tcp.TcpTransport(Credentials.generate())
    return server, tcp.TcpTransport(Credentials.generate()), "tcp://127.0.0.1:0"


async def double(request, context):
    return Outgoing(ForwardResult(), {"hidden": request.tensors["hidden"] * 2})


def _header(message: dict, tensors: list[dict]) -> bytes:
    return msgspec.msgpack.encode({"message": message, "tensors": tensors})


def _forward_header(**meta) -> bytes:
    base = {"name": "hidden", "dtype": "float32", "shape": [1, 2, 4], "codec": "none", "nbytes": 32}
    return _header({"type": "forward", "block_start": 0, "block_end": 2}, [{**base, **meta}])


def _valid_forward() -> list[bytes]:
    return [bytes(f) for f in encode_message(FORWARD, {"hidden": torch.randn(1, 2, 4)})]


def malformed(rng: random.Random) -> list[bytes]:
    """One bad message; each branch is a kind of malice or damage."""
    kind = rng.randrange(13)
    if kind == 0:  # noise
        return [rng.randbytes(rng.randrange(0, 512)) for _ in range(rng.randrange(0, 5))]
    if kind == 1:  # truncated valid message
        frames = _valid_forward()
        index = rng.randrange(len(frames))
        frames[index] = frames[index][: rng.randrange(len(frames[index]))]
        return frames
    if kind == 2:  # a shape whose product overflows int64
        big = rng.choice([2**31, 2**40, 2**20])
        return [
            _forward_header(shape=[big, big, big], nbytes=rng.choice([0, 32, 2**63])),
            b"\0" * 32,
        ]
    if kind == 3:  # dtype outside the allow-list
        dtype = rng.choice(["complex64", "object", "float8_e4m3", "", "x" * 1000])
        return [_forward_header(dtype=dtype), b"\0" * 32]
    if kind == 4:  # unknown tag
        tag = rng.choice(["exec", "pickle", "", "\x00", "a" * 10_000])
        return [_header({"type": tag}, [])]
    if kind == 5:  # huge declared length, small frame
        return [_forward_header(nbytes=rng.choice([2**32, 2**40, 2**64 - 1])), b"\0" * 32]
    if kind == 6:  # bit flips in a valid header
        frames = _valid_forward()
        header = bytearray(frames[0])
        for _ in range(rng.randrange(1, 6)):
            header[rng.randrange(len(header))] = rng.randrange(256)
        return [bytes(header), *frames[1:]]
    if kind == 7:  # more frames than the header lists
        return _valid_forward() + [b"\0" * 32] * rng.randrange(1, 12)
    if kind == 8:  # an oversized header
        return [_header({"type": "forward", "pad": "x" * rng.choice([300_000, 2_000_000])}, [])]
    if kind == 9:  # a well-formed message nobody serves
        tag = rng.choice(sorted(MESSAGE_TYPES))
        if tag == "session_closed":
            return [bytes(f) for f in encode_message(SessionClosed(session_id=SessionId("s")))]
        return [_header({"type": tag}, [])]
    if kind == 10:  # deeply nested msgpack
        return [b"\x91" * rng.choice([1000, 100_000])]
    if kind == 11:  # a large frame contradicting its header
        return [_forward_header(shape=[1, 512, 512], nbytes=1 << 20), b"\0" * ((1 << 20) - 4)]
    return [_header({"type": "forward", "block_start": 5, "block_end": 1}, [])]  # bad fields


async def send_one(connection, frames: list[bytes]) -> str:
    """Send one message on a fresh stream; what became of it."""
    stream = await asyncio.wait_for(connection.open_stream(), REPLY_TIMEOUT_S)
    try:
        try:
            await asyncio.wait_for(stream.send(frames), REPLY_TIMEOUT_S)
        except MessageTooLarge:
            return "too_large"
        try:
            frames = await asyncio.wait_for(stream.recv(), REPLY_TIMEOUT_S)
        except StreamClosed:
            return "closed"
        reply = decode_message(frames).message  # the server must answer well-formed
        if isinstance(reply, ErrorReply):
            return reply.code.value
        # Damage that left a valid request, or a valid ping.
        assert isinstance(reply, ForwardResult | Pong), reply
        return "served"
    finally:
        stream.reset()


async def bad_handshake(transport: Transport, address: str, frames: list[bytes]) -> str:
    """A fresh connection whose first message is garbage must be hung up on."""
    connection = await transport.connect(address, timeout_s=REPLY_TIMEOUT_S)
    try:
        outcome = await send_one(connection, frames)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(connection.accept_stream(), REPLY_TIMEOUT_S)
        return f"handshake_{outcome}"
    finally:
        await connection.close()


async def fuzz(client_transport, address, fuzzer: RpcClient, seconds: float) -> Counter:
    rng = random.Random(1234)
    outcomes: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    iteration = 0
    while loop.time() < deadline:
        iteration += 1
        frames = malformed(rng)
        if iteration % 25 == 0:
            outcomes[await bad_handshake(client_transport, address, frames)] += 1
            continue
        try:
            outcomes[await send_one(fuzzer.connection, frames)] += 1
        except ConnectionClosed:
            outcomes["connection_closed"] += 1
            fuzzer = await RpcClient.connect(client_transport, address, Hello.local(), timeout_s=5)
    return outcomes


async def fuzz_server(kind: str) -> dict[str, object]:
    """Fuzz a fresh server while a good client calls it; what the test then checks."""
    server_transport, client_transport, address = make_transports(kind)
    server = RpcServer(HelloReply.local("host"))
    server.add_unary(Forward, double)
    listener = await server_transport.listen(address, server.serve)
    address = listener.addresses[0]
    try:
        good = await RpcClient.connect(client_transport, address, Hello.local("good"), timeout_s=5)
        fuzzer = await RpcClient.connect(
            client_transport, address, Hello.local("fuzz"), timeout_s=5
        )
        await fuzz(client_transport, address, fuzzer, seconds=0.5)  # warm allocator and caches
        tasks_before = len(asyncio.all_tasks())
        rss_before = psutil.Process().memory_info().rss
        stop = asyncio.Event()

        async def well_behaved() -> int:
            calls = 0
            while not stop.is_set():
                hidden = torch.randn(1, 4, 64)
                reply = await good.call(
                    FORWARD, {"hidden": hidden}, timeout_s=REPLY_TIMEOUT_S, codec=Codec.NONE
                )
                if not torch.equal(reply.tensors["hidden"], hidden * 2):
                    raise AssertionError("a well-behaved call got a wrong answer")
                calls += 1
                await asyncio.sleep(0)
            return calls

        good_calls = asyncio.create_task(well_behaved())
        try:
            outcomes = await fuzz(client_transport, address, fuzzer, fuzz_seconds())
        finally:
            stop.set()
        good_call_count = await good_calls
        rss_growth = psutil.Process().memory_info().rss - rss_before
        await asyncio.sleep(0.1)  # let reset streams' server tasks finish
        task_growth = len(asyncio.all_tasks()) - tasks_before
    finally:
        await listener.close()
        await client_transport.aclose()
        await server_transport.aclose()
    return {
        "outcomes": dict(outcomes),
        "good_calls": good_call_count,
        "rss_growth": rss_growth,
        "task_growth": task_growth,
    }


@pytest.mark.parametrize("kind", ["memory", "tcp"])
def test_server_survives_malformed_traffic(kind):
    # A fresh interpreter: other tests' models, threads and memory maps in this process
    # would otherwise count in the RSS growth measured here.
    run = subprocess.run(
        [sys.executable, "-m", "tests.unit.test_fuzz_wire", kind],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=fuzz_seconds() + 120,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    outcomes = result["outcomes"]
    logger.info("%s fuzz: %s; %d good calls", kind, outcomes, result["good_calls"])
    assert result["good_calls"] > 10
    assert result["task_growth"] <= 2
    assert outcomes["bad_request"] > 0 and outcomes["not_found"] > 0, outcomes
    assert any(key.startswith("handshake_") for key in outcomes), outcomes
    rss_growth = result["rss_growth"]
    assert rss_growth < MAX_RSS_GROWTH_BYTES, f"RSS grew by {rss_growth / 2**20:.1f} MiB"


def test_every_fuzz_case_is_refused_by_the_decoder():
    """The generator's messages are all invalid (or valid but unserved), never a crash."""
    rng = random.Random(7)
    for _ in range(300):
        try:
            decoded = decode_message(malformed(rng))
        except WireError:
            continue
        assert not isinstance(decoded.message, Forward) or decoded.tensors


if __name__ == "__main__":
    print(json.dumps(asyncio.run(fuzz_server(sys.argv[1]))))
