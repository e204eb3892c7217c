"""A swarm client as its own process, so that a netns test can run it inside a namespace:

    python -m tests.netns.swarm_client CHECKPOINT --initial-peers HOST:PORT \\
        --input-ids 1,2,3 --max-new-tokens N [--turn turn:HOST:PORT --turn-user U
        --turn-password P --relay-only]

It greedily generates from `--input-ids` through the swarm serving CHECKPOINT and prints one
JSON line on stdout: the token ids, the address of every host it holds a connection to, and,
for each WebRTC connection, the ICE candidate pair it settled on (`local`/`remote` types such
as host, prflx, relay, and the remote address), read from aiortc's internals because no public
API reports it. Exit 0 on success; errors go to stderr with exit 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import torch

from stamen.swarm_core.client.distributed import AutoDistributedModelForCausalLM
from stamen.transports.webrtc import IceServer, WebRTCConfig


def _ice_pair(connection: Any) -> dict[str, str] | None:
    """The nominated candidate pair of a `MuxConnection`, or None for other transports."""
    pc = getattr(connection, "_pc", None)
    if pc is None or pc.sctp is None:
        return None
    ice = pc.sctp.transport.transport._connection  # aioice's Connection
    pair = ice._nominated.get(1)
    if pair is None:
        return None
    return {
        "local": pair.local_candidate.type,
        "remote": pair.remote_candidate.type,
        "remote_addr": f"{pair.remote_addr[0]}:{pair.remote_addr[1]}",
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="swarm_client")
    parser.add_argument("checkpoint")
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--input-ids", required=True, help="comma-separated token ids")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--turn", help="the only ICE server, turn:HOST:PORT")
    parser.add_argument("--turn-user")
    parser.add_argument("--turn-password")
    parser.add_argument("--relay-only", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    for noisy in ("kademlia", "rpcudp", "aioice", "aiortc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    servers = (IceServer((args.turn,), args.turn_user, args.turn_password),) if args.turn else ()
    config = WebRTCConfig(ice_servers=servers, relay_only=args.relay_only)
    input_ids = torch.tensor([[int(t) for t in args.input_ids.split(",")]])
    with AutoDistributedModelForCausalLM.from_pretrained(
        args.checkpoint,
        initial_peers=args.initial_peers,
        wait_for_coverage_s=30.0,
        webrtc={"config": config},
    ) as model:
        out = model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        records = {r.peer_id: r for r in model.swarm.records()}
        hops = [
            {
                "addresses": list(records[peer_id].addresses) if peer_id in records else [],
                "ice": _ice_pair(pool.connections[0].connection),
            }
            for peer_id, pool in model.swarm._connections.items()
            if pool.connections
        ]
    print(json.dumps({"tokens": out[0].tolist(), "hops": hops}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
