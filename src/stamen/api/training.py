"""The seam between fine-tuning jobs (`jobs.py`: HTTP, store, queue) and the training
loop (`tuning.py`): what a job asks of a `Trainer`, and how the trainer reports back.

1. The job manager builds a `TrainingRequest` (files on disk, hyperparameters as asked,
   "auto" allowed) and calls `Trainer.train` with the base model's engine, a
   `TrainingReport` that persists every call at once, and the last checkpoint when the
   job resumes after a restart.
2. The trainer validates the data (a bad file raises `JobFailure` naming the line), calls
   `report.validated` and `report.resolved` with the hyperparameters it chose, then trains:
   `report.step` per optimizer step, `report.checkpoint` at each epoch's end (a
   checkpoint holds everything needed to resume, and its prompts are servable as a
   model), and returns a `TrainingResult`.
3. Cancellation is cooperative: the manager sets `report.cancelled`; the trainer stops
   at the next step boundary by raising `JobCancelled`. Any other exception is a failure
   of the job (`JobFailure` carries an OpenAI-style error code; anything else is
   reported as `internal_error`), never of the server.

Tuned models are served by `tuned.tuned_engine(base, model_id, prompts_path)`.

This module knows nothing about HTTP, SQLite or how the loop reaches the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from stamen.api.engine import EngineClient

AUTO = "auto"
DEFAULT_TUNING_MODE = "ptune"
DEFAULT_PRE_SEQ_LEN = 16


class JobFailure(Exception):
    """The job cannot go on; it ends `failed` with `error = {code, message, param}`."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


class JobCancelled(Exception):
    """The trainer saw `report.cancelled` and stopped at a step boundary."""


@dataclass(frozen=True)
class Hyperparameters:
    """Resolved values (no "auto" left)."""

    n_epochs: int
    batch_size: int
    learning_rate_multiplier: float


@dataclass(frozen=True)
class TrainingRequest:
    job_id: str
    model: str  # the base model's id, an engine's `model_id`
    training_file: Path
    validation_file: Path | None
    # As the client asked: each an int / float, or "auto" (absent keys mean "auto").
    hyperparameters: dict[str, int | float | str] = field(default_factory=dict)
    seed: int = 0
    tuning_mode: str = DEFAULT_TUNING_MODE  # "ptune" | "deep_ptune"
    pre_seq_len: int = DEFAULT_PRE_SEQ_LEN
    workdir: Path = Path(".")  # the job's own directory (checkpoints); survives restarts


@dataclass(frozen=True)
class CheckpointInfo:
    step: int  # optimizer steps done when it was written
    epoch: int  # epochs completed
    prompts_path: Path  # a `PromptTuning.save` file: servable as a model
    state_path: Path  # optimizer, random state and progress: what resuming needs
    metrics: dict[str, float] = field(default_factory=dict)  # train_loss, valid_loss, ...


@dataclass(frozen=True)
class TrainingResult:
    prompts_path: Path
    trained_tokens: int
    metrics_csv: Path  # one row per step: step, train_loss, valid_loss, ...


class TrainingReport(Protocol):
    """How a trainer tells the job manager what happens; every call is persisted."""

    @property
    def cancelled(self) -> bool: ...

    def validated(self, train_examples: int, valid_examples: int, tokens_per_epoch: int) -> None:
        """The files parsed and fit the model (an event)."""

    def resolved(self, hyperparameters: Hyperparameters) -> None:
        """The values chosen for "auto" (stored on the job)."""

    def message(self, text: str, *, level: str = "info") -> None:
        """A free-form event (`level`: info, warn, error)."""

    def step(
        self,
        step: int,
        total_steps: int,
        train_loss: float,
        valid_loss: float | None,
        trained_tokens: int,
    ) -> None:
        """A `metrics` event after optimizer step `step` (1-based)."""

    def checkpoint(self, checkpoint: CheckpointInfo) -> None:
        """A checkpoint was written (at an epoch's end)."""


class Trainer(Protocol):
    async def train(
        self,
        request: TrainingRequest,
        engine: EngineClient,
        report: TrainingReport,
        resume: CheckpointInfo | None = None,
    ) -> TrainingResult:
        """Train prompts for `engine`'s model; raises `JobFailure` or `JobCancelled`."""
        ...
