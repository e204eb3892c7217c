"""Settings, the error type and the key space shared by every DHT module.

A key is the 20-byte SHA-1 of "model/block": hosts serving a block are announced under it.
This module does not know how keys are stored, looked up or routed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

KEY_BYTES = 20


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


def is_key(value: object) -> bool:
    """Whether `value` is shaped like a DHT key or node id (20 bytes)."""
    return isinstance(value, bytes) and len(value) == KEY_BYTES
