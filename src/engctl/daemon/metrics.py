"""Metrics history: roll-ups into the history database, and the last seconds' figures of
`top` (`Rollups.recent`). The Prometheus exposition is `prometheus`'.

Nothing here is on the request path: requests only bump counters and a histogram held by the
instance (`RequestStats`). Every 10 s and every 5 min, `Rollups` turns the difference since the
last bucket into rows; every monitor sample adds CPU, RSS, queue and host readings to the
buckets being filled. Imports no policy and no request code but the router's queue figures.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engctl.histogram import Histogram
from engctl.models import instance_id
from engctl.protocol import encode_doc
from engctl.states import EngineMode

from .history import COARSE_SECONDS, FINE_SECONDS, HistoryWriter
from .instance import Engine, Instance
from .monitor import HostSample
from .supervisor import Supervisor

if TYPE_CHECKING:
    from engctl.documents import LiveFigures

    from .router import Router

log = logging.getLogger("engctl.metrics")


@dataclass(slots=True)  # up to four per instance (now and before, two tiers)
class _Base:
    """An instance's cumulative figures when its bucket started."""

    requests: int
    ok: int
    errors: int
    timeouts: int
    lost: int
    restarts: int
    isolations: int
    hist: Histogram
    states: dict[str, float]


@dataclass(slots=True)  # the host's CPU and memory in each tier
class _Gauge:
    """Readings within one bucket: mean and max."""

    total: float = 0.0
    n: int = 0
    peak: float = 0.0

    def add(self, v: float) -> None:
        self.total += v
        self.n += 1
        if v > self.peak:
            self.peak = v

    @property
    def mean(self) -> float | None:
        return None if self.n == 0 else self.total / self.n


@dataclass(slots=True)  # one per instance and tier: one object and one lookup a sample
class _Readings:
    """An instance's samples within one bucket: its mean CPU, its largest RSS and the most
    requests it had in flight (the autoscaler's predictor reads that one)."""

    n: int = 0
    cpu_total: float = 0.0
    rss_peak: float = 0.0
    in_flight_peak: int = 0

    def add(self, cpu_percent: float, rss_bytes: float, in_flight: int) -> None:
        self.n += 1
        self.cpu_total += cpu_percent
        if rss_bytes > self.rss_peak:
            self.rss_peak = rss_bytes
        if in_flight > self.in_flight_peak:
            self.in_flight_peak = in_flight


# What has request figures of its own: an instance, or a oneshot engine (no instances).
Member = Instance | Engine


@dataclass
class _Tier:
    seconds: int
    started: float
    bases: dict[Member, _Base] = field(default_factory=dict)
    bases_before: dict[Member, _Base] = field(default_factory=dict)
    readings: dict[Member, _Readings] = field(default_factory=dict)
    # per type: samples taken, samples with requests waiting, the longest queue seen
    queue: dict[str, list[int]] = field(default_factory=dict)
    host_cpu: _Gauge = field(default_factory=_Gauge)
    host_mem: _Gauge = field(default_factory=_Gauge)
    host_base: HostSample | None = None


_NO_READINGS = _Readings()  # an instance not sampled within the bucket
_ZERO = _Base(0, 0, 0, 0, 0, 0, 0, Histogram(), {})


def _snapshot(hist: Histogram) -> Histogram:
    """A copy of `hist` for a base, which is only ever read: every member without requests
    shares one empty histogram (a copy is 2 KiB, and a member has up to five bases)."""
    return hist.copy() if hist.count else _ZERO.hist


def _base(member: Member) -> _Base:
    st = member.stats
    if isinstance(member, Engine):  # a oneshot engine: requests only
        return _Base(
            st.requests, st.ok, st.errors, st.timeouts, st.lost, 0, 0, _snapshot(st.hist), {}
        )
    return _Base(
        st.requests,
        st.ok,
        st.errors,
        st.timeouts,
        st.lost,
        member.restarts,
        member.isolations_total,
        _snapshot(st.hist),
        member.state_seconds(),
    )


def member_id(member: Member) -> str:
    """`name#k` for an instance, `name#oneshot` for a oneshot engine's runs."""
    return instance_id(member.spec.name, None) if isinstance(member, Engine) else member.id


def _json_text(doc: dict[str, Any]) -> str:
    """A row's JSON column, as text (SQLite's JSON functions refuse a BLOB): written by
    msgspec (`protocol.encode_doc`), 6x `json.dumps`, as 1,000 rows go every 10 s."""
    return encode_doc(doc).decode()


