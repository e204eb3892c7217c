"""Fine-tuning files: JSONL parsed, validated and tokenized into `Example`s.

Two line formats, as OpenAI accepts them:

- chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": str,
  "weight": 0 | 1 (assistant only, default 1)}, ...]}`; the loss is on the assistant turns
  of weight 1 (their content and the token that ends the turn), nothing else;
- prompt/completion: `{"prompt": str, "completion": str}`; the loss is on the completion
  and the end-of-sequence token appended to it.

A chat line is rendered by the model's own chat template, the one serving renders
requests with, so training sees exactly the tokens a request will. Each assistant turn's
tokens are found by rendering the conversation up to the turn (with the generation
prompt) and through it, tokenizing both and checking that each is a token prefix of the
whole rendering: a template that merges tokens across a turn boundary is refused rather
than trained on the wrong tokens. A trained turn stops at its first end-of-sequence token
(a template's trailing newline after it is never generated, so never trained); a template
that ends the turn without one gets it inserted.

Every problem raises `JobFailure(code, message, param)` with the 1-based line number in
the message: `invalid_training_file` / `invalid_validation_file`.

This module knows nothing about how examples are batched or trained.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from stamen.api.training import JobFailure
from stamen.swarm_core.client.distributed import IGNORE_INDEX

__all__ = ["IGNORE_INDEX", "Example", "FileKind", "load_examples"]
CHAT_ROLES = ("system", "developer", "user", "assistant")
FileKind = Literal["training", "validation"]


@dataclass(frozen=True)
class Example:
    """One tokenized line: `labels[t]` is `input_ids[t]` where the loss trains the model
    to produce that token, `IGNORE_INDEX` elsewhere (not yet shifted)."""

    line: int
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def trained_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


class _LineError(Exception):
    """A problem in one line; `load_examples` adds the line number and the job's code."""


