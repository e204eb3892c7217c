"""GGUF files as a checkpoint source: Hugging Face tensor names in, dequantized tensors out.

`GGUFCheckpoint(path)` parses the file's metadata once with the `gguf` package's
`GGUFReader` (the tensor data stays memory-mapped and untouched) and then:

- `config()` rebuilds the transformers config from the metadata, with transformers' own
  table of GGUF key names (`GGUF_CONFIG_MAPPING`);
- `read(names, ...)` maps each Hugging Face name to its GGUF name with gguf's
  `TensorNameMap` (`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`),
  dequantizes only those tensors and undoes llama.cpp's conversion-time rewrites.

llama.cpp's converter reorders the rows of Llama's Q and K projections from the Hugging
Face rotary layout (first half / second half of each head) to interleaved pairs; `read`
applies the inverse so tensors equal the Hugging Face checkpoint's. A file without
`output.weight` ties the LM head to `token_embd.weight`.

This module knows nothing about blocks, adapters or where the file came from.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from stamen.models.base import CheckpointError, UnsupportedModelError
from stamen.models.checkpoints import CheckpointSource, cast

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# GGUF architectures whose tensors we can map back to Hugging Face's layout, and the
# transformers model_type each becomes. Falcon and BLOOM files fuse QKV in a llama.cpp-
# specific order that we do not undo yet.
_MODEL_TYPES = {"llama": "llama", "qwen2": "qwen2"}
# architectures whose Q/K rows llama.cpp's converter permuted (see `unpermute_rotary_rows`)
_PERMUTED_QK = {"llama"}


def is_gguf_file(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == GGUF_MAGIC


def unpermute_rotary_rows(weight: Tensor, num_heads: int) -> Tensor:
    """Inverse of llama.cpp's Q/K row permutation for `num_heads` heads.

    The converter writes each head's rows reshaped `(2, D/2) -> (D/2, 2)` (interleaved rotary
    pairs); reading them as `(D/2, 2)` and swapping back restores the halves layout.
    """
    out_features = weight.shape[0]
    head_dim = out_features // num_heads
    rows = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])  # (H, D/2, 2, C)
    return rows.transpose(1, 2).reshape(weight.shape)  # (H, 2, D/2, C) -> (H*D, C)


class GGUFCheckpoint(CheckpointSource):
    """A GGUF file read through `gguf.GGUFReader`; see the module docstring."""

    def __init__(self, path: Path) -> None:
        from gguf import GGUFReader

        self.path = path
        self.origin = str(path)
        if not is_gguf_file(path):
            raise CheckpointError(f"{path} is not a GGUF file (no GGUF magic bytes)")
        try:
            self._reader = GGUFReader(path)
        except (ValueError, OSError, IndexError) as error:
            raise CheckpointError(f"{path} is not a readable GGUF file: {error}") from error
        self._tensors = {tensor.name: tensor for tensor in self._reader.tensors}
        self.architecture = str(self._field("general.architecture"))
        if self.architecture not in _MODEL_TYPES:
            raise UnsupportedModelError(
                f"{path}: GGUF architecture {self.architecture!r} is not supported; "
                f"supported: {', '.join(sorted(_MODEL_TYPES))}"
            )

    def _field(self, key: str, default: Any = None) -> Any:
        field = self._reader.get_field(key)
        if field is None:
            if default is None:
                raise CheckpointError(f"{self.path}: GGUF metadata lacks {key!r}")
            return default
        return field.contents()

    # -- config ---------------------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        """Hugging Face config fields derived from the GGUF metadata."""
        from transformers.integrations import GGUF_CONFIG_MAPPING

        renames: dict[str, Any] = {
            self.architecture: GGUF_CONFIG_MAPPING[self.architecture],
            "tokenizer": GGUF_CONFIG_MAPPING["tokenizer"],
        }
        values: dict[str, Any] = {}
        for key in self._reader.fields:
            prefix, _, rest = key.partition(".")
            target = renames.get(prefix, {}).get(rest)
            if target is not None and target != -1:
                values[target] = self._field(key)
        if "vocab_size" not in values:  # older files state it only through the embedding
            values["vocab_size"] = int(self._tensors["token_embd.weight"].shape[1])
        values["tie_word_embeddings"] = "output.weight" not in self._tensors
        values["model_type"] = _MODEL_TYPES[self.architecture]
        return values

    def config(self) -> Any:
        from transformers import AutoConfig

        values = self.config_dict()
        config = AutoConfig.for_model(values.pop("model_type"), **values)
        config.name_or_path = str(self.path)
        return config

    # -- tensors --------------------------------------------------------------------------

    @cached_property
    def _head_counts(self) -> tuple[int, int]:
        heads = int(self._field(f"{self.architecture}.attention.head_count"))
        kv_heads = int(self._field(f"{self.architecture}.attention.head_count_kv", heads))
        return heads, kv_heads

    @cached_property
    def _name_map(self) -> Any:
        from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

        arch = next(key for key, name in MODEL_ARCH_NAMES.items() if name == self.architecture)
        num_blocks = int(self._field(f"{self.architecture}.block_count"))
        return get_tensor_name_map(arch, num_blocks)

    def gguf_name(self, name: str) -> str | None:
        """The GGUF name holding Hugging Face tensor `name`, or None if the file lacks it."""
        base, dot, suffix = name.rpartition(".")
        if not dot or suffix not in ("weight", "bias"):
            return None
        mapped = self._name_map.get_name(base)
        if mapped is None:
            return None
        gguf_name = f"{mapped}.{suffix}"
        if gguf_name == "output.weight" and gguf_name not in self._tensors:
            gguf_name = "token_embd.weight"  # tied embeddings: the LM head is the embedding
        return gguf_name if gguf_name in self._tensors else None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.gguf_name(name) is not None

    def read(
        self, names: Any, *, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> dict[str, Tensor]:
        out = {}
        for name in names:
            gguf_name = self.gguf_name(name)
            if gguf_name is None:
                raise CheckpointError(f"GGUF file {self.path} has no tensor for {name!r}")
            out[name] = cast(self._dequantize(gguf_name), dtype, device)
        return out

    def _dequantize(self, gguf_name: str) -> Tensor:
        from gguf import dequantize

        tensor = self._tensors[gguf_name]
        shape = tuple(reversed(tensor.shape.tolist()))  # GGUF lists dims fastest-first
        values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        if not values.flags.writeable:  # a float tensor comes back as a view of the mmap
            values = values.copy()
        weight = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
        if self.architecture in _PERMUTED_QK:
            weight = self._unpermute(gguf_name, weight)
        return weight

    def _unpermute(self, gguf_name: str, weight: Tensor) -> Tensor:
        heads, kv_heads = self._head_counts
        if gguf_name.endswith(".attn_q.weight"):
            return unpermute_rotary_rows(weight, heads)
        if gguf_name.endswith(".attn_k.weight"):
            return unpermute_rotary_rows(weight, kv_heads)
        return weight
