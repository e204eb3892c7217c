"""Safetensors checkpoint sources that read only the tensors asked for.

A `CheckpointSource` answers `read(names, dtype=..., device=...) -> {name: tensor}` for
checkpoint tensor names as Hugging Face writes them (`model.layers.3.mlp.up_proj.weight`).
The safetensors source covers three layouts with one code path: a weight map (tensor name
-> file name) and a `fetch(file_name) -> local path` function.

- a local directory with one `model.safetensors`: the map comes from that file's header;
- a local directory with `model.safetensors.index.json`: the map is the index, and only the
  shards holding requested tensors are opened;
- a hub repository: the index (or the single file) is downloaded first, then each shard on
  the first read that needs it, through huggingface_hub's cache.

Tensors are read one by one with `safe_open`, so a shard is never materialized whole.

This module knows nothing about architectures or which tensors a block needs, and does not
decide whether a reference is a directory, a hub id or a GGUF file (see `loading`).
"""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from stamen.models.base import CheckpointError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointSource(ABC):
    """Where a model's tensors live; reads the named ones only."""

    origin: str  # human-readable location, used in error messages

    @abstractmethod
    def __contains__(self, name: object) -> bool: ...

    @abstractmethod
    def read(
        self, names: Iterable[str], *, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> dict[str, Tensor]:
        """The named tensors, floating-point ones cast to `dtype`, all on `device`.

        Raises `CheckpointError` naming the first missing tensor and the file it was
        expected in.
        """


def cast(tensor: Tensor, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """Move to `device`; cast floats to `dtype` and leave integer tensors as stored."""
    target = dtype if tensor.is_floating_point() else tensor.dtype
    return tensor.to(device=device, dtype=target)


class SafetensorsCheckpoint(CheckpointSource):
    """Safetensors files described by a weight map; files are fetched on first use."""

    def __init__(
        self,
        weight_map: Mapping[str, str],
        fetch: Callable[[str], Path],
        *,
        origin: str,
        map_file: str,
    ) -> None:
        self.weight_map = dict(weight_map)
        self.origin = origin
        self._fetch = fetch
        self._map_file = map_file  # the file that lists the tensors: index or single file

    def __contains__(self, name: object) -> bool:
        return name in self.weight_map

    def files_for(self, names: Iterable[str]) -> dict[str, list[str]]:
        """`{file name: [tensor names]}` for the requested tensors, in first-use order."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in names:
            file_name = self.weight_map.get(name)
            if file_name is None:
                raise CheckpointError(
                    f"checkpoint {self.origin} has no tensor {name!r} (not listed in {self._map_file})"
                )
            by_file[file_name].append(name)
        return dict(by_file)

    def read(
        self, names: Iterable[str], *, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {}
        for file_name, file_names in self.files_for(names).items():
            path = self._fetch(file_name)
            logger.debug("reading %d tensors from %s", len(file_names), path)
            tensors.update(_read_file(path, file_names, dtype=dtype, device=device))
        return tensors


def _read_file(
    path: Path, names: list[str], *, dtype: torch.dtype, device: torch.device | str
) -> dict[str, Tensor]:
    # safe_open reads the header, then each get_tensor copies just that tensor's bytes
    # (straight onto a CUDA device when asked), so peak memory is one tensor, not one file.
    open_device = str(device) if torch.device(device).type in ("cpu", "cuda") else "cpu"
    try:
        with safe_open(str(path), framework="pt", device=open_device) as handle:
            present = set(handle.keys())
            out = {}
            for name in names:
                if name not in present:
                    raise CheckpointError(f"{path} has no tensor {name!r}")
                out[name] = cast(handle.get_tensor(name), dtype, device)
            return out
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read safetensors file {path}: {error}") from error


def _weight_map_of_file(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict.fromkeys(handle.keys(), path.name)
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"cannot read safetensors file {path}: {error}") from error


def _weight_map_of_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"unreadable safetensors index {path}: {error!r}") from error
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"unreadable safetensors index {path}: weight_map is not a mapping")
    return {str(name): str(file_name) for name, file_name in weight_map.items()}


def local_checkpoint(directory: Path) -> SafetensorsCheckpoint:
    """The safetensors checkpoint of a local model directory (sharded or single file)."""

    def fetch(file_name: str) -> Path:
        return directory / file_name

    index_path, single_path = directory / INDEX_FILE, directory / SINGLE_FILE
    if index_path.is_file():
        weight_map, map_file = _weight_map_of_index(index_path), index_path
    elif single_path.is_file():
        weight_map, map_file = _weight_map_of_file(single_path), single_path
    else:
        raise CheckpointError(
            f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE} "
            "(only safetensors checkpoints are supported)"
        )
    return SafetensorsCheckpoint(weight_map, fetch, origin=str(directory), map_file=str(map_file))


def hub_offline() -> bool:
    """Whether `HF_HUB_OFFLINE` is set now (huggingface_hub itself reads it at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class HubFiles:
    """Downloads single files of one hub repository at one pinned commit.

    The first download resolves `revision` (a branch, tag or commit) to a commit, and every
    later file comes from that same commit, so shards never mix two versions of a repo.
    """

    def __init__(self, repo_id: str, *, revision: str | None, cache_dir: str | Path | None):
        self.repo_id = repo_id
        self.revision = revision
        self.cache_dir = None if cache_dir is None else str(cache_dir)

    def fetch(self, file_name: str) -> Path:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        try:
            path = Path(
                hf_hub_download(
                    self.repo_id,
                    file_name,
                    revision=self.revision,
                    cache_dir=self.cache_dir,
                    local_files_only=hub_offline(),
                )
            )
        except EntryNotFoundError as error:  # includes "not in the local cache" when offline
            raise CheckpointError(
                f"hub repository {self.repo_id!r} (revision {self.revision or 'main'}) "
                f"has no file {file_name!r} available{self._offline_note()}: {error}"
            ) from error
        except (OSError, ValueError) as error:  # HTTP, repo/revision not found, bad repo id
            raise CheckpointError(
                f"cannot download {file_name!r} from hub repository {self.repo_id!r}"
                f"{self._offline_note()}: {error}"
            ) from error
        # snapshots/<commit>/<file_name>: pin the commit for the next files
        self.revision = path.parents[len(Path(file_name).parts) - 1].name
        return path

    def _offline_note(self) -> str:
        return (
            " (HF_HUB_OFFLINE is set, so only the local cache was searched)"
            if hub_offline()
            else ""
        )


def hub_checkpoint(files: HubFiles) -> SafetensorsCheckpoint:
    """The safetensors checkpoint of a hub repository; shards download on first read."""
    try:
        index_path = files.fetch(INDEX_FILE)
    except CheckpointError as index_error:
        try:
            single_path = files.fetch(SINGLE_FILE)
        except CheckpointError as single_error:
            raise CheckpointError(
                f"hub repository {files.repo_id!r} has no usable safetensors checkpoint: "
                f"{index_error}; {single_error}"
            ) from single_error
        weight_map, map_file = _weight_map_of_file(single_path), SINGLE_FILE
    else:
        weight_map, map_file = _weight_map_of_index(index_path), INDEX_FILE
    return SafetensorsCheckpoint(
        weight_map, files.fetch, origin=f"hub:{files.repo_id}", map_file=map_file
    )
