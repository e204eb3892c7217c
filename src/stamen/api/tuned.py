"""A fine-tuned model served as an engine: the base model's engine seen through prompts.

`tuned_engine(base, model_id, prompts_path)` reads a `PromptTuning.save` file (a job's
checkpoint or result) and returns an `EngineClient` named `model_id` whose chains are
the base's chains opened `P` tokens longer, carrying the deep prompts, behind a
`PromptedChain` that puts the prefix in front: the decoding loop and serving run
unchanged. Its context is the base's minus `P`; tokenizer, head, readiness and swarm
are the base's; its fingerprint follows the prompts file's content.

A tuned engine cannot itself be fine-tuned (`blocks_function` refuses): prompts are
trained against a base model.

This module knows nothing about jobs or HTTP.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from torch import Tensor

from stamen.api.engine import BlocksFunction, EngineClient, RunOnLoop, SwarmSnapshot
from stamen.models.base import ClientHead
from stamen.swarm_core.client.generation import BlockChain
from stamen.swarm_core.client.prompts import PromptedChain, PromptTuning


class TunedEngine:
    """`base` with `tuning`'s prompts in front of every chain (module docstring)."""

    def __init__(
        self, base: EngineClient, model_id: str, tuning: PromptTuning, *, digest: str
    ) -> None:
        num_blocks = base.num_blocks  # not the snapshot: this may run off the event loop
        if tuning.num_blocks != num_blocks:
            raise ValueError(
                f"prompts for {tuning.num_blocks} blocks cannot tune {base.model_id} "
                f"({num_blocks} blocks)"
            )
        self.base = base
        self._model_id = model_id
        self.tuning = tuning.requires_grad_(False)
        fingerprint = hashlib.sha256(f"{base.fingerprint}:{digest}".encode()).hexdigest()
        self._fingerprint = f"fp_{fingerprint[:10]}"

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def tokenizer(self) -> Any:
        return self.base.tokenizer

    @property
    def head(self) -> ClientHead:
        return self.base.head

    @property
    def context_length(self) -> int:
        return self.base.context_length - self.tuning.pre_seq_len

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.base.eos_token_ids

    @property
    def num_blocks(self) -> int:
        return self.base.num_blocks

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @asynccontextmanager
    async def open_chain(
        self, max_length: int, batch_size: int, *, prompts: Tensor | None = None
    ) -> AsyncIterator[BlockChain]:
        if prompts is not None:
            raise ValueError("a tuned model's chains carry its own prompts; no others")
        P = self.tuning.pre_seq_len
        deep = self.tuning.deep_prompts()  # (num_blocks, 1, P, C) or None
        async with self.base.open_chain(max_length + P, batch_size, prompts=deep) as chain:
            yield PromptedChain(chain, self.tuning.prefix(1))

    def blocks_function(self, run: RunOnLoop) -> BlocksFunction:
        raise NotImplementedError(
            f"{self._model_id} is a fine-tuned model: fine-tune its base model instead"
        )

    def ready(self) -> bool:
        return self.base.ready()

    def swarm_snapshot(self) -> SwarmSnapshot:
        return self.base.swarm_snapshot()


def tuned_engine(base: EngineClient, model_id: str, prompts_path: Path) -> EngineClient:
    """An engine serving `model_id`: `base` with the prompts of `prompts_path`.

    Raises `ValueError` when the file is not a prompts file or does not fit the base."""
    tuned_model = PromptTuning.read_metadata(prompts_path).get("base_model")
    if tuned_model is not None and tuned_model != base.model_id:
        raise ValueError(f"{prompts_path.name} tunes {tuned_model}, not {base.model_id}")
    digest = hashlib.sha256(prompts_path.read_bytes()).hexdigest()
    return TunedEngine(base, model_id, PromptTuning.load(prompts_path), digest=digest)
