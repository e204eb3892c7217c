"""Constrained decoding: grammars compiled for the model's tokenizer, and a matcher per choice.

A `Constraint` is a grammar compiled once for one tokenizer and shared (cached) by every
request that uses it; each choice of a request gets its own matcher from it
(`Constraint.matcher()`, a copy of a compiled template: about a microsecond). The
sampling loop applies the matchers' masks in `stamen.api.sampling`.

Entry points for the serving layer:

- `for_response_format(response_format, tokenizer, param)`: None for text (or no format),
  a `Constraint` for `json_object` / `json_schema`, or an `APIError` 400 naming the schema
  feature that cannot be enforced, or what is wrong with the format.
- `for_grammar(grammar, tokenizer)`: a `Constraint` from an llguidance grammar (Lark
  syntax, `%json {...}` allowed), for tool calls; a grammar llguidance refuses raises
  `GrammarError` (a `ValueError`) with llguidance's message.

Grammars are compiled by llguidance (the JSON schema compiler and the Lark front end);
compiling a typical schema takes about a millisecond, converting the tokenizer about
half a second (once per tokenizer, cached too). Both caches are bounded LRUs keyed by
the tokenizer's identity and the canonical grammar text (a schema as compact JSON, its key order kept: it is the
order of the output's keys).

JSON is generated with bounded whitespace: at most `MAX_WHITESPACE` blank characters
between two JSON tokens, so a small model cannot spend its whole token budget on
newlines, and none after the value (the grammar then ends, and only EOS is allowed).

`strict: true` means every output validates against the schema, so a schema keyword that
llguidance cannot enforce is a 400. `strict: false` (OpenAI's default) constrains to the
schema with such keywords left out (llguidance's lenient mode): the output is JSON that
follows every enforceable part of the schema.

This module knows nothing about HTTP or about where the blocks run.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask

from stamen.api.errors import APIError, invalid_request, unsupported

logger = logging.getLogger(__name__)

MAX_CACHED_GRAMMARS = 256
MAX_CACHED_TOKENIZERS = 8
MAX_WHITESPACE = 16  # blank characters allowed between two JSON tokens
MAX_SCHEMA_BYTES = 256 * 1024  # of canonical JSON; a request body is bounded too
MAX_MESSAGE_CHARS = 300  # of a compiler message quoted in an error
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for json_schema.name
_JSON_SCHEMA_KEYS = {"name", "description", "schema", "strict"}
# Messages of llguidance's JSON compiler for a schema that is valid JSON Schema but
# uses what it cannot enforce (as opposed to a schema that is wrong).
_UNSUPPORTED = re.compile(
    r"Unimplemented keys|not supported|only supported|Unknown format|unsupported", re.I
)
_COMPILE_OPTIONS: dict[str, Any] = {
    "whitespace_flexible": True,
    "whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{0,{MAX_WHITESPACE}}}",
}


class GrammarError(ValueError):
    """llguidance refused a grammar; the message is llguidance's own."""


@dataclass(frozen=True, eq=False)
class Constraint:
    """A grammar compiled for one tokenizer; `matcher()` gives each choice its own state.

    `initial_mask` is the template's bitmask before any token (int32, one bit per token
    of `tokenizer`), computed at compile time, so the first step of every choice costs
    nothing. `compile_s` is what compiling took (the grammar, plus its first mask).
    """

    grammar: str = field(repr=False)  # llguidance's grammar text (what `LLMatcher` took)
    tokenizer: llguidance.LLTokenizer = field(repr=False)
    compile_s: float
    initial_mask: torch.Tensor = field(repr=False)  # (1, ceil(vocab/32)) int32
    _template: llguidance.LLMatcher = field(repr=False)

    def matcher(self) -> llguidance.LLMatcher:
        """A fresh matcher at the start of the grammar, independent of every other one."""
        return self._template.deep_copy()

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    @property
    def eos_token_id(self) -> int:
        return int(self.tokenizer.eos_token)


