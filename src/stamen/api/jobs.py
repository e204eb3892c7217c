"""The fine-tuning job manager: creates jobs, queues them, runs each through the `Trainer`
in the background of `swarm-api`, records what the trainer reports, and serves what it
produces.

1. `create` checks the request (base model served, files exist with purpose
   "fine-tune", a trainer configured) and stores the job `queued`, with a "created" event.
2. `max_running_jobs` workers (one by default) take queued jobs oldest first. A job
   turns `validating_files` when it starts, `running` once the trainer says the files
   are valid, then `succeeded` (result CSV stored as a "fine-tune-results" file, model
   served), `failed` (`error` from `JobFailure`, else `internal_error`) or `cancelled`.
3. The trainer does its heavy work in a thread; the manager only awaits it on the event
   loop, so inference is never blocked. `_JobReport` may be called from that thread: it
   queues its writes on the store's thread (`Store.submit`) and hands anything touching
   the loop over with `call_soon_threadsafe`.
4. Each checkpoint is served as a model as soon as it is written, and a succeeded job's
   `fine_tuned_model` when the job ends, through `tuned_engine(base, model_id, path)`.
5. Cancelling a queued job cancels it at once; a running one sets `report.cancelled`,
   and the trainer stops at its next step boundary with `JobCancelled`.
6. At shutdown running trainers are asked to stop the same way but their jobs keep
   their status; `running()` at the next start serves every stored tuned model and
   queues every unfinished job again, which resumes from its last checkpoint.

This module knows nothing about HTTP routing; it raises `APIError`s for bad requests.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any

import msgspec

from stamen.api.engine import EngineClient
from stamen.api.errors import (
    APIError,
    file_not_found,
    invalid_request,
    job_not_found,
    model_not_found,
)
from stamen.api.ft_schemas import (
    FINAL_STATUSES,
    FileObject,
    FineTuningJob,
    FineTuningJobRequest,
    JobCheckpoint,
    JobError,
    JobEvent,
    JobHyperparameters,
    Method,
)
from stamen.api.state import ApiState, FineTuningSettings, TunedModelInfo
from stamen.api.store import Database, Store, TunedModel, new_id
from stamen.api.training import (
    CheckpointInfo,
    Hyperparameters,
    JobCancelled,
    JobFailure,
    Trainer,
    TrainingRequest,
    TrainingResult,
)

logger = logging.getLogger(__name__)

TunedEngineFactory = Callable[[EngineClient, str, Path], EngineClient]
STOP_WAIT_S = 1.0  # at shutdown, how long running trainers get to stop at a step boundary
RESULTS_FILENAME = "step_metrics.csv"


def tuned_model_id(base: str, owner: str, suffix: str | None, job_id: str) -> str:
    """OpenAI's naming: `ft:{base}:{owner}:{suffix}:{job_id}` (an empty suffix stays empty)."""
    return f"ft:{base}:{owner}:{suffix or ''}:{job_id}"


def checkpoint_model_id(model_id: str, step: int) -> str:
    return f"{model_id}:ckpt-step-{step}"


def default_tuned_engines() -> TunedEngineFactory:
    """`stamen.api.tuned.tuned_engine`, imported when first needed."""

    def build(base: EngineClient, model_id: str, prompts_path: Path) -> EngineClient:
        try:
            from stamen.api.tuned import tuned_engine
        except ImportError as error:
            raise RuntimeError(
                f"cannot serve tuned model {model_id}: stamen.api.tuned is missing ({error})"
            ) from error
        return tuned_engine(base, model_id, prompts_path)

    return build


def _now() -> int:
    return int(time.time())


def _event(
    message: str, level: str = "info", data: dict[str, Any] | None = None, *, metrics: bool = False
) -> JobEvent:
    return JobEvent(
        new_id("ftevent"),
        _now(),
        level,  # type: ignore[arg-type]
        message,
        type="metrics" if metrics else "message",
        data=data,
    )


