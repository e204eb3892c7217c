"""Kademlia's server as the swarm runs it: our protocol, a streaming crawl, and a routing
table refresh task the server owns and `stop()` cancels (after saying goodbye).

The crawl (`closest_live_nodes`) keeps `alpha` find_node requests in flight and uses each
answer as it arrives, so silent nodes are waited for side by side, not round after round;
contacts the protocol remembers as silent are never asked.

This module does not know what is stored under keys nor how a lookup uses the nodes found.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from kademlia.network import Server
from kademlia.node import Node

from stamen.swarm_core.protocol.dht.config import DiscoveryConfig, DiscoveryError
from stamen.swarm_core.protocol.dht.envelope import Envelope
from stamen.swarm_core.protocol.dht.protocol import RpcResult, SwarmProtocol, parse_contacts
from stamen.swarm_core.protocol.dht.storage import RecordStorage

logger = logging.getLogger(__name__)


async def closest_live_nodes(
    protocol: SwarmProtocol, target: Node, seeds: Iterable[Node], ksize: int, alpha: int
) -> list[Node]:
    """The `ksize` nodes closest to `target` that answered find_node: an iterative Kademlia
    lookup that keeps up to `alpha` requests in flight and uses each answer as it arrives,
    so a silent node holds one slot until its timeout instead of stalling a whole round."""
    known: dict[bytes, Node] = {}
    asked: set[bytes] = set()
    failed: set[bytes] = set()

    def learn(nodes: Iterable[Node]) -> None:
        for node in nodes:
            if node.id != protocol.source_node.id and not protocol.is_silent(node):
                known.setdefault(node.id, node)

    def closest() -> list[Node]:
        alive = (node for node_id, node in known.items() if node_id not in failed)
        return sorted(alive, key=target.distance_to)[:ksize]

    learn(seeds)
    in_flight: dict[asyncio.Task[RpcResult], Node] = {}
    try:
        while True:
            for node in closest():
                if len(in_flight) >= alpha:
                    break
                if node.id not in asked:
                    asked.add(node.id)
                    task = asyncio.create_task(protocol.call_find_node(node, target))
                    in_flight[task] = node
            if not in_flight:  # every one of the closest has answered
                return closest()
            done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                node = in_flight.pop(task)
                ok, answer = task.result()
                if ok:
                    learn(parse_contacts(answer, limit=ksize))
                else:
                    failed.add(node.id)
    finally:
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.wait(in_flight)


class SwarmServer(Server):
    """kademlia's Server with our protocol, crawl and an owned refresh task."""

    def __init__(
        self,
        node_id: bytes,
        storage: RecordStorage,
        config: DiscoveryConfig,
        envelope: Envelope,
        client_mode: bool,
    ) -> None:
        super().__init__(ksize=config.ksize, alpha=config.alpha, node_id=node_id, storage=storage)
        self._config, self._envelope, self._client_mode = config, envelope, client_mode
        self._refresh_task: asyncio.Task[None] | None = None

    def _create_protocol(self) -> SwarmProtocol:
        return SwarmProtocol(
            self.node, self.storage, self._config, self._envelope, self._client_mode
        )

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> list[Node]:
        """Ping the initial peers, then find the nodes closest to our own id."""
        protocol = self._swarm_protocol
        seeds = await asyncio.gather(*(protocol.ping_address(address) for address in addrs))
        found = [node for node in seeds if node is not None]
        return await closest_live_nodes(protocol, self.node, found, self.ksize, self.alpha)

    async def closest_nodes(self, key: bytes) -> list[Node]:
        """The `ksize` live nodes closest to `key`."""
        protocol = self._swarm_protocol
        target = Node(key)
        nearest = protocol.router.find_neighbors(target, k=self.ksize)
        return await closest_live_nodes(protocol, target, nearest, self.ksize, self.alpha)

    @property
    def _swarm_protocol(self) -> SwarmProtocol:
        if not isinstance(self.protocol, SwarmProtocol):
            raise DiscoveryError("the DHT node is not started")
        return self.protocol

    def refresh_table(self, interval: float = 0.0) -> None:
        if self._refresh_task is None:
            self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._config.refresh_interval_s)
            try:
                await self._refresh_table()
            except Exception:
                logger.exception("DHT routing table refresh failed")

    def stop(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        if self.protocol is not None:
            self.protocol.say_goodbye()
            self.protocol.shut_down()
        super().stop()