def load_examples(
    path: Path,
    tokenizer: Any,
    *,
    eos_token_id: int,
    max_tokens: int,
    kind: FileKind = "training",
) -> list[Example]:
    """Every line of the JSONL file at `path` as an `Example` of at most `max_tokens`
    tokens (the model's context minus the prefix length). Raises `JobFailure`."""
    param = f"{kind}_file"
    code = f"invalid_{kind}_file"
    examples = []
    try:
        for number, line in _lines(path):
            try:
                example = _example(number, line, tokenizer, eos_token_id)
            except _LineError as error:
                raise JobFailure(code, f"{kind} file, line {number}: {error}", param) from None
            if len(example) > max_tokens:
                raise JobFailure(
                    code,
                    f"{kind} file, line {number}: the example is {len(example)} tokens long, "
                    f"more than the {max_tokens} the model's context leaves after the prompt "
                    "prefix",
                    param,
                )
            examples.append(example)
    except (OSError, UnicodeDecodeError) as error:
        raise JobFailure(code, f"the {kind} file cannot be read: {error}", param) from None
    if not examples:
        raise JobFailure(code, f"the {kind} file holds no examples", param)
    return examples


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def _example(number: int, line: str, tokenizer: Any, eos_token_id: int) -> Example:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise _LineError(f"malformed JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(record, dict):
        raise _LineError("each line must be a JSON object")
    if "messages" in record:
        ids, labels = _chat(record["messages"], tokenizer, eos_token_id)
    elif "prompt" in record or "completion" in record:
        ids, labels = _prompt_completion(record, tokenizer, eos_token_id)
    else:
        raise _LineError("missing 'messages' (chat format) or 'prompt' and 'completion'")
    return Example(number, tuple(ids), tuple(labels))


# -- prompt / completion -------------------------------------------------------------------


def _prompt_completion(
    record: dict[str, Any], tokenizer: Any, eos_token_id: int
) -> tuple[list[int], list[int]]:
    prompt, completion = record.get("prompt"), record.get("completion")
    if not isinstance(prompt, str) or not isinstance(completion, str):
        raise _LineError("'prompt' and 'completion' must both be strings")
    if not completion.strip():
        raise _LineError("'completion' is empty: nothing to train on")
    # Tokenized apart, as the completions endpoint tokenizes a prompt and then generates.
    prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    completion_ids = [*tokenizer.encode(completion, add_special_tokens=False), eos_token_id]
    ids = prompt_ids + completion_ids
    return ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids


# -- chat ----------------------------------------------------------------------------------


def _chat(messages: Any, tokenizer: Any, eos_token_id: int) -> tuple[list[int], list[int]]:
    conversation, trained = _conversation(messages)
    full = _render(tokenizer, conversation, generation_prompt=False)
    ids: list[int] = []
    labels: list[int] = []
    done = 0  # tokens of `full` already copied into `ids`
    for index in trained:
        start = _prefix_length(tokenizer, conversation[:index], full, generation_prompt=True)
        end = _prefix_length(tokenizer, conversation[: index + 1], full, generation_prompt=False)
        turn = full[start:end]
        if eos_token_id in turn:
            cut = turn.index(eos_token_id) + 1
            learned, rest = turn[:cut], turn[cut:]
        else:
            learned, rest = [*turn, eos_token_id], []
        ids += full[done:start] + learned + rest
        labels += [IGNORE_INDEX] * (start - done) + learned + [IGNORE_INDEX] * len(rest)
        done = end
    ids += full[done:]
    labels += [IGNORE_INDEX] * (len(full) - done)
    return ids, labels


def _conversation(messages: Any) -> tuple[list[dict[str, str]], list[int]]:
    """The messages as the chat template takes them, and the indices of trained turns."""
    if not isinstance(messages, list) or not messages:
        raise _LineError("'messages' must be a non-empty list")
    conversation: list[dict[str, str]] = []
    trained: list[int] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _LineError(f"{where} must be an object")
        role = message.get("role")
        if (
            role in ("tool", "function")
            or message.get("tool_calls")
            or message.get("function_call")
        ):
            raise _LineError(f"{where}: tool and function calls are not supported for fine-tuning")
        if role not in CHAT_ROLES:
            raise _LineError(f"{where}: unknown role {role!r} (expected one of {CHAT_ROLES})")
        content = _text(message.get("content"), where)
        weight = message.get("weight", 1)
        if "weight" in message and role != "assistant":
            raise _LineError(f"{where}: 'weight' is only allowed on assistant messages")
        if isinstance(weight, bool) or weight not in (0, 1):
            raise _LineError(f"{where}: 'weight' must be 0 or 1, got {weight!r}")
        if role == "assistant" and weight == 1:
            if index == 0:
                raise _LineError("a trained assistant message needs a message before it")
            trained.append(index)
        # Chat templates know "system"; OpenAI defines "developer" as its successor.
        conversation.append({"role": "system" if role == "developer" else role, "content": content})
    if not trained:
        raise _LineError("no assistant message with weight 1: nothing to train on")
    return conversation, trained


def _text(content: Any, where: str) -> str:
    """A message's text: a string, or a list of text parts (OpenAI's content parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise _LineError(f"{where}.content: only text parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise _LineError(f"{where}.content: a text part needs a string 'text'")
            parts.append(text)
        return "".join(parts)
    raise _LineError(f"{where}: 'content' must be a string or a list of text parts")


def _render(
    tokenizer: Any, conversation: Sequence[dict[str, str]], *, generation_prompt: bool
) -> list[int]:
    try:
        text = tokenizer.apply_chat_template(
            list(conversation), add_generation_prompt=generation_prompt, tokenize=False
        )
    except Exception as error:  # jinja errors: the template refused this conversation
        raise _LineError(f"the model's chat template cannot render it: {error}") from None
    return list(tokenizer.encode(text, add_special_tokens=False))


def _prefix_length(
    tokenizer: Any,
    conversation: Sequence[dict[str, str]],
    full: list[int],
    *,
    generation_prompt: bool,
) -> int:
    """How many tokens of `full` the rendering of `conversation` is; refuses a rendering
    that is not a token prefix of `full` (a turn boundary inside a token)."""
    prefix = _render(tokenizer, conversation, generation_prompt=generation_prompt)
    if full[: len(prefix)] != prefix:
        raise _LineError(
            f"the chat template's rendering of message {len(conversation) - 1} does not end on "
            "a token boundary of the whole conversation, so its tokens cannot be told apart"
        )
    return len(prefix)
