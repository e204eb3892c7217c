"""The seam between the HTTP API and whatever runs the model: `EngineClient`.

An engine serves one model. It owns the tokenizer and the client head (embeddings in,
logits out), knows the context length, and opens *chains*: the `BlockChain` that carries
hidden states through every transformer block for one batch of sequences, with room for
`max_length` tokens. Leaving `open_chain`'s context, normally or by cancellation (a client
that disconnected), closes the chain and frees its KV cache wherever it lives.

`LocalEngine` runs every block in this process (tests, reference, no peers); the swarm
client provides the same seam over remote hosts. The API layer never looks further.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import msgspec
import torch
from torch import nn

from stamen.models.base import ClientHead
from stamen.models.chain import LocalChain, SpanCache
from stamen.models.loading import load_config, load_head, load_span, load_tokenizer
from stamen.models.registry import get_adapter
from stamen.swarm_core.generation import BlockChain

logger = logging.getLogger(__name__)


class HostView(msgspec.Struct):
    """One host serving blocks `[start, end)` of the model, as `/v1/swarm` shows it."""

    peer_id: str
    start: int
    end: int
    state: str
    public_name: str | None = None
    throughput: float | None = None
    cache_tokens_left: int | None = None


class SwarmSnapshot(msgspec.Struct):
    model: str
    num_blocks: int
    covered_blocks: int
    coverage: float  # covered_blocks / num_blocks
    hosts: list[HostView]

    @classmethod
    def from_hosts(cls, model: str, num_blocks: int, hosts: Sequence[HostView]) -> SwarmSnapshot:
        covered: set[int] = set()
        for host in hosts:
            if host.state == "online":
                covered.update(range(host.start, host.end))
        coverage = len(covered) / num_blocks if num_blocks else 0.0
        return cls(model, num_blocks, len(covered), coverage, list(hosts))


class EngineUnavailable(Exception):
    """The engine cannot serve the model right now (no chain of hosts, or it broke beyond
    repair); raised by `open_chain` or by the chain's steps. Retrying later may succeed."""


class EngineClient(Protocol):
    """What the API needs from a model runner (in-process or the swarm)."""

    @property
    def model_id(self) -> str: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def head(self) -> ClientHead: ...

    @property
    def context_length(self) -> int: ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    @property
    def fingerprint(self) -> str:
        """`system_fingerprint` of responses: changes when the served weights change."""
        ...

    def open_chain(
        self, max_length: int, batch_size: int
    ) -> AbstractAsyncContextManager[BlockChain]:
        """A chain through every block for `batch_size` sequences of up to `max_length`.

        Raises `EngineUnavailable` (when opening or from a step) if the model cannot be
        served right now."""
        ...

    def ready(self) -> bool:
        """True when a full chain through every block can be opened now."""
        ...

    def swarm_snapshot(self) -> SwarmSnapshot: ...


def eos_token_ids_of(tokenizer: Any, config: Any) -> tuple[int, ...]:
    ids: list[int] = []
    for candidate in (
        getattr(tokenizer, "eos_token_id", None),
        getattr(config, "eos_token_id", None),
    ):
        for token_id in candidate if isinstance(candidate, list) else [candidate]:
            if isinstance(token_id, int) and token_id not in ids:
                ids.append(token_id)
    return tuple(ids)


class ClientSide:
    """What every engine keeps in the API process: the model's id, config, tokenizer and
    head, and what follows from them (the `EngineClient` properties)."""

    def __init__(
        self, model_id: str, *, config: Any, tokenizer: Any, head: ClientHead, flavour: str
    ) -> None:
        self._model_id = model_id
        self._config = config
        self._tokenizer = tokenizer
        self._head = head
        self._eos = eos_token_ids_of(tokenizer, config)
        digest = hashlib.sha256(f"{flavour}:{model_id}".encode()).hexdigest()[:10]
        self._fingerprint = f"fp_{digest}"

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def head(self) -> ClientHead:
        return self._head

    @property
    def context_length(self) -> int:
        return int(getattr(self._config, "max_position_embeddings", 2048))

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def fingerprint(self) -> str:
        return self._fingerprint


class LocalEngine(ClientSide):
    """Every block of one model in this process: the reference engine, and the no-peer mode."""

    def __init__(
        self,
        model_id: str,
        *,
        config: Any,
        tokenizer: Any,
        head: ClientHead,
        spans: Sequence[Sequence[nn.Module] | nn.ModuleList],
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(
            model_id, config=config, tokenizer=tokenizer, head=head, flavour=f"local:{dtype}"
        )
        self._adapter = get_adapter(config)
        self._spans = [list(blocks) for blocks in spans]
        self._dtype = dtype
        self.chains_opened = 0
        self.chains_closed = 0

    @classmethod
    def load(
        cls,
        model_ref: str | Path,
        *,
        model_id: str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> LocalEngine:
        """Load tokenizer, head and every block of `model_ref` (slow: run it in a thread)."""
        config = load_config(model_ref)
        num_blocks = get_adapter(config).num_blocks(config)
        span = load_span(model_ref, 0, num_blocks, dtype=dtype)
        return cls(
            model_id or default_model_id(model_ref),
            config=config,
            tokenizer=load_tokenizer(model_ref),
            head=load_head(model_ref, dtype=dtype),
            spans=[span.blocks],
            dtype=dtype,
        )

    @property
    def num_blocks(self) -> int:
        return sum(len(blocks) for blocks in self._spans)

    @property
    def chains_in_use(self) -> int:
        return self.chains_opened - self.chains_closed

    def ready(self) -> bool:
        return True

    @asynccontextmanager
    async def open_chain(self, max_length: int, batch_size: int) -> AsyncIterator[BlockChain]:
        caches = [
            SpanCache.empty(
                self._adapter, self._config, len(blocks), batch_size, max_length, dtype=self._dtype
            )
            for blocks in self._spans
        ]
        self.chains_opened += 1
        try:
            yield LocalChain(list(zip(self._spans, caches, strict=True)))
        finally:
            self.chains_closed += 1
            caches.clear()

    def swarm_snapshot(self) -> SwarmSnapshot:
        hosts, start = [], 0
        for index, blocks in enumerate(self._spans):
            hosts.append(HostView(f"local-{index}", start, start + len(blocks), "online"))
            start += len(blocks)
        return SwarmSnapshot.from_hosts(self._model_id, self.num_blocks, hosts)


def default_model_id(model_ref: str | Path) -> str:
    """A hub id stays as it is; a local file or directory is named by its stem."""
    path = Path(model_ref).expanduser()
    if path.exists():
        name = path.name
        return name.split(".")[0] if path.is_file() else name
    return str(model_ref)
