"""The transport conformance suite against the in-process and TCP transports."""

from __future__ import annotations

import uuid

import pytest

from stamen.conformance.transport import CASES, TransportUnderTest, run_case
from stamen.transports.memory import MemoryHub, MemoryTransport


def memory_under_test() -> TransportUnderTest:
    hub = MemoryHub()

    async def closed_address() -> str:
        return f"memory://nobody-{uuid.uuid4().hex}"

    return TransportUnderTest(
        name="memory",
        make_transport=lambda credentials: MemoryTransport(credentials, hub=hub),
        listen_address="memory://",
        closed_address=closed_address,
        kill=lambda connection: connection.close(),
    )


@pytest.mark.parametrize("case", CASES)
async def test_memory_conformance(case: str) -> None:
    await run_case(case, memory_under_test())
