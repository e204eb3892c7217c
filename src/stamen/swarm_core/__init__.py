"""The swarm: wire protocol, identity, discovery, host runtime, client, fine-tuning."""
