"""The Prometheus exposition: a copy of the live figures (`snapshot`, on the loop), its text
(`prometheus_text`, rendered on a thread with prometheus-client, imported only when asked),
and the optional `/metrics` HTTP endpoint (`MetricsServer`).

Reads the supervisor's and the router's figures; imports no policy and sends nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engctl.histogram import Histogram
from engctl.models import instance_id
from engctl.states import EngineMode, RequestOutcome

from .monitor import HostSample
from .stats import RequestStats
from .supervisor import Supervisor

if TYPE_CHECKING:
    from .alerter import Alerter
    from .hooks import Hooks
    from .router import Router

log = logging.getLogger("engctl.metrics")


# -- Prometheus --------------------------------------------------------------------------
# Bucket bounds of the exposed latency histogram: powers of two from 64 µs to ~67 s. They are
# bucket edges of engctl.histogram, so the cumulative counts are exact, not interpolated.
PROM_BOUNDS_US = [1 << k for k in range(6, 27)]


@dataclass
class _Member:
    """What the exposition needs of one instance (or a oneshot engine), copied on the loop."""

    labels: list[str]
    ok: int
    errors: int
    timeouts: int
    lost: int
    in_flight: int
    counts: list[int]
    sum_us: int
    live: bool = False  # an instance (not a oneshot engine)
    running: bool = False
    cpu: float = 0.0
    rss: int = 0
    restarts: int = 0
    isolations: int = 0
    states: dict[str, float] = field(default_factory=dict)
    status: tuple[str, str, str] = ("", "", "")
    weight: float = 0.0

    def count(self, outcome: RequestOutcome) -> int:
        """Attempts that ended with `outcome`."""
        return {
            RequestOutcome.OK: self.ok,
            RequestOutcome.ERROR: self.errors,
            RequestOutcome.TIMEOUT: self.timeouts,
            RequestOutcome.LOST: self.lost,
        }[outcome]


@dataclass
class _GateFigures:
    """One admission gate's figures (scope: global, type, engine or caller)."""

    scope: str
    name: str
    in_flight: int
    limit: int | None
    rate_limited: int
    shed: int
    adaptive: int | None


@dataclass
class Snapshot:
    """Every figure of the exposition as plain values: taken on the loop in about a
    millisecond, rendered on a thread (prometheus-client needs tens of ms at 100 instances)."""

    members: list[_Member]
    queue: list[tuple[str, int]]
    host: HostSample | None
    protocol_errors: int
    gates: list[_GateFigures] = field(default_factory=list)
    # priority -> (bucket counts, sum in µs) of the queue wait
    queue_wait: dict[int, tuple[list[int], int]] = field(default_factory=dict)
    # (alertname, state, severity, engine, instance, type) of each pending or firing alert
    alerts: list[tuple[str, str, str, str, str, str]] = field(default_factory=list)
    # hook -> {outcome: count}
    hooks: dict[str, dict[str, int]] = field(default_factory=dict)


def _requests_of(labels: list[str], st: RequestStats) -> _Member:
    return _Member(
        labels,
        st.ok,
        st.errors,
        st.timeouts,
        st.lost,
        st.in_flight,
        list(st.hist.counts),
        st.hist.sum_us,
    )


def snapshot(
    sup: Supervisor,
    router: Router,
    host: HostSample | None,
    alerter: Alerter | None = None,
    hooks: Hooks | None = None,
) -> Snapshot:
    """Copy the live figures (on the event loop)."""
    members: list[_Member] = []
    for engine in sup.engines.values():
        spec = engine.spec
        if spec.mode is EngineMode.ONESHOT:
            members.append(
                _requests_of([spec.name, instance_id(spec.name, None), spec.type], engine.stats)
            )
            continue
        for inst in engine.instances:
            m = _requests_of([spec.name, inst.id, spec.type], inst.stats)
            m.live = True
            m.running = inst.pid is not None
            m.cpu = inst.sample.cpu_percent
            m.rss = inst.sample.rss_bytes
            m.restarts = inst.restarts
            m.isolations = inst.isolations_total
            m.states = inst.state_seconds()
            m.status = (inst.state.value, inst.health.value, inst.eligibility.value)
            m.weight = inst.effective_weight
            members.append(m)
    waiting = router.queue_by_type()
    queue = [(t, waiting.get(t, 0)) for t in sorted({e.spec.type for e in sup.engines.values()})]
    snap = Snapshot(members, queue, host, router.protocol_errors)
    for gate in router.admission.all_gates():
        adaptive = gate.adaptive.limit if gate.adaptive is not None else None
        snap.gates.append(
            _GateFigures(
                gate.kind.value,
                gate.name,
                gate.in_flight,
                gate.limit,
                gate.rate_limited,
                gate.shed,
                adaptive,
            )
        )
    for priority, hist in sorted(router.gate.queue_wait_by_priority.items()):
        snap.queue_wait[priority] = (list(hist.counts), hist.sum_us)
    if alerter is not None:
        for alert in alerter.book.alerts():
            labels = alert.labels
            snap.alerts.append(
                (
                    alert.rule.name,
                    alert.state.value,
                    alert.rule.severity.value,
                    labels.get("engine", ""),
                    labels.get("instance", ""),
                    labels.get("type", ""),
                )
            )
    if hooks is not None:
        for doc in hooks.to_json()["hooks"]:
            snap.hooks[doc["name"]] = {
                outcome: doc[outcome] for outcome in ("delivered", "failed", "dropped", "skipped")
            }
    return snap


