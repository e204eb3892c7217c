"""Span loading from safetensors directories (single file and sharded) and a hub cache.

The checkpoints are random tiny Llama models saved by transformers' `save_pretrained`, so
names and layouts are exactly what real checkpoints use.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import stamen.models.checkpoints as checkpoints
from stamen.models.base import (
    CheckpointError,
    DeviceError,
    SpanError,
    StepContext,
    UnsupportedModelError,
)
from stamen.models.checkpoints import INDEX_FILE, local_checkpoint
from stamen.models.loading import (
    check_device,
    load_config,
    load_head,
    load_span,
    load_tokenizer,
)

NUM_BLOCKS = 6


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=NUM_BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def state_dict(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


@pytest.fixture(scope="module")
def single_dir(model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("single")
    model.save_pretrained(directory)
    assert (directory / "model.safetensors").is_file()
    return directory


@pytest.fixture(scope="module")
def sharded_dir(model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(directory, max_shard_size="200KB")
    return directory


def weight_map(directory: Path) -> dict[str, str]:
    return json.loads((directory / INDEX_FILE).read_text())["weight_map"]


def block_names(index: int, state_dict: dict[str, torch.Tensor]) -> list[str]:
    return [name for name in state_dict if name.startswith(f"model.layers.{index}.")]


@pytest.fixture
def opened_files(monkeypatch) -> list[str]:
    """Records the file of every `safe_open` the checkpoint module makes."""
    opened: list[str] = []
    real_safe_open = checkpoints.safe_open

    def spy(path, *args, **kwargs):
        opened.append(Path(path).name)
        return real_safe_open(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "safe_open", spy)
    return opened


def test_single_file_reads_requested_tensors_equal_to_the_model(single_dir, state_dict):
    names = block_names(3, state_dict) + ["lm_head.weight"]
    tensors = local_checkpoint(single_dir).read(names, dtype=torch.float32)
    assert sorted(tensors) == sorted(names)
    for name in names:
        assert torch.equal(tensors[name], state_dict[name]), name


def test_sharded_opens_only_the_shards_holding_the_span(sharded_dir, state_dict, opened_files):
    shards = weight_map(sharded_dir)
    assert len(set(shards.values())) >= 4, "fixture should produce several shards"
    names = block_names(4, state_dict)
    tensors = local_checkpoint(sharded_dir).read(names, dtype=torch.float32)
    assert set(opened_files) == {shards[name] for name in names}
    assert len(set(opened_files)) < len(set(shards.values()))
    for name in names:
        assert torch.equal(tensors[name], state_dict[name]), name


def test_read_casts_floats_to_the_requested_dtype(sharded_dir, state_dict):
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors = local_checkpoint(sharded_dir).read([name], dtype=torch.bfloat16)
    assert tensors[name].dtype == torch.bfloat16
    assert torch.equal(tensors[name], state_dict[name].to(torch.bfloat16))


def test_config_of_a_local_directory(single_dir):
    config = load_config(single_dir)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 6, 64)


# -- hub ----------------------------------------------------------------------------------

REPO = "stamen-test/tiny-llama"
OLD_COMMIT, NEW_COMMIT = "a" * 40, "b" * 40


def add_snapshot(cache: Path, source: Path, commit: str, files: list[str]) -> None:
    """Lay out `files` of `source` as huggingface_hub caches them for `REPO` at `commit`."""
    snapshot = cache / ("models--" + REPO.replace("/", "--")) / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name in files:
        shutil.copy(source / name, snapshot / name)


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory, sharded_dir, state_dict) -> Path:
    """A cache with an old commit (all files, other weights) and `main` (only some shards)."""
    cache = tmp_path_factory.mktemp("hub-cache")
    old_dir = tmp_path_factory.mktemp("old-model")
    tiny_llama(seed=1).save_pretrained(old_dir, max_shard_size="200KB")
    add_snapshot(cache, old_dir, OLD_COMMIT, [p.name for p in old_dir.iterdir()])
    # `main` holds only the shards of block 2, as if a host had fetched just those
    shards = weight_map(sharded_dir)
    block_shards = {shards[name] for name in block_names(2, state_dict)}
    add_snapshot(cache, sharded_dir, NEW_COMMIT, ["config.json", INDEX_FILE, *block_shards])
    refs = cache / ("models--" + REPO.replace("/", "--")) / "refs"
    refs.mkdir()
    (refs / "main").write_text(NEW_COMMIT)
    return cache


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_hub_id_loads_span_tensors_from_only_the_cached_shards(hub_cache, state_dict, offline):
    source = checkpoints.hub_checkpoint(
        checkpoints.HubFiles(REPO, revision=None, cache_dir=hub_cache)
    )
    names = block_names(2, state_dict)
    tensors = source.read(names, dtype=torch.float32)
    for name in names:
        assert torch.equal(tensors[name], state_dict[name]), name


def test_hub_revision_selects_that_commit(hub_cache, state_dict, offline):
    files = checkpoints.HubFiles(REPO, revision=OLD_COMMIT, cache_dir=hub_cache)
    name = "model.layers.5.mlp.up_proj.weight"
    old = checkpoints.hub_checkpoint(files).read([name], dtype=torch.float32)[name]
    assert torch.equal(old, tiny_llama(seed=1).state_dict()[name])
    assert not torch.equal(old, state_dict[name])


def test_hub_missing_shard_offline_names_the_file_and_offline_mode(hub_cache, offline):
    source = checkpoints.hub_checkpoint(
        checkpoints.HubFiles(REPO, revision=None, cache_dir=hub_cache)
    )
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE") as raised:
        source.read(["model.layers.5.mlp.up_proj.weight"], dtype=torch.float32)
    assert "model-0000" in str(raised.value)


def test_hub_config(hub_cache, offline):
    config = load_config(REPO, cache_dir=hub_cache)
    assert (config.model_type, config.num_hidden_layers) == ("llama", NUM_BLOCKS)


def test_unknown_hub_repo_offline_is_a_checkpoint_error(tmp_path, offline):
    with pytest.raises(CheckpointError, match="nobody/nothing"):
        load_config("nobody/nothing", cache_dir=tmp_path)


def test_hub_repo_with_a_single_file_checkpoint(tmp_path, single_dir, state_dict, offline):
    snapshot = tmp_path / "models--solo--tiny" / "snapshots" / NEW_COMMIT
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(single_dir / name, snapshot / name)
    (tmp_path / "models--solo--tiny" / "refs").mkdir()
    (tmp_path / "models--solo--tiny" / "refs" / "main").write_text(NEW_COMMIT)
    span = load_span("solo/tiny", 5, 6, cache_dir=tmp_path)
    assert (span.start, span.end, len(span.blocks)) == (5, 6, 1)
    name = "lm_head.weight"
    files = checkpoints.HubFiles("solo/tiny", revision=None, cache_dir=tmp_path)
    tensors = checkpoints.hub_checkpoint(files).read([name], dtype=torch.float32)
    assert torch.equal(tensors[name], state_dict[name])


# -- errors -------------------------------------------------------------------------------


def test_missing_tensor_names_tensor_and_file(tmp_path, state_dict):
    kept = {name: t for name, t in state_dict.items() if "layers.1.mlp.up_proj" not in name}
    save_file(kept, str(tmp_path / "model.safetensors"))
    missing = "model.layers.1.mlp.up_proj.weight"
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight") as raised:
        local_checkpoint(tmp_path).read(block_names(1, state_dict) + [missing], dtype=torch.float32)
    assert "model.safetensors" in str(raised.value)


def test_shard_lacking_an_indexed_tensor_names_the_shard(tmp_path, sharded_dir, state_dict):
    for file in sharded_dir.iterdir():
        shutil.copy(file, tmp_path / file.name)
    name = "model.layers.0.self_attn.q_proj.weight"
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    shard = index["weight_map"][name]
    index["weight_map"]["model.layers.0.self_attn.q_proj.extra"] = shard
    (tmp_path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=shard):
        local_checkpoint(tmp_path).read(
            ["model.layers.0.self_attn.q_proj.extra"], dtype=torch.float32
        )


def test_directory_without_safetensors_is_refused(tmp_path, single_dir):
    shutil.copy(single_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        local_checkpoint(tmp_path)


def test_unsupported_model_type_lists_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="gpt2.*llama"):
        load_config(tmp_path)


def test_missing_path_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_config(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="no such file"):
        load_config(str(tmp_path / "absent.gguf"))


def test_garbage_file_is_not_taken_for_gguf(tmp_path):
    garbage = tmp_path / "model.gguf"
    garbage.write_bytes(b"not a model at all" * 10)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_config(garbage)


def test_truncated_gguf_is_a_checkpoint_error(tmp_path, smollm2_gguf):
    truncated = tmp_path / "truncated.gguf"
    with smollm2_gguf.open("rb") as handle:
        truncated.write_bytes(handle.read(4096))
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        load_config(truncated)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_without_cuda_is_a_device_error():
    with pytest.raises(DeviceError, match="CUDA"):
        check_device(torch.float16, "cuda")


def test_dtype_the_device_cannot_multiply_is_a_device_error(monkeypatch):
    real_matmul = torch.matmul

    def matmul_without_half(a, b):
        if a.dtype == torch.float16:
            raise RuntimeError("\"addmm_impl_cpu_\" not implemented for 'Half'")
        return real_matmul(a, b)

    monkeypatch.setattr(torch, "matmul", matmul_without_half)
    with pytest.raises(DeviceError, match="float16"):
        check_device(torch.float16, "cpu")
    assert check_device(torch.float32, "cpu") == torch.device("cpu")


def test_non_float_dtype_and_unknown_device_are_device_errors():
    with pytest.raises(DeviceError, match="floating-point"):
        check_device(torch.int8, "cpu")
    with pytest.raises(DeviceError, match="warp9"):
        check_device(torch.float32, "warp9")


# -- spans and head, built by the adapters ------------------------------------------------


def run_blocks(spans, hidden: torch.Tensor) -> torch.Tensor:
    context = StepContext.make(0, hidden.shape[1], batch_size=hidden.shape[0])
    for span in spans:
        for block in span.blocks:
            hidden = block(hidden, None, context)
    return hidden


def test_head_and_two_spans_reproduce_the_models_logits(sharded_dir, model):
    head = load_head(sharded_dir)
    spans = [load_span(sharded_dir, 0, 2), load_span(sharded_dir, 2, NUM_BLOCKS)]
    assert [(s.start, s.end, len(s.blocks)) for s in spans] == [(0, 2, 2), (2, 6, 4)]
    input_ids = torch.randint(0, 256, (2, 5))  # (B, T)
    with torch.no_grad():
        logits = head.logits(run_blocks(spans, head.embed(input_ids)))  # (B, T, V)
        expected = model(input_ids).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_span_is_frozen_in_the_requested_dtype(single_dir):
    span = load_span(single_dir, 1, 3, dtype=torch.bfloat16)
    parameters = list(span.blocks.parameters())
    assert parameters and all(p.dtype == torch.bfloat16 for p in parameters)
    assert not any(p.requires_grad for p in parameters)
    assert not span.blocks.training


def test_hub_span_loads_with_only_its_shards_cached(hub_cache, sharded_dir, model, offline):
    hub_span = load_span(REPO, 2, 3, cache_dir=hub_cache)
    local_span = load_span(sharded_dir, 2, 3)
    hidden = torch.randn(1, 4, 64)  # (B, T, C)
    with torch.no_grad():
        torch.testing.assert_close(run_blocks([hub_span], hidden), run_blocks([local_span], hidden))


@pytest.mark.parametrize(("start", "end"), [(4, 7), (-1, 2), (3, 3)])
def test_span_outside_the_model_names_the_valid_range(single_dir, start, end):
    with pytest.raises(SpanError, match=r"0 <= a < b <= 6"):
        load_span(single_dir, start, end)


def test_tokenizer_of_a_local_directory(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "swarm": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(tmp_path)
    assert load_tokenizer(tmp_path)("hello swarm").input_ids == [1, 2]
