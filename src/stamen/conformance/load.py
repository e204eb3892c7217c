"""Many concurrent chat streams against any OpenAI-compatible server.

    python -m stamen.conformance.load --base-url http://127.0.0.1:8000/v1 --model M \
        --streams 64 --max-tokens 8

Every stream must end the way the OpenAI SDK relies on: HTTP 200, `data:` chunks with one
id, the assistant role first, exactly one finish reason (the last choice chunk), a usage
chunk, then `[DONE]`, and no error event. Greedy decoding (temperature 0) of the same
prompt must give the same text in every stream, so sessions that share hosts cannot have
mixed up their caches. `run_streams` returns per-stream outcomes plus what a load run
reports: aggregate completion tokens per second and time-to-first-token percentiles.

This module only speaks HTTP; it knows nothing about how the server produces tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson

DEFAULT_PROMPTS = (
    "Name a primary color.",
    "What is the capital of France?",
    "Say hello in Spanish.",
    "Give me one word that rhymes with cat.",
)


@dataclass
class StreamOutcome:
    """One stream: its text and token count, or why it is not well-formed."""

    prompt: str
    text: str = ""
    completion_tokens: int = 0
    first_token_s: float | None = None  # from sending the request to the first content
    total_s: float = 0.0
    error: str | None = None


@dataclass
class LoadResult:
    streams: list[StreamOutcome]
    wall_s: float
    failures: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return sum(s.completion_tokens for s in self.streams) / self.wall_s

    def first_token_percentile_s(self, q: float) -> float:
        """The `q`-quantile (0..1) of time to first token over streams that had one."""
        times = sorted(s.first_token_s for s in self.streams if s.first_token_s is not None)
        if not times:
            return float("nan")
        if len(times) == 1:
            return times[0]
        cuts = statistics.quantiles(times, n=100, method="inclusive")
        return cuts[min(98, max(0, round(q * 100) - 1))]


def check_stream(lines: Sequence[str]) -> tuple[str, int]:
    """The text and completion tokens of a well-formed chat stream; raises `AssertionError`
    naming what is wrong."""
    chunks: list[dict[str, Any]] = []
    done = False
    for line in lines:
        if not line.startswith("data: "):
            continue  # comments (keep-alives) and blank separators
        assert not done, "data after [DONE]"
        payload = line.removeprefix("data: ")
        if payload == "[DONE]":
            done = True
            continue
        chunk = orjson.loads(payload)
        assert "error" not in chunk, f"error event: {chunk['error']}"
        chunks.append(chunk)
    assert done, "the stream did not end with [DONE]"
    assert len({c["id"] for c in chunks}) == 1, "chunks carry several ids"
    choice_chunks = [c for c in chunks if c["choices"]]
    assert choice_chunks, "no choice chunk"
    assert choice_chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    finishes = [c["choices"][0]["finish_reason"] for c in choice_chunks]
    assert finishes[-1] in ("stop", "length"), f"last finish reason {finishes[-1]!r}"
    assert not any(finishes[:-1]), "a finish reason before the last chunk"
    usage = chunks[-1].get("usage")
    assert not chunks[-1]["choices"] and usage, "no usage chunk at the end"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in choice_chunks)
    return text, int(usage["completion_tokens"])


def _has_content(line: str) -> bool:
    """Whether an SSE line is a chunk carrying generated text (the role chunk that opens
    a stream carries none, and comes before the prompt is even processed)."""
    if not line.startswith("data: {"):
        return False
    choices = orjson.loads(line.removeprefix("data: ")).get("choices") or ()
    return any(c.get("delta", {}).get("content") for c in choices)


async def _one_stream(
    http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int
) -> StreamOutcome:
    outcome = StreamOutcome(prompt)
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    began = time.perf_counter()
    lines: list[str] = []
    try:
        async with http.stream("POST", "chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                outcome.error = f"HTTP {response.status_code}: {response.text[:300]}"
                return outcome
            async for line in response.aiter_lines():
                if outcome.first_token_s is None and _has_content(line):
                    outcome.first_token_s = time.perf_counter() - began
                lines.append(line)
        outcome.text, outcome.completion_tokens = check_stream(lines)
    except (AssertionError, httpx.HTTPError, ValueError) as error:
        outcome.error = f"{type(error).__name__}: {error}"
    finally:
        outcome.total_s = time.perf_counter() - began
    return outcome


async def run_streams(
    base_url: str,
    model: str,
    *,
    streams: int,
    max_tokens: int = 8,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    timeout_s: float = 300.0,
    api_key: str | None = None,
) -> LoadResult:
    """`streams` chat streams at once (prompts taken in turn); see the module docstring."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(
        base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout_s, limits=limits
    ) as http:
        began = time.perf_counter()
        outcomes = await asyncio.gather(
            *(
                _one_stream(http, model, prompts[i % len(prompts)], max_tokens)
                for i in range(streams)
            )
        )
        wall_s = time.perf_counter() - began
    result = LoadResult(list(outcomes), wall_s)
    result.failures = [f"stream {i}: {o.error}" for i, o in enumerate(outcomes) if o.error]
    by_prompt: dict[str, set[str]] = {}
    for outcome in outcomes:
        if outcome.error is None:
            by_prompt.setdefault(outcome.prompt, set()).add(outcome.text)
    for prompt, texts in by_prompt.items():
        if len(texts) > 1:
            result.failures.append(f"greedy {prompt!r} gave {len(texts)} different texts")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stamen.conformance.load",
        description="Run concurrent chat streams against an OpenAI-compatible server and "
        "check every one; prints tokens/s and time-to-first-token percentiles.",
    )
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--timeout-s", type=float, default=300.0)
    parser.add_argument("--api-key")
    args = parser.parse_args(argv)
    result = asyncio.run(
        run_streams(
            args.base_url,
            args.model,
            streams=args.streams,
            max_tokens=args.max_tokens,
            timeout_s=args.timeout_s,
            api_key=args.api_key,
        )
    )
    print(
        f"{args.streams} streams in {result.wall_s:.1f} s: {result.tokens_per_s:.1f} tokens/s, "
        f"first token p50 {result.first_token_percentile_s(0.5):.3f} s "
        f"p99 {result.first_token_percentile_s(0.99):.3f} s"
    )
    for failure in result.failures:
        print(failure)
    return 1 if result.failures else 0


if __name__ == "__main__":
    sys.exit(main())
