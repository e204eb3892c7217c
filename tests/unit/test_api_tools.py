"""Tool calling without a model: the request checks, the incremental parser, the grammar
(driven token by token through llguidance with a small byte tokenizer)."""

from __future__ import annotations

import json
from typing import Any

import llguidance
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stamen.api import schemas as s
from stamen.api import serving, tools
from stamen.api.errors import APIError
from stamen.api.tools import ToolCallParser, ToolPlan

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


def request(**fields: Any) -> s.ChatCompletionRequest:
    return s.ChatCompletionRequest(messages=[s.UserMessage("hi")], model="m", **fields)


def test_tools_larger_than_the_limit_are_refused() -> None:
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(400)}}
    many = [
        {"type": "function", "function": {"name": f"f{n}", "parameters": big}} for n in range(128)
    ]
    assert len(json.dumps(many)) > tools.MAX_TOOLS_BYTES
    assert refused(tools=many).param == "tools"
    assert tools.parse_tools(request(tools=many[:10])) is not None


def refused(**fields: Any) -> APIError:
    with pytest.raises(APIError) as caught:
        tools.parse_tools(request(**fields))
    assert caught.value.status_code == 400
    return caught.value


# -- validation ----------------------------------------------------------------------------


def test_tool_choice_forms_become_plans() -> None:
    auto = tools.parse_tools(request(tools=[WEATHER, CLOCK]))
    assert auto is not None and (auto.mode, auto.forced, auto.parallel) == ("auto", None, True)
    named = tools.parse_tools(
        request(
            tools=[WEATHER, CLOCK],
            tool_choice={"type": "function", "function": {"name": "get_time"}},
            parallel_tool_calls=False,
        )
    )
    assert named is not None and (named.mode, named.forced, named.parallel) == (
        "required",
        "get_time",
        False,
    )
    assert [t.name for t in named.callable_tools()] == ["get_time"]
    assert tools.parse_tools(request(tool_choice="none")) is None
    assert tools.parse_tools(request(tools=[CLOCK]))  # parameters given as a bare object


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
        ({"tools": [WEATHER, {"type": "custom", "custom": {}}]}, "tools[1].type"),
        ({"tools": [{"type": "function"}]}, "tools[0].function"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
        (
            {"tools": [{"type": "function", "function": {"name": "x" * 65}}]},
            "tools[0].function.name",
        ),  # fmt: skip
        (
            {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
            "tools[0].function.parameters",
        ),  # fmt: skip
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {"name": "f", "parameters": {"type": "string"}},
                    }
                ]
            },
            "tools[0].function.parameters",
        ),  # fmt: skip
        (
            {"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]},
            "tools[0].function.strict",
        ),  # fmt: skip
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": []}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),  # fmt: skip
    ],
)
def test_bad_tools_are_400_naming_the_field(fields: dict[str, Any], param: str) -> None:
    assert refused(**fields).param == param


# -- the parser ----------------------------------------------------------------------------

TWO_CALLS = (
    "Let me look.<tool_call>"
    '{"name": "get_weather", "arguments": {"city": "Paris \\"{}\\"", "unit": "c"}}'
    '</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n'
)


def parse(pieces: list[str]) -> tuple[str, list[dict[str, str]], list[Any]]:
    """Content, calls (as OpenAI's assembled message has them) and every delta made."""
    parser = ToolCallParser()
    results = [parser.feed(piece) for piece in pieces] + [parser.close()]
    calls: list[dict[str, str]] = []
    deltas = [delta for result in results for delta in result.calls]
    for result in results:  # one entry per call in a delta (OpenAI's chunk shape)
        indexes = [delta.index for delta in result.calls]
        assert len(indexes) == len(set(indexes))
    for delta in deltas:
        if delta.id is not None:
            assert delta.index == len(calls)
            calls.append({"id": delta.id, "name": delta.name or "", "arguments": ""})
        calls[delta.index]["arguments"] += delta.arguments
    return "".join(r.text for r in results), calls, deltas


