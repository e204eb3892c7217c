"""`swarm-bootstrap`: a reachable node that seeds discovery and relays WebRTC signalling.

It runs one server-mode DHT node (UDP) that hosts and clients pass as `--initial-peers`,
and, on the same port number over TCP unless told otherwise, the WebRTC signalling relay
through which hosts behind NAT are reached. Once both listen it prints one line to stdout,

    swarm-bootstrap ready: dht=HOST:PORT signaling=HOST:PORT peer_id=...

then serves until SIGTERM or SIGINT (or, with `--parent-pid`, until the process that
started it is gone) and exits 0. Startup failures (unsafe identity file,
port in use, joining other seeds timed out) are logged and exit 1.

Settings come from flags, then `STAMEN_*` environment variables, then defaults; they are
parsed once here. This module knows nothing about models or hosts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stamen.swarm_core.protocol.discovery import Discovery, DiscoveryError, parse_host_port
from stamen.swarm_core.protocol.identity import (
    IdentityError,
    load_or_create_identity,
    peer_id_of,
    read_swarm_key,
)
from stamen.swarm_core.protocol.lifeline import add_parent_pid_argument, parent_watch
from stamen.transports.base import Credentials

logger = logging.getLogger(__name__)

DEFAULT_LISTEN = "0.0.0.0:31337"


@dataclass(frozen=True)
class BootstrapSettings:
    listen: tuple[str, int]
    signaling_listen: tuple[str, int] | None  # None: no relay
    identity_path: Path | None  # None: a fresh key each start
    swarm_key: bytes | None
    initial_peers: tuple[str, ...]
    log_level: str
    parent_pid: int | None = None  # stop when this process is no longer our parent


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-bootstrap",
        description=(
            "Run a Stamen bootstrap node: a DHT seed (UDP) that hosts and clients join "
            "through, plus the WebRTC signalling relay (TCP) for hosts behind NAT."
        ),
        epilog=(
            "Example: swarm-bootstrap --listen 0.0.0.0:31337 --identity ~/.stamen/bootstrap.key; "
            "then swarm-host --initial-peers PUBLIC_IP:31337 ... "
            "Every flag also reads an environment variable (shown in brackets); flags win."
        ),
    )
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        default=os.environ.get("STAMEN_LISTEN", DEFAULT_LISTEN),
        help=f"UDP address of the DHT node; port 0 picks a free one [STAMEN_LISTEN] "
        f"(default {DEFAULT_LISTEN})",
    )
    relay = parser.add_mutually_exclusive_group()
    relay.add_argument(
        "--signaling-listen",
        metavar="HOST:PORT",
        default=os.environ.get("STAMEN_SIGNALING_LISTEN"),
        help="TCP address of the WebRTC signalling relay [STAMEN_SIGNALING_LISTEN] "
        "(default: the --listen address; port 0 there means a free port)",
    )
    relay.add_argument(
        "--no-signaling", action="store_true", help="do not run the signalling relay"
    )
    parser.add_argument(
        "--identity",
        metavar="PATH",
        default=os.environ.get("STAMEN_IDENTITY"),
        help="ed25519 key file, created (mode 0600) if missing; keeps the peer id stable "
        "across restarts [STAMEN_IDENTITY] (default: a new key each start)",
    )
    key = parser.add_mutually_exclusive_group()
    key.add_argument(
        "--swarm-key",
        metavar="SECRET",
        help="shared secret of a private swarm; peers without it are ignored. Prefer "
        "--swarm-key-file or STAMEN_SWARM_KEY: command lines are visible to other users",
    )
    key.add_argument(
        "--swarm-key-file",
        metavar="PATH",
        help="read the swarm key from a file (trailing newline stripped)",
    )
    parser.add_argument(
        "--initial-peers",
        metavar="HOST:PORT",
        nargs="*",
        default=_split_list(os.environ.get("STAMEN_INITIAL_PEERS", "")),
        help="other bootstrap nodes to join, so that seeds know each other "
        "[STAMEN_INITIAL_PEERS, comma-separated]",
    )
    parser.add_argument(
        "--log-level",
        default=os.environ.get("STAMEN_LOG_LEVEL", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="[STAMEN_LOG_LEVEL] (default INFO)",
    )
    add_parent_pid_argument(parser)
    return parser


def _split_list(text: str) -> list[str]:
    return [item for item in text.replace(",", " ").split() if item]


def parse_settings(argv: Sequence[str] | None) -> BootstrapSettings:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        listen = parse_host_port(args.listen)
        signaling = (
            None if args.no_signaling else parse_host_port(args.signaling_listen or args.listen)
        )
        for peer in args.initial_peers:
            parse_host_port(peer)
        swarm_key = _swarm_key(args)
    except (ValueError, OSError, IdentityError) as exc:
        parser.error(str(exc))
    return BootstrapSettings(
        listen=listen,
        signaling_listen=signaling,
        identity_path=Path(args.identity).expanduser() if args.identity else None,
        swarm_key=swarm_key,
        initial_peers=tuple(args.initial_peers),
        log_level=args.log_level,
        parent_pid=args.parent_pid,
    )


def _swarm_key(args: argparse.Namespace) -> bytes | None:
    if args.swarm_key_file:
        return read_swarm_key(args.swarm_key_file)
    if args.swarm_key is not None:
        key = args.swarm_key.encode()
    else:
        key = os.environ.get("STAMEN_SWARM_KEY", "").encode()
    return key.strip() or None


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if settings.log_level != "DEBUG":
        # kademlia logs every lookup at INFO and every unanswered request at ERROR.
        logging.getLogger("kademlia").setLevel(logging.WARNING)
        logging.getLogger("rpcudp").setLevel(logging.CRITICAL)
    try:
        credentials = _credentials(settings)
        return asyncio.run(_serve(settings, credentials))
    except (IdentityError, DiscoveryError, OSError) as exc:
        logger.error("swarm-bootstrap cannot start: %s", exc)
        return 1


def _credentials(settings: BootstrapSettings) -> Credentials:
    if settings.identity_path is None:
        logger.info("no --identity given: using a new key (the peer id changes on restart)")
        return Credentials.generate(settings.swarm_key)
    return load_or_create_identity(settings.identity_path, settings.swarm_key)


async def _serve(settings: BootstrapSettings, credentials: Credentials) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    host, port = settings.listen
    discovery = Discovery(
        credentials, listen_host=host, listen_port=port, initial_peers=settings.initial_peers
    )
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(discovery)
        dht_host, dht_port = discovery.address
        signaling_address = "off"
        if settings.signaling_listen is not None:
            relay = await _start_relay(*settings.signaling_listen)
            if relay is not None:
                stack.push_async_callback(relay.close)
                signaling_address = relay.address
        peer_id = peer_id_of(credentials)
        print(
            f"swarm-bootstrap ready: dht={dht_host}:{dht_port} "
            f"signaling={signaling_address} peer_id={peer_id}",
            flush=True,
        )
        logger.info(
            "hosts and clients join with --initial-peers %s:%d%s",
            dht_host,
            dht_port,
            " (use this machine's public address instead of 0.0.0.0)"
            if dht_host == "0.0.0.0"
            else "",
        )
        async with parent_watch(settings.parent_pid, stop):
            await stop.wait()
        logger.info("shutting down")
    return 0


async def _start_relay(host: str, port: int) -> Any | None:
    """The signalling relay, or None if this build has no relay module."""
    try:
        from stamen.transports.signaling import SignalingRelay
    except ImportError:
        logger.warning("the WebRTC signalling relay is not available in this build; DHT only")
        return None
    relay = SignalingRelay()
    await relay.start(host, port)
    return relay


if __name__ == "__main__":
    sys.exit(main())
