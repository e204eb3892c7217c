"""The embedded default under concurrent streams: throughput, time to first token, memory.

    python benchmarks/serving_load.py [--levels 8,32,64,128] [--max-tokens 16] [--soak-s 300]

Starts `swarm-api` with no peers (a bootstrap and two hosts as child processes serving
the bundled SmolLM2), then, in one run, for each concurrency level sends that many chat
streams at once (`stamen.conformance.load`: every stream checked) and reports aggregate
completion tokens/s, its ratio to the lowest level's, and p50/p99 time to first token.
Levels run twice, interleaved (8, 32, ..., then again), and the better round counts, so
that a noisy minute on this shared machine does not decide a ratio.

Then a soak: rounds of `--soak-streams` streams for `--soak-s` seconds; the RSS of the API
process and of each child is sampled after the first minute (warm-up) and at the end.
Goals: aggregate tokens/s at 64 streams within 10 % of that at 8; RSS growth <= 10 %.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import time

import httpx
import psutil
import torch

from stamen.conformance.load import LoadResult, run_streams
from stamen.testing import git_revision

MODEL_ID = "SmolLM2-135M-Instruct"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_api(port: int) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [sys.executable, "-m", "stamen.api.cli", "--port", str(port), "--log-level", "WARNING"],
        stdin=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"swarm-api exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("swarm-api did not become ready in 300 s")


def rss_mib(process: psutil.Process) -> dict[str, float]:
    """RSS of the API process and of each child, by name and pid."""
    out = {f"api {process.pid}": process.memory_info().rss / 2**20}
    for child in process.children(recursive=True):
        name = " ".join(child.cmdline()[2:3]).rsplit(".", 1)[-1] or child.name()
        out[f"{name} {child.pid}"] = child.memory_info().rss / 2**20
    return out


def run_level(base_url: str, streams: int, max_tokens: int) -> LoadResult:
    result = asyncio.run(
        run_streams(f"{base_url}/v1", MODEL_ID, streams=streams, max_tokens=max_tokens)
    )
    if result.failures:
        print(f"  {streams} streams: {len(result.failures)} failures, e.g. {result.failures[0]}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default="8,32,64,128")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--soak-s", type=float, default=300.0)
    parser.add_argument("--soak-streams", type=int, default=32)
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]

    revision = git_revision()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}"
        f", torch {torch.__version__}, git {revision}"
    )
    port = _free_port()
    api = start_api(port)
    base_url = f"http://127.0.0.1:{port}"
    try:
        run_level(base_url, 8, args.max_tokens)  # warm-up: connections, code paths
        best: dict[int, LoadResult] = {}
        for _ in range(2):
            for streams in levels:
                result = run_level(base_url, streams, args.max_tokens)
                if streams not in best or result.tokens_per_s > best[streams].tokens_per_s:
                    best[streams] = result
        base = best[levels[0]].tokens_per_s
        print(f"\n{'streams':>8} {'tokens/s':>9} {'vs ' + str(levels[0]):>7} "
              f"{'ttft p50':>9} {'ttft p99':>9} {'failures':>8}")  # fmt: skip
        for streams in levels:
            r = best[streams]
            print(
                f"{streams:>8} {r.tokens_per_s:>9.1f} {r.tokens_per_s / base:>7.2f} "
                f"{r.first_token_percentile_s(0.5):>8.3f}s {r.first_token_percentile_s(0.99):>8.3f}s "
                f"{len(r.failures):>8}"
            )
        if args.soak_s > 0:
            soak(base_url, api.pid, args.soak_s, args.soak_streams, args.max_tokens)
    finally:
        api.send_signal(signal.SIGTERM)
        api.wait(timeout=60)
    return 0


def soak(base_url: str, pid: int, soak_s: float, streams: int, max_tokens: int) -> None:
    process = psutil.Process(pid)
    began = time.monotonic()
    warm: dict[str, float] | None = None
    rounds = failures = 0
    while time.monotonic() - began < soak_s:
        result = run_level(base_url, streams, max_tokens)
        rounds += 1
        failures += len(result.failures)
        if warm is None and time.monotonic() - began >= min(60.0, soak_s / 5):
            warm = rss_mib(process)
    end = rss_mib(process)
    warm = warm or end
    print(f"\nsoak: {rounds} rounds of {streams} streams in {soak_s:.0f} s, {failures} failures")
    print(f"{'process':>24} {'warm MiB':>9} {'end MiB':>9} {'growth':>7}")
    for name, mib in end.items():
        before = warm.get(name)
        growth = "" if before is None else f"{(mib / before - 1) * 100:+.1f}%"
        print(f"{name:>24} {before or float('nan'):>9.1f} {mib:>9.1f} {growth:>7}")


if __name__ == "__main__":
    sys.exit(main())
