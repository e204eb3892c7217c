"""The jobs page (`/jobs`) against the embedded local swarm: the empty state, then a
short real fine-tuning job (through the API) with its status and loss curve; its tuned
model is then offered on the chat page."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.browser.conftest import record, shoot
from tests.integration.test_api_lifecycle import Api

pytestmark = pytest.mark.browser

DATA = Path(__file__).parents[1] / "data" / "finetune"
MODEL = "SmolLM2-135M-Instruct"
EPOCHS, BATCH, TRAIN_EXAMPLES = 2, 4, 16  # 8 steps
JOB_TIMEOUT_S = 400.0


def upload(api: Api, name: str, count: int) -> str:
    lines = (DATA / name).read_text().splitlines()[:count]
    files = {"file": (name, ("\n".join(lines) + "\n").encode(), "application/jsonl")}
    response = httpx.post(f"{api.base_url}/v1/files", data={"purpose": "fine-tune"},
                          files=files, timeout=60)  # fmt: skip
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def create_short_job(api: Api) -> str:
    body = {
        "model": MODEL,
        "training_file": upload(api, "train.jsonl", TRAIN_EXAMPLES),
        "validation_file": upload(api, "valid.jsonl", 8),
        "suffix": "browser",
        "seed": 3,
        "method": {"type": "supervised", "supervised": {
            "hyperparameters": {"n_epochs": EPOCHS, "batch_size": BATCH},
            "tuning_mode": "ptune", "pre_seq_len": 8}},
    }  # fmt: skip
    response = httpx.post(f"{api.base_url}/v1/fine_tuning/jobs", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def job_status(api: Api, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{api.base_url}/v1/fine_tuning/jobs/{job_id}", timeout=30)
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.timeout(900)
def test_jobs_page_shows_no_jobs_then_a_job_and_its_loss_curve(page: Any, swarm_api: Api) -> None:
    page.goto(f"{swarm_api.base_url}/jobs")
    page.wait_for_selector("[data-testid=no-jobs]", timeout=15_000)
    assert "No fine-tuning jobs exist yet" in page.inner_text("main")
    shoot(page, "jobs-empty", narrow=False)

    began = time.monotonic()
    job_id = create_short_job(swarm_api)
    card = page.locator(f"section.job[data-job-id='{job_id}']")
    card.wait_for(timeout=15_000)  # the page refreshes by itself
    while (job := job_status(swarm_api, job_id))["status"] != "succeeded":
        assert job["status"] not in ("failed", "cancelled"), json.dumps(job)
        assert time.monotonic() - began < JOB_TIMEOUT_S, job["status"]
        time.sleep(1.0)
    record("seconds a 8-step job took on the embedded swarm", time.monotonic() - began)
    status = card.locator("[data-testid=job-status]")
    status.filter(has_text="succeeded").wait_for(timeout=15_000)
    plot = card.locator("[data-testid=loss-plot]")
    assert plot.locator("path.series-train").count() == 1
    assert plot.locator("path.series-valid").count() == 1
    assert "training loss" in plot.inner_text() and "validation loss" in plot.inner_text()
    assert job["fine_tuned_model"] in card.inner_text()
    assert page.errors == []
    shoot(page, "jobs")

    page.goto(f"{swarm_api.base_url}/chat")
    tuned = page.locator("#model optgroup[label='Fine-tuned'] option")
    tuned.first.wait_for(state="attached", timeout=15_000)
    offered = {option.get_attribute("value") for option in tuned.all()}
    assert job["fine_tuned_model"] in offered  # beside its checkpoints' models


def fake_jobs(route: Any) -> None:
    url = route.request.url
    if "/events" in url:
        events = [{"id": f"ev-{s}", "created_at": 1_700_000_000 + s, "level": "info",
                   "message": f"Step {s}/60: training loss={2.5 / (1 + s / 8):.4f}",
                   "type": "metrics", "object": "fine_tuning.job.event",
                   "data": {"step": s, "total_steps": 60, "train_loss": 2.5 / (1 + s / 8),
                            **({"valid_loss": 2.7 / (1 + s / 10)} if s % 5 == 0 else {})}}
                  for s in range(1, 43)]  # fmt: skip
        body = {"object": "list", "data": events[::-1], "has_more": False}
    else:
        job = {"id": "ftjob-running", "object": "fine_tuning.job", "created_at": 1_700_000_000,
               "error": None, "fine_tuned_model": None, "finished_at": None, "model": MODEL,
               "hyperparameters": {"n_epochs": 3, "batch_size": 8,
                                   "learning_rate_multiplier": 1.0},
               "organization_id": "stamen", "result_files": [], "seed": 1,
               "status": "running", "trained_tokens": None, "training_file": "file-1",
               "validation_file": "file-2", "method": {"type": "supervised"},
               "user_provided_suffix": "reviews"}  # fmt: skip
        body = {"object": "list", "data": [job], "has_more": False}
    route.fulfill(status=200, content_type="application/json", body=json.dumps(body))


def test_a_running_job_served_by_interception_plots_its_curve(page: Any, swarm_api: Api) -> None:
    page.route("**/v1/fine_tuning/jobs**", fake_jobs)
    page.goto(f"{swarm_api.base_url}/jobs")
    card = page.locator("section.job[data-job-id='ftjob-running']")
    card.wait_for(timeout=15_000)
    assert card.locator("[data-testid=job-status]").inner_text() == "running"
    path = card.locator("path.series-train").get_attribute("d") or ""
    assert path.count("L") == 41  # 42 steps: one move, 41 lines
    assert "Step 42/60" in card.inner_text()
    shoot(page, "jobs-running")