class _JobReport:
    """The `TrainingReport` of one job run; safe to call from any thread."""

    def __init__(self, manager: JobManager, job: FineTuningJob) -> None:
        self._manager = manager
        self._store = manager.store
        self._job = job
        self._loop = asyncio.get_running_loop()
        self._cancel = threading.Event()
        self._running = False
        self.shutdown = False  # stopped for a server shutdown: the job resumes later
        self.done = asyncio.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self, *, shutdown: bool = False) -> None:
        self.shutdown = self.shutdown or shutdown
        self._cancel.set()

    def _emit(self, event: JobEvent) -> None:
        self._store.submit(Database.add_event, self._job.id, event)

    def _mark_running(self) -> None:
        if not self._running:
            self._running = True
            self._store.submit(Database.update_job, self._job.id, status="running")
            self._emit(_event("Fine-tuning job started"))

    def validated(self, train_examples: int, valid_examples: int, tokens_per_epoch: int) -> None:
        self._emit(
            _event(
                f"Files validated: {train_examples} training examples, {valid_examples} "
                f"validation examples, {tokens_per_epoch} tokens per epoch",
                data={
                    "train_examples": train_examples,
                    "valid_examples": valid_examples,
                    "tokens_per_epoch": tokens_per_epoch,
                },
            )
        )
        self._mark_running()

    def resolved(self, hyperparameters: Hyperparameters) -> None:
        values = JobHyperparameters(
            batch_size=hyperparameters.batch_size,
            learning_rate_multiplier=hyperparameters.learning_rate_multiplier,
            n_epochs=hyperparameters.n_epochs,
        )
        method = self._job.method
        supervised = msgspec.structs.replace(method.supervised, hyperparameters=values)
        self._store.submit(
            Database.update_job,
            self._job.id,
            hyperparameters=values,
            method=msgspec.structs.replace(method, supervised=supervised),
        )
        self._emit(
            _event(
                f"Hyperparameters: n_epochs={values.n_epochs}, batch_size={values.batch_size}, "
                f"learning_rate_multiplier={values.learning_rate_multiplier}",
                data=msgspec.structs.asdict(values),
            )
        )

    def message(self, text: str, *, level: str = "info") -> None:
        self._emit(_event(text, level if level in ("info", "warn", "error") else "info"))

    def step(
        self,
        step: int,
        total_steps: int,
        train_loss: float,
        valid_loss: float | None,
        trained_tokens: int,
    ) -> None:
        self._mark_running()
        data: dict[str, Any] = {"step": step, "total_steps": total_steps, "train_loss": train_loss}
        text = f"Step {step}/{total_steps}: training loss={train_loss:.4f}"
        if valid_loss is not None:
            data["valid_loss"] = valid_loss
            text += f", validation loss={valid_loss:.4f}"
        self._emit(_event(text, data=data, metrics=True))
        self._store.submit(Database.update_job, self._job.id, trained_tokens=trained_tokens)

    def checkpoint(self, checkpoint: CheckpointInfo) -> None:
        model_id = checkpoint_model_id(self._manager.model_id_of(self._job), checkpoint.step)
        metrics = {"step": float(checkpoint.step), **checkpoint.metrics}
        record = JobCheckpoint(
            new_id("ftckpt"), _now(), model_id, self._job.id, metrics, checkpoint.step
        )
        self._store.submit(Database.add_checkpoint, record, checkpoint)
        self._emit(
            _event(
                f"Epoch {checkpoint.epoch} done at step {checkpoint.step}: checkpoint {model_id}",
                data={"epoch": checkpoint.epoch, "step": checkpoint.step, **checkpoint.metrics},
            )
        )
        served = TunedModel(model_id, self._job.model, checkpoint.prompts_path, record.created_at)
        self._loop.call_soon_threadsafe(self._manager.serve_soon, served)


