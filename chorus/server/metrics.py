"""Prometheus text-format metrics: counters, gauges and histograms with labels, thread-safe."""
from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Callable


def _labels(names: tuple[str, ...], values: tuple) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for n, v in zip(names, values))
    return "{" + inner + "}"


class _Metric:
    kind = ""

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...] = ()):
        self.name, self.help, self.label_names = name, help_text, labels
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._values: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, *labels) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels) -> float:
        return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {v:g}" for k, v in items]


class Gauge(_Metric):
    """A gauge read from a callback at scrape time (values of the live pools, sessions...)."""

    kind = "gauge"

    def __init__(self, name: str, help_text: str, labels: tuple[str, ...], read: Callable[[], dict]):
        super().__init__(name, help_text, labels)
        self._read = read

    def render(self) -> list[str]:
        values = self._read()
        return self.header() + [f"{self.name}{_labels(self.label_names, k if isinstance(k, tuple) else (k,))} {v:g}"
                                for k, v in sorted(values.items())]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help_text: str, buckets: list[float], labels: tuple[str, ...] = ()):
        super().__init__(name, help_text, labels)
        self.buckets = sorted(buckets)
        self._counts: dict[tuple, list[int]] = {}
        self._sums: dict[tuple, float] = {}

    def observe(self, value: float, *labels) -> None:
        with self._lock:
            counts = self._counts.setdefault(labels, [0] * (len(self.buckets) + 1))
            counts[bisect_left(self.buckets, value)] += 1
            self._sums[labels] = self._sums.get(labels, 0.0) + value

    def count(self, *labels) -> int:
        return sum(self._counts.get(labels, []))

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted(self._counts.items())
            sums = dict(self._sums)
        for labels, counts in items:
            running = 0
            for bound, c in zip(self.buckets + [float("inf")], counts):
                running += c
                le = "+Inf" if bound == float("inf") else f"{bound:g}"
                lines.append(f"{self.name}_bucket{_labels(self.label_names + ('le',), labels + (le,))} {running}")
            lines.append(f"{self.name}_sum{_labels(self.label_names, labels)} {sums[labels]:g}")
            lines.append(f"{self.name}_count{_labels(self.label_names, labels)} {running}")
        return lines


class Registry:
    def __init__(self):
        self.metrics: list[_Metric] = []

    def add(self, metric):
        self.metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.render()) + "\n"
