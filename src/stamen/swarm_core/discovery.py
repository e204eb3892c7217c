"""Discovery: signed host records in a Kademlia DHT, keyed by model and block.

`Discovery` is one DHT node (the `kademlia` package over UDP). A host announces a signed
`HostRecord`; it is stored under `block_key(model, block)` for every block of its span, on
the k nodes closest to each key. `find_hosts(model, block_range)` asks the closest nodes of
each block's key and returns, per block, the verified unexpired records, newest per peer.

What we change in stock kademlia, and why (each piece is small and local):

1. Values are bundles of per-peer signed records (`encode_bundle`), and `RecordStorage`
   MERGES every stored bundle into what it holds instead of replacing it: stock `set()`
   would let each announcing host overwrite the others. Storage verifies every record on
   store (signature by the key the record names, expiry, bounds, and that the record's
   span covers the key), keeps the newest record per peer, drops expired ones on read, and
   bounds records per key, bytes per key and keys per node.
2. Lookups do not stop at the first node that has a value: `find_hosts` finds the k closest
   nodes, asks all of them, re-verifies every answer (storage nodes are not trusted) and
   merges them.
3. Every datagram is sealed in an envelope `[version, flags, HMAC tag (16 B), payload]`;
   the MAC key derives from the swarm key, so peers of another private swarm (or of the
   public one) are dropped before any parsing. Replayed datagrams gain nothing: stores
   carry signed records where the newest wins, and answers must match a pending request.
4. A node in client mode (clients, hosts behind NAT) sets the `CLIENT` flag: servers
   answer its requests and accept its stores but never add it to their routing tables, so
   nobody routes queries to a peer that cannot be reached. A client answers no requests.
5. Background work (table refresh, hand-over of records to newly seen nodes) runs in tasks
   owned by the node and cancelled by `stop()`.
6. Dead peers cost one timeout, not one per lookup. A contact that fails to answer is
   removed from the routing table (stock kademlia) AND remembered as silent for
   `silent_contact_ttl_s`: other nodes still list it in their answers, and without that
   memory every crawl would ask it again. Silent contacts are skipped without sending
   anything until they are heard from again. Lookup RPCs have their own, shorter timeout
   (`lookup_rpc_timeout_s`), and crawls keep `alpha` requests in flight and use each answer
   as it arrives, so silent nodes are waited for side by side, not round after round.
   A node stopping gracefully tells its contacts (`leave`), who forget it at once.

This module does not know what a host does with the records, nor how peers reach each
other's addresses; records carry addresses opaquely.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import hashlib
import hmac
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, NoReturn, Self, TypeVar

import msgspec
import umsgpack
from kademlia.network import Server
from kademlia.node import Node
from kademlia.protocol import KademliaProtocol
from kademlia.storage import IStorage

from stamen.swarm_core.identity import PeerId, peer_id_digest, peer_id_of, short_peer_id
from stamen.swarm_core.records import (
    MAX_SIGNED_RECORD_BYTES,
    HostRecord,
    HostState,
    RecordError,
    check_fresh,
    decode_signed,
    encode_signed,
    newest_per_peer,
    open_record,
    sign_record,
)
from stamen.transports.base import Credentials

logger = logging.getLogger(__name__)

KEY_BYTES = 20
MAX_LOOKUP_BLOCKS = 4096
_MAX_STORE_VALUE_BYTES = 6 * 1024  # rpcudp refuses requests above 8 KiB (key, ids, framing)
_MAX_BUNDLE_ENTRIES = 256
_BundleEntries = Annotated[
    list[Annotated[bytes, msgspec.Meta(max_length=MAX_SIGNED_RECORD_BYTES)]],
    msgspec.Meta(max_length=_MAX_BUNDLE_ENTRIES),
]
_bundle_decoder = msgspec.msgpack.Decoder(_BundleEntries)
_T = TypeVar("_T")


class DiscoveryError(Exception):
    """A DHT operation failed (timeout, no reachable peer, node not started)."""


@dataclass(frozen=True)
class DiscoveryConfig:
    ksize: int = 20  # replicas per key, and bucket size
    alpha: int = 3  # parallel requests per crawl step
    rpc_timeout_s: float = 5.0
    # find_node / find_value answers are small and quick; a peer silent for this long is
    # taken for dead (capped by rpc_timeout_s). The whole lookup is bounded by
    # lookup_timeout_s.
    lookup_rpc_timeout_s: float = 2.0
    lookup_timeout_s: float = 30.0
    silent_contact_ttl_s: float = 120.0  # how long a peer that did not answer is skipped
    refresh_interval_s: float = 600.0
    max_parallel_lookups: int = 16
    # UDP has no flow control: a burst of answers larger than the socket's receive buffer
    # is dropped by the kernel (and kademlia drops silent nodes from its table). Bound the
    # requests in flight and ask for a larger buffer (the kernel caps it at rmem_max).
    max_rpcs_in_flight: int = 32
    socket_buffer_bytes: int = 4 * 1024 * 1024
    max_records_per_key: int = 32
    max_value_bytes: int = 32 * 1024  # a find_value answer must fit one UDP datagram
    max_keys: int = 65_536


def block_key(model: str, block: int) -> bytes:
    """The DHT key under which hosts serving `block` of `model` are announced."""
    return hashlib.sha1(f"{model}/{block}".encode()).digest()


def encode_bundle(signed_records: Iterable[bytes]) -> bytes:
    """A DHT value: a msgpack list of encoded `SignedRecord`s."""
    return msgspec.msgpack.encode(list(signed_records))


@functools.lru_cache(maxsize=4096)
def _span_keys(model: str, start_block: int, end_block: int) -> frozenset[bytes]:
    return frozenset(block_key(model, b) for b in range(start_block, end_block))


def verified_records(key: bytes, value: object, now_s: float) -> list[tuple[HostRecord, bytes]]:
    """The records of a DHT value that pass `verify_record` and belong under `key`, each
    with its encoded signed form. Anything else is dropped (and logged at debug level)."""
    if not isinstance(value, bytes):
        return []
    try:
        entries = _bundle_decoder.decode(value)
    except ValueError as exc:
        logger.debug("dropping an undecodable DHT value: %s", exc)
        return []
    accepted = []
    for entry in entries:
        record = _opened(entry)
        if record is None:
            continue
        try:
            check_fresh(record, now_s=now_s)
        except RecordError as exc:
            logger.debug("dropping a host record: %s", exc)
            continue
        if key not in _span_keys(record.model, record.start_block, record.end_block):
            logger.debug("dropping a record of %s stored under a foreign key", record.peer_id)
            continue
        accepted.append((record, entry))
    return accepted


@functools.lru_cache(maxsize=8192)
def _opened(entry: bytes) -> HostRecord | None:
    # The same signed bytes arrive from every replica and every re-announce period:
    # check each signature once. Expiry is checked by the caller on every use.
    try:
        return open_record(decode_signed(entry))
    except RecordError as exc:
        logger.debug("dropping a host record: %s", exc)
        return None


@dataclass
class _KeyRecords:
    by_peer: dict[PeerId, tuple[HostRecord, bytes]] = field(default_factory=dict)
    updated_monotonic: float = field(default_factory=time.monotonic)


class RecordStorage(IStorage):
    """Kademlia storage that merges signed per-peer records instead of replacing values."""

    def __init__(self, config: DiscoveryConfig, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        self._keys: dict[bytes, _KeyRecords] = {}

    def merge(self, key: bytes, value: object) -> int:
        """Merge a bundle into `key`'s records; returns how many of its records were valid."""
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            return 0
        if not isinstance(value, bytes) or len(value) > self._config.max_value_bytes:
            return 0
        accepted = verified_records(key, value, self._clock())
        if not accepted:
            return 0
        slot = self._keys.get(key)
        if slot is None:
            if len(self._keys) >= self._config.max_keys:
                self._drop_expired_everywhere()
            if len(self._keys) >= self._config.max_keys:
                logger.warning("record storage full (%d keys); refusing a new key", len(self._keys))
                return 0
            slot = self._keys[key] = _KeyRecords()
        for record, entry in accepted:
            current = slot.by_peer.get(record.peer_id)
            if current is None or record.freshness() > current[0].freshness():
                slot.by_peer[record.peer_id] = (record, entry)
        slot.updated_monotonic = time.monotonic()
        self._enforce_bounds(key, slot)
        return len(accepted)

    def records(self, key: bytes) -> list[HostRecord]:
        """The unexpired records under `key` (any state)."""
        return [record for record, _ in self._live(key)]

    def __setitem__(self, key: bytes, value: object) -> None:
        self.merge(key, value)

    def get(self, key: bytes, default: Any = None) -> Any:
        live = self._live(key)
        return encode_bundle(entry for _, entry in live) if live else default

    def __getitem__(self, key: bytes) -> bytes:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        self._drop_expired_everywhere()
        return iter([(key, self[key]) for key in list(self._keys)])

    def iter_older_than(self, seconds_old: float) -> list[tuple[bytes, bytes]]:
        self._drop_expired_everywhere()
        cutoff = time.monotonic() - seconds_old
        return [
            (key, self[key]) for key, slot in self._keys.items() if slot.updated_monotonic <= cutoff
        ]

    def _live(self, key: bytes) -> list[tuple[HostRecord, bytes]]:
        slot = self._keys.get(key)
        if slot is None:
            return []
        now_s = self._clock()
        for peer, (record, _) in list(slot.by_peer.items()):
            if record.expires_at_s <= now_s:
                del slot.by_peer[peer]
        if not slot.by_peer:
            del self._keys[key]
            return []
        return list(slot.by_peer.values())

    def _drop_expired_everywhere(self) -> None:
        for key in list(self._keys):
            self._live(key)

    def _enforce_bounds(self, key: bytes, slot: _KeyRecords) -> None:
        # Evict OFFLINE records first, then those expiring soonest.
        def eviction_order(item: tuple[PeerId, tuple[HostRecord, bytes]]) -> tuple[bool, float]:
            record = item[1][0]
            return (record.state is not HostState.OFFLINE, record.expires_at_s)

        total_bytes = sum(len(entry) for _, entry in slot.by_peer.values())
        for peer, (_, entry) in sorted(slot.by_peer.items(), key=eviction_order):
            if len(slot.by_peer) <= self._config.max_records_per_key and (
                total_bytes <= self._config.max_value_bytes - 16  # msgpack list framing
            ):
                break
            del slot.by_peer[peer]
            total_bytes -= len(entry)
        if not slot.by_peer:
            del self._keys[key]


