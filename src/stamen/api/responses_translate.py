"""A Responses API request as a chat completion request, and the conversation it continues.

1. `refuse_unsupported` answers 400 for every request field this server does not honour
   (background, include, conversation, reasoning, prompt, ...), naming it.
2. `input_items` checks the request's `input` (a string, or a list of items in their
   loose shapes) and turns it into stored `Item`s with ids.
3. `chat_request` builds the `schemas.ChatCompletionRequest` that the chat machinery
   runs: `instructions` as a system message, then the conversation (the items of every
   earlier response, then the new input), with the flat Responses `tools`,
   `tool_choice` and `text.format` in their chat shapes.
4. `in_responses_terms` renames the chat fields in an error from `serving.chat_job`
   (`messages`, `response_format`, ...) to the fields this request has.

This module knows nothing about HTTP, SQLite or decoding.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

from stamen.api import schemas as s
from stamen.api.errors import APIError, invalid_request, unsupported
from stamen.api.responses_schemas import (
    ContentPart,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputTextPart,
    Item,
    MessageItem,
    OutputTextPart,
    RefusalPart,
    ResponsesRequest,
)

MAX_INPUT_ITEMS = 4096
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's limits

# Fields refused whenever they are set (not None, not empty).
_NOT_HONOURED = (
    "background_options",
    "context_management",
    "conversation",
    "include",
    "image",
    "access_programs",
    "max_tool_calls",
    "moderation",
    "prompt",
    "prompt_cache_options",
    "prompt_cache_retention",
    "reasoning",
    "top_logprobs",
)
_TOOL_KEYS = {"type", "name", "description", "parameters", "strict"}


def new_item_id(prefix: str) -> str:
    """An id in the Responses API's style: `resp_...`, `msg_...`, `fc_...`."""
    return f"{prefix}_{secrets.token_hex(16)}"


# -- 1. refused fields ---------------------------------------------------------------------


def refuse_unsupported(body: ResponsesRequest) -> None:
    for name in _NOT_HONOURED:
        if getattr(body, name):
            raise unsupported(name)
    if body.background:
        raise unsupported("background", "Background responses (`background: true`)")
    if body.truncation not in (None, "disabled"):
        raise unsupported("truncation", "`truncation` other than 'disabled'")
    if body.service_tier not in (None, "auto", "default"):
        raise unsupported("service_tier", f"`service_tier` {body.service_tier!r}")
    for key, value in (body.stream_options or {}).items():
        if value:
            raise unsupported(f"stream_options.{key}")
    if body.text is not None and body.text.verbosity not in (None, "medium"):
        raise unsupported("text.verbosity", "`text.verbosity` other than 'medium'")
    _check_metadata(body.metadata)


def _check_metadata(metadata: dict[str, str] | None) -> None:
    if not metadata:
        return
    if len(metadata) > MAX_METADATA_PAIRS:
        raise invalid_request(
            f"Invalid 'metadata': at most {MAX_METADATA_PAIRS} pairs.", param="metadata"
        )
    for key, value in metadata.items():
        if len(key) > MAX_METADATA_KEY or len(value) > MAX_METADATA_VALUE:
            raise invalid_request(
                f"Invalid 'metadata': keys of at most {MAX_METADATA_KEY} characters, values "
                f"of at most {MAX_METADATA_VALUE}.",
                param="metadata",
            )


# -- 2. input items ------------------------------------------------------------------------


def _string(entry: dict[str, Any], key: str, param: str, *, required: bool = True) -> str | None:
    value = entry.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise invalid_request(
            f"Invalid '{param}.{key}': expected a string.", param=f"{param}.{key}"
        )
    return value


def _parts(content: Any, assistant: bool, param: str) -> list[ContentPart]:
    if isinstance(content, str):
        return [OutputTextPart(content) if assistant else InputTextPart(content)]
    if not isinstance(content, list) or not content:
        raise invalid_request(
            f"Invalid '{param}': expected a string or a non-empty list of content parts.",
            param=param,
        )
    parts: list[ContentPart] = []
    for index, part in enumerate(content):
        where = f"{param}[{index}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            text = _string(part, "text", where)
            assert text is not None
            parts.append(OutputTextPart(text) if assistant else InputTextPart(text))
        elif kind == "refusal" and assistant:
            refusal = _string(part, "refusal", where)
            assert refusal is not None
            parts.append(RefusalPart(refusal))
        elif kind in ("input_image", "input_file", "input_audio"):
            raise unsupported(f"{where}.type", f"The content part type '{kind}'")
        else:
            raise invalid_request(
                f"Invalid '{where}': expected a part of type 'input_text'"
                f"{', output_text or refusal' if assistant else ''}.",
                param=f"{where}.type",
            )
    return parts


