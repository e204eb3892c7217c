"""`swarm-host`: serve a span of a model's transformer blocks to the swarm.

    swarm-host MODEL [--blocks A:B | --num-blocks N] [--transport tcp|webrtc]
               [--listen ADDR] [--initial-peers HOST:PORT ...] [--device cuda]
               [--dtype bfloat16] [--quant none|int8|nf4] [--max-cache-tokens N]
               [--max-request-tokens N] [--no-batching] [--max-batch-rows N]
               [--prefill-chunk-tokens N] [--no-cuda-graphs]
               [--batch-window-ms MS] [--compile]
               [--public-name NAME] [--identity PATH] [--swarm-key-file PATH]
               [--parent-pid PID]

Settings come from flags, then `STAMEN_*` environment variables, then defaults.
SIGTERM, SIGINT, or (with `--parent-pid`) the parent process dying stop the host: it
announces OFFLINE and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from stamen.swarm_core.host.runtime import RuntimeLimits
from stamen.swarm_core.host.server import Host, HostSettings
from stamen.swarm_core.protocol.identity import (
    IdentityError,
    load_or_create_identity,
    read_swarm_key,
)
from stamen.swarm_core.protocol.lifeline import add_parent_pid_argument, parent_watch
from stamen.swarm_core.protocol.records import model_name_of
from stamen.transports.base import Credentials
from stamen.transports.factory import add_transport_arguments, transport_from_args

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"STAMEN_{name}", default)


def _env_flag(name: str) -> bool:
    return (_env(name) or "").strip().lower() in ("1", "true", "yes", "on")


def _block_range(text: str) -> tuple[int, int]:
    try:
        start_text, end_text = text.split(":")
        start, end = int(start_text), int(end_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"empty or negative block range {text!r}")
    return start, end


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm-host",
        description="Serve a contiguous span of a model's transformer blocks to the swarm.",
        epilog="Example: swarm-host org/model --num-blocks 16 --initial-peers 10.0.0.5:31330",
    )
    parser.add_argument(
        "model", help="hub id (org/name), local Hugging Face directory, or .gguf file"
    )
    parser.add_argument("--model-name", help="name to announce (default: derived from MODEL)")
    span = parser.add_mutually_exclusive_group()
    span.add_argument("--blocks", type=_block_range, help="serve blocks START:END (end exclusive)")
    span.add_argument(
        "--num-blocks",
        type=int,
        help="serve this many blocks, where the swarm has the least throughput (default: all)",
    )
    parser.add_argument(
        "--listen",
        default=_env("LISTEN", "tcp://127.0.0.1:0"),
        help="transport address to accept clients on (tcp://HOST:PORT, or "
        "webrtc://RELAY_HOST:PORT to be reached through a signalling relay)",
    )
    parser.add_argument(
        "--dht-listen",
        type=_host_port,
        default=_env("DHT_LISTEN", "127.0.0.1:0"),
        help="UDP HOST:PORT of this host's DHT node (default 127.0.0.1:0, any free port)",
    )
    parser.add_argument(
        "--dht-client",
        action="store_true",
        help="only query the DHT, without joining others' routing tables (behind NAT)",
    )
    parser.add_argument(
        "--initial-peers",
        nargs="*",
        default=(_env("INITIAL_PEERS") or "").split(),
        metavar="HOST:PORT",
        help="DHT addresses of bootstrap peers (swarm-bootstrap prints its own)",
    )
    parser.add_argument("--device", default=_env("DEVICE", "cpu"), help="cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=_env("DTYPE", "float32"))
    parser.add_argument(
        "--quant",
        choices=("none", "int8", "nf4"),
        default=_env("QUANT", "none"),
        help="bitsandbytes quantization of the blocks' linear layers",
    )
    parser.add_argument(
        "--max-cache-tokens",
        type=int,
        default=int(_env("MAX_CACHE_TOKENS", "16384") or 16384),
        help="KV cache budget per block, in tokens, shared by all sessions",
    )
    parser.add_argument(
        "--max-request-tokens",
        type=_positive_int,
        default=_env("MAX_REQUEST_TOKENS", "16384"),
        metavar="N",
        help="most tokens (batch x length) one forward or backward call (fine-tuning, "
        "bulk scoring) may carry; announced to clients, and larger calls are refused as "
        "too_large so the client splits them (default 16384; env STAMEN_MAX_REQUEST_TOKENS)",
    )
    parser.add_argument(
        "--no-batching",
        action="store_true",
        default=_env_flag("NO_BATCHING"),
        help="run each session's decode step as a compute job of its own instead of merging "
        "concurrent sessions' steps into one batch (env STAMEN_NO_BATCHING=1)",
    )
    parser.add_argument(
        "--max-batch-rows",
        type=_positive_int,
        default=_env("MAX_BATCH_ROWS", "64"),
        metavar="N",
        help="most rows (sessions x their batch size) in one decode batch (default 64; env "
        "STAMEN_MAX_BATCH_ROWS)",
    )
    parser.add_argument(
        "--prefill-chunk-tokens",
        type=_positive_int,
        default=_env("PREFILL_CHUNK_TOKENS", "512"),
        metavar="N",
        help="prefills and replays run in chunks of at most N tokens (batch x length), so "
        "other sessions' decode steps run between the chunks; smaller keeps decode latency "
        "steadier, larger prefills faster (default 512; env STAMEN_PREFILL_CHUNK_TOKENS)",
    )
    parser.add_argument(
        "--no-cuda-graphs",
        action="store_true",
        default=_env_flag("NO_CUDA_GRAPHS"),
        help="on a GPU, run decode batches eagerly instead of replaying them as CUDA graphs "
        "(env STAMEN_NO_CUDA_GRAPHS=1)",
    )
    parser.add_argument(
        "--batch-window-ms",
        type=float,
        default=float(_env("BATCH_WINDOW_MS", "5") or 5),
        metavar="MS",
        help="a decode batch waits up to MS (and at most half a step) for the sessions of the "
        "last batch to send their next steps, so that they stay in one batch; a lone session "
        "never waits (default 5; 0 = no window; env STAMEN_BATCH_WINDOW_MS)",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        default=_env_flag("COMPILE"),
        help="on a GPU, torch.compile each decode batch size before capturing it: faster "
        "steps, but every new batch size compiles for seconds on first use "
        "(env STAMEN_COMPILE=1)",
    )
    parser.add_argument("--public-name", default=_env("PUBLIC_NAME", ""))
    parser.add_argument(
        "--identity",
        type=Path,
        default=_env("IDENTITY"),
        help="ed25519 key file, created with mode 0600 on first start; keeps the peer id "
        "stable across restarts (default: a new key each start)",
    )
    parser.add_argument(
        "--swarm-key-file", type=Path, help="shared secret of a private swarm (refuses strangers)"
    )
    parser.add_argument(
        "--announce-interval-s",
        type=float,
        default=5.0,
        help="re-announce (with the free cache) this often; must stay below the records' "
        "15 s lifetime, after which a host that stopped announcing drops out",
    )
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))
    add_parent_pid_argument(parser)
    add_transport_arguments(parser)
    return parser


def settings_from_args(args: argparse.Namespace) -> HostSettings:
    dht_host, dht_port = (
        args.dht_listen if isinstance(args.dht_listen, tuple) else _host_port(args.dht_listen)
    )
    return HostSettings(
        model_ref=args.model,
        model_name=args.model_name or model_name_of(args.model),
        blocks=args.blocks,
        num_blocks=args.num_blocks,
        listen=args.listen,
        dht_host=dht_host,
        dht_port=dht_port,
        dht_client_mode=args.dht_client or args.transport == "webrtc",
        initial_peers=tuple(args.initial_peers),
        device=args.device,
        dtype=_DTYPES[args.dtype],
        quantization=args.quant,
        max_cache_tokens=args.max_cache_tokens,
        max_request_tokens=args.max_request_tokens,
        public_name=args.public_name,
        announce_interval_s=args.announce_interval_s,
        limits=RuntimeLimits(
            max_cache_tokens=args.max_cache_tokens,
            max_bulk_tokens=args.max_request_tokens,
            batching=not args.no_batching,
            max_batch_rows=args.max_batch_rows,
            prefill_chunk_tokens=args.prefill_chunk_tokens,
            cuda_graphs=not args.no_cuda_graphs,
            batch_window_s=args.batch_window_ms / 1000,
            compile=args.compile,
        ),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("kademlia", "rpcudp"):  # they log every datagram at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        swarm_key = read_swarm_key(args.swarm_key_file) if args.swarm_key_file else None
        credentials = (
            load_or_create_identity(Path(args.identity), swarm_key=swarm_key)
            if args.identity
            else Credentials.generate(swarm_key)
        )
    except (OSError, IdentityError) as error:
        print(f"swarm-host: {error}", file=sys.stderr)
        return 2
    try:
        settings = settings_from_args(args)
    except ValueError as error:
        print(f"swarm-host: {error}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve(settings, credentials, args))
    except KeyboardInterrupt:
        return 0


async def _serve(settings: HostSettings, credentials: Credentials, args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    transport = transport_from_args(args, credentials)
    host = Host(settings, credentials, transport)
    try:
        async with parent_watch(args.parent_pid, stop):
            await host.run(stop)
    except Exception as error:
        logger.error("swarm-host failed: %s", error, exc_info=logger.isEnabledFor(logging.DEBUG))
        return 1
    finally:
        await transport.aclose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
