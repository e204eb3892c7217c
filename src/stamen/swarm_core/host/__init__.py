"""The host side of the swarm: serving a span of blocks to clients.

`server` (the RPC handlers and the announcement loop), `runtime` (spans, sessions and
their KV cache, the compute thread), `scheduler` (inference steps ahead of bulk work),
`sessions` (per-session state and the runtime's typed refusals), `cli` (`swarm-host`).

Built on `stamen.swarm_core.protocol`; never imports `stamen.swarm_core.client`."""
