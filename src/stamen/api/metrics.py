"""Prometheus metrics of the API, in a registry owned by one app (tests build many apps).

Requests by endpoint and status, prompt and completion tokens, time to first token,
inter-token latency, decode steps (counted as they happen, so that a rate over a few
seconds shows generation while it runs, where completion tokens are counted when a
request ends), requests in flight, and the swarm's block coverage per model (read from
the engines when scraped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from stamen.api.engine import SwarmSnapshot

_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _SwarmCollector(Collector):
    def __init__(self, snapshots: Callable[[], Iterable[SwarmSnapshot]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterable[GaugeMetricFamily]:
        coverage = GaugeMetricFamily(
            "stamen_swarm_coverage_ratio",
            "Fraction of the model's blocks served by an online host",
            labels=["model"],
        )
        hosts = GaugeMetricFamily(
            "stamen_swarm_hosts", "Hosts known to serve blocks of the model", labels=["model"]
        )
        for snapshot in self._snapshots():
            coverage.add_metric([snapshot.model], snapshot.coverage)
            hosts.add_metric([snapshot.model], len(snapshot.hosts))
        yield coverage
        yield hosts


class ApiMetrics:
    def __init__(self, snapshots: Callable[[], Iterable[SwarmSnapshot]]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "stamen_api_requests",
            "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "stamen_api_tokens", "Tokens processed, by kind", ["kind"], registry=self.registry
        )
        self.time_to_first_token = Histogram(
            "stamen_api_time_to_first_token_seconds",
            "Time from the start of generation to the first token",
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "stamen_api_inter_token_latency_seconds",
            "Time between consecutive tokens of one generation",
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.decode_steps = Counter(
            "stamen_api_decode_steps",
            "Decode steps of all generations (one token each for a request with n=1)",
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "stamen_api_requests_in_flight", "Generations running now", registry=self.registry
        )
        self.registry.register(_SwarmCollector(snapshots))
        # The counter's own value, kept beside it: prometheus_client reads it back only
        # through a private attribute or a walk of the whole registry.
        self._decode_steps_total = 0

    def observe_token(self, since_last_s: float, *, first: float | None) -> None:
        self.decode_steps.inc()
        self._decode_steps_total += 1
        if first is not None:
            self.time_to_first_token.observe(first)
        else:
            self.inter_token_latency.observe(since_last_s)

    def observe_usage(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.tokens.labels("prompt").inc(prompt_tokens)
        self.tokens.labels("completion").inc(completion_tokens)

    def decode_steps_total(self) -> int:
        """Decode steps so far (what the monitor's tokens/s is a rate of)."""
        return self._decode_steps_total

    def render(self) -> bytes:
        return generate_latest(self.registry)
