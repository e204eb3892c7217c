"""The OpenAI API over a real swarm on 127.0.0.1: SmolLM2 split over three host processes
([0, 15), [15, 30) and a redundant [0, 30)), a uvicorn server with a `SwarmEngine` in a
thread, and the Python client (`AutoDistributedModelForCausalLM`) on the same swarm as
the reference for greedy text.

One test swaps in a swarm view with no hosts (a failing swarm is a 503, not a 500).
The last two tests take hosts down (one killed mid-stream, then enough stopped to leave
blocks uncovered), so they run last and are marked slow.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import orjson
import pytest
import torch
import uvicorn
from litestar.testing import AsyncTestClient

from stamen.api.app import create_app, static_engines
from stamen.api.engine import EngineClient
from stamen.api.state import ServingSettings
from stamen.api.swarm_engine import SwarmEngine
from stamen.conformance.openai import format_table, run_suite
from stamen.models.loading import load_config, load_head, load_tokenizer
from stamen.swarm_core.client.distributed import (
    AutoDistributedModelForCausalLM,
    DistributedModelForCausalLM,
)
from stamen.swarm_core.local_swarm import LocalSwarm
from stamen.swarm_core.protocol.records import HostState
from stamen.swarm_core.protocol.rpc import RpcClient
from stamen.swarm_core.protocol.wire import Hello, Info, InfoReply
from stamen.transports.base import Credentials
from stamen.transports.factory import SchemeRouter
from tests.integration.test_api_server import send_and_abandon

MODEL_ID = "SmolLM2-135M-Instruct"
NUM_BLOCKS = 30
SPANS = [(0, 15), (15, 30), (0, 30)]
MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_S = 3

_T = TypeVar("_T")


class _Loop:
    """An event loop on a thread of its own, for what must outlive one test (the swarm)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout_s: float = 300) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout_s)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@dataclass
class Stack:
    base_url: str
    engine: SwarmEngine
    swarm: LocalSwarm
    swarm_loop: _Loop
    client: DistributedModelForCausalLM

    def greedy_reference(self, messages: list[dict[str, str]], max_tokens: int) -> str:
        """What the Python client generates for this conversation, greedy."""
        tokenizer = self.engine.tokenizer
        ids = chat_ids(tokenizer, messages)
        out = self.client.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False)
        new = [t for t in out[0, len(ids) :].tolist() if t not in self.engine.eos_token_ids]
        return str(tokenizer.decode(new, skip_special_tokens=True))


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(smollm2_gguf: Path) -> Iterator[Stack]:
    swarm_loop = _Loop()
    swarm = LocalSwarm(
        smollm2_gguf, NUM_BLOCKS, spans=SPANS, host_args=["--announce-interval-s", "2"]
    )
    swarm_loop.run(swarm.start())
    engines: dict[str, SwarmEngine] = {}

    @contextlib.asynccontextmanager
    async def provide() -> AsyncIterator[Sequence[EngineClient]]:
        engine = await SwarmEngine.connect(smollm2_gguf, swarm.initial_peers, model_id=MODEL_ID)
        try:
            await engine.swarm.wait_for_coverage(timeout_s=60)
            engines["engine"] = engine
            yield [engine]
        finally:
            await engine.aclose()

    settings = ServingSettings(max_body_bytes=MAX_BODY_BYTES, retry_after_s=RETRY_AFTER_S)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, provide), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    client = None
    try:
        _wait_until(lambda: server.started, 120, "uvicorn and the swarm engine to start")
        client = AutoDistributedModelForCausalLM.from_pretrained(
            smollm2_gguf, initial_peers=swarm.initial_peers
        )
        yield Stack(f"http://127.0.0.1:{port}", engines["engine"], swarm, swarm_loop, client)
    finally:
        if client is not None:
            client.close()
        server.should_exit = True
        thread.join(timeout=30)
        swarm_loop.run(swarm.stop())
        swarm_loop.stop()


# -- helpers -------------------------------------------------------------------------------