def test_parser_splits_content_and_calls() -> None:
    content, calls, _ = parse([TWO_CALLS])
    assert content == "Let me look."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": 'Paris "{}"', "unit": "c"}),
        ("get_time", {}),
    ]
    assert all(c["id"].startswith("call_") for c in calls) and calls[0]["id"] != calls[1]["id"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, len(TWO_CALLS)), max_size=12))
def test_parser_gives_the_same_answer_however_the_text_is_cut(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(TWO_CALLS)]
    pieces = [TWO_CALLS[a:b] for a, b in zip(points, points[1:], strict=False)]
    content, calls, deltas = parse(pieces)
    assert content == "Let me look."
    assert [(c["name"], c["arguments"]) for c in calls] == [
        ("get_weather", '{"city": "Paris \\"{}\\"", "unit": "c"}'),
        ("get_time", "{}"),
    ]
    # Never markup in an argument fragment, and a call's name comes whole.
    assert not any("tool_call" in d.arguments for d in deltas)


def test_parser_streams_arguments_before_the_call_ends() -> None:
    parser = ToolCallParser()
    assert parser.feed("<tool_").text == ""  # held: may be the start of a call
    head = parser.feed('call>{"name": "f", "arguments": {"q": "ab')
    assert [(d.name, d.arguments) for d in head.calls] == [("f", '{"q": "ab')]
    assert parser.feed('c"}').calls[0].arguments == 'c"}'
    assert parser.feed("}</tool_call>").calls == []


def test_text_that_only_looks_like_markup_is_content() -> None:
    content, calls, _ = parse(["Use a <tool", "tip> or <b>", "bold</b>."])
    assert (content, calls) == ("Use a <tooltip> or <b>bold</b>.", [])


def test_a_call_cut_by_max_tokens_keeps_its_arguments_and_drops_its_markup() -> None:
    _, calls, _ = parse(['<tool_call>{"name": "f", "arguments": {"q": "ab'])
    assert [(c["name"], c["arguments"]) for c in calls] == [("f", '{"q": "ab')]
    # Cut before the name is whole, or inside `<tool_call>` itself: never content.
    assert parse(['Hi <tool_call>{"na']) == ("Hi ", [], [])
    assert parse(["<tool_call>", '{"name": "'])[:2] == ("", [])
    assert parse(["Hi ", "<tool", "_call"])[:2] == ("Hi ", [])


def test_the_first_fragment_of_a_call_rides_on_its_id_entry() -> None:
    parser = ToolCallParser()
    parsed = parser.feed('<tool_call>{"name": "f", "arguments": {"q": 1}}</tool_call>')
    assert [(d.index, d.name, d.arguments) for d in parsed.calls] == [(0, "f", '{"q": 1}')]
    assert parsed.calls[0].id is not None


def test_a_name_with_a_bad_escape_is_kept_as_written() -> None:
    _, calls, _ = parse(['<tool_call>{"name": "f\\q", "arguments": {}}</tool_call>'])
    assert [(c["name"], c["arguments"]) for c in calls] == [("f\\q", "{}")]


def test_text_after_calls_is_content_and_blank_lines_are_dropped() -> None:
    content, calls, _ = parse([TWO_CALLS, "\n  Done, see", " above."])
    assert content == "Let me look.Done, see above." and len(calls) == 2


# -- the grammar ---------------------------------------------------------------------------


class ByteTokens:
    """One token per byte plus an EOS (256): every text is spelled one way."""

    tokens = [bytes([b]) for b in range(256)] + [b"<eos>"]
    eos_token_id = 256
    bos_token_id = None
    special_token_ids = [256]

    def __call__(self, text: bytes) -> list[int]:
        return list(text)


_LL = llguidance.LLTokenizer(llguidance.TokenizerWrapper(ByteTokens()))


