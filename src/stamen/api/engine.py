"""The seam between the HTTP API and whatever runs the model: `EngineClient`.

An engine serves one model. It owns the tokenizer and the client head (embeddings in,
logits out), knows the context length, and opens *chains*: the `BlockChain` that carries
hidden states through every transformer block for one batch of sequences, with room for
`max_length` tokens. Leaving `open_chain`'s context, normally or by cancellation (a client
that disconnected), closes the chain and frees its KV cache wherever it lives.

Fine-tuning needs two more things of an engine: chains that carry deep prompts
(`open_chain(..., prompts=)`, `(num_blocks, B or 1, P, C)` added to the hidden states at
positions `[0, P)` before each block, as `stamen.swarm_core.client.remote` defines them), and
`blocks_function`, every block as one differentiable function of the hidden states and
the prompts, callable from a worker thread.

`LocalEngine` runs every block in this process (tests, reference, no peers); the swarm
client provides the same seam over remote hosts. The API layer never looks further.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, Protocol

import msgspec
import torch
from torch import Tensor, nn

from stamen.models.base import ClientHead, StepContext
from stamen.models.chain import LocalChain, SpanCache, run_blocks, run_span
from stamen.models.loading import load_config, load_head, load_span, load_tokenizer
from stamen.models.registry import get_adapter
from stamen.swarm_core.client.generation import BlockChain
from stamen.swarm_core.protocol.records import model_name_of

logger = logging.getLogger(__name__)

# Runs a coroutine on the engine's event loop from a worker thread and returns its result.
RunOnLoop = Callable[[Coroutine[Any, Any, Any]], Any]
# (hidden (B, T, C), prompts (num_blocks, B or 1, P, C) or None) -> (B, T, C)
BlocksFunction = Callable[[Tensor, Tensor | None], Tensor]


class HostView(msgspec.Struct):
    """One host serving blocks `[start, end)` of the model, as `/v1/swarm` shows it.

    `throughput` is the host's announced decode tokens/s through its span and
    `cache_tokens_left` its free KV cache in tokens. `transport` is the scheme of the
    address a client dials first (`tcp`, `webrtc`, ...) and `address_kind` how that
    address is reached: `direct` (dialed at the host's own address) or `relayed` (found
    through a signalling relay named in the address); see `swarm_engine.reachability`.
    None where the engine has no such fact (an in-process engine)."""

    peer_id: str
    start: int
    end: int
    state: str
    public_name: str | None = None
    throughput: float | None = None
    cache_tokens_left: int | None = None
    version: str | None = None
    transport: str | None = None
    address_kind: str | None = None


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
    def num_blocks(self) -> int:
        """Transformer blocks of the model (what deep prompts are given for)."""
        ...

    @property
    def fingerprint(self) -> str:
        """`system_fingerprint` of responses: changes when the served weights change."""
        ...

    def open_chain(
        self, max_length: int, batch_size: int, *, prompts: Tensor | None = None
    ) -> AbstractAsyncContextManager[BlockChain]:
        """A chain through every block for `batch_size` sequences of up to `max_length`,
        with deep `prompts` (num_blocks, B or 1, P, C) added before each block when given.

        Raises `EngineUnavailable` (when opening or from a step) if the model cannot be
        served right now."""
        ...

    def blocks_function(self, run: RunOnLoop) -> BlocksFunction:
        """Every block as one stateless function `(hidden, prompts) -> hidden`, which
        autograd differentiates with respect to both; call it from a worker thread, never
        the event loop (`run` takes its remote calls back to the loop). The returned
        function raises `EngineUnavailable` when the model cannot be served."""
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
            model_id or model_name_of(model_ref),
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
    async def open_chain(
        self, max_length: int, batch_size: int, *, prompts: Tensor | None = None
    ) -> AsyncIterator[BlockChain]:
        if prompts is not None:
            check_prompts(prompts, self.num_blocks, batch_size, max_length)
        caches = [
            SpanCache.empty(
                self._adapter, self._config, len(blocks), batch_size, max_length, dtype=self._dtype
            )
            for blocks in self._spans
        ]
        spans = list(zip(self._spans, caches, strict=True))
        self.chains_opened += 1
        try:
            if prompts is None:
                yield LocalChain(spans)
            else:
                yield PromptedLocalChain(spans, prompts.to(self._dtype))
        finally:
            self.chains_closed += 1
            caches.clear()

    def blocks_function(self, run: RunOnLoop) -> BlocksFunction:
        return self._run_blocks  # in-process: nothing goes through the loop

    def _run_blocks(self, hidden: Tensor, prompts: Tensor | None) -> Tensor:
        B, T, _ = hidden.shape
        if prompts is not None:
            check_prompts(prompts, self.num_blocks, B, T)
        context = StepContext.make(0, T, batch_size=B, device=hidden.device)
        x = hidden.to(self._dtype)  # (B, T, C)
        first = 0
        for blocks in self._spans:
            span_prompts = None
            if prompts is not None:  # a differentiable cast: float32 prompts, blocks' dtype
                span_prompts = prompts[first : first + len(blocks)].to(self._dtype)
            x = run_blocks(blocks, x, context, span_prompts)
            first += len(blocks)
        return x.to(hidden.dtype)

    def swarm_snapshot(self) -> SwarmSnapshot:
        hosts, start = [], 0
        for index, blocks in enumerate(self._spans):
            hosts.append(HostView(f"local-{index}", start, start + len(blocks), "online"))
            start += len(blocks)
        return SwarmSnapshot.from_hosts(self._model_id, self.num_blocks, hosts)


def check_prompts(prompts: Tensor, num_blocks: int, batch_size: int, max_length: int) -> None:
    """Refuse deep prompts that are not (num_blocks, B or 1, P <= max_length, C)."""
    if prompts.ndim != 4 or prompts.shape[0] != num_blocks:
        raise ValueError(
            f"prompts must be (num_blocks={num_blocks}, B, P, C), got {tuple(prompts.shape)}"
        )
    if prompts.shape[1] not in (1, batch_size) or prompts.shape[2] > max_length:
        raise ValueError(
            f"prompts {tuple(prompts.shape)} do not fit a batch of {batch_size} sequences "
            f"of up to {max_length} tokens"
        )


class PromptedLocalChain:
    """`LocalChain` with deep prompts: each step that covers positions below P hands each
    span its blocks' prompts for those positions (the swarm hosts' semantics)."""

    def __init__(self, spans: Iterable[tuple[Sequence[nn.Module], SpanCache]], prompts: Tensor):
        self._spans = list(spans)
        self._prompts = prompts  # (num_blocks, B or 1, P, C)
        self._position = 0

    @property
    def position(self) -> int:
        return self._position

    async def step(self, hidden: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        hidden = await asyncio.to_thread(self._run, hidden, padding_mask, self._position)
        self._position += hidden.shape[1]
        return hidden

    def _run(self, hidden: Tensor, padding_mask: Tensor | None, offset: int) -> Tensor:
        T, P = hidden.shape[1], self._prompts.shape[2]
        first = 0
        for blocks, cache in self._spans:
            if offset < P:
                prompts = self._prompts[first : first + len(blocks), :, offset : min(P, offset + T)]
                hidden = run_span(blocks, cache, hidden, offset, padding_mask, prompts=prompts)
            else:
                hidden = run_span(blocks, cache, hidden, offset, padding_mask)
            first += len(blocks)
        return hidden
