"""The swarm monitor (`/`) against the embedded local swarm: both hosts with their spans
and full coverage; a SIGKILLed host shows as a gap within seconds (measured), and a new
host for the same span closes it again. Killing that new host, which the API never
talked to, measures the slow path: its record has to expire."""

from __future__ import annotations

import os
import re
import subprocess
import time
from typing import Any

import httpx
import pytest

from tests.browser.conftest import host_processes, record, shoot, wait_until
from tests.integration.test_api_lifecycle import Api

pytestmark = pytest.mark.browser

NUM_BLOCKS = 30  # SmolLM2-135M
MODEL = "SmolLM2-135M-Instruct"
SHOWN_WITHIN_S = 10.0  # the gap must be on the page this soon after the kill
COLD_SHOWN_WITHIN_S = 40.0  # ... of a host the API never talked to (its record expires)


def serve_state(page: Any, text: str) -> Any:
    """The model's "can serve" badge once it says exactly `text`."""
    return page.locator("[data-testid=serve-state]", has_text=re.compile(f"^{text}$"))


def open_monitor(page: Any, api: Api) -> None:
    page.goto(f"{api.base_url}/")
    serve_state(page, "Can serve now").wait_for(timeout=30_000)


def host_rows(page: Any) -> list[str]:
    return [row.inner_text() for row in page.locator("table.hosts tbody tr").all()]


def uncovered(page: Any) -> int:
    return int(page.locator(".blockmap .cell.uncovered").count())


def test_monitor_shows_both_hosts_and_full_coverage(page: Any, swarm_api: Api) -> None:
    open_monitor(page, swarm_api)
    rows = host_rows(page)
    assert len(rows) == 2, rows
    assert "[0, 15)" in rows[0] and "[15, 30)" in rows[1], rows
    assert all("online" in row and "tcp" in row and "direct" in row for row in rows), rows
    assert page.locator(".blockmap .cell.covered").count() == NUM_BLOCKS
    assert uncovered(page) == 0
    assert page.locator(".blockmap .cell.state-online").count() == NUM_BLOCKS
    # Two samples make a line (a flat one has no height: "attached", not "visible").
    page.wait_for_selector("#models .plot svg path.series", state="attached", timeout=15_000)
    assert page.errors == []
    shoot(page, "monitor")


def warm_connections(api: Api) -> None:
    """One short generation, so that the API holds connections to both hosts (its
    liveness check redials only hosts it is connected to)."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    response = httpx.post(f"{api.base_url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text


def start_like(host_cmdline: list[str], log_path: Any) -> subprocess.Popen[bytes]:
    """A new `swarm-host` with the command line of one that died: same model, span,
    transport and bootstrap; its `--parent-pid` is this process, which starts it (the
    host's lifeline watches its own parent), so it stops if the test dies."""
    cmdline = list(host_cmdline)
    cmdline[cmdline.index("--parent-pid") + 1] = str(os.getpid())
    with log_path.open("wb") as log:
        return subprocess.Popen(
            cmdline, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )


def test_a_killed_host_shows_as_a_gap_and_a_new_one_closes_it(
    page: Any, swarm_api: Api, tmp_path: Any
) -> None:
    open_monitor(page, swarm_api)
    warm_connections(swarm_api)
    victim = host_processes(swarm_api)[1]
    assert victim.blocks == (15, 30)
    killed_at = time.monotonic()
    victim.process.kill()
    serve_state(page, "Cannot serve now").wait_for(timeout=SHOWN_WITHIN_S * 1000)
    shown_s = time.monotonic() - killed_at
    record("seconds from SIGKILL of a host to the monitor showing the gap", shown_s)
    assert uncovered(page) == 15
    assert page.get_by_role("alert").filter(has_text="blocks 15–29").count() == 1
    page.wait_for_selector("table.hosts tr.gone", timeout=10_000)
    shoot(page, "monitor-gap")

    log_path = tmp_path / "replacement-host.log"
    replacement = start_like(victim.cmdline, log_path)
    try:
        started_at = time.monotonic()
        wait_until(lambda: "serving blocks [15, 30)" in log_path.read_text(), 240, "host ready")
        ready_at = time.monotonic()
        serve_state(page, "Can serve now").wait_for(timeout=30_000)
        record(
            "seconds from the new host's ready line to the monitor's recovery",
            time.monotonic() - ready_at,
        )
        record(
            "seconds from starting a new host to the monitor's recovery",
            time.monotonic() - started_at,
        )
        assert uncovered(page) == 0
        assert len(host_rows(page)) == 3  # the two serving, and the gone one
        shoot(page, "monitor-recovered")

        # The API holds no connection to this host (nothing was generated through it), so
        # only its record's expiry tells: up to the 15 s TTL after its last announce,
        # plus one refresh of the view (5 s).
        killed_at = time.monotonic()
        replacement.kill()
        serve_state(page, "Cannot serve now").wait_for(timeout=COLD_SHOWN_WITHIN_S * 1000)
        record(
            "seconds from SIGKILL of a host the API is not connected to, to the gap",
            time.monotonic() - killed_at,
        )
        assert page.errors == []
    finally:
        replacement.kill()
        replacement.wait(timeout=20)
