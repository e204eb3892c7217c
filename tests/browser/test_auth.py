"""With `--api-key`, the pages load without the key, hold no secret, ask for one, keep it
in sessionStorage and send it as `Authorization: Bearer` (`swarm-api --in-process`)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.browser.conftest import API_KEY, shoot
from tests.integration.test_api_lifecycle import Api

pytestmark = pytest.mark.browser


def test_the_monitor_asks_for_the_key_and_sends_it(page: Any, keyed_api: Api) -> None:
    for path in ("/", "/chat", "/jobs"):
        response = httpx.get(f"{keyed_api.base_url}{path}", timeout=10)
        assert response.status_code == 200 and API_KEY not in response.text
    sent: list[str | None] = []
    page.on(
        "request",
        lambda r: sent.append(r.headers.get("authorization")) if "/v1/" in r.url else None,
    )
    page.goto(f"{keyed_api.base_url}/")
    page.wait_for_selector("#key-form:not([hidden])", timeout=15_000)
    assert page.evaluate("document.activeElement.id") == "key-input"  # focus is on the field
    shoot(page, "monitor-key-form", narrow=False)

    page.fill("#key-input", "wrong-key")
    page.press("#key-input", "Enter")
    page.get_by_text("That API key was refused").wait_for(timeout=10_000)
    page.fill("#key-input", API_KEY)
    page.get_by_role("button", name="Use key").click()
    page.wait_for_selector("[data-testid=serve-state]", timeout=15_000)
    assert page.is_hidden("#key-form")
    assert page.evaluate("sessionStorage.getItem('stamen.apiKey')") == API_KEY
    assert f"Bearer {API_KEY}" in sent
    assert API_KEY not in page.content()  # nor in the DOM
    page.goto(f"{keyed_api.base_url}/chat")  # the same tab remembers it
    page.wait_for_selector("#model option", state="attached", timeout=15_000)
    assert page.is_hidden("#key-form")
    assert page.errors == []