def _message(entry: dict[str, Any], param: str) -> MessageItem:
    role = entry.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise invalid_request(
            f"Invalid '{param}.role': expected 'user', 'system', 'developer' or 'assistant'.",
            param=f"{param}.role",
        )
    content = _parts(entry.get("content"), role == "assistant", f"{param}.content")
    item_id = _string(entry, "id", param, required=False) or new_item_id("msg")
    return MessageItem(item_id, role, content)


def _function_call(entry: dict[str, Any], param: str) -> FunctionCallItem:
    call_id, name, arguments = (_string(entry, k, param) for k in ("call_id", "name", "arguments"))
    assert call_id is not None and name is not None and arguments is not None
    item_id = _string(entry, "id", param, required=False) or new_item_id("fc")
    return FunctionCallItem(item_id, call_id, name, arguments)


def _function_call_output(entry: dict[str, Any], param: str) -> FunctionCallOutputItem:
    call_id = _string(entry, "call_id", param)
    assert call_id is not None
    output = entry.get("output")
    if not isinstance(output, str):
        parts = _parts(output, False, f"{param}.output")
        output = "".join(p.text for p in parts if isinstance(p, InputTextPart))
    item_id = _string(entry, "id", param, required=False) or new_item_id("fco")
    return FunctionCallOutputItem(item_id, call_id, output)


def _input_item(entry: Any, param: str) -> Item:
    if not isinstance(entry, dict):
        raise invalid_request(f"Invalid '{param}': expected an object.", param=param)
    kind = entry.get("type", "message")
    if kind == "message":
        return _message(entry, param)
    if kind == "function_call":
        return _function_call(entry, param)
    if kind == "function_call_output":
        return _function_call_output(entry, param)
    if isinstance(kind, str):
        raise unsupported(f"{param}.type", f"The input item type '{kind}'")
    raise invalid_request(f"Invalid '{param}.type': expected a string.", param=f"{param}.type")


def input_items(raw: str | list[Any] | None) -> list[Item]:
    """The request's `input` as stored items (ids kept where the client gave them)."""
    if isinstance(raw, str) and raw:
        return [MessageItem(new_item_id("msg"), "user", [InputTextPart(raw)])]
    if not raw:
        raise invalid_request("'input' must be a non-empty string or list of items.", param="input")
    if len(raw) > MAX_INPUT_ITEMS:
        raise invalid_request(f"'input' holds more than {MAX_INPUT_ITEMS} items.", param="input")
    items = [_input_item(entry, f"input[{index}]") for index, entry in enumerate(raw)]
    ids = [item.id for item in items]
    if len(set(ids)) != len(ids):
        raise invalid_request("Two items of 'input' have the same id.", param="input")
    return items


# -- 3. the chat request -------------------------------------------------------------------


def _text(parts: Iterable[ContentPart]) -> str:
    return "".join(p.refusal if isinstance(p, RefusalPart) else p.text for p in parts)


def chat_messages(instructions: str | None, items: Sequence[Item]) -> list[s.Message]:
    """The conversation as chat messages: a model's text and the function calls that
    follow it make one assistant message; each call's output a `tool` message."""
    return _conversation(instructions, items)[0]


def message_items(instructions: str | None, items: Sequence[Item]) -> list[int | None]:
    """For each message of `chat_messages`, the index in `items` of the item it begins
    with (None for the instructions): to name an input item in a chat error."""
    return _conversation(instructions, items)[1]


def _conversation(
    instructions: str | None, items: Sequence[Item]
) -> tuple[list[s.Message], list[int | None]]:
    messages: list[s.Message] = []
    origins: list[int | None] = []
    if instructions:
        messages.append(s.SystemMessage(instructions))
        origins.append(None)
    previous: Item | None = None
    for number, item in enumerate(items):
        if isinstance(item, FunctionCallItem):
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}  # fmt: skip
            last = messages[-1] if messages else None
            joins = isinstance(previous, FunctionCallItem) or (
                isinstance(previous, MessageItem) and previous.role == "assistant"
            )
            if joins and isinstance(last, s.AssistantMessage):
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(s.AssistantMessage(tool_calls=[call]))
        elif isinstance(item, FunctionCallOutputItem):
            messages.append(s.ToolMessage(item.output, item.call_id))
        elif item.role == "assistant":
            messages.append(s.AssistantMessage(_text(item.content)))
        elif item.role == "user":
            messages.append(s.UserMessage(_text(item.content)))
        elif item.role == "system":
            messages.append(s.SystemMessage(_text(item.content)))
        else:
            messages.append(s.DeveloperMessage(_text(item.content)))
        if len(messages) > len(origins):  # the item began a message (a call may join one)
            origins.append(number)
        previous = item
    return messages, origins


