"""Best-effort storage of what supervision only records: log files and the SQLite databases.

Supervision never depends on these files. A write that fails (a full disk, an I/O error) is
counted, shown by `daemon status`, and reported with an event once writes succeed again. A
database that is unsafe (see `engctl.trust`), unreadable or corrupt is moved aside as
`NAME.corrupt-<time>` and started afresh, with an event. Never imported by cli/.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engctl import trust
from engctl.states import EventKind

log = logging.getLogger("engctl.storage")

# kind, reason, data: emits an event; must be safe to call from any thread.
Notify = Callable[[EventKind, str, dict[str, Any]], None]

# SQLite primary result codes (the low byte of an extended code).
SQLITE_IOERR = 10
SQLITE_CORRUPT = 11
SQLITE_FULL = 13
SQLITE_NOTADB = 26
# Files SQLite keeps next to a database: moved aside with it.
SIDE_SUFFIXES = ("-wal", "-shm", "-journal")


def _sqlite_code(exc: BaseException) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def is_disk_full(exc: BaseException) -> bool:
    """Whether a failed write failed for want of space (ENOSPC, a quota, SQLITE_FULL)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return _sqlite_code(exc) == SQLITE_FULL


def is_corruption(exc: BaseException) -> bool:
    """Whether SQLite found the file malformed or not a database at all."""
    return _sqlite_code(exc) in (SQLITE_CORRUPT, SQLITE_NOTADB)


def describe(exc: BaseException) -> str:
    """One line for a failed write: `no space left on device`, `disk I/O error`, …"""
    if is_disk_full(exc):
        return "no space left on device"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror[:1].lower() + exc.strerror[1:]
    return str(exc) or type(exc).__name__


@dataclass
class Failure:
    """Writes of one target failing since `since`."""

    count: int
    error: str
    disk_full: bool
    since: float
    last: float
    path: str

    def to_json(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "error": self.error,
            "disk_full": self.disk_full,
            "since": self.since,
            "last": self.last,
            "path": self.path,
        }


class WriteHealth:
    """Failed writes per target (`logs`, `events`, `history`, `registry`, `daemon.log`).

    `failed` and `succeeded` may be called from any thread; `succeeded` costs one dict
    lookup while nothing fails.
    """

    def __init__(self) -> None:
        self.failing: dict[str, Failure] = {}
        self.failed_total = 0
        self._lock = threading.Lock()
        self._notify: Notify | None = None

    def attach(self, notify: Notify) -> None:
        """Report the first failure and the recovery of each target through `notify`."""
        self._notify = notify

    def failed(self, target: str, exc: BaseException, path: str | os.PathLike[str] = "") -> None:
        """A write of `target` failed; the first one of a run is logged and reported."""
        now = time.time()
        text = describe(exc)
        with self._lock:
            self.failed_total += 1
            f = self.failing.get(target)
            first = f is None
            if f is None:
                f = self.failing[target] = Failure(0, text, False, now, now, os.fspath(path))
            f.count += 1
            f.error = text
            f.disk_full = is_disk_full(exc)
            f.last = now
            if path:
                f.path = os.fspath(path)
        if not first:
            return
        where = f" ({f.path})" if f.path else ""
        log.warning("cannot write %s%s: %s; later failures are counted", target, where, text)
        self._say(
            EventKind.DAEMON_WRITE_FAILED,
            f"cannot write {target}{where}: {text}; supervision goes on, failures are counted",
            {"target": target, "error": text, "path": f.path, "disk_full": f.disk_full},
        )

    def succeeded(self, target: str) -> None:
        """A write of `target` worked: if it had been failing, say that it is back.

        Space is back for every target on the same file system too: one that is written
        rarely (the registry) would otherwise look full until its next write.
        """
        if target not in self.failing:
            return
        with self._lock:
            f = self.failing.pop(target, None)
            if f is None:
                return
            back = [(target, f)]
            if f.disk_full:
                device = _device(f.path)
                for other, g in list(self.failing.items()):
                    if g.disk_full and device is not None and _device(g.path) == device:
                        back.append((other, self.failing.pop(other)))
        for name, g in back:
            took = time.time() - g.since
            reason = (
                f"{name} writable again: {g.count} write(s) failed over {took:.1f}s ({g.error})"
            )
            log.warning("%s", reason)
            self._say(
                EventKind.DAEMON_WRITE_RECOVERED,
                reason,
                {"target": name, "failed": g.count, "error": g.error, "seconds": round(took, 3)},
            )

    @property
    def disk_full(self) -> bool:
        return any(f.disk_full for f in list(self.failing.values()))

    def to_json(self) -> dict[str, Any]:
        """`write_errors` of `daemon status --json`: the targets failing now."""
        return {t: f.to_json() for t, f in sorted(list(self.failing.items()))}

    def _say(self, kind: EventKind, reason: str, data: dict[str, Any]) -> None:
        if self._notify is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed (shutdown)
                self._notify(kind, reason, data)


def _device(path: str) -> int | None:
    """The file system a file is on (through its folder: the file may be gone)."""
    try:
        return os.stat(os.path.dirname(path) or ".").st_dev
    except OSError:
        return None


