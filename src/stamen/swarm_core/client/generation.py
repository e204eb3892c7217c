"""Token-by-token decoding over any chain of blocks, with transformers' logits processors.

The decoding loop needs three things: a `ClientHead` (embeddings in, logits out), a
`BlockChain` that carries hidden states through every transformer block and remembers
their KV cache (a local chain of spans, or a remote inference session), and a
`DecodingPlan` saying how to pick tokens. It yields one `DecodeStep` per generated token,
so callers can stream, and knows nothing about where the blocks run.

Hugging Face generation arguments are mapped onto a `DecodingPlan` by `plan_from_hf`,
which reuses transformers' own logits processors and stopping criteria and refuses the
arguments it does not implement (beam search, assisted decoding, ...) instead of ignoring
them.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor
from transformers import GenerationConfig
from transformers.generation import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteriaList,
    StopStringCriteria,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from stamen.models.base import ClientHead


class GenerationArgumentError(ValueError):
    """A generation argument is unknown, or known but not implemented here."""


class BlockChain(Protocol):
    """Hidden states through every block of the model, keeping their KV cache.

    `position` is the number of tokens already in the cache; `step` appends `T` tokens.
    """

    @property
    def position(self) -> int: ...

    async def step(self, hidden: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """(B, T, C) -> (B, T, C). `padding_mask` is (B, T) bool, False for left padding."""
        ...


@dataclass
class DecodingPlan:
    """How to choose each next token. Built by `plan_from_hf` or by the API layer."""

    max_new_tokens: int
    logits_processor: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    stopping_criteria: StoppingCriteriaList = field(default_factory=StoppingCriteriaList)
    do_sample: bool = False
    generator: torch.Generator | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0


@dataclass(frozen=True)
class DecodeStep:
    tokens: Tensor  # (B,) long: the chosen token per sequence (pad once finished)
    logits: Tensor  # (B, V) float32: raw logits before any processor
    scores: Tensor  # (B, V) float32: logits after the processors (what was sampled from)
    finished: Tensor  # (B,) bool: sequences finished after this token


# Arguments that transformers' `generate` takes and that we implement (besides the
# GenerationConfig fields read in `_processors`).
_IMPLEMENTED_FLAGS = {
    "max_new_tokens",
    "max_length",
    "min_length",
    "min_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "bad_words_ids",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "stop_strings",
    "use_cache",
    "num_return_sequences",
    "num_beams",
}


def plan_from_hf(
    base: GenerationConfig | None,
    *,
    input_length: int,
    generation_config: GenerationConfig | None = None,
    logits_processor: LogitsProcessorList | None = None,
    stopping_criteria: StoppingCriteriaList | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    **kwargs: Any,
) -> DecodingPlan:
    """Map Hugging Face `generate` arguments to a plan; refuse what is not implemented."""
    config = copy.deepcopy(generation_config or base or GenerationConfig())
    unknown = config.update(**kwargs)
    if unknown:
        raise GenerationArgumentError(f"unknown generation arguments: {sorted(unknown)}")
    _refuse_unimplemented(config, set(kwargs))
    if config.max_new_tokens is not None:
        max_new_tokens = config.max_new_tokens
    elif config.max_length is not None:
        max_new_tokens = config.max_length - input_length
    else:
        max_new_tokens = 20
    if max_new_tokens < 1:
        raise GenerationArgumentError(
            f"nothing to generate: max_new_tokens={max_new_tokens} for a {input_length}-token input"
        )
    eos = config.eos_token_id
    eos_ids = tuple([eos] if isinstance(eos, int) else (eos or []))
    pad = config.pad_token_id if config.pad_token_id is not None else (eos_ids or (0,))[0]
    processors = _processors(config, input_length, eos_ids)
    processors.extend(logits_processor or [])
    criteria = StoppingCriteriaList(stopping_criteria or [])
    if config.stop_strings:
        if tokenizer is None:
            raise GenerationArgumentError("stop_strings needs a tokenizer: pass tokenizer=...")
        criteria.append(StopStringCriteria(tokenizer, config.stop_strings))
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return DecodingPlan(
        max_new_tokens=max_new_tokens,
        logits_processor=processors,
        stopping_criteria=criteria,
        do_sample=bool(config.do_sample),
        generator=generator,
        eos_token_ids=eos_ids,
        pad_token_id=int(pad),
    )


def _refuse_unimplemented(config: GenerationConfig, given: set[str]) -> None:
    if (config.num_beams or 1) > 1:
        raise GenerationArgumentError("beam search (num_beams > 1) is not supported")
    if (config.num_return_sequences or 1) > 1:
        raise GenerationArgumentError(
            "num_return_sequences > 1 is not supported: repeat the prompt in the batch instead"
        )
    not_ours = sorted(
        name
        for name in given - _IMPLEMENTED_FLAGS
        if name not in {"output_scores", "return_dict_in_generate"}
    )
    if not_ours:
        raise GenerationArgumentError(f"generation arguments not supported here: {not_ours}")


def _processors(
    config: GenerationConfig, input_length: int, eos_ids: tuple[int, ...]
) -> LogitsProcessorList:
    """transformers' processors, in the order its own `generate` applies them."""
    out = LogitsProcessorList()
    if config.repetition_penalty not in (None, 1.0):
        out.append(RepetitionPenaltyLogitsProcessor(config.repetition_penalty))
    if config.no_repeat_ngram_size:
        out.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.bad_words_ids:
        out.append(NoBadWordsLogitsProcessor(config.bad_words_ids, list(eos_ids) or None))
    if eos_ids and config.min_length:
        out.append(MinLengthLogitsProcessor(config.min_length, list(eos_ids)))
    if eos_ids and config.min_new_tokens:
        out.append(
            MinNewTokensLengthLogitsProcessor(input_length, config.min_new_tokens, list(eos_ids))
        )
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            out.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            out.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            out.append(TopPLogitsWarper(config.top_p))
        if config.min_p is not None:
            out.append(MinPLogitsWarper(config.min_p))
        if config.typical_p is not None and config.typical_p < 1.0:
            out.append(TypicalLogitsWarper(config.typical_p))
    return out


