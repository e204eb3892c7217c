"""The Litestar application: `create_app(settings, engines, trainer=...)`.

`engines` is a factory of an async context manager yielding the engines to serve; the
app's lifespan enters it at startup and leaves it at shutdown, so whoever builds the app
(the CLI, a test) decides what runs the model and the app owns its lifetime. The typed
`ApiState` reaches handlers through the `api` dependency.

The lifespan also opens the store (files, jobs, stored responses) under
`settings.fine_tuning.data_dir` (a temporary directory when None, removed at shutdown)
and runs the `JobManager` with the given `Trainer` (None: creating a job is refused) and
`tuned_engines` (default: the lazily imported `stamen.api.tuned.tuned_engine`). Handlers
reach them through the `files` (the `Store`, also named `store`) and `jobs`
dependencies. Entering, the manager serves every stored tuned model and queues
unfinished jobs again; leaving, it asks running trainers to stop.

API keys, when configured, guard every `/v1/` route (`Authorization: Bearer KEY`);
the probes (`/livez`, `/readyz`, `/health...`), `/metrics` and the OpenAPI document stay
open for load balancers, scrapers and tools, and so do the web pages (`stamen.api.pages`:
`/`, `/chat`, `/jobs`, `/static/...`), which hold no data and ask the visitor for a key.

The lifespan also runs the monitor's `SwarmHistory` sampler (`history_interval_s`, every
2 s by default), reached through the `history` dependency (`/v1/swarm/history`).

Shutdown: `begin_shutdown(app)` (the CLI calls it on SIGTERM/SIGINT, before uvicorn waits
for connections) makes readiness 503 and ends every generation in flight; the lifespan
calls it again on the way out, then leaves the engines' context (sessions closed, an
embedded swarm stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.di import Provide
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from stamen.api.engine import EngineClient
from stamen.api.errors import APIError, error_response, exception_handlers
from stamen.api.jobs import JobManager, TunedEngineFactory, default_tuned_engines
from stamen.api.metrics import ApiMetrics
from stamen.api.pages import SwarmHistory, page_handlers
from stamen.api.pages.history import DEFAULT_INTERVAL_S, DEFAULT_WINDOW_S
from stamen.api.routes import route_handlers
from stamen.api.state import ApiState, FineTuningSettings, ServingSettings
from stamen.api.store import Store, open_store
from stamen.api.training import Trainer

logger = logging.getLogger(__name__)

EngineProvider = Callable[[], AbstractAsyncContextManager[Sequence[EngineClient]]]


def static_engines(*engines: EngineClient) -> EngineProvider:
    """A provider of engines that already exist (and that the caller closes)."""

    @asynccontextmanager
    async def provide() -> AsyncIterator[Sequence[EngineClient]]:
        yield engines

    return provide


def _provide_api(state: State) -> ApiState:
    api: ApiState = state.api
    return api


def _provide_files(state: State) -> Store:
    store: Store = state.store
    return store


def _provide_store(state: State) -> Store:
    """The same `Store` as `files`, for handlers that keep more than files in it."""
    store: Store = state.store
    return store


def _provide_jobs(state: State) -> JobManager:
    jobs: JobManager = state.jobs
    return jobs


def _provide_history(state: State) -> SwarmHistory:
    history: SwarmHistory = state.history
    return history


def _unauthorized(message: str, code: str) -> Response[bytes]:
    return error_response(APIError(401, message, code=code))


def _auth_hook(keys: frozenset[str]) -> Callable[[Request[Any, Any, Any]], Any]:
    async def check(request: Request[Any, Any, Any]) -> Response[bytes] | None:
        if not request.url.path.startswith("/v1/"):
            return None
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return _unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                "missing_api_key",
            )
        if not any(hmac.compare_digest(token.strip(), key) for key in keys):
            return _unauthorized("Incorrect API key provided.", "invalid_api_key")
        return None

    return check


_PATH_PARAMETER = re.compile(r"\{(\w+):\w+\}")


def _endpoint(scope: Scope) -> str:
    """A bounded label for the requests counter: the route's template (no per-model,
    per-file or per-junk-path series)."""
    template = scope.get("path_template")
    return _PATH_PARAMETER.sub(r"{\1}", template) if isinstance(template, str) else "other"


def _count_requests(metrics: ApiMetrics) -> Callable[[ASGIApp], ASGIApp]:
    def middleware(app: ASGIApp) -> ASGIApp:
        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return

            async def send_counted(message: Message) -> None:
                if message["type"] == "http.response.start":
                    endpoint = _endpoint(scope)
                    metrics.requests.labels(endpoint, str(message["status"])).inc()
                await send(message)

            await app(scope, receive, send_counted)

        return counted

    return middleware


def begin_shutdown(app: Litestar) -> None:
    """Refuse new generations and end those in flight; a no-op before startup."""
    api: ApiState | None = getattr(app.state, "api", None)
    if api is not None:
        api.begin_shutdown()


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


@asynccontextmanager
async def _data_dir(settings: FineTuningSettings) -> AsyncIterator[Path]:
    if settings.data_dir is not None:
        yield settings.data_dir
        return
    with tempfile.TemporaryDirectory(prefix="stamen-data-") as temporary:
        yield Path(temporary)


def create_app(
    settings: ServingSettings,
    engines: EngineProvider,
    *,
    trainer: Trainer | None = None,
    tuned_engines: TunedEngineFactory | None = None,
    history_interval_s: float = DEFAULT_INTERVAL_S,
    history_window_s: float = DEFAULT_WINDOW_S,
    debug: bool = False,
) -> Litestar:
    holder: dict[str, ApiState] = {}

    def snapshots() -> list[Any]:
        api = holder.get("api")
        return [] if api is None else [e.swarm_snapshot() for e in api.base_engines()]

    metrics = ApiMetrics(snapshots)
    history = SwarmHistory(
        snapshots,
        metrics.decode_steps_total,
        interval_s=history_interval_s,
        window_s=history_window_s,
    )

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            served = await stack.enter_async_context(engines())
            api = ApiState(settings, {e.model_id: e for e in served}, metrics)
            data_dir = await stack.enter_async_context(_data_dir(settings.fine_tuning))
            store = await stack.enter_async_context(open_store(data_dir))
            manager = JobManager(
                store,
                api,
                trainer,
                settings.fine_tuning,
                tuned_engines or default_tuned_engines(),
            )
            await stack.enter_async_context(manager.running())
            holder["api"] = api
            app.state.api, app.state.store, app.state.jobs = api, store, manager
            app.state.history = history
            sampler = asyncio.create_task(history.run(), name="stamen-swarm-history")
            stack.push_async_callback(_cancelled, sampler)
            logger.info("serving models %s; fine-tuning data in %s", list(api.engines), data_dir)
            try:
                yield
            finally:
                api.begin_shutdown()

    return Litestar(
        route_handlers=[*route_handlers, *page_handlers],
        dependencies={
            "api": Provide(_provide_api, sync_to_thread=False),
            "files": Provide(_provide_files, sync_to_thread=False),
            "store": Provide(_provide_store, sync_to_thread=False),
            "jobs": Provide(_provide_jobs, sync_to_thread=False),
            "history": Provide(_provide_history, sync_to_thread=False),
        },
        exception_handlers=exception_handlers,
        lifespan=[lifespan],
        before_request=_auth_hook(settings.api_keys) if settings.api_keys else None,
        middleware=[_count_requests(metrics)],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,
        debug=debug,
    )