def aside_name(path: Path, label: str) -> Path:
    """A free name next to `path`: `NAME.LABEL-<UTC time>` (with `-N` if that is taken)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.{label}-{stamp}")
    n = 1
    while any(os.path.lexists(f"{target}{s}") for s in ("", *SIDE_SUFFIXES)):
        target = path.with_name(f"{path.name}.{label}-{stamp}-{n}")
        n += 1
    return target


def set_aside(path: Path, label: str = "corrupt") -> Path:
    """Rename a database and its side files out of the way (never deleted); the new name."""
    target = aside_name(path, label)
    for suffix in ("", *SIDE_SUFFIXES):
        src = f"{path}{suffix}"
        if os.path.lexists(src):
            # rename moves a symlink or a folder itself: nothing it points to is touched.
            os.rename(src, f"{target}{suffix}")
    return target


def unsafe(path: Path) -> str | None:
    """Why a database (or one of its side files) may not be opened, or None."""
    for suffix in ("", *SIDE_SUFFIXES):
        problem = trust.path_problem(f"{path}{suffix}")
        if problem is not None:
            return problem
    return None


class Database:
    """One SQLite file written by one thread: opened safely, set aside when corrupt.

    `run` does a unit of work in a transaction. A failure is counted in `health` and the
    work dropped (the caller goes on); a corrupt file is moved aside, a fresh one made with
    the schema, and the work tried once more.
    """

    def __init__(
        self,
        path: Path,
        label: str,
        connect: Callable[[Path], sqlite3.Connection],
        schema: str,
        health: WriteHealth | None = None,
        on_reset: Notify | None = None,
    ) -> None:
        self.path = path
        self.label = label
        self._connect = connect
        self.schema = schema
        self.health = health if health is not None else WriteHealth()
        self.on_reset = on_reset
        self.conn: sqlite3.Connection | None = None
        self.resets: list[dict[str, Any]] = []

    def open(self) -> sqlite3.Connection:
        """Connect and create the schema, replacing an unsafe or corrupt file by a fresh one.

        Raises sqlite3.Error or OSError when even a fresh file cannot be made (e.g. no space).
        """
        if self.conn is not None:
            return self.conn
        problem = unsafe(self.path)
        if problem is not None:
            self.reset(problem)
        try:
            conn = self._fresh_connection()
        except sqlite3.DatabaseError as exc:
            if not is_corruption(exc):
                raise
            self.reset(str(exc))
            conn = self._fresh_connection()
        self.conn = conn
        return conn

    def _fresh_connection(self) -> sqlite3.Connection:
        conn = self._connect(self.path)
        try:
            conn.executescript(self.schema)
        except BaseException:
            conn.close()
            raise
        return conn

    def close(self) -> None:
        if self.conn is not None:
            conn, self.conn = self.conn, None
            try:
                conn.close()
            except sqlite3.Error:
                log.exception("cannot close %s", self.path)

    def reset(self, reason: str) -> Path:
        """Move the file aside (it is kept for a human), so that the next open starts afresh."""
        self.close()
        moved = set_aside(self.path)
        what = f"{self.label} database {self.path}"
        message = f"{what} could not be used ({reason}): moved to {moved.name}, started afresh"
        log.warning("%s", message)
        info = {"path": str(self.path), "moved_to": str(moved), "error": reason, "at": time.time()}
        self.resets.append(info)
        if self.on_reset is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed (shutdown)
                self.on_reset(EventKind.DAEMON_DATABASE_RESET, message, info)
        return moved

    def run(self, work: Callable[[sqlite3.Connection], object]) -> bool:
        """`work` in one transaction; False when it could not be done (counted in `health`)."""
        for attempt in (1, 2):
            try:
                conn = self.open()
                with conn:
                    work(conn)
            except sqlite3.Error as exc:
                if attempt == 1 and is_corruption(exc):
                    try:
                        self.reset(str(exc))
                    except OSError as err:
                        self.health.failed(self.label, err, self.path)
                        return False
                    continue
                # The connection may be in any state after an I/O error: the next write
                # opens a new one.
                self.close()
                self.health.failed(self.label, exc, self.path)
                return False
            except OSError as exc:
                self.close()
                self.health.failed(self.label, exc, self.path)
                return False
            self.health.succeeded(self.label)
            return True
        return False


class RotatingLog(logging.FileHandler):
    """A log file that is renamed NAME.1 (NAME.1 to NAME.2, ...) once the next record would
    take it to `max_bytes`, keeping `backups` of them: what `logging.handlers`'
    RotatingFileHandler does, without loading that module (with pickle, ~0.8 MiB of the
    daemon's RSS)."""

    def __init__(self, filename: str | os.PathLike[str], max_bytes: int, backups: int) -> None:
        super().__init__(filename, "a", delay=False)
        self.max_bytes = max_bytes
        self.backups = backups

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self._should_roll_over(record):
                self._roll_over()
            super().emit(record)
        except Exception:
            self.handleError(record)

    def _should_roll_over(self, record: logging.LogRecord) -> bool:
        if self.stream is None:
            self.stream = self._open()
        pos = self.stream.tell()
        if self.max_bytes <= 0 or not pos:
            return False
        if pos + len(f"{self.format(record)}\n") < self.max_bytes:
            return False
        # Never rename what is not a regular file (/dev/null, a fifo).
        return not (os.path.exists(self.baseFilename) and not os.path.isfile(self.baseFilename))

    def _roll_over(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if self.backups > 0:
            for i in range(self.backups - 1, 0, -1):
                older, newer = f"{self.baseFilename}.{i}", f"{self.baseFilename}.{i + 1}"
                if os.path.exists(older):
                    if os.path.exists(newer):
                        os.remove(newer)
                    os.rename(older, newer)
            first = f"{self.baseFilename}.1"
            if os.path.exists(first):
                os.remove(first)
            if os.path.exists(self.baseFilename):
                os.rename(self.baseFilename, first)
        self.stream = self._open()
