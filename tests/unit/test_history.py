"""The history writer: one transaction per bucket on its own thread, retention per tier with
an injected clock, the size bound, and a database that passes integrity_check after close."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engctl.daemon import history
from engctl.daemon.history import (
    COARSE_SECONDS,
    COLUMNS,
    FINE_SECONDS,
    HistoryWriter,
    Retention,
)

T0 = 1_800_000_000.0
HOUR = 3600.0
DAY = 86400.0


class Clock:
    """A settable clock for the writer's retention decisions."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def row(
    ts: float, tier: int = FINE_SECONDS, name: str = "a#0", requests: int = 1
) -> tuple[Any, ...]:
    """One instance roll-up row in COLUMNS order."""
    values: dict[str, Any] = {
        "tier": tier,
        "ts": ts,
        "seconds": float(tier),
        "kind": "instance",
        "name": name,
        "engine": name.partition("#")[0],
        "type": "T",
        "requests": requests,
        "ok": requests,
        "errors": 0,
        "timeouts": 0,
        "lost": 0,
        "latency": None,
        "cpu_percent": 1.5,
        "rss_bytes": 1 << 20,
        "restarts": 0,
        "isolations": 0,
        "data": json.dumps({"states": {"ready": float(tier)}}),
    }
    assert tuple(values) == COLUMNS
    return tuple(values.values())


def read(path: Path, sql: str = "SELECT tier, ts FROM rollup ORDER BY tier, ts") -> list[Any]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def writers() -> Iterator[list[HistoryWriter]]:
    """Writers made by a test, closed at its end (their threads joined)."""
    made: list[HistoryWriter] = []
    yield made
    for w in made:
        w.close()


def make(
    writers: list[HistoryWriter], path: Path, clock: Clock, **retention: float
) -> HistoryWriter:
    w = HistoryWriter(path, Retention(**retention), clock=clock)  # type: ignore[arg-type]
    writers.append(w)
    return w


def test_writer_creates_a_wal_database_and_writes_rows(
    tmp_path: Path, writers: list[HistoryWriter]
) -> None:
    path = tmp_path / "history.sqlite3"
    w = make(writers, path, Clock(T0))
    assert path.exists()
    w.write([row(T0 - 20), row(T0 - 10)])
    w.write([])  # nothing to write: no transaction, no error
    w.flush()
    assert read(path) == [(10, T0 - 20), (10, T0 - 10)]
    assert w.written == 2
    assert read(path, "PRAGMA journal_mode") == [("wal",)]
    # every column round-trips
    stored = read(path, f"SELECT {', '.join(COLUMNS)} FROM rollup ORDER BY ts LIMIT 1")
    assert stored == [row(T0 - 20)]


