"""WebRTC settings: ICE servers, host-candidate addresses, the mux's tunables, and what is
derived from them for aiortc (its `RTCConfiguration`, the peer connection itself, the size
of its UDP socket buffers).

Plain frozen dataclasses, parsed once by the caller (see `factory`) and passed down; every
peer connection is made by `new_peer_connection(config)`, so that all of the settings
apply. This module knows nothing about streams, handshakes or signalling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
from dataclasses import dataclass

from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy, RTCPeerConnection

from stamen.transports.base import Limits
from stamen.transports.webrtc_candidates import HostAddressPeerConnection, check_host_addresses

logger = logging.getLogger(__name__)

SCHEME = "webrtc"


@dataclass(frozen=True)
class MuxSettings:
    limits: Limits = Limits()
    chunk_bytes: int = 64 * 1024  # whole data-channel message, header included
    window_bytes: int = 4 * 1024 * 1024  # per stream, unread bytes the peer may send ahead
    high_water_bytes: int = 1024 * 1024  # `send` waits above this `bufferedAmount`...
    low_water_bytes: int = 256 * 1024  # ...until it drops to this
    keepalive_s: float = 1.0
    dead_after_s: float = 6.0
    close_linger_s: float = 2.0  # how long `close` lets queued data reach the peer


@dataclass(frozen=True)
class IceServer:
    """A STUN or TURN server, e.g. `IceServer(("turn:host:3478",), "user", "secret")`."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None


@dataclass(frozen=True)
class WebRTCConfig:
    """Tunables; the defaults suit a LAN or the internet. No ICE servers: host candidates.

    `relay_only` offers and accepts TURN relay candidates alone (the peer never learns this
    machine's addresses); it needs a `turn:` server among `ice_servers`.

    `host_addresses` are the local IP addresses host candidates are gathered from, e.g.
    `("127.0.0.1",)` to keep tests on loopback or one interface of several; empty means
    aioice's default (every interface address but 127.0.0.1)."""

    ice_servers: tuple[IceServer, ...] = ()
    relay_only: bool = False
    host_addresses: tuple[str, ...] = ()
    mux: MuxSettings = MuxSettings()
    handshake_timeout_s: float = 15.0
    # aioice asks for 256 KiB; bulk transfers drop datagrams with that on a busy host.
    udp_buffer_bytes: int = 4 * 1024 * 1024
    backoff_max_s: float = 10.0

    def __post_init__(self) -> None:
        has_turn = any(
            url.startswith(("turn:", "turns:")) for s in self.ice_servers for url in s.urls
        )
        if self.relay_only and not has_turn:
            raise ValueError("relay_only needs a turn: server among ice_servers")
        check_host_addresses(self.host_addresses)


def with_limits(config: WebRTCConfig, limits: Limits) -> WebRTCConfig:
    """`config` with the mux enforcing `limits`."""
    return dataclasses.replace(config, mux=dataclasses.replace(config.mux, limits=limits))


def rtc_configuration(config: WebRTCConfig) -> RTCConfiguration:
    """aiortc's view of `config`: its ICE servers and transport policy."""
    servers = [RTCIceServer(list(s.urls), s.username, s.credential) for s in config.ice_servers]
    policy = RTCIceTransportPolicy.RELAY if config.relay_only else RTCIceTransportPolicy.ALL
    # An explicit list, even empty: `None` would make aiortc contact Google's STUN server.
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy)


def new_peer_connection(config: WebRTCConfig) -> RTCPeerConnection:
    """A peer connection with `config`'s ICE servers, policy and host addresses."""
    if config.host_addresses:
        return HostAddressPeerConnection(rtc_configuration(config), config.host_addresses)
    return RTCPeerConnection(rtc_configuration(config))


def enlarge_udp_buffers(pc: RTCPeerConnection, size_bytes: int) -> None:
    """Best effort: aiortc keeps its ICE sockets private, so reach them defensively."""
    try:
        sctp = pc.sctp
        if sctp is None:
            return
        protocols = sctp.transport.transport.iceGatherer._connection._protocols
    except AttributeError:
        logger.debug("cannot reach aiortc's ICE sockets; UDP buffers left as they are")
        return
    for protocol in protocols:
        sock = protocol.transport.get_extra_info("socket")
        if sock is None:
            continue
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size_bytes)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size_bytes)