def prometheus_text(snap: Snapshot) -> bytes:
    """The text exposition of a snapshot (prometheus-client); safe to run on a thread."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    # Not `instance`: Prometheus sets that label (and `job`) on every scraped sample itself,
    # and renames a target's own to `exported_instance`.
    labels = ["engine", "engine_instance", "type"]
    requests = CounterMetricFamily(
        "engctl_requests", "Requests finished, by outcome.", labels=[*labels, "outcome"]
    )
    latency = HistogramMetricFamily(
        "engctl_request_latency_seconds",
        "Latency of successful requests (engctl's log-linear histogram, exact at these bounds).",
        labels=labels,
    )
    in_flight = GaugeMetricFamily("engctl_in_flight", "Requests in flight.", labels=labels)
    cpu = GaugeMetricFamily(
        "engctl_instance_cpu_percent", "CPU % of the process tree.", labels=labels
    )
    rss = GaugeMetricFamily("engctl_instance_rss_bytes", "RSS of the process tree.", labels=labels)
    restarts = CounterMetricFamily("engctl_instance_restarts", "Restarts.", labels=labels)
    isolations = CounterMetricFamily(
        "engctl_instance_isolations", "Times isolated (by policy or by hand).", labels=labels
    )
    state_seconds = CounterMetricFamily(
        "engctl_instance_state_seconds",
        "Seconds spent in each lifecycle state.",
        labels=[*labels, "state"],
    )
    info = GaugeMetricFamily(
        "engctl_instance_status",
        "1 for the instance's current state, health and eligibility.",
        labels=[*labels, "state", "health", "eligibility"],
    )
    weight = GaugeMetricFamily(
        "engctl_instance_effective_weight", "Weight used by dispatch.", labels=labels
    )
    success = GaugeMetricFamily(
        "engctl_instance_success_ratio",
        "Share of finished requests that succeeded (since the daemon started).",
        labels=labels,
    )
    queue = GaugeMetricFamily(
        "engctl_queue_length", "Requests waiting for a free instance.", labels=["type"]
    )
    for m in snap.members:
        lv = m.labels
        for outcome in RequestOutcome:  # one per attempt: their sum is the requests
            requests.add_metric([*lv, outcome.value], m.count(outcome))
        hist = Histogram.from_list(m.counts, m.sum_us)
        buckets = [(_le(b), float(n)) for b, n in hist.cumulative_at(PROM_BOUNDS_US)]
        buckets.append(("+Inf", float(hist.count)))
        latency.add_metric(lv, buckets, m.sum_us / 1e6)
        in_flight.add_metric(lv, m.in_flight)
        finished = sum(m.count(o) for o in RequestOutcome)
        if finished:
            success.add_metric(lv, m.ok / finished)
        if not m.live:
            continue
        if m.running:
            cpu.add_metric(lv, m.cpu)
            rss.add_metric(lv, m.rss)
        restarts.add_metric(lv, m.restarts)
        isolations.add_metric(lv, m.isolations)
        for state, secs in m.states.items():
            state_seconds.add_metric([*lv, state], secs)
        info.add_metric([*lv, *m.status], 1)
        weight.add_metric(lv, m.weight)
    for t, n in snap.queue:
        queue.add_metric([t], n)
    families: list[Any] = [
        requests,
        latency,
        in_flight,
        success,
        cpu,
        rss,
        restarts,
        isolations,
        state_seconds,
        info,
        weight,
        queue,
    ]
    host = snap.host
    if host is not None:
        for cls, name, doc, value in (
            (GaugeMetricFamily, "engctl_host_cpu_percent", "Host CPU %.", host.cpu_percent),
            (GaugeMetricFamily, "engctl_host_memory_used_bytes", "Memory used.", host.mem_used),
            (GaugeMetricFamily, "engctl_host_memory_total_bytes", "Memory.", host.mem_total),
            (
                CounterMetricFamily,
                "engctl_host_disk_read_bytes",
                "Bytes read from disks.",
                host.disk_read,
            ),
            (
                CounterMetricFamily,
                "engctl_host_disk_written_bytes",
                "Bytes written to disks.",
                host.disk_write,
            ),
            (
                CounterMetricFamily,
                "engctl_host_network_sent_bytes",
                "Bytes sent on all interfaces.",
                host.net_sent,
            ),
            (
                CounterMetricFamily,
                "engctl_host_network_received_bytes",
                "Bytes received on all interfaces.",
                host.net_recv,
            ),
        ):
            families.append(cls(name, doc, value=value))
    families.append(
        CounterMetricFamily(
            "engctl_protocol_errors",
            "Worker protocol violations seen.",
            value=snap.protocol_errors,
        )
    )
    families += _admission_families(snap)

    class _Collector:
        def collect(self) -> list[Any]:
            return families

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    data: bytes = generate_latest(registry)
    return data


def _admission_families(snap: Snapshot) -> list[Any]:
    """Rate limits, in-flight limits, the adaptive limit, the queue wait, alerts and hooks."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    scope = ["scope", "name"]
    limited = CounterMetricFamily(
        "engctl_rate_limited",
        "Requests refused at once by a rate limit (no token before their deadline).",
        labels=scope,
    )
    shed = CounterMetricFamily(
        "engctl_shed",
        "Requests refused at once by an adaptive limit with enough requests waiting.",
        labels=scope,
    )
    in_flight = GaugeMetricFamily(
        "engctl_admission_in_flight", "Requests holding a slot of a limit.", labels=scope
    )
    limit = GaugeMetricFamily(
        "engctl_admission_limit",
        "The in-flight limit in force (max_in_flight, or the adaptive limit).",
        labels=scope,
    )
    adaptive = GaugeMetricFamily(
        "engctl_adaptive_limit",
        "An engine's adaptive concurrency limit (the gradient controller's).",
        labels=["engine"],
    )
    for g in snap.gates:
        lv = [g.scope, g.name]
        limited.add_metric(lv, g.rate_limited)
        shed.add_metric(lv, g.shed)
        in_flight.add_metric(lv, g.in_flight)
        if g.limit is not None:
            limit.add_metric(lv, g.limit)
        if g.adaptive is not None:
            adaptive.add_metric([g.name], g.adaptive)
    wait = HistogramMetricFamily(
        "engctl_queue_wait_seconds",
        "Time requests waited in the queue before they ran, by priority.",
        labels=["priority"],
    )
    for priority, (counts, sum_us) in snap.queue_wait.items():
        hist = Histogram.from_list(counts, sum_us)
        buckets = [(_le(b), float(n)) for b, n in hist.cumulative_at(PROM_BOUNDS_US)]
        buckets.append(("+Inf", float(hist.count)))
        wait.add_metric([str(priority)], buckets, sum_us / 1e6)
    alerts = GaugeMetricFamily(
        "engctl_alerts",
        "1 for each pending or firing alert (as Prometheus' ALERTS).",
        labels=["alertname", "alertstate", "severity", "engine", "engine_instance", "type"],
    )
    for labels in snap.alerts:
        alerts.add_metric(list(labels), 1)
    hooks = CounterMetricFamily(
        "engctl_hook_deliveries",
        "Events a hook delivered, failed to deliver, dropped (queue full) or skipped.",
        labels=["hook", "outcome"],
    )
    for name, outcomes in snap.hooks.items():
        for outcome, n in outcomes.items():
            hooks.add_metric([name, outcome], n)
    return [limited, shed, in_flight, limit, adaptive, wait, alerts, hooks]


class MetricsServer:
    """GET /metrics on 127.0.0.1:PORT: the Prometheus scrape endpoint (off by default)."""

    def __init__(self, port: int, render: Callable[[], Awaitable[bytes]]) -> None:
        self.port = port
        self.render = render
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readline()
                while (await reader.readline()).strip():
                    pass  # headers: nothing in them matters here
                parts = request.decode("latin-1").split()
                if len(parts) < 2 or parts[0] not in ("GET", "HEAD"):
                    status, body, ctype = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
                elif parts[1].split("?")[0] != "/metrics":
                    status, body, ctype = "404 Not Found", b"try /metrics\n", "text/plain"
                else:
                    status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
                    body = await self.render()
                head = (
                    f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode()
                writer.write(head if parts and parts[0] == "HEAD" else head + body)
                await writer.drain()
        except (TimeoutError, OSError):
            pass
        except Exception:
            log.exception("cannot answer a /metrics request")
        finally:
            with contextlib.suppress(OSError):
                writer.close()


def _le(bound_us: int) -> str:
    return repr(bound_us / 1e6)