class _Lru:
    """A small thread-safe LRU map (requests compile on the event loop and in threads)."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Any) -> Any:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Any, value: Any) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


_tokenizers = _Lru(MAX_CACHED_TOKENIZERS)
_grammars = _Lru(MAX_CACHED_GRAMMARS)


def cache_clear() -> None:
    """Forget every compiled grammar (tokenizers stay): for measuring a cold compile."""
    _grammars.clear()


def ll_tokenizer(tokenizer: Any) -> llguidance.LLTokenizer:
    """llguidance's view of a Hugging Face fast tokenizer, converted once per tokenizer.

    The entry holds the tokenizer itself too, so that its `id` cannot be reused by another
    object while the entry lives.
    """
    entry = _tokenizers.get(id(tokenizer))
    if entry is None or entry[0] is not tokenizer:
        try:
            converted = llguidance.hf.from_tokenizer(tokenizer)
        except ValueError as error:  # a slow (pure Python) tokenizer
            raise GrammarError(f"constrained decoding needs a fast tokenizer: {error}") from error
        entry = (tokenizer, converted)
        _tokenizers.put(id(tokenizer), entry)
    return entry[1]


def compile_grammar(grammar: str, tokenizer: Any) -> Constraint:
    """`grammar` (llguidance's text: Lark, or the JSON that `grammar_from_*` returns)
    compiled for `tokenizer`, from the cache when it was compiled before."""
    ll = ll_tokenizer(tokenizer)
    key = (id(ll), grammar)
    cached: Constraint | None = _grammars.get(key)
    if cached is not None and cached.tokenizer is ll:  # an id is unique while ll lives
        return cached
    started = time.perf_counter()
    template = llguidance.LLMatcher(ll, grammar, log_level=0)
    if template.is_error():
        raise GrammarError(template.get_error())
    mask = allocate_token_bitmask(1, ll.vocab_size)
    fill_next_token_bitmask(template, mask)
    if template.is_error():  # some errors show only once the lexer starts
        raise GrammarError(template.get_error())
    constraint = Constraint(grammar, ll, time.perf_counter() - started, mask, template)
    for warning in template.get_grammar_warnings():
        logger.info("grammar warning: %s", warning)
    _grammars.put(key, constraint)
    return constraint


def for_grammar(grammar: str, tokenizer: Any) -> Constraint:
    """A constraint from an llguidance Lark grammar (`%json {...}` allowed inside)."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise GrammarError("the grammar is empty")
    return compile_grammar(llguidance.LLMatcher.grammar_from_lark(grammar), tokenizer)


def for_json_schema(schema: dict[str, Any], tokenizer: Any, *, lenient: bool = False) -> Constraint:
    """A constraint to JSON that validates against `schema` (llguidance's JSON compiler).

    `lenient` leaves out the keywords llguidance cannot enforce instead of refusing them.
    Raises `GrammarError` for a schema llguidance refuses.
    """
    options = dict(_COMPILE_OPTIONS, lenient=lenient)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            _canonical(schema),
            overrides=options,  # type: ignore[arg-type]
        )
    except ValueError as error:
        raise GrammarError(str(error)) from error
    return compile_grammar(grammar, tokenizer)


def _canonical(schema: dict[str, Any]) -> str:
    # Not sorted: the order of `properties` is the order the output's keys come in.
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)


