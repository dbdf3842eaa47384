"""`engctl report`: a period's figures from the history database, the policy actions from the
event log, and suggestions that each name the numbers behind them.

Reads SQLite files directly and read-only (WAL readers never block the daemon's writer), so a
report works while the daemon is busy, stopped or gone. The analysis is plain functions over
rows, so tests feed it rows with any timestamps they like. CLI side: imports the shared
contract only, never `engctl.daemon` (event kinds and drain causes come from `states`).
"""

from __future__ import annotations

import json
import sqlite3
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engctl.errors import UsageError
from engctl.histogram import Histogram
from engctl.models import split_instance_id
from engctl.states import DrainCause, EventKind, Health, InstanceState
from engctl.timespec import parse_since as parse_since  # the report's --since, re-exported

if TYPE_CHECKING:
    from engctl.documents import (
        ReportAction,
        ReportDoc,
        ReportEngine,
        ReportFigures,
        ReportHost,
        ReportInstance,
        ReportType,
        ReportWorst,
        Suggestion,
    )

FINE = 10
COARSE = 300
# Thresholds of the suggestions (documented in docs/metrics.md).
QUEUED_SHARE = 0.10  # requests waited in at least this share of samples
MIN_QUEUE_SAMPLES = 30  # queue samples (about seconds) before a share is judged
MIN_QUEUED = 3  # samples with requests waiting: one busy second is not a pattern
P99_FACTOR = 3.0  # an instance's p99 this many times its peers' median
MIN_REQUESTS = 20  # volume below which rates and percentiles are not judged
MIN_SLOW = 5  # requests at or above the slow mark: one outlier is not a slow instance
ERROR_RATE = 0.05
MIN_FAILURES = 3  # failed requests: one failure in twenty is not a failing instance
RESTARTS = 3
UNUSED_SECONDS = 600.0  # instance-up time with no request before "remove" is suggested

E = EventKind
# The events that are policy actions (and manual overrides), with crashes and fatal states.
POLICY_KINDS = (
    E.INSTANCE_ISOLATED,
    E.INSTANCE_RETURNED,
    E.INSTANCE_RESTORED,
    E.INSTANCE_DRAIN,
    E.INSTANCE_DRAINING,
    E.INSTANCE_DRAIN_TIMEOUT,
    E.INSTANCE_HUNG,
    E.ALERT_FIRING,
    E.INSTANCE_DOWNWEIGHTED,
    E.INSTANCE_WEIGHT_RESTORED,
    E.INSTANCE_HEALTH,
    E.POLICY_GUARD_RAIL,
)
_MEMORY_CAUSES = (DrainCause.MEMORY, DrainCause.MEMORY_LEAK)


