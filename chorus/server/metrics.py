"""The server's Prometheus metrics, through prometheus_client.

Counters and histograms are updated where things happen (the inference thread, the event loop);
gauges of live state (pools, connections, backlogs) are read from the server at scrape time.
Each server has its own registry, so several servers (tests) can live in one process.
"""
from __future__ import annotations

from typing import Callable, Iterable

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

# `*_created` timestamps add a series per label set and say nothing an operator needs here.
prometheus_client.disable_created_metrics()

GaugeReading = tuple[str, str, tuple[str, ...], dict]  # name, help, label names, {label values: value}


class _LiveGauges:
    """A collector whose gauges are read from the running server on every scrape."""

    def __init__(self, read: Callable[[], Iterable[GaugeReading]]):
        self._read = read

    def collect(self):
        for name, help_text, labels, values in self._read():
            family = GaugeMetricFamily(name, help_text, labels=list(labels))
            for key, value in sorted(values.items()):
                family.add_metric([str(v) for v in (key if isinstance(key, tuple) else (key,))], value)
            yield family


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.errors = Counter("chorus_errors", "Streams ended by an error", ["code"], registry=r)
        self.streams = Counter("chorus_streams", "Streams started", ["model"], registry=r)
        self.audio_seconds = Counter("chorus_audio_seconds", "Audio seconds taken in by streams", ["model"],
                                     registry=r)
        self.batch_sizes = Histogram("chorus_step_batch_size", "Streams stepped together in one forward step",
                                     ["model"], buckets=[1, 2, 4, 8, 16, 32, 64, 128], registry=r)
        self.step_seconds = Histogram("chorus_step_seconds", "Wall time of one batched step", ["model"],
                                      buckets=[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2], registry=r)

    def add_live_gauges(self, read: Callable[[], Iterable[GaugeReading]]) -> None:
        self.registry.register(_LiveGauges(read))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """One sample's current value (0 when it has not been recorded yet)."""
        return self.registry.get_sample_value(name, labels) or 0.0
