"""Prometheus metrics: pool state computed at scrape time, RPC counts as they happen.

Pool and session gauges come from a Collector that reads one snapshot of the
pool per scrape, so nothing on the hot path updates them. RPC counts and the
Grow/Step latency histogram are the only things recorded per call, into plain
counters that a second Collector reads at scrape time.
"""
from __future__ import annotations

import bisect
import heapq
import itertools
import threading
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from vattnd.pool.core import Snapshot

# Sessions given a series of their own at most (the largest): series must stay bounded.
MAX_SERIES = 1000
# Grow/Step latency buckets, in seconds: 25 us .. 1 s.
LATENCY_BUCKETS = (
    25e-6, 50e-6, 100e-6, 200e-6, 400e-6, 800e-6,
    1.6e-3, 3.2e-3, 6.4e-3, 12.8e-3, 25.6e-3, 51.2e-3, 0.1, 0.25, 1.0,
)


class PoolCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot], device_names: dict[int, str],
                 counters: Callable[[], dict[str, int]]):
        self._snapshot = snapshot
        self._names = device_names
        self._counters = counters

    def describe(self) -> Iterable[Metric]:
        return []  # computed at scrape time; nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        snap = self._snapshot()
        size = GaugeMetricFamily("vattnd_pool_size_pages", "Pages in the device's pool.", labels=["device", "name"])
        pages = GaugeMetricFamily(
            "vattnd_pool_pages", "Pages of the device's pool by state (free or used).",
            labels=["device", "name", "state"],
        )
        spare = GaugeMetricFamily(
            "vattnd_pool_spare_pages", "Used pages held by regions ahead of need (prefetched).",
            labels=["device", "name"],
        )
        idle = GaugeMetricFamily(
            "vattnd_pool_idle_pages",
            "Used pages in slots whose request finished, kept mapped for the next one (reclaimable).",
            labels=["device", "name"],
        )
        dirty = GaugeMetricFamily(
            "vattnd_pool_dirty_pages",
            "Free pages another session held last, not yet replaced by zeroed ones (the cleaner's backlog).",
            labels=["device", "name"],
        )
        used_bytes = GaugeMetricFamily(
            "vattnd_pool_used_bytes", "Bytes of the device's pool granted to sessions.", labels=["device", "name"]
        )
        for dev in snap.devices:
            d, n = str(dev.device), self._names.get(dev.device, "")
            size.add_metric([d, n], dev.pages_total)
            pages.add_metric([d, n, "free"], dev.pages_free)
            pages.add_metric([d, n, "used"], dev.pages_used)
            used_bytes.add_metric([d, n], dev.pages_used * snap.page_size)
            spare.add_metric([d, n], dev.pages_spare)
            idle.add_metric([d, n], dev.pages_idle)
            dirty.add_metric([d, n], dev.pages_dirty)
        yield size
        yield pages
        yield spare
        yield idle
        yield dirty
        yield used_bytes
        yield GaugeMetricFamily("vattnd_pool_page_size_bytes", "Size of one physical page.", value=snap.page_size)
        sessions = GaugeMetricFamily(
            "vattnd_session_pages", "Pages held by each open session (the 1000 holding most).",
            labels=["session", "pid", "name"]
        )
        for s in heapq.nlargest(MAX_SERIES, snap.sessions, key=lambda s: (s.pages, -s.id)):
            sessions.add_metric([str(s.id), str(s.pid), s.name], s.pages)
        yield sessions
        yield GaugeMetricFamily("vattnd_sessions", "Open sessions.", value=len(snap.sessions))
        tenant_pages = GaugeMetricFamily("vattnd_tenant_pages", "Pages held by each tenant.", labels=["tenant"])
        tenant_quota = GaugeMetricFamily(
            "vattnd_tenant_quota_pages", "Each tenant's quota, where it has one.", labels=["tenant"]
        )
        tenant_reserve = GaugeMetricFamily(
            "vattnd_tenant_reserve_pages", "Pages kept for each tenant, where it has a reserve.", labels=["tenant"]
        )
        tenant_waiting = GaugeMetricFamily(
            "vattnd_tenant_waiting_for_reserve",
            "1 while a tenant below its reserve waits for pages others borrowed.", labels=["tenant"]
        )
        for t in snap.tenants:
            tenant_pages.add_metric([t.name], t.pages)
            if t.quota is not None:
                tenant_quota.add_metric([t.name], t.quota)
            if t.reserve:
                tenant_reserve.add_metric([t.name], t.reserve)
                tenant_waiting.add_metric([t.name], int(t.waiting))
        yield tenant_pages
        yield tenant_quota
        yield tenant_reserve
        yield tenant_waiting
        counters = self._counters()
        yield CounterMetricFamily(
            "vattnd_sessions_opened", "Sessions opened since start.", value=counters["sessions_opened"]
        )
        yield CounterMetricFamily(
            "vattnd_pages_scrubbed", "Pages replaced by zeroed ones because they left a session.",
            value=counters["pages_scrubbed"],
        )
        yield CounterMetricFamily(
            "vattnd_reclaim_requests", "Requests sent to sessions to give idle pages back.",
            value=counters["reclaims_asked"],
        )
        yield CounterMetricFamily(
            "vattnd_page_fds_exported",
            "Page fds exported from allocation handles (CUDA; tens of microseconds of driver work each, ahead of "
            "need or inline in a grant). An engine whose pages cycle through its own spares makes none.",
            value=counters["page_fds_exported"],
        )


class RpcMetrics(Collector):
    """Calls by method, transport and status, and Grow/Step latency, counted on the hot path for the price
    of one uncontended lock and two dict updates; turned into Prometheus families only at scrape time.

    ``transport`` is ``grpc`` for gRPC calls and ``channel`` for calls on the fd channel.
    """

    def __init__(self, registry: CollectorRegistry | None = None):
        self._lock = threading.Lock()
        self._calls: dict[tuple[str, str, str], int] = {}
        # (method, transport) -> counts per bucket (the last one: above every bound), then the sum.
        self._latency: dict[tuple[str, str], list] = {}
        if registry is not None:
            registry.register(self)

    def record(self, method: str, transport: str, code: str, seconds: float | None) -> None:
        key = (method, transport, code)
        with self._lock:
            self._calls[key] = self._calls.get(key, 0) + 1
            if seconds is not None:
                hist = self._latency.get(key[:2])
                if hist is None:
                    hist = self._latency[key[:2]] = [0] * (len(LATENCY_BUCKETS) + 1) + [0.0]
                hist[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
                hist[-1] += seconds

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            calls = dict(self._calls)
            latency = {k: list(v) for k, v in self._latency.items()}
        requests = CounterMetricFamily("vattnd_rpc_requests", "Calls handled, by method, transport and gRPC status code.",
                                       labels=["method", "transport", "code"])
        for key, count in sorted(calls.items()):
            requests.add_metric(list(key), count)
        yield requests
        duration = HistogramMetricFamily(
            "vattnd_rpc_duration_seconds",
            "Time to handle Grow and Step calls in the daemon, until the reply and its fds are queued.",
            labels=["method", "transport"])
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for key, hist in sorted(latency.items()):
            cumulative = list(itertools.accumulate(hist[:-1]))
            duration.add_metric(list(key), list(zip(bounds, cumulative)), hist[-1])
        yield duration
