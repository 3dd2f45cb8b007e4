"""Prometheus text exposition (format 0.0.4) for the server, without a client library.

Counters and histograms are updated from both the asyncio thread and the engine thread, so every
update takes one lock; gauges are read through callbacks at scrape time.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Counter:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self.values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{_labels(self.label_names, k)} {v:g}" for k, v in sorted(self.values.items())]
        return out


class Gauge:
    def __init__(self, name: str, help: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {self.read():g}"]


class Histogram:
    def __init__(self, name: str, help: str, labels: tuple[str, ...] = (), buckets=LATENCY_BUCKETS) -> None:
        self.name, self.help, self.label_names, self.buckets = name, help, labels, tuple(buckets)
        self.series: dict[tuple[str, ...], list] = {}  # labels -> [bucket counts..., sum, count]

    def observe(self, value: float, *labels: str) -> None:
        s = self.series.setdefault(labels, [0] * len(self.buckets) + [0.0, 0])
        i = bisect.bisect_left(self.buckets, value)  # first bucket with le >= value
        for j in range(i, len(self.buckets)):
            s[j] += 1
        s[-2] += value
        s[-1] += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        for key, s in sorted(self.series.items()):
            bounds = [f"{le:g}" for le in self.buckets] + ["+Inf"]
            for le, n in zip(bounds, s[: len(self.buckets)] + [s[-1]]):
                le_label = 'le="' + le + '"'
                out.append(f"{self.name}_bucket{_labels(self.label_names, key, le_label)} {n}")
            out.append(f"{self.name}_sum{_labels(self.label_names, key)} {s[-2]:g}")
            out.append(f"{self.name}_count{_labels(self.label_names, key)} {s[-1]}")
        return out


class Metrics:
    """Everything /metrics shows. `queue_depth` and `running` read the engine at scrape time."""

    def __init__(self, queue_depth: Callable[[], float], running: Callable[[], float]) -> None:
        self.lock = threading.Lock()
        self.requests = Counter("gpt3zh_requests_total", "HTTP requests by route and status", ("route", "status"))
        self.prompt_tokens = Counter("gpt3zh_prompt_tokens_total", "prompt tokens prefilled")
        self.completion_tokens = Counter("gpt3zh_completion_tokens_total", "tokens generated")
        self.rejected = Counter("gpt3zh_rejected_total", "requests refused because the queue was full")
        self.cancelled = Counter("gpt3zh_cancelled_total", "requests cancelled by a client disconnect")
        self.latency = Histogram("gpt3zh_request_duration_seconds", "HTTP request latency", ("route",))
        self.ttft = Histogram("gpt3zh_time_to_first_token_seconds", "submit to first generated token")
        self.gauges = [
            Gauge("gpt3zh_queue_depth", "requests waiting for an engine row", queue_depth),
            Gauge("gpt3zh_running_sequences", "sequences decoding in the engine", running),
        ]

    def count(self, counter: Counter, amount: float = 1.0, *labels: str) -> None:
        with self.lock:
            counter.inc(amount, *labels)

    def observe(self, hist: Histogram, value: float, *labels: str) -> None:
        with self.lock:
            hist.observe(value, *labels)

    def on_tokens(self, prompt: int, completion: int) -> None:
        with self.lock:
            self.prompt_tokens.inc(prompt)
            self.completion_tokens.inc(completion)

    def render(self) -> str:
        with self.lock:
            lines = []
            for m in (self.requests, self.prompt_tokens, self.completion_tokens, self.rejected,
                      self.cancelled, self.latency, self.ttft, *self.gauges):
                lines += m.render()
        return "\n".join(lines) + "\n"