async def _host_infos(engine: SwarmEngine) -> dict[str, InfoReply]:
    """Each online host's own `Info` answer, asked over a fresh connection."""
    transport = SchemeRouter(Credentials.generate())
    out: dict[str, InfoReply] = {}
    for record in engine.swarm.records():
        if record.state is not HostState.ONLINE:
            continue
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            rpc = await RpcClient.connect(
                transport,
                record.addresses[0],
                Hello.local(),
                expected_public_key=record.public_key,
                timeout_s=5,
            )
            try:
                reply = await rpc.call(Info(), timeout_s=5)
            finally:
                await rpc.close()
            assert isinstance(reply.message, InfoReply)
            out[record.peer_id] = reply.message
    return out


def host_cache_left(stack: Stack) -> dict[str, int]:
    infos = asyncio.run(_host_infos(stack.engine))
    return {peer_id: info.cache_tokens_left for peer_id, info in infos.items()}


def parse_stream(lines: Sequence[str]) -> tuple[list[dict[str, Any]], bool]:
    """The `data:` chunks of an SSE body and whether it ended with `[DONE]`."""
    chunks, done = [], False
    for line in lines:
        if not line.startswith("data: "):
            continue
        assert not done, "data after [DONE]"
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            done = True
        else:
            chunks.append(orjson.loads(payload))
    return chunks, done


def check_chat_stream(chunks: list[dict[str, Any]], done: bool, *, usage: bool) -> str:
    """Assert the chunk sequence the OpenAI SDK relies on; return the streamed text."""
    assert done, "the stream did not end with [DONE]"
    assert not any("error" in c for c in chunks), chunks
    assert len({c["id"] for c in chunks}) == 1
    choice_chunks = [c for c in chunks if c["choices"]]
    assert choice_chunks[0]["choices"][0]["delta"].get("role") == "assistant"
    assert all("role" not in c["choices"][0]["delta"] for c in choice_chunks[1:])
    finishes = [c["choices"][0]["finish_reason"] for c in choice_chunks]
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    if usage:
        assert not chunks[-1]["choices"] and chunks[-1]["usage"]["completion_tokens"] >= 1
        assert all(c["usage"] is None for c in choice_chunks)
    else:
        assert all("usage" not in c for c in chunks)
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in choice_chunks)


