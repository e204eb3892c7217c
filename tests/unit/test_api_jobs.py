"""Fine-tuning jobs through the HTTP API (AsyncTestClient, and the official `openai` SDK on
its transport), with a fake engine and a fake `Trainer`: deterministic losses, one
checkpoint per epoch written to the job's workdir, and a gate to hold a job running."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import openai
import pytest
from litestar.testing import AsyncTestClient

from stamen.api.app import create_app, static_engines
from stamen.api.engine import HostView, SwarmSnapshot
from stamen.api.state import FineTuningSettings, ServingSettings
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

BASE = "base-model"
STEPS_PER_EPOCH = 2
TRAIN_LINES = b'{"messages": [{"role": "user", "content": "hi"}]}\n' * 4


class FakeEngine:
    """Enough of an `EngineClient` to be listed, routed to and tuned."""

    def __init__(self, model_id: str = BASE, prompts_path: Path | None = None) -> None:
        self.model_id = model_id
        self.prompts_path = prompts_path

    def ready(self) -> bool:
        return True

    def swarm_snapshot(self) -> SwarmSnapshot:
        return SwarmSnapshot.from_hosts(self.model_id, 2, [HostView("local-0", 0, 2, "online")])


def fake_tuned_engine(base: Any, model_id: str, prompts_path: Path) -> FakeEngine:
    assert prompts_path.exists(), "a tuned model is served from its prompts file"
    return FakeEngine(model_id, prompts_path)


class FakeTrainer:
    """Trains for n_epochs x 2 steps, loss 1/step; `hold_after` holds the job running
    after that step until `release` is set (or the job is cancelled)."""

    def __init__(self, *, hold_after: int | None = None, fail: JobFailure | None = None) -> None:
        self.hold_after = hold_after
        self.fail = fail
        self.release = asyncio.Event()
        self.held = asyncio.Event()
        self.calls: list[tuple[TrainingRequest, CheckpointInfo | None]] = []

    @staticmethod
    def resolve(asked: dict[str, int | float | str]) -> Hyperparameters:
        def value(name: str, auto: float) -> Any:
            given = asked.get(name, AUTO)
            return auto if given == AUTO else given

        return Hyperparameters(
            value("n_epochs", 2), value("batch_size", 4), value("learning_rate_multiplier", 1.0)
        )

    async def train(
        self,
        request: TrainingRequest,
        engine: Any,
        report: TrainingReport,
        resume: CheckpointInfo | None = None,
    ) -> TrainingResult:
        self.calls.append((request, resume))
        assert engine.model_id == request.model
        if self.fail is not None:
            raise self.fail
        report.validated(4, 0, 40)
        hyperparameters = self.resolve(request.hyperparameters)
        report.resolved(hyperparameters)
        total = hyperparameters.n_epochs * STEPS_PER_EPOCH
        csv = request.workdir / "metrics.csv"
        for step in range((resume.step if resume else 0) + 1, total + 1):
            if report.cancelled:
                raise JobCancelled
            report.step(step, total, 1.0 / step, 2.0 / step, 10 * step)
            with csv.open("a") as out:
                out.write(f"{step},{1.0 / step}\n")
            if step % STEPS_PER_EPOCH == 0:
                report.checkpoint(self._checkpoint(request.workdir, step))
            if step == self.hold_after:
                self.held.set()
                while not self.release.is_set():
                    if report.cancelled:
                        raise JobCancelled
                    await asyncio.sleep(0.01)
        prompts = request.workdir / "final.prompts"
        prompts.write_bytes(b"final")
        return TrainingResult(prompts, 10 * total, csv)

    @staticmethod
    def _checkpoint(workdir: Path, step: int) -> CheckpointInfo:
        prompts, state = workdir / f"step-{step}.prompts", workdir / f"step-{step}.state"
        prompts.write_bytes(b"prompts")
        state.write_bytes(b"state")
        return CheckpointInfo(
            step, step // STEPS_PER_EPOCH, prompts, state, {"train_loss": 1 / step}
        )


@asynccontextmanager
async def api_client(
    data_dir: Path | None,
    trainer: Any = None,
    *,
    max_body_bytes: int = 4 << 20,
    **fine_tuning: Any,
) -> AsyncIterator[AsyncTestClient]:
    settings = ServingSettings(
        max_body_bytes=max_body_bytes,
        fine_tuning=FineTuningSettings(data_dir=data_dir, **fine_tuning),
    )
    app = create_app(
        settings, static_engines(FakeEngine()), trainer=trainer, tuned_engines=fake_tuned_engine
    )
    async with AsyncTestClient(app) as client:
        yield client


async def upload(client: AsyncTestClient, content: bytes = TRAIN_LINES, **form: str) -> Any:
    files = {"file": ("train.jsonl", content, "application/jsonl")}
    return await client.post("/v1/files", files=files, data={"purpose": "fine-tune", **form})


async def create_job(client: AsyncTestClient, **body: Any) -> Any:
    file_id = (await upload(client)).json()["id"]
    return await client.post(
        "/v1/fine_tuning/jobs", json={"model": BASE, "training_file": file_id, **body}
    )


async def wait_for(client: AsyncTestClient, job_id: str, *statuses: str) -> dict[str, Any]:
    for _ in range(500):
        job = (await client.get(f"/v1/fine_tuning/jobs/{job_id}")).json()
        if job["status"] in statuses:
            return job
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} stayed {job['status']}, not {statuses}")


async def events_of(client: AsyncTestClient, job_id: str) -> list[dict[str, Any]]:
    response = await client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 100})
    return list(reversed(response.json()["data"]))  # oldest first


async def test_a_job_runs_to_a_served_model_with_events_checkpoints_and_results(
    tmp_path: Path,
) -> None:
    trainer = FakeTrainer()
    async with api_client(tmp_path, trainer) as client:
        created = await create_job(client, suffix="demo")
        assert created.status_code == 200, created.text
        job = created.json()
        assert job["object"] == "fine_tuning.job" and job["id"].startswith("ftjob-")
        assert job["hyperparameters"] == {
            "batch_size": "auto",
            "learning_rate_multiplier": "auto",
            "n_epochs": "auto",
        }
        done = await wait_for(client, job["id"], "succeeded", "failed")
        assert done["status"] == "succeeded", done["error"]
        model = f"ft:{BASE}:stamen:demo:{job['id']}"
        assert done["fine_tuned_model"] == model
        # "auto" is reported as the trainer resolved it, in both places
        resolved = {"batch_size": 4, "learning_rate_multiplier": 1.0, "n_epochs": 2}
        assert done["hyperparameters"] == resolved
        assert done["method"]["supervised"]["hyperparameters"] == resolved
        assert done["trained_tokens"] == 40 and done["finished_at"] is not None

        events = await events_of(client, job["id"])
        metrics = [e for e in events if e["type"] == "metrics"]
        assert [e["data"]["step"] for e in metrics] == [1, 2, 3, 4]
        assert metrics[1]["data"]["train_loss"] == 0.5 and metrics[1]["data"]["valid_loss"] == 1.0
        assert all(e["object"] == "fine_tuning.job.event" for e in events)
        assert events[0]["message"].startswith("Created fine-tuning job")
        assert events[-1]["message"] == "The job has successfully completed"

        checkpoints = (await client.get(f"/v1/fine_tuning/jobs/{job['id']}/checkpoints")).json()
        steps = [c["step_number"] for c in checkpoints["data"]]
        assert steps == [4, 2]  # newest first, one per epoch
        ckpt = checkpoints["data"][1]
        assert ckpt["fine_tuned_model_checkpoint"] == f"{model}:ckpt-step-2"
        assert (
            ckpt["metrics"]["train_loss"] == 0.5 and ckpt["object"] == "fine_tuning.job.checkpoint"
        )

        models = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        assert {BASE, model, f"{model}:ckpt-step-2", f"{model}:ckpt-step-4"} <= set(models)
        retrieved = (await client.get(f"/v1/models/{model}")).json()
        assert retrieved["id"] == model and retrieved["owned_by"] == "stamen"

        (result_id,) = done["result_files"]
        result = (await client.get(f"/v1/files/{result_id}")).json()
        assert result["purpose"] == "fine-tune-results"
        content = (await client.get(f"/v1/files/{result_id}/content")).text
        assert content.splitlines() == ["1,1.0", "2,0.5", "3,0.3333333333333333", "4,0.25"]
        # the swarm and readiness describe the base model only (tuned ones run on it)
        swarm = (await client.get("/v1/swarm")).json()
        assert [m["model"] for m in swarm["models"]] == [BASE]


async def test_the_openai_sdk_creates_lists_and_follows_a_job(tmp_path: Path) -> None:
    async with api_client(tmp_path, FakeTrainer()) as client:
        sdk = openai.AsyncOpenAI(
            base_url=f"{client.base_url}/v1", api_key="unused", http_client=client
        )
        uploaded = await sdk.files.create(
            file=("train.jsonl", io.BytesIO(TRAIN_LINES)), purpose="fine-tune"
        )
        job = await sdk.fine_tuning.jobs.create(
            model=BASE,
            training_file=uploaded.id,
            method={
                "type": "supervised",
                "supervised": {
                    "hyperparameters": {"n_epochs": 1},
                    "tuning_mode": "deep_ptune",
                    "pre_seq_len": 4,
                },
            },
        )
        await wait_for(client, job.id, "succeeded")
        job = await sdk.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded" and job.hyperparameters.n_epochs == 1
        assert job.fine_tuned_model == f"ft:{BASE}:stamen::{job.id}"
        listed = await sdk.fine_tuning.jobs.list()
        assert [j.id for j in listed.data] == [job.id]
        events = await sdk.fine_tuning.jobs.list_events(job.id, limit=2)
        assert len(events.data) == 2 and events.has_more
        checkpoints = await sdk.fine_tuning.jobs.checkpoints.list(job.id)
        assert [c.step_number for c in checkpoints.data] == [2]


async def test_tuning_mode_and_prefix_length_reach_the_trainer(tmp_path: Path) -> None:
    trainer = FakeTrainer()
    async with api_client(tmp_path, trainer) as client:
        method = {
            "type": "supervised",
            "supervised": {"tuning_mode": "deep_ptune", "pre_seq_len": 8},
        }
        job = (await create_job(client, method=method, seed=7)).json()
        await wait_for(client, job["id"], "succeeded")
    request, resume = trainer.calls[0]
    assert (request.tuning_mode, request.pre_seq_len, request.seed) == ("deep_ptune", 8, 7)
    assert resume is None and request.workdir.is_dir()
    assert request.training_file.read_bytes() == TRAIN_LINES


async def test_legacy_hyperparameters_are_used(tmp_path: Path) -> None:
    trainer = FakeTrainer()
    async with api_client(tmp_path, trainer) as client:
        body = {"hyperparameters": {"n_epochs": 3, "batch_size": 2}}
        job = (await create_job(client, **body)).json()
        done = await wait_for(client, job["id"], "succeeded")
    assert trainer.calls[0][0].hyperparameters["n_epochs"] == 3
    assert done["hyperparameters"]["n_epochs"] == 3 and done["trained_tokens"] == 60


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": -1}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"learning_rate_multiplier": 0}}, None),
        ({"hyperparameters": {"learning_rate_multiplier": "fast"}}, None),
        ({"method": {"type": "dpo"}}, "method.type"),
        ({"method": {"type": "supervised", "supervised": {"tuning_mode": "lora"}}}, None),
        ({"suffix": "a:b"}, "suffix"),
        ({"integrations": [{"type": "wandb"}]}, "integrations"),
        (
            {"hyperparameters": {"n_epochs": 1}, "method": {"type": "supervised"}},
            "hyperparameters",
        ),
    ],
)
async def test_bad_job_requests_are_400_naming_the_field(
    tmp_path: Path, body: dict[str, Any], param: str | None
) -> None:
    async with api_client(tmp_path, FakeTrainer()) as client:
        response = await create_job(client, **body)
        listed = (await client.get("/v1/fine_tuning/jobs")).json()
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    assert listed["data"] == []


async def test_unknown_model_file_and_job_are_404(tmp_path: Path) -> None:
    async with api_client(tmp_path, FakeTrainer()) as client:
        no_model = await create_job(client, model="nope")
        no_file = await client.post(
            "/v1/fine_tuning/jobs", json={"model": BASE, "training_file": "file-nope"}
        )
        paths = ["", "/events", "/checkpoints"]
        no_job = [await client.get(f"/v1/fine_tuning/jobs/ftjob-nope{p}") for p in paths]
        no_cancel = await client.post("/v1/fine_tuning/jobs/ftjob-nope/cancel")
    assert no_model.status_code == 404 and no_model.json()["error"]["code"] == "model_not_found"
    assert no_file.status_code == 404 and no_file.json()["error"]["param"] == "training_file"
    assert all(r.status_code == 404 for r in [*no_job, no_cancel])
    assert no_job[0].json()["error"]["code"] == "job_not_found"


async def test_a_results_file_cannot_train(tmp_path: Path) -> None:
    async with api_client(tmp_path, FakeTrainer()) as client:
        job = (await create_job(client, hyperparameters={"n_epochs": 1})).json()
        (results,) = (await wait_for(client, job["id"], "succeeded"))["result_files"]
        response = await client.post(
            "/v1/fine_tuning/jobs", json={"model": BASE, "training_file": results}
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_file_purpose"


async def test_a_trainer_failure_fails_the_job_with_its_code(tmp_path: Path) -> None:
    failure = JobFailure("invalid_training_file", "line 3: not JSON", "training_file")
    async with api_client(tmp_path, FakeTrainer(fail=failure)) as client:
        job = (await create_job(client)).json()
        done = await wait_for(client, job["id"], "failed")
        events = await events_of(client, job["id"])
        models = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
    assert done["error"] == {
        "code": "invalid_training_file",
        "message": "line 3: not JSON",
        "param": "training_file",
    }
    assert done["fine_tuned_model"] is None and done["result_files"] == []
    assert events[-1]["level"] == "error" and "line 3" in events[-1]["message"]
    assert models == [BASE]


async def test_an_unexpected_trainer_error_is_an_internal_error_of_the_job(
    tmp_path: Path,
) -> None:
    trainer = FakeTrainer()
    trainer.fail = RuntimeError("boom")  # type: ignore[assignment]
    async with api_client(tmp_path, trainer) as client:
        job = (await create_job(client)).json()
        done = await wait_for(client, job["id"], "failed")
        health = await client.get("/livez")
    assert done["error"]["code"] == "internal_error" and "boom" in done["error"]["message"]
    assert health.status_code == 200


async def test_cancel_a_running_job_and_a_queued_one(tmp_path: Path) -> None:
    trainer = FakeTrainer(hold_after=1)
    async with api_client(tmp_path, trainer) as client:
        running = (await create_job(client)).json()
        queued = (await create_job(client)).json()
        await asyncio.wait_for(trainer.held.wait(), 5)
        assert (await wait_for(client, running["id"], "running"))["trained_tokens"] == 10
        assert (await client.get(f"/v1/fine_tuning/jobs/{queued['id']}")).json()["status"] == (
            "queued"  # one job at a time by default
        )
        cancelled_queued = await client.post(f"/v1/fine_tuning/jobs/{queued['id']}/cancel")
        assert cancelled_queued.json()["status"] == "cancelled"
        cancelled = await client.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel")
        assert cancelled.json()["status"] == "cancelled"
        again = await client.post(f"/v1/fine_tuning/jobs/{running['id']}/cancel")
        assert again.status_code == 400
        events = await events_of(client, running["id"])
        third = (await create_job(client, hyperparameters={"n_epochs": 1})).json()
        trainer.hold_after = None
        assert (await wait_for(client, third["id"], "succeeded"))["status"] == "succeeded"
    assert events[-1]["message"] == "Fine-tuning job cancelled"
    assert [call[0].job_id for call in trainer.calls] == [running["id"], third["id"]]


async def test_inference_routes_stay_responsive_while_a_job_runs(tmp_path: Path) -> None:
    trainer = FakeTrainer(hold_after=1)
    async with api_client(tmp_path, trainer) as client:
        await create_job(client)
        await asyncio.wait_for(trainer.held.wait(), 5)
        models = await asyncio.wait_for(client.get("/v1/models"), 1)
        ready = await asyncio.wait_for(client.get("/readyz"), 1)
    assert models.status_code == 200 and ready.status_code == 200


async def test_no_trainer_means_jobs_are_refused(tmp_path: Path) -> None:
    async with api_client(tmp_path, None) as client:
        response = await create_job(client)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "fine_tuning_disabled"


async def test_a_restarted_server_keeps_its_jobs_and_resumes_a_running_one(
    tmp_path: Path,
) -> None:
    first = FakeTrainer()
    async with api_client(tmp_path, first) as client:
        done = (await create_job(client, hyperparameters={"n_epochs": 1})).json()
        await wait_for(client, done["id"], "succeeded")
        first.hold_after = 2
        running = (await create_job(client, suffix="resumed")).json()
        await asyncio.wait_for(first.held.wait(), 5)  # the checkpoint at step 2 is written
        queued = (await create_job(client, hyperparameters={"n_epochs": 1})).json()
        file_ids = [f["id"] for f in (await client.get("/v1/files")).json()["data"]]
    second = FakeTrainer()
    async with api_client(tmp_path, second) as client:
        models = [m["id"] for m in (await client.get("/v1/models")).json()["data"]]
        assert f"ft:{BASE}:stamen::{done['id']}" in models  # served again from the store
        assert [f["id"] for f in (await client.get("/v1/files")).json()["data"]] == file_ids
        jobs = (await client.get("/v1/fine_tuning/jobs")).json()["data"]
        assert [j["id"] for j in jobs] == [queued["id"], running["id"], done["id"]]
        resumed = await wait_for(client, running["id"], "succeeded")
        await wait_for(client, queued["id"], "succeeded")
        events = await events_of(client, running["id"])
    (request, resume), (queued_request, queued_resume) = second.calls  # in their order
    assert queued_request.job_id == queued["id"] and queued_resume is None
    assert request.job_id == running["id"]
    assert resume is not None and resume.step == 2 and resume.prompts_path.exists()
    assert resumed["fine_tuned_model"] == f"ft:{BASE}:stamen:resumed:{running['id']}"
    messages = [e["message"] for e in events]
    assert any("resumes at restart" in m for m in messages)
    assert "Resuming from the checkpoint at step 2" in messages
    steps = [e["data"]["step"] for e in events if e["type"] == "metrics"]
    assert steps == [1, 2, 3, 4]  # steps 1-2 before the restart, 3-4 after


async def test_without_a_data_dir_the_store_is_temporary() -> None:
    async with api_client(None, FakeTrainer()) as client:
        uploaded = (await upload(client)).json()
        listed = (await client.get("/v1/files")).json()["data"]
        data_dir = client.app.state.store.data_dir
        assert (data_dir / "files" / uploaded["id"]).is_file()
    assert [f["id"] for f in listed] == [uploaded["id"]]
    assert not data_dir.exists()  # removed with the app: nothing left in any home directory


@pytest.mark.slow
async def test_the_real_trainer_tunes_smollm2_into_a_model_chat_completions_serve(
    tmp_path: Path,
) -> None:
    from stamen.api.tuning import SwarmTrainer
    from tests.unit.test_api_app import load_engine_once

    engine = load_engine_once()
    lines = [
        {
            "messages": [
                {"role": "user", "content": "Say hi"},
                {"role": "assistant", "content": "hi"},
            ]
        }
    ] * 2
    settings = ServingSettings(fine_tuning=FineTuningSettings(data_dir=tmp_path))
    app = create_app(settings, static_engines(engine), trainer=SwarmTrainer())
    async with AsyncTestClient(app) as client:
        content = "\n".join(json.dumps(line) for line in lines).encode()
        file_id = (await upload(client, content)).json()["id"]
        hyperparameters = {"n_epochs": 1, "batch_size": 2}
        method = {
            "type": "supervised",
            "supervised": {"hyperparameters": hyperparameters, "pre_seq_len": 2},
        }
        body = {"model": engine.model_id, "training_file": file_id, "method": method}
        job = (await client.post("/v1/fine_tuning/jobs", json=body)).json()
        for _ in range(600):
            done = (await client.get(f"/v1/fine_tuning/jobs/{job['id']}")).json()
            if done["status"] in ("succeeded", "failed"):
                break
            await asyncio.sleep(0.1)
        assert done["status"] == "succeeded", done["error"]
        chat = await client.post(
            "/v1/chat/completions",
            json={
                "model": done["fine_tuned_model"],
                "messages": [{"role": "user", "content": "Say hi"}],
                "max_tokens": 3,
                "temperature": 0,
            },
        )
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == done["fine_tuned_model"]


def test_cli_fine_tuning_settings_come_from_flags_then_environment_then_defaults() -> None:
    from stamen.api.cli import parse_settings

    model = ["--model", "m=/nowhere"]
    default = parse_settings(model, {"HOME": "/home/u"}).serving.fine_tuning
    assert default.data_dir == Path("/home/u/.local/share/stamen") and default.owner == "stamen"
    assert default.max_file_bytes == 512 << 20 and default.max_running_jobs == 1
    xdg = parse_settings(model, {"HOME": "/home/u", "XDG_DATA_HOME": "/xdg"}).serving.fine_tuning
    assert xdg.data_dir == Path("/xdg/stamen")
    environ = {"STAMEN_DATA_DIR": "/env", "STAMEN_OWNER": "acme", "STAMEN_MAX_FILE_BYTES": "9"}
    from_env = parse_settings(model, environ).serving.fine_tuning
    assert (from_env.data_dir, from_env.owner, from_env.max_file_bytes) == (Path("/env"), "acme", 9)
    flags = [*model, "--data-dir", "/flag", "--max-running-jobs", "2"]
    from_flags = parse_settings(flags, environ).serving.fine_tuning
    assert from_flags.data_dir == Path("/flag") and from_flags.max_running_jobs == 2
    with pytest.raises(SystemExit):
        parse_settings([*model, "--owner", "a:b"], {})


async def test_a_fine_tuned_model_cannot_be_tuned_again(tmp_path: Path) -> None:
    async with api_client(tmp_path, FakeTrainer()) as client:
        job = (await create_job(client, hyperparameters={"n_epochs": 1})).json()
        model = (await wait_for(client, job["id"], "succeeded"))["fine_tuned_model"]
        response = await create_job(client, model=model)
    assert response.status_code == 400
    assert response.json()["error"] == {
        "message": f"`{model}` is a fine-tuned model; tune its base model instead.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_supported",
    }
