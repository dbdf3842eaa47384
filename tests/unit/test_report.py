"""The report as plain functions over roll-up rows: --since parsing, figures summed per
instance, engine and type, merged latency percentiles, worst lists, the JSON schema, each
suggestion exactly when its condition holds (with its numbers), and reading the two tiers of a
real history file without counting a request twice."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import pytest

from engctl import report as rp
from engctl.daemon import events as events_mod
from engctl.daemon.history import COLUMNS, SCHEMA
from engctl.documents import ReportAction
from engctl.errors import EXIT_USAGE, UsageError
from engctl.histogram import Histogram, bucket_bounds, bucket_of

T0 = 1_800_000_000.0  # any fixed epoch: the analysis never reads the clock
NOW = T0 + 3600.0


# -- rows ---------------------------------------------------------------------------------------


def lat(*values_ms: float, n: int = 1) -> str:
    """The encoded histogram of `n` copies of each value."""
    h = Histogram()
    for v in values_ms:
        for _ in range(n):
            h.record_ms(v)
    return h.encode()


def at_low(us: int, n: int) -> str:
    """`n` readings of exactly `us`, a bucket's low bound: every percentile is exactly `us`
    (the middle of the bucket, clamped to the max seen)."""
    assert bucket_bounds(bucket_of(us))[0] == us
    return Histogram.from_counts({bucket_of(us): n}, sum_us=us * n, max_us=us).encode()


def inst_row(
    name: str,
    ts: float = T0 + 10,
    *,
    engine: str | None = None,
    type: str = "T",
    requests: int | None = None,
    ok: int = 0,
    errors: int = 0,
    timeouts: int = 0,
    lost: int = 0,
    latency: str | None = None,
    cpu: float | None = None,
    rss: int | None = None,
    restarts: int = 0,
    isolations: int = 0,
    states: dict[str, float] | None = None,
    weight: float = 1.0,
    max_rss: int | None = None,
    tier: int = 10,
    seconds: float | None = None,
    wanted: int | None = None,
) -> dict[str, Any]:
    """A roll-up row of one instance, shaped like those Rollups.close writes."""
    if requests is None:
        requests = ok + errors + timeouts + lost
    data = {
        "states": {"ready": float(tier)} if states is None else states,
        "state": "ready",
        "health": "healthy",
        "eligibility": "active",
        "weight": weight,
        "max_rss": max_rss,
    }
    if wanted is not None:
        data["instances"] = wanted
    row = {
        "tier": tier,
        "ts": ts,
        "seconds": float(tier) if seconds is None else seconds,
        "kind": "instance",
        "name": name,
        "engine": engine or name.partition("#")[0],
        "type": type,
        "requests": requests,
        "ok": ok,
        "errors": errors,
        "timeouts": timeouts,
        "lost": lost,
        "latency": latency,
        "cpu_percent": cpu,
        "rss_bytes": rss,
        "restarts": restarts,
        "isolations": isolations,
        "data": json.dumps(data),
    }
    assert tuple(row) == COLUMNS
    return row


def type_row(
    t: str, ts: float = T0 + 10, samples: int = 10, queued: int = 0, qmax: int = 0, tier: int = 10
) -> dict[str, Any]:
    data = {"samples": samples, "queued_samples": queued, "queue_max": qmax}
    return dict(
        zip(
            COLUMNS,
            (tier, ts, float(tier), "type", t, None, t, 0, 0, 0, 0, 0, None, None, None, 0, 0,
             json.dumps(data)),
            strict=True,
        )
    )  # fmt: skip


def host_row(ts: float = T0 + 10, cpu: float = 12.5, mem: int = 4 << 30, tier: int = 10,
             **io: int) -> dict[str, Any]:  # fmt: skip
    data = {
        "mem_total": 16 << 30,
        "disk_read_bytes": io.get("disk_read_bytes", 100),
        "disk_write_bytes": io.get("disk_write_bytes", 200),
        "net_sent_bytes": io.get("net_sent_bytes", 300),
        "net_recv_bytes": io.get("net_recv_bytes", 400),
    }
    return dict(
        zip(
            COLUMNS,
            (tier, ts, float(tier), "host", "host", None, None, 0, 0, 0, 0, 0, None, cpu, mem, 0,
             0, json.dumps(data)),
            strict=True,
        )
    )  # fmt: skip


def build(
    rows: list[dict[str, Any]],
    actions: list[dict[str, Any]] | None = None,
    engine: str | None = None,
    since: float = T0,
    until: float = NOW,
) -> dict[str, Any]:
    acts = cast("list[ReportAction]", actions or [])
    r = cast("dict[str, Any]", rp.build_report(rows, acts, since, until, 10, engine))
    # The object is plain JSON: what `--json` prints and a reader parses back.
    assert json.loads(json.dumps(r)) == r
    return r


def kinds(r: dict[str, Any]) -> list[str]:
    return [s["kind"] for s in r["suggestions"]]


def only(r: dict[str, Any], kind: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [s for s in r["suggestions"] if s["kind"] == kind]
    assert len(found) == 1, r["suggestions"]
    return found[0]


def action(
    kind: str, reason: str, engine: str = "a", inst: str = "a#0", **data: Any
) -> dict[str, Any]:
    return {"at": T0 + 100, "kind": kind, "engine": engine, "instance": inst, "reason": reason,
            "data": data}  # fmt: skip


# -- --since ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ago"),
    [
        ("90s", 90),
        ("10m", 600),
        ("1h", 3600),
        ("1.5h", 5400),
        ("7d", 7 * 86400),
        ("2w", 14 * 86400),
        (" 10m ", 600),
        ("0s", 0),
    ],
)
def test_parse_since_durations(text: str, ago: float) -> None:
    assert rp.parse_since(text, NOW) == pytest.approx(NOW - ago)


@pytest.mark.parametrize(
    ("text", "when"),
    [
        ("2026-11-22T10:00", datetime(2026, 11, 22, 10, 0)),
        ("2026-11-22 10:00:30", datetime(2026, 11, 22, 10, 0, 30)),
        ("2026-11-22", datetime(2026, 11, 22)),
    ],
)
def test_parse_since_iso_is_local_time(text: str, when: datetime) -> None:
    assert rp.parse_since(text, NOW) == when.timestamp()


@pytest.mark.parametrize(
    "text", ["", "garbage", "10", "10x", "-5m", "10 minutes", "m", "1h30m", "2026-13-01"]
)
def test_parse_since_rejects_garbage_with_a_usage_error(text: str) -> None:
    with pytest.raises(UsageError) as err:
        rp.parse_since(text, NOW)
    assert err.value.exit_code == EXIT_USAGE
    assert "--since" in err.value.message and "\n" not in err.value.message


def test_make_report_rejects_a_period_in_the_future(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="past"):
        rp.make_report(tmp_path / "h.db", tmp_path / "e.db", since=NOW + 1, until=NOW)


def test_make_report_without_any_file_is_an_empty_report(tmp_path: Path) -> None:
    """No history yet (never started, or metrics off): an empty report, not an error."""
    r = rp.make_report(tmp_path / "h.db", tmp_path / "e.db", since=T0, until=NOW)
    assert r["totals"]["requests"] == 0
    assert r["engines"] == [] and r["actions"] == [] and r["suggestions"] == []
    assert r["totals"]["success_rate"] is None and r["totals"]["latency"]["p50_ms"] is None


# -- figures ------------------------------------------------------------------------------------


@pytest.fixture
def busy() -> list[dict[str, Any]]:
    """Three 10 s buckets of engine a (type T: a#0, a#1) and b (type U: b#0), with queue and
    host rows."""
    rows: list[dict[str, Any]] = []
    for k, ts in enumerate((T0 + 10, T0 + 20, T0 + 30)):
        rows += [
            inst_row("a#0", ts, ok=9, errors=1, latency=lat(1.0, n=9), cpu=10.0 * (k + 1),
                     rss=(100 + k) << 20, states={"ready": 8.0, "busy": 2.0}, weight=1.0 + k),
            inst_row("a#1", ts, ok=5, latency=lat(2.0, 4.0), cpu=5.0, rss=50 << 20,
                     restarts=1 if k == 1 else 0, isolations=1 if k == 2 else 0),
            inst_row("b#0", ts, type="U", ok=1, timeouts=1, lost=1, latency=lat(30.0)),
            type_row("T", ts, samples=10, queued=k, qmax=k * 2),
            type_row("U", ts, samples=10),
            host_row(ts, cpu=10.0 + k, mem=(4 << 30) + k, disk_read_bytes=1000),
        ]  # fmt: skip
    return rows


def test_totals_are_the_sums_of_the_rows(busy: list[dict[str, Any]]) -> None:
    r = build(busy)
    t = r["totals"]
    assert (t["requests"], t["ok"], t["errors"], t["timeouts"], t["lost"]) == (
        3 * (10 + 5 + 3),
        3 * (9 + 5 + 1),
        3,
        3,
        3,
    )
    assert t["success_rate"] == round(45 / 54, 5)
    covered = r["period"]["covered_seconds"]
    # Rates are over the time the rows cover, not the whole hour asked for.
    assert 0 < covered < 3600
    assert t["throughput_rps"] == round(54 / covered, 3)
    assert (t["restarts"], t["isolations"]) == (1, 1)
    assert r["period"] == {
        "since": T0,
        "until": NOW,
        "seconds": 3600.0,
        "covered_seconds": covered,
        "bucket_seconds": 10,
        "engine": None,
    }


def test_latency_percentiles_merge_every_row(busy: list[dict[str, Any]]) -> None:
    """The period's percentiles are those of one histogram of every reading, not an average
    of per-bucket percentiles."""
    r = build(busy)
    everything = Histogram()
    for _ in range(3):
        for v in [1.0] * 9 + [2.0, 4.0, 30.0]:
            everything.record_ms(v)
    assert r["totals"]["latency"] == everything.summary()
    assert r["totals"]["latency"]["count"] == 36
    a = next(e for e in r["engines"] if e["name"] == "a")
    assert a["latency"]["count"] == 33
    assert a["latency"]["max_ms"] == 4.0
    assert a["latency"]["p50_ms"] == pytest.approx(1.0, rel=1 / 16)
    b = next(e for e in r["engines"] if e["name"] == "b")
    assert b["latency"]["p99_ms"] == pytest.approx(30.0, rel=1 / 16)


def test_per_engine_and_instance_figures(busy: list[dict[str, Any]]) -> None:
    r = build(busy)
    assert [e["name"] for e in r["engines"]] == ["a", "b"]
    a, b = r["engines"]
    assert (a["type"], b["type"]) == ("T", "U")
    assert [i["id"] for i in a["instances"]] == ["a#0", "a#1"]
    assert (a["requests"], a["ok"], a["errors"]) == (45, 42, 3)
    assert (b["requests"], b["ok"], b["timeouts"], b["lost"]) == (9, 3, 3, 3)
    assert b["success_rate"] == round(3 / 9, 5)
    a0, a1 = a["instances"]
    assert (a0["requests"], a0["ok"], a0["errors"]) == (30, 27, 3)
    assert a0["cpu_percent_mean"] == 20.0
    assert a0["rss_bytes_max"] == 102 << 20
    assert a0["state_seconds"] == {"busy": 6.0, "ready": 24.0}
    assert a0["weight"] == 3.0  # the last bucket's
    assert a0["max_rss"] is None
    assert (a1["restarts"], a1["isolations"], a1["rss_bytes_max"]) == (1, 1, 50 << 20)
    assert a1["throughput_rps"] == round(15 / r["period"]["covered_seconds"], 3)
    # an engine's figures are the sums of its instances'
    for key in ("requests", "ok", "errors", "timeouts", "lost", "restarts", "isolations"):
        assert a[key] == a0[key] + a1[key]


def test_types_queue_share_and_host(busy: list[dict[str, Any]]) -> None:
    r = build(busy)
    assert r["types"] == [
        {"type": "T", "instances": 2, "queued_share": round(3 / 30, 4), "queue_max": 4,
         "samples": 30},
        {"type": "U", "instances": 1, "queued_share": 0.0, "queue_max": 0, "samples": 30},
    ]  # fmt: skip
    assert r["host"] == {
        "cpu_percent_mean": 11.0,
        "memory_used_max": (4 << 30) + 2,
        "memory_total": 16 << 30,
        "disk_read_bytes": 3000,
        "disk_write_bytes": 600,
        "net_sent_bytes": 900,
        "net_recv_bytes": 1200,
    }


def test_type_without_queue_samples_has_no_share() -> None:
    r = build([inst_row("a#0", ok=3)])
    assert r["types"] == [
        {"type": "T", "instances": 1, "queued_share": None, "queue_max": 0, "samples": 0}
    ]
    assert r["host"]["cpu_percent_mean"] is None


def test_engine_filter_keeps_only_its_instances_and_types(busy: list[dict[str, Any]]) -> None:
    r = build(busy, engine="b")
    assert [e["name"] for e in r["engines"]] == ["b"]
    assert r["totals"]["requests"] == 9
    assert [t["type"] for t in r["types"]] == ["U"]
    assert r["period"]["engine"] == "b"
    assert build(busy, engine="nope")["engines"] == []


def test_worst_lists(busy: list[dict[str, Any]]) -> None:
    """Worst by error rate and by p99, only instances with ≥ 20 finished requests, worst
    first, at most three."""
    r = build(busy)
    # a#0 has 30 finished (10 % failed); a#1 and b#0 have 15 and 9: not judged.
    assert r["worst"] == {
        "by_error_rate": [{"instance": "a#0", "error_rate": 0.1, "requests": 30}],
        "by_p99": [{"instance": "a#0", "p99_ms": r["engines"][0]["instances"][0]["latency"]
                    ["p99_ms"], "requests": 30}],
    }  # fmt: skip
    rows = [
        inst_row(f"w#{k}", ok=100 - k, errors=k, latency=lat(float(k + 1), n=20)) for k in range(5)
    ]
    w = build(rows)["worst"]
    assert [x["instance"] for x in w["by_error_rate"]] == ["w#4", "w#3", "w#2"]
    assert [x["instance"] for x in w["by_p99"]] == ["w#4", "w#3", "w#2"]
    assert w["by_error_rate"][0] == {"instance": "w#4", "error_rate": 0.04, "requests": 100}


def test_instances_sort_by_number_not_text() -> None:
    rows = [inst_row(f"a#{k}", ok=1) for k in (10, 2, 1, 0)]
    assert [i["id"] for i in build(rows)["engines"][0]["instances"]] == [
        "a#0",
        "a#1",
        "a#2",
        "a#10",
    ]


# -- JSON schema ---------------------------------------------------------------------------------

NUM = (int, float)
OPT_NUM = (int, float, type(None))
LATENCY = {"count": int, "p50_ms": OPT_NUM, "p90_ms": OPT_NUM, "p99_ms": OPT_NUM,
           "max_ms": OPT_NUM, "mean_ms": OPT_NUM}  # fmt: skip
FIGURES = {"requests": int, "ok": int, "errors": int, "timeouts": int, "lost": int,
           "success_rate": OPT_NUM, "throughput_rps": OPT_NUM, "latency": LATENCY,
           "restarts": int, "isolations": int}  # fmt: skip
INSTANCE = {"id": str, **FIGURES, "cpu_percent_mean": OPT_NUM, "rss_bytes_max": (int, type(None)),
            "state_seconds": dict, "weight": OPT_NUM, "max_rss": (int, type(None))}  # fmt: skip
ENGINE = {"name": str, "type": str, **FIGURES, "instances": [INSTANCE]}
SCHEMA_OF_REPORT: dict[str, Any] = {
    "period": {"since": NUM, "until": NUM, "seconds": NUM, "covered_seconds": NUM,
               "bucket_seconds": int,
               "engine": (str, type(None))},
    "totals": FIGURES,
    "engines": [ENGINE],
    "types": [{"type": str, "instances": int, "queued_share": OPT_NUM, "queue_max": int,
               "samples": int}],
    "host": {"cpu_percent_mean": OPT_NUM, "memory_used_max": (int, type(None)),
             "memory_total": (int, type(None)), "disk_read_bytes": int,
             "disk_write_bytes": int, "net_sent_bytes": int, "net_recv_bytes": int},
    "worst": {"by_error_rate": [{"instance": str, "error_rate": NUM, "requests": int}],
              "by_p99": [{"instance": str, "p99_ms": NUM, "requests": int}]},
    "actions": [{"at": NUM, "kind": str, "engine": (str, type(None)),
                 "instance": (str, type(None)), "reason": str, "data": dict}],
    "suggestions": [{"kind": str, "target": str, "message": str, "evidence": dict}],
}  # fmt: skip


def check_schema(value: Any, schema: Any, where: str = "report") -> None:
    """`value` has exactly the keys of `schema` (dicts), items of its one shape (lists), or a
    type among those allowed; bool never passes for a number."""
    if isinstance(schema, dict):
        assert isinstance(value, dict), where
        assert set(value) == set(schema), f"{where}: {sorted(value)} != {sorted(schema)}"
        for k, sub in schema.items():
            check_schema(value[k], sub, f"{where}.{k}")
    elif isinstance(schema, list):
        assert isinstance(value, list), where
        for k, item in enumerate(value):
            check_schema(item, schema[0], f"{where}[{k}]")
    else:
        assert not isinstance(value, bool), where
        assert isinstance(value, schema), f"{where}: {value!r} is not {schema}"


def test_report_json_schema(busy: list[dict[str, Any]]) -> None:
    """The documented `report --json` object, every list non-empty so item shapes are checked."""
    busy = [*busy, inst_row("a#0", T0 + 40, ok=0, errors=30, restarts=3)]
    acts = [action("instance.draining", "memory: RSS 300 MiB is above max_rss 256 MiB",
                   cause="memory", rss_bytes=300 << 20, max_rss=256 << 20)]  # fmt: skip
    r = build(busy, acts)
    check_schema(r, SCHEMA_OF_REPORT)
    assert r["engines"] and r["engines"][0]["instances"] and r["types"] and r["actions"]
    assert r["worst"]["by_error_rate"] and r["worst"]["by_p99"] and r["suggestions"]
    assert list(r) == list(SCHEMA_OF_REPORT)  # key order is stable too


def test_empty_report_json_schema() -> None:
    r = build([])
    check_schema(r, SCHEMA_OF_REPORT)
    assert r["totals"]["latency"]["count"] == 0
    assert r["totals"]["throughput_rps"] == 0.0
    assert r["host"]["memory_total"] is None


# -- suggestions: each exactly when its numbers say so ---------------------------------------------


def healthy(**overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """Two busy, fast, error-free instances of type T and nothing waiting: no suggestion.
    `overrides` replaces an instance's keyword arguments, by instance name."""
    base: dict[str, dict[str, Any]] = {
        "a#0": {"ok": 100, "latency": at_low(1024, 100), "states": {"ready": 300.0}},
        "a#1": {"ok": 100, "latency": at_low(1024, 100), "states": {"ready": 300.0}},
    }
    rows = [inst_row(name, **{**kw, **overrides.get(name.replace("#", "_"), {})})
            for name, kw in base.items()]  # fmt: skip
    return [*rows, type_row("T", samples=30, queued=0), host_row()]


def test_healthy_figures_suggest_nothing() -> None:
    r = build(healthy())
    assert r["suggestions"] == []
    assert r["worst"]["by_error_rate"] == []


@pytest.mark.parametrize(
    ("samples", "queued", "expected"),
    [
        (30, 3, True),
        (30, 2, False),
        (100, 10, True),
        (100, 9, False),
        (30, 30, True),
        (29, 29, False),  # under the minimum sample (issue 10.7)
        (20, 2, False),  # 10 %, but two busy seconds are not a pattern
    ],
)
def test_raise_instances_when_requests_wait_ten_percent_of_samples(
    samples: int, queued: int, expected: bool
) -> None:
    """A type whose requests waited in ≥ 10 % of ≥ 30 samples (≥ 3 of them); evidence from
    the type rows."""
    rows = [*healthy()[:2], type_row("T", samples=samples, queued=queued, qmax=7)]
    r = build(rows)
    if not expected:
        assert r["suggestions"] == []
        return
    assert kinds(r) == ["raise_instances"]
    s = only(r, "raise_instances")
    assert s["target"] == "T"
    assert s["evidence"] == {"queued_share": round(queued / samples, 4), "queue_max": 7,
                             "instances": 2, "samples": samples}  # fmt: skip
    assert f"{queued / samples:.0%}" in s["message"] and "(now 2)" in s["message"]


def test_raise_instances_sums_samples_over_buckets() -> None:
    """3 of 15 samples in one bucket and 0 of 15 in the next is 10 %: still suggested."""
    rows = [*healthy()[:2], type_row("T", T0 + 10, 15, 3, 3), type_row("T", T0 + 20, 15, 0, 0)]
    assert only(build(rows), "raise_instances")["evidence"]["queued_share"] == 0.1
    rows = [*healthy()[:2], type_row("T", T0 + 10, 15, 3, 3), type_row("T", T0 + 20, 16, 0, 0)]
    assert build(rows)["suggestions"] == []


def test_raise_instances_says_the_engines_instances_setting() -> None:
    """`(now N)` is the engines' `instances` setting as last recorded, not the instances
    that happened to have rows in the period (issue 10.7)."""
    rows = [
        inst_row("a#0", ok=100, latency=at_low(1024, 100), wanted=2),
        inst_row("a#1", ok=100, latency=at_low(1024, 100), wanted=2),
        inst_row("a#0", T0 + 20, ok=100, latency=at_low(1024, 100), wanted=4),
        type_row("T", samples=30, queued=10),
    ]
    s = only(build(rows), "raise_instances")
    assert s["evidence"]["instances"] == 4 and "(now 4)" in s["message"]


def test_investigate_latency_when_p99_is_three_times_the_peers() -> None:
    """p99 3.072 ms against a peer's 1.024 ms: exactly 3×, suggested with the numbers."""
    r = build(healthy(a_1={"latency": at_low(3072, 100)}))
    assert kinds(r) == ["investigate_latency"]
    s = only(r, "investigate_latency")
    assert s["target"] == "a#1"
    assert s["evidence"] == {"p99_ms": 3.072, "peers_median_p99_ms": 1.024, "ratio": 3.0,
                             "requests": 100, "slow_requests": 100, "weight": 1.0}  # fmt: skip
    assert "3.0×" in s["message"] and "(now 1.0)" in s["message"]


def test_one_slow_request_is_not_a_slow_instance() -> None:
    """50 fast requests and one of 10 ms: its p99 is that one request, 10× the peers', but
    a single outlier suggests nothing; five do (issue 10.7: it fired on 1 of 51)."""
    one = Histogram.decode(at_low(1024, 50))
    one.record_ms(10.0)
    assert build(healthy(a_1={"ok": 51, "latency": one.encode()}))["suggestions"] == []
    for _ in range(4):
        one.record_ms(10.0)
    r = build(healthy(a_1={"ok": 55, "latency": one.encode()}))
    assert only(r, "investigate_latency")["evidence"]["slow_requests"] == 5


@pytest.mark.parametrize(
    "slow",
    [
        {"latency": lat(3.0, n=100)},  # p99 2.94 ms: 2.87×
        {"latency": at_low(4096, 19), "ok": 19},  # 4×, but only 19 requests
    ],
)
def test_no_latency_suggestion_below_the_factor_or_the_volume(slow: dict[str, Any]) -> None:
    assert build(healthy(a_1=slow))["suggestions"] == []


def test_latency_is_compared_within_a_type_against_the_peers_median() -> None:
    """Three peers: the slow one is judged against the median of the two others; instances of
    another type are not peers; a lone instance has none."""
    rows = [
        inst_row("a#0", ok=50, latency=at_low(1024, 50)),
        inst_row("a#1", ok=50, latency=at_low(2048, 50)),
        inst_row("a#2", ok=50, latency=at_low(5120, 50)),  # 5120 / median(1024, 2048) = 3.33
        inst_row("b#0", type="U", ok=50, latency=at_low(1 << 20, 50)),  # alone in its type
    ]
    r = build(rows)
    assert kinds(r) == ["investigate_latency"]
    assert only(r, "investigate_latency")["evidence"] == {
        "p99_ms": 5.12, "peers_median_p99_ms": 1.536, "ratio": 3.33, "requests": 50,
        "slow_requests": 50, "weight": 1.0}  # fmt: skip


MEMORY_REASON = "memory: RSS 300 MiB is above max_rss 256 MiB: draining, then a graceful restart"
LEAK_REASON = "memory leak: RSS grew 120 MiB in 600s: draining, then a graceful restart"


def test_memory_restarts_from_drain_events() -> None:
    """Two memory drains of engine a: count, peak RSS and the limit from the events' data."""
    acts = [
        action("instance.draining", MEMORY_REASON, cause="memory", rss_bytes=300 << 20,
               max_rss=256 << 20),
        action("instance.draining", MEMORY_REASON, cause="memory", inst="a#1", rss_bytes=310 << 20,
               max_rss=256 << 20),
    ]  # fmt: skip
    r = build(healthy(), acts)
    assert kinds(r) == ["memory_restarts"]
    s = only(r, "memory_restarts")
    assert s["target"] == "a"
    assert s["evidence"] == {"restarts": 2, "rss_bytes_max": 310 << 20, "max_rss": 256 << 20}
    assert "2×" in s["message"] and "310 MiB" in s["message"]
    assert "raise limits.max_rss (now 256 MiB)" in s["message"]
    assert r["actions"] == acts


def test_memory_leak_restarts_say_fix_the_leak() -> None:
    acts = [action("instance.draining", LEAK_REASON, cause="memory_leak", rss_bytes=200 << 20,
                   growth_bytes=1)]  # fmt: skip
    s = only(build(healthy(), acts), "memory_restarts")
    assert s["evidence"] == {"restarts": 1, "rss_bytes_max": 200 << 20, "max_rss": None}
    assert "fix the leak" in s["message"] and "set limits.max_rss" in s["message"]


def test_memory_restarts_read_the_engines_max_rss() -> None:
    """A leak drain's event need not carry the limit: the engine's own max_rss (recorded
    with its figures) is the one the message names (issue 10.7: "set limits.max_rss" with
    `max_rss: null` for an engine that had max_rss = 200MiB)."""
    acts = [action("instance.draining", LEAK_REASON, cause="memory_leak", rss_bytes=150 << 20,
                   growth_bytes=1)]  # fmt: skip
    rows = healthy(a_0={"max_rss": 200 << 20}, a_1={"max_rss": 200 << 20})
    s = only(build(rows, acts), "memory_restarts")
    assert s["evidence"]["max_rss"] == 200 << 20
    assert "raise limits.max_rss (now 200 MiB)" in s["message"]


def test_memory_restarts_are_read_from_the_cause_not_the_reason_text() -> None:
    """Issue 11: the drain's `cause` says memory, whatever its reason reads; a reason that
    speaks of memory says nothing without it."""
    acts = [
        action("instance.draining", "over the limit", cause="memory", rss_bytes=300 << 20),
        action("instance.draining", "memory leak: says the text", cause="cpu", growth_bytes=1),
    ]
    s = only(build(healthy(), acts), "memory_restarts")
    assert s["evidence"]["restarts"] == 1
    assert "fix what grows" in s["message"]


@pytest.mark.parametrize(
    "act",
    [
        action("instance.draining", "cpu: above max_cpu_percent 90% for 30s (peak 99%)",
               cause="cpu", cpu_percent=99.0),
        action("instance.cpu", "cpu: above max_cpu_percent 90% for 30s (peak 99%)"),
        action("instance.isolated", "memory is a word in this reason"),
        action("instance.crashed", "exited with code 1"),
    ],
)  # fmt: skip
def test_no_memory_suggestion_for_other_actions(act: dict[str, Any]) -> None:
    r = build(healthy(), [act])
    assert r["suggestions"] == []
    assert r["actions"] == [act]


@pytest.mark.parametrize(
    ("ok", "errors", "timeouts", "lost", "expected"),
    [
        (57, 3, 0, 0, True),  # 5 % of 60
        (17, 0, 1, 2, True),  # timeouts and lost count as failures
        (58, 3, 0, 0, False),  # 4.9 %
        (15, 3, 0, 0, False),  # 16.7 %, but of 18 requests only
        (19, 1, 0, 0, False),  # 5 % of 20, but one failure (issue 10.7)
        (0, 0, 0, 0, False),
    ],
)
def test_investigate_errors_at_five_percent_of_twenty(
    ok: int, errors: int, timeouts: int, lost: int, expected: bool
) -> None:
    fig = {"ok": ok, "errors": errors, "timeouts": timeouts, "lost": lost,
           "latency": at_low(1024, ok) if ok else None}  # fmt: skip
    rows = healthy(a_0=fig)
    r = build(rows)
    if not expected:
        assert "investigate_errors" not in kinds(r)
        return
    assert kinds(r) == ["investigate_errors"]
    s = only(r, "investigate_errors")
    finished = ok + errors + timeouts + lost
    assert s["target"] == "a#0"
    assert s["evidence"] == {"error_rate": round((errors + timeouts + lost) / finished, 4),
                             "requests": finished, "errors": errors, "timeouts": timeouts,
                             "lost": lost}  # fmt: skip
    assert "engctl logs a#0" in s["message"]


@pytest.mark.parametrize(("per_bucket", "expected"), [((1, 2), True), ((1, 1), False),
                                                      ((0, 5), True)])  # fmt: skip
def test_investigate_restarts_from_three(per_bucket: tuple[int, int], expected: bool) -> None:
    rows = healthy()
    for ts, restarts in zip((T0 + 20, T0 + 30), per_bucket, strict=True):
        rows.append(inst_row("a#0", ts, ok=10, restarts=restarts, latency=at_low(1024, 10)))
    r = build(rows)
    if not expected:
        assert r["suggestions"] == []
        return
    assert kinds(r) == ["investigate_restarts"]
    s = only(r, "investigate_restarts")
    assert s["target"] == "a#0"
    assert s["evidence"] == {
        "restarts": sum(per_bucket),
        "period_seconds": round(r["period"]["covered_seconds"]),
    }
    assert "engctl events --engine a" in s["message"]


@pytest.mark.parametrize(
    ("b_kw", "expected"),
    [
        ({"states": {"ready": 600.0}}, True),
        ({"states": {"ready": 300.0, "busy": 100.0, "warming": 200.0}}, True),
        ({"states": {"ready": 599.0}}, False),
        ({"states": {"ready": 300.0, "stopped": 3000.0, "backoff": 900.0}}, False),
        ({"states": {"ready": 900.0}, "ok": 1}, False),
        ({"states": {"ready": 900.0}, "errors": 1}, False),
    ],
)
def test_remove_unused_type(b_kw: dict[str, Any], expected: bool) -> None:
    """A type that served no request while up (ready, busy, warming) ≥ 600 instance-seconds."""
    rows = [*healthy(), inst_row("b#0", type="U", **b_kw)]
    r = build(rows)
    if not expected:
        assert "remove_unused" not in kinds(r)
        return
    assert kinds(r) == ["remove_unused"]
    s = only(r, "remove_unused")
    assert s["target"] == "U"
    up = sum(v for k, v in b_kw["states"].items() if k in ("ready", "busy", "warming"))
    assert s["evidence"] == {"requests": 0, "up_seconds": up, "engines": "b"}
    assert "remove or scale down b" in s["message"]


def test_remove_unused_adds_up_instances_and_buckets_of_the_type() -> None:
    """Two engines of type U, 2 × 2 buckets of 150 s up: 600 instance-seconds together."""
    rows = [*healthy()]
    for name in ("b#0", "c#0"):
        for ts in (T0 + 300, T0 + 600):
            rows.append(inst_row(name, ts, type="U", states={"ready": 150.0}, tier=300))
    s = only(build(rows), "remove_unused")
    assert s["evidence"] == {"requests": 0, "up_seconds": 600.0, "engines": "b, c"}


def test_every_suggestion_at_once_each_with_evidence() -> None:
    rows = healthy(
        a_0={"ok": 95, "errors": 5, "latency": at_low(1024, 95), "restarts": 3},
        a_1={"latency": at_low(4096, 100)},
    )
    rows += [type_row("T", T0 + 20, samples=30, queued=30, qmax=3),
             inst_row("b#0", type="U", states={"ready": 3600.0})]  # fmt: skip
    acts = [action("instance.draining", MEMORY_REASON, cause="memory", rss_bytes=1, max_rss=1)]
    r = build(rows, acts)
    assert sorted(kinds(r)) == sorted(
        ["raise_instances", "investigate_latency", "memory_restarts", "investigate_errors",
         "investigate_restarts", "remove_unused"]
    )  # fmt: skip
    for s in r["suggestions"]:
        assert s["evidence"] and all(v is not None for k, v in s["evidence"].items()
                                     if k != "max_rss"), s  # fmt: skip
        assert s["message"] and s["target"]


# -- reading the files ---------------------------------------------------------------------------


def write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(SCHEMA)
    with conn:
        conn.executemany(
            f"INSERT INTO rollup VALUES ({','.join('?' * len(COLUMNS))})",
            [tuple(r[c] for c in COLUMNS) for r in rows],
        )
    conn.close()


@pytest.fixture
def tiers(tmp_path: Path) -> Iterator[Path]:
    """An hour at 1 request/s as the daemon stores it: 5-minute rows for the whole hour, and
    10-second rows for its second half only (the first half past the fine retention)."""
    rows = []
    for k in range(1, 13):
        rows.append(inst_row("a#0", T0 + 300 * k, ok=300, tier=300, latency=lat(1.0, n=300)))
        rows.append(type_row("T", T0 + 300 * k, samples=300, queued=30, tier=300))
    for k in range(1, 181):
        rows.append(inst_row("a#0", T0 + 1800 + 10 * k, ok=10, latency=lat(1.0, n=10)))
        rows.append(type_row("T", T0 + 1800 + 10 * k, samples=10, queued=0))
    path = tmp_path / "history.sqlite3"
    write_history(path, rows)
    yield path


def test_load_rows_falls_back_to_coarse_rows_before_the_fine_tier(tiers: Path) -> None:
    """The whole hour: 5-minute rows up to where 10-second rows start, then those; every
    request counted once."""
    rows, tier = rp.load_rows(tiers, T0, NOW)
    assert tier == 300
    assert {(r["tier"], r["ts"]) for r in rows if r["tier"] == 300} == {
        (300, T0 + 300 * k) for k in range(1, 7)
    }
    assert [r["ts"] for r in rows] == sorted(r["ts"] for r in rows)  # coarse, then fine
    r = rp.build_report(rows, [], T0, NOW, tier)
    assert r["totals"]["requests"] == 3600
    assert r["totals"]["latency"]["count"] == 3600
    assert r["period"]["bucket_seconds"] == 300
    # 30/300 queued in the coarse half, none in the fine half: 1800 + 1800 samples
    assert r["types"][0]["samples"] == 3600 and r["types"][0]["queued_share"] == 0.05


def test_load_rows_uses_only_fine_rows_where_they_exist(tiers: Path) -> None:
    rows, tier = rp.load_rows(tiers, T0 + 2400, NOW)
    assert tier == 10
    assert {r["tier"] for r in rows} == {10}
    assert rp.build_report(rows, [], T0 + 2400, NOW, tier)["totals"]["requests"] == 1200


def test_load_rows_half_way_through_the_coarse_tier(tiers: Path) -> None:
    """From T0+900: coarse buckets ending after 900 up to the fine start, then fine ones."""
    rows, tier = rp.load_rows(tiers, T0 + 900, NOW)
    assert tier == 300
    assert rp.build_report(rows, [], T0 + 900, NOW, tier)["totals"]["requests"] == 2700


def test_load_rows_with_only_coarse_rows(tmp_path: Path) -> None:
    """A history whose fine rows were all pruned (daemon stopped for long): coarse rows."""
    path = tmp_path / "h.db"
    write_history(path, [inst_row("a#0", T0 + 300 * k, ok=5, tier=300) for k in range(1, 5)])
    rows, tier = rp.load_rows(path, T0, NOW)
    assert tier == 300 and len(rows) == 4


def test_load_rows_outside_the_period_and_missing_file(tiers: Path, tmp_path: Path) -> None:
    assert rp.load_rows(tiers, NOW + 100, NOW + 200) == ([], 10)
    assert rp.load_rows(tmp_path / "missing.db", T0, NOW) == ([], 10)


def test_load_rows_of_a_file_that_is_no_database_is_a_usage_error(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(UsageError, match="cannot read the history database"):
        rp.load_rows(path, T0, NOW)


def test_load_actions_picks_policy_events_of_the_period(tmp_path: Path) -> None:
    path = tmp_path / "events.sqlite3"
    conn = sqlite3.connect(path)
    conn.executescript(events_mod._SCHEMA)
    events = [
        (T0 + 1, "instance.state", "a", "a#0", "ready", "busy", "dispatch", None),
        (T0 + 2, "instance.isolated", "a", "a#0", None, None, "failing: 5 errors", '{"n": 5}'),
        (T0 + 3, "instance.state", "a", "a#1", "ready", "backoff", "exited with code 1", None),
        (T0 + 4, "instance.state", "a", "a#1", "backoff", "fatal", "gave up", None),
        (T0 + 5, "instance.health", "a", "a#0", None, None, "unknown -> healthy: probe ok",
         '{"from_health": "unknown", "to_health": "healthy"}'),
        (T0 + 6, "instance.health", "b", "b#0", None, None, "healthy -> unhealthy: 3 failed",
         None),
        (T0 + 7, "engine.registered", "b", None, None, None, "registered", None),
        (T0 - 5, "instance.isolated", "a", "a#0", None, None, "before the period", None),
    ]  # fmt: skip
    with conn:
        conn.executemany(
            "INSERT INTO events (at, kind, engine, instance, from_state, to_state, reason, data)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            events,
        )
    conn.close()
    acts = rp.load_actions(path, T0, NOW, None)
    assert [(a["at"], a["kind"]) for a in acts] == [
        (T0 + 2, "instance.isolated"),
        (T0 + 3, "instance.crashed"),
        (T0 + 4, "instance.fatal"),
        (T0 + 6, "instance.health"),
    ]
    assert acts[0]["data"] == {"n": 5} and acts[1]["data"] == {}
    assert [a["at"] for a in rp.load_actions(path, T0, NOW, "b")] == [T0 + 6]
    assert rp.load_actions(tmp_path / "missing.db", T0, NOW, None) == []