def chat_body(messages: list[dict[str, str]], max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL_ID, "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, **extra}  # fmt: skip


def conversation(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- tests ---------------------------------------------------------------------------------


def test_openai_conformance_suite_passes_over_the_swarm(stack: Stack) -> None:
    # The core section here; every section runs in-process in test_api_server, and over
    # the swarm in the slow test below.
    results = run_suite(f"{stack.base_url}/v1", MODEL_ID, sections=("core",))
    assert all(r.passed for r in results), format_table(results)


@pytest.mark.slow
def test_structured_tools_and_responses_conformance_over_the_swarm(stack: Stack) -> None:
    results = run_suite(
        f"{stack.base_url}/v1", MODEL_ID, sections=("structured", "tools", "responses")
    )
    assert all(r.passed for r in results), format_table(results)


PROMPTS = ["Name three colors.", "What is 2+2?", "Say hello.", "Name a fruit."]


def test_concurrent_streams_are_well_formed_and_match_the_python_client(stack: Stack) -> None:
    max_tokens = 8
    streams = 32

    async def one(http: httpx.AsyncClient, number: int) -> tuple[int, str]:
        usage = number % 2 == 0
        body = chat_body(conversation(PROMPTS[number % len(PROMPTS)]), max_tokens, stream=True)
        if usage:
            body["stream_options"] = {"include_usage": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            lines = [line async for line in response.aiter_lines()]
        chunks, done = parse_stream(lines)
        return number, check_chat_stream(chunks, done, usage=usage)

    async def run_all() -> list[tuple[int, str]]:
        async with httpx.AsyncClient(base_url=stack.base_url, timeout=240) as http:
            return await asyncio.gather(*(one(http, n) for n in range(streams)))

    texts = asyncio.run(run_all())
    expected = [stack.greedy_reference(conversation(p), max_tokens) for p in PROMPTS]
    for number, text in texts:
        assert text == expected[number % len(PROMPTS)], (number, text)
    assert len(set(expected)) == len(PROMPTS)  # the prompts really lead to different answers


def _read_until_content(lines: Iterator[str], chunks_wanted: int) -> list[str]:
    received = []
    for line in lines:
        received.append(line)
        if sum(1 for r in received if r.startswith("data: {")) >= chunks_wanted:
            break
    return received


def test_disconnect_mid_stream_frees_the_hosts_cache(stack: Stack) -> None:
    idle = host_cache_left(stack)
    assert len(idle) == len(SPANS)
    body = chat_body(conversation("Write a very long story about a dragon."), 1500, stream=True)
    with (
        httpx.Client(base_url=stack.base_url, timeout=60) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        _read_until_content(response.iter_lines(), 4)
        during = host_cache_left(stack)
        # The session holds cache on every host it routes through (hosts reserve it as the
        # session grows, so how much depends on how far it got).
        assert any(during[peer] < idle[peer] for peer in idle), (idle, during)
    _wait_until(lambda: host_cache_left(stack) == idle, 30, "the hosts to free the cache")
    metrics = httpx.get(f"{stack.base_url}/metrics").text
    assert "stamen_api_requests_in_flight 0.0" in metrics


def test_disconnect_before_a_whole_completion_frees_the_hosts_cache(stack: Stack) -> None:
    idle = host_cache_left(stack)
    body = chat_body(conversation("Write a very long story about a dragon."), 1500)
    body["logit_bias"] = {str(token): -100 for token in stack.engine.eos_token_ids}
    elapsed = send_and_abandon(stack.base_url, body, lambda: host_cache_left(stack) != idle)
    assert elapsed < 1.0, elapsed
    metrics = httpx.get(f"{stack.base_url}/metrics").text
    assert "stamen_api_requests_in_flight 0.0" in metrics


BAD_CHAT_BODIES: list[tuple[str, Any]] = [
    ("missing messages", {"model": MODEL_ID}),
    ("missing model", {"messages": conversation("hi")}),
    ("messages not a list", {"model": MODEL_ID, "messages": "hi"}),
    ("empty messages", {"model": MODEL_ID, "messages": []}),
    ("max_tokens a string", chat_body(conversation("hi"), "many")),  # type: ignore[arg-type]
    ("temperature a list", {**chat_body(conversation("hi"), 4), "temperature": [1]}),
    ("n too large", {**chat_body(conversation("hi"), 4), "n": 1000}),
    ("n zero", {**chat_body(conversation("hi"), 4), "n": 0}),
    ("max_tokens beyond context", chat_body(conversation("hi"), 10**7)),
    ("max_tokens negative", chat_body(conversation("hi"), -5)),
    ("unknown role", {"model": MODEL_ID, "messages": [{"role": "wizard", "content": "x"}]}),
    ("stream not a bool", {**chat_body(conversation("hi"), 4), "stream": "yes"}),
    ("unsupported tools", {**chat_body(conversation("hi"), 4), "tools": [{"type": "x"}]}),
]


def _assert_openai_error(response: httpx.Response, what: str) -> None:
    assert 400 <= response.status_code < 500, (what, response.status_code, response.text)
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"], what
    assert {"type", "param", "code"} <= set(error), (what, error)


@pytest.mark.parametrize(("what", "body"), BAD_CHAT_BODIES, ids=[b[0] for b in BAD_CHAT_BODIES])
def test_bad_chat_requests_get_openai_shaped_4xx(stack: Stack, what: str, body: Any) -> None:
    response = httpx.post(f"{stack.base_url}/v1/chat/completions", json=body, timeout=30)
    _assert_openai_error(response, what)


def test_malformed_and_huge_bodies_get_4xx(stack: Stack) -> None:
    url = f"{stack.base_url}/v1/chat/completions"
    headers = {"content-type": "application/json"}
    for what, content in [
        ("not json", b"{this is not json"),
        ("json array", b"[1, 2, 3]"),
        ("empty body", b""),
        ("huge body", b'{"model": "' + b"x" * (2 * MAX_BODY_BYTES) + b'"}'),
    ]:
        response = httpx.post(url, content=content, headers=headers, timeout=30)
        _assert_openai_error(response, what)
    huge = httpx.post(url, content=b"x" * (2 * MAX_BODY_BYTES), headers=headers, timeout=30)
    assert huge.status_code == 413
    completion = httpx.post(
        f"{stack.base_url}/v1/completions",
        json={"model": MODEL_ID, "prompt": [[10**9]], "max_tokens": 4},
        timeout=30,
    )
    _assert_openai_error(completion, "token id outside the vocabulary")


class _NoHosts:
    """A swarm view whose hosts are all gone, while its records still say they cover."""

    num_blocks = NUM_BLOCKS

    def hosts(self) -> list[Any]:
        return []

    def covered(self) -> bool:
        return True

    def records(self) -> list[Any]:
        return []


async def test_a_swarm_that_cannot_serve_gives_503_not_500(smollm2_gguf: Path) -> None:
    config, tokenizer, head = await asyncio.gather(
        asyncio.to_thread(load_config, smollm2_gguf),
        asyncio.to_thread(load_tokenizer, smollm2_gguf),
        asyncio.to_thread(load_head, smollm2_gguf),
    )
    swarm: Any = _NoHosts()
    engine = SwarmEngine(MODEL_ID, config=config, tokenizer=tokenizer, head=head, swarm=swarm)
    app = create_app(ServingSettings(retry_after_s=RETRY_AFTER_S), static_engines(engine))
    async with AsyncTestClient(app) as client:
        body = chat_body(conversation("hi"), 4)
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == str(RETRY_AFTER_S)
        _assert_openai_error_shape(response)  # type: ignore[arg-type]
        # Readiness plans a route, so a stream is refused before it starts, the same way.
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
        assert streamed.status_code == 503, streamed.text
        _assert_openai_error_shape(streamed)  # type: ignore[arg-type]


def _kill_host(stack: Stack, index: int) -> None:
    process = stack.swarm.host_processes[index]
    stack.swarm_loop.loop.call_soon_threadsafe(process.kill)


@pytest.mark.slow
def test_host_killed_mid_stream_does_not_change_the_text(stack: Stack) -> None:
    messages = conversation("Tell me about the history of the printing press.")
    max_tokens = 40
    expected = stack.greedy_reference(messages, max_tokens)
    idle = host_cache_left(stack)
    spans_by_peer = {r.peer_id: (r.start_block, r.end_block) for r in stack.engine.swarm.records()}
    body = chat_body(messages, max_tokens, stream=True)
    with (
        httpx.Client(base_url=stack.base_url, timeout=120) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        received = _read_until_content(lines, 4)
        during = host_cache_left(stack)
        busy = [peer for peer in idle if during.get(peer, idle[peer]) < idle[peer]]
        assert busy, "no host holds the stream's session"
        # Kill one host the stream runs through; the others still cover its blocks.
        victim = SPANS.index(spans_by_peer[busy[0]])
        _kill_host(stack, victim)
        received.extend(lines)
    killed = stack.swarm.host_processes[victim]
    assert stack.swarm_loop.run(killed.wait(), timeout_s=10) < 0  # it did die, by signal
    chunks, done = parse_stream(received)
    assert check_chat_stream(chunks, done, usage=False) == expected


@pytest.mark.slow
def test_health_says_503_when_blocks_are_uncovered(stack: Stack) -> None:
    assert httpx.get(f"{stack.base_url}/health").status_code == 200
    # Stop every host still running: they announce OFFLINE; a killed one's record expires.
    for process in stack.swarm.host_processes:
        if process.returncode is None:
            stack.swarm_loop.loop.call_soon_threadsafe(process.terminate)
    for process in stack.swarm.host_processes:
        stack.swarm_loop.run(process.wait(), timeout_s=30)
    # Whether the API still believes the old records or has seen the hosts leave, a
    # request now is refused as unavailable (503), not failed as a server error (500).
    chat_url = f"{stack.base_url}/v1/chat/completions"
    refused = httpx.post(chat_url, json=chat_body(conversation("hi"), 4), timeout=60)
    assert refused.status_code == 503, refused.text
    _assert_openai_error_shape(refused)
    assert refused.headers["retry-after"] == str(RETRY_AFTER_S)

    def unavailable() -> bool:
        return httpx.get(f"{stack.base_url}/health").status_code == 503

    _wait_until(unavailable, 90, "/health to say 503")
    health = httpx.get(f"{stack.base_url}/health")
    assert health.headers["retry-after"] == str(RETRY_AFTER_S)
    response = httpx.post(
        f"{stack.base_url}/v1/chat/completions", json=chat_body(conversation("hi"), 4), timeout=30
    )
    assert response.status_code == 503 and response.headers["retry-after"] == str(RETRY_AFTER_S)
    _assert_openai_error_shape(response)


def _assert_openai_error_shape(response: httpx.Response) -> None:
    error = response.json()["error"]
    assert isinstance(error["message"], str) and {"type", "param", "code"} <= set(error)
