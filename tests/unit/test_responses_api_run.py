"""The order of a response's stream events as its items open and close (no model: the
choice's deltas are given to the run as generation would yield them)."""

from __future__ import annotations

from typing import Any

from stamen.api.responses_run import ResponseRun
from stamen.api.responses_schemas import ResponseObject, TextConfig
from stamen.api.serving import ChoiceDelta, ToolCallDelta


def run() -> ResponseRun:
    response = ResponseObject(
        id="resp_1", created_at=1, model="m", status="in_progress", output=[],
        parallel_tool_calls=True, tool_choice="auto", tools=[],
        text=TextConfig(format={"type": "text"}), store=False,
    )  # fmt: skip
    return ResponseRun(None, None, response, save=None, metrics=None)  # type: ignore[arg-type]


def test_a_message_closes_before_the_call_that_follows_it_opens() -> None:
    events: list[dict[str, Any]] = []
    current = run()
    events += current._delta(ChoiceDelta(0, text="Let me look."))
    events += current._delta(ChoiceDelta(0, text=" Now."))
    call = ToolCallDelta(0, id="call_1", name="f", arguments='{"q": ')
    events += current._delta(ChoiceDelta(0, tool_calls=[call]))
    events += current._delta(ChoiceDelta(0, tool_calls=[ToolCallDelta(0, arguments="1}")]))
    events += current._close("completed")
    kinds = [(e["type"].removeprefix("response."), e.get("output_index")) for e in events]
    assert kinds == [
        ("output_item.added", 0), ("content_part.added", 0), ("output_text.delta", 0),
        ("output_text.delta", 0), ("output_text.done", 0), ("content_part.done", 0),
        ("output_item.done", 0), ("output_item.added", 1),
        ("function_call_arguments.delta", 1), ("function_call_arguments.delta", 1),
        ("function_call_arguments.done", 1), ("output_item.done", 1),
    ]  # fmt: skip
    done = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert done[0]["content"][0]["text"] == "Let me look. Now." and done[0]["status"] == "completed"
    assert done[1]["arguments"] == '{"q": 1}'
    assert [e["sequence_number"] for e in events] == sorted(e["sequence_number"] for e in events)
