"""Tool calling for chat completions: validated tools, their grammar, prompt and parser.

A tool call is written by the model as one block of text, whatever chat template
described the tools to it:

    <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>

1. `parse_tools` checks `tools`, `tool_choice` and `parallel_tool_calls` (a 400 naming
   the field for anything wrong) into a `ToolPlan`.
2. `grammar` writes the llguidance Lark grammar that holds a choice to that syntax:
   under `auto` the text is free until the model writes `<tool_call>` (a lazy lexeme
   is the trigger), then the call is constrained; under `required` or a named function
   the answer is calls from its first token. Each call's JSON is `{"name", "arguments"}`
   with the name one of the tools (or the named one) and the arguments valid against
   that tool's `parameters`; with `parallel_tool_calls` false there is one call at most.
   JSON separators are fixed (`", "`, `": "`), so a small model cannot loop on spaces;
   object schemas that list `properties` get `additionalProperties: false` unless they
   say otherwise (`closed`); a tool with `strict: true` is compiled to the letter (a
   keyword llguidance cannot enforce is a 400), others leniently (such keywords left out).
3. `system_section` is the generic prompt format for chat templates that do not render
   tools themselves; `call_text` and `response_text` show earlier calls and their
   results to such a template (`past_calls` checks them); `native_template` says which
   path a tokenizer takes.
4. `ToolCallParser` splits one choice's streamed text into content and `ToolCallDelta`s:
   a call's id and name as soon as its name is complete, then its arguments in
   fragments; the markup never reaches the content.

This module knows nothing about decoding, HTTP or the engine.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from stamen.api import schemas as s
from stamen.api.errors import invalid_request, unsupported

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
MAX_TOOLS = 128  # OpenAI's limit
# The tools' JSON, all together: their grammar is compiled per request, in time that
# grows with the schemas; 128 large tools come to about 100 KB.
MAX_TOOLS_BYTES = 256 * 1024
_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")
# Compact, fixed separators: a constrained small model otherwise may emit whitespace forever.
_JSON_STYLE: dict[str, Any] = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
}


@dataclass
class ToolCallDelta:
    """A piece of one tool call of a choice: `id` and `name` come on the call's first
    delta, then `arguments` arrives in fragments of its JSON text."""

    index: int  # the call's place in the choice's `tool_calls`
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(frozen=True)
class FunctionTool:
    name: str
    description: str
    parameters: dict[str, Any]
    strict: bool = False

    def as_openai(self) -> dict[str, Any]:
        """The tool as OpenAI spells it (what chat templates that know tools expect)."""
        function = {"name": self.name, "description": self.description}
        return {"type": "function", "function": {**function, "parameters": self.parameters}}


Mode = Literal["none", "auto", "required"]
_MODES: dict[str, Mode] = {"none": "none", "auto": "auto", "required": "required"}


@dataclass(frozen=True)
class ToolPlan:
    """What a request asks of its tools: `mode` none (never call), auto (the model
    decides) or required (call from the first token); `forced` names the one function
    to call; `parallel` allows more than one call per choice."""

    tools: tuple[FunctionTool, ...]
    mode: Mode
    forced: str | None = None
    parallel: bool = True

    @property
    def calls_tools(self) -> bool:
        return self.mode != "none"

    def callable_tools(self) -> tuple[FunctionTool, ...]:
        return tuple(t for t in self.tools if self.forced in (None, t.name))


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


# -- 1. validation -------------------------------------------------------------------------


def _function_tool(raw: Any, param: str) -> FunctionTool:
    if not isinstance(raw, dict):
        raise invalid_request(f"Invalid '{param}': expected an object.", param=param)
    kind = raw.get("type")
    if kind == "custom":
        raise unsupported(f"{param}.type", "Tools of type 'custom'")
    if kind != "function":
        raise invalid_request(
            f"Invalid value for '{param}.type': {kind!r}; supported values are: 'function'.",
            param=f"{param}.type",
        )
    function = raw.get("function")
    if not isinstance(function, dict):
        raise invalid_request(
            f"Missing required parameter: '{param}.function'.", param=f"{param}.function"
        )
    name = function.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise invalid_request(
            f"Invalid '{param}.function.name': {name!r} does not match '^[a-zA-Z0-9_-]{{1,64}}$'.",
            param=f"{param}.function.name",
        )
    description = function.get("description", "")
    if not isinstance(description, str):
        raise invalid_request(
            f"Invalid '{param}.function.description': expected a string.",
            param=f"{param}.function.description",
        )
    strict = function.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid_request(
            f"Invalid '{param}.function.strict': expected a boolean.",
            param=f"{param}.function.strict",
        )
    return FunctionTool(name, description, _parameters(function, param), bool(strict))


def _parameters(function: dict[str, Any], param: str) -> dict[str, Any]:
    """The arguments' JSON schema (an object schema); its meaning is checked by compiling."""
    parameters = function.get("parameters")
    if parameters is None:
        return {"type": "object", "properties": {}}
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise invalid_request(
            f"Invalid schema for function '{function['name']}': '{param}.function.parameters' "
            "must be a JSON Schema of 'type: \"object\"'.",
            param=f"{param}.function.parameters",
        )
    return parameters


