"""Typed application state: settings, engines by model id, metrics, admission control,
readiness, and the `stopping` switch that ends every generation in flight at shutdown.

`engines` is the registry of served models, base and tuned: the job manager adds a tuned
model (`add_tuned`) when a job or checkpoint produces one, so `/v1/models` lists it and
completions route to it. `base_engines()` are the models the CLI loaded, whose swarms
`/v1/swarm` and the metrics describe (a tuned model runs on its base's swarm).

Readiness is "a request sent now would be served": not stopping, every model's engine
`ready()` (a route through live, non-banned hosts), and a generation slot free. Each
reason it is not is named, for the `/readyz` body.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from stamen.api.engine import EngineClient
from stamen.api.errors import APIError, model_not_found, shutting_down
from stamen.api.metrics import ApiMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FineTuningSettings:
    """The files and fine-tuning jobs API (`files.py`, `fine_tuning.py`, `jobs.py`)."""

    data_dir: Path | None = None  # None: a temporary directory, removed at shutdown
    owner: str = "stamen"  # the `{owner}` of `ft:{base}:{owner}:{suffix}:{job_id}`
    max_file_bytes: int = 512 * 1024 * 1024  # an upload's file part; larger: 413
    max_running_jobs: int = 1  # jobs trained at once; the others wait `queued`
    cancel_wait_s: float = 10.0  # how long a cancel waits for a running job to stop


@dataclass(frozen=True)
class TunedModelInfo:
    base_model: str
    created_at: int
    owned_by: str


@dataclass(frozen=True)
class ServingSettings:
    """What the HTTP layer needs from the CLI's settings."""

    api_keys: frozenset[str] = frozenset()
    max_concurrent_requests: int = 512  # hosts queue by cache; this bounds the API's own state
    max_n: int = 8
    default_max_tokens: int = 1024  # a chat completion without max_tokens, clamped to room
    max_body_bytes: int = 4 * 1024 * 1024
    keepalive_s: float = 10.0
    retry_after_s: int = 5
    fine_tuning: FineTuningSettings = field(default_factory=FineTuningSettings)


@dataclass
class ApiState:
    settings: ServingSettings
    engines: dict[str, EngineClient]  # every served model, base and tuned
    metrics: ApiMetrics
    tuned: dict[str, TunedModelInfo] = field(default_factory=dict)
    started_at: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    def engine(self, model_id: str) -> EngineClient:
        try:
            return self.engines[model_id]
        except KeyError:
            raise model_not_found(model_id) from None

    def add_tuned(self, engine: EngineClient, info: TunedModelInfo) -> None:
        """Serve a tuned model (replacing one of the same id)."""
        self.engines[engine.model_id] = engine
        self.tuned[engine.model_id] = info
        logger.info("serving tuned model %s", engine.model_id)

    def base_engines(self) -> list[EngineClient]:
        return [e for model_id, e in self.engines.items() if model_id not in self.tuned]

    def unready_reasons(self) -> list[str]:
        """Why a request sent now would not be served; empty when it would."""
        reasons = []
        if self.stopping.is_set():
            reasons.append("the server is shutting down")
        if not self.engines:
            reasons.append("no model is loaded")
        for engine in self.base_engines():
            if not engine.ready():
                reasons.append(f"{engine.model_id}: no route through live hosts covers every block")
        if self.in_flight >= self.settings.max_concurrent_requests:
            reasons.append(f"at capacity: {self.in_flight} generations in flight")
        return reasons

    def ready(self) -> bool:
        return not self.unready_reasons()

    def begin_shutdown(self) -> None:
        """Refuse new generations and end those in flight (streams with an error event,
        non-streamed requests with a 503)."""
        if not self.stopping.is_set():
            logger.info("shutting down: ending %d generations in flight", self.in_flight)
            self.stopping.set()

    def admit(self) -> Callable[[], None]:
        """Take a generation slot or answer 429 (503 while stopping); returns the
        (idempotent) release."""
        if self.stopping.is_set():
            raise shutting_down(self.settings.retry_after_s)
        if self.in_flight >= self.settings.max_concurrent_requests:
            raise APIError(
                429,
                f"This server is already running {self.in_flight} generations; retry shortly.",
                code="rate_limit_exceeded",
                headers={"Retry-After": "1"},
            )
        self.in_flight += 1
        self.metrics.in_flight.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self.metrics.in_flight.dec()

        return release
