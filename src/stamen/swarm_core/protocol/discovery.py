"""Discovery: signed host records in a Kademlia DHT, keyed by model and block.

`Discovery` is one DHT node (the `kademlia` package over UDP). A host announces a signed
`HostRecord`; it is stored under `block_key(model, block)` for every block of its span, on
the k nodes closest to each key. `find_hosts(model, block_range)` asks the closest nodes of
each block's key and returns, per block, the verified unexpired records, newest per peer.

What we change in stock kademlia, and where (each piece is small and local):

1. Values are bundles of per-peer signed records that storage MERGES and verifies instead
   of replacing (`dht.storage`).
2. Lookups do not stop at the first node that has a value: `find_hosts` finds the k closest
   nodes, asks all of them, re-verifies every answer (storage nodes are not trusted) and
   merges them (here).
3. Every datagram is sealed with a swarm-key HMAC, so peers of another swarm are dropped
   before any parsing (`dht.envelope`).
4. Client-mode nodes (clients, hosts behind NAT) are answered but never routed to
   (`dht.envelope` flags them, `dht.protocol` keeps them out of routing tables).
5. Background work (table refresh, hand-over of records to newly seen nodes) runs in tasks
   owned by the node and cancelled by `stop()` (`dht.protocol`, `dht.server`).
6. Dead peers cost one timeout, not one per lookup: silent contacts are remembered and
   skipped, lookup RPCs have a shorter timeout, crawls stream (`alpha` requests in flight),
   and a node stopping gracefully tells its contacts (`dht.protocol`, `dht.server`).

This module is the public face: other modules import `Discovery`, `DiscoveryConfig`,
`DiscoveryError`, `block_key`, `encode_bundle`, `RecordStorage` and `parse_host_port`
from here. It does not know what a host does with the records, nor how peers reach each
other's addresses; records carry addresses opaquely.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn, Self, TypeVar

from kademlia.node import Node

from stamen.swarm_core.protocol.dht.config import (
    KEY_BYTES,
    DiscoveryConfig,
    DiscoveryError,
    block_key,
)
from stamen.swarm_core.protocol.dht.envelope import Envelope
from stamen.swarm_core.protocol.dht.protocol import SwarmProtocol
from stamen.swarm_core.protocol.dht.server import SwarmServer, closest_live_nodes
from stamen.swarm_core.protocol.dht.storage import RecordStorage, encode_bundle, verified_records
from stamen.swarm_core.protocol.identity import PeerId, peer_id_digest, peer_id_of, short_peer_id
from stamen.swarm_core.protocol.records import (
    HostRecord,
    HostState,
    encode_signed,
    newest_per_peer,
    sign_record,
)
from stamen.transports.base import Credentials

__all__ = [
    "KEY_BYTES",
    "MAX_LOOKUP_BLOCKS",
    "Discovery",
    "DiscoveryConfig",
    "DiscoveryError",
    "RecordStorage",
    "block_key",
    "encode_bundle",
    "parse_host_port",
    "verified_records",
]

logger = logging.getLogger(__name__)

MAX_LOOKUP_BLOCKS = 4096
_T = TypeVar("_T")
# The crawl under its former name here, which tests/unit/test_discovery.py imports.
_closest_live_nodes = closest_live_nodes


class Discovery:
    """One DHT node. Use as `async with Discovery(...) as discovery:` or start()/stop().

    `initial_peers` are "HOST:PORT" UDP addresses of known nodes (a `swarm-bootstrap`).
    With `client_mode=True` the node queries and announces but is never added to other
    nodes' routing tables and stores nothing for others (peers that others cannot reach).
    """

    def __init__(
        self,
        credentials: Credentials,
        *,
        listen_host: str = "0.0.0.0",
        listen_port: int = 0,
        initial_peers: Sequence[str] = (),
        client_mode: bool = False,
        config: DiscoveryConfig | None = None,
    ) -> None:
        self._credentials = credentials
        self._listen = (listen_host, listen_port)
        self._initial_peers = [parse_host_port(peer) for peer in initial_peers]
        self._client_mode = client_mode
        self._config = config or DiscoveryConfig()
        self._storage = RecordStorage(self._config)
        self._server = SwarmServer(
            peer_id_digest(credentials.public_key),
            self._storage,
            self._config,
            Envelope(credentials.swarm_key),
            client_mode,
        )
        self._lookup_slots = asyncio.Semaphore(self._config.max_parallel_lookups)
        self._started = False

    @property
    def peer_id(self) -> PeerId:
        return peer_id_of(self._credentials)

    @property
    def client_mode(self) -> bool:
        return self._client_mode

    @property
    def address(self) -> tuple[str, int]:
        """The bound UDP (host, port), e.g. to give others as an initial peer."""
        if self._server.transport is None:
            raise DiscoveryError("the DHT node is not started")
        host, port = self._server.transport.get_extra_info("sockname")[:2]
        return host, port

    def neighbors(self) -> list[tuple[str, int]]:
        """Addresses in this node's routing table."""
        protocol = self._protocol
        return [
            (node.ip, node.port)
            for bucket in protocol.router.buckets
            for node in bucket.get_nodes()
        ]

    async def start(self) -> int:
        """Listen, then join through the initial peers. Returns how many server-mode peers
        the node knows after joining; 0 with initial peers given means none was reachable
        (a warning is logged). Raises `DiscoveryError` if joining exceeds the lookup timeout."""
        await self._server.listen(self._listen[1], interface=self._listen[0])
        self._started = True
        logger.info(
            "DHT node %s listening on %s:%d%s",
            short_peer_id(self.peer_id),
            *self.address,
            " (client mode)" if self._client_mode else "",
        )
        if not self._initial_peers:
            return 0
        addresses = await asyncio.gather(*(self._resolve(h, p) for h, p in self._initial_peers))
        try:
            async with asyncio.timeout(self._config.lookup_timeout_s):
                await self._server.bootstrap([a for a in addresses if a is not None])
        except TimeoutError as exc:
            raise DiscoveryError("joining the DHT timed out") from exc
        reached = len(self.neighbors())
        if reached == 0:
            logger.warning("none of the initial DHT peers answered: %s", self._initial_peers)
        return reached

    async def stop(self) -> None:
        self._server.stop()
        self._started = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def announce(self, record: HostRecord) -> int:
        """Sign `record` and store it under the key of every block of its span. Returns
        the number of blocks stored on at least one node (this one included)."""
        self._require_started()
        signed = sign_record(record, self._credentials)
        bundle = encode_bundle([encode_signed(signed)])
        blocks = range(record.start_block, record.end_block)
        stored = await self._run_bounded(
            [functools.partial(self._store, block_key(record.model, b), bundle) for b in blocks]
        )
        return sum(stored)

    async def find_hosts(
        self, model: str, block_range: range | tuple[int, int], *, include_offline: bool = False
    ) -> dict[int, list[HostRecord]]:
        """Per block of `block_range` (a range or a half-open (start, end) pair), the hosts
        serving it: verified, unexpired, newest record per peer, sorted by peer id. Blocks
        nobody serves map to []. OFFLINE hosts are left out unless `include_offline`."""
        self._require_started()
        blocks = block_range if isinstance(block_range, range) else range(*block_range)
        if len(blocks) > MAX_LOOKUP_BLOCKS:
            raise ValueError(f"{len(blocks)} blocks requested; at most {MAX_LOOKUP_BLOCKS}")
        found = await self._run_bounded(
            [functools.partial(self._lookup, block_key(model, b)) for b in blocks]
        )
        result = {}
        for block, records in zip(blocks, found):
            visible = [r for r in records if include_offline or r.state is not HostState.OFFLINE]
            result[block] = sorted(visible, key=lambda r: r.peer_id)
        return result

    async def announce_periodically(
        self, make_record: Callable[[], HostRecord], interval_s: float
    ) -> NoReturn:
        """Announce `make_record()` now and every `interval_s` until cancelled. Failures
        are logged and retried next period; announcing OFFLINE on shutdown is the caller's."""
        while True:
            try:
                stored = await self.announce(make_record())
                logger.debug("re-announced %d blocks", stored)
            except (DiscoveryError, OSError) as exc:
                logger.warning("announce failed, retrying in %.0f s: %s", interval_s, exc)
            await asyncio.sleep(interval_s)

    @property
    def _protocol(self) -> SwarmProtocol:
        return self._require_started()

    def _require_started(self) -> SwarmProtocol:
        if not self._started or self._server.protocol is None:
            raise DiscoveryError("the DHT node is not started")
        return self._server.protocol

    async def _run_bounded(self, jobs: Sequence[Callable[[], Awaitable[_T]]]) -> list[_T]:
        """Run `jobs` at most `max_parallel_lookups` at a time under the lookup deadline;
        their results in order. A job's coroutine is created only once it holds a slot, so
        jobs still queued at the deadline leave no coroutine behind that nobody awaits."""

        async def bounded(job: Callable[[], Awaitable[_T]]) -> _T:
            async with self._lookup_slots:
                return await job()

        try:
            async with asyncio.timeout(self._config.lookup_timeout_s), asyncio.TaskGroup() as group:
                tasks = [group.create_task(bounded(job)) for job in jobs]
        except TimeoutError as exc:
            raise DiscoveryError(f"DHT lookup took over {self._config.lookup_timeout_s} s") from exc
        except ExceptionGroup as group_error:  # callers expect the job's own error type
            raise group_error.exceptions[0] from group_error
        return [task.result() for task in tasks]

    async def _store(self, key: bytes, bundle: bytes) -> bool:
        stored_here = not self._client_mode and self._storage.merge(key, bundle) > 0
        nodes = await self._server.closest_nodes(key)
        answers = await asyncio.gather(*(self._protocol.call_store(n, key, bundle) for n in nodes))
        return stored_here or any(ok and accepted for ok, accepted in answers)

    async def _lookup(self, key: bytes) -> list[HostRecord]:
        nodes = await self._server.closest_nodes(key)
        answers = await asyncio.gather(
            *(self._protocol.call_find_value(n, Node(key)) for n in nodes)
        )
        now_s = time.time()
        records = [record for record, _ in verified_records(key, self._storage.get(key), now_s)]
        for ok, answer in answers:
            if ok and isinstance(answer, dict):
                records.extend(r for r, _ in verified_records(key, answer.get("value"), now_s))
        return list(newest_per_peer(records).values())

    async def _resolve(self, host: str, port: int) -> tuple[str, int] | None:
        try:
            # kademlia needs IP addresses; it listens on IPv4 here.
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM
            )
        except OSError as exc:
            logger.warning("cannot resolve DHT peer %s:%d: %s", host, port, exc)
            return None
        ip, resolved_port = infos[0][4][:2]
        return str(ip), int(resolved_port)


def parse_host_port(text: str) -> tuple[str, int]:
    """ "HOST:PORT" -> (host, port); raises ValueError with a readable message."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)
