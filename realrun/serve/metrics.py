"""Prometheus metrics of a server (one registry per server, so several can run in one
process): request latency histograms, token and request counters, queue gauges, and the
executor's expert-cache and link figures.

Cache and link figures are a snapshot the engine thread takes at the end of every
iteration (:meth:`ServeMetrics.iteration`), so one scrape sees counters that agree with
each other (hits + misses == demands). Names follow Prometheus conventions: counters
end in ``_total``, times in seconds, sizes in bytes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from policies.base import MissAction
from realrun.serve.engine import EngineListener, Job, ServingEngine

# log-spaced, 1 ms to ~2 min: a tiny model on a CPU up to a large one waiting for PCIe
LATENCY_BUCKETS = tuple(round(0.001 * 2**i, 6) for i in range(18))

# (metric name, CacheCounters field, help)
_CACHE_COUNTERS = (
    (
        "fmoe_expert_demands",
        "demands",
        "experts demanded by MoE layers (one per expert per layer step)",
    ),
    ("fmoe_expert_hits", "hits", "demanded experts already resident"),
    ("fmoe_expert_misses", "misses", "demanded experts not resident"),
    ("fmoe_expert_loads", "loads", "expert copies host->device (demand loads and prefetches)"),
    ("fmoe_expert_prefetches_issued", "prefetches_issued", "prefetches started"),
    ("fmoe_expert_prefetches_used", "prefetches_used", "prefetched experts used before eviction"),
    ("fmoe_expert_prefetches_wasted", "prefetches_wasted", "prefetched experts evicted unused"),
    ("fmoe_expert_evictions", "evictions", "experts evicted from a device cache"),
    (
        "fmoe_bytes_h2d",
        "bytes_loaded",
        "expert bytes loaded host->device (the simulator's bytes_h2d)",
    ),
)


class ServeMetrics(EngineListener):
    """The server's metrics; the engine reports to it (it is the engine's listener) and
    the app counts HTTP responses and rejections. :meth:`render` is the /metrics body."""

    def __init__(self, model: str, policy: str) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "fmoe_time_to_first_token_seconds",
            "from a request's arrival to its first token (queueing included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "fmoe_time_per_output_token_seconds",
            "between consecutive tokens of a request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "fmoe_e2e_request_latency_seconds",
            "from a request's arrival to its last token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.finished_total = Counter(
            "fmoe_requests_finished", "requests ended, by reason", ["reason"], registry=r
        )
        self.rejected_total = Counter(
            "fmoe_requests_rejected", "requests refused before queueing", ["reason"], registry=r
        )
        self.http_total = Counter(
            "fmoe_http_responses",
            "HTTP responses by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "fmoe_prompt_tokens", "prompt tokens of requests that ran", registry=r
        )
        self.generation_tokens = Counter("fmoe_generation_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge(
            "fmoe_queue_depth", "requests waiting to join the batch", registry=r
        )
        self.running = Gauge("fmoe_running_requests", "requests in the running batch", registry=r)
        info = Gauge("fmoe_server_info", "what is served", ["model", "policy"], registry=r)
        info.labels(model=model, policy=policy).set(1)
        self._lock = threading.Lock()
        self._snap: dict[str, Any] = {}
        r.register(_SnapshotCollector(self))

    # -- EngineListener (engine thread) -------------------------------------------------------
    def queue_changed(self, waiting: int, running: int) -> None:
        self.queue_depth.set(waiting)
        self.running.set(running)

    def first_token(self, job: Job, seconds: float) -> None:
        self.ttft.observe(seconds)
        self.generation_tokens.inc()

    def next_token(self, job: Job, seconds: float) -> None:
        self.tpot.observe(seconds)
        self.generation_tokens.inc()

    def finished(self, job: Job, reason: str, e2e_s: float) -> None:
        self.finished_total.labels(reason=reason).inc()
        if job.output_ids:
            self.prompt_tokens.inc(len(job.prompt_ids))
            self.e2e.observe(e2e_s)

    def iteration(self, engine: ServingEngine) -> None:
        snap = engine_snapshot(engine)
        with self._lock:
            self._snap = snap

    # -- the app ------------------------------------------------------------------------------
    def response(self, endpoint: str, status: int) -> None:
        self.http_total.labels(endpoint=endpoint, status=str(status)).inc()

    def rejected(self, reason: str) -> None:
        self.rejected_total.labels(reason=reason).inc()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return dict(self._snap)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def engine_snapshot(engine: ServingEngine) -> dict[str, Any]:
    """The session's cache, link and step figures now (call from the engine thread)."""
    s = engine.session
    c = s.counters()
    misses = getattr(s, "miss_actions", None)  # an executor that runs other actions counts them
    actions = dict(misses) if misses else {MissAction.FETCH.value: c.misses}
    return {
        "counters": c.as_dict(),
        "link_bytes": [d.engine.stats.bytes_copied for d in s.res.devs],
        "link_busy_s": [d.engine.stats.busy_s for d in s.res.devs],
        "cache_experts": list(s.res.capacities),
        "stall_s": s.res.stall_s,
        "iterations": engine.iterations,
        "layer_steps": s.layer_steps,
        "miss_actions": {a.value: int(actions.get(a.value, 0)) for a in MissAction},
    }


class _SnapshotCollector(Collector):
    """Exposes the engine's last snapshot at scrape time."""

    def __init__(self, metrics: ServeMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        snap = self.metrics.snapshot()
        if not snap:
            return
        c = snap["counters"]
        for name, key, doc in _CACHE_COUNTERS:
            yield CounterMetricFamily(name, doc, value=c[key])
        rate = c["hits"] / c["demands"] if c["demands"] else math.nan
        yield GaugeMetricFamily("fmoe_expert_hit_rate", "hits / demands so far", value=rate)
        links = CounterMetricFamily(
            "fmoe_link_bytes", "bytes copied host->device, per link (device)", labels=["link"]
        )
        busy = CounterMetricFamily(
            "fmoe_link_busy_seconds", "time each link spent copying", labels=["link"]
        )
        slots = GaugeMetricFamily(
            "fmoe_cache_experts", "expert slots per device", labels=["device"]
        )
        for d, (b, t, n) in enumerate(
            zip(snap["link_bytes"], snap["link_busy_s"], snap["cache_experts"], strict=True)
        ):
            links.add_metric([str(d)], b)
            busy.add_metric([str(d)], t)
            slots.add_metric([str(d)], n)
        yield links
        yield busy
        yield slots
        actions = CounterMetricFamily(
            "fmoe_miss_actions", "how missed experts were served, by action", labels=["action"]
        )
        for action, n in snap["miss_actions"].items():
            actions.add_metric([action], n)
        yield actions
        yield CounterMetricFamily(
            "fmoe_stall_seconds", "compute time spent waiting for experts", value=snap["stall_s"]
        )
        yield CounterMetricFamily("fmoe_iterations", "forward passes run", value=snap["iterations"])
        yield CounterMetricFamily(
            "fmoe_layer_steps", "MoE layer steps run", value=snap["layer_steps"]
        )
