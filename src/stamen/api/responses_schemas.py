"""The Responses API's wire objects (`/v1/responses`) as msgspec Structs.

`ResponsesRequest` keeps every field the `openai` SDK's `responses.create` may send, so
that each one is honoured by `stamen.api.responses_api` or refused there with a 400 that
names it. `input` items arrive in several loose shapes (a message without `type`, content
as a string or as parts) and are checked item by item in `responses_api`, which turns
each into one of the stored `Item`s below: what `input_items.list` answers and what a
later `previous_response_id` replays.

`ResponseObject` mirrors OpenAI's response object field for field: the SDK builds
`output_text` from `output` itself, and reads the echoed parameters (`tools`,
`tool_choice`, `text`, ...) as given.

This module knows nothing about models, HTTP or SQLite.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from stamen.api.schemas import Temperature, TokenCount, TopP

# -- content parts and items (input and output alike) -------------------------------------


class InputTextPart(msgspec.Struct, tag_field="type", tag="input_text"):
    text: str


class OutputTextPart(msgspec.Struct, tag_field="type", tag="output_text"):
    text: str
    annotations: list[Any] = msgspec.field(default_factory=list)
    logprobs: list[Any] = msgspec.field(default_factory=list)


class RefusalPart(msgspec.Struct, tag_field="type", tag="refusal"):
    refusal: str


ContentPart = InputTextPart | OutputTextPart | RefusalPart

ItemStatus = Literal["in_progress", "completed", "incomplete"]


class MessageItem(msgspec.Struct, tag_field="type", tag="message"):
    """A message: the user's, system's or developer's (input_text parts) or the model's
    (role assistant, output_text parts)."""

    id: str
    role: Literal["user", "system", "developer", "assistant"]
    content: list[ContentPart]
    status: ItemStatus = "completed"


class FunctionCallItem(msgspec.Struct, tag_field="type", tag="function_call"):
    """A call of one of the request's function tools, by the model."""

    id: str
    call_id: str
    name: str
    arguments: str  # JSON text, as the model wrote it
    status: ItemStatus = "completed"


class FunctionCallOutputItem(msgspec.Struct, tag_field="type", tag="function_call_output"):
    """The caller's result of a function call, sent back as input."""

    id: str
    call_id: str
    output: str
    status: ItemStatus = "completed"


Item = MessageItem | FunctionCallItem | FunctionCallOutputItem

# -- the request ---------------------------------------------------------------------------


class TextConfig(msgspec.Struct, omit_defaults=True):
    format: dict[str, Any] | None = None  # {"type": "text" | "json_object" | "json_schema", ...}
    verbosity: str | None = None


class ResponsesRequest(msgspec.Struct):
    """`POST /v1/responses`, fields as `responses.create` sends them."""

    model: str
    # a string, or a list of items: each checked in `responses_api` (loose shapes)
    input: str | list[Any] | None = None
    instructions: str | None = None
    max_output_tokens: TokenCount | None = None
    metadata: dict[str, str] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None
    temperature: Temperature | None = None
    text: TextConfig | None = None
    tool_choice: str | dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    top_p: TopP | None = None
    truncation: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: str | None = None
    # refused unless absent or empty (`responses_api.UNSUPPORTED`)
    background: bool | None = None
    background_options: dict[str, Any] | None = None
    context_management: list[Any] | None = None
    conversation: str | dict[str, Any] | None = None
    include: list[str] | None = None
    image: dict[str, Any] | None = None
    access_programs: dict[str, Any] | None = None
    max_tool_calls: int | None = None
    moderation: dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    prompt_cache_options: dict[str, Any] | None = None
    prompt_cache_retention: str | None = None
    reasoning: dict[str, Any] | None = None
    top_logprobs: int | None = None


# -- the response --------------------------------------------------------------------------


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0


class ResponsesUsage(msgspec.Struct):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: InputTokensDetails = msgspec.field(default_factory=InputTokensDetails)
    output_tokens_details: OutputTokensDetails = msgspec.field(default_factory=OutputTokensDetails)


class ResponseErrorInfo(msgspec.Struct):
    code: str
    message: str


class IncompleteDetails(msgspec.Struct):
    reason: str


ResponseStatus = Literal["completed", "incomplete", "failed", "in_progress"]


class ResponseObject(msgspec.Struct):
    id: str
    created_at: int
    model: str
    status: ResponseStatus
    output: list[Item]
    parallel_tool_calls: bool
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    text: TextConfig
    store: bool
    temperature: float | None = None
    top_p: float | None = None
    max_output_tokens: int | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] = msgspec.field(default_factory=dict)
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    usage: ResponsesUsage | None = None
    error: ResponseErrorInfo | None = None
    incomplete_details: IncompleteDetails | None = None
    completed_at: int | None = None
    object: Literal["response"] = "response"
    background: bool = False
    truncation: Literal["disabled"] = "disabled"
    service_tier: str = "default"


class InputItemList(msgspec.Struct):
    data: list[Item]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


class ResponseDeleted(msgspec.Struct):
    id: str
    deleted: bool = True
    object: Literal["response"] = "response"