class JobManager:
    """Owns the queue, the workers and the trainer (module docstring)."""

    def __init__(
        self,
        store: Store,
        api: ApiState,
        trainer: Trainer | None,
        settings: FineTuningSettings,
        tuned_engines: TunedEngineFactory,
    ) -> None:
        self.store = store
        self._api = api
        self._trainer = trainer
        self._settings = settings
        self._tuned_engines = tuned_engines
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._queued: set[str] = set()
        self._running: dict[str, _JobReport] = {}
        self._serving: set[asyncio.Task[None]] = set()

    def model_id_of(self, job: FineTuningJob) -> str:
        return tuned_model_id(job.model, self._settings.owner, job.user_provided_suffix, job.id)

    # -- lifetime -------------------------------------------------------------------------

    @asynccontextmanager
    async def running(self) -> AsyncIterator[JobManager]:
        """Serve the stored tuned models, queue unfinished jobs again, run the workers."""
        for model in await self.store.run(Database.tuned_models):
            try:
                await self._serve(model)
            except Exception as error:
                logger.error("not serving tuned model %s: %s", model.model_id, error)
        for job in await self.store.run(
            Database.jobs_with_status, "queued", "validating_files", "running"
        ):
            self._enqueue(job.id)
            if job.status != "queued":
                await self.store.run(Database.update_job, job.id, status="queued")
                text = "The server restarted: job queued again, resuming from its last checkpoint"
                await self.store.run(Database.add_event, job.id, _event(text))
        async with asyncio.TaskGroup() as group:
            workers = [
                group.create_task(self._work()) for _ in range(self._settings.max_running_jobs)
            ]
            try:
                yield self
            finally:
                await self._stop(workers)

    async def _stop(self, workers: list[asyncio.Task[None]]) -> None:
        reports = list(self._running.values())
        for report in reports:
            report.cancel(shutdown=True)
        if reports:
            waits = [asyncio.create_task(report.done.wait()) for report in reports]
            _, pending = await asyncio.wait(waits, timeout=STOP_WAIT_S)
            for wait in pending:
                wait.cancel()
        for task in [*workers, *self._serving]:
            task.cancel()
        await self.store.flush()

    async def _work(self) -> None:
        while True:
            job_id = await self._queue.get()
            if job_id not in self._queued:
                continue  # cancelled while queued
            job = await self.store.run(Database.get_job, job_id)
            # Checked again after the read: a cancel may have come during it. From here to
            # `_running` nothing awaits, so a cancel finds the job queued or running.
            cancelled = job_id not in self._queued
            self._queued.discard(job_id)
            if cancelled or job is None or job.status in FINAL_STATUSES:
                continue
            report = _JobReport(self, job)
            self._running[job_id] = report
            try:
                await self._run(job, report)
            except Exception:  # a store failure: the next job may still run
                logger.exception("fine-tuning job %s could not be recorded", job_id)
            finally:
                del self._running[job_id]
                report.done.set()

    def _enqueue(self, job_id: str) -> None:
        self._queued.add(job_id)
        self._queue.put_nowait(job_id)

    # -- requests -------------------------------------------------------------------------

    async def create(self, request: FineTuningJobRequest) -> FineTuningJob:
        if self._trainer is None:
            raise APIError(
                400, "This server runs no trainer: fine-tuning is off.", code="fine_tuning_disabled"
            )
        method = self._method(request)
        if request.model in self._api.tuned:
            raise invalid_request(
                f"`{request.model}` is a fine-tuned model; tune its base model instead.",
                param="model",
                code="model_not_supported",
            )
        if request.model not in self._api.engines:
            raise model_not_found(request.model)
        await self._check_file(request.training_file, "training_file")
        if request.validation_file is not None:
            await self._check_file(request.validation_file, "validation_file")
        job = FineTuningJob(
            id=new_id("ftjob"),
            created_at=_now(),
            error=None,
            fine_tuned_model=None,
            finished_at=None,
            hyperparameters=method.supervised.hyperparameters,
            model=request.model,
            organization_id=self._settings.owner,
            result_files=[],
            seed=request.seed if request.seed is not None else _seed(),
            status="queued",
            trained_tokens=None,
            training_file=request.training_file,
            validation_file=request.validation_file,
            method=method,
            metadata=request.metadata,
            user_provided_suffix=request.suffix,
        )
        workdir = self.store.jobs_dir / job.id
        await asyncio.to_thread(workdir.mkdir, parents=True, exist_ok=True)
        await self.store.run(Database.add_job, job, workdir)
        await self.store.run(
            Database.add_event, job.id, _event(f"Created fine-tuning job: {job.id}")
        )
        self._enqueue(job.id)
        return job

    @staticmethod
    def _method(request: FineTuningJobRequest) -> Method:
        if request.integrations:
            raise invalid_request(
                "`integrations` are not supported by this server.",
                param="integrations",
                code="unsupported_parameter",
            )
        if request.method is not None and request.hyperparameters is not None:
            raise invalid_request(
                "Give hyperparameters in `method.supervised.hyperparameters` or in the "
                "deprecated `hyperparameters`, not both.",
                param="hyperparameters",
            )
        if request.method is not None:
            return request.method
        method = Method(type="supervised")
        if request.hyperparameters is None:
            return method
        supervised = msgspec.structs.replace(
            method.supervised, hyperparameters=request.hyperparameters
        )
        return msgspec.structs.replace(method, supervised=supervised)

    async def _check_file(self, file_id: str, param: str) -> None:
        found = await self.store.run(Database.get_file, file_id)
        if found is None:
            raise file_not_found(file_id, param)
        if found[0].purpose != "fine-tune":
            raise invalid_request(
                f"File {file_id} has purpose `{found[0].purpose}`; `{param}` needs a file "
                "uploaded with purpose `fine-tune`.",
                param=param,
                code="invalid_file_purpose",
            )

    async def get(self, job_id: str) -> FineTuningJob:
        job = await self.store.run(Database.get_job, job_id)
        if job is None:
            raise job_not_found(job_id)
        return job

    async def cancel(self, job_id: str) -> FineTuningJob:
        job = await self.get(job_id)
        if job.status in FINAL_STATUSES:
            raise invalid_request(
                f"Job {job_id} has already {job.status}; it cannot be cancelled.",
                param="fine_tuning_job_id",
                code="invalid_job_state",
            )
        report = self._running.get(job_id)
        if report is None:
            self._queued.discard(job_id)
            return await self._finish(job_id, "cancelled", _event("Fine-tuning job cancelled"))
        report.cancel()
        with suppress(TimeoutError):
            await asyncio.wait_for(report.done.wait(), self._settings.cancel_wait_s)
        return await self.get(job_id)

    # -- running a job --------------------------------------------------------------------

    async def _run(self, job: FineTuningJob, report: _JobReport) -> None:
        try:
            request, engine = await self._training_request(job)
            resume = await self.store.run(Database.last_checkpoint, job.id)
            await self.store.run(Database.update_job, job.id, status="validating_files")
            await self._note(job.id, f"Validating training file: {job.training_file}")
            if resume is not None:
                await self._note(job.id, f"Resuming from the checkpoint at step {resume.step}")
            if report.cancelled:
                raise JobCancelled
            assert self._trainer is not None  # no job is created without one
            result = await self._trainer.train(request, engine, report, resume)
        except JobCancelled:
            await self.store.flush()
            if report.shutdown:
                await self._note(job.id, "Interrupted by a server shutdown; resumes at restart")
            else:
                await self._finish(job.id, "cancelled", _event("Fine-tuning job cancelled"))
        except JobFailure as failure:
            await self._fail(job.id, JobError(failure.code, failure.message, failure.param))
        except Exception as error:
            logger.exception("fine-tuning job %s failed", job.id)
            await self._fail(job.id, JobError("internal_error", f"{type(error).__name__}: {error}"))
        else:
            await self._succeed(job, result)

    async def _training_request(self, job: FineTuningJob) -> tuple[TrainingRequest, EngineClient]:
        engine = self._api.engines.get(job.model)
        if engine is None or job.model in self._api.tuned:
            raise JobFailure("model_not_found", f"The model `{job.model}` is not served.", "model")
        training = await self.store.run(Database.get_file, job.training_file)
        if training is None:
            raise JobFailure(
                "file_not_found", f"No file with id {job.training_file}.", "training_file"
            )
        validation = None
        if job.validation_file is not None:
            found = await self.store.run(Database.get_file, job.validation_file)
            if found is None:
                message = f"No file with id {job.validation_file}."
                raise JobFailure("file_not_found", message, "validation_file")
            validation = found[1]
        supervised = job.method.supervised
        request = TrainingRequest(
            job_id=job.id,
            model=job.model,
            training_file=training[1],
            validation_file=validation,
            hyperparameters=msgspec.structs.asdict(supervised.hyperparameters),
            seed=job.seed,
            tuning_mode=supervised.tuning_mode,
            pre_seq_len=supervised.pre_seq_len,
            workdir=await self.store.run(Database.job_workdir, job.id),
        )
        return request, engine

    async def _succeed(self, job: FineTuningJob, result: TrainingResult) -> None:
        await self.store.flush()
        model_id = self.model_id_of(job)
        try:
            await self._serve(TunedModel(model_id, job.model, result.prompts_path, _now()))
        except Exception as error:
            logger.exception("cannot serve %s", model_id)
            await self._fail(job.id, JobError("internal_error", f"cannot serve the model: {error}"))
            return
        results = await self._store_results(result.metrics_csv)
        await self.store.run(Database.set_prompts_path, job.id, result.prompts_path)
        await self._note(job.id, f"New fine-tuned model created: {model_id}")
        await self._finish(
            job.id,
            "succeeded",
            _event("The job has successfully completed"),
            fine_tuned_model=model_id,
            trained_tokens=result.trained_tokens,
            result_files=[results.id],
        )

    async def _store_results(self, metrics_csv: Path) -> FileObject:
        file_id = new_id("file")
        path = self.store.files_dir / file_id
        await asyncio.to_thread(shutil.copyfile, metrics_csv, path)
        size = await asyncio.to_thread(lambda: path.stat().st_size)
        file = FileObject(file_id, size, _now(), RESULTS_FILENAME, "fine-tune-results")
        await self.store.run(Database.add_file, file, path)
        return file

    async def _fail(self, job_id: str, error: JobError) -> None:
        await self.store.flush()
        event = _event(f"Fine-tuning job failed: {error.message}", "error", {"code": error.code})
        await self._finish(job_id, "failed", event, error=error)

    async def _finish(
        self,
        job_id: str,
        status: str,
        event: JobEvent,
        error: JobError | None = None,
        **changes: object,
    ) -> FineTuningJob:
        """The final status and `changes` in one write: a server that dies around it leaves
        the job either unfinished (it runs again) or finished, never half of each."""
        job = await self.store.run(
            Database.update_job, job_id, status=status, finished_at=_now(), error=error, **changes
        )
        await self.store.run(Database.add_event, job_id, event)
        return job

    async def _note(self, job_id: str, text: str) -> None:
        await self.store.run(Database.add_event, job_id, _event(text))

    # -- serving tuned models -------------------------------------------------------------

    async def _serve(self, model: TunedModel) -> None:
        base = self._api.engines.get(model.base_model)
        if base is None or model.base_model in self._api.tuned:
            logger.warning("not serving %s: its base model is not served", model.model_id)
            return
        engine = await asyncio.to_thread(
            self._tuned_engines, base, model.model_id, model.prompts_path
        )
        info = TunedModelInfo(model.base_model, model.created_at, self._settings.owner)
        self._api.add_tuned(engine, info)

    def serve_soon(self, model: TunedModel) -> None:
        """Serve a checkpoint's model in the background (from the event loop)."""

        async def serve() -> None:
            try:
                await self._serve(model)
            except Exception:
                logger.exception("cannot serve checkpoint model %s", model.model_id)

        task = asyncio.get_running_loop().create_task(serve())
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)


def _seed() -> int:
    return secrets.randbelow(2**31)
