"""The chat page (`/chat`) against the embedded local swarm: an answer streams in with its
timings; Stop aborts the request, the page says so and the server's generation ends.
The renderer shows model output with `<script>` and `onerror=` as text: a crafted SSE
stream, served by route interception, must run nothing."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest

from tests.browser.conftest import in_flight, record, shoot, wait_until
from tests.integration.test_api_lifecycle import Api

pytestmark = pytest.mark.browser

MODEL = "SmolLM2-135M-Instruct"


def open_chat(page: Any, api: Api) -> None:
    page.goto(f"{api.base_url}/chat")
    page.wait_for_selector(f"#model option[value='{MODEL}']", state="attached")


def ask(page: Any, text: str, *, max_tokens: int, temperature: float = 0.0) -> Any:
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#temperature", str(temperature))
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")  # the keyboard path: Enter sends
    return page.locator("li.message.assistant").last


def test_an_answer_streams_in_and_stop_ends_the_request(page: Any, swarm_api: Api) -> None:
    open_chat(page, swarm_api)
    page.fill("#system", "You are a concise assistant.")
    answer = ask(page, "Name three colors.", max_tokens=24)
    page.wait_for_selector("li.message.assistant[data-state=done]", timeout=120_000)
    assert answer.locator(".message-body").inner_text().strip()
    stats = page.inner_text("#stats")
    assert "first token after" in stats and "tokens/s" in stats and "finished" in stats, stats

    failed: list[str] = []
    page.on("requestfailed", lambda request: failed.append(request.url))
    answer = ask(page, "Write a very long story about a lighthouse keeper.", max_tokens=800,
                 temperature=0.8)  # fmt: skip
    wait_until(lambda: len(answer.locator(".message-body").inner_text()) > 20, 120, "tokens")
    assert answer.get_attribute("data-state") == "streaming"
    assert page.is_enabled("#stop") and not page.is_enabled("#send")
    page.click("#stop")
    clicked = time.monotonic()
    page.wait_for_selector("li.message.assistant[data-state=stopped]", timeout=5_000)
    assert answer.get_by_text("Stopped.").is_visible()
    assert "stopped" in page.inner_text("#stats")
    assert any(url.endswith("/v1/chat/completions") for url in failed), failed
    wait_until(lambda: in_flight(swarm_api) == 0, 10, "the server ended the generation")
    record("seconds from Stop to no generation in flight on the server", time.monotonic() - clicked)
    assert page.is_enabled("#send") and not page.is_enabled("#stop")
    assert page.errors == []
    shoot(page, "chat")


CRAFTED = [
    "Hello <script>window.pwned=1</script> and ",
    '<img src=x onerror="window.pwned=2"> **bold** *it* `code <b>x</b>`\n\n',
    "[bad](javascript:window.pwned=3) [good](https://example.org/docs)\n\n",
    "```html\n<script>window.pwned=4</script>\n```\n\n- one\n- two <svg onload=window.pwned=5>",
]


def crafted_stream() -> bytes:
    chunks = [{"id": "x", "object": "chat.completion.chunk", "created": 0, "model": MODEL,
               "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                            "finish_reason": None}]} for text in CRAFTED]  # fmt: skip
    chunks[-1]["choices"][0]["finish_reason"] = "stop"
    events = [b": keep-alive\n\n"] + [b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks]
    return b"".join(events) + b"data: [DONE]\n\n"


def test_model_output_is_shown_as_text_and_runs_nothing(page: Any, swarm_api: Api) -> None:
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(
            status=200, content_type="text/event-stream", body=crafted_stream()
        ),
    )
    open_chat(page, swarm_api)
    ask(page, "Say something dangerous.", max_tokens=50)
    page.wait_for_selector("li.message.assistant[data-state=done]", timeout=10_000)
    body = page.locator("li.message.assistant .message-body")
    text = body.inner_text()
    assert "<script>window.pwned=1</script>" in text
    assert '<img src=x onerror="window.pwned=2">' in text
    assert "<svg onload=window.pwned=5>" in text
    assert page.evaluate("typeof window.pwned") == "undefined"
    for tag in ("script", "img", "svg", "iframe", "b"):
        assert body.locator(tag).count() == 0, tag
    assert body.locator("strong").inner_text() == "bold"
    assert body.locator("em").inner_text() == "it"
    assert body.locator("code").first.inner_text() == "code <b>x</b>"
    assert body.locator("pre code").inner_text() == "<script>window.pwned=4</script>"
    links = body.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.org/docs"
    assert "[bad](javascript:window.pwned=3)" in text
    assert body.locator("li").count() == 2
    assert page.errors == []
    shoot(page, "chat-crafted", narrow=False)
