"""The DHT under `stamen.swarm_core.protocol.discovery`, one job per module.

- `config`: `DiscoveryConfig`, `DiscoveryError`, and the key space (`block_key`).
- `storage`: value bundles of signed per-peer records, and `RecordStorage`, which merges
  and verifies them.
- `envelope`: datagrams sealed with a swarm-key HMAC and a client-mode flag.
- `protocol`: kademlia's protocol with sealed datagrams, client mode, bounded RPCs,
  a memory of silent contacts, and `leave`.
- `server`: kademlia's server with our protocol, the streaming crawl and an owned refresh
  task.

Callers use `stamen.swarm_core.protocol.discovery`; nothing here knows what records are used for.
"""
