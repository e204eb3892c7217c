"""`/v1/fine_tuning/jobs`: create, list, retrieve and cancel jobs, list their events and
checkpoints, as OpenAI's API does. Thin: parse, hand over to the `JobManager`, shape.

POST /v1/fine_tuning/jobs                        create (`ft_schemas.FineTuningJobRequest`)
GET  /v1/fine_tuning/jobs                        `after`, `limit` (1..100), newest first
GET  /v1/fine_tuning/jobs/{id}                   the job
POST /v1/fine_tuning/jobs/{id}/cancel            cancel; answers the job
GET  /v1/fine_tuning/jobs/{id}/events            `after`, `limit`, newest first
GET  /v1/fine_tuning/jobs/{id}/checkpoints       `after`, `limit`, newest first

This module knows nothing about training or SQLite beyond the store's listing calls.
"""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, QueryParameter

from stamen.api import schemas as s
from stamen.api.errors import invalid_request
from stamen.api.ft_schemas import (
    CheckpointList,
    EventList,
    FineTuningJob,
    FineTuningJobRequest,
    JobCheckpoint,
    JobList,
)
from stamen.api.jobs import JobManager
from stamen.api.store import Database, Page, UnknownCursor

Jobs = NamedDependency[JobManager]
AnyRequest = Request[Any, Any, Any]
Limit = Annotated[int, QueryParameter(ge=1, le=100)]


async def _page(call: Any, after: str | None) -> Page:
    try:
        page: Page = await call
    except UnknownCursor:
        raise invalid_request(f"No item {after} to list after.", param="after") from None
    return page


@post(
    "/v1/fine_tuning/jobs",
    status_code=200,
    request_body=FineTuningJobRequest,
    response_body=FineTuningJob,
)
async def create_job(request: AnyRequest, jobs: Jobs) -> FineTuningJob:
    """Create a fine-tuning job; it runs in the background (poll it, or its events)."""
    body = s.decode_request(await request.body(), FineTuningJobRequest)
    return await jobs.create(body)


@get("/v1/fine_tuning/jobs", response_body=JobList)
async def list_jobs(jobs: Jobs, after: FromQuery[str | None] = None, limit: Limit = 20) -> JobList:
    """List fine-tuning jobs, newest first."""
    page = await _page(jobs.store.run(Database.list_jobs, after, limit), after)
    return JobList(page.items, page.has_more)  # type: ignore[arg-type]


@get("/v1/fine_tuning/jobs/{fine_tuning_job_id:str}", response_body=FineTuningJob)
async def retrieve_job(jobs: Jobs, fine_tuning_job_id: FromPath[str]) -> FineTuningJob:
    """Retrieve a fine-tuning job."""
    return await jobs.get(fine_tuning_job_id)


@post(
    "/v1/fine_tuning/jobs/{fine_tuning_job_id:str}/cancel",
    status_code=200,
    response_body=FineTuningJob,
)
async def cancel_job(jobs: Jobs, fine_tuning_job_id: FromPath[str]) -> FineTuningJob:
    """Cancel a job: a queued one at once, a running one at its next step."""
    return await jobs.cancel(fine_tuning_job_id)


@get("/v1/fine_tuning/jobs/{fine_tuning_job_id:str}/events", response_body=EventList)
async def list_events(
    jobs: Jobs,
    fine_tuning_job_id: FromPath[str],
    after: FromQuery[str | None] = None,
    limit: Limit = 20,
) -> EventList:
    """A job's events (messages and per-step metrics), newest first."""
    await jobs.get(fine_tuning_job_id)
    call = jobs.store.run(Database.list_events, fine_tuning_job_id, after, limit)
    page = await _page(call, after)
    return EventList(page.items, page.has_more)  # type: ignore[arg-type]


@get("/v1/fine_tuning/jobs/{fine_tuning_job_id:str}/checkpoints", response_body=CheckpointList)
async def list_checkpoints(
    jobs: Jobs,
    fine_tuning_job_id: FromPath[str],
    after: FromQuery[str | None] = None,
    limit: Limit = 10,
) -> CheckpointList:
    """A job's checkpoints (one per epoch, each served as a model), newest first."""
    await jobs.get(fine_tuning_job_id)
    call = jobs.store.run(Database.list_checkpoints, fine_tuning_job_id, after, limit)
    page = await _page(call, after)
    data: list[JobCheckpoint] = page.items  # type: ignore[assignment]
    first, last = (data[0].id, data[-1].id) if data else (None, None)
    return CheckpointList(data, first, last, page.has_more)


fine_tuning_handlers = [
    create_job,
    list_jobs,
    retrieve_job,
    cancel_job,
    list_events,
    list_checkpoints,
]
