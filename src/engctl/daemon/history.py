"""Metric history in SQLite (WAL): periodic roll-ups written by a thread of their own.

Two tiers of buckets: 10-second rows kept for `history_fine_retention` (default 1 hour) and
5-minute rows kept for `history_retention` (default 7 days): a week of a hundred instances
is about 50 MiB idle and 130-190 MiB busy (the latency histograms dominate), under the
`history_max_mb` bound (256 MiB) that drops the oldest rows first. Each roll-up is one
transaction: `kill -9` loses at most the bucket being written, never the database. Readers
(`engctl report`) open their own connection; in WAL mode they never block the writer. The
file is best-effort (`storage`): a failed write is counted, a corrupt file moved aside.

Must not import supervision, request or policy modules: `metrics` writes to it.
"""

from __future__ import annotations

import functools
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .storage import Database, Notify, WriteHealth

if TYPE_CHECKING:
    from engctl.config import DaemonConfig

log = logging.getLogger("engctl.history")

FINE_SECONDS = 10
COARSE_SECONDS = 300

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollup (
    tier INTEGER NOT NULL,      -- bucket length in seconds: 10 or 300
    ts REAL NOT NULL,           -- bucket end, epoch seconds
    seconds REAL NOT NULL,      -- how long the bucket really covered
    kind TEXT NOT NULL,         -- 'instance', 'type' or 'host'
    name TEXT NOT NULL,         -- instance id (name#k), engine type, or 'host'
    engine TEXT,
    type TEXT,
    requests INTEGER NOT NULL DEFAULT 0,
    ok INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0,
    timeouts INTEGER NOT NULL DEFAULT 0,
    lost INTEGER NOT NULL DEFAULT 0,
    latency TEXT,               -- engctl.histogram encoding of the bucket's latencies
    cpu_percent REAL,           -- mean over the bucket's samples
    rss_bytes INTEGER,          -- max over the bucket's samples
    restarts INTEGER NOT NULL DEFAULT 0,
    isolations INTEGER NOT NULL DEFAULT 0,
    data TEXT                   -- JSON: state seconds, queue figures, host I/O
);
CREATE INDEX IF NOT EXISTS rollup_tier_ts ON rollup (tier, ts);
"""

COLUMNS = (
    "tier",
    "ts",
    "seconds",
    "kind",
    "name",
    "engine",
    "type",
    "requests",
    "ok",
    "errors",
    "timeouts",
    "lost",
    "latency",
    "cpu_percent",
    "rss_bytes",
    "restarts",
    "isolations",
    "data",
)
_INSERT = f"INSERT INTO rollup ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


def _insert(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> None:
    conn.executemany(_INSERT, rows)


@dataclass(frozen=True)
class Retention:
    """How long each tier is kept, and the size the file may reach."""

    fine_seconds: float = 3600.0
    coarse_seconds: float = 7 * 86400.0
    max_bytes: int = 256 * 1024 * 1024

    @classmethod
    def of(cls, config: DaemonConfig) -> Retention:
        """What config.toml asks for."""
        mb = config.history_max_mb
        return cls(config.history_fine_retention, config.history_retention, mb * 1024 * 1024)


def connect(path: Path | str, readonly: bool = False) -> sqlite3.Connection:
    """A connection in WAL mode (read-only for reports)."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    else:
        conn = sqlite3.connect(path, timeout=10, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        # Appends and range deletes need few pages; SQLite's default cache (2 MiB) would be
        # daemon RSS for nothing.
        conn.execute("PRAGMA cache_size=-256")
    return conn


class HistoryWriter:
    """Takes batches of roll-up rows on the event loop and writes them on its own thread."""

    def __init__(
        self,
        path: Path,
        retention: Retention,
        clock: Callable[[], float] = time.time,
        health: WriteHealth | None = None,
        on_reset: Notify | None = None,
    ) -> None:
        self.path = path
        self.retention = retention
        self.clock = clock
        self._queue: queue.SimpleQueue[list[tuple[Any, ...]] | threading.Event | None] = (
            queue.SimpleQueue()
        )
        # Opened here so the file exists (and a corrupt one is set aside) before the first
        # bucket; used by the writer thread from then on.
        self.db = Database(path, "history", connect, SCHEMA, health, on_reset)
        self.db.run(lambda conn: None)
        self.written = 0
        self._thread = threading.Thread(target=self._run, name="engctl-history", daemon=True)
        self._thread.start()

    def write(self, rows: list[tuple[Any, ...]]) -> None:
        """Queue one bucket's rows (one transaction); never blocks."""
        if rows:
            self._queue.put(rows)

    def flush(self, timeout: float = 10.0) -> None:
        """Block until what was queued is on disk (tests and shutdown)."""
        barrier = threading.Event()
        self._queue.put(barrier)
        barrier.wait(timeout)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        last_prune = 0.0
        while True:
            item = self._queue.get()
            if item is None:
                self.db.close()
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            count = len(item)
            try:
                written = self.db.run(functools.partial(_insert, rows=item))
                # Not kept while the next bucket is awaited (10 s): a fleet's rows, made at
                # its largest, would hold that memory's arenas meanwhile.
                del item
                if not written:
                    continue  # counted in the write health; the bucket is lost
                self.written += count
                now = self.clock()
                if now - last_prune >= 60.0 or now < last_prune:
                    last_prune = now
                    self.db.run(functools.partial(self.prune, now=now))
            except Exception:  # the writer thread must outlive anything the disk does
                log.exception("cannot write %d history rows", count)

    def prune(self, conn: sqlite3.Connection, now: float) -> None:
        """Drop rows past their tier's retention, then the oldest ones if over the size."""
        r = self.retention
        with conn:
            conn.execute(
                "DELETE FROM rollup WHERE tier = ? AND ts < ?", (FINE_SECONDS, now - r.fine_seconds)
            )
            conn.execute(
                "DELETE FROM rollup WHERE tier = ? AND ts < ?",
                (COARSE_SECONDS, now - r.coarse_seconds),
            )
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        size = conn.execute("PRAGMA page_size").fetchone()[0]
        # Pages freed by deletes stay in the file (counted by page_count) until reused: only
        # the pages in use count, or every prune once at the bound would drop another tenth.
        free = conn.execute("PRAGMA freelist_count").fetchone()[0]
        if (pages - free) * size > r.max_bytes:
            # Over the size bound: drop the oldest tenth of the rows, both tiers (free pages are
            # reused by later inserts, so the file stops growing).
            with conn:
                oldest = conn.execute(
                    "SELECT ts FROM rollup ORDER BY ts LIMIT 1 OFFSET"
                    " (SELECT COUNT(*) / 10 FROM rollup)"
                ).fetchone()
                if oldest is not None:
                    conn.execute("DELETE FROM rollup WHERE ts <= ?", (oldest[0],))
            log.warning("history above %d bytes: dropped rows older than %s", r.max_bytes, oldest)
