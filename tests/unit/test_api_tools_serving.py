"""Tool calls through the chat route in process (AsyncTestClient, the bundled SmolLM2,
greedy): where a call ends, what reaches `content` and `logprobs`, the stream's shape, and
that compiling the tools' grammar leaves the event loop free."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from typing import Any

import httpx
import orjson
import pytest

from stamen.api import constrained
from stamen.api.app import create_app, static_engines
from stamen.api.engine import LocalEngine
from stamen.api.state import ServingSettings
from tests.unit.test_api_app import client_for, load_engine_once, sse_data

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.fixture(scope="module")
def engine() -> LocalEngine:
    return load_engine_once()


def body(engine: LocalEngine, **extra: Any) -> dict[str, Any]:
    return {"model": engine.model_id, "tools": [WEATHER], "tool_choice": "required",
            "messages": [{"role": "user", "content": "Weather in Paris?"}],
            "temperature": 0, "max_tokens": 40, **extra}  # fmt: skip


async def chat(engine: LocalEngine, **extra: Any) -> dict[str, Any]:
    async with client_for(engine) as client:
        response = await client.post("/v1/chat/completions", json=body(engine, **extra))
    assert response.status_code == 200, response.text
    choice: dict[str, Any] = response.json()["choices"][0]
    return choice


async def test_a_stop_sequence_never_cuts_a_call(engine: LocalEngine) -> None:
    choice = await chat(engine, stop=["Par"])
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"])["city"].startswith("Par")


async def test_a_call_cut_by_max_tokens_ends_length_without_markup(engine: LocalEngine) -> None:
    for max_tokens in (4, 9, 14):
        choice = await chat(engine, max_tokens=max_tokens)
        assert choice["finish_reason"] == "length", max_tokens
        assert not choice["message"]["content"], max_tokens  # never markup
        for call in choice["message"].get("tool_calls") or []:
            assert "tool_call" not in call["function"]["arguments"]


async def test_a_pure_call_has_no_content_logprobs(engine: LocalEngine) -> None:
    choice = await chat(engine, logprobs=True)
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["logprobs"]["content"] is None


async def test_each_stream_chunk_has_one_entry_per_call(engine: LocalEngine) -> None:
    async with client_for(engine) as client:
        streamed = await client.post("/v1/chat/completions", json=body(engine, stream=True))
    chunks = [orjson.loads(item) for item in sse_data(streamed.text) if item != "[DONE]"]
    entries = [
        [call["index"] for call in chunk["choices"][0]["delta"].get("tool_calls", [])]
        for chunk in chunks
    ]
    assert any(entries) and all(len(e) == len(set(e)) for e in entries)
    first = next(e for e in chunks if e["choices"][0]["delta"].get("tool_calls"))
    (head,) = first["choices"][0]["delta"]["tool_calls"]
    assert head["id"].startswith("call_") and head["function"]["arguments"] == ""


async def test_compiling_many_tools_leaves_the_event_loop_free(
    engine: LocalEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def tool(n: int) -> dict[str, Any]:
        # Integer ranges are what llguidance takes longest over (a lexer for each range):
        # 128 such tools compile for about 0.7 s on this machine, within the size limit.
        properties = {
            f"p{i}": {"type": "integer", "minimum": -n * 37 - i, "maximum": n * 100003 + i * 7919}
            for i in range(24)
        }
        parameters = {"type": "object", "properties": properties, "required": ["p0"]}
        return {"type": "function", "function": {"name": f"f{n}", "parameters": parameters}}

    # Under `none` the tools are compiled (checked) but left out of the prompt.
    many = body(engine, tools=[tool(n) for n in range(128)], tool_choice="none", max_tokens=1)
    gaps: list[float] = []
    compiles: list[float] = []  # what each grammar compile took, as llguidance measured it
    compile_grammar = constrained.compile_grammar

    def timed(grammar: str, tokenizer: Any) -> constrained.Constraint:
        compiled = compile_grammar(grammar, tokenizer)
        compiles.append(compiled.compile_s)
        return compiled

    monkeypatch.setattr(constrained, "compile_grammar", timed)
    constrained.cache_clear()  # a cold compile, whatever ran before
    constrained.ll_tokenizer(engine.tokenizer)  # converted once per process, not measured here

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    # The app on this event loop (the test client would run it on a loop of its own).
    app = create_app(ServingSettings(), static_engines(engine))
    transport = httpx.ASGITransport(app=app)
    # Everything the test process holds so far out of the collector's way. Late in the
    # default run the loop once stalled for 0.68 s during a 0.72 s compile, which alone
    # never holds the GIL (12 of 12 compiles beside a ticking loop here); a collection of
    # the heap a thousand tests leave behind is the likely cause, not the compile.
    gc.collect()
    gc.freeze()
    try:
        async with (
            app.lifespan(),
            httpx.AsyncClient(transport=transport, base_url="http://t") as client,
        ):
            ticking = asyncio.create_task(tick())
            await asyncio.sleep(0.05)  # ticking before the request starts
            response = await client.post("/v1/chat/completions", json=many)
            ticking.cancel()
    finally:
        gc.unfreeze()
    assert response.status_code == 200, response.text
    # The compile was long enough to show a stall (ten ticks or more), and the loop never
    # stalled for half of it: compiling on the loop would leave one gap as long as itself.
    slowest = max(compiles, default=0.0)
    assert slowest > 0.1 and max(gaps, default=slowest) < slowest / 2, (compiles, gaps)
