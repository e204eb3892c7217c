"""`SwarmTrainer`: the training loop behind fine-tuning jobs (the `training.Trainer` seam).

Only the soft prompts train (`PromptTuning`, float32, on this process); the head stays
frozen here and the blocks frozen on the hosts. One job:

1. Parse and tokenize the files (`datasets.load_examples`; a bad line fails the job
   naming it), then resolve "auto" hyperparameters (`resolve_hyperparameters`).
2. Start the prompts from the embeddings of `P` vocabulary tokens drawn with `seed`
   (faster to train than noise), or from a checkpoint when resuming.
3. Each epoch visits the examples in an order drawn from a generator seeded by `seed`
   (its state is checkpointed, so a resumed job draws the same orders). Each step: a
   right-padded batch (causal attention never lets a real token see the padding on its
   right, so no mask is needed), embedded by the frozen head, the prefix put in front,
   every block through `engine.blocks_function` (deep prompts added there), logits of
   only the trained positions, token-mean cross-entropy, backward, AdamW step.
4. The validation loss (the whole validation file, no grad) before the first step (a
   message), every `valid_every_steps` steps and at each epoch's end; a checkpoint at
   each epoch's end: the prompts (servable, `tuned.tuned_engine`) and a state file
   (optimizer, step, epoch, generator state). Resuming from it continues exactly where it stopped: same final prompts.

The loop runs in a worker thread so the API's event loop keeps serving chat traffic; the
remote calls of the blocks and every `TrainingReport` call go back to that loop
(`_Bridge`). Cancellation is checked before every step; a cancelled `train` task stops
its thread at the next remote call or step boundary.

This module knows nothing about HTTP, the job store, or how the blocks are reached.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import csv
import dataclasses
import logging
import math
import os
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from stamen.api.datasets import IGNORE_INDEX, Example, FileKind, load_examples
from stamen.api.engine import BlocksFunction, EngineClient, EngineUnavailable
from stamen.api.training import (
    AUTO,
    CheckpointInfo,
    Hyperparameters,
    JobCancelled,
    JobFailure,
    TrainingReport,
    TrainingRequest,
    TrainingResult,
)
from stamen.models.base import ClientHead
from stamen.swarm_core.client.prompts import MAX_PRE_SEQ_LEN, TUNING_MODES, PromptTuning, TuningMode

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Base learning rates of AdamW on the prompts, scaled by `learning_rate_multiplier`.
# Prompts live in embedding space (SmolLM2's token embeddings have entries of ~0.1), so a
# step of ~1e-2 per entry moves them fast without swamping them.
BASE_LEARNING_RATE = {"ptune": 1e-2, "deep_ptune": 1e-2}
DEFAULT_EPOCHS = 3
# "auto" epochs: enough that training sees at least this many examples, for tiny files.
MIN_EXAMPLES_SEEN = 100
MAX_AUTO_EPOCHS = 25
MAX_BATCH_SIZE = 8  # "auto" batch size: n // 10, within [1, 8]
LIMITS = {"n_epochs": (1, 50), "batch_size": (1, 256), "learning_rate_multiplier": (0.0, 100.0)}
METRICS_COLUMNS = (
    "step",
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "trained_tokens",
)
STATE_VERSION = 1


# -- 1. hyperparameters --------------------------------------------------------------------


def resolve_hyperparameters(
    asked: dict[str, int | float | str], n_examples: int
) -> Hyperparameters:
    """The job's values with "auto" (or absent) chosen from the training set's size:
    `n_epochs` 3, more for tiny files (at least `MIN_EXAMPLES_SEEN` examples seen, at
    most 25 epochs); `batch_size` n // 10 within [1, 8]; `learning_rate_multiplier` 1.
    An explicit batch size larger than the file is cut to the file's size."""
    unknown = sorted(set(asked) - set(LIMITS))
    if unknown:
        raise JobFailure(
            "invalid_hyperparameters",
            f"unknown hyperparameters {unknown}",
            f"hyperparameters.{unknown[0]}",
        )
    auto_epochs = min(
        MAX_AUTO_EPOCHS, max(DEFAULT_EPOCHS, math.ceil(MIN_EXAMPLES_SEEN / n_examples))
    )
    n_epochs = int(_checked(asked, "n_epochs", auto_epochs, integer=True))
    batch_size = int(
        _checked(asked, "batch_size", min(MAX_BATCH_SIZE, max(1, n_examples // 10)), integer=True)
    )
    multiplier = float(_checked(asked, "learning_rate_multiplier", 1.0, integer=False))
    return Hyperparameters(n_epochs, min(batch_size, n_examples), multiplier)


def _checked(
    asked: dict[str, int | float | str], name: str, auto: float, *, integer: bool
) -> float:
    value = asked.get(name, AUTO)
    if value == AUTO:
        return auto
    low, high = LIMITS[name]
    if integer:
        fits = type(value) is int and low <= value <= high
    else:
        fits = type(value) in (int, float) and low < float(value) <= high
    if not fits:
        want = "an integer" if integer else "a number"
        interval = f"[{low:g}, {high:g}]" if integer else f"({low:g}, {high:g}]"
        raise JobFailure(
            "invalid_hyperparameters",
            f"hyperparameters.{name} must be 'auto' or {want} in {interval}, got {value!r}",
            f"hyperparameters.{name}",
        )
    return float(value)


# -- 2. batches and the loss ---------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    input_ids: Tensor  # (B, T) long, right-padded
    labels: Tensor  # (B, T) long, IGNORE_INDEX on padding and untrained tokens
    tokens: int  # real (unpadded) tokens


def make_batch(examples: Sequence[Example], pad_token_id: int) -> Batch:
    T = max(len(example) for example in examples)
    input_ids = torch.full((len(examples), T), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example)] = torch.tensor(example.input_ids)
        labels[row, : len(example)] = torch.tensor(example.labels)
    return Batch(input_ids, labels, sum(len(example) for example in examples))


@dataclass(frozen=True)
class LossSum:
    loss: Tensor  # () float32: summed over the trained tokens
    correct: int  # trained tokens the model predicts (argmax)
    count: int  # trained tokens


def batch_loss(
    tuning: PromptTuning, head: ClientHead, blocks: BlocksFunction, batch: Batch
) -> LossSum:
    """Cross-entropy of the trained tokens of `batch` with `tuning`'s prompts in front."""
    B, P = batch.input_ids.shape[0], tuning.pre_seq_len
    with torch.no_grad():
        embeds = head.embed(batch.input_ids)  # (B, T, C)
    hidden = torch.cat([tuning.prefix(B).to(embeds.dtype), embeds], dim=1)  # (B, P + T, C)
    out = blocks(hidden, tuning.deep_prompts())  # (B, P + T, C)
    targets = batch.labels[:, 1:]  # (B, T - 1): the output at token t predicts token t + 1
    trained = targets != IGNORE_INDEX
    states = out[:, P:-1][trained]  # (N, C): the LM head runs only where the loss looks
    logits = head.logits(states[None])[0].float()  # (N, V)
    wanted = targets[trained]  # (N,)
    loss = F.cross_entropy(logits, wanted, reduction="sum")
    correct = int((logits.argmax(-1) == wanted).sum())
    return LossSum(loss, correct, int(wanted.numel()))


def dataset_loss(
    tuning: PromptTuning,
    head: ClientHead,
    blocks: BlocksFunction,
    examples: Sequence[Example],
    batch_size: int,
    pad_token_id: int,
) -> tuple[float, float]:
    """(token-mean loss, token accuracy) over every example, without grad."""
    loss, correct, count = 0.0, 0, 0
    with torch.no_grad():
        for first in range(0, len(examples), batch_size):
            part = make_batch(examples[first : first + batch_size], pad_token_id)
            result = batch_loss(tuning, head, blocks, part)
            loss += float(result.loss)
            correct += result.correct
            count += result.count
    return loss / count, correct / count


# -- 3. the bridge between the worker thread and the event loop ----------------------------


class _Bridge:
    """What the training thread does on the event loop: the blocks' remote calls and every
    report call. A `stop` set by the cancelled `train` task ends the thread's next wait."""

    POLL_S = 0.5

    def __init__(self, loop: asyncio.AbstractEventLoop, report: TrainingReport) -> None:
        self._loop = loop
        self._report = report
        self.stop = threading.Event()

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return self._wait(asyncio.run_coroutine_threadsafe(coroutine, self._loop))

    def call(self, function: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        done: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(function(*args, **kwargs))
            except BaseException as error:  # handed to the waiting thread
                done.set_exception(error)

        self._loop.call_soon_threadsafe(call)
        return self._wait(done)

    def cancelled(self) -> bool:
        return self.stop.is_set() or self.call(lambda: self._report.cancelled)

    @property
    def report(self) -> TrainingReport:
        return self._report

    def _wait(self, future: concurrent.futures.Future[_T]) -> _T:
        while True:
            try:
                return future.result(timeout=self.POLL_S)
            except concurrent.futures.TimeoutError:
                if self.stop.is_set():
                    future.cancel()
                    raise JobCancelled("the training task was cancelled") from None


# -- 4. the trainer ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Data:
    train: list[Example]
    valid: list[Example]
    pad_token_id: int


class SwarmTrainer:
    """`Trainer` of soft prompts through any `EngineClient` (module docstring)."""

    def __init__(self, *, valid_every_steps: int = 10) -> None:
        if valid_every_steps < 1:
            raise ValueError("valid_every_steps must be >= 1")
        self.valid_every_steps = valid_every_steps

    async def train(
        self,
        request: TrainingRequest,
        engine: EngineClient,
        report: TrainingReport,
        resume: CheckpointInfo | None = None,
    ) -> TrainingResult:
        bridge = _Bridge(asyncio.get_running_loop(), report)
        work = asyncio.ensure_future(
            asyncio.to_thread(self._train, request, engine, bridge, resume)
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            bridge.stop.set()  # the thread ends at its next step or remote call
            # Nobody awaits the thread's JobCancelled now: retrieve it so it is not logged.
            work.add_done_callback(lambda done: done.cancelled() or done.exception())
            raise

    def _train(
        self,
        request: TrainingRequest,
        engine: EngineClient,
        bridge: _Bridge,
        resume: CheckpointInfo | None,
    ) -> TrainingResult:
        try:
            return _Run(self, request, engine, bridge, resume).train()
        except EngineUnavailable as error:
            raise JobFailure(
                "model_unavailable", f"the model cannot be reached: {error}"
            ) from error


class _Run:
    """One job's training, on the worker thread."""

    def __init__(
        self,
        trainer: SwarmTrainer,
        request: TrainingRequest,
        engine: EngineClient,
        bridge: _Bridge,
        resume: CheckpointInfo | None,
    ) -> None:
        self.request, self.engine, self.bridge = request, engine, bridge
        self.valid_every_steps = trainer.valid_every_steps
        self.mode = _tuning_mode(request)
        self.data = self._load_data()
        report = bridge.report
        bridge.call(
            report.validated,
            len(self.data.train),
            len(self.data.valid),
            sum(len(example) for example in self.data.train),
        )
        self.generator = torch.Generator().manual_seed(request.seed)
        self.step = self.epoch = self.trained_tokens = 0
        state: dict[str, Any] = {}
        if resume is None:
            self.hp = resolve_hyperparameters(request.hyperparameters, len(self.data.train))
            self.tuning = self._fresh_prompts()
        else:
            self.tuning, state = self._resumed(resume)
            self.hp = Hyperparameters(**state["hyperparameters"])
        bridge.call(report.resolved, self.hp)
        learning_rate = BASE_LEARNING_RATE[self.mode] * self.hp.learning_rate_multiplier
        self.optimizer = torch.optim.AdamW(
            self.tuning.parameters(), lr=learning_rate, weight_decay=0.0
        )
        request.workdir.mkdir(parents=True, exist_ok=True)
        self.metrics_csv = request.workdir / "metrics.csv"
        if state:
            self._restore(state)
        self.blocks = engine.blocks_function(bridge.run)
        self.steps_per_epoch = math.ceil(len(self.data.train) / self.hp.batch_size)
        self.last: dict[str, float] = {}
        self.checkpoint: CheckpointInfo | None = resume

    # -- setup -----------------------------------------------------------------------------

    def _load_data(self) -> _Data:
        engine, request = self.engine, self.request
        if not engine.eos_token_ids:
            raise JobFailure("invalid_request", f"{engine.model_id} names no end-of-sequence token")
        if not 1 <= request.pre_seq_len <= MAX_PRE_SEQ_LEN:
            raise JobFailure(
                "invalid_request",
                f"pre_seq_len must be in [1, {MAX_PRE_SEQ_LEN}], got {request.pre_seq_len}",
                "pre_seq_len",
            )
        max_tokens = engine.context_length - request.pre_seq_len
        if max_tokens < 2:
            raise JobFailure(
                "invalid_request",
                f"pre_seq_len {request.pre_seq_len} leaves no room in the model's context",
                "pre_seq_len",
            )
        eos = engine.eos_token_ids[0]

        def load(path: Path, kind: FileKind) -> list[Example]:
            return load_examples(
                path, engine.tokenizer, eos_token_id=eos, max_tokens=max_tokens, kind=kind
            )

        train = load(request.training_file, "training")
        valid = (
            [] if request.validation_file is None else load(request.validation_file, "validation")
        )
        pad = getattr(engine.tokenizer, "pad_token_id", None)
        return _Data(train, valid, pad if isinstance(pad, int) else eos)

    def _fresh_prompts(self) -> PromptTuning:
        head, P = self.engine.head, self.request.pre_seq_len
        special = set(getattr(self.engine.tokenizer, "all_special_ids", []))
        vocabulary = torch.tensor(
            [i for i in range(len(self.engine.tokenizer)) if i not in special]
        )
        chosen = vocabulary[torch.randperm(len(vocabulary), generator=self.generator)[:P]]
        with torch.no_grad():
            init = head.embed(chosen[None])[0].float()  # (P, C)
        C = init.shape[-1]
        return PromptTuning(
            self.mode, pre_seq_len=P, hidden_size=C, num_blocks=self._num_blocks(), init=init
        )

    def _num_blocks(self) -> int:
        return self.bridge.call(self.engine.swarm_snapshot).num_blocks

    def _resumed(self, resume: CheckpointInfo) -> tuple[PromptTuning, dict[str, Any]]:
        metadata = PromptTuning.read_metadata(resume.prompts_path)
        if metadata.get("base_model") != self.request.model:
            raise JobFailure(
                "invalid_checkpoint",
                f"the checkpoint tunes {metadata.get('base_model')!r}, not {self.request.model!r}",
            )
        tuning = PromptTuning.load(resume.prompts_path)
        if tuning.mode != self.mode or tuning.pre_seq_len != self.request.pre_seq_len:
            raise JobFailure("invalid_checkpoint", "the checkpoint's prompts do not match the job")
        state = torch.load(resume.state_path, weights_only=True)
        if state.get("version") != STATE_VERSION:
            raise JobFailure("invalid_checkpoint", f"unknown state file {resume.state_path.name}")
        return tuning, state

    def _restore(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.trained_tokens = int(state["trained_tokens"])
        _keep_rows_until(self.metrics_csv, self.step)
        self.bridge.call(
            self.bridge.report.message, f"resumed from the checkpoint at step {self.step}"
        )

    # -- the loop --------------------------------------------------------------------------

    def train(self) -> TrainingResult:
        total_steps = self.hp.n_epochs * self.steps_per_epoch
        if self.step == 0 and self.data.valid:
            loss, _ = self._valid_loss()
            self.bridge.call(self.bridge.report.message, f"valid_loss before training: {loss:.6g}")
        while self.epoch < self.hp.n_epochs:
            order = torch.randperm(len(self.data.train), generator=self.generator).tolist()
            for first in range(0, len(order), self.hp.batch_size):
                if self.bridge.cancelled():
                    raise JobCancelled(f"cancelled before step {self.step + 1}")
                examples = [self.data.train[i] for i in order[first : first + self.hp.batch_size]]
                epoch_end = first + self.hp.batch_size >= len(order)
                self._step(examples, total_steps, epoch_end)
            self.epoch += 1
            self._write_checkpoint()
        assert self.checkpoint is not None  # n_epochs >= 1
        return TrainingResult(self.checkpoint.prompts_path, self.trained_tokens, self.metrics_csv)

    def _step(self, examples: list[Example], total_steps: int, epoch_end: bool) -> None:
        batch = make_batch(examples, self.data.pad_token_id)
        result = batch_loss(self.tuning, self.engine.head, self.blocks, batch)
        (result.loss / result.count).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.trained_tokens += batch.tokens
        row: dict[str, float] = {
            "train_loss": float(result.loss.detach()) / result.count,
            "train_mean_token_accuracy": result.correct / result.count,
        }
        valid_loss = None
        if self.data.valid and (epoch_end or self.step % self.valid_every_steps == 0):
            valid_loss, accuracy = self._valid_loss()
            row |= {"valid_loss": valid_loss, "valid_mean_token_accuracy": accuracy}
        self.last = row
        _append_row(
            self.metrics_csv, {"step": self.step, **row, "trained_tokens": self.trained_tokens}
        )
        report = self.bridge.report
        self.bridge.call(
            report.step, self.step, total_steps, row["train_loss"], valid_loss, self.trained_tokens
        )

    def _valid_loss(self) -> tuple[float, float]:
        return dataset_loss(
            self.tuning,
            self.engine.head,
            self.blocks,
            self.data.valid,
            self.hp.batch_size,
            self.data.pad_token_id,
        )

    def _write_checkpoint(self) -> None:
        directory = self.request.workdir / "checkpoints"
        directory.mkdir(parents=True, exist_ok=True)
        prompts_path = directory / f"epoch-{self.epoch}.prompts.safetensors"
        state_path = directory / f"epoch-{self.epoch}.state.pt"
        metadata = {
            "base_model": self.request.model,
            "job_id": self.request.job_id,
            "step": str(self.step),
            "epoch": str(self.epoch),
        }
        _atomic(prompts_path, lambda tmp: self.tuning.save(tmp, metadata=metadata))
        state = {
            "version": STATE_VERSION,
            "step": self.step,
            "epoch": self.epoch,
            "trained_tokens": self.trained_tokens,
            "hyperparameters": dataclasses.asdict(self.hp),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        }
        _atomic(state_path, lambda tmp: torch.save(state, tmp))
        self.checkpoint = CheckpointInfo(
            self.step, self.epoch, prompts_path, state_path, dict(self.last)
        )
        self.bridge.call(self.bridge.report.checkpoint, self.checkpoint)


def _tuning_mode(request: TrainingRequest) -> TuningMode:
    if request.tuning_mode not in TUNING_MODES:
        raise JobFailure(
            "invalid_request",
            f"tuning_mode must be one of {TUNING_MODES}, got {request.tuning_mode!r}",
            "tuning_mode",
        )
    return cast(TuningMode, request.tuning_mode)


# -- files ---------------------------------------------------------------------------------


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file and rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _append_row(path: Path, row: dict[str, float | int]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=METRICS_COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _keep_rows_until(path: Path, step: int) -> None:
    """Drop the rows an interrupted run wrote after the checkpoint it resumes from."""
    if not path.exists():
        return
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= step]
    path.unlink()
    for row in rows:
        _append_row(path, row)  # type: ignore[arg-type]
