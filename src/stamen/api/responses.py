"""OpenAI response objects and stream chunks, built from `serving.ChoiceDelta`s.

Non-streaming requests collect every delta into one `ChatCompletion` / `Completion`.
Streaming requests turn deltas into chunk dicts (encoded by `stamen.api.streaming`):
the first chunk of each chat choice carries the role, a finishing chunk carries the
finish reason, and with `stream_options.include_usage` every chunk has `usage: null`
and a last chunk with `choices: []` carries the usage. One id for the whole stream.

Tool calls: a message that called tools has `tool_calls` (content None when there was
no text, and then no `logprobs.content` either: logprobs cover content tokens only); in
a stream, a call's first entry has its index, id, type and name with empty arguments, later ones
its argument fragments, one entry per chunk (OpenAI's delta shape).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from stamen.api import schemas as s
from stamen.api.engine import EngineClient
from stamen.api.metrics import ApiMetrics
from stamen.api.serving import ChoiceDelta, Job, TokenLogprob, ToolCallDelta, generate


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


@dataclass
class _Choice:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = "length"
    completion_tokens: int = 0
    tool_calls: list[s.ToolCall] = field(default_factory=list)

    def add_call(self, delta: ToolCallDelta) -> None:
        if delta.id is not None:  # a call's first delta
            self.tool_calls.append(s.ToolCall(delta.id, s.FunctionCall(delta.name or "", "")))
        call = self.tool_calls[delta.index].function
        call.arguments += delta.arguments

    def message(self) -> s.ResponseMessage:
        """OpenAI's message: content None when the model only called tools."""
        if not self.tool_calls:
            return s.ResponseMessage(content=self.text)
        return s.ResponseMessage(content=self.text or None, tool_calls=self.tool_calls)


async def _run_all(
    engine: EngineClient, jobs: Sequence[Job], metrics: ApiMetrics | None
) -> AsyncIterator[ChoiceDelta]:
    for job in jobs:
        async for delta in generate(engine, job, metrics):
            yield delta


def _usage(jobs: Sequence[Job], completion_tokens: int) -> s.Usage:
    prompt_tokens = sum(len(job.prompt_ids) for job in jobs)
    return s.Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


async def _collect(
    engine: EngineClient, jobs: Sequence[Job], metrics: ApiMetrics | None
) -> tuple[list[_Choice], s.Usage]:
    choices = [_Choice() for job in jobs for _ in range(job.params.n)]
    async for delta in _run_all(engine, jobs, metrics):
        choice = choices[delta.index]
        choice.text += delta.text
        choice.logprobs.extend(delta.logprobs)
        for call in delta.tool_calls:
            choice.add_call(call)
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
            choice.completion_tokens = delta.completion_tokens
    usage = _usage(jobs, sum(c.completion_tokens for c in choices))
    if metrics is not None:
        metrics.observe_usage(usage.prompt_tokens, usage.completion_tokens)
    return choices, usage


def _chat_logprobs(entries: Sequence[TokenLogprob]) -> s.ChoiceLogprobs:
    def one(token: str, logprob: float) -> s.TopLogprob:
        return s.TopLogprob(token, logprob, list(token.encode()))

    return s.ChoiceLogprobs(
        content=[
            s.TokenLogprob(e.token, e.logprob, list(e.token.encode()), [one(*t) for t in e.top])
            for e in entries
        ]
    )


def _message_logprobs(choice: _Choice) -> s.ChoiceLogprobs:
    """A message's logprobs: of its content's tokens, null when it has no content."""
    if choice.tool_calls and not choice.text:
        return s.ChoiceLogprobs(content=None)
    return _chat_logprobs(choice.logprobs)


def _completion_logprobs(entries: Sequence[TokenLogprob], offset: int) -> s.CompletionLogprobs:
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return s.CompletionLogprobs(
        text_offset=offsets,
        token_logprobs=[e.logprob for e in entries],
        tokens=[e.token for e in entries],
        top_logprobs=[dict(e.top) for e in entries],
    )


async def chat_completion(
    engine: EngineClient, job: Job, metrics: ApiMetrics | None = None
) -> s.ChatCompletion:
    choices, usage = await _collect(engine, [job], metrics)
    return s.ChatCompletion(
        id=new_id("chatcmpl"),
        choices=[
            s.ChatChoice(
                finish_reason=c.finish_reason,
                index=i,
                logprobs=_message_logprobs(c) if job.params.logprobs else None,
                message=c.message(),
            )
            for i, c in enumerate(choices)
        ],
        created=int(time.time()),
        model=engine.model_id,
        system_fingerprint=engine.fingerprint,
        usage=usage,
    )


