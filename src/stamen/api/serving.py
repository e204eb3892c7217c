"""OpenAI semantics on top of an `EngineClient`: validate, render, decode, count.

1. `chat_job` / `completion_jobs` check every parameter (honoured, or a 400 naming it;
   plain numeric ranges are on the schemas already), render the prompt (chat template)
   and size the generation against the context. Without `max_tokens`, a chat completion
   gets `default_max_tokens` (a server setting, 1024 by default) and a completion
   OpenAI's 16, each clamped to the room the context leaves; the chain is opened for
   prompt + that many tokens, never for the whole context unasked.
   With `tools` (`stamen.api.tools`), the tools are described in the prompt (by the
   chat template when it renders tools in our call syntax, else by a generic system
   section), earlier calls and results are rendered as turns the model can read, and
   `Job.constraint` holds every choice to the tool-call grammar of its `tool_choice`.
2. `generate` opens one chain per prompt (batch = n choices), runs `decode` and yields
   `ChoiceDelta`s: text released by the choice's `StopTracker`, the tokens' logprobs, and
   a finish reason ("stop" for EOS or a stop sequence, "length" for max tokens). A choice
   that may call tools has its text split by a `ToolCallParser` into content and
   `ToolCallDelta`s; its stop sequences are matched in the content only (never inside
   a call), its logprobs cover content tokens only, and it ends with "tool_calls" when
   it called tools and every call closed.
3. Leaving `generate` early (a disconnected client) closes the chain through the engine.

Response objects are assembled by `stamen.api.responses`; this module knows nothing
about HTTP.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stamen.api import schemas as s
from stamen.api import tools
from stamen.api.constrained import Constraint, for_grammar, for_response_format
from stamen.api.engine import EngineClient
from stamen.api.errors import invalid_request, not_ready, unsupported
from stamen.api.metrics import ApiMetrics
from stamen.api.sampling import SamplingParams, StoppedRows, StopTracker, make_plan
from stamen.api.tools import ToolCallDelta, ToolCallParser, ToolPlan
from stamen.swarm_core.client.generation import decode

logger = logging.getLogger(__name__)

MAX_STOP_SEQUENCES = 4
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclass
class Job:
    """One prompt to run with `params.n` choices, numbered from `first_index`."""

    prompt_ids: list[int]
    params: SamplingParams
    first_index: int = 0
    constraint: Constraint | None = None  # every choice follows this grammar on its own
    tools: ToolPlan | None = None  # set when choices may call tools: their text is parsed


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


@dataclass
class ChoiceDelta:
    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # "stop", "length" or "tool_calls"
    completion_tokens: int = 0  # set with finish_reason
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


# -- 1. validation and prompt rendering ----------------------------------------------------


def _stop_list(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise invalid_request(
            f"Invalid 'stop': at most {MAX_STOP_SEQUENCES} stop sequences are allowed.",
            param="stop",
        )
    return stops


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise invalid_request(
                f"Invalid key in 'logit_bias': {key!r} is not a token id of this model.",
                param="logit_bias",
            )
        out[int(key)] = float(value)
    return out


def _common_params(
    request: s.ChatCompletionRequest | s.CompletionRequest, max_n: int, vocab_size: int
) -> SamplingParams:
    n = 1 if request.n is None else request.n
    if n > max_n:
        raise invalid_request(f"Invalid 'n': {n} is not in [1, {max_n}].", param="n")
    return SamplingParams(
        max_new_tokens=0,
        n=n,
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        logit_bias=_logit_bias(request.logit_bias, vocab_size),
        stop=_stop_list(request.stop),
    )


def _size(
    params: SamplingParams,
    prompt_length: int,
    requested: int | None,
    default: int,
    context_length: int,
    param: str,
    prompt_param: str,
) -> None:
    room = context_length - prompt_length
    max_new = requested if requested is not None else min(default, room)
    if prompt_length == 0:
        raise invalid_request("The prompt is empty.", param=prompt_param)
    if max_new > room or room < 1:
        raise invalid_request(
            f"This model's maximum context length is {context_length} tokens. However, you "
            f"requested {prompt_length + max_new} tokens ({prompt_length} in the prompt, "
            f"{max_new} in the completion). Please reduce the prompt or the completion length.",
            param=param if requested is not None else prompt_param,
            code="context_length_exceeded",
        )
    params.max_new_tokens = max_new


def _refuse_chat_extras(request: s.ChatCompletionRequest) -> None:
    for name in ("functions", "audio", "prediction", "web_search_options"):
        if getattr(request, name):
            raise unsupported(name)
    if request.function_call not in (None, "none"):
        raise unsupported("function_call", "The deprecated `function_call` (use `tool_choice`)")
    if request.modalities and request.modalities != ["text"]:
        raise unsupported("modalities", "`modalities` other than ['text']")
    if request.store:
        raise unsupported("store", "Storing completions (`store: true`)")
    if request.metadata:
        raise unsupported("metadata", "`metadata` (only used with `store`)")
    if request.reasoning_effort is not None:
        raise unsupported("reasoning_effort")
    if request.service_tier not in (None, "auto", "default"):
        raise unsupported("service_tier", f"`service_tier` {request.service_tier!r}")


def _message_text(content: str | list[s.ContentPart] | None, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for index, part in enumerate(content):
        if isinstance(part, s.TextPart | s.RefusalPart):
            texts.append(part.text if isinstance(part, s.TextPart) else part.refusal)
        else:
            kind = type(part).__struct_config__.tag
            raise unsupported(f"{param}[{index}]", f"Content parts of type '{kind}'")
    return "".join(texts)


def _assistant_entry(
    message: s.AssistantMessage, text: str, index: int, native: bool, names: dict[str, str]
) -> dict[str, Any]:
    """An assistant turn; its tool calls as the template's `tool_calls`, or as call blocks."""
    calls = tools.past_calls(message.tool_calls or [], f"messages[{index}].tool_calls")
    names.update((call.id, call.name) for call in calls)
    if not calls:
        return {"role": "assistant", "content": text}
    if native:
        entries = [{"id": c.id, "type": "function", "function": {"name": c.name,
                    "arguments": tools.arguments_value(c.arguments)}} for c in calls]  # fmt: skip
        return {"role": "assistant", "content": text, "tool_calls": entries}
    blocks = [tools.call_text(call.name, call.arguments) for call in calls]
    return {"role": "assistant", "content": "\n".join([text, *blocks] if text else blocks)}