def function_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The request's tools as echoed in the response: function tools only, each key known."""
    out = []
    for index, tool in enumerate(tools or []):
        param = f"tools[{index}]"
        kind = tool.get("type")
        if kind != "function":
            raise unsupported(f"{param}.type", f"The tool type {kind!r}")
        for key in sorted(set(tool) - _TOOL_KEYS):
            raise unsupported(f"{param}.{key}")
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise invalid_request(
                f"Invalid '{param}.name': expected a name.", param=f"{param}.name"
            )
        out.append({"type": "function", "name": name, "description": tool.get("description"),
                    "parameters": tool.get("parameters"), "strict": tool.get("strict")})  # fmt: skip
    return out


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = {
        k: tool[k] for k in ("name", "description", "parameters", "strict") if tool[k] is not None
    }
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or choice in ("none", "auto", "required"):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if not isinstance(name, str):
            raise invalid_request("Invalid 'tool_choice.name'.", param="tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    if isinstance(choice, str):
        raise invalid_request(
            f"Invalid value for 'tool_choice': {choice!r}; supported values are: 'none', "
            "'auto', 'required' or a function.",
            param="tool_choice",
            code="invalid_value",
        )
    kind = choice.get("type") if isinstance(choice, dict) else choice
    raise unsupported("tool_choice", f"`tool_choice` {kind!r}")


def response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """`text.format` in the chat completions' `response_format` shape."""
    kind = (text or {}).get("type", "text")
    if text is None or kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise invalid_request(
            "Invalid 'text.format.type': expected 'text', 'json_object' or 'json_schema'.",
            param="text.format.type",
        )
    if not isinstance(text.get("name"), str) or not isinstance(text.get("schema"), dict):
        raise invalid_request(
            "A 'json_schema' text format needs a 'name' and a 'schema' object.",
            param="text.format",
        )
    json_schema = {k: text[k] for k in ("name", "schema", "strict", "description") if k in text}
    return {"type": "json_schema", "json_schema": json_schema}


def chat_request(body: ResponsesRequest, items: Sequence[Item]) -> s.ChatCompletionRequest:
    tools = function_tools(body.tools)
    if not tools and body.tool_choice not in (None, "none", "auto"):
        raise invalid_request(
            "'tool_choice' names a tool but 'tools' is empty.", param="tool_choice"
        )
    return s.ChatCompletionRequest(
        messages=chat_messages(body.instructions, items),
        model=body.model,
        max_completion_tokens=body.max_output_tokens,
        response_format=response_format(body.text.format if body.text else None),
        temperature=body.temperature,
        top_p=body.top_p,
        tools=[_chat_tool(t) for t in tools] or None,
        tool_choice=_chat_tool_choice(body.tool_choice) if tools else None,
        parallel_tool_calls=body.parallel_tool_calls if tools else None,
        user=body.user,
    )


# -- 4. errors in this request's terms -----------------------------------------------------

_CHAT_NAMES = (
    ("max_completion_tokens", "max_output_tokens"),
    # `text.format` is flat: the chat format's `json_schema` fields are its own.
    ("response_format.json_schema", "text.format"),
    ("response_format", "text.format"),
    ("tool_choice.function", "tool_choice"),
)
# A chat tool's fields sit under `function`; a Responses tool's at the top.
_TOOL_FIELD = re.compile(r"(tools\[\d+\])\.function(?=\.)")
_MESSAGE = re.compile(r"messages\[(\d+)\](\.tool_call_id)?")


def in_responses_terms(error: APIError, message_inputs: Sequence[int | None] = ()) -> APIError:
    """The same error, naming the Responses fields where it named chat fields.

    `message_inputs` gives, per chat message, the index of the `input` item it came from
    (None for instructions and earlier responses, named as `input` alone)."""
    message, param = error.message, error.param
    for chat, ours in _CHAT_NAMES:
        message = message.replace(chat, ours)
        if param is not None and param.startswith(chat):
            param = ours + param[len(chat) :]
    message = _TOOL_FIELD.sub(r"\1", message)
    if param is not None:
        param = _TOOL_FIELD.sub(r"\1", param)

    def item(match: re.Match[str]) -> str:
        number = int(match.group(1))
        found = message_inputs[number] if number < len(message_inputs) else None
        if found is None:
            return "input"
        return f"input[{found}]" + (".call_id" if match.group(2) else "")

    message = _MESSAGE.sub(item, message).replace("messages", "input")
    if param is not None and param.startswith("messages"):
        found = _MESSAGE.match(param)
        param = item(found) if found else "input"
    return APIError(
        error.status_code, message, type=error.type, param=param, code=error.code,
        headers=error.headers,
    )  # fmt: skip