def test_writes_happen_on_the_writer_thread(
    tmp_path: Path, writers: list[HistoryWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """write() only queues: the insert runs on the thread named engctl-history."""
    seen: list[str] = []
    w = make(writers, tmp_path / "h.db", Clock(T0))
    real_prune = w.prune

    def spy(conn: sqlite3.Connection, now: float) -> None:
        seen.append(threading.current_thread().name)
        real_prune(conn, now)

    monkeypatch.setattr(w, "prune", spy)
    w.write([row(T0)])
    w.flush()
    assert seen == ["engctl-history"]


def test_a_bucket_is_one_transaction(tmp_path: Path, writers: list[HistoryWriter]) -> None:
    """A batch with one bad row leaves none of its rows; the next batch is written."""
    path = tmp_path / "h.db"
    w = make(writers, path, Clock(T0))
    bad = list(row(T0 - 5, name="a#1"))
    bad[COLUMNS.index("kind")] = None  # NOT NULL
    w.write([row(T0 - 5, name="a#0"), tuple(bad), row(T0 - 5, name="a#2")])
    w.write([row(T0, name="b#0")])
    w.flush()
    assert read(path, "SELECT name FROM rollup") == [("b#0",)]
    assert w.written == 1


def test_a_reader_sees_a_bucket_whole_or_not_at_all(
    tmp_path: Path, writers: list[HistoryWriter]
) -> None:
    """While batches of 200 rows are written, a concurrent reader only ever counts whole
    batches (and never waits on the writer: WAL)."""
    path = tmp_path / "h.db"
    w = make(writers, path, Clock(T0))
    counts = []
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=0.5)
    try:
        for k in range(30):
            w.write([row(T0 - 1000 + k, name=f"a#{i}") for i in range(200)])
            counts.append(conn.execute("SELECT COUNT(*) FROM rollup").fetchone()[0])
        w.flush()
        counts.append(conn.execute("SELECT COUNT(*) FROM rollup").fetchone()[0])
    finally:
        conn.close()
    assert all(c % 200 == 0 for c in counts), counts
    assert counts[-1] == 6000


def test_retention_per_tier_with_an_injected_clock(
    tmp_path: Path, writers: list[HistoryWriter]
) -> None:
    """Fine rows older than the fine retention and coarse rows older than the coarse
    retention go at the first write; newer ones stay, whatever their tier."""
    path = tmp_path / "h.db"
    clock = Clock(T0)
    w = make(writers, path, clock, fine_seconds=HOUR, coarse_seconds=7 * DAY)
    fine_old = [row(T0 - HOUR - 10), row(T0 - 2 * HOUR)]
    fine_new = [row(T0 - HOUR + 10), row(T0 - 10)]
    coarse_old = [row(T0 - 7 * DAY - 300, COARSE_SECONDS), row(T0 - 30 * DAY, COARSE_SECONDS)]
    coarse_new = [row(T0 - 7 * DAY + 300, COARSE_SECONDS), row(T0 - 2 * HOUR, COARSE_SECONDS)]
    w.write(fine_old + fine_new + coarse_old + coarse_new)
    w.flush()
    assert read(path) == sorted((r[0], r[1]) for r in fine_new + coarse_new)


def test_retention_follows_the_clock_not_the_row_times(
    tmp_path: Path, writers: list[HistoryWriter]
) -> None:
    """Pruning runs at most once a minute of the clock; when the clock moves on, rows that
    aged past their retention go (and a clock set back prunes at once)."""
    path = tmp_path / "h.db"
    clock = Clock(T0)
    w = make(writers, path, clock, fine_seconds=600, coarse_seconds=3600)
    w.write([row(T0 - 500), row(T0 - 100), row(T0 - 3000, COARSE_SECONDS)])
    w.flush()
    assert len(read(path)) == 3
    clock.now = T0 + 30  # less than a minute since the last prune: nothing pruned
    w.write([row(T0 + 30)])
    w.flush()
    assert len(read(path)) == 4
    clock.now = T0 + 200  # T0-500 is now 700 s old, past 600
    w.write([row(T0 + 200)])
    w.flush()
    assert read(path) == [(10, T0 - 100), (10, T0 + 30), (10, T0 + 200), (300, T0 - 3000)]
    clock.now = T0 + 1000  # every fine row is over 600 s old; coarse T0-3000 is 4000 s old
    w.write([row(T0 + 1000, COARSE_SECONDS), row(T0 + 990)])
    w.flush()
    assert read(path) == [(10, T0 + 990), (300, T0 + 1000)]
    clock.now = T0 + 500  # set back: prunes at once, by the new time (nothing is that old)
    w.write([row(T0 - 200), row(T0 - 3200, COARSE_SECONDS)])
    w.flush()
    assert read(path) == [(10, T0 + 990), (300, T0 + 1000)]


def test_prune_called_directly(tmp_path: Path, writers: list[HistoryWriter]) -> None:
    path = tmp_path / "h.db"
    w = make(writers, path, Clock(T0), fine_seconds=100, coarse_seconds=1000)
    w.write([row(T0 - 50), row(T0 - 150), row(T0 - 500, COARSE_SECONDS)])
    w.flush()
    conn = history.connect(path)
    try:
        w.prune(conn, T0 + 600)
    finally:
        conn.close()
    assert read(path) == []


def page_bytes(path: Path) -> tuple[int, int]:
    """(bytes the file's pages take, bytes of pages in use)."""
    (pages,), (free,), (size,) = (
        read(path, "PRAGMA page_count")[0],
        read(path, "PRAGMA freelist_count")[0],
        read(path, "PRAGMA page_size")[0],
    )
    return pages * size, (pages - free) * size


def test_size_bound_drops_the_oldest_rows(tmp_path: Path, writers: list[HistoryWriter]) -> None:
    """Over history_max_mb, the oldest tenth of the rows goes (both tiers, by time)."""
    path = tmp_path / "h.db"
    clock = Clock(T0)
    w = make(writers, path, clock, fine_seconds=1e9, coarse_seconds=1e9, max_bytes=1 << 40)
    # 2000 rows of distinct times, fine and coarse interleaved; the first write prunes
    # nothing (the bound is huge), then the bound is set below the file's size.
    rows = [row(T0 - 2000 + k, FINE_SECONDS if k % 2 else COARSE_SECONDS) for k in range(2000)]
    w.write(rows)
    w.flush()
    _, used = page_bytes(path)
    w.retention = Retention(1e9, 1e9, used - 1)
    clock.now = T0 + 60
    w.write([row(T0 + 60)])
    w.flush()
    left = [ts for _tier, ts in read(path, "SELECT tier, ts FROM rollup ORDER BY ts")]
    dropped = 2001 - len(left)
    assert 2001 // 10 <= dropped <= 2001 // 10 + 1
    assert left == [T0 - 2000 + k for k in range(dropped, 2000)] + [T0 + 60]
    # both tiers lost rows (the bound is on the file, oldest first whatever the tier)
    tiers = read(path, "SELECT tier, MIN(ts) FROM rollup GROUP BY tier")
    assert all(min_ts >= T0 - 2000 + dropped for _t, min_ts in tiers)


def test_size_bound_stops_dropping_once_under_the_bound(
    tmp_path: Path, writers: list[HistoryWriter]
) -> None:
    """Deleted rows leave free pages in the file (SQLite does not shrink it): once the rows
    in use are under the bound, later prunes drop nothing more. Without this, a file that
    once reached history_max_mb lost a tenth of its history every minute until empty."""
    path = tmp_path / "h.db"
    clock = Clock(T0)
    w = make(writers, path, clock, fine_seconds=1e9, coarse_seconds=1e9, max_bytes=1 << 40)
    w.write([row(T0 - 5000 + k, name=f"a#{k % 7}") for k in range(5000)])
    w.flush()
    file_bytes, used = page_bytes(path)
    # A bound a little under the pages in use: one prune brings the file under it.
    w.retention = Retention(1e9, 1e9, used - 4096)
    for minute in range(1, 6):
        clock.now = T0 + 60 * minute
        w.write([row(T0 + 60 * minute)])
        w.flush()
    count = read(path, "SELECT COUNT(*) FROM rollup")[0][0]
    # one tenth dropped once (plus the five new rows), not five times
    assert 4400 <= count <= 4510, count
    file_after, used_after = page_bytes(path)
    assert used_after <= used
    assert file_after <= file_bytes  # the free pages were reused, the file did not grow


def test_database_passes_integrity_check_after_close(
    tmp_path: Path, writers: list[HistoryWriter]
) -> None:
    path = tmp_path / "h.db"
    clock = Clock(T0)
    w = make(writers, path, clock, fine_seconds=300, coarse_seconds=3000, max_bytes=1 << 16)
    for k in range(50):
        clock.now = T0 + 61 * k
        w.write([row(clock.now - j, FINE_SECONDS if j % 3 else COARSE_SECONDS) for j in range(40)])
    w.close()
    writers.remove(w)
    assert integrity(path) == "ok"
    assert read(path, "SELECT COUNT(*) FROM rollup")[0][0] > 0
    # A second writer on the same file keeps appending.
    w2 = make(writers, path, clock)
    before = w2.written
    w2.write([row(clock.now + 1)])
    w2.flush()
    assert w2.written == before + 1
    assert read(path, "SELECT MAX(ts) FROM rollup")[0][0] == clock.now + 1


def test_the_predictor_reads_the_same_time_of_day_on_previous_days(tmp_path: Path) -> None:
    """Issue 14: `read_day_slots` gives, per previous day, the peak of requests in flight on
    the engine's instances (summed per 5-minute bucket) in the coming 10 minutes of that day,
    and None for a day without history then; `predict` turns that into a floor."""
    from engctl.daemon.autoscale import DaySlot, predict
    from engctl.daemon.scaler import read_day_slots
    from engctl.models import ScaleSpec

    db = tmp_path / "history.db"
    conn = sqlite3.connect(db)
    conn.executescript(history.SCHEMA)

    def bucket(ts: float, peaks: dict[str, int]) -> None:
        rows: list[tuple[Any, ...]] = [(COARSE_SECONDS, ts, 300.0, "host", "host", None, None)]
        for inst, peak in peaks.items():
            engine = inst.split("#")[0]
            data = json.dumps({"in_flight_peak": peak})
            rows.append((COARSE_SECONDS, ts, 300.0, "instance", inst, engine, "t", data))
        for r in rows:
            cols = ("tier", "ts", "seconds", "kind", "name", "engine", "type", "data")[: len(r)]
            conn.execute(
                f"INSERT INTO rollup ({', '.join(cols)}) VALUES ({', '.join('?' * len(r))})", r
            )

    now = T0
    bucket(now - DAY + 300, {"pool#0": 4, "pool#1": 2, "other#0": 50})  # day 1: 6 at once
    bucket(now - DAY + 600, {"pool#0": 3})
    bucket(now - DAY + 900, {"pool#0": 40})  # after the 10 minutes looked at
    bucket(now - 2 * DAY + 300, {"pool#0": 4})  # day 2: 4
    bucket(now - 3 * DAY - 300, {"pool#0": 30})  # day 3: nothing in the window: no history
    conn.commit()
    conn.close()

    days = read_day_slots(db, "pool", now)
    assert days[:3] == [DaySlot(1, 6.0), DaySlot(2, 4.0), DaySlot(3, None)]
    found = predict(days, ScaleSpec(min=0, max=8, target=1.0), max_concurrency=1)
    assert found is not None and found.floor == 5  # the median of 6 and 4
    assert "peaked at 6, 4 requests in flight on the last 2 days" in found.reason