def _tool_entry(
    message: s.ToolMessage, text: str, index: int, native: bool, names: dict[str, str]
) -> dict[str, Any]:
    """A tool's result; answers a call of an earlier assistant turn (as OpenAI requires)."""
    name = names.get(message.tool_call_id)
    if name is None:
        raise invalid_request(
            f"Invalid 'messages[{index}].tool_call_id': {message.tool_call_id!r} answers no "
            "tool call of an earlier assistant message.",
            param=f"messages[{index}].tool_call_id",
        )
    if native:
        return {"role": "tool", "content": text, "tool_call_id": message.tool_call_id,
                "name": name}  # fmt: skip
    # Templates without tools know no "tool" role: the result is shown as a user turn.
    return {"role": "user", "content": tools.response_text(name, text)}


def _conversation(messages: Sequence[s.Message], native: bool) -> list[dict[str, Any]]:
    rendered: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name, for the results
    for index, message in enumerate(messages):
        if isinstance(message, s.FunctionMessage):
            raise unsupported(f"messages[{index}].role", "The deprecated 'function' role")
        text = _message_text(message.content, f"messages[{index}].content")
        if isinstance(message, s.AssistantMessage):
            if message.function_call:
                raise unsupported(f"messages[{index}].function_call",
                                  "The deprecated `function_call` (use `tool_calls`)")  # fmt: skip
            rendered.append(_assistant_entry(message, text, index, native, names))
        elif isinstance(message, s.ToolMessage):
            entry = _tool_entry(message, text, index, native, names)
            if not native and isinstance(messages[index - 1], s.ToolMessage):
                rendered[-1]["content"] += "\n" + entry["content"]  # parallel calls' results
            else:
                rendered.append(entry)
        else:
            role = type(message).__struct_config__.tag
            # Chat templates know "system"; OpenAI defines "developer" as its successor.
            rendered.append({"role": "system" if role == "developer" else role, "content": text})
    return rendered