def for_response_format(
    response_format: dict[str, Any] | None, tokenizer: Any, param: str = "response_format"
) -> Constraint | None:
    """OpenAI's `response_format` as a constraint (None for text), or a 400 `APIError`."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise invalid_request(f"Invalid '{param}': expected an object.", param=param)
    kind = response_format.get("type")
    extra = set(response_format) - {"type", "json_schema"}
    if extra:
        raise unsupported(f"{param}.{sorted(extra)[0]}")
    match kind:
        case "text":
            return None
        case "json_object":
            return _compile_or_400({"type": "object"}, tokenizer, param, lenient=False)
        case "json_schema":
            return _json_schema(response_format.get("json_schema"), tokenizer, param)
    raise invalid_request(
        f"Invalid value for '{param}.type': {kind!r}. Supported values are: 'text', "
        "'json_object' and 'json_schema'.",
        param=f"{param}.type",
        code="invalid_value",
    )


def _json_schema(spec: Any, tokenizer: Any, param: str) -> Constraint:
    where = f"{param}.json_schema"
    if not isinstance(spec, dict):
        raise invalid_request(
            f"Missing required parameter: '{where}' (an object with a 'name' and a 'schema').",
            param=where,
            code="missing_required_parameter",
        )
    extra = set(spec) - _JSON_SCHEMA_KEYS
    if extra:
        raise unsupported(f"{where}.{sorted(extra)[0]}")
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise invalid_request(
            f"Invalid '{where}.name': {name!r} must be 1 to 64 characters of a-z, A-Z, 0-9, "
            "underscores and dashes.",
            param=f"{where}.name",
            code="invalid_value",
        )
    if not isinstance(spec.get("description", ""), str):
        raise invalid_request(
            f"Invalid '{where}.description': expected a string.", param=f"{where}.description"
        )
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid_request(
            f"Invalid '{where}.strict': expected a boolean.", param=f"{where}.strict"
        )
    schema = spec.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise invalid_request(
            f"Invalid schema for response_format '{name}': the schema must be a JSON object.",
            param=f"{where}.schema",
            code="invalid_json_schema",
        )
    return _compile_or_400(schema, tokenizer, f"{where}.schema", lenient=not strict, name=name)


def _compile_or_400(
    schema: dict[str, Any], tokenizer: Any, param: str, *, lenient: bool, name: str = ""
) -> Constraint:
    if len(_canonical(schema)) > MAX_SCHEMA_BYTES:
        raise invalid_request(
            f"Invalid schema for response_format '{name}': larger than {MAX_SCHEMA_BYTES} bytes.",
            param=param,
            code="invalid_json_schema",
        )
    try:
        return for_json_schema(schema, tokenizer, lenient=lenient)
    except GrammarError as error:
        raise _schema_error(str(error), param, name) from error


def _schema_error(message: str, param: str, name: str) -> APIError:
    detail = " ".join(message.split())[:MAX_MESSAGE_CHARS] or "refused by the compiler"
    if _UNSUPPORTED.search(message):
        return APIError(
            400,
            f"Invalid schema for response_format '{name}': {detail}. This server cannot "
            "enforce that schema feature; remove it, or set 'strict' to false to constrain "
            "the output to the rest of the schema.",
            param=param,
            code="unsupported_parameter",
        )
    return invalid_request(
        f"Invalid schema for response_format '{name}': {detail}",
        param=param,
        code="invalid_json_schema",
    )


# -- the matchers of one request, one per row ----------------------------------------------

_worker = ThreadPoolExecutor(max_workers=2, thread_name_prefix="grammar-mask")


class ConstrainedRows:
    """The matchers of one request's rows, and the mask of each row's next token.

    The sampling loop calls `advance(tokens)` as soon as it has chosen a step's tokens;
    consuming them and computing the next masks then runs in a worker thread (llguidance
    releases the GIL) while the hidden states travel through the swarm, and
    `logit_mask()` at the next step only picks the result up. A row whose grammar is
    complete, or that has ended (EOS, or stopped by the caller), allows EOS only.

    The mask is handed over as an additive float tensor (0 or -inf per token), built in
    the worker: the loop then pays one addition (about 0.1 ms for 49k tokens here),
    where `masked_fill` with a fresh bool mask measured 13 ms per step on this CPU.

    `mask_s` is the worker's time per step (consume + mask + unpack, all rows),
    `wait_s` the time the loop waited for it (zero when the mask was ready in time).
    """

    def __init__(
        self,
        constraint: Constraint,
        batch_size: int,
        vocab_size: int,
        eos_token_ids: Sequence[int],
    ) -> None:
        self.constraint = constraint
        self.vocab_size = vocab_size
        self.eos_token_ids = [t for t in eos_token_ids if 0 <= t < vocab_size]
        if constraint.eos_token_id < vocab_size:
            self.eos_token_ids.append(constraint.eos_token_id)
        self.matchers = [constraint.matcher() for _ in range(batch_size)]
        self.ended = [False] * batch_size
        self.errors: list[str] = []
        self.mask_s: list[float] = []
        self.wait_s: list[float] = []
        self._bitmask = constraint.initial_mask.repeat(batch_size, 1)  # (B, W) int32
        self._pending: Future[torch.Tensor] | None = _worker.submit(self._unpack)
        self._current = torch.zeros(batch_size, vocab_size)

    def advance(self, tokens: Sequence[int], stopped: Sequence[bool]) -> None:
        """Tokens chosen for every row (pads for ended rows); `stopped` rows end here."""
        self._pending = _worker.submit(self._step, list(tokens), list(stopped))

    def logit_mask(self) -> torch.Tensor:
        """(B, V) float32 to add to the logits: 0 where a row may go next, -inf elsewhere."""
        if self._pending is not None:
            started = time.perf_counter()
            self._current = self._pending.result()
            self._pending = None
            self.wait_s.append(time.perf_counter() - started)
        return self._current

    def _step(self, tokens: list[int], stopped: list[bool]) -> torch.Tensor:
        started = time.perf_counter()
        for row, matcher in enumerate(self.matchers):
            if self.ended[row]:
                continue
            token = tokens[row]
            if stopped[row] or token in self.eos_token_ids:
                self.ended[row] = True
            elif not matcher.consume_token(token):
                self.ended[row] = True  # cannot happen under the mask; never loop on it
                self.errors.append(matcher.get_error())
                logger.warning("grammar refused a sampled token: %s", matcher.get_error())
            else:
                fill_next_token_bitmask(matcher, self._bitmask, row)
        out = self._unpack()
        self.mask_s.append(time.perf_counter() - started)
        return out

    def _unpack(self) -> torch.Tensor:
        """The bitmask as an additive (B, V) mask, with EOS as the rows' state says."""
        words = self._bitmask.numpy().view(np.uint8)
        bits = np.unpackbits(words, axis=1, bitorder="little")[:, : self.vocab_size]
        if bits.shape[1] < self.vocab_size:  # the model's vocabulary is larger: the rest never
            bits = np.pad(bits, ((0, 0), (0, self.vocab_size - bits.shape[1])))
        eos = self.eos_token_ids
        ll_eos = self.constraint.eos_token_id
        for row, matcher in enumerate(self.matchers):
            if self.ended[row] or matcher.is_stopped():
                bits[row] = 0
                bits[row, eos] = 1
            elif eos:
                bits[row, eos] = bits[row, ll_eos] if ll_eos < bits.shape[1] else 0
        return torch.from_numpy(np.where(bits == 0, np.float32(-np.inf), np.float32(0)))
