"""OpenAI's files and fine-tuning objects as msgspec Structs, fields in the spec's order.

The same types decode requests (`schemas.decode_request`), are stored by `store.py` as
the records themselves (a job row holds its `FineTuningJob`), and answer requests, so
what the server accepts, keeps and shows cannot drift apart.

Our two extra fields, documented on `SupervisedMethod` and shown on every job:

    "method": {"type": "supervised", "supervised": {
        "hyperparameters": {"n_epochs": 3, "batch_size": "auto",
                            "learning_rate_multiplier": "auto"},
        "tuning_mode": "ptune" | "deep_ptune",   # default "ptune"
        "pre_seq_len": 16}}                      # prompt tokens trained, default 16

The legacy top-level `hyperparameters` is accepted too (not together with `method`).
Only `supervised` tuning exists: `method.type` "dpo" or "reinforcement" is a 400.

This module knows nothing about HTTP, SQLite or training.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from stamen.api.training import DEFAULT_PRE_SEQ_LEN, DEFAULT_TUNING_MODE

# The trainer's own limits (`tuning.LIMITS`), so that every value it resolves is one a
# stored job can hold.
Auto = Literal["auto"]
Epochs = Annotated[int, msgspec.Meta(ge=1, le=50)]
BatchSize = Annotated[int, msgspec.Meta(ge=1, le=256)]
LrMultiplier = Annotated[float, msgspec.Meta(gt=0.0, le=100.0)]
PreSeqLen = Annotated[int, msgspec.Meta(ge=1, le=1024)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
# The suffix becomes part of a model id made of ":"-separated fields.
Suffix = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]

FilePurpose = Literal["fine-tune", "fine-tune-results"]
JobStatus = Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled"]
FINAL_STATUSES: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})

# -- files --------------------------------------------------------------------------------


class FileObject(msgspec.Struct):
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    object: Literal["file"] = "file"
    status: Literal["processed"] = "processed"
    expires_at: int | None = None
    status_details: str | None = None


class FileList(msgspec.Struct):
    data: list[FileObject]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"


class FileDeleted(msgspec.Struct):
    id: str
    deleted: bool = True
    object: Literal["file"] = "file"


class FileUpload(msgspec.Struct):
    """The multipart/form-data body of `POST /v1/files` (for the OpenAPI document)."""

    file: bytes
    purpose: Literal["fine-tune"]


# -- fine-tuning jobs ---------------------------------------------------------------------


class JobHyperparameters(msgspec.Struct, forbid_unknown_fields=True):
    """As asked ("auto" allowed); on a job, the resolved values once the trainer chose."""

    batch_size: Auto | BatchSize = "auto"
    learning_rate_multiplier: Auto | LrMultiplier = "auto"
    n_epochs: Auto | Epochs = "auto"


class SupervisedMethod(msgspec.Struct, forbid_unknown_fields=True):
    hyperparameters: JobHyperparameters = msgspec.field(default_factory=JobHyperparameters)
    # Stamen's own: which prompts are trained (`swarm_core.client.prompts`), and how many tokens.
    tuning_mode: Literal["ptune", "deep_ptune"] = DEFAULT_TUNING_MODE  # type: ignore[assignment]
    pre_seq_len: PreSeqLen = DEFAULT_PRE_SEQ_LEN


class Method(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["supervised"]
    supervised: SupervisedMethod = msgspec.field(default_factory=SupervisedMethod)


class FineTuningJobRequest(msgspec.Struct):
    model: str
    training_file: str
    hyperparameters: JobHyperparameters | None = None  # legacy; `method` is the new place
    suffix: Suffix | None = None
    validation_file: str | None = None
    integrations: list[dict[str, Any]] | None = None  # refused unless empty
    seed: Seed | None = None
    method: Method | None = None
    metadata: dict[str, str] | None = None


class JobError(msgspec.Struct):
    code: str
    message: str
    param: str | None = None


class FineTuningJob(msgspec.Struct):
    id: str
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: JobStatus
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    method: Method
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    estimated_finish: int | None = None
    integrations: list[dict[str, Any]] = msgspec.field(default_factory=list)
    metadata: dict[str, str] | None = None
    user_provided_suffix: str | None = None


class JobList(msgspec.Struct):
    data: list[FineTuningJob]
    has_more: bool
    object: Literal["list"] = "list"


class JobEvent(msgspec.Struct):
    id: str
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"] = "message"
    data: dict[str, Any] | None = None
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"


class EventList(msgspec.Struct):
    data: list[JobEvent]
    has_more: bool
    object: Literal["list"] = "list"


class JobCheckpoint(msgspec.Struct):
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, float]
    step_number: int
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"


class CheckpointList(msgspec.Struct):
    data: list[JobCheckpoint]
    first_id: str | None
    last_id: str | None
    has_more: bool
    object: Literal["list"] = "list"
