"""The client's view of the swarm stays fresh: hosts that announced OFFLINE, whose record
expired, whose address answers with another key, or whose connections died and cannot be
redialed drop out of routing at once, and come back when they announce again."""

from __future__ import annotations

import asyncio

import msgspec
import pytest

from stamen.swarm_core.client.remote import HopError
from stamen.swarm_core.client.swarm import ClientSettings, SwarmClient
from stamen.swarm_core.protocol.records import HostRecord, HostState, new_host_record
from stamen.swarm_core.protocol.rpc import RpcServer
from stamen.swarm_core.protocol.wire import HelloReply
from stamen.transports.base import Credentials
from stamen.transports.memory import MemoryHub, MemoryTransport

MODEL = "model"


class FakeDiscovery:
    """Serves whatever records the test put in `records` (newest per peer is the
    client's business)."""

    def __init__(self) -> None:
        self.records: list[HostRecord] = []
        self.lookups = 0

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def find_hosts(self, model, block_range, *, include_offline=False):
        self.lookups += 1
        found = list(self.records)  # what the lookup saw when it began
        await asyncio.sleep(0.01)  # a DHT lookup takes a while
        return {0: found}


class Host:
    def __init__(self, hub: MemoryHub) -> None:
        self.credentials = Credentials.generate()
        self.transport = MemoryTransport(self.credentials, hub=hub)
        self.server = RpcServer(HelloReply.local("host"))
        self.address = ""

    async def listen(self, address: str = "memory://") -> None:
        listener = await self.transport.listen(address, self.server.serve)
        self.address = listener.addresses[0]

    def record(self, *, state: HostState = HostState.ONLINE, ttl_s: float = 15.0) -> HostRecord:
        record = new_host_record(
            self.credentials,
            model=MODEL,
            start_block=0,
            end_block=1,
            state=state,
            addresses=[self.address],
            ttl_s=ttl_s,
        )
        return msgspec.structs.replace(record, throughput_tokens_per_s=100.0)


@pytest.fixture
async def view():
    hub = MemoryHub()
    discovery = FakeDiscovery()
    swarm = SwarmClient(
        MODEL,
        1,
        MemoryTransport(Credentials.generate(), hub=hub),
        Credentials.generate(),
        initial_peers=(),
        settings=ClientSettings(refresh_interval_s=3600, liveness_interval_s=0.1),
    )
    swarm._discovery = discovery  # type: ignore[assignment]
    async with swarm:
        yield swarm, discovery, hub


def peers(swarm: SwarmClient) -> set[str]:
    return {h.peer_id for h in swarm.hosts()}


async def test_an_offline_announcement_removes_the_host_at_once(view) -> None:
    swarm, discovery, hub = view
    host = Host(hub)
    await host.listen()
    discovery.records = [host.record()]
    await swarm.refresh()
    assert peers(swarm) == {host.record().peer_id}
    await asyncio.sleep(0.01)  # the OFFLINE record is newer
    discovery.records.append(host.record(state=HostState.OFFLINE))
    await swarm.refresh()
    assert peers(swarm) == set() and swarm.records() == []


async def test_an_expired_record_leaves_the_view_without_a_refresh(view) -> None:
    swarm, discovery, hub = view
    host = Host(hub)
    await host.listen()
    discovery.records = [host.record(ttl_s=0.3)]
    await swarm.refresh()
    assert len(swarm.hosts()) == 1
    await asyncio.sleep(0.35)
    assert swarm.hosts() == [] and not swarm.covered()


async def test_another_key_at_the_address_drops_the_record_until_it_is_reannounced(
    view,
) -> None:
    swarm, discovery, hub = view
    dead = Host(hub)
    dead.address = "memory://reused"
    old_record = dead.record()
    newcomer = Host(hub)  # a new identity, listening where the dead host was
    await newcomer.listen("memory://reused")
    discovery.records = [old_record]
    await swarm.refresh()
    assert peers(swarm) == {old_record.peer_id}
    with pytest.raises(HopError, match="another key"):
        await swarm.connect(old_record.peer_id)
    assert peers(swarm) == set()
    await swarm.refresh()  # the DHT still holds the old record: it stays out
    assert peers(swarm) == set()
    discovery.records = [old_record, newcomer.record()]
    await swarm.refresh()
    assert peers(swarm) == {newcomer.record().peer_id}


async def test_a_host_whose_connections_died_is_dropped_and_returns_when_it_announces(
    view,
) -> None:
    swarm, discovery, hub = view
    host = Host(hub)
    await host.listen("memory://host")
    discovery.records = [host.record()]
    await swarm.refresh()
    await swarm.connect(host.record().peer_id)
    await host.transport.aclose()  # the host process is gone: connections drop
    for _ in range(40):  # within 2 s (liveness checks every 0.1 s here)
        if not peers(swarm):
            break
        await asyncio.sleep(0.05)
    assert peers(swarm) == set(), "a dead host stayed in the view"
    # It comes back (same identity, a new process) and announces again.
    host.transport = MemoryTransport(host.credentials, hub=hub)
    await host.listen("memory://host")
    discovery.records = [host.record()]
    await swarm.refresh()
    assert peers(swarm) == {host.record().peer_id}
    client = await swarm.connect(host.record().peer_id)
    assert client.peer_id == host.record().peer_id


async def test_concurrent_refreshes_share_one_lookup(view) -> None:
    swarm, discovery, _ = view
    before = discovery.lookups
    await asyncio.gather(*(swarm.refresh() for _ in range(50)))
    assert discovery.lookups == before + 1
    await asyncio.gather(*(swarm.refresh(max_age_s=60.0) for _ in range(50)))
    assert discovery.lookups == before + 1  # the view is young enough


async def test_a_refresh_returns_a_view_read_after_it_was_called(view) -> None:
    """A refresh already under way when a host came online must not stand in for the
    caller's: the caller gets a lookup that began after its call."""
    swarm, discovery, hub = view
    host = Host(hub)
    await host.listen()
    under_way = asyncio.create_task(swarm.refresh())
    await asyncio.sleep(0.001)  # its lookup has begun, with no record yet
    discovery.records = [host.record()]
    await swarm.refresh()
    assert peers(swarm) == {host.record().peer_id}
    await under_way
