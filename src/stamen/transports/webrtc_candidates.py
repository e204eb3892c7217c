"""Choose, per peer connection, the local addresses WebRTC gathers host candidates from.

aioice (0.13) gathers host candidates from every interface address but 127.0.0.1
(`aioice.ice.get_host_addresses`), and aiortc has no option to choose them. So two
processes on one machine talk over its LAN address, and a host with several interfaces
offers them all. `HostAddressPeerConnection` gathers from the addresses it is given only:

1. `install_host_address_hook()` (idempotent) puts a dispatcher in place of
   `aioice.ice.get_host_addresses`. While a `HostAddressPeerConnection` gathers, the
   dispatcher returns that connection's addresses; at any other time it calls aioice's own
   function, so peer connections created otherwise behave exactly as before.
2. `HostAddressPeerConnection.setLocalDescription` (the one place aiortc 1.16 gathers
   candidates) sets a context variable around aiortc's method. asyncio copies the context
   into the tasks aiortc gathers in, so concurrent peer connections each see their own
   addresses and nothing leaks into the caller's context.

If a future aioice renames or stops calling `get_host_addresses`, the hook no longer
applies and gathering falls back to aioice's default: `tests/unit/test_webrtc_candidates.py`
catches that.

This module knows nothing about streams, signalling or the mux.
"""

from __future__ import annotations

import contextvars
import ipaddress
from collections.abc import Callable

import aioice.ice
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

_GATHER_FROM: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "stamen_webrtc_host_addresses", default=None
)
_AIOICE_DEFAULT: Callable[[bool, bool], list[str]] = aioice.ice.get_host_addresses


def check_host_addresses(addresses: tuple[str, ...]) -> None:
    """Raise `ValueError` unless each entry is a literal IPv4 or IPv6 address."""
    for address in addresses:
        ipaddress.ip_address(address)  # raises ValueError with the offending value


def _host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    chosen = _GATHER_FROM.get()
    if chosen is None:
        return _AIOICE_DEFAULT(use_ipv4, use_ipv6)
    families = {4} if use_ipv4 else set()
    if use_ipv6:
        families.add(6)
    return [address for address in chosen if ipaddress.ip_address(address).version in families]


def install_host_address_hook() -> None:
    """Route aioice's host-address lookup through `_host_addresses` (once per process)."""
    if aioice.ice.get_host_addresses is not _host_addresses:
        aioice.ice.get_host_addresses = _host_addresses


class HostAddressPeerConnection(RTCPeerConnection):
    """An `RTCPeerConnection` whose host candidates come from `host_addresses` only."""

    def __init__(self, configuration: RTCConfiguration, host_addresses: tuple[str, ...]) -> None:
        check_host_addresses(host_addresses)
        install_host_address_hook()
        super().__init__(configuration)
        self.host_addresses = host_addresses

    async def setLocalDescription(  # aiortc's (the W3C API's) names
        self,
        sessionDescription: RTCSessionDescription | None = None,
    ) -> None:
        token = _GATHER_FROM.set(self.host_addresses)
        try:
            await super().setLocalDescription(sessionDescription)
        finally:
            _GATHER_FROM.reset(token)
