"""Kademlia's protocol as the swarm runs it: sealed datagrams, client mode, merging
stores, bounded RPCs, owned tasks, a memory of silent contacts, and `leave`.

1. Every datagram passes through an `Envelope`; unauthenticated ones are dropped unread.
2. A node in client mode (clients, hosts behind NAT) flags its datagrams: servers answer
   its requests and accept its stores but never add it to their routing tables, so nobody
   routes queries to a peer that cannot be reached. A client answers no requests.
3. Stores merge into `RecordStorage`; bundles too big for one request go in pieces.
4. Dead peers cost one timeout, not one per lookup. A contact that fails to answer is
   removed from the routing table (stock kademlia) AND remembered as silent for
   `silent_contact_ttl_s`: other nodes still list it in their answers, and without that
   memory every crawl would ask it again. Silent contacts are skipped without sending
   anything until they are heard from again. Lookup RPCs have their own, shorter timeout
   (`lookup_rpc_timeout_s`); RPCs in flight are bounded (`max_rpcs_in_flight`).
5. A node stopping gracefully tells its contacts (`leave`), who forget it at once.
6. Hand-overs of records to newly seen nodes run in tasks the protocol owns and cancels
   in `shut_down()`.

This module does not know how lookups are planned (the crawl is in `server`), nor what
the records mean.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import socket
import time
from collections.abc import Coroutine
from typing import Any

import umsgpack
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from stamen.swarm_core.protocol.dht.config import DiscoveryConfig, is_key
from stamen.swarm_core.protocol.dht.envelope import Envelope, SealingTransport
from stamen.swarm_core.protocol.dht.storage import RecordStorage, split_bundle

logger = logging.getLogger(__name__)

# Set while a datagram from a client-mode peer is being handled (tasks copy the context).
_SENDER_IS_CLIENT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "stamen_dht_sender_is_client", default=False
)

_REQUEST = b"\x00"  # rpcudp's first payload byte for requests (0x01: responses)
_MSG_ID_BYTES = 20  # rpcudp's message id length
_MAX_REQUEST_BYTES = 8192  # rpcudp refuses larger requests
RpcResult = tuple[bool, Any]  # (answered, answer), as kademlia's call_* return
_Contact = tuple[bytes, str, int]  # (node id, ip, port)


class SwarmProtocol(KademliaProtocol):
    """Kademlia RPCs with sealed datagrams, client mode, merging stores, owned tasks, and
    a memory of contacts that did not answer."""

    def __init__(
        self,
        node: Node,
        storage: RecordStorage,
        config: DiscoveryConfig,
        envelope: Envelope,
        client_mode: bool,
    ) -> None:
        super().__init__(node, storage, config.ksize)
        self._wait_timeout = config.rpc_timeout_s
        self._lookup_rpc_timeout_s = min(config.lookup_rpc_timeout_s, config.rpc_timeout_s)
        self._silent_contact_ttl_s = config.silent_contact_ttl_s
        self._envelope = envelope
        self._client_mode = client_mode
        self._record_storage = storage
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rpc_slots = asyncio.Semaphore(config.max_rpcs_in_flight)
        self._socket_buffer_bytes = config.socket_buffer_bytes
        self._silent_until: dict[_Contact, float] = {}  # contact -> monotonic deadline
        self._closed = False

    def connection_made(self, transport: Any) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self._socket_buffer_bytes)
        super().connection_made(SealingTransport(transport, self._envelope, self._client_mode))

    def datagram_received(self, data: bytes, addr: Any) -> None:
        opened = self._envelope.open(data)
        if opened is None:
            logger.debug("ignoring an unauthenticated datagram from %s", addr)
            return
        payload, from_client = opened
        if self._client_mode and payload[:1] == _REQUEST:
            return  # nobody should route to a client; stray requests get no answer
        token = _SENDER_IS_CLIENT.set(from_client)
        try:
            super().datagram_received(payload, addr)
        finally:
            _SENDER_IS_CLIENT.reset(token)

    def welcome_if_new(self, node: Node) -> None:
        """Add a server-mode peer to the routing table and hand it the records it should
        now hold (Kademlia paper, section 2.5). Client-mode peers are never added."""
        if _SENDER_IS_CLIENT.get():
            return
        self._silent_until.pop(_contact(node), None)  # heard from: alive again
        if not self.router.is_new_node(node):
            return
        if not self._client_mode:
            for key, value in self.storage:
                if self._should_hand_over(node, key):
                    self._spawn(self.call_store(node, key, value))
        self.router.add_contact(node)

    def _should_hand_over(self, newcomer: Node, key: bytes) -> bool:
        key_node = Node(key)
        neighbors = self.router.find_neighbors(key_node)
        if not neighbors:
            return True
        newcomer_is_close = newcomer.distance_to(key_node) < neighbors[-1].distance_to(key_node)
        we_are_closest = self.source_node.distance_to(key_node) < neighbors[0].distance_to(key_node)
        return newcomer_is_close and we_are_closest

    def rpc_store(self, sender: Any, nodeid: Any, key: Any, value: Any) -> bool:
        if not (is_key(nodeid) and is_key(key)):
            return False
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        return self._record_storage.merge(key, value) > 0

    def rpc_leave(self, sender: Any, nodeid: Any) -> bool:
        """A peer stopping gracefully: forget it now instead of timing out on it later.
        Only the contact at the sender's own address is affected."""
        if not is_key(nodeid) or _SENDER_IS_CLIENT.get():
            return False
        leaving = Node(nodeid, sender[0], sender[1])
        known = self.router.buckets[self.router.get_bucket_for(leaving)][nodeid]
        if known is not None and known.same_home_as(leaving):
            self.router.remove_contact(leaving)
        self._mark_silent(leaving)
        logger.debug("DHT peer %s left", leaving)
        return True

    def say_goodbye(self) -> None:
        """Tell every contact we are leaving (best effort, no answer awaited)."""
        if self._client_mode or self.transport is None:
            return  # nobody routes to a client
        for bucket in self.router.buckets:
            for node in [*bucket.get_nodes(), *bucket.replacement_nodes.values()]:
                self._send_request((node.ip, node.port), "leave", [self.source_node.id])

    def is_silent(self, node: Node) -> bool:
        """Whether `node` failed to answer (or left) recently and has not been heard since."""
        contact = _contact(node)
        deadline = self._silent_until.get(contact)
        if deadline is None:
            return False
        if deadline <= time.monotonic():
            del self._silent_until[contact]
            return False
        return True

    def _mark_silent(self, node: Node) -> None:
        self._silent_until[_contact(node)] = time.monotonic() + self._silent_contact_ttl_s

    async def call_store(self, node_to_ask: Node, key: bytes, value: bytes) -> Any:
        # Bundles held for a key can outgrow one store request; send them in pieces.
        result: RpcResult = (False, None)
        for chunk in split_bundle(value):
            result = await self._call(
                node_to_ask, "store", [self.source_node.id, key, chunk], self._wait_timeout
            )
            if not result[0]:
                break
        return result

    async def call_find_node(self, node_to_ask: Node, node_to_find: Node) -> Any:
        args = [self.source_node.id, node_to_find.id]
        return await self._call(node_to_ask, "find_node", args, self._lookup_rpc_timeout_s)

    async def call_find_value(self, node_to_ask: Node, node_to_find: Node) -> Any:
        args = [self.source_node.id, node_to_find.id]
        return await self._call(node_to_ask, "find_value", args, self._lookup_rpc_timeout_s)

    async def call_ping(self, node_to_ask: Node) -> Any:
        return await self._call(node_to_ask, "ping", [self.source_node.id], self._wait_timeout)

    async def ping_address(self, address: tuple[str, int]) -> Node | None:
        """The node answering at `address` (an initial peer), or None if none answers."""
        async with self._rpc_slots:
            ok, peer_id = await self._request(
                address, "ping", [self.source_node.id], self._wait_timeout
            )
        return Node(peer_id, *address) if ok and is_key(peer_id) else None

    async def _call(self, node: Node, name: str, args: list[Any], timeout_s: float) -> RpcResult:
        """Call `name` on `node`. A silent contact is not asked at all; one that does not
        answer within `timeout_s` is removed from the table (stock kademlia) and silenced."""
        if self._closed or self.is_silent(node):
            return False, None
        async with self._rpc_slots:
            result = await self._request((node.ip, node.port), name, args, timeout_s)
        if not result[0] and not self._closed:
            self._mark_silent(node)
        return self.handle_call_response(result, node)

    async def _request(
        self, address: Any, name: str, args: list[Any], timeout_s: float
    ) -> RpcResult:
        """Send one request and wait up to `timeout_s` for its answer. rpcudp's own sender
        has one timeout for every RPC and breaks if its caller is cancelled."""
        message_id = self._send_request(address, name, args)
        future: asyncio.Future[RpcResult] = asyncio.get_running_loop().create_future()
        expiry = asyncio.get_running_loop().call_later(timeout_s, self._expire, message_id)
        self._outstanding[message_id] = (future, expiry)
        try:
            return await future
        finally:  # answered, expired or cancelled: nothing may stay outstanding
            expiry.cancel()
            self._outstanding.pop(message_id, None)

    def _send_request(self, address: Any, name: str, args: list[Any]) -> bytes:
        """Send one request datagram; returns its message id."""
        message_id = os.urandom(_MSG_ID_BYTES)
        payload = umsgpack.packb([name, args])
        if len(payload) > _MAX_REQUEST_BYTES:
            raise ValueError(f"a {name} request of {len(payload)} B exceeds one datagram")
        if self.transport is not None:
            self.transport.sendto(_REQUEST + message_id + payload, address)
        return message_id

    def _expire(self, message_id: bytes) -> None:
        entry = self._outstanding.pop(message_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result((False, None))

    # rpcudp's handlers assume the waiting future was never cancelled; ours may be.
    def _timeout(self, msg_id: bytes) -> None:
        self._expire(msg_id)

    def _accept_response(self, msg_id: bytes, data: Any, address: Any) -> None:
        entry = self._outstanding.pop(msg_id, None)
        if entry is None:
            logger.debug("ignoring an answer from %s to no pending request", address)
            return
        future, expiry = entry
        expiry.cancel()
        if not future.done():
            future.set_result((True, data))

    def _spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def shut_down(self) -> None:
        """Cancel owned tasks and fail every pending request (their callers return)."""
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        for future, timeout in list(self._outstanding.values()):
            timeout.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()


def _contact(node: Node) -> _Contact:
    return node.id, node.ip, node.port


def parse_contacts(answer: Any, limit: int) -> list[Node]:
    """The well-formed (id, ip, port) triples of a find_node answer, at most `limit`."""
    if not isinstance(answer, list):
        return []
    nodes = []
    for entry in answer[:limit]:
        if (
            isinstance(entry, list | tuple)
            and len(entry) == 3
            and is_key(entry[0])
            and isinstance(entry[1], str)
            and isinstance(entry[2], int)
            and 0 < entry[2] < 65536
        ):
            nodes.append(Node(entry[0], entry[1], entry[2]))
    return nodes
