"""OpenAI request and response schemas as msgspec Structs, fields in the spec's order.

Requests keep every field the `openai` SDK may send, typed as the spec types them, so
that each one is either honoured by `stamen.api.serving` or refused there with a 400 that
names it; nothing is dropped silently. Fields the spec does not know are tolerated by
`decode_request` and logged. Responses mirror OpenAI's objects field for field.

Numeric ranges live on the types (`Annotated[..., msgspec.Meta(ge=, le=)]`), so the
decoder refuses an out-of-range value before any handler sees it and the OpenAPI
document (`stamen.api.openapi`) shows the same bounds. What depends on the server (`n`
against `--max-n`, `max_tokens` against the context, token ids against the vocabulary)
is checked in serving.

`decode_request` is the trust boundary for bodies: it measures how deep the JSON nests
(a linear scan) before decoding, so a pathological body is a 400, never a RecursionError.

This module knows nothing about models or decoding; `decode_request` only turns bytes
into a typed request or an `APIError`.
"""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import numpy as np

from stamen.api.errors import invalid_request

logger = logging.getLogger(__name__)

# -- bounded numbers (OpenAI's ranges) ----------------------------------------------------

MAX_JSON_DEPTH = 64

Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
TokenCount = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
Choices = Annotated[int, msgspec.Meta(ge=1, le=128)]
Temperature = Annotated[float, msgspec.Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, msgspec.Meta(ge=-2.0, le=2.0)]
Bias = Annotated[float, msgspec.Meta(ge=-100.0, le=100.0)]
ChatTopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]
CompletionTopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=5)]
BestOf = Annotated[int, msgspec.Meta(ge=0, le=20)]

# -- message content parts ----------------------------------------------------------------


class TextPart(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class ImageUrlPart(msgspec.Struct, tag_field="type", tag="image_url"):
    image_url: dict[str, Any]


class InputAudioPart(msgspec.Struct, tag_field="type", tag="input_audio"):
    input_audio: dict[str, Any]


class FilePart(msgspec.Struct, tag_field="type", tag="file"):
    file: dict[str, Any]


class RefusalPart(msgspec.Struct, tag_field="type", tag="refusal"):
    refusal: str


ContentPart = TextPart | ImageUrlPart | InputAudioPart | FilePart | RefusalPart

# -- messages, tagged by role -------------------------------------------------------------


class DeveloperMessage(msgspec.Struct, tag_field="role", tag="developer"):
    content: str | list[ContentPart]
    name: str | None = None


class SystemMessage(msgspec.Struct, tag_field="role", tag="system"):
    content: str | list[ContentPart]
    name: str | None = None


class UserMessage(msgspec.Struct, tag_field="role", tag="user"):
    content: str | list[ContentPart]
    name: str | None = None


class AssistantMessage(msgspec.Struct, tag_field="role", tag="assistant"):
    content: str | list[ContentPart] | None = None
    refusal: str | None = None
    name: str | None = None
    audio: dict[str, Any] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None


class ToolMessage(msgspec.Struct, tag_field="role", tag="tool"):
    content: str | list[ContentPart]
    tool_call_id: str


class FunctionMessage(msgspec.Struct, tag_field="role", tag="function"):
    content: str | None
    name: str


Message = (
    DeveloperMessage
    | SystemMessage
    | UserMessage
    | AssistantMessage
    | ToolMessage
    | FunctionMessage
)


class StreamOptions(msgspec.Struct):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


# -- requests -----------------------------------------------------------------------------


class ChatCompletionRequest(msgspec.Struct):
    messages: list[Message]
    model: str
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    max_completion_tokens: TokenCount | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    web_search_options: dict[str, Any] | None = None
    top_logprobs: ChatTopLogprobs | None = None
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    store: bool | None = None
    stream: bool | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, Bias] | None = None
    logprobs: bool | None = None
    max_tokens: TokenCount | None = None
    n: Choices | None = None
    prediction: dict[str, Any] | None = None
    seed: Int64 | None = None
    service_tier: str | None = None
    stream_options: StreamOptions | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    function_call: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    metadata: dict[str, str] | None = None
    verbosity: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


class CompletionRequest(msgspec.Struct):
    model: str
    # str, list[str], list[int] or list[list[int]]: checked in serving (msgspec unions
    # hold one array type)
    prompt: str | list[Any] | None = None
    best_of: BestOf | None = None
    echo: bool | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Bias] | None = None
    logprobs: CompletionTopLogprobs | None = None
    max_tokens: TokenCount | None = None
    n: Choices | None = None
    presence_penalty: Penalty | None = None
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    user: str | None = None
    response_format: dict[str, Any] | None = None  # an extension: OpenAI has it on chat only


