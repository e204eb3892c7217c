"""The client side of the swarm: reaching hosts and driving hidden states through them.

`remote` (the seam: `SpanClient`, `HopSession`, `SwarmView`, the client's exceptions),
`swarm` (`SwarmClient`: the DHT view and pooled RPC connections), `pool`, `routing`,
`inference` (sessions with failover), `autograd` (bulk forward / backward for
fine-tuning), `prompts`, `generation` (the decode loop), `distributed` (HF-style model
classes).

Built on `stamen.swarm_core.protocol`; never imports `stamen.swarm_core.host`."""
