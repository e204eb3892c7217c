"""Typed application state: settings, engines by model id, metrics, admission control."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from stamen.api.engine import EngineClient
from stamen.api.errors import APIError, model_not_found
from stamen.api.metrics import ApiMetrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServingSettings:
    """What the HTTP layer needs from the CLI's settings."""

    api_keys: frozenset[str] = frozenset()
    max_concurrent_requests: int = 64
    max_n: int = 8
    max_body_bytes: int = 4 * 1024 * 1024
    keepalive_s: float = 10.0
    retry_after_s: int = 5


@dataclass
class ApiState:
    settings: ServingSettings
    engines: Mapping[str, EngineClient]
    metrics: ApiMetrics
    started_at: int = field(default_factory=lambda: int(time.time()))
    in_flight: int = 0

    def engine(self, model_id: str) -> EngineClient:
        try:
            return self.engines[model_id]
        except KeyError:
            raise model_not_found(model_id) from None

    def ready(self) -> bool:
        return bool(self.engines) and all(engine.ready() for engine in self.engines.values())

    def admit(self) -> Callable[[], None]:
        """Take a generation slot or answer 429; returns the (idempotent) release."""
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
