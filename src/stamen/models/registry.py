"""Adapters by Hugging Face `model_type`.

Each architecture module (`llama`, `falcon`, `bloom`) defines `ADAPTER`, a `BlockAdapter`
instance. Modules are imported on first use so that asking for one architecture does not
import the others.
"""

from __future__ import annotations

import importlib
from typing import Any

from stamen.models.base import BlockAdapter, UnsupportedModelError

# model_type -> module defining ADAPTER. Mistral and Qwen2 checkpoints are Llama-shaped.
_MODULES: dict[str, str] = {
    "llama": "stamen.models.llama",
    "mistral": "stamen.models.llama",
    "qwen2": "stamen.models.llama",
    "falcon": "stamen.models.falcon",
    "bloom": "stamen.models.bloom",
}


def supported_model_types() -> list[str]:
    return sorted(_MODULES)


def get_adapter(model_type_or_config: str | Any) -> BlockAdapter:
    """The adapter for a `model_type` string or a config object with `.model_type`.

    With a config, the adapter also checks that this variant is supported.
    """
    config = None if isinstance(model_type_or_config, str) else model_type_or_config
    model_type = model_type_or_config if config is None else getattr(config, "model_type", None)
    if model_type not in _MODULES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: "
            + ", ".join(supported_model_types())
        )
    adapter: BlockAdapter = importlib.import_module(_MODULES[model_type]).ADAPTER
    if config is not None:
        adapter.check_config(config)
    return adapter
