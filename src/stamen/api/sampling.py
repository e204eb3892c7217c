"""OpenAI's sampling parameters as a `DecodingPlan`, and stop-sequence tracking.

OpenAI applies, in this order: frequency and presence penalties and `logit_bias` to the
raw logits, then temperature and nucleus (`top_p`) sampling. Temperature 0 (or top_p 0)
means greedy, and so does a temperature below `MIN_TEMPERATURE`: dividing logits by it
overflows float32 to inf (a fuzzer's 2e-46 made the softmax NaN), and the distribution
is one-hot well before that anyway. The penalties count only generated tokens (OpenAI's formula):

    logits[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty

Under a `Constraint` (structured outputs, tool calls), each row has its own grammar matcher
(`ConstrainedRows`): its mask of the tokens the grammar allows is applied after every
other processor, so that sampling and greedy picks only ever see allowed tokens. With
`top_p` the mask is applied before the nucleus too: a nucleus drawn from the raw
distribution may hold no allowed token at all (a model that wants to open a code fence
where the grammar wants `{`), and masking it afterwards would leave nothing to sample;
the nucleus of the allowed tokens is what OpenAI's samplers draw from. The tokens
chosen are consumed by `GrammarAdvance` (a stopping criterion, so it runs as soon as a
step's tokens exist), which starts the next masks in a worker thread while the hidden
states travel through the swarm; a row whose grammar is complete allows only EOS, so
it ends as any other row does (finish reason "stop").

`StopTracker` turns the token ids of one choice into text deltas, holding back text that
could still become a stop sequence or that ends in half a UTF-8 character.

This module knows nothing about HTTP or about where the blocks run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers.generation import (
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from stamen.api.constrained import ConstrainedRows, Constraint
from stamen.swarm_core.client.generation import DecodingPlan

MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """The validated sampling knobs of one request (one prompt, `n` choices)."""

    max_new_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE or self.top_p == 0.0


class PenaltyProcessor(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the tokens generated so far."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length = prompt_length
        self.presence = presence
        self.frequency = frequency

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        generated = input_ids[:, self.prompt_length :]  # (B, t)
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )  # (B, V)
        return scores - counts * self.frequency - (counts > 0).to(scores.dtype) * self.presence


class LogitBiasProcessor(LogitsProcessor):
    """Adds OpenAI's `logit_bias` (token id -> bias in [-100, 100]) to the logits."""

    def __init__(self, bias: Mapping[int, float], vocab_size: int) -> None:
        self.bias = torch.zeros(vocab_size)
        for token_id, value in bias.items():
            self.bias[token_id] = value

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return scores + self.bias.to(scores.dtype)


class StoppedRows(StoppingCriteria):
    """Ends rows that the serving layer finished (a stop sequence was seen)."""

    def __init__(self, batch_size: int) -> None:
        self.stopped = torch.zeros(batch_size, dtype=torch.bool)

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        return self.stopped.clone()


class GrammarMask(LogitsProcessor):
    """Sets the logits of the tokens the rows' grammars do not allow to -inf."""

    def __init__(self, rows: ConstrainedRows) -> None:
        self.rows = rows

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        mask = self.rows.logit_mask()  # (B, V): 0 or -inf
        if mask.shape[1] < scores.shape[1]:  # logits wider than the tokenizer
            extra = scores.shape[1] - mask.shape[1]
            mask = torch.nn.functional.pad(mask, (0, extra), value=float("-inf"))
        if mask.device != scores.device or mask.dtype != scores.dtype:
            mask = mask.to(scores.device, scores.dtype, non_blocking=True)
        return scores + mask


class GrammarAdvance(StoppingCriteria):
    """Hands each step's tokens to the rows' matchers (the next masks start computing).

    It never ends a row itself: a finished grammar allows only EOS at the next step.
    """

    def __init__(self, rows: ConstrainedRows, stopped: StoppedRows) -> None:
        self.rows = rows
        self.stopped = stopped

    def __call__(self, input_ids: Tensor, scores: Tensor, **kwargs: Any) -> Tensor:
        self.rows.advance(input_ids[:, -1].tolist(), self.stopped.stopped.tolist())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def make_plan(
    params: SamplingParams,
    *,
    prompt_length: int,
    vocab_size: int,
    eos_token_ids: Sequence[int],
    stopped: StoppedRows,
    constraint: Constraint | None = None,
) -> DecodingPlan:
    processors = LogitsProcessorList()
    if params.presence_penalty or params.frequency_penalty:
        processors.append(
            PenaltyProcessor(prompt_length, params.presence_penalty, params.frequency_penalty)
        )
    if params.logit_bias:
        processors.append(LogitBiasProcessor(params.logit_bias, vocab_size))
    rows = None
    if constraint is not None:
        rows = ConstrainedRows(constraint, params.n, vocab_size, eos_token_ids)
    if not params.greedy:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_p < 1.0:
            if rows is not None:
                processors.append(GrammarMask(rows))
            processors.append(TopPLogitsWarper(params.top_p))
    criteria = StoppingCriteriaList([stopped])
    if rows is not None:
        processors.append(GrammarMask(rows))  # last: nothing after it can revive a token
        criteria.append(GrammarAdvance(rows, stopped))
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()  # a fresh random seed: the default one is a constant
    else:
        generator.manual_seed(params.seed)
    return DecodingPlan(
        max_new_tokens=params.max_new_tokens,
        logits_processor=processors,
        stopping_criteria=criteria,
        do_sample=not params.greedy,
        generator=generator,
        eos_token_ids=tuple(eos_token_ids),
        pad_token_id=eos_token_ids[0] if eos_token_ids else 0,
    )


class StopTracker:
    """Text of one choice, released in deltas that never contain (part of) a stop sequence."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self._tokenizer = tokenizer
        self._stop = [s for s in stop if s]
        self._token_ids: list[int] = []
        self._emitted = 0  # characters of text already released
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append one generated token; return the newly releasable text."""
        self._token_ids.append(token_id)
        text = self._tokenizer.decode(self._token_ids, skip_special_tokens=True)
        search_from = max(0, self._emitted - max((len(s) for s in self._stop), default=0))
        cut = min((i for s in self._stop if (i := text.find(s, search_from)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self.text = text[:cut]
        else:
            self.text = text
            safe = len(text.rstrip("\ufffd")) if text.endswith("\ufffd") else len(text)
            return self._release(min(safe, len(text) - self._held_back(text)))
        return self._release(len(self.text))

    def flush(self) -> str:
        """At the end of generation: release whatever was held back (no stop came)."""
        return self._release(len(self.text))

    def _held_back(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for size in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:size]):
                    longest = size
                    break
        return longest

    def _release(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
