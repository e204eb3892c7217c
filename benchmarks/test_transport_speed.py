"""pytest-benchmark view of `transport_speed`: the same links and cases, one benchmark per
(case, subject), so `make bench` lists them side by side with the raw socket baseline.
The ratio table itself comes from `python benchmarks/transport_speed.py`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from benchmarks.transport_speed import CASES, SUBJECTS, Link


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("subject", [name for name in SUBJECTS if "memory" not in name])
def test_transport_speed(benchmark, loop: asyncio.AbstractEventLoop, subject: str, case: str):  # type: ignore[no-untyped-def]
    size, operations, round_trip = CASES[case]
    payload = os.urandom(size)
    manager = SUBJECTS[subject]()
    link: Link = loop.run_until_complete(manager.__aenter__())
    try:
        action = link.round_trip if round_trip else link.one_way
        loop.run_until_complete(action(payload))  # warm-up
        benchmark.extra_info["payload_bytes"] = size
        benchmark.pedantic(
            lambda: loop.run_until_complete(action(payload)),
            rounds=max(5, operations),
            iterations=1,
        )
    finally:
        loop.run_until_complete(manager.__aexit__(None, None, None))