def accepts(plan: ToolPlan, text: str) -> bool:
    """Whether the grammar of `plan` allows `text` as a whole answer (then EOS)."""
    matcher = llguidance.LLMatcher(_LL, llguidance.LLMatcher.grammar_from_lark(tools.grammar(plan)))
    assert not matcher.is_error(), matcher.get_error()
    return matcher.consume_tokens(list(text.encode())) and matcher.consume_token(256)


def plan(mode: str = "auto", forced: str | None = None, parallel: bool = True) -> ToolPlan:
    request_tools = tools.parse_tools(request(tools=[WEATHER, CLOCK]))
    assert request_tools is not None
    return ToolPlan(request_tools.tools, mode, forced, parallel)  # type: ignore[arg-type]


CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
CLOCK_CALL = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'


def test_auto_leaves_text_free_and_constrains_from_the_trigger() -> None:
    assert accepts(plan(), "Any text { at all } <b>")
    assert accepts(plan(), "Let me see." + CALL + CLOCK_CALL)
    assert not accepts(plan(), '<tool_call>{"name": "get_wind", "arguments": {}}</tool_call>')
    assert not accepts(plan(), CALL.replace('"Paris"', "3"))  # arguments follow the schema
    assert not accepts(plan(), CALL + " and more text")


def test_required_calls_from_the_first_token() -> None:
    assert accepts(plan("required"), CALL)
    assert not accepts(plan("required"), "Sure. " + CALL)
    assert not accepts(plan("required"), "")


def test_parallel_false_allows_one_call_and_a_named_function_only_itself() -> None:
    assert accepts(plan("required"), CALL + CLOCK_CALL)
    assert not accepts(plan("required", parallel=False), CALL + CLOCK_CALL)
    assert accepts(plan("required", forced="get_time"), CLOCK_CALL)
    assert not accepts(plan("required", forced="get_time"), CALL)


def test_unlisted_arguments_are_refused() -> None:
    invented = CALL.replace('"Paris"}', '"Paris", "country": "FR"}')
    assert not accepts(plan("required"), invented)
    assert accepts(plan("required"), CALL.replace('"Paris"}', '"Paris", "unit": "f"}'))


def test_generic_prompt_lists_every_function_with_its_schema() -> None:
    section = tools.system_section(plan())
    for tool in (WEATHER, CLOCK):
        described = json.dumps({k: tool["function"].get(k, "") for k in ("name", "description")})
        assert described[:-1] in section
    assert json.dumps(WEATHER["function"]["parameters"]) in section
    assert "<tool_call>" in section and "</tool_call>" in section


# -- a choice's content and calls, as generation reports them -------------------------------


def run_row(pieces: list[str], stop: list[str]) -> tuple[str, str, str | None]:
    """Content, the calls' arguments and the finish reason of a choice whose tokens
    decode to `pieces` (the last one ending the choice with EOS, unless a stop came)."""
    row = serving._ToolRow(stop)
    content, arguments, finish = "", "", None
    for number, piece in enumerate(pieces):
        last = number == len(pieces) - 1
        delta = serving.ChoiceDelta(0, piece, finish_reason="stop" if last else None)
        serving._parse(row, delta)
        content += delta.text
        arguments += "".join(call.arguments for call in delta.tool_calls)
        if delta.finish_reason is not None:
            return content, arguments, delta.finish_reason
    return content, arguments, finish


def test_stop_sequences_end_the_content_but_never_cut_a_call() -> None:
    call = ['<tool_call>{"name": "f", "arguments": {"city": "Pa', 'ris"}}</tool_call>']
    assert run_row(call, stop=["Par"]) == ("", '{"city": "Paris"}', "tool_calls")
    assert run_row(["Hel", "lo wor", "ld", "!"], stop=["lo w"]) == ("Hel", "", "stop")
    assert run_row(["Hi", " there"], stop=["lo w"]) == ("Hi there", "", "stop")


def test_a_call_left_open_does_not_end_with_tool_calls() -> None:
    cut = ['<tool_call>{"name": "f", "arguments": {"city": "Pa']
    assert run_row(cut, stop=[]) == ("", '{"city": "Pa', "stop")