def _row_data(member: Member) -> dict[str, Any]:
    spec = member.spec
    if isinstance(member, Engine):
        return {"mode": "oneshot", "max_concurrency": spec.max_concurrency, "weight": spec.weight}
    return {
        "state": member.state.value,
        "health": member.health.value,
        "eligibility": member.eligibility.value,
        "weight": spec.weight,
        "max_rss": spec.limits.max_rss,
        "instances": member.engine.wanted,  # the setting (autoscaled: the count), for report
    }


class Rollups:
    """Fills the 10 s and 5 min buckets and hands finished ones to the history writer."""

    def __init__(
        self,
        sup: Supervisor,
        router: Router,
        writer: HistoryWriter | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.sup = sup
        self.router = router
        self.writer = writer
        self.clock = clock
        now = clock()
        self.tiers = [_Tier(FINE_SECONDS, now), _Tier(COARSE_SECONDS, now)]
        self.host: HostSample | None = None
        self.previous: dict[Member, _Base] = {}
        self.previous_started = now
        for tier in self.tiers:
            for member in self._members():
                tier.bases[member] = _base(member)

    def _instances(self) -> list[Instance]:
        return [
            i
            for e in self.sup.engines.values()
            if e.spec.mode is not EngineMode.ONESHOT
            for i in e.instances
        ]

    def _members(self) -> list[Member]:
        """Every instance, and every oneshot engine (its runs' figures are its own)."""
        out: list[Member] = []
        for e in self.sup.engines.values():
            if e.spec.mode is EngineMode.ONESHOT:
                out.append(e)
            else:
                out.extend(e.instances)
        return out

    def forget_gone(self) -> int:
        """Drop the figures of members no longer in the fleet (the fleet changed): a bucket
        reports live members only, and a removed instance's figures would keep its whole
        object graph (process, pipes, trackers) alive until the 5 min bucket closes. Returns
        how many members were forgotten."""
        live = set(self._members())
        gone = {m for m in self.previous if m not in live}
        for tier in self.tiers:
            for figures in (tier.bases, tier.bases_before, tier.readings):
                gone.update(m for m in figures if m not in live)
        for tier in self.tiers:
            for figures in (tier.bases, tier.bases_before, tier.readings):
                for member in gone:
                    figures.pop(member, None)
        for member in gone:
            self.previous.pop(member, None)
        return len(gone)

    def sampled(self, host: HostSample | None) -> None:
        """A monitor tick: add its readings to the buckets being filled."""
        if host is not None:
            self.host = host
        waiting = self.router.queue_by_type()
        types = {e.spec.type for e in self.sup.engines.values()}
        # Each instance's readings once, into every tier (a fleet of 1,000, each second).
        readings = [
            (inst, inst.sample.cpu_percent, float(inst.sample.rss_bytes), inst.stats.in_flight)
            for inst in self._instances()
            if inst.pid is not None
        ]
        for tier in self.tiers:
            figures = tier.readings
            for inst, cpu_percent, rss_bytes, in_flight in readings:
                got = figures.get(inst)
                if got is None:
                    got = figures[inst] = _Readings()
                got.add(cpu_percent, rss_bytes, in_flight)
            for t in types:
                q = tier.queue.setdefault(t, [0, 0, 0])
                n = waiting.get(t, 0)
                q[0] += 1
                q[1] += 1 if n else 0
                q[2] = max(q[2], n)
            if host is not None:
                tier.host_cpu.add(host.cpu_percent)
                tier.host_mem.add(float(host.mem_used))
                if tier.host_base is None:
                    tier.host_base = host

    def close_all(self, now: float | None = None) -> list[tuple[Any, ...]]:
        """Rows of every bucket being filled (daemon shutdown: keep the partial ones)."""
        now = self.clock() if now is None else now
        return [row for tier in self.tiers for row in self.close(tier, now)]

    def recent(self) -> dict[str, LiveFigures]:
        """Per instance, figures since the last 10 s bucket closed (at least 5 s of them):
        throughput, success rate and latency percentiles (`engctl top`)."""
        tier = self.tiers[0]
        now = self.clock()
        out: dict[str, LiveFigures] = {}
        for inst in self._members():
            base = tier.bases.get(inst) or _ZERO
            prev = self.previous.get(inst)
            # Right after a bucket closed its window is short: measure from the one before.
            since = tier.started
            if prev is not None and now - tier.started < 5.0:
                base, since = prev, self.previous_started
            cur = inst.stats
            window = max(now - since, 1e-3)
            hist = cur.hist.minus(base.hist)
            done = cur.requests - base.requests  # every outcome: requests is their sum
            out[member_id(inst)] = {
                "window_s": round(window, 1),
                "rps": round(done / window, 2),
                "success_rate": round((cur.ok - base.ok) / done, 4) if done else None,
                "p50_ms": _round(hist.percentile_ms(0.5)),
                "p99_ms": _round(hist.percentile_ms(0.99)),
            }
        return out

    def due(self, now: float | None = None) -> None:
        """Close every bucket whose time has come (called every few seconds)."""
        now = self.clock() if now is None else now
        for tier in self.tiers:
            if now - tier.started >= tier.seconds:
                if self.writer is None:
                    # `metrics = false`: nothing is kept, so no rows are built either.
                    self.close(tier, now, rows_wanted=False)
                    continue
                self.writer.write(self.close(tier, now))

    def close(self, tier: _Tier, now: float, rows_wanted: bool = True) -> list[tuple[Any, ...]]:
        """The rows of a finished bucket (none if not `rows_wanted`); the next one starts now."""
        seconds = now - tier.started
        rows: list[tuple[Any, ...]] = []
        live = self._members()
        for inst in live:
            base = tier.bases.get(inst)
            cur = _base(inst)
            # A counter below its base was reset (instance slot re-created): count from 0.
            if base is None or cur.requests < base.requests:
                base = _ZERO
            if not rows_wanted:
                tier.bases_before[inst] = base
                tier.bases[inst] = cur
                continue
            hist = cur.hist.minus(base.hist)
            got = tier.readings.get(inst) or _NO_READINGS
            states = {
                k: round(v - base.states.get(k, 0.0), 3)
                for k, v in cur.states.items()
                if v - base.states.get(k, 0.0) > 0.0005
            }
            rows.append(
                (
                    tier.seconds,
                    now,
                    seconds,
                    "instance",
                    member_id(inst),
                    inst.spec.name,
                    inst.spec.type,
                    cur.requests - base.requests,
                    cur.ok - base.ok,
                    cur.errors - base.errors,
                    cur.timeouts - base.timeouts,
                    cur.lost - base.lost,
                    hist.encode() if hist.count else None,
                    round(got.cpu_total / got.n, 2) if got.n else None,
                    int(got.rss_peak) if got.n else None,
                    max(0, cur.restarts - base.restarts),
                    max(0, cur.isolations - base.isolations),
                    _json_text(
                        {
                            "states": states,
                            **_row_data(inst),
                            "in_flight_peak": got.in_flight_peak,
                        }
                    ),
                )
            )
            tier.bases_before[inst] = base
            tier.bases[inst] = cur
        for gone in set(tier.bases) - set(live):
            del tier.bases[gone]
        for gone in set(tier.bases_before) - set(live):
            del tier.bases_before[gone]
        for t, (samples, busy, peak) in tier.queue.items():
            rows.append(
                (
                    tier.seconds,
                    now,
                    seconds,
                    "type",
                    t,
                    None,
                    t,
                    0,
                    0,
                    0,
                    0,
                    0,
                    None,
                    None,
                    None,
                    0,
                    0,
                    _json_text({"samples": samples, "queued_samples": busy, "queue_max": peak}),
                )
            )
        host = self.host
        if host is not None:
            base_h = tier.host_base or host
            rows.append(
                (
                    tier.seconds,
                    now,
                    seconds,
                    "host",
                    "host",
                    None,
                    None,
                    0,
                    0,
                    0,
                    0,
                    0,
                    None,
                    None if tier.host_cpu.mean is None else round(tier.host_cpu.mean, 2),
                    int(tier.host_mem.peak) if tier.host_mem.n else host.mem_used,
                    0,
                    0,
                    _json_text(
                        {
                            "mem_total": host.mem_total,
                            "disk_read_bytes": max(0, host.disk_read - base_h.disk_read),
                            "disk_write_bytes": max(0, host.disk_write - base_h.disk_write),
                            "net_sent_bytes": max(0, host.net_sent - base_h.net_sent),
                            "net_recv_bytes": max(0, host.net_recv - base_h.net_recv),
                        }
                    ),
                )
            )
        if tier is self.tiers[0]:
            self.previous = {i: b for i, b in tier.bases_before.items() if i in tier.bases}
            self.previous_started = tier.started
        tier.started = now
        tier.readings.clear()
        tier.queue.clear()
        tier.host_cpu = _Gauge()
        tier.host_mem = _Gauge()
        tier.host_base = host
        return rows


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)