# -- responses ----------------------------------------------------------------------------


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0
    audio_tokens: int = 0


class CompletionTokensDetails(msgspec.Struct):
    reasoning_tokens: int = 0
    audio_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = msgspec.field(default_factory=PromptTokensDetails)
    completion_tokens_details: CompletionTokensDetails = msgspec.field(
        default_factory=CompletionTokensDetails
    )


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(msgspec.Struct):
    content: list[TokenLogprob] | None
    refusal: list[TokenLogprob] | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # JSON text, valid against the function's parameters


class ToolCall(msgspec.Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ResponseMessage(msgspec.Struct):
    content: str | None
    refusal: str | None = None
    role: Literal["assistant"] = "assistant"
    annotations: list[Any] = msgspec.field(default_factory=list)
    # left out (UNSET) when the model called no tool, as OpenAI leaves it out
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET


class ChatChoice(msgspec.Struct):
    finish_reason: str
    index: int
    logprobs: ChoiceLogprobs | None
    message: ResponseMessage


class ChatCompletion(msgspec.Struct):
    id: str
    choices: list[ChatChoice]
    created: int
    model: str
    system_fingerprint: str
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"
    service_tier: str = "default"


class Delta(msgspec.Struct, omit_defaults=True):
    content: str | None = None
    role: str | None = None
    refusal: str | None = None


class ChunkChoice(msgspec.Struct):
    delta: Delta
    finish_reason: str | None
    index: int
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    system_fingerprint: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    service_tier: str = "default"
    usage: Usage | None = None


class CompletionLogprobs(msgspec.Struct):
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(msgspec.Struct):
    finish_reason: str | None
    index: int
    logprobs: CompletionLogprobs | None
    text: str


class Completion(msgspec.Struct):
    id: str
    choices: list[CompletionChoice]
    created: int
    model: str
    system_fingerprint: str
    object: Literal["text_completion"] = "text_completion"
    usage: Usage | None = None


class Model(msgspec.Struct):
    id: str
    created: int
    owned_by: str
    object: Literal["model"] = "model"


class ModelList(msgspec.Struct):
    data: list[Model]
    object: Literal["list"] = "list"


# -- decoding requests --------------------------------------------------------------------

R = TypeVar("R", bound=msgspec.Struct)

_PATH = re.compile(r"at `\$\.?([^`]*)`")
# A JSON string, closed or running to the end of the body; possessive, so the scan is
# linear even for a body of unbalanced quotes and backslashes.
_JSON_STRING = re.compile(rb'"(?:[^"\\]++|\\.?)*+(?:"|\Z)', re.DOTALL)
_NESTING_STEP = np.zeros(256, dtype=np.int8)
_NESTING_STEP[[ord("["), ord("{")]] = 1
_NESTING_STEP[[ord("]"), ord("}")]] = -1


def nests_deeper_than(body: bytes, limit: int) -> bool:
    """Whether the arrays and objects of a JSON text nest deeper than `limit` (brackets in
    strings skipped).

    Linear; about 0.4 s per million strings, so the scan runs only where there are more
    than `limit` brackets at all (counting them is C speed)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    structure = np.frombuffer(_JSON_STRING.sub(b"", body), dtype=np.uint8)
    depth = np.cumsum(_NESTING_STEP[structure], dtype=np.int64)  # (len(structure),)
    return bool(depth.max(initial=0) > limit)


def decode_request(body: bytes, request_type: type[R]) -> R:
    """Parse a JSON body into `request_type`, or raise a 400 `APIError` naming the field."""
    if nests_deeper_than(body, MAX_JSON_DEPTH):
        raise invalid_request(
            f"The JSON body of your request nests deeper than {MAX_JSON_DEPTH} levels."
        )
    try:
        raw = msgspec.json.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as error:
        # ValidationError: a number JSON allows but no machine type holds (1e999)
        raise invalid_request(
            f"We could not parse the JSON body of your request: {error}"
        ) from None
    if not isinstance(raw, dict):
        raise invalid_request("The request body must be a JSON object.")
    unknown = sorted(set(raw) - set(request_type.__struct_fields__))
    if unknown:
        logger.info("ignoring unknown request fields %s", unknown)
    try:
        return msgspec.convert(raw, request_type)
    except msgspec.ValidationError as error:
        match = _PATH.search(str(error))
        param = match.group(1).removesuffix("[...]") if match else None
        if param is None and "missing required field" in str(error):
            param = str(error).split("`")[1] if "`" in str(error) else None
        raise invalid_request(f"Invalid request: {error}", param=param) from None
