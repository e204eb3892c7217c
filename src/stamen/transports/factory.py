"""Pick a transport by name: `make_transport("tcp", credentials)`, and the command-line
flags that choose and tune one (`add_transport_arguments` + `transport_from_args`).

Names are the address schemes: `tcp`, `webrtc`, `memory`. Options are passed to the
chosen transport's constructor, so a typo fails loudly instead of being ignored. The
webrtc module (aiortc) is imported only when asked for.

This module knows the transports' option types, not what the layers above do with them.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from stamen.transports.base import (
    ConnectError,
    Connection,
    ConnectionHandler,
    Credentials,
    Limits,
    Listener,
    Transport,
)
from stamen.transports.memory import MemoryTransport
from stamen.transports.tcp import TcpOptions, TcpTransport

TRANSPORT_NAMES = ("tcp", "webrtc", "memory")


def make_transport(name: str, credentials: Credentials, **options: Any) -> Transport:
    """A transport by scheme name.

    tcp: `TcpOptions` fields (`limits`, `window_bytes`, `keepalive_interval_s`,
    `keepalive_timeout_s`, `handshake_timeout_s`); webrtc: `WebRTCTransport`'s keyword
    arguments (`limits`, `config`, ...); memory: `hub`, `limits`, `window_bytes`.
    Raises `ValueError` for an unknown name or option."""
    match name:
        case "tcp":
            try:
                tcp_options = TcpOptions(**options)
            except TypeError as exc:
                raise ValueError(f"bad tcp option: {exc}") from exc
            return TcpTransport(credentials, tcp_options)
        case "memory":
            return MemoryTransport(credentials, **options)
        case "webrtc":
            from stamen.transports.webrtc import WebRTCTransport

            return WebRTCTransport(credentials, **options)
    raise ValueError(f"unknown transport {name!r}; expected one of {', '.join(TRANSPORT_NAMES)}")


def add_transport_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `transport_from_args` reads."""
    group = parser.add_argument_group("transport")
    group.add_argument(
        "--transport", choices=TRANSPORT_NAMES, default="tcp", help="how to reach peers"
    )
    group.add_argument("--keepalive-interval-s", type=float, default=1.0)
    group.add_argument(
        "--keepalive-timeout-s",
        type=float,
        default=5.0,
        help="drop a peer silent for this long",
    )
    group.add_argument("--max-message-bytes", type=int, default=Limits().max_message_bytes)
    group.add_argument("--max-streams", type=int, default=Limits().max_streams)
    group.add_argument(
        "--ice-server",
        action="append",
        metavar="URL",
        help="webrtc: a STUN or TURN server (stun:HOST:PORT, turn:HOST:PORT), repeatable "
        "[STAMEN_ICE_SERVERS, space-separated] (default: none, host candidates only)",
    )
    group.add_argument(
        "--ice-username",
        default=os.environ.get("STAMEN_ICE_USERNAME"),
        help="webrtc: TURN user name [STAMEN_ICE_USERNAME]",
    )
    group.add_argument(
        "--ice-credential",
        default=os.environ.get("STAMEN_ICE_CREDENTIAL"),
        help="webrtc: TURN password; prefer the environment, command lines are visible to "
        "other users [STAMEN_ICE_CREDENTIAL]",
    )
    group.add_argument(
        "--webrtc-host-address",
        action="append",
        metavar="IP",
        help="webrtc: gather host candidates from this local address only, repeatable "
        "[STAMEN_WEBRTC_HOST_ADDRESSES, space-separated] (default: every interface "
        "address but 127.0.0.1)",
    )
    group.add_argument(
        "--ice-relay-only",
        action="store_true",
        help="webrtc: connect through the TURN server only, never revealing this machine's "
        "addresses to peers",
    )


def transport_from_args(args: argparse.Namespace, credentials: Credentials) -> Transport:
    """The transport the parsed flags ask for."""
    limits = Limits(max_message_bytes=args.max_message_bytes, max_streams=args.max_streams)
    if args.transport == "tcp":
        return make_transport(
            "tcp",
            credentials,
            limits=limits,
            keepalive_interval_s=args.keepalive_interval_s,
            keepalive_timeout_s=args.keepalive_timeout_s,
        )
    if args.transport == "webrtc":
        return make_transport("webrtc", credentials, limits=limits, config=_webrtc_config(args))
    return make_transport(args.transport, credentials, limits=limits)


def _webrtc_config(args: argparse.Namespace) -> Any:
    from stamen.transports.webrtc_config import IceServer, WebRTCConfig

    servers = tuple(
        IceServer((url,), args.ice_username, args.ice_credential)
        if url.startswith(("turn:", "turns:"))
        else IceServer((url,))
        for url in args.ice_server or os.environ.get("STAMEN_ICE_SERVERS", "").split()
    )
    host_addresses = tuple(
        args.webrtc_host_address or os.environ.get("STAMEN_WEBRTC_HOST_ADDRESSES", "").split()
    )
    return WebRTCConfig(
        ice_servers=servers, relay_only=args.ice_relay_only, host_addresses=host_addresses
    )


class SchemeRouter(Transport):
    """Dials each address with the transport of its scheme (`tcp://`, `webrtc://`, ...),
    so a client reaches hosts whatever transport each one listens on. Transports are
    created on first use."""

    name = "any"

    def __init__(self, credentials: Credentials, **options_by_scheme: dict[str, Any]) -> None:
        self._credentials = credentials
        self._options = options_by_scheme
        self._transports: dict[str, Transport] = {}

    def transport(self, scheme: str) -> Transport:
        if scheme not in self._transports:
            options = self._options.get(scheme, {})
            self._transports[scheme] = make_transport(scheme, self._credentials, **options)
        return self._transports[scheme]

    async def connect(
        self,
        address: str,
        *,
        expected_public_key: bytes | None = None,
        timeout_s: float = 10.0,
    ) -> Connection:
        scheme, sep, _ = address.partition("://")
        if not sep or scheme not in TRANSPORT_NAMES:
            raise ConnectError(f"unsupported address {address!r}")
        return await self.transport(scheme).connect(
            address, expected_public_key=expected_public_key, timeout_s=timeout_s
        )

    async def listen(self, address: str, handler: ConnectionHandler) -> Listener:
        scheme = address.partition("://")[0]
        return await self.transport(scheme).listen(address, handler)

    async def aclose(self) -> None:
        for transport in self._transports.values():
            await transport.aclose()