async def completion(
    engine: EngineClient, jobs: Sequence[Job], *, echo: bool, metrics: ApiMetrics | None = None
) -> s.Completion:
    choices, usage = await _collect(engine, jobs, metrics)
    out = []
    for job in jobs:
        prefix = engine.tokenizer.decode(job.prompt_ids) if echo else ""
        for row in range(job.params.n):
            index = job.first_index + row
            c = choices[index]
            logprobs = _completion_logprobs(c.logprobs, 0) if job.params.logprobs else None
            out.append(s.CompletionChoice(c.finish_reason, index, logprobs, prefix + c.text))
    return s.Completion(
        id=new_id("cmpl"),
        choices=out,
        created=int(time.time()),
        model=engine.model_id,
        system_fingerprint=engine.fingerprint,
        usage=usage,
    )


# -- streaming -----------------------------------------------------------------------------


class _ChunkMaker:
    def __init__(self, engine: EngineClient, prefix: str, object_name: str, usage: bool) -> None:
        self.base = {
            "id": new_id(prefix),
            "object": object_name,
            "created": int(time.time()),
            "model": engine.model_id,
            "system_fingerprint": engine.fingerprint,
        }
        self.usage = usage

    def __call__(self, choices: list[dict[str, Any]], usage: s.Usage | None = None) -> dict:
        chunk = {**self.base, "choices": choices}
        if self.usage:
            chunk["usage"] = None if usage is None else msgspec.to_builtins(usage)
        return chunk


def _call_entries(delta: ToolCallDelta) -> list[dict[str, Any]]:
    """OpenAI's stream shape of a tool call: id, type and name with empty arguments on
    the call's first entry, argument fragments on the next ones (each sent in a chunk of
    its own, so that no chunk holds two entries of one call)."""
    fragment = {"index": delta.index, "function": {"arguments": delta.arguments}}
    if delta.id is None:
        return [fragment]
    function = {"name": delta.name, "arguments": ""}
    head = {"index": delta.index, "id": delta.id, "type": "function", "function": function}
    return [head, fragment] if delta.arguments else [head]


async def chat_chunks(
    engine: EngineClient, job: Job, *, include_usage: bool, metrics: ApiMetrics | None = None
) -> AsyncIterator[dict]:
    make = _ChunkMaker(engine, "chatcmpl", "chat.completion.chunk", include_usage)
    for index in range(job.params.n):
        role = {"role": "assistant", "content": "", "refusal": None}
        yield make([{"index": index, "delta": role, "logprobs": None, "finish_reason": None}])
    completion_tokens = 0
    async for delta in generate(engine, job, metrics):
        logprobs = None
        if job.params.logprobs:
            logprobs = msgspec.to_builtins(_chat_logprobs(delta.logprobs))
        if delta.text or delta.logprobs:
            content = {"content": delta.text}
            yield make([{"index": delta.index, "delta": content, "logprobs": logprobs,
                         "finish_reason": None}])  # fmt: skip
        for entry in (e for call in delta.tool_calls for e in _call_entries(call)):
            yield make([{"index": delta.index, "delta": {"tool_calls": [entry]},
                         "logprobs": None, "finish_reason": None}])  # fmt: skip
        if delta.finish_reason is not None:
            completion_tokens += delta.completion_tokens
            yield make([{"index": delta.index, "delta": {}, "logprobs": None,
                         "finish_reason": delta.finish_reason}])  # fmt: skip
    usage = _usage([job], completion_tokens)
    if metrics is not None:
        metrics.observe_usage(usage.prompt_tokens, usage.completion_tokens)
    if include_usage:
        yield make([], usage)


async def completion_chunks(
    engine: EngineClient,
    jobs: Sequence[Job],
    *,
    echo: bool,
    include_usage: bool,
    metrics: ApiMetrics | None = None,
) -> AsyncIterator[dict]:
    make = _ChunkMaker(engine, "cmpl", "text_completion", include_usage)
    offsets: dict[int, int] = {}
    if echo:
        for job in jobs:
            prefix = engine.tokenizer.decode(job.prompt_ids)
            for row in range(job.params.n):
                index = job.first_index + row
                offsets[index] = len(prefix)
                yield make([{"text": prefix, "index": index, "logprobs": None,
                             "finish_reason": None}])  # fmt: skip
    completion_tokens = 0
    async for delta in _run_all(engine, jobs, metrics):
        logprobs = None
        if delta.logprobs:
            offset = offsets.get(delta.index, 0)
            logprobs = msgspec.to_builtins(_completion_logprobs(delta.logprobs, offset))
            offsets[delta.index] = offset + sum(len(e.token) for e in delta.logprobs)
        if delta.finish_reason is not None:
            completion_tokens += delta.completion_tokens
        yield make([{"text": delta.text, "index": delta.index, "logprobs": logprobs,
                     "finish_reason": delta.finish_reason}])  # fmt: skip
    usage = _usage(jobs, completion_tokens)
    if metrics is not None:
        metrics.observe_usage(usage.prompt_tokens, usage.completion_tokens)
    if include_usage:
        yield make([], usage)
