"""Stamen: large language models served by a swarm of machines, behind an OpenAI API."""

from __future__ import annotations

from typing import Any

from stamen.version import __version__

__all__ = ["AutoDistributedModelForCausalLM", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import stamen` stays light (no torch, no transformers).
    if name == "AutoDistributedModelForCausalLM":
        from stamen.swarm_core.client.distributed import AutoDistributedModelForCausalLM

        return AutoDistributedModelForCausalLM
    raise AttributeError(f"module 'stamen' has no attribute {name!r}")
