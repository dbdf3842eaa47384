"""The event log: every state change and action, with its reason; kept in SQLite (WAL).

Inserts go through one writer thread, so the event loop never waits on the disk; queries
run in a worker thread on their own connection (WAL readers never block the writer). The file
is best-effort (`storage`): a failed write is counted, a corrupt file moved aside.

Must not import supervision, request or policy modules: everything else emits into it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engctl.errors import EngctlError
from engctl.homefiles import select_events
from engctl.states import EventKind

from .storage import Database, Notify, WriteHealth, is_corruption

if TYPE_CHECKING:
    from engctl.documents import EventDoc

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

    def to_json(self) -> EventDoc:
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


class _Reset:
    """Asks the writer thread to set a corrupt file aside (a reader found it malformed)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.done = threading.Event()


class EventLog:
    """Emits events to live subscribers at once and to SQLite through a writer thread."""

    def __init__(
        self,
        path: Path,
        retention: int,
        health: WriteHealth | None = None,
        on_reset: Notify | None = None,
    ) -> None:
        self.path = path
        self.retention = retention
        self.subscribers: set[Subscriber] = set()
        self._queue: queue.SimpleQueue[Event | threading.Event | _Reset | None] = (
            queue.SimpleQueue()
        )
        self.db = Database(path, "events", _connect, _SCHEMA, health, on_reset)
        # Written by the writer thread only, from here on.
        found: list[int] = []
        if not self.db.run(lambda conn: found.append(_max_id(conn))):
            # The file cannot be opened now: ids that no earlier event can have used.
            found.append(int(time.time() * 1000))
        self._next_id = found[0]
        self._thread = threading.Thread(target=self._writer, name="engctl-events", daemon=True)
        self._thread.start()

    def emit(
        self,
        kind: EventKind,
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
        written = 0
        while True:
            item = self._queue.get()
            batch: list[Event] = []
            barriers: list[threading.Event] = []
            resets: list[_Reset] = []
            stop = False
            while True:
                if item is None:
                    stop = True
                elif isinstance(item, threading.Event):
                    barriers.append(item)
                elif isinstance(item, _Reset):
                    resets.append(item)
                else:
                    batch.append(item)
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                for r in resets[:1]:
                    self.db.reset(r.reason)
                if batch:
                    prune = written + len(batch) >= 1000
                    if self.db.run(functools.partial(self._insert, batch=batch, prune=prune)):
                        written = 0 if prune else written + len(batch)
            except Exception:  # the writer thread must outlive anything the disk does
                log.exception("cannot write %d events", len(batch))
            for r in resets:
                r.done.set()
            for b in barriers:
                b.set()
            # Not kept while the next event is awaited: a fleet's stop writes hundreds at once.
            del batch, item
            if stop:
                self.db.close()
                return

    def _insert(self, conn: sqlite3.Connection, batch: list[Event], prune: bool) -> None:
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
        if prune:
            conn.execute("DELETE FROM events WHERE id <= ?", (batch[-1].id - self.retention,))

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
        try:
            return await asyncio.to_thread(self._query, engine, since, limit)
        except sqlite3.Error as exc:
            if not is_corruption(exc):
                raise EngctlError(f"cannot read the event log {self.path}: {exc}") from exc
            # Malformed under a reader: the writer sets it aside, the query runs on the
            # fresh file (and the reset is an event in it).
            reset = _Reset(str(exc))
            self._queue.put(reset)
            await asyncio.to_thread(reset.done.wait, 10)
            await self.flush()
        try:
            return await asyncio.to_thread(self._query, engine, since, limit)
        except sqlite3.Error as exc:
            raise EngctlError(f"cannot read the event log {self.path}: {exc}") from exc

    def _query(self, engine: str | None, since: float | None, limit: int) -> list[Event]:
        conn = _connect(self.path)
        try:
            rows = select_events(conn, engine, since, limit)
        finally:
            conn.close()
        return [
            Event(
                r[0], r[1], r[2], r[7], r[3], r[4], r[5], r[6], json.loads(r[8]) if r[8] else None
            )
            for r in rows
        ]

    def close(self) -> None:
        """Write what is queued and stop the writer thread."""
        self._queue.put(None)
        self._thread.join(timeout=10)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=10, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    # Appends and range deletes need few pages; SQLite's default cache (2 MiB) fills as a
    # large fleet's events are written and stays daemon RSS for nothing (as in history).
    conn.execute("PRAGMA cache_size=-256")
    return conn


def _max_id(conn: sqlite3.Connection) -> int:
    """The id the next event gets."""
    row = conn.execute("SELECT MAX(id) FROM events").fetchone()
    return int(row[0] or 0) + 1
