"""Browser tests of the web pages: headless Chromium (Debian's `chromium` package at
`/usr/bin/chromium`, or `$STAMEN_CHROMIUM`) driven by Playwright for Python, against
`swarm-api` processes on 127.0.0.1.

- `swarm_api` (session): `swarm-api` with no peers, i.e. the embedded local swarm of
  two `swarm-host` processes serving the bundled SmolLM2, on a fresh data directory;
  `host_processes()` finds the hosts among its children (a test may SIGKILL one).
- `keyed_api` (module): `swarm-api --in-process --api-key KEY`, for the key form.
- `page` (function): a fresh browser context and page; `shoot(page, name)` saves a
  full-page screenshot at desktop and narrow widths under `ARTIFACTS`
  (tests/browser/artifacts/, kept out of git), listed at the end of the run with every
  figure a test `record`ed (seconds until the monitor showed a killed host, ...).

Every test here carries the `browser` marker, registered below; they run only when the
`-m` expression names it (`pytest tests/browser -m browser`), never in a default run.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from tests.integration.test_api_lifecycle import Api, start_api

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = Path(os.environ.get("STAMEN_CHROMIUM", "/usr/bin/chromium"))
DESKTOP = {"width": 1280, "height": 860}
NARROW = {"width": 390, "height": 844}
API_KEY = "sk-browser-test-7f3a9c"
HOST_MODULE = "stamen.swarm_core.host.cli"

_figures: dict[str, float] = {}
_shots: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "browser: drives headless Chromium (`make test-browser`)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "browser" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="browser tests run with -m browser")
    for item in items:
        if item.get_closest_marker("browser"):
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _figures and not _shots:
        return
    terminalreporter.section("browser tests: figures and screenshots")
    for name, value in _figures.items():
        terminalreporter.write_line(f"{name}: {value:.2f}")
    for shot in _shots:
        terminalreporter.write_line(f"screenshot: {shot}")
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "figures.json").write_text(json.dumps(_figures, indent=2) + "\n")


def record(name: str, value: float) -> None:
    """A measured figure, printed at the end of the run and kept in figures.json."""
    _figures[name] = value


# -- servers ----------------------------------------------------------------------------


@dataclass
class HostChild:
    process: psutil.Process
    blocks: tuple[int, int]
    cmdline: list[str]


def host_processes(api: Api) -> list[HostChild]:
    """The embedded swarm's hosts, by span."""
    hosts = []
    for child in api.descendants():
        try:
            cmdline = child.cmdline()
        except psutil.NoSuchProcess:
            continue
        if HOST_MODULE in cmdline and "--blocks" in cmdline:
            start, end = cmdline[cmdline.index("--blocks") + 1].split(":")
            hosts.append(HostChild(child, (int(start), int(end)), cmdline))
    return sorted(hosts, key=lambda h: h.blocks)


def stop_api(api: Api) -> None:
    """SIGTERM (the embedded swarm stops with it), then SIGKILL whatever is left."""
    children = api.descendants()
    api.process.send_signal(signal.SIGTERM)
    try:
        api.process.wait(timeout=20)
    except Exception:
        api.process.kill()
        api.process.wait(timeout=10)
    _, alive = psutil.wait_procs(children, timeout=10)
    for child in alive:
        child.kill()


@pytest.fixture(scope="session")
def swarm_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("browser-swarm-api")
    api = start_api(tmp, "--data-dir", str(tmp / "data"), timeout_s=280)
    try:
        yield api
    finally:
        stop_api(api)


@pytest.fixture(scope="module")
def keyed_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    tmp = tmp_path_factory.mktemp("browser-keyed-api")
    args = ("--in-process", "--api-key", API_KEY, "--data-dir", str(tmp / "data"))
    api = start_api(tmp, *args, timeout_s=200)
    try:
        yield api
    finally:
        stop_api(api)


def wait_until(condition: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> float:
    """Poll `condition()` until true; returns the seconds it took."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout_s:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(interval_s)
    return time.monotonic() - began


def in_flight(api: Api) -> float:
    for line in httpx.get(f"{api.base_url}/metrics", timeout=5).text.splitlines():
        if line.startswith("stamen_api_requests_in_flight "):
            return float(line.split()[1])
    raise AssertionError("no in-flight gauge in /metrics")


# -- the browser ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport=DESKTOP, device_scale_factor=1)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.errors = errors  # uncaught script errors, for tests to assert none
    try:
        yield page
    finally:
        context.close()


def shoot(page: Any, name: str, *, narrow: bool = True) -> None:
    """Full-page screenshots at the desktop width and (unless told not to) a narrow one."""
    ARTIFACTS.mkdir(exist_ok=True)
    sizes = [("desktop", DESKTOP)] + ([("narrow", NARROW)] if narrow else [])
    for label, size in sizes:
        page.set_viewport_size(size)
        page.wait_for_timeout(250)  # let the layout settle (plots scale to their width)
        path = ARTIFACTS / f"{name}-{label}.png"
        page.screenshot(path=str(path), full_page=True)
        _shots.append(path)
    page.set_viewport_size(DESKTOP)