# Set while a datagram from a client-mode peer is being handled (tasks copy the context).
_SENDER_IS_CLIENT: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "stamen_dht_sender_is_client", default=False
)


class _Envelope:
    """Seals datagrams as [version, flags, 16-byte HMAC-SHA256 tag, payload]."""

    VERSION = 1
    FLAG_CLIENT = 0x01
    TAG_BYTES = 16
    HEADER_BYTES = 2 + TAG_BYTES

    def __init__(self, swarm_key: bytes | None) -> None:
        self._mac_key = hashlib.sha256(b"stamen/dht/v1\x00" + (swarm_key or b"")).digest()

    def seal(self, payload: bytes, *, from_client: bool) -> bytes:
        header = bytes([self.VERSION, self.FLAG_CLIENT if from_client else 0])
        return header + self._tag(header, payload) + payload

    def open(self, datagram: bytes) -> tuple[bytes, bool] | None:
        """(payload, sent by a client) if authentic, else None."""
        if len(datagram) < self.HEADER_BYTES or datagram[0] != self.VERSION:
            return None
        header, tag = datagram[:2], datagram[2 : self.HEADER_BYTES]
        payload = datagram[self.HEADER_BYTES :]
        if not hmac.compare_digest(tag, self._tag(header, payload)):
            return None
        return payload, bool(header[1] & self.FLAG_CLIENT)

    def _tag(self, header: bytes, payload: bytes) -> bytes:
        return hmac.digest(self._mac_key, header + payload, "sha256")[: self.TAG_BYTES]