def _with_system_section(rendered: list[dict[str, Any]], section: str) -> list[dict[str, Any]]:
    if rendered and rendered[0]["role"] == "system":
        first = {**rendered[0], "content": f"{rendered[0]['content']}\n\n{section}"}
        return [first, *rendered[1:]]
    return [{"role": "system", "content": section}, *rendered]


def render_chat(
    tokenizer: Any, messages: Sequence[s.Message], plan: ToolPlan | None = None
) -> list[int]:
    """Token ids of the conversation through the tokenizer's chat template.

    Tools that may be called are described by the template itself when it renders
    tools in our call syntax (`tools.native_template`), else by the generic section
    `tools.system_section` in the system message. Under `tool_choice: none` the tools
    are not described at all, so the model has no reason to write a call."""
    if not messages:
        raise invalid_request("'messages' must contain at least one message.", param="messages")
    native = tools.native_template(tokenizer)
    rendered = _conversation(messages, native)
    extra: dict[str, Any] = {}
    if plan is not None and plan.calls_tools:
        if native:
            extra["tools"] = [tool.as_openai() for tool in plan.tools]
        else:
            rendered = _with_system_section(rendered, tools.system_section(plan))
    try:
        encoded = tokenizer.apply_chat_template(
            rendered, add_generation_prompt=True, tokenize=True, return_dict=True, **extra
        )
    except Exception as error:  # jinja errors: the template refused this conversation
        raise invalid_request(
            f"The model's chat template cannot render these messages: {error}", param="messages"
        ) from error
    return list(encoded["input_ids"])


def _compiled(grammar: str, plan: ToolPlan, tokenizer: Any) -> Constraint:
    """`grammar` compiled; a schema llguidance refuses is a 400 naming its tool."""
    try:
        return for_grammar(grammar, tokenizer)
    except ValueError as error:
        _check_each(plan.tools, tokenizer, strict_only=False)
        raise invalid_request(f"Invalid 'tools': {error}", param="tools") from None


def _check_each(functions: Sequence[tools.FunctionTool], tokenizer: Any, strict_only: bool) -> None:
    """Compile each tool's schema alone, to name the one llguidance refuses."""
    for number, tool in enumerate(functions):
        if strict_only and not tool.strict:
            continue
        try:
            for_grammar(tools.parameters_grammar(tool), tokenizer)
        except ValueError as error:
            raise invalid_request(
                f"Invalid schema for function '{tool.name}': {error}",
                param=f"tools[{number}].function.parameters",
            ) from None


def _constraint(
    request: s.ChatCompletionRequest, plan: ToolPlan | None, tokenizer: Any
) -> Constraint | None:
    """The grammar of every choice: tool calls (see `stamen.api.tools`), or the format.

    The tools' schemas are compiled (checked) whatever `tool_choice` says. A
    `response_format` other than text together with callable tools is refused: one
    grammar would have to hold both, and OpenAI's rule for the mix is not defined."""
    if plan is None:
        return for_response_format(request.response_format, tokenizer)
    everything = dataclasses.replace(plan, mode="required", forced=None, parallel=True)
    checked = _compiled(tools.grammar(everything), plan, tokenizer)
    if not all(tool.strict for tool in plan.tools):  # the mix compiled leniently
        _check_each(plan.tools, tokenizer, strict_only=True)
    if not plan.calls_tools:
        return for_response_format(request.response_format, tokenizer)
    if request.response_format and request.response_format.get("type") != "text":
        raise unsupported(
            "response_format", "`response_format` other than text while tools may be called"
        )
    if plan == everything:
        return checked
    return _compiled(tools.grammar(plan), plan, tokenizer)


