"""Constrained decoding: grammars compiled for the model's tokenizer, and a token mask per step.

A `Constraint` is a grammar compiled once for one tokenizer and shared (cached) by every
request that uses it; each choice of a request gets its own matcher from it. The sampling
loop applies the matchers' masks in `stamen.api.sampling` after the logits processors.

Entry points for the serving layer:

- `for_response_format(response_format, tokenizer, param)`: None for text (or no format),
  a `Constraint` for `json_object` / `json_schema`, or an `ApiError` 400 naming the schema
  feature that cannot be enforced.
- `for_grammar(grammar, tokenizer)`: a `Constraint` from an llguidance grammar (Lark
  syntax, `%json` allowed), for tool calls.

This is the interface only; the grammar compiler fills it in.
"""

from __future__ import annotations

from typing import Any

from stamen.api.errors import unsupported


class Constraint:
    """A grammar compiled for one tokenizer (see the module docstring)."""


def for_response_format(
    response_format: dict[str, Any] | None, tokenizer: Any, param: str = "response_format"
) -> Constraint | None:
    if not response_format or response_format.get("type") == "text":
        return None
    raise unsupported(param, f"`{param}` other than 'text'")


def for_grammar(grammar: str, tokenizer: Any) -> Constraint:
    raise NotImplementedError("grammar constraints are not built yet")
