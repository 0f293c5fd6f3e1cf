"""Prometheus metrics endpoints shared by the agent and the coordinator.

Each service registers a collector that reads its live state at scrape time (counters,
gauges) plus histograms it observes on its hot paths, in a registry of its own, served
over HTTP by prometheus-client's thread server. Reads happen on the server's thread
while the event loop runs: only snapshots (``dict(...)``, ``list(...)``) of the state
are taken, which CPython makes atomic.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["LATENCY_BUCKETS", "Metric", "MetricsEndpoint", "counter", "gauge"]
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# Dispatch-to-result and execution times, from a fraction of a millisecond to a minute.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 60)


def counter(name: str, doc: str, label: str | Sequence[str], values: Mapping[Any, float]) -> Metric:
    """A counter per label value (``label`` a name), or per tuple of values (label names)."""
    labels = [label] if isinstance(label, str) else list(label)
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


def gauge(name: str, doc: str, labels: Iterable[str] = (), values: Any = None) -> Metric:
    """A gauge: ``values`` is a number (no labels) or a mapping of label tuples to numbers."""
    labels = list(labels)
    family = GaugeMetricFamily(name, doc, labels=labels)
    if not labels:
        family.add_metric([], float(values or 0))
    else:
        for key, value in sorted((values or {}).items()):
            family.add_metric(list(key), float(value))
    return family


class _Collector(Collector):
    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return self._collect()


class MetricsEndpoint:
    """A registry with one state-reading collector, served at ``http://host:port/metrics``."""

    def __init__(self, collect: Callable[[], Iterable[Metric]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(collect))
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def histogram(self, name: str, doc: str, labels: Iterable[str] = ()) -> Histogram:
        return Histogram(name, doc, list(labels), registry=self.registry, buckets=LATENCY_BUCKETS)

    def start(self, host: str, port: int) -> None:
        self._server, self._thread = start_http_server(port, host, registry=self.registry)
        self.port = int(self._server.server_address[1])
        logger.info("metrics at http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
