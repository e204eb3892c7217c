"""The Litestar application: `create_app(settings, engines)`.

`engines` is a factory of an async context manager yielding the engines to serve; the
app's lifespan enters it at startup and leaves it at shutdown, so whoever builds the app
(the CLI, a test) decides what runs the model and the app owns its lifetime. The typed
`ApiState` reaches handlers through the `api` dependency.

API keys, when configured, guard every `/v1/` route (`Authorization: Bearer KEY`);
the probes (`/livez`, `/readyz`, `/health...`), `/metrics` and the OpenAPI document stay
open for load balancers, scrapers and tools.

Shutdown: `begin_shutdown(app)` (the CLI calls it on SIGTERM/SIGINT, before uvicorn waits
for connections) makes readiness 503 and ends every generation in flight; the lifespan
calls it again on the way out, then leaves the engines' context (sessions closed, an
embedded swarm stopped).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.di import Provide
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from stamen.api.engine import EngineClient
from stamen.api.errors import APIError, error_response, exception_handlers
from stamen.api.metrics import ApiMetrics
from stamen.api.routes import route_handlers
from stamen.api.state import ApiState, ServingSettings

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


_KNOWN_PATHS = frozenset(path for handler in route_handlers for path in handler.paths)


def _endpoint(path: str) -> str:
    """A bounded label for the requests counter (no per-model or per-junk-path series)."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path in _KNOWN_PATHS else "other"


def _count_requests(metrics: ApiMetrics) -> Callable[[ASGIApp], ASGIApp]:
    def middleware(app: ASGIApp) -> ASGIApp:
        async def counted(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return

            async def send_counted(message: Message) -> None:
                if message["type"] == "http.response.start":
                    endpoint = _endpoint(scope["path"])
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


def create_app(
    settings: ServingSettings, engines: EngineProvider, *, debug: bool = False
) -> Litestar:
    holder: dict[str, ApiState] = {}

    def snapshots() -> list[Any]:
        api = holder.get("api")
        return [] if api is None else [e.swarm_snapshot() for e in api.engines.values()]

    metrics = ApiMetrics(snapshots)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        async with engines() as served:
            api = ApiState(settings, {e.model_id: e for e in served}, metrics)
            holder["api"] = api
            app.state.api = api
            logger.info("serving models %s", list(api.engines))
            try:
                yield
            finally:
                api.begin_shutdown()

    return Litestar(
        route_handlers=route_handlers,
        dependencies={"api": Provide(_provide_api, sync_to_thread=False)},
        exception_handlers=exception_handlers,
        lifespan=[lifespan],
        before_request=_auth_hook(settings.api_keys) if settings.api_keys else None,
        middleware=[_count_requests(metrics)],
        request_max_body_size=settings.max_body_bytes,
        openapi_config=None,
        debug=debug,
    )