def chat_job(
    request: s.ChatCompletionRequest,
    engine: EngineClient,
    *,
    max_n: int,
    default_max_tokens: int,
) -> Job:
    _refuse_chat_extras(request)
    plan = tools.parse_tools(request)
    vocab_size = len(engine.tokenizer)
    params = _common_params(request, max_n, vocab_size)
    if request.logprobs:
        params.logprobs = True
        params.top_logprobs = request.top_logprobs or 0
    elif request.top_logprobs is not None:
        raise invalid_request(
            "Invalid 'top_logprobs': 'logprobs' must be true to use it.", param="top_logprobs"
        )
    constraint = _constraint(request, plan, engine.tokenizer)
    prompt_ids = render_chat(engine.tokenizer, request.messages, plan)
    requested = request.max_completion_tokens
    param = "max_completion_tokens"
    if requested is None:
        requested, param = request.max_tokens, "max_tokens"
    _size(
        params,
        len(prompt_ids),
        requested,
        default_max_tokens,
        engine.context_length,
        param,
        "messages",
    )
    calling = plan if plan is not None and plan.calls_tools else None
    return Job(prompt_ids, params, constraint=constraint, tools=calling)


def _completion_prompts(prompt: Any, tokenizer: Any, vocab_size: int) -> list[list[int]]:
    """OpenAI's four prompt shapes (text, texts, token ids, lists of token ids) as ids."""
    if prompt is None or prompt == [] or prompt == "":
        raise invalid_request("'prompt' must not be empty.", param="prompt")
    if isinstance(prompt, str) or all(type(item) is int for item in prompt):
        prompts: list[Any] = [prompt]
    else:
        prompts = list(prompt)
    texts = all(isinstance(item, str) for item in prompts)
    out = []
    for item in prompts:
        if texts:
            out.append(list(tokenizer.encode(item, add_special_tokens=False)))
            continue
        if not isinstance(item, list) or not item or not all(type(t) is int for t in item):
            raise invalid_request(
                "'prompt' must be a string, a list of strings, a list of token ids or a "
                "list of lists of token ids.",
                param="prompt",
            )
        if any(not 0 <= token < vocab_size for token in item):
            raise invalid_request(
                "'prompt' holds token ids outside the vocabulary.", param="prompt"
            )
        out.append(list(item))
    return out


def completion_jobs(request: s.CompletionRequest, engine: EngineClient, *, max_n: int) -> list[Job]:
    if request.suffix:
        raise unsupported("suffix", "`suffix` (fill-in-the-middle)")
    vocab_size = len(engine.tokenizer)
    params = _common_params(request, max_n, vocab_size)
    # `response_format` on completions is an extension (OpenAI has it on chat only).
    constraint = for_response_format(request.response_format, engine.tokenizer)
    if request.best_of is not None and request.best_of != params.n:
        raise unsupported("best_of", "`best_of` different from `n`")
    if request.logprobs is not None:
        if request.echo:
            raise unsupported("logprobs", "`logprobs` together with `echo`")
        params.logprobs, params.top_logprobs = True, request.logprobs
    jobs = []
    for number, ids in enumerate(_completion_prompts(request.prompt, engine.tokenizer, vocab_size)):
        job_params = dataclasses.replace(params)
        _size(
            job_params,
            len(ids),
            request.max_tokens,
            DEFAULT_COMPLETION_MAX_TOKENS,
            engine.context_length,
            "max_tokens",
            "prompt",
        )
        jobs.append(Job(ids, job_params, first_index=number * params.n, constraint=constraint))
    return jobs


# -- 2. generation -------------------------------------------------------------------------


def _token_logprobs(tokenizer: Any, logits: torch.Tensor, token_id: int, top: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # (V,)
    best = []
    if top:
        values, ids = logprobs.topk(top)
        best = [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, ids, strict=True)]
    return TokenLogprob(tokenizer.decode([token_id]), float(logprobs[token_id]), best)