@torch.inference_mode()
def _last_logits(head: ClientHead, hidden: Tensor) -> Tensor:
    return head.logits(hidden[:, -1:])[:, -1]


async def decode(
    head: ClientHead,
    chain: BlockChain,
    input_ids: Tensor,
    plan: DecodingPlan,
    attention_mask: Tensor | None = None,
) -> AsyncIterator[DecodeStep]:
    """Prefill `input_ids` (B, T) through `chain`, then yield one `DecodeStep` per token.

    `attention_mask` (B, T) marks real tokens (0 for left padding). The loop stops after
    `plan.max_new_tokens` tokens, or once every sequence hit EOS or a stopping criterion.
    """
    B = input_ids.shape[0]
    all_ids = input_ids
    padding_mask = None if attention_mask is None else attention_mask.bool()
    unfinished = torch.ones(B, dtype=torch.bool)
    eos = torch.tensor(plan.eos_token_ids, dtype=torch.long)
    hidden = head.embed(input_ids)  # (B, T, C)
    for _ in range(plan.max_new_tokens):
        out = await chain.step(hidden, padding_mask)
        # The LM head is the client's one big matmul (milliseconds for a large vocabulary):
        # off the event loop, so that concurrent sessions keep streaming.
        logits = (await asyncio.to_thread(_last_logits, head, out)).float()  # (B, V)
        scores = plan.logits_processor(all_ids, logits)  # type: ignore[arg-type]
        if plan.do_sample:
            probs = torch.softmax(scores, dim=-1)
            tokens = torch.multinomial(probs, 1, generator=plan.generator).squeeze(1)
        else:
            tokens = scores.argmax(dim=-1)
        tokens = torch.where(unfinished, tokens, plan.pad_token_id)
        all_ids = torch.cat([all_ids, tokens[:, None]], dim=1)
        done = torch.isin(tokens, eos) if len(eos) else torch.zeros(B, dtype=torch.bool)
        if plan.stopping_criteria:
            done |= plan.stopping_criteria(all_ids, scores).reshape(B)
        unfinished &= ~done
        yield DecodeStep(tokens, logits, scores, ~unfinished)
        if not unfinished.any():
            return
        hidden = head.embed(tokens[:, None])  # (B, 1, C)
        padding_mask = None if padding_mask is None else torch.ones(B, 1, dtype=torch.bool)
