"""The event log: every state change and action, with its reason; kept in SQLite (WAL).

Inserts go through one writer thread, so the event loop never waits on the disk; queries
run in a worker thread on their own connection (WAL readers never block the writer).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("engctl.events")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    engine TEXT,
    instance TEXT,
    from_state TEXT,
    to_state TEXT,
    reason TEXT NOT NULL,
    data TEXT
);
CREATE INDEX IF NOT EXISTS events_engine ON events (engine, id);
"""


@dataclass(frozen=True)
class Event:
    """One record: what happened (`kind`, past tense), to what, and why."""

    id: int
    at: float
    kind: str
    reason: str
    engine: str | None = None
    instance: str | None = None
    from_state: str | None = None
    to_state: str | None = None
    data: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """The documented `events --json` object."""
        return {
            "id": self.id,
            "at": self.at,
            "kind": self.kind,
            "engine": self.engine,
            "instance": self.instance,
            "from": self.from_state,
            "to": self.to_state,
            "reason": self.reason,
            "data": self.data or {},
        }


Subscriber = Callable[[Event], None]


class EventLog:
    """Emits events to live subscribers at once and to SQLite through a writer thread."""

    def __init__(self, path: Path, retention: int) -> None:
        self.path = path
        self.retention = retention
        self.subscribers: set[Subscriber] = set()
        self._queue: queue.SimpleQueue[Event | threading.Event | None] = queue.SimpleQueue()
        conn = self._connect()
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT MAX(id) FROM events").fetchone()
        conn.close()
        self._next_id = (row[0] or 0) + 1
        self._thread = threading.Thread(target=self._writer, name="engctl-events", daemon=True)
        self._thread.start()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=10, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def emit(
        self,
        kind: str,
        reason: str,
        *,
        engine: str | None = None,
        instance: str | None = None,
        from_state: str | None = None,
        to_state: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> Event:
        """Record an event; called on the event loop, never blocks."""
        ev = Event(
            self._next_id, time.time(), kind, reason, engine, instance, from_state, to_state, data
        )
        self._next_id += 1
        self._queue.put(ev)
        for sub in list(self.subscribers):
            try:
                sub(ev)
            except Exception:  # a broken follower must not break the emitter
                log.exception("event subscriber failed")
                self.subscribers.discard(sub)
        return ev

    def _writer(self) -> None:
        conn = self._connect()
        written = 0
        while True:
            item = self._queue.get()
            batch: list[Event] = []
            barriers: list[threading.Event] = []
            stop = False
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    barriers.append(item)
                else:
                    batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    with conn:
                        conn.executemany(
                            "INSERT INTO events VALUES (?,?,?,?,?,?,?,?,?)",
                            [
                                (
                                    e.id,
                                    e.at,
                                    e.kind,
                                    e.engine,
                                    e.instance,
                                    e.from_state,
                                    e.to_state,
                                    e.reason,
                                    json.dumps(e.data) if e.data else None,
                                )
                                for e in batch
                            ],
                        )
                        written += len(batch)
                        if written >= 1000:
                            written = 0
                            conn.execute(
                                "DELETE FROM events WHERE id <= ?",
                                (batch[-1].id - self.retention,),
                            )
                except sqlite3.Error:
                    log.exception("cannot write %d events", len(batch))
            for b in barriers:
                b.set()
            if stop:
                conn.close()
                return

    async def flush(self) -> None:
        """Wait until every event emitted so far is on disk."""
        barrier = threading.Event()
        self._queue.put(barrier)
        await asyncio.to_thread(barrier.wait, 10)

    async def query(
        self, *, engine: str | None = None, since: float | None = None, limit: int = 100
    ) -> list[Event]:
        """The newest `limit` events (oldest first), optionally for one engine or after a time."""
        await self.flush()
        return await asyncio.to_thread(self._query, engine, since, limit)

    def _query(self, engine: str | None, since: float | None, limit: int) -> list[Event]:
        sql = "SELECT * FROM events WHERE 1=1"
        args: list[Any] = []
        if engine:
            sql += " AND engine = ?"
            args.append(engine)
        if since is not None:
            sql += " AND at >= ?"
            args.append(since)
        sql += " ORDER BY id DESC LIMIT ?"
        args.append(limit)
        conn = self._connect()
        try:
            rows = conn.execute(sql, args).fetchall()
        finally:
            conn.close()
        return [
            Event(
                r[0], r[1], r[2], r[7], r[3], r[4], r[5], r[6], json.loads(r[8]) if r[8] else None
            )
            for r in reversed(rows)
        ]

    def close(self) -> None:
        """Write what is queued and stop the writer thread."""
        self._queue.put(None)
        self._thread.join(timeout=10)
