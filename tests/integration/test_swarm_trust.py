"""Discovery records against the shared SmolLM2 swarm on 127.0.0.1: a record forged with
another key is refused by honest DHT nodes, and ignored by the client when a lying DHT
node serves it anyway.

Its own module, run after the other users of the shared swarm: the lying node is a
server-mode DHT node, and once it leaves, everyone's lookups wait for it to time out.
"""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from stamen.swarm_core.client.distributed import DistributedModelForCausalLM
from stamen.swarm_core.protocol.discovery import (
    Discovery,
    block_key,
    encode_bundle,
    parse_host_port,
)
from stamen.swarm_core.protocol.identity import sign
from stamen.swarm_core.protocol.records import HostState, SignedRecord, encode_signed, restamped
from stamen.transports.base import Credentials
from tests.integration.conftest import SwarmProcesses, refresh

_RECORD_DOMAIN = b"stamen/host-record/v1"


async def test_a_record_forged_with_another_key_is_ignored(
    smollm2_swarm: SwarmProcesses, smollm2_model: DistributedModelForCausalLM
) -> None:
    host = smollm2_swarm.hosts()[0]
    genuine = next(r for r in smollm2_model.swarm.records() if host.serves(r.peer_id))
    attacker = Credentials.generate()
    # A newer record "from" the victim, saying it left and now lives at the attacker's.
    body = msgspec.msgpack.encode(
        restamped(
            msgspec.structs.replace(
                genuine, state=HostState.OFFLINE, addresses=("tcp://127.0.0.1:9",)
            )
        )
    )
    forged = SignedRecord(body, sign(attacker.private_key, body, domain=_RECORD_DOMAIN))
    bundle = encode_bundle([encode_signed(forged)])
    keys = {block_key(genuine.model, b) for b in range(*genuine.span)}

    mallory = Discovery(attacker, listen_host="127.0.0.1", initial_peers=[smollm2_swarm.dht])
    async with mallory:
        # 1. Honest DHT nodes refuse to store it.
        for key in keys:
            ok, accepted = await mallory._protocol.store(
                parse_host_port(smollm2_swarm.dht), mallory._server.node.id, key, bundle
            )
            assert ok and not accepted
        # 2. A lying DHT node serves it anyway; the client must not believe it.
        asked: list[bytes] = []
        honest_get = mallory._storage.get

        def lying_get(key: bytes, default: Any = None) -> Any:
            if key in keys:
                asked.append(key)
                return bundle
            return honest_get(key, default)

        mallory._storage.get = lying_get  # type: ignore[method-assign]
        await asyncio.to_thread(refresh, smollm2_model)
        assert asked, "the client never asked the lying node"
    seen = next(r for r in smollm2_model.swarm.records() if r.peer_id == genuine.peer_id)
    assert seen.state is HostState.ONLINE
    assert seen.addresses == genuine.addresses
