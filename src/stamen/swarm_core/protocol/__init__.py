"""What hosts and clients both speak: wire messages and tensor frames (`wire`, `codecs`),
the RPC layer over transports (`rpc`), peer identities (`identity`), signed host records
(`records`), their discovery in the DHT (`discovery`, `dht/`), and the parent-process
watch every command-line tool shares (`lifeline`).

Imports neither `stamen.swarm_core.host` nor `stamen.swarm_core.client` (checked by
import-linter)."""
