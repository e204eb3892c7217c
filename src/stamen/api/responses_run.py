"""One response generated: `serving.ChoiceDelta`s turned into output items and the typed
stream events of the Responses API.

`ResponseRun.events()` is the one path for streamed and whole responses alike (a whole
response reads the events and keeps the last snapshot). It yields, each with its
`sequence_number`:

    response.created, response.in_progress
    per message:   output_item.added, content_part.added, output_text.delta...,
                   output_text.done, content_part.done, output_item.done
    per function call: output_item.added, function_call_arguments.delta...,
                   function_call_arguments.done, output_item.done
    response.completed  (response.incomplete when max_output_tokens ended it)

An item opens when its first text or call fragment arrives; a message closes when a call
follows it, every other item when generation ends. A response that produced nothing still has one (empty) message, so
`output_text` is "" rather than absent. Before the final event the finished response is
handed to `save` (the store, unless `store: false`), so a client that retrieves it on
`response.completed` finds it. `streamed_events` ends a stream whose generation failed
with `response.failed` (the response with its `error`) instead of raising.

This module knows nothing about HTTP or SQLite.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec

from stamen.api.engine import EngineClient, EngineUnavailable
from stamen.api.metrics import ApiMetrics
from stamen.api.responses_schemas import (
    FunctionCallItem,
    IncompleteDetails,
    Item,
    MessageItem,
    OutputTextPart,
    ResponseErrorInfo,
    ResponseObject,
    ResponsesUsage,
)
from stamen.api.responses_translate import new_item_id
from stamen.api.serving import ChoiceDelta, Job, ToolCallDelta, generate

logger = logging.getLogger(__name__)

Save = Callable[[ResponseObject], Awaitable[None]]
Event = dict[str, Any]


class ResponseRun:
    """The state of one response while its job runs (see the module docstring)."""

    def __init__(
        self,
        engine: EngineClient,
        job: Job,
        response: ResponseObject,
        *,
        save: Save | None,
        metrics: ApiMetrics | None,
    ) -> None:
        self.engine, self.job, self.response = engine, job, response
        self._save, self._metrics = save, metrics
        self._sequence = 0
        self._message: MessageItem | None = None
        self._calls: dict[int, FunctionCallItem] = {}  # by the call's index in the choice
        self._closed = 0  # items of `response.output` before this one are closed

    def _event(self, kind: str, **fields: Any) -> Event:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _snapshot(self, kind: str) -> Event:
        return self._event(kind, response=msgspec.to_builtins(self.response))

    def _output_index(self, item: Item) -> int:
        return next(i for i, out in enumerate(self.response.output) if out is item)

    # -- opening items -------------------------------------------------------------------

    def _open_message(self) -> list[Event]:
        message = MessageItem(new_item_id("msg"), "assistant", [], "in_progress")
        self.response.output.append(message)
        self._message = message
        index = len(self.response.output) - 1
        empty = msgspec.to_builtins(MessageItem(message.id, "assistant", [], "in_progress"))
        part = msgspec.to_builtins(OutputTextPart(""))
        message.content.append(OutputTextPart(""))
        return [
            self._event("response.output_item.added", output_index=index, item=empty),
            self._event("response.content_part.added", item_id=message.id,
                        output_index=index, content_index=0, part=part),
        ]  # fmt: skip

    def _text(self, text: str) -> list[Event]:
        events = [] if self._message is not None else self._open_message()
        assert self._message is not None
        part = self._message.content[0]
        assert isinstance(part, OutputTextPart)
        part.text += text
        events.append(
            self._event("response.output_text.delta", item_id=self._message.id,
                        output_index=self._output_index(self._message), content_index=0,
                        delta=text, logprobs=[])
        )  # fmt: skip
        return events

    def _call(self, delta: ToolCallDelta) -> list[Event]:
        events = []
        call = self._calls.get(delta.index)
        if call is None:
            events += self._close_open_message()
            call_id = delta.id or new_item_id("call")
            call = FunctionCallItem(new_item_id("fc"), call_id, delta.name or "", "", "in_progress")
            self._calls[delta.index] = call
            self.response.output.append(call)
            events.append(
                self._event("response.output_item.added", output_index=len(self.response.output) - 1,
                            item=msgspec.to_builtins(call))
            )  # fmt: skip
        if delta.arguments:
            call.arguments += delta.arguments
            events.append(
                self._event("response.function_call_arguments.delta", item_id=call.id,
                            output_index=self._output_index(call), delta=delta.arguments)
            )  # fmt: skip
        return events

    def _delta(self, delta: ChoiceDelta) -> list[Event]:
        events = self._text(delta.text) if delta.text else []
        for call in delta.tool_calls:
            events += self._call(call)
        return events

    # -- closing -------------------------------------------------------------------------

    def _close_open_message(self) -> list[Event]:
        """A message followed by a call is done: its events end before the call's begin."""
        if self._message is None:
            return []
        self._message = None
        return self._close("completed")

    def _close(self, status: str) -> list[Event]:
        """Close every item not closed yet, in output order."""
        if not self.response.output:
            self._open_message()
        events = []
        for index in range(self._closed, len(self.response.output)):
            events += self._close_item(index, status)
        self._closed = len(self.response.output)
        return events

    def _close_item(self, index: int, status: str) -> list[Event]:
        item = self.response.output[index]
        item.status = "incomplete" if status == "incomplete" else "completed"
        events = []
        if isinstance(item, MessageItem):
            part = msgspec.to_builtins(item.content[0])
            events += [
                self._event("response.output_text.done", item_id=item.id, output_index=index,
                            content_index=0, text=part["text"], logprobs=[]),
                self._event("response.content_part.done", item_id=item.id, output_index=index,
                            content_index=0, part=part),
            ]  # fmt: skip
        elif isinstance(item, FunctionCallItem):
            events.append(
                self._event("response.function_call_arguments.done", item_id=item.id,
                            output_index=index, arguments=item.arguments)
            )  # fmt: skip
        events.append(
            self._event("response.output_item.done", output_index=index,
                        item=msgspec.to_builtins(item))
        )  # fmt: skip
        return events

    def _finish(self, finish_reason: str, completion_tokens: int) -> None:
        prompt_tokens = len(self.job.prompt_ids)
        if self._metrics is not None:
            self._metrics.observe_usage(prompt_tokens, completion_tokens)
        incomplete = finish_reason == "length"
        self.response.status = "incomplete" if incomplete else "completed"
        if incomplete:
            self.response.incomplete_details = IncompleteDetails("max_output_tokens")
        else:
            self.response.completed_at = int(time.time())
        self.response.usage = ResponsesUsage(
            prompt_tokens, completion_tokens, prompt_tokens + completion_tokens
        )

    async def events(self) -> AsyncIterator[Event]:
        """The whole event sequence; a failure of the generation is raised."""
        yield self._snapshot("response.created")
        yield self._snapshot("response.in_progress")
        finish_reason, completion_tokens = "length", 0
        async for delta in generate(self.engine, self.job, self._metrics):
            for event in self._delta(delta):
                yield event
            if delta.finish_reason is not None:
                finish_reason, completion_tokens = delta.finish_reason, delta.completion_tokens
        self._finish(finish_reason, completion_tokens)
        for event in self._close(self.response.status):
            yield event
        if self._save is not None:
            await self._save(self.response)
        yield self._snapshot(f"response.{self.response.status}")

    async def whole(self) -> ResponseObject:
        async for _ in self.events():
            pass
        return self.response

    async def streamed_events(self) -> AsyncIterator[Event]:
        """`events()`, ending with `response.failed` if the generation fails."""
        try:
            async for event in self.events():
                yield event
        except EngineUnavailable as error:
            logger.warning("response %s failed: %s", self.response.id, error)
            yield await self._failed(f"The swarm cannot serve this model right now: {error}")
        except Exception as error:
            logger.exception("response %s failed", self.response.id)
            yield await self._failed(f"The generation failed: {error}")

    async def _failed(self, message: str) -> Event:
        self.response.status = "failed"
        self.response.error = ResponseErrorInfo("server_error", message)
        for item in self.response.output:
            item.status = "incomplete"
        if self._save is not None:
            try:
                await self._save(self.response)
            except Exception:
                logger.exception("could not store the failed response %s", self.response.id)
        return self._snapshot("response.failed")