@dataclass
class Figures:
    """Request counts, latency and resource use summed over rows."""

    requests: int = 0
    ok: int = 0
    errors: int = 0
    timeouts: int = 0
    lost: int = 0
    restarts: int = 0
    isolations: int = 0
    hist: Histogram = field(default_factory=Histogram)
    cpu_total: float = 0.0
    cpu_n: int = 0
    rss_max: int | None = None
    states: dict[str, float] = field(default_factory=dict)
    last: dict[str, Any] = field(default_factory=dict)  # the data of the latest row
    last_ts: float = 0.0
    bad_cells: int = 0

    def add(self, row: sqlite3.Row | dict[str, Any]) -> None:
        self.requests += row["requests"]
        self.ok += row["ok"]
        self.errors += row["errors"]
        self.timeouts += row["timeouts"]
        self.lost += row["lost"]
        self.restarts += row["restarts"]
        self.isolations += row["isolations"]
        if row["latency"]:
            try:
                self.hist.merge(Histogram.decode(row["latency"]))
            except ValueError:
                self.bad_cells += 1  # a damaged cell costs its latencies, not the report
        if row["cpu_percent"] is not None:
            self.cpu_total += row["cpu_percent"]
            self.cpu_n += 1
        if row["rss_bytes"] is not None:
            self.rss_max = max(self.rss_max or 0, row["rss_bytes"])
        data = json.loads(row["data"]) if row["data"] else {}
        for k, v in data.get("states", {}).items():
            self.states[k] = self.states.get(k, 0.0) + v
        self.last = data
        self.last_ts = row["ts"]

    def merge(self, other: Figures) -> None:
        for name in ("requests", "ok", "errors", "timeouts", "lost", "restarts", "isolations"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.hist.merge(other.hist)
        self.cpu_total += other.cpu_total
        self.cpu_n += other.cpu_n

    @property
    def failed(self) -> int:
        return self.errors + self.timeouts + self.lost

    @property
    def error_rate(self) -> float | None:
        finished = self.ok + self.failed
        return None if finished == 0 else self.failed / finished

    @property
    def up_seconds(self) -> float:
        return sum(v for k, v in self.states.items() if k in ("ready", "busy", "warming"))

    def to_json(self, seconds: float) -> ReportFigures:
        rate = self.error_rate
        return {
            "requests": self.requests,
            "ok": self.ok,
            "errors": self.errors,
            "timeouts": self.timeouts,
            "lost": self.lost,
            "success_rate": None if rate is None else round(1.0 - rate, 5),
            "throughput_rps": round(self.requests / seconds, 3) if seconds > 0 else None,
            "latency": self.hist.summary(),
            "restarts": self.restarts,
            "isolations": self.isolations,
        }


def _connect(path: Path) -> sqlite3.Connection | None:
    from engctl import trust

    # Never through a symlink, never a file another user could have written.
    if not trust.check_path(str(path)):
        return None
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    return conn


def load_rows(db: Path, since: float, until: float) -> tuple[list[sqlite3.Row], int]:
    """The period's roll-up rows: 10 s buckets where kept, 5 min buckets before that; and the
    coarsest bucket length used."""
    conn = _connect(db)
    if conn is None:
        return [], FINE
    try:
        first = conn.execute(
            "SELECT ts - seconds FROM rollup WHERE tier = ? ORDER BY ts LIMIT 1", (FINE,)
        ).fetchone()
        fine_start = first[0] if first is not None else until
        rows = []
        tier = FINE
        if fine_start > since:
            # Before the fine tier's retention: 5-minute buckets that end before it starts
            # (a bucket overlapping it would count its requests twice).
            rows = conn.execute(
                "SELECT * FROM rollup WHERE tier = ? AND ts > ? AND ts <= ? ORDER BY ts",
                (COARSE, since, fine_start + 1e-6),
            ).fetchall()
            if rows:
                tier = COARSE
        rows += conn.execute(
            "SELECT * FROM rollup WHERE tier = ? AND ts > ? AND ts <= ? ORDER BY ts",
            (FINE, since, until + FINE),
        ).fetchall()
    except sqlite3.Error as exc:
        raise UsageError(f"cannot read the history database {db}: {exc}") from exc
    finally:
        conn.close()
    return rows, tier


def load_actions(db: Path, since: float, until: float, engine: str | None) -> list[ReportAction]:
    """Policy actions (and crashes) of the period from the event log, oldest first."""
    conn = _connect(db)
    if conn is None:
        return []
    try:
        marks = ",".join("?" * len(POLICY_KINDS))
        sql = (
            f"SELECT at, kind, engine, instance, to_state, reason, data FROM events"
            f" WHERE at >= ? AND at <= ? AND (kind IN ({marks})"
            " OR (kind = ? AND to_state IN (?, ?)))"
        )
        crashed = (E.INSTANCE_STATE, InstanceState.BACKOFF, InstanceState.FATAL)
        args: list[Any] = [since, until, *POLICY_KINDS, *crashed]
        if engine is not None:
            sql += " AND engine = ?"
            args.append(engine)
        rows = conn.execute(sql + " ORDER BY id", args).fetchall()
    except sqlite3.Error as exc:
        raise UsageError(f"cannot read the event log {db}: {exc}") from exc
    finally:
        conn.close()
    out: list[ReportAction] = []
    for r in rows:
        kind = r["kind"]
        data = json.loads(r["data"]) if r["data"] else {}
        if kind == E.INSTANCE_HEALTH and _routine_health(data):
            continue  # every start-up passes its first probes: routine, not an action
        if kind == E.INSTANCE_STATE:
            # A report's own names for the two states that are a policy's doing.
            crash = r["to_state"] == InstanceState.BACKOFF
            kind = "instance.crashed" if crash else "instance.fatal"
        out.append(
            {
                "at": r["at"],
                "kind": kind,
                "engine": r["engine"],
                "instance": r["instance"],
                "reason": r["reason"],
                "data": data,
            }
        )
    return out


def _routine_health(data: dict[str, Any]) -> bool:
    """A health change every start-up makes: unknown -> healthy."""
    before, after = data.get("from_health"), data.get("to_health")
    return before == Health.UNKNOWN and after == Health.HEALTHY


def build_report(
    rows: Iterable[sqlite3.Row | dict[str, Any]],
    actions: Sequence[ReportAction],
    since: float,
    until: float,
    tier: int,
    engine: str | None = None,
) -> ReportDoc:
    """The report object (schema in docs/json.md) from roll-up rows and actions."""
    rows = list(rows)
    # Rates are over the time the history covers, not the whole period asked for (a daemon
    # started five minutes ago has no hour of traffic to average over).
    starts = [r["ts"] - r["seconds"] for r in rows]
    covered_from = max(since, min(starts)) if starts else since
    covered_to = min(until, max(r["ts"] for r in rows)) if rows else until
    seconds = max(covered_to - covered_from, 1e-9) if rows else max(until - since, 1e-9)
    instances: dict[str, Figures] = {}
    meta: dict[str, tuple[str, str]] = {}
    types: dict[str, list[int]] = {}
    host_cpu = Figures()
    mem_max = mem_total = 0
    io = dict.fromkeys(_IO, 0)
    for row in rows:
        kind = row["kind"]
        if kind == "instance":
            if engine is not None and row["engine"] != engine:
                continue
            instances.setdefault(row["name"], Figures()).add(row)
            meta[row["name"]] = (row["engine"], row["type"])
        elif kind == "type":
            data = json.loads(row["data"] or "{}")
            q = types.setdefault(row["name"], [0, 0, 0])
            q[0] += data.get("samples", 0)
            q[1] += data.get("queued_samples", 0)
            q[2] = max(q[2], data.get("queue_max", 0))
        elif kind == "host":
            data = json.loads(row["data"] or "{}")
            if row["cpu_percent"] is not None:
                host_cpu.cpu_total += row["cpu_percent"]
                host_cpu.cpu_n += 1
            mem_max = max(mem_max, row["rss_bytes"] or 0)
            mem_total = data.get("mem_total", mem_total)
            for k in _IO:
                io[k] += data.get(k, 0)
    engines: dict[str, list[str]] = {}
    for inst_id, (eng, _t) in sorted(meta.items(), key=lambda kv: _inst_key(kv[0])):
        engines.setdefault(eng, []).append(inst_id)
    total = Figures()
    engine_out: list[ReportEngine] = []
    for name in sorted(engines):
        figs = Figures()
        inst_out: list[ReportInstance] = []
        for inst_id in engines[name]:
            f = instances[inst_id]
            figs.merge(f)
            inst_out.append(
                {
                    "id": inst_id,
                    **f.to_json(seconds),
                    "cpu_percent_mean": round(f.cpu_total / f.cpu_n, 2) if f.cpu_n else None,
                    "rss_bytes_max": f.rss_max,
                    "state_seconds": {k: round(v, 1) for k, v in sorted(f.states.items())},
                    "weight": f.last.get("weight"),
                    "max_rss": f.last.get("max_rss"),
                }
            )
        total.merge(figs)
        engine_out.append(
            {
                "name": name,
                "type": meta[engines[name][0]][1],
                **figs.to_json(seconds),
                "instances": inst_out,
            }
        )
    type_names = {t for _e, t in meta.values()} if engine is not None else set(types)
    type_out: list[ReportType] = []
    configured = _configured_instances(instances, meta)
    for t in sorted(type_names | {t for _e, t in meta.values()}):
        samples, queued, peak = types.get(t, [0, 0, 0])
        seen = sum(1 for _e, tt in meta.values() if tt == t)
        setting = [n for (eng, tt), n in configured.items() if tt == t]
        type_out.append(
            {
                "type": t,
                # Its engines' `instances` setting as last recorded (instances seen in
                # the period when the history predates that record).
                "instances": sum(setting) if setting else seen,
                "queued_share": round(queued / samples, 4) if samples else None,
                "queue_max": peak,
                "samples": samples,
            }
        )
    host_out: ReportHost = {
        "cpu_percent_mean": (
            round(host_cpu.cpu_total / host_cpu.cpu_n, 2) if host_cpu.cpu_n else None
        ),
        "memory_used_max": mem_max or None,
        "memory_total": mem_total or None,
        "disk_read_bytes": io["disk_read_bytes"],
        "disk_write_bytes": io["disk_write_bytes"],
        "net_sent_bytes": io["net_sent_bytes"],
        "net_recv_bytes": io["net_recv_bytes"],
    }
    report: ReportDoc = {
        "period": {
            "since": since,
            "until": until,
            "seconds": round(until - since, 3),
            "covered_seconds": round(seconds, 3) if rows else 0.0,
            "bucket_seconds": tier,
            "engine": engine,
        },
        "totals": total.to_json(seconds),
        "engines": engine_out,
        "types": type_out,
        "host": host_out,
        "worst": _worst(instances),
        "actions": list(actions),
        "suggestions": suggest(instances, meta, type_out, actions, seconds),
    }
    return report


_IO = ("disk_read_bytes", "disk_write_bytes", "net_sent_bytes", "net_recv_bytes")


def _configured_instances(
    instances: dict[str, Figures], meta: dict[str, tuple[str, str]]
) -> dict[tuple[str, str], int]:
    """(engine, type) -> the engine's `instances` setting in its latest row that records it."""
    latest: dict[tuple[str, str], tuple[float, int]] = {}
    for inst_id, f in instances.items():
        n = f.last.get("instances")
        if isinstance(n, int) and not isinstance(n, bool):
            key = meta[inst_id]
            if key not in latest or f.last_ts > latest[key][0]:
                latest[key] = (f.last_ts, n)
    return {k: n for k, (_ts, n) in latest.items()}


def _inst_key(inst_id: str) -> tuple[str, int]:
    name, idx = split_instance_id(inst_id)
    return name, int(idx) if idx is not None and idx.isdigit() else -1


def _worst(instances: dict[str, Figures], n: int = 3) -> ReportWorst:
    judged = [(i, f) for i, f in instances.items() if f.ok + f.failed >= MIN_REQUESTS]
    by_err = sorted(
        ((i, f) for i, f in judged if (f.error_rate or 0) > 0),
        key=lambda x: -(x[1].error_rate or 0),
    )
    by_p99 = sorted(
        ((i, f) for i, f in judged if f.hist.count),
        key=lambda x: -(x[1].hist.percentile_ms(0.99) or 0),
    )
    return {
        "by_error_rate": [
            {"instance": i, "error_rate": round(f.error_rate or 0, 4), "requests": f.requests}
            for i, f in by_err[:n]
        ],
        "by_p99": [
            {
                "instance": i,
                "p99_ms": round(f.hist.percentile_ms(0.99) or 0, 3),
                "requests": f.requests,
            }
            for i, f in by_p99[:n]
        ],
    }


def suggest(
    instances: dict[str, Figures],
    meta: dict[str, tuple[str, str]],
    types: list[ReportType],
    actions: Sequence[ReportAction],
    seconds: float,
) -> list[Suggestion]:
    """Concrete suggestions; each holds only when its numbers say so, and carries them."""
    out: list[Suggestion] = []
    for tq in types:
        share = tq["queued_share"]
        if (
            share is not None
            and share >= QUEUED_SHARE
            and tq["samples"] >= MIN_QUEUE_SAMPLES
            and round(share * tq["samples"]) >= MIN_QUEUED
        ):
            out.append(
                {
                    "kind": "raise_instances",
                    "target": tq["type"],
                    "message": (
                        f"type {tq['type']} had requests waiting {share:.0%} of the time"
                        f" (longest queue {tq['queue_max']}): raise its instances"
                        f" (now {tq['instances']})"
                    ),
                    "evidence": {
                        "queued_share": share,
                        "queue_max": tq["queue_max"],
                        "instances": tq["instances"],
                        "samples": tq["samples"],
                    },
                }
            )
    by_type: dict[str, dict[str, float]] = {}
    for inst_id, f in instances.items():
        p99 = f.hist.percentile_ms(0.99)
        if f.hist.count >= MIN_REQUESTS and p99 is not None:
            by_type.setdefault(meta[inst_id][1], {})[inst_id] = p99
    for _t, p99s in sorted(by_type.items()):
        for inst_id, p99 in sorted(p99s.items()):
            peers = [v for k, v in p99s.items() if k != inst_id]
            if not peers:
                continue
            median = statistics.median(peers)
            slow = instances[inst_id].hist.count_from_ms(P99_FACTOR * median)
            if median > 0 and p99 >= P99_FACTOR * median and slow >= MIN_SLOW:
                weight = instances[inst_id].last.get("weight")
                out.append(
                    {
                        "kind": "investigate_latency",
                        "target": inst_id,
                        "message": (
                            f"{inst_id} p99 {p99:.2f} ms is {p99 / median:.1f}× its peers'"
                            f" median {median:.2f} ms: investigate it or lower its weight"
                            f" (now {weight})"
                        ),
                        "evidence": {
                            "p99_ms": round(p99, 3),
                            "peers_median_p99_ms": round(median, 3),
                            "ratio": round(p99 / median, 2),
                            "requests": instances[inst_id].requests,
                            "slow_requests": slow,
                            "weight": weight,
                        },
                    }
                )
    memory: dict[str, list[ReportAction]] = {}
    for a in actions:
        if a["kind"] == E.INSTANCE_DRAINING and a["data"].get("cause") in _MEMORY_CAUSES:
            memory.setdefault(a["engine"] or "?", []).append(a)
    for eng, acts in sorted(memory.items()):
        peak = max((a["data"].get("rss_bytes", 0) for a in acts), default=0)
        # The engine's own setting (recorded with its figures), else what the events said.
        limit = next(
            (f.last["max_rss"] for i, f in sorted(instances.items()) if meta[i][0] == eng
             and f.last.get("max_rss")),
            next((a["data"]["max_rss"] for a in acts if a["data"].get("max_rss")), None),
        )  # fmt: skip
        leak = any(a["data"].get("cause") == DrainCause.MEMORY_LEAK for a in acts)
        fix = "fix the leak" if leak else "fix what grows"
        raise_it = f"raise limits.max_rss (now {_mib(limit)})" if limit else "set limits.max_rss"
        out.append(
            {
                "kind": "memory_restarts",
                "target": eng,
                "message": (
                    f"{eng} was restarted {len(acts)}× for memory (peak RSS {_mib(peak)}):"
                    f" {raise_it} or {fix}"
                ),
                "evidence": {"restarts": len(acts), "rss_bytes_max": peak, "max_rss": limit},
            }
        )
    for inst_id, f in sorted(instances.items()):
        rate = f.error_rate
        if (
            rate is not None
            and f.ok + f.failed >= MIN_REQUESTS
            and f.failed >= MIN_FAILURES
            and rate >= ERROR_RATE
        ):
            out.append(
                {
                    "kind": "investigate_errors",
                    "target": inst_id,
                    "message": (
                        f"{inst_id} failed {rate:.0%} of {f.ok + f.failed} requests"
                        f" ({f.errors} errors, {f.timeouts} timeouts, {f.lost} lost):"
                        f" see `engctl logs {inst_id}`"
                    ),
                    "evidence": {
                        "error_rate": round(rate, 4),
                        "requests": f.ok + f.failed,
                        "errors": f.errors,
                        "timeouts": f.timeouts,
                        "lost": f.lost,
                    },
                }
            )
        if f.restarts >= RESTARTS:
            out.append(
                {
                    "kind": "investigate_restarts",
                    "target": inst_id,
                    "message": (
                        f"{inst_id} restarted {f.restarts}× in {seconds / 60:.0f} min:"
                        f" see `engctl logs {inst_id}` and `engctl events --engine"
                        f" {meta[inst_id][0]}`"
                    ),
                    "evidence": {"restarts": f.restarts, "period_seconds": round(seconds)},
                }
            )
    used: dict[str, int] = {}
    up: dict[str, float] = {}
    engines_of: dict[str, set[str]] = {}
    for inst_id, f in instances.items():
        eng, t = meta[inst_id]
        used[t] = used.get(t, 0) + f.requests
        up[t] = up.get(t, 0.0) + f.up_seconds
        engines_of.setdefault(t, set()).add(eng)
    for t in sorted(used):
        if used[t] == 0 and up[t] >= UNUSED_SECONDS:
            names = ", ".join(sorted(engines_of[t]))
            out.append(
                {
                    "kind": "remove_unused",
                    "target": t,
                    "message": (
                        f"type {t} served no request in {seconds / 60:.0f} min while its"
                        f" instances were up {up[t] / 3600:.1f} instance-hours: remove or"
                        f" scale down {names}"
                    ),
                    "evidence": {"requests": 0, "up_seconds": round(up[t], 1), "engines": names},
                }
            )
    return out


def _mib(n: int | None) -> str:
    return "-" if not n else f"{n / (1024 * 1024):.0f} MiB"


def make_report(
    history_db: Path,
    events_db: Path,
    since: float,
    until: float | None = None,
    engine: str | None = None,
) -> ReportDoc:
    """Read the history database and the event log and build the report."""
    until = time.time() if until is None else until
    if since >= until:
        raise UsageError("--since must be in the past")
    rows, tier = load_rows(history_db, since, until)
    actions = load_actions(events_db, since, until, engine)
    return build_report(rows, actions, since, until, tier, engine)