def _tool_choice(choice: str | dict[str, Any] | None, names: set[str]) -> tuple[Mode, str | None]:
    if choice is None:
        return ("auto" if names else "none"), None
    if isinstance(choice, str):
        if choice not in _MODES:
            raise invalid_request(
                f"Invalid value for 'tool_choice': {choice!r}; supported values are: 'none', "
                "'auto', 'required' or a named function.",
                param="tool_choice",
            )
        if choice == "required" and not names:
            raise invalid_request(
                "Invalid value for 'tool_choice': 'required' is only allowed when 'tools' "
                "are specified.",
                param="tool_choice",
            )
        return _MODES[choice], None
    if choice.get("type") != "function":
        raise unsupported("tool_choice", f"`tool_choice` of type {choice.get('type')!r}")
    function = choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or name not in names:
        raise invalid_request(
            f"Invalid value for 'tool_choice': no function named {name!r} is in 'tools'.",
            param="tool_choice.function.name",
        )
    return "required", name


def parse_tools(request: s.ChatCompletionRequest) -> ToolPlan | None:
    """The request's tools and how they may be called; None when it has none."""
    if request.tools is not None and not request.tools:
        raise invalid_request("Invalid 'tools': empty array; omit it instead.", param="tools")
    raw = request.tools or []
    if len(raw) > MAX_TOOLS:
        raise invalid_request(
            f"Invalid 'tools': at most {MAX_TOOLS} tools are allowed.", param="tools"
        )
    if raw and len(json.dumps(raw)) > MAX_TOOLS_BYTES:
        raise invalid_request(
            f"Invalid 'tools': the tools' definitions exceed {MAX_TOOLS_BYTES} bytes of JSON.",
            param="tools",
        )
    tools = tuple(_function_tool(tool, f"tools[{index}]") for index, tool in enumerate(raw))
    names = {tool.name for tool in tools}
    if len(names) < len(tools):
        raise invalid_request("Invalid 'tools': function names must be unique.", param="tools")
    mode, forced = _tool_choice(request.tool_choice, names)
    if not tools:
        return None
    parallel = True if request.parallel_tool_calls is None else request.parallel_tool_calls
    return ToolPlan(tools, mode, forced, parallel)


# -- 2. the grammar ------------------------------------------------------------------------


def closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` wherever an object schema lists its
    `properties` and says nothing of others (nested properties and items included).

    JSON Schema allows unlisted properties by default; a small model given that freedom
    invents arguments no function takes. OpenAI's strict mode asks the same of schemas.
    """
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if isinstance(out.get("properties"), dict):
        out["properties"] = {key: closed(value) for key, value in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    if isinstance(out.get("items"), dict):
        out["items"] = closed(out["items"])
    return out


def _style(lenient: bool) -> dict[str, Any]:
    # `lenient`: keywords llguidance cannot enforce are left out instead of refused.
    return {**_JSON_STYLE, "lenient": lenient}


def _call_schema(tool: FunctionTool) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, "arguments": closed(tool.parameters)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": _style(not tool.strict),
    }


def body_grammar(tools: Sequence[FunctionTool]) -> str:
    """The `%json` rule of one call's body: any of `tools` with its own arguments.

    Strictness is one option of the whole schema: lenient unless every tool is strict
    (a strict tool's schema is also compiled alone, where it is held to the letter)."""
    schemas = [_call_schema(tool) for tool in tools]
    lenient = not all(tool.strict for tool in tools)
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas, "x-guidance": _style(lenient)}
    return f"body: %json {json.dumps(schema)}\n"


def grammar(plan: ToolPlan) -> str:
    """The llguidance Lark grammar of a choice's whole answer under `plan` (see module doc)."""
    call = "OPEN NL? body NL? CLOSE"
    # Calls follow each other with nothing between: offered a newline, a small model
    # keeps calling the same function again instead of ending its answer.
    calls = f"{call} ({call})*" if plan.parallel else call
    if plan.mode == "auto":
        # `trigger` is lazy: it ends at the first `<tool_call>`, where the call begins.
        first = calls.removeprefix("OPEN ")
        start = f"start: TEXT | trigger {first}\ntrigger[lazy]: TEXT OPEN\n"
    else:
        start = f"start: {calls}\n"
    return (
        "%llguidance {}\n"
        + start
        + body_grammar(plan.callable_tools())
        + "TEXT: /(.|\\n)*/\n"
        + f"OPEN: {json.dumps(CALL_OPEN)}\n"
        + f"CLOSE: {json.dumps(CALL_CLOSE)}\n"
        + 'NL: "\\n"\n'
    )


def parameters_grammar(tool: FunctionTool) -> str:
    """A grammar of one tool's call alone: compiled to find the tool a bad schema is in."""
    return "%llguidance {}\nstart: body\n" + body_grammar([tool])


# -- 3. prompts ----------------------------------------------------------------------------


def native_template(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template renders `tools` itself and in our call
    syntax (Hermes-style `<tool_call>` blocks, as Qwen2.5 and Hermes templates do); a
    template with another syntax would teach the model calls the grammar refuses."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    return isinstance(template, str) and "tools" in template and CALL_OPEN in template


def system_section(plan: ToolPlan) -> str:
    """The generic tool prompt: appended to the system message of a template without tools."""
    lines = [json.dumps(tool.as_openai()["function"]) for tool in plan.tools]
    rule = "Call one function at most." if not plan.parallel else "You may call several."
    if plan.forced is not None:
        rule = f"You must call the function {plan.forced!r}, once."
    elif plan.mode == "required":
        rule = "You must call at least one function." if plan.parallel else "Call one function."
    return (
        "# Tools\n\nYou can call these functions:\n<tools>\n"
        + "\n".join(lines)
        + "\n</tools>\n\nTo call a function, answer with one block like this per call:\n"
        + f'{CALL_OPEN}{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}'
        + f"{CALL_CLOSE}\n{rule} A function's result comes back to you in the next message."
    )


def arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments  # shown to the model as it was sent


def call_text(name: str, arguments: str) -> str:
    body = json.dumps({"name": name, "arguments": arguments_value(arguments)})
    return f"{CALL_OPEN}{body}{CALL_CLOSE}"


def response_text(name: str, content: str) -> str:
    """A tool's result as a user turn. Plain words: shown markup, a small model copies
    the markup instead of answering."""
    return f"The function {name} returned: {content}"


@dataclass(frozen=True)
class PastCall:
    """One tool call of an earlier assistant message, as the request sent it."""

    id: str
    name: str
    arguments: str


def past_calls(raw: Sequence[Any], param: str) -> list[PastCall]:
    """The `tool_calls` of an assistant message, checked (a 400 naming the bad field)."""
    calls = []
    for index, call in enumerate(raw):
        where = f"{param}[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("type", "function") != "function":
            raise invalid_request(f"Invalid '{where}': expected a function call.", param=where)
        if not isinstance(call.get("id"), str) or not isinstance(function, dict):
            raise invalid_request(
                f"Invalid '{where}': a tool call needs an 'id' and a 'function'.", param=where
            )
        name, arguments = function.get("name"), function.get("arguments")
        if not isinstance(name, str) or not isinstance(arguments, str):
            raise invalid_request(
                f"Invalid '{where}.function': 'name' and 'arguments' must be strings.",
                param=f"{where}.function",
            )
        calls.append(PastCall(call["id"], name, arguments))
    return calls


# -- 4. parsing the model's text -----------------------------------------------------------

# The head ends where the arguments' value starts (a space may still come before it).
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_TAIL = re.compile(r"\s*\}\s*" + re.escape(CALL_CLOSE))
_MAX_HEAD_CHARS = 512  # a call's head longer than this is not a call (unconstrained text)


@dataclass
class Parsed:
    text: str = ""
    calls: list[ToolCallDelta] = field(default_factory=list)

    def add_call(self, delta: ToolCallDelta) -> None:
        # One entry per call in a delta: a fragment joins the call's entry before it
        # (the id-bearing one included), as OpenAI's stream sends one entry per index.
        last = self.calls[-1] if self.calls else None
        if last is not None and last.index == delta.index and delta.id is None:
            last.arguments += delta.arguments
        else:
            self.calls.append(delta)


class ToolCallParser:
    """Content and tool calls of one choice from its text, fed in any pieces.

    States: "text" (content, holding back what may be the start of `<tool_call>`),
    "head" (inside a call, before its name is complete), "arguments" (the arguments'
    JSON, passed on as it comes, its end found by bracket depth outside strings) and
    "tail" (`}` and `</tool_call>`). Whitespace between and after calls is dropped.
    Work per character is O(1)."""

    def __init__(self) -> None:
        self.calls = 0
        self._trim = False  # a call just ended: whitespace until the next text is dropped
        self._state = "text"
        self._buffer = ""
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> Parsed:
        out = Parsed()
        self._buffer += text
        while self._step(out):
            pass
        return out

    @property
    def in_call(self) -> bool:
        """Whether the text so far ends inside a call (opened, not yet closed)."""
        return self._state != "text"

    def close(self) -> Parsed:
        """At the end of the choice: release held-back text; an unfinished call ends as
        it stands (its name known: its arguments as far as they came).

        A held `<tool_call` prefix or a call cut before its name is complete is dropped,
        never released as content: with tools on, calls are written under the grammar,
        so such text is the opening of a call that `max_tokens` cut, not prose."""
        out = Parsed()
        held = self._buffer.strip()
        if self._state == "text" and not (held and CALL_OPEN.startswith(held)):
            out.text = self._content(self._buffer)
        self._buffer = ""
        return out

    def _content(self, text: str) -> str:
        if self._trim:
            text = text.lstrip()
            self._trim = not text
        return text

    def _step(self, out: Parsed) -> bool:
        """Advance one state if the buffer allows; whether it did."""
        if self._state == "text":
            return self._step_text(out)
        if self._state == "head":
            return self._step_head(out)
        if self._state == "arguments":
            return self._step_arguments(out)
        return self._step_tail()

    def _step_text(self, out: Parsed) -> bool:
        found = self._buffer.find(CALL_OPEN)
        if found >= 0:
            out.text += self._content(self._buffer[:found])
            self._buffer, self._state = self._buffer[found + len(CALL_OPEN) :], "head"
            return True
        if self._trim and not self._buffer.strip():
            return False  # whitespace after a call: held, dropped unless text follows
        ready = self._buffer[: len(self._buffer) - _partial_suffix(self._buffer, CALL_OPEN)]
        out.text += self._content(ready)
        self._buffer = self._buffer[len(ready) :]
        return False

    def _step_head(self, out: Parsed) -> bool:
        match = _HEAD.match(self._buffer)
        if match is None:
            if len(self._buffer) > _MAX_HEAD_CHARS:  # not a call after all: content
                out.text += CALL_OPEN + self._buffer[:1]
                self._buffer, self._state = self._buffer[1:], "text"
                return True
            return False
        try:
            name = json.loads(f'"{match.group(1)}"')
        except ValueError:  # a bad escape (only unconstrained text can have one)
            name = match.group(1)
        out.add_call(ToolCallDelta(self.calls, id=new_call_id(), name=name))
        self.calls += 1
        self._buffer, self._state = self._buffer[match.end() :], "arguments"
        self._depth, self._in_string, self._escaped = 0, False, False
        return True

    def _step_arguments(self, out: Parsed) -> bool:
        end = self._value_end(self._buffer)
        piece = self._buffer if end is None else self._buffer[:end]
        if piece:
            out.add_call(ToolCallDelta(self.calls - 1, arguments=piece))
        if end is None:
            self._buffer = ""
            return False
        self._buffer, self._state = self._buffer[end:], "tail"
        return True

    def _value_end(self, text: str) -> int | None:
        """Where the arguments' JSON value ends in `text` (None: not yet), carrying the
        scan's state over pieces."""
        for position, char in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return position + 1
        return None

    def _step_tail(self) -> bool:
        match = _TAIL.match(self._buffer)
        if match is None:
            return False
        self._buffer, self._state, self._trim = self._buffer[match.end() :], "text", True
        return True


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0
