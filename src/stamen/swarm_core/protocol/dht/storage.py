"""DHT values as bundles of signed per-peer host records, and the storage that merges them.

A value is a msgpack list of encoded `SignedRecord`s (`encode_bundle`). `RecordStorage`
MERGES every stored bundle into what it holds instead of replacing it: stock kademlia's
`set()` would let each announcing host overwrite the others. Every record is verified on
store (signature by the key the record names, expiry, bounds, and that the record's span
covers the key); storage keeps the newest record per peer, drops expired ones on read,
and bounds records per key, bytes per key and keys per node. `verified_records` is the
same check for answers read from other nodes, which are not trusted either.

This module does not know how values travel between nodes nor who asked to store them.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from kademlia.storage import IStorage

from stamen.swarm_core.protocol.dht.config import DiscoveryConfig, block_key, is_key
from stamen.swarm_core.protocol.identity import PeerId
from stamen.swarm_core.protocol.records import (
    MAX_SIGNED_RECORD_BYTES,
    HostRecord,
    HostState,
    RecordError,
    check_fresh,
    decode_signed,
    open_record,
)

logger = logging.getLogger(__name__)

MAX_STORE_VALUE_BYTES = 6 * 1024  # rpcudp refuses requests above 8 KiB (key, ids, framing)
_MAX_BUNDLE_ENTRIES = 256
_BundleEntries = Annotated[
    list[Annotated[bytes, msgspec.Meta(max_length=MAX_SIGNED_RECORD_BYTES)]],
    msgspec.Meta(max_length=_MAX_BUNDLE_ENTRIES),
]
_bundle_decoder = msgspec.msgpack.Decoder(_BundleEntries)


def encode_bundle(signed_records: Iterable[bytes]) -> bytes:
    """A DHT value: a msgpack list of encoded `SignedRecord`s."""
    return msgspec.msgpack.encode(list(signed_records))


def split_bundle(value: bytes) -> list[bytes]:
    """`value` as bundles of at most `MAX_STORE_VALUE_BYTES` each (one store request
    apiece); [] if it is too big and undecodable."""
    if len(value) <= MAX_STORE_VALUE_BYTES:
        return [value]
    try:
        entries = _bundle_decoder.decode(value)
    except ValueError:
        return []
    chunks: list[list[bytes]] = [[]]
    size = 0
    for entry in entries:
        if chunks[-1] and size + len(entry) > MAX_STORE_VALUE_BYTES - 16:
            chunks.append([])
            size = 0
        chunks[-1].append(entry)
        size += len(entry)
    return [encode_bundle(chunk) for chunk in chunks if chunk]


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
        if not is_key(key):
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
