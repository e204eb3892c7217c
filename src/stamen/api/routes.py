"""HTTP endpoints; thin: parse, pick the engine, hand over to serving, shape the answer.

GET  /v1/models, /v1/models/{model_id}     the served models, base and fine-tuned
POST /v1/chat/completions, /v1/completions  generation (JSON or SSE stream)
POST /v1/files; GET /v1/files               upload (multipart), list    (`files.py`)
GET, DELETE /v1/files/{file_id}             retrieve, delete
GET  /v1/files/{file_id}/content            the bytes
POST /v1/fine_tuning/jobs; GET ...          create, list                (`fine_tuning.py`)
GET  /v1/fine_tuning/jobs/{id}              retrieve
POST /v1/fine_tuning/jobs/{id}/cancel       cancel
GET  /v1/fine_tuning/jobs/{id}/events       events: messages and per-step metrics
GET  /v1/fine_tuning/jobs/{id}/checkpoints  one per epoch, each served as a model
POST /v1/responses; GET, DELETE .../{id}     the Responses API          (`responses_api.py`)
GET  /v1/responses/{id}/input_items         a stored response's input
GET  /v1/swarm                              which hosts serve which blocks
GET  /v1/swarm/history                      the monitor's samples of the last minutes
GET  /livez, /health/live                   liveness: 200 while the process serves
GET  /readyz, /health/ready, /health        readiness: 200 when a request sent now would
                                            be served, else 503 + Retry-After + reasons
GET  /metrics                               Prometheus text format
GET  /schema/openapi.json                   the OpenAPI document (`stamen.api.openapi`)

A generation ends early when its client disconnects or the server stops: streams
through `sse_stream`, whole completions through `unless_abandoned`.
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery

from stamen.api import responses
from stamen.api import schemas as s
from stamen.api.cancellation import unless_abandoned
from stamen.api.errors import invalid_request
from stamen.api.files import file_handlers
from stamen.api.fine_tuning import fine_tuning_handlers
from stamen.api.openapi import OPENAPI_PATH, openapi_document
from stamen.api.pages.history import SwarmHistory
from stamen.api.responses_api import response_handlers
from stamen.api.serving import chat_job, check_ready, completion_jobs
from stamen.api.state import ApiState
from stamen.api.streaming import sse_stream

Api = NamedDependency[ApiState]
History = NamedDependency[SwarmHistory]
AnyRequest = Request[Any, Any, Any]


def _stream(api: ApiState, chunks: AsyncIterator[dict], release: Callable[[], None]) -> Any:
    return sse_stream(
        chunks,
        keepalive_s=api.settings.keepalive_s,
        on_close=release,
        stopping=api.stopping,
        retry_after_s=api.settings.retry_after_s,
    )


async def _whole(
    api: ApiState,
    request: AnyRequest,
    work: Coroutine[Any, Any, Any],
    release: Callable[[], None],
) -> Response[Any]:
    try:
        result = await unless_abandoned(
            work,
            receive=request.receive,
            stopping=api.stopping,
            retry_after_s=api.settings.retry_after_s,
        )
    finally:
        release()
    return Response(result)


def _model(api: ApiState, engine_id: str) -> s.Model:
    tuned = api.tuned.get(engine_id)
    if tuned is not None:
        return s.Model(id=engine_id, created=tuned.created_at, owned_by=tuned.owned_by)
    return s.Model(id=engine_id, created=api.started_at, owned_by="stamen")


@get("/v1/models", sync_to_thread=False, response_body=s.ModelList)
def list_models(api: Api) -> s.ModelList:
    """List the served models."""
    return s.ModelList(data=[_model(api, model_id) for model_id in api.engines])


@get("/v1/models/{model_id:path}", sync_to_thread=False, response_body=s.Model)
def retrieve_model(api: Api, model_id: FromPath[str]) -> s.Model:
    """Retrieve one served model."""
    engine = api.engine(model_id.lstrip("/"))
    return _model(api, engine.model_id)


@post(
    "/v1/chat/completions",
    status_code=200,
    request_body=s.ChatCompletionRequest,
    response_body=s.ChatCompletion,
    streams=True,
)
async def create_chat_completion(request: AnyRequest, api: Api) -> Response[Any]:
    """Create a chat completion (JSON, or server-sent events with `stream: true`)."""
    body = s.decode_request(await request.body(), s.ChatCompletionRequest)
    engine = api.engine(body.model)
    check_ready(engine, api.settings.retry_after_s)
    # Preparation renders the prompt and compiles grammars (up to a second for many
    # tools): in a worker thread, so other streams keep flowing meanwhile.
    job = await asyncio.to_thread(
        chat_job,
        body,
        engine,
        max_n=api.settings.max_n,
        default_max_tokens=api.settings.default_max_tokens,
    )
    release = api.admit()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = responses.chat_chunks(
            engine, job, include_usage=include_usage, metrics=api.metrics
        )
        return _stream(api, chunks, release)
    return await _whole(api, request, responses.chat_completion(engine, job, api.metrics), release)


@post(
    "/v1/completions",
    status_code=200,
    request_body=s.CompletionRequest,
    response_body=s.Completion,
    streams=True,
)
async def create_completion(request: AnyRequest, api: Api) -> Response[Any]:
    """Create a text completion (JSON, or server-sent events with `stream: true`)."""
    body = s.decode_request(await request.body(), s.CompletionRequest)
    engine = api.engine(body.model)
    check_ready(engine, api.settings.retry_after_s)
    jobs = await asyncio.to_thread(completion_jobs, body, engine, max_n=api.settings.max_n)
    release = api.admit()
    echo = bool(body.echo)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = responses.completion_chunks(
            engine, jobs, echo=echo, include_usage=include_usage, metrics=api.metrics
        )
        return _stream(api, chunks, release)
    work = responses.completion(engine, jobs, echo=echo, metrics=api.metrics)
    return await _whole(api, request, work, release)


@get("/v1/swarm", sync_to_thread=False)
def swarm(api: Api) -> dict[str, Any]:
    """Which hosts serve which blocks of each model, and whether each model can serve now."""
    return {
        "object": "swarm",
        "ready": api.ready(),
        "models": [
            {**msgspec.to_builtins(e.swarm_snapshot()), "ready": e.ready()}
            for e in api.base_engines()
        ],
    }


@get("/v1/swarm/history", sync_to_thread=False)
def swarm_history(history: History, since: FromQuery[float | None] = None) -> dict[str, Any]:
    """Samples of the swarm over the last minutes, oldest first (after `since`, Unix s)."""
    if since is not None and not math.isfinite(since):
        raise invalid_request("`since` must be a finite number of Unix seconds.", param="since")
    return {
        "object": "swarm.history",
        "interval_s": history.interval_s,
        "window_s": history.window_s,
        "data": msgspec.to_builtins(history.samples(since)),
    }


@get(["/livez", "/health/live"], sync_to_thread=False)
def live() -> dict[str, str]:
    """Liveness: 200 while the process serves HTTP (restart it if this fails)."""
    return {"status": "alive"}


@get(["/readyz", "/health/ready", "/health"], sync_to_thread=False)
def ready(api: Api) -> Response[dict[str, Any]]:
    """Readiness: 200 when a request sent now would be served, else 503 with the reasons."""
    reasons = api.unready_reasons()
    headers = {"Retry-After": str(api.settings.retry_after_s)} if reasons else {}
    return Response(
        {
            "status": "unavailable" if reasons else "ready",
            "reasons": reasons,
            "models": {e.model_id: e.ready() for e in api.base_engines()},
        },
        status_code=503 if reasons else 200,
        headers=headers,
    )


@get("/metrics", sync_to_thread=False, media_type="text/plain; version=0.0.4")
def metrics(api: Api) -> bytes:
    """Prometheus metrics, text format."""
    return api.metrics.render()


@functools.cache
def _document() -> dict[str, Any]:
    return openapi_document(route_handlers, title="Stamen OpenAI-compatible API", version="1")


@get(OPENAPI_PATH, sync_to_thread=False, include_in_schema=False)
def openapi() -> dict[str, Any]:
    """The OpenAPI document of this server."""
    return _document()


route_handlers = [
    list_models,
    retrieve_model,
    create_chat_completion,
    create_completion,
    swarm,
    swarm_history,
    live,
    ready,
    metrics,
    openapi,
    *file_handlers,
    *fine_tuning_handlers,
    *response_handlers,
]