class _SealingTransport:
    """The UDP transport as rpcudp sees it: every datagram sent is sealed."""

    def __init__(self, inner: asyncio.DatagramTransport, envelope: _Envelope, client_mode: bool):
        self._inner, self._envelope, self._client_mode = inner, envelope, client_mode

    def sendto(self, data: bytes, addr: Any = None) -> None:
        if not self._inner.is_closing():
            self._inner.sendto(self._envelope.seal(data, from_client=self._client_mode), addr)

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def close(self) -> None:
        self._inner.close()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._inner.get_extra_info(name, default)


_REQUEST = b"\x00"  # rpcudp's first payload byte for requests (0x01: responses)
_MSG_ID_BYTES = 20  # rpcudp's message id length
_MAX_REQUEST_BYTES = 8192  # rpcudp refuses larger requests
_RpcResult = tuple[bool, Any]  # (answered, answer), as kademlia's call_* return
_Contact = tuple[bytes, str, int]  # (node id, ip, port)


class _SwarmProtocol(KademliaProtocol):
    """Kademlia RPCs with sealed datagrams, client mode, merging stores, owned tasks, and
    a memory of contacts that did not answer."""

    def __init__(
        self,
        node: Node,
        storage: RecordStorage,
        config: DiscoveryConfig,
        envelope: _Envelope,
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
        super().connection_made(_SealingTransport(transport, self._envelope, self._client_mode))

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
        if not (_is_key(nodeid) and _is_key(key)):
            return False
        self.welcome_if_new(Node(nodeid, sender[0], sender[1]))
        return self._record_storage.merge(key, value) > 0

    def rpc_leave(self, sender: Any, nodeid: Any) -> bool:
        """A peer stopping gracefully: forget it now instead of timing out on it later.
        Only the contact at the sender's own address is affected."""
        if not _is_key(nodeid) or _SENDER_IS_CLIENT.get():
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
        result: _RpcResult = (False, None)
        for chunk in _split_bundle(value):
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
        return Node(peer_id, *address) if ok and _is_key(peer_id) else None

    async def _call(self, node: Node, name: str, args: list[Any], timeout_s: float) -> _RpcResult:
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
    ) -> _RpcResult:
        """Send one request and wait up to `timeout_s` for its answer. rpcudp's own sender
        has one timeout for every RPC and breaks if its caller is cancelled."""
        message_id = self._send_request(address, name, args)
        future: asyncio.Future[_RpcResult] = asyncio.get_running_loop().create_future()
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


