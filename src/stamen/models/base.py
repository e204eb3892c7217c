"""The seam between checkpoints and compute: one `BlockAdapter` per architecture.

An adapter knows, for one Hugging Face `model_type`:

- which checkpoint tensors belong to block `i` and which to the client-side head
  (names as in the Hugging Face checkpoint, e.g. `model.layers.3.self_attn.q_proj.weight`);
- how to build one transformer block (`Block`) from that block's tensors, and the client
  head (`ClientHead`) from the head's tensors;
- the shape of a block's KV cache.

Every block shares one calling convention, so that hosts can run spans of any architecture
the same way:

    hidden = block(hidden, cache, context)      # hidden: (B, T, C)

`cache` is a `KVCache` whose buffers have the one canonical layout `(B, H_kv, S_max, D)`
for every architecture; a block writes the keys and values of its `T` new tokens at slots
`[context.offset, context.offset + T)` and attends over slots `[0, context.offset + T)`.
`context` (a `StepContext`) is computed once per step for the whole span: positions for
rotary embeddings, key positions for ALiBi, and the attention mask for left-padded batches.

Hosts batch many sessions over one shared pool instead (`stamen.models.paged`): there the
cache is a `PagedKV` (one block's view of pages shared by all sessions) and the context a
`PagedStep`, built on the device without host syncs, in which every row has its own
position. Blocks do not tell the two apart: only `common.attend` does.

This module knows nothing about networking, sessions or where checkpoints live.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class ModelError(Exception):
    """Base of the errors raised by `stamen.models` (bad config, checkpoint, span, dtype)."""


class UnsupportedModelError(ModelError):
    """The checkpoint's `model_type` (or a variant of it) has no adapter."""


class CheckpointError(ModelError):
    """The checkpoint is unreadable, or lacks a tensor that a block or the head needs."""


class SpanError(ModelError):
    """The requested block range lies outside the model."""


class DeviceError(ModelError):
    """The requested device or dtype cannot run here."""


