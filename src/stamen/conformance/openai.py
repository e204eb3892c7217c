"""OpenAI API contract suite, run with the official `openai` SDK against any server.

    python -m stamen.conformance.openai --base-url http://127.0.0.1:8000/v1 --model M [--api-key K]
        [--section core --section tools ...] [--fine-tuning]

Each check talks to the server through the SDK (sync and async clients, streaming and
not) and asserts what a user of the SDK relies on. The sections:

- `core`: response shapes, parameters honoured (stop, n, seed, logprobs, logit_bias, max
  tokens, prompt forms, echo), stream chunk sequences, and errors (404 unknown model, 400
  invalid or unsupported parameters);
- `structured`: `response_format` json_object and json_schema (`openai_structured`);
- `tools`: tool calling, auto / required / named / parallel, streamed deltas and a
  follow-up turn (`openai_tools`);
- `responses`: the Responses API, events, conversations, the store (`openai_responses`).

Every section runs by default. With `--fine-tuning` it also runs the files and fine-tuning
jobs cases (`openai_fine_tuning`), which train small jobs on the server. It prints a
pass/fail table; `main` exits non-zero if any check failed. `run_suite` returns the
results for use from tests.

The suite assumes a small chat model with a context shorter than 10^6 tokens; it needs
no knowledge of how the server runs the model.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai

PROMPT: Any = [{"role": "user", "content": "Name three colors."}]


class CheckFailed(AssertionError):
    pass


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


@dataclass
class Result:
    name: str
    passed: bool
    detail: str = ""


@dataclass
class Suite:
    client: Any  # openai.OpenAI: used dynamically, responses checked at run time
    new_async_client: Callable[[], Any]  # a fresh openai.AsyncOpenAI per event loop
    model: str
    # extra fields sent with every fine-tuning job (`extra_body`), e.g. a prefix length
    fine_tuning_extra: dict[str, Any] | None = None

    def chat(self, **kwargs: Any) -> Any:
        kwargs.setdefault("messages", PROMPT)
        kwargs.setdefault("max_tokens", 12)
        return self.client.chat.completions.create(model=self.model, **kwargs)

    def greedy_text(self, **kwargs: Any) -> str:
        return self.chat(temperature=0, **kwargs).choices[0].message.content or ""

    def expect_status(self, status: int, call: Callable[[], Any], param: str | None = None) -> None:
        try:
            call()
        except openai.APIStatusError as error:
            expect(error.status_code == status, f"status {error.status_code}, expected {status}")
            body = error.body if isinstance(error.body, dict) else {}
            expect({"message", "type"} <= set(body), f"error body not in OpenAI shape: {body}")
            if param is not None:
                expect(
                    body.get("param") == param, f"error param {body.get('param')!r} != {param!r}"
                )
            return
        raise CheckFailed(f"expected HTTP {status}, the request succeeded")


# -- checks --------------------------------------------------------------------------------


def check_models(suite: Suite) -> None:
    ids = [model.id for model in suite.client.models.list()]
    expect(suite.model in ids, f"{suite.model} not in {ids}")
    expect(suite.client.models.retrieve(suite.model).id == suite.model, "retrieve gave another id")


def check_chat_shape(suite: Suite) -> None:
    response = suite.chat(temperature=0)
    expect(response.id.startswith("chatcmpl-"), f"id {response.id}")
    expect(response.object == "chat.completion", f"object {response.object}")
    expect(response.model == suite.model and response.created > 0, "model/created")
    expect(bool(response.system_fingerprint), "no system_fingerprint")
    choice = response.choices[0]
    expect(choice.message.role == "assistant" and bool(choice.message.content), "empty message")
    expect(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason}")
    usage = response.usage
    expect(usage is not None and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens,
           f"usage {usage}")  # fmt: skip


def check_max_tokens(suite: Suite) -> None:
    for name in ("max_tokens", "max_completion_tokens"):
        messages = [{"role": "user", "content": "Write a long story about a dragon."}]
        kwargs = {"messages": messages, "temperature": 0, "max_tokens": None, name: 3}
        response = suite.client.chat.completions.create(model=suite.model, **kwargs)
        expect(response.choices[0].finish_reason == "length", f"{name}: not 'length'")
        expect(response.usage.completion_tokens == 3, f"{name}: {response.usage}")


def check_stream(suite: Suite) -> None:
    expected = suite.greedy_text()
    chunks = list(suite.chat(temperature=0, stream=True))
    expect(len({chunk.id for chunk in chunks}) == 1, "more than one id in the stream")
    expect(all(c.object == "chat.completion.chunk" for c in chunks), "chunk object name")
    expect(chunks[0].choices[0].delta.role == "assistant", "first delta has no role")
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expect(text == expected, f"streamed {text!r} != non-streamed {expected!r}")
    expect(chunks[-1].choices[0].finish_reason in ("stop", "length"), "no finish_reason at end")


def check_stream_usage(suite: Suite) -> None:
    chunks = list(suite.chat(stream=True, stream_options={"include_usage": True}))
    last = chunks[-1]
    expect(last.choices == [] and last.usage is not None, "no final usage chunk")
    expect(all(c.usage is None for c in chunks[:-1]), "usage before the last chunk")


def check_async(suite: Suite) -> None:
    async def run() -> tuple[str, str]:
        async with suite.new_async_client() as aclient:
            return await ask(aclient)

    async def ask(aclient: Any) -> tuple[str, str]:
        plain = await aclient.chat.completions.create(
            model=suite.model, messages=PROMPT, temperature=0, max_tokens=8
        )
        stream = await aclient.chat.completions.create(
            model=suite.model, messages=PROMPT, temperature=0, max_tokens=8, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return plain.choices[0].message.content or "", text

    plain, streamed = asyncio.run(run())
    expect(plain == streamed, f"async {plain!r} != async stream {streamed!r}")


def check_stop(suite: Suite) -> None:
    text = suite.greedy_text(max_tokens=16)
    words = text.split()
    expect(len(words) >= 2, f"too short to test stop: {text!r}")
    stop = " " + words[1]
    response = suite.chat(temperature=0, max_tokens=16, stop=[stop, "zzzz"])
    content = response.choices[0].message.content or ""
    expect(stop not in content and text.startswith(content), f"{content!r} with stop {stop!r}")
    expect(response.choices[0].finish_reason == "stop", "finish_reason not 'stop'")


def check_n_and_seed(suite: Suite) -> None:
    response = suite.chat(n=2, temperature=1, seed=1)
    expect([c.index for c in response.choices] == [0, 1], "n=2 did not give choices 0 and 1")
    again = suite.chat(n=2, temperature=1, seed=1)
    expect(
        [c.message.content for c in response.choices] == [c.message.content for c in again.choices],
        "same seed gave different outputs",
    )


def check_logprobs(suite: Suite) -> None:
    response = suite.chat(temperature=0, logprobs=True, top_logprobs=2, max_tokens=4)
    content = response.choices[0].logprobs.content
    expect(bool(content) and all(len(t.top_logprobs) == 2 for t in content), "top_logprobs")
    expect(all(t.logprob <= 0 for t in content), "logprob above 0")
    expect(content[0].logprob >= content[0].top_logprobs[1].logprob, "greedy token not the top")


def check_logit_bias_and_penalties(suite: Suite) -> None:
    # Token ids are unknown to the SDK: force two different ids and expect two different
    # first tokens, which an ignored bias (plain greedy twice) cannot give.
    forced = [
        suite.chat(temperature=0, max_tokens=1, logit_bias={str(token_id): 100}, logprobs=True)
        .choices[0]
        .logprobs.content[0]
        .token
        for token_id in (100, 200)
    ]
    expect(forced[0] != forced[1], f"logit_bias ignored: both forced tokens are {forced[0]!r}")
    response = suite.chat(
        temperature=0, presence_penalty=1.5, frequency_penalty=1.5, max_tokens=6, user="conformance"
    )
    expect(bool(response.choices[0].message.content), "penalties gave no text")


def check_roles_and_parts(suite: Suite) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in one word."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sky color?"}]},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Look it up."},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup", "arguments": '{"q": "sky"}'},
                }
            ],
        },  # fmt: skip
        {"role": "tool", "content": "blue", "tool_call_id": "call_1"},
        {"role": "user", "content": "And grass?"},
    ]
    response = suite.chat(messages=messages, temperature=0, max_tokens=4)
    expect(bool(response.choices[0].message.content), "no answer for a multi-role conversation")


def check_completions(suite: Suite) -> None:
    one = suite.client.completions.create(model=suite.model, prompt="The sky is", max_tokens=5,
                                          temperature=0)  # fmt: skip
    expect(one.id.startswith("cmpl-") and one.object == "text_completion", "completion shape")
    many = suite.client.completions.create(
        model=suite.model, prompt=["One", "Two"], max_tokens=3, temperature=0, n=2
    )
    expect([c.index for c in many.choices] == [0, 1, 2, 3], "2 prompts x n=2 -> 4 choices")
    ids = suite.client.completions.create(
        model=suite.model, prompt=[1, 2, 3], max_tokens=2, temperature=0
    )
    expect(ids.usage.prompt_tokens == 3, "token-id prompt")
    echo = suite.client.completions.create(
        model=suite.model, prompt="The sky is", max_tokens=3, temperature=0, echo=True
    )
    expect(echo.choices[0].text.startswith("The sky is"), "echo did not repeat the prompt")
    lp = suite.client.completions.create(
        model=suite.model, prompt="The sky is", max_tokens=3, temperature=0, logprobs=2
    )
    logprobs = lp.choices[0].logprobs
    expect(len(logprobs.tokens) == 3 and all(len(t) == 2 for t in logprobs.top_logprobs),
           "completion logprobs")  # fmt: skip
    stream = suite.client.completions.create(
        model=suite.model, prompt="The sky is", max_tokens=5, temperature=0, stream=True
    )
    text = "".join(c.choices[0].text for c in stream if c.choices)
    expect(text == one.choices[0].text, f"streamed {text!r} != {one.choices[0].text!r}")


def check_errors(suite: Suite) -> None:
    chat: Any = suite.client.chat.completions.create
    suite.expect_status(404, lambda: chat(model="no-such-model", messages=PROMPT), "model")
    suite.expect_status(400, lambda: chat(model=suite.model, messages=[]), "messages")
    tool = {"type": "retrieval"}
    suite.expect_status(
        400, lambda: chat(model=suite.model, messages=PROMPT, tools=[tool]), "tools[0].type"
    )
    suite.expect_status(400, lambda: chat(model=suite.model, messages=PROMPT, n=10_000), "n")
    suite.expect_status(400, lambda: chat(model=suite.model, messages=PROMPT, max_tokens=10**6))
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    suite.expect_status(
        400, lambda: chat(model=suite.model, messages=[{"role": "user", "content": image}])
    )
    suite.expect_status(400, lambda: chat(model=suite.model, messages=PROMPT, temperature=5))
    suite.expect_status(
        400,
        lambda: suite.client.completions.create(model=suite.model, prompt="a", suffix="b"),
        "suffix",
    )


CHECKS: list[Callable[[Suite], None]] = [
    check_models,
    check_chat_shape,
    check_max_tokens,
    check_stream,
    check_stream_usage,
    check_async,
    check_stop,
    check_n_and_seed,
    check_logprobs,
    check_logit_bias_and_penalties,
    check_roles_and_parts,
    check_completions,
    check_errors,
]


Check = Callable[[Suite], None]
SECTIONS = ("core", "structured", "tools", "responses")


def section_checks(section: str) -> list[tuple[str, Check]]:
    """The named checks of one section (see the module docstring), imported on demand."""
    if section == "core":
        return [(check.__name__.removeprefix("check_"), check) for check in CHECKS]
    if section == "structured":
        from stamen.conformance.openai_structured import CHECKS as STRUCTURED

        return list(STRUCTURED)
    if section == "tools":
        from stamen.conformance.openai_tools import CHECKS as TOOLS

        return list(TOOLS)
    if section == "responses":
        from stamen.conformance.openai_responses import CHECKS as RESPONSES

        return list(RESPONSES)
    if section == "fine_tuning":
        from stamen.conformance.openai_fine_tuning import CHECKS as FINE_TUNING

        return [(check.__name__.removeprefix("check_"), check) for check in FINE_TUNING]
    raise ValueError(f"unknown section {section!r}: one of {SECTIONS} or 'fine_tuning'")


def run_suite(
    base_url: str,
    model: str,
    api_key: str = "none",
    timeout_s: float = 120,
    *,
    sections: tuple[str, ...] = SECTIONS,
    fine_tuning: bool = False,
    only_fine_tuning: bool = False,
    fine_tuning_extra: dict[str, Any] | None = None,
) -> list[Result]:
    """Run `sections` (plus the fine-tuning cases with `fine_tuning`; nothing else with
    `only_fine_tuning`) and return one `Result` per check."""
    chosen = ["fine_tuning"] if only_fine_tuning else [*sections]
    if fine_tuning and not only_fine_tuning:
        chosen.append("fine_tuning")
    checks = [named for section in chosen for named in section_checks(section)]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0)

    def new_async_client() -> Any:
        return openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=0
        )

    suite = Suite(client, new_async_client, model, fine_tuning_extra)
    results = []
    for name, check in checks:
        try:
            check(suite)
        except CheckFailed as error:
            results.append(Result(name, False, str(error)))
        except Exception as error:
            detail = "".join(traceback.format_exception_only(error)).strip()
            results.append(Result(name, False, detail))
        else:
            results.append(Result(name, True))
    client.close()
    return results


def format_table(results: list[Result]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'check':<{width}}  result  detail", f"{'-' * width}  ------  ------"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {'pass' if r.passed else 'FAIL':<6}  {r.detail}")
    passed = sum(r.passed for r in results)
    lines.append(f"{passed}/{len(results)} checks passed")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--model", required=True, help="model id to test")
    parser.add_argument("--api-key", default="none")
    parser.add_argument("--timeout-s", type=float, default=120.0)
    parser.add_argument(
        "--section",
        action="append",
        choices=SECTIONS,
        help="run only this section (repeatable; default: all of them)",
    )
    parser.add_argument(
        "--fine-tuning",
        action="store_true",
        help="also run the files and fine-tuning jobs cases (they train small jobs)",
    )
    args = parser.parse_args(argv)
    results = run_suite(
        args.base_url,
        args.model,
        args.api_key,
        args.timeout_s,
        sections=tuple(args.section or SECTIONS),
        fine_tuning=args.fine_tuning,
    )
    print(format_table(results))
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
