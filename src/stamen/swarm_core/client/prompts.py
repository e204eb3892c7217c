"""Trainable soft prompts, the parameters that fine-tuning through the swarm trains.

    tuning = PromptTuning("deep_ptune", pre_seq_len=16, hidden_size=576, num_blocks=30)
    hidden = torch.cat([tuning.prefix(B), head.embed(input_ids)], dim=1)   # (B, P + T, C)
    deep = tuning.deep_prompts()            # (num_blocks, 1, P, C), or None for "ptune"
    tuning.save("prompts.safetensors"); PromptTuning.load("prompts.safetensors")

Two modes, as in Petals:

- `ptune`: `P` trainable embeddings (float32) put before every sequence's tokens;
- `deep_ptune`: those, plus per block `P` trainable vectors that the hosts add to the
  hidden states at positions `[0, P)` before each block (`remote` module docstring).
  They start at zero, so a fresh deep-tuned model behaves like a `ptune` one.

`PromptedChain` applies a tuning to any `BlockChain` opened with room for `P` more tokens
and with the deep prompts already given to it: it puts the prefix before the first step
and hides the prefix's positions from its caller, so the decoding loop runs unchanged.

This module knows nothing about hosts, routing or the wire; the chain it wraps carries
the deep prompts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, cast, get_args

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from stamen.swarm_core.client.generation import BlockChain

TuningMode = Literal["ptune", "deep_ptune"]
TUNING_MODES: tuple[str, ...] = get_args(TuningMode)
MAX_PRE_SEQ_LEN = 1024


class PromptTuning(nn.Module):
    """The soft prompts of one model: `prefix_embeddings` (P, C), and for `deep_ptune`
    `deep_embeddings` (num_blocks, P, C), both float32 and trainable."""

    def __init__(
        self,
        mode: TuningMode,
        *,
        pre_seq_len: int,
        hidden_size: int,
        num_blocks: int,
        init: Tensor | None = None,
    ) -> None:
        """`init` (P, C), when given, is the prefix's starting value (for instance the
        embeddings of some vocabulary tokens, which trains faster than noise)."""
        super().__init__()
        if mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {TUNING_MODES}, got {mode!r}")
        if not 1 <= pre_seq_len <= MAX_PRE_SEQ_LEN:
            raise ValueError(f"pre_seq_len must be in [1, {MAX_PRE_SEQ_LEN}], got {pre_seq_len}")
        if hidden_size < 1 or num_blocks < 1:
            raise ValueError("hidden_size and num_blocks must be >= 1")
        self.mode: TuningMode = mode
        self.pre_seq_len = pre_seq_len
        self.hidden_size = hidden_size
        self.num_blocks = num_blocks
        if init is None:
            prefix = torch.randn(pre_seq_len, hidden_size) * 0.02
        elif tuple(init.shape) != (pre_seq_len, hidden_size):
            raise ValueError(
                f"init has shape {tuple(init.shape)}, expected ({pre_seq_len}, {hidden_size})"
            )
        else:
            prefix = init.detach().to(torch.float32).clone()
        self.prefix_embeddings = nn.Parameter(prefix)
        self.deep_embeddings: nn.Parameter | None = None
        if mode == "deep_ptune":
            self.deep_embeddings = nn.Parameter(torch.zeros(num_blocks, pre_seq_len, hidden_size))

    def prefix(self, batch_size: int) -> Tensor:
        """(B, P, C) float32: the embeddings put before every sequence's tokens."""
        return self.prefix_embeddings[None].expand(batch_size, -1, -1)

    def deep_prompts(self, start: int = 0, end: int | None = None) -> Tensor | None:
        """(end - start, 1, P, C) float32 for blocks `[start, end)`, or None for `ptune`.
        The batch of 1 stands for every row (hosts broadcast it)."""
        if self.deep_embeddings is None:
            return None
        end = self.num_blocks if end is None else end
        return self.deep_embeddings[start:end, None]

    # -- files ----------------------------------------------------------------------------

    def save(self, path: str | Path, *, metadata: dict[str, str] | None = None) -> None:
        """Write the prompts to a safetensors file, with what `load` needs to rebuild them."""
        tensors = {"prefix_embeddings": self.prefix_embeddings.detach().contiguous()}
        if self.deep_embeddings is not None:
            tensors["deep_embeddings"] = self.deep_embeddings.detach().contiguous()
        header = {
            **(metadata or {}),
            "format": "stamen-prompts",
            "tuning_mode": self.mode,
            "pre_seq_len": str(self.pre_seq_len),
            "hidden_size": str(self.hidden_size),
            "num_blocks": str(self.num_blocks),
        }
        save_file(tensors, str(path), metadata=header)

    @classmethod
    def load(cls, path: str | Path) -> PromptTuning:
        """Prompts written by `save`; `ValueError` if the file is not such a file."""
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
        if header.get("format") != "stamen-prompts":
            raise ValueError(f"{path} is not a prompts file written by PromptTuning.save")
        mode = header.get("tuning_mode")
        if mode not in TUNING_MODES:
            raise ValueError(f"{path}: unknown tuning_mode {mode!r}")
        tensors = load_file(str(path))
        tuning = cls(
            cast(TuningMode, mode),
            pre_seq_len=int(header["pre_seq_len"]),
            hidden_size=int(header["hidden_size"]),
            num_blocks=int(header["num_blocks"]),
        )
        tuning.load_state_dict(tensors, strict=True)
        return tuning

    @staticmethod
    def read_metadata(path: str | Path) -> dict[str, str]:
        """The metadata `save` wrote beside the tensors."""
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})


class PromptedChain:
    """A `BlockChain` seen through a tuning's prefix.

    The wrapped `chain` must have room for `P` more tokens than the caller will send and
    must already carry the deep prompts (if any). The first step gets the `P` prefix
    embeddings put in front (its padding mask, if any, marks them real); the prefix's
    outputs are cut from the reply, and `position` counts only the caller's tokens.
    """

    def __init__(self, chain: BlockChain, prefix: Tensor) -> None:
        self._chain = chain
        self._prefix = prefix  # (B or 1, P, C)
        self._pre_seq_len = prefix.shape[1]

    @property
    def position(self) -> int:
        return max(0, self._chain.position - self._pre_seq_len)

    async def step(self, hidden: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        if self._chain.position > 0:
            return await self._chain.step(hidden, padding_mask)
        B, P = hidden.shape[0], self._pre_seq_len
        prefix = self._prefix.to(hidden.dtype).expand(B, -1, -1)
        hidden = torch.cat([prefix, hidden], dim=1)  # (B, P + T, C)
        if padding_mask is not None:
            real = torch.ones(B, P, dtype=torch.bool, device=padding_mask.device)
            padding_mask = torch.cat([real, padding_mask], dim=1)
        out = await self._chain.step(hidden, padding_mask)
        return out[:, P:]