@dataclass
class KVCache:
    """Keys and values of one block for a batch of sequences.

    Both buffers have the canonical layout `(B, H_kv, S_max, D)`; slot `s` of sequence `b`
    holds the token written there by the step whose `offset <= s < offset + T`.
    """

    key: Tensor  # (B, H_kv, S_max, D)
    value: Tensor  # (B, H_kv, S_max, D)

    @classmethod
    def empty(
        cls,
        batch_size: int,
        num_kv_heads: int,
        max_length: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        shape = (batch_size, num_kv_heads, max_length, head_dim)
        return cls(
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )

    @property
    def max_length(self) -> int:
        return self.key.shape[2]

    def nbytes(self) -> int:
        return self.key.nelement() * self.key.element_size() * 2


@dataclass(frozen=True)
class StepContext:
    """Everything a block needs besides hidden states and cache, shared by a whole span.

    Built with `StepContext.make`; see its docstring for the meaning of each field.
    """

    offset: int  # cache slot of the first new token
    positions: Tensor  # (B, T) long: position id of each new token (rotary)
    key_positions: Tensor  # (B, S) long: position id of each attended slot (ALiBi)
    # (B, 1, T, S) bool, True = may attend. None means "causal over the new tokens" and is
    # only used where that is exact: offset == 0 or T == 1 (use `is_causal=T > 1`).
    attn_mask: Tensor | None

    @property
    def num_new_tokens(self) -> int:
        return self.positions.shape[1]

    @property
    def num_keys(self) -> int:
        return self.key_positions.shape[1]

    @classmethod
    def make(
        cls,
        offset: int,
        num_new_tokens: int,
        *,
        batch_size: int = 1,
        key_padding_mask: Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> StepContext:
        """Context for writing `num_new_tokens` tokens at cache slot `offset`.

        `key_padding_mask` is `(B, offset + T)` bool or 0/1, True where the slot holds a real
        token (False for left padding). Positions then count real tokens only, so a
        left-padded sequence gets the same positions as when it runs alone. Without a mask
        every slot is real and positions equal slot indices.
        """
        T, S = num_new_tokens, offset + num_new_tokens
        if key_padding_mask is None:
            key_positions = torch.arange(S, device=device).expand(batch_size, S)
            if offset == 0 or T == 1:
                return cls(offset, key_positions[:, offset:], key_positions, None)
            key_padding_mask = torch.ones(batch_size, S, dtype=torch.bool, device=device)
        valid = key_padding_mask.to(device=device, dtype=torch.bool)
        if valid.shape[1] != S:
            raise ValueError(f"key_padding_mask covers {valid.shape[1]} slots, expected {S}")
        key_positions = (valid.long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
        causal = torch.ones(T, S, dtype=torch.bool, device=device).tril(diagonal=offset)
        # (B, 1, T, S); a query at a padded slot still sees itself so softmax stays finite
        mask = causal[None, None] & valid[:, None, None, :]
        mask[..., torch.arange(T), offset + torch.arange(T)] = True
        return cls(offset, key_positions[:, offset:], key_positions, mask)


@dataclass(frozen=True)
class PagedKV:
    """One block's keys and values in a host's page pool (`stamen.models.paged.KVPool`).

    Slot `s` of a sequence lives in page `table[s // page_tokens]`, at `s % page_tokens`.
    """

    key: Tensor  # (num_pages, page_tokens, H_kv, D)
    value: Tensor  # (num_pages, page_tokens, H_kv, D)


@dataclass(frozen=True)
class PagedStep:
    """The context of one step over a page pool: every row at its own position.

    Built by `stamen.models.paged.paged_step` from device tensors only, so that a decode
    step has static shapes and can be captured in a CUDA graph. `S = n_p * page_tokens`
    slots are attended per row (the pages in `read_pages`); the mask hides the slots a row
    has not written, left padding, and the null page.
    """

    positions: Tensor  # (B, T) long: position id of each new token, counting real tokens
    key_positions: Tensor  # (B, S) long: position id of each attended slot (ALiBi)
    attn_mask: Tensor  # (B, 1, T, S) bool, True = may attend
    attn_bias: Tensor  # (B, 1, T, S) the same as an additive mask (0 / -inf), model dtype
    write_pages: Tensor  # (B, T) long: the pool page each new token is written to
    write_slots: Tensor  # (B, T) long: its slot inside that page
    read_pages: Tensor  # (B, n_p) long: the pages attended, in slot order

    @property
    def num_new_tokens(self) -> int:
        return self.positions.shape[1]

    @property
    def num_keys(self) -> int:
        return self.key_positions.shape[1]


AnyCache = KVCache | PagedKV
AnyContext = StepContext | PagedStep


class Block(nn.Module, ABC):
    """One transformer block: `(hidden, cache, context) -> hidden`."""

    @abstractmethod
    def forward(self, hidden: Tensor, cache: AnyCache | None, context: AnyContext) -> Tensor:
        """`hidden` is `(B, T, C)`. With `cache=None` the block attends over the T new tokens
        only (a stateless forward, `context.offset` must be 0)."""


class ClientHead(nn.Module, ABC):
    """What the client keeps: token embeddings in, logits out."""

    @abstractmethod
    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, T) long -> (B, T, C), including any embedding norm (BLOOM)."""

    @abstractmethod
    def logits(self, hidden: Tensor) -> Tensor:
        """(B, T, C) -> (B, T, V): final norm then LM head."""


@dataclass(frozen=True)
class KVShape:
    num_kv_heads: int
    head_dim: int


class BlockAdapter(ABC):
    """Per-architecture knowledge; stateless, one instance per `model_type`."""

    model_type: ClassVar[str]

    @abstractmethod
    def check_config(self, config: Any) -> None:
        """Raise `UnsupportedModelError` naming the field if this variant is not supported."""

    @abstractmethod
    def num_blocks(self, config: Any) -> int: ...

    @abstractmethod
    def block_prefix(self, index: int) -> str:
        """Checkpoint name prefix of block `index`, e.g. `model.layers.3.`."""

    @abstractmethod
    def block_tensor_names(self, config: Any) -> list[str]:
        """Names of the tensors one block needs, relative to its prefix."""

    @abstractmethod
    def head_tensor_names(self, config: Any) -> list[str]:
        """Full names of the head's tensors. With tied embeddings the LM head reuses the
        input embedding, so its weight is not listed."""

    @abstractmethod
    def build_block(self, config: Any, weights: Mapping[str, Tensor]) -> Block:
        """Build one block from tensors named as in `block_tensor_names`."""

    @abstractmethod
    def build_head(self, config: Any, weights: Mapping[str, Tensor]) -> ClientHead: ...

    @abstractmethod
    def kv_shape(self, config: Any) -> KVShape: ...

    def empty_cache(
        self,
        config: Any,
        batch_size: int,
        max_length: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        shape = self.kv_shape(config)
        return KVCache.empty(
            batch_size,
            shape.num_kv_heads,
            max_length,
            shape.head_dim,
            dtype=dtype,
            device=device,
        )