def _parse_contacts(answer: Any, limit: int) -> list[Node]:
    """The well-formed (id, ip, port) triples of a find_node answer, at most `limit`."""
    if not isinstance(answer, list):
        return []
    nodes = []
    for entry in answer[:limit]:
        if (
            isinstance(entry, list | tuple)
            and len(entry) == 3
            and _is_key(entry[0])
            and isinstance(entry[1], str)
            and isinstance(entry[2], int)
            and 0 < entry[2] < 65536
        ):
            nodes.append(Node(entry[0], entry[1], entry[2]))
    return nodes


async def _closest_live_nodes(
    protocol: _SwarmProtocol, target: Node, seeds: Iterable[Node], ksize: int, alpha: int
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
    in_flight: dict[asyncio.Task[_RpcResult], Node] = {}
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
                    learn(_parse_contacts(answer, limit=ksize))
                else:
                    failed.add(node.id)
    finally:
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.wait(in_flight)


def _is_key(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == KEY_BYTES


def _split_bundle(value: bytes) -> list[bytes]:
    if len(value) <= _MAX_STORE_VALUE_BYTES:
        return [value]
    try:
        entries = _bundle_decoder.decode(value)
    except ValueError:
        return []
    chunks: list[list[bytes]] = [[]]
    size = 0
    for entry in entries:
        if chunks[-1] and size + len(entry) > _MAX_STORE_VALUE_BYTES - 16:
            chunks.append([])
            size = 0
        chunks[-1].append(entry)
        size += len(entry)
    return [encode_bundle(chunk) for chunk in chunks if chunk]


class _SwarmServer(Server):
    """kademlia's Server with our protocol, crawl and an owned refresh task."""

    def __init__(
        self,
        node_id: bytes,
        storage: RecordStorage,
        config: DiscoveryConfig,
        envelope: _Envelope,
        client_mode: bool,
    ) -> None:
        super().__init__(ksize=config.ksize, alpha=config.alpha, node_id=node_id, storage=storage)
        self._config, self._envelope, self._client_mode = config, envelope, client_mode
        self._refresh_task: asyncio.Task[None] | None = None

    def _create_protocol(self) -> _SwarmProtocol:
        return _SwarmProtocol(
            self.node, self.storage, self._config, self._envelope, self._client_mode
        )

    async def bootstrap(self, addrs: list[tuple[str, int]]) -> list[Node]:
        """Ping the initial peers, then find the nodes closest to our own id."""
        protocol = self._swarm_protocol
        seeds = await asyncio.gather(*(protocol.ping_address(address) for address in addrs))
        found = [node for node in seeds if node is not None]
        return await _closest_live_nodes(protocol, self.node, found, self.ksize, self.alpha)

    async def closest_nodes(self, key: bytes) -> list[Node]:
        """The `ksize` live nodes closest to `key`."""
        protocol = self._swarm_protocol
        target = Node(key)
        nearest = protocol.router.find_neighbors(target, k=self.ksize)
        return await _closest_live_nodes(protocol, target, nearest, self.ksize, self.alpha)

    @property
    def _swarm_protocol(self) -> _SwarmProtocol:
        if not isinstance(self.protocol, _SwarmProtocol):
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
        self._server = _SwarmServer(
            peer_id_digest(credentials.public_key),
            self._storage,
            self._config,
            _Envelope(credentials.swarm_key),
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
    def _protocol(self) -> _SwarmProtocol:
        return self._require_started()

    def _require_started(self) -> _SwarmProtocol:
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
