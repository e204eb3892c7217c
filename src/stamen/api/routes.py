"""HTTP endpoints; thin: parse, pick the engine, hand over to serving, shape the answer.

GET  /v1/models, /v1/models/{model_id}     the served models
POST /v1/chat/completions, /v1/completions  generation (JSON or SSE stream)
GET  /v1/swarm                              which hosts serve which blocks
GET  /health                                200 when every model can be served, else 503
GET  /metrics                               Prometheus text format
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath

from stamen.api import responses
from stamen.api import schemas as s
from stamen.api.serving import chat_job, check_ready, completion_jobs
from stamen.api.state import ApiState
from stamen.api.streaming import sse_stream

Api = NamedDependency[ApiState]


def _model(api: ApiState, engine_id: str) -> s.Model:
    return s.Model(id=engine_id, created=api.started_at, owned_by="stamen")


@get("/v1/models", sync_to_thread=False)
def list_models(api: Api) -> s.ModelList:
    return s.ModelList(data=[_model(api, model_id) for model_id in api.engines])


@get("/v1/models/{model_id:path}", sync_to_thread=False)
def retrieve_model(api: Api, model_id: FromPath[str]) -> s.Model:
    engine = api.engine(model_id.lstrip("/"))
    return _model(api, engine.model_id)


@post("/v1/chat/completions", status_code=200)
async def create_chat_completion(request: Request[Any, Any, Any], api: Api) -> Response[Any]:
    body = s.decode_request(await request.body(), s.ChatCompletionRequest)
    engine = api.engine(body.model)
    check_ready(engine, api.settings.retry_after_s)
    job = chat_job(body, engine, max_n=api.settings.max_n)
    release = api.admit()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = responses.chat_chunks(
            engine, job, include_usage=include_usage, metrics=api.metrics
        )
        return sse_stream(chunks, keepalive_s=api.settings.keepalive_s, on_close=release)
    try:
        result = await responses.chat_completion(engine, job, api.metrics)
    finally:
        release()
    return Response(result)


@post("/v1/completions", status_code=200)
async def create_completion(request: Request[Any, Any, Any], api: Api) -> Response[Any]:
    body = s.decode_request(await request.body(), s.CompletionRequest)
    engine = api.engine(body.model)
    check_ready(engine, api.settings.retry_after_s)
    jobs = completion_jobs(body, engine, max_n=api.settings.max_n)
    release = api.admit()
    echo = bool(body.echo)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = responses.completion_chunks(
            engine, jobs, echo=echo, include_usage=include_usage, metrics=api.metrics
        )
        return sse_stream(chunks, keepalive_s=api.settings.keepalive_s, on_close=release)
    try:
        result = await responses.completion(engine, jobs, echo=echo, metrics=api.metrics)
    finally:
        release()
    return Response(result)


@get("/v1/swarm", sync_to_thread=False)
def swarm(api: Api) -> dict[str, Any]:
    return {
        "object": "swarm",
        "ready": api.ready(),
        "models": [msgspec.to_builtins(e.swarm_snapshot()) for e in api.engines.values()],
    }


@get("/health", sync_to_thread=False)
def health(api: Api) -> Response[dict[str, Any]]:
    ready = api.ready()
    headers = {} if ready else {"Retry-After": str(api.settings.retry_after_s)}
    return Response(
        {"status": "ok" if ready else "unavailable", "models": list(api.engines)},
        status_code=200 if ready else 503,
        headers=headers,
    )


@get("/metrics", sync_to_thread=False, media_type="text/plain; version=0.0.4")
def metrics(api: Api) -> bytes:
    return api.metrics.render()


route_handlers = [
    list_models,
    retrieve_model,
    create_chat_completion,
    create_completion,
    swarm,
    health,
    metrics,
]