async def generate(
    engine: EngineClient, job: Job, metrics: ApiMetrics | None = None
) -> AsyncIterator[ChoiceDelta]:
    """Run one job; yield text deltas per choice and one finishing delta per choice."""
    params, tokenizer = job.params, engine.tokenizer
    B, P = params.n, len(job.prompt_ids)
    input_ids = torch.tensor([job.prompt_ids] * B, dtype=torch.long)  # (B, P)
    stopped = StoppedRows(B)
    plan = make_plan(
        params,
        prompt_length=P,
        vocab_size=len(tokenizer),
        eos_token_ids=engine.eos_token_ids,
        stopped=stopped,
        constraint=job.constraint,
    )
    # With tools, stop sequences are looked for in the content only (`_ToolRow`), never
    # inside a call's markup or JSON, which the grammar holds until it is closed.
    token_stops = params.stop if job.tools is None else []
    trackers = [StopTracker(tokenizer, token_stops) for _ in range(B)]
    rows = [_ToolRow(params.stop) if job.tools is not None else None for _ in range(B)]
    counts = [0] * B
    finished = [False] * B
    started = last = time.perf_counter()
    async with engine.open_chain(P + params.max_new_tokens, B) as chain:
        async for step in decode(engine.head, chain, input_ids, plan):
            now = time.perf_counter()
            if metrics is not None:
                metrics.observe_token(now - last, first=now - started if last == started else None)
            last = now
            for row in range(B):
                if finished[row]:
                    continue
                delta = _advance(engine, params, trackers[row], step, row, job.first_index + row)
                counts[row] += 1
                if delta.finish_reason is None and counts[row] >= params.max_new_tokens:
                    delta.text += trackers[row].flush()
                    delta.finish_reason = "length"
                _parse(rows[row], delta)
                if delta.finish_reason is not None:
                    finished[row] = True
                    stopped.stopped[row] = True
                    delta.completion_tokens = counts[row]
                if delta.text or delta.logprobs or delta.finish_reason or delta.tool_calls:
                    yield delta
            if all(finished):
                return
    for row in range(B):  # decode ended with rows unfinished: cannot happen, but never hang
        if not finished[row]:
            delta = ChoiceDelta(
                job.first_index + row, trackers[row].flush(), [], "length", counts[row]
            )
            _parse(rows[row], delta)
            yield delta


class _ContentStop:
    """Stop sequences in a choice's content: text released in pieces that never hold
    (part of) a stop sequence, across pieces. Work per piece is O(longest stop)."""

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False

    def add(self, text: str) -> str:
        if self.stopped:
            return ""
        text = self._held + text
        cut = min((i for s in self._stop if (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return text[:cut]
        keep = max((_prefix_suffix(text, s) for s in self._stop), default=0)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def _prefix_suffix(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class _ToolRow:
    """One choice that may call tools: its text split into content and calls, stop
    sequences matched in the content, and logprobs kept for content tokens only (those
    of tokens held back are kept until their text is released or becomes a call)."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.parser = ToolCallParser()
        self.stop = _ContentStop(stop)
        self.logprobs: list[TokenLogprob] = []


def _parse(row: _ToolRow | None, delta: ChoiceDelta) -> None:
    """Split the delta's text into content and tool calls (a choice that may call tools).

    A stop sequence in the content ends the choice with "stop"; a choice ends with
    "tool_calls" only when it called tools and every call closed (one cut by
    `max_tokens` ends "length")."""
    if row is None:
        return
    parser = row.parser
    parsed = parser.feed(delta.text)
    delta.text, delta.tool_calls = row.stop.add(parsed.text), list(parsed.calls)
    if row.stop.stopped and delta.finish_reason is None:
        delta.finish_reason = "stop"
    if delta.finish_reason is not None and not row.stop.stopped:
        delta.text += row.stop.add(parser.close().text) + row.stop.flush()
    row.logprobs += delta.logprobs
    if delta.text:
        delta.logprobs, row.logprobs = row.logprobs, []
    else:
        delta.logprobs = []
        if parser.in_call or delta.tool_calls:
            row.logprobs = []
    if delta.finish_reason == "stop" and parser.calls and not parser.in_call:
        delta.finish_reason = "tool_calls"


def _advance(
    engine: EngineClient,
    params: SamplingParams,
    tracker: StopTracker,
    step: Any,
    row: int,
    index: int,
) -> ChoiceDelta:
    token_id = int(step.tokens[row])
    if token_id in engine.eos_token_ids:
        return ChoiceDelta(index, tracker.flush(), [], "stop")
    logprobs = []
    if params.logprobs:
        logprobs.append(
            _token_logprobs(engine.tokenizer, step.logits[row], token_id, params.top_logprobs)
        )
    text = tracker.add(token_id)
    return ChoiceDelta(index, text, logprobs, "stop" if tracker.stopped else None)


def check_ready(engine: EngineClient, retry_after_s: int) -> None:
    if not engine.ready():
        raise not_ready(retry_after_s)
