"""Stop sequences, OpenAI's penalties and logit bias, without a model."""

from __future__ import annotations

import pytest
import torch

from stamen.api.sampling import (
    LogitBiasProcessor,
    PenaltyProcessor,
    SamplingParams,
    StoppedRows,
    StopTracker,
    make_plan,
)


class PieceTokenizer:
    """Token i decodes to pieces[i]; enough to drive a StopTracker."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(self.pieces[i] for i in ids)


def run(pieces: list[str], stop: list[str]) -> tuple[list[str], StopTracker]:
    tracker = StopTracker(PieceTokenizer(pieces), stop)
    deltas = []
    for token_id in range(len(pieces)):
        deltas.append(tracker.add(token_id))
        if tracker.stopped:
            break
    else:
        deltas.append(tracker.flush())
    return deltas, tracker


def test_stop_sequence_split_across_tokens_is_cut_and_never_streamed() -> None:
    deltas, tracker = run(["Hello", " wor", "ld", "!", " more"], ["world!"])
    assert tracker.stopped
    assert "".join(deltas) == "Hello "
    assert tracker.text == "Hello "


def test_text_that_only_looks_like_a_stop_prefix_is_released_later() -> None:
    deltas, tracker = run(["a", "b", "x", "c"], ["bc"])
    assert not tracker.stopped
    assert deltas == ["a", "", "bx", "c", ""]
    assert "".join(deltas) == "abxc"


def test_earliest_of_several_stops_wins() -> None:
    deltas, tracker = run(["one two three"], ["three", "two"])
    assert tracker.stopped and "".join(deltas) == "one "


class PrefixTokenizer:
    """decode(ids) = texts[len(ids) - 1]: models a character split over two tokens."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = texts

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.texts[len(ids) - 1]


def test_half_a_utf8_character_is_held_back_until_complete() -> None:
    tracker = StopTracker(PrefixTokenizer(["caf", "caf\ufffd", "café!"]), [])
    assert [tracker.add(i) for i in range(3)] == ["caf", "", "é!"]


def test_penalties_follow_openais_formula_on_generated_tokens_only() -> None:
    prompt_length = 2
    input_ids = torch.tensor([[3, 3, 1, 1, 2]])  # prompt [3, 3], generated [1, 1, 2]
    scores = torch.zeros(1, 5)
    out = PenaltyProcessor(prompt_length, presence=0.5, frequency=0.25)(input_ids, scores)
    expected = torch.tensor([[0.0, -(2 * 0.25 + 0.5), -(0.25 + 0.5), 0.0, 0.0]])
    torch.testing.assert_close(out, expected)


def test_logit_bias_adds_to_the_named_tokens() -> None:
    out = LogitBiasProcessor({1: 100.0, 3: -100.0}, vocab_size=4)(
        torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 4)
    )
    torch.testing.assert_close(out, torch.tensor([[1.0, 101.0, 1.0, -99.0]]))


@pytest.mark.parametrize("stop", [[""], []])
def test_empty_stop_strings_stop_nothing(stop: list[str]) -> None:
    deltas, tracker = run(["a", "b"], stop)
    assert not tracker.stopped and "".join(deltas) == "ab"


@pytest.mark.parametrize("temperature", [2.00358089787901e-46, 1e-30, 1e-6])
def test_a_vanishing_temperature_decodes_greedily_instead_of_overflowing(
    temperature: float,
) -> None:
    """logits / 2e-46 is inf in float32 and made the softmax NaN (a 500 found by fuzzing)."""
    params = SamplingParams(max_new_tokens=1, temperature=temperature, logit_bias={3: -100.0})
    plan = make_plan(
        params, prompt_length=2, vocab_size=8, eos_token_ids=[0], stopped=StoppedRows(1)
    )
    assert not plan.do_sample
    scores = plan.logits_processor(torch.tensor([[1, 2]]), torch.randn(1, 8) * 30)
    assert torch.isfinite(scores).all()


def test_a_small_but_usable_temperature_still_samples() -> None:
    params = SamplingParams(max_new_tokens=1, temperature=1e-3)
    plan = make_plan(
        params, prompt_length=2, vocab_size=8, eos_token_ids=[0], stopped=StoppedRows(1)
    )
    assert plan.do_sample
    probs = torch.softmax(plan.logits_processor(torch.tensor([[1, 2]]), torch.randn(1, 8)), -1)
    assert torch.isfinite(probs).all()
