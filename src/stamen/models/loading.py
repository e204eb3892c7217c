"""Load a span of transformer blocks, the client head, config and tokenizer of a model.

A model reference (`model_ref`, a `str` or `Path`) is one of:

- a local Hugging Face directory (`config.json` plus `model.safetensors` or a sharded
  `model.safetensors.index.json`);
- a local `.gguf` file (config from its metadata, tensors dequantized at load);
- a hub id (`org/name`), downloaded through huggingface_hub's cache, honouring `revision`,
  `cache_dir` and `HF_HUB_OFFLINE`; only the shards holding the requested tensors are
  fetched.

    span = load_span("org/name", 10, 20, dtype=torch.bfloat16)
    hidden = span.blocks[0](hidden, cache, context)

Only the tensors of the requested blocks are read, one block at a time, straight to the
target dtype and device, so peak memory follows the span, not the model. Errors are the
types of `stamen.models.base`: `UnsupportedModelError`, `SpanError`, `CheckpointError`,
`DeviceError`.

This module knows nothing about how blocks compute (the adapters do) or about networking.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from stamen.models.base import (
    BlockAdapter,
    CheckpointError,
    ClientHead,
    DeviceError,
    SpanError,
    UnsupportedModelError,
)
from stamen.models.checkpoints import (
    CheckpointSource,
    HubFiles,
    hub_checkpoint,
    hub_offline,
    local_checkpoint,
)
from stamen.models.gguf_checkpoint import GGUFCheckpoint, is_gguf_file
from stamen.models.registry import get_adapter, supported_model_types

logger = logging.getLogger(__name__)

ModelRef = str | Path
M = TypeVar("M", bound=nn.Module)

# huggingface_hub's repo id grammar: `name` or `namespace/name`
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


@dataclass
class Span:
    """Blocks `[start, end)` of a model, ready to run on one device."""

    config: Any
    adapter: BlockAdapter
    start: int
    end: int
    blocks: nn.ModuleList

    def __len__(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class _Resolved:
    kind: str  # "dir", "gguf" or "hub"
    location: str  # path for local kinds, repo id for the hub


def _resolve(model_ref: ModelRef) -> _Resolved:
    path = Path(model_ref).expanduser()
    if path.is_dir():
        return _Resolved("dir", str(path))
    if path.is_file():
        if not is_gguf_file(path):
            raise CheckpointError(
                f"{path} is a file but not a GGUF file; pass a .gguf file, "
                "a model directory or a hub id"
            )
        return _Resolved("gguf", str(path))
    text = str(model_ref)
    if isinstance(model_ref, Path) or text.endswith(".gguf") or not _HUB_ID.match(text):
        raise CheckpointError(f"{text}: no such file or directory (and not a hub id)")
    return _Resolved("hub", text)


# -- config -------------------------------------------------------------------------------


def _config_from_json(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"unreadable model config {path}: {error}") from error
    model_type = values.get("model_type") if isinstance(values, dict) else None
    if model_type not in supported_model_types():
        raise UnsupportedModelError(
            f"{path}: model_type {model_type!r} is not supported; supported: "
            + ", ".join(supported_model_types())
        )
    return AutoConfig.from_pretrained(path.parent)


def _local_config(directory: Path) -> Any:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory} has no config.json, so it is not a model directory")
    return _config_from_json(config_path)


def load_config(
    model_ref: ModelRef, *, revision: str | None = None, cache_dir: str | Path | None = None
) -> Any:
    """The transformers `PretrainedConfig` of a model directory, GGUF file or hub id."""
    resolved = _resolve(model_ref)
    if resolved.kind == "dir":
        return _local_config(Path(resolved.location))
    if resolved.kind == "gguf":
        return GGUFCheckpoint(Path(resolved.location)).config()
    files = HubFiles(resolved.location, revision=revision, cache_dir=cache_dir)
    return _config_from_json(files.fetch("config.json"))


def open_checkpoint(
    model_ref: ModelRef, *, revision: str | None, cache_dir: str | Path | None
) -> tuple[Any, CheckpointSource]:
    """`(config, checkpoint source)` of a model, sharing one parse of a GGUF file.

    For callers that read tensors themselves; `load_span` and `load_head` use it.
    """
    resolved = _resolve(model_ref)
    if resolved.kind == "dir":
        directory = Path(resolved.location)
        return _local_config(directory), local_checkpoint(directory)
    if resolved.kind == "gguf":
        gguf = GGUFCheckpoint(Path(resolved.location))
        return gguf.config(), gguf
    files = HubFiles(resolved.location, revision=revision, cache_dir=cache_dir)
    config = _config_from_json(files.fetch("config.json"))
    return config, hub_checkpoint(files)


# -- device -------------------------------------------------------------------------------


def check_device(dtype: torch.dtype, device: torch.device | str) -> torch.device:
    """The parsed device, after checking that it exists and can multiply `dtype` matrices."""
    if not dtype.is_floating_point:
        raise DeviceError(f"blocks need a floating-point dtype, not {dtype}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise DeviceError(f"unknown device {device!r}: {error}") from error
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {device!r} requested but CUDA is not available here")
    try:
        probe = torch.ones(2, 2, dtype=dtype, device=parsed)
        torch.matmul(probe, probe)
    except (RuntimeError, AssertionError, NotImplementedError) as error:
        # AssertionError: torch's answer for a backend it was not compiled with
        raise DeviceError(f"device {device!r} cannot run {dtype} matmul: {error}") from error
    return parsed


# -- spans and head -----------------------------------------------------------------------


def check_span(config: Any, adapter: BlockAdapter, start: int, end: int) -> None:
    num_blocks = adapter.num_blocks(config)
    if not 0 <= start < end <= num_blocks:
        raise SpanError(
            f"blocks [{start}, {end}) are not a non-empty range inside the model's "
            f"{num_blocks} blocks: valid spans are [a, b) with 0 <= a < b <= {num_blocks}"
        )


def load_span(
    model_ref: ModelRef,
    start: int,
    end: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> Span:
    """Blocks `[start, end)` of a model, built by its adapter, in eval mode and frozen.

    Reads only those blocks' tensors, one block at a time.
    """
    target = check_device(dtype, device)
    config, source = open_checkpoint(model_ref, revision=revision, cache_dir=cache_dir)
    adapter = get_adapter(config)
    check_span(config, adapter, start, end)
    relative_names = adapter.block_tensor_names(config)
    blocks = nn.ModuleList()
    for index in range(start, end):
        prefix = adapter.block_prefix(index)
        tensors = source.read(
            [prefix + name for name in relative_names], dtype=dtype, device=target
        )
        weights = {name: tensors[prefix + name] for name in relative_names}
        blocks.append(_frozen(adapter.build_block(config, weights), target))
    blocks.eval()
    logger.info("loaded blocks [%d, %d) of %s as %s on %s", start, end, model_ref, dtype, target)
    return Span(config=config, adapter=adapter, start=start, end=end, blocks=blocks)


def load_head(
    model_ref: ModelRef,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> ClientHead:
    """The client-side head (embeddings, final norm, LM head) of a model, frozen."""
    target = check_device(dtype, device)
    config, source = open_checkpoint(model_ref, revision=revision, cache_dir=cache_dir)
    adapter = get_adapter(config)
    weights = source.read(adapter.head_tensor_names(config), dtype=dtype, device=target)
    head = adapter.build_head(config, weights)
    return _frozen(head, target)


def _frozen(module: M, device: torch.device) -> M:
    # Hosts and clients never train these weights (fine-tuning trains prompts, not
    # blocks), so no parameter keeps a gradient.
    module.to(device)
    module.eval()
    module.requires_grad_(False)
    return module


# -- tokenizer ----------------------------------------------------------------------------


def load_tokenizer(
    model_ref: ModelRef, *, revision: str | None = None, cache_dir: str | Path | None = None
) -> Any:
    """The model's `AutoTokenizer`; a GGUF file's tokenizer comes from its metadata."""
    from transformers import AutoTokenizer

    resolved = _resolve(model_ref)
    try:
        if resolved.kind == "gguf":
            path = Path(resolved.location)
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        if resolved.kind == "dir":
            return AutoTokenizer.from_pretrained(resolved.location)
        return AutoTokenizer.from_pretrained(
            resolved.location,
            revision=revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            local_files_only=hub_offline(),
        )
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot load the tokenizer of {model_ref}: {error}") from error
