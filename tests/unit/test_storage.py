"""Unit tests of best-effort storage (issue 9, items 1, 3, 4 and 5): failed writes injected at
the write seams (OSError ENOSPC, SQLite errors), corrupt files set aside, the registry's
reading and saving, and the trust rules of `engctl.trust`."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from engctl import trust
from engctl.daemon import registry as registry_mod
from engctl.daemon.events import EventLog
from engctl.daemon.history import HistoryWriter, Retention
from engctl.daemon.logs import InstanceLog
from engctl.daemon.registry import Entry, Registry, atomic_write
from engctl.daemon.storage import Database, WriteHealth, describe, is_disk_full
from engctl.errors import DaemonUnreachableError, StorageError, UnsafePathError
from engctl.models import EngineSpec
from engctl.states import EventKind

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class Said:
    """Collects what a WriteHealth or a Database reports (kind, reason, data)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict[str, Any]]] = []

    def __call__(self, kind: str, reason: str, data: dict[str, Any]) -> None:
        self.items.append((kind, reason, data))

    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.items]


def _sqlite_error(code: int, text: str) -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError(text)
    exc.sqlite_errorcode = code
    return exc


# -- write health --------------------------------------------------------------------------


def test_full_disk_is_said_in_one_short_line() -> None:
    """ENOSPC and SQLITE_FULL read "no space left on device"; other errors keep their text."""
    assert describe(ENOSPC) == "no space left on device"
    assert is_disk_full(_sqlite_error(13, "database or disk is full"))
    assert describe(_sqlite_error(13, "database or disk is full")) == "no space left on device"
    assert describe(OSError(errno.EIO, "Input/output error")) == "input/output error"


def test_write_health_reports_the_first_failure_and_the_recovery_once() -> None:
    """Failures are counted; only the first of a run and the recovery are said."""
    said = Said()
    health = WriteHealth()
    health.attach(said)
    for _ in range(3):
        health.failed("logs", ENOSPC, "/h/logs/a.0.log")
    assert health.disk_full
    assert health.to_json()["logs"]["count"] == 3
    assert said.kinds() == ["daemon.write_failed"]
    health.succeeded("logs")
    health.succeeded("logs")
    assert said.kinds() == ["daemon.write_failed", "daemon.write_recovered"]
    assert said.items[1][2]["failed"] == 3
    assert not health.disk_full and health.to_json() == {}


def test_space_back_on_one_file_system_clears_its_other_targets(tmp_path: Path) -> None:
    """A rarely written target (the registry) is not shown full once another file of the
    same file system is written again."""
    said = Said()
    health = WriteHealth()
    health.attach(said)
    health.failed("registry", ENOSPC, tmp_path / "registry.json")
    health.failed("logs", ENOSPC, tmp_path / "a.log")
    health.failed("events", OSError(errno.EIO, "Input/output error"), tmp_path / "e.db")
    health.succeeded("logs")
    assert set(health.to_json()) == {"events"}  # not a space problem: still failing
    recovered = sorted(d["target"] for k, _, d in said.items if k == "daemon.write_recovered")
    assert recovered == ["logs", "registry"]


# -- instance logs -------------------------------------------------------------------------


def test_instance_log_write_on_a_full_disk_is_counted_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A log line that cannot be written never raises (the caller may be handling an exit);
    followers still get it, and the next write that works says the disk is back."""
    health = WriteHealth()
    said = Said()
    health.attach(said)
    log = InstanceLog(tmp_path / "a.0.log", 1 << 20, 1, health)
    seen: list[str] = []
    log.follow(seen.append)
    full = os.open("/dev/full", os.O_WRONLY)  # every write fails with ENOSPC
    try:
        monkeypatch.setattr(InstanceLog, "_open", lambda self: full)
        log.note("pid 42 exit code 1 after 0.50s")
        log.feed("stderr", b"boom\n")
    finally:
        os.close(full)
    assert health.to_json()["logs"]["count"] == 2
    assert health.disk_full
    assert [s.split(": ", 1)[1] for s in seen] == ["pid 42 exit code 1 after 0.50s", "boom"]
    monkeypatch.undo()
    log.note("back")
    assert said.kinds() == ["daemon.write_failed", "daemon.write_recovered"]
    assert log.path.read_text().endswith("engctl: back\n")


def test_instance_log_symlink_is_not_written_through(tmp_path: Path) -> None:
    """A symlink in place of a log file gets no line: the failure is counted instead."""
    target = tmp_path / "target"
    target.write_text("keep\n")
    (tmp_path / "a.0.log").symlink_to(target)
    health = WriteHealth()
    log = InstanceLog(tmp_path / "a.0.log", 1 << 20, 1, health)
    log.note("hello")
    assert target.read_text() == "keep\n"
    assert "is a symlink" in health.to_json()["logs"]["error"]


# -- SQLite files --------------------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, check_same_thread=False)


SCHEMA = "CREATE TABLE IF NOT EXISTS t (x INTEGER);"


def test_database_sets_a_garbage_file_aside_and_starts_afresh(tmp_path: Path) -> None:
    """A file that is not a database is moved to NAME.corrupt-<time> and replaced."""
    path = tmp_path / "x.sqlite3"
    path.write_bytes(os.urandom(8192))
    said = Said()
    db = Database(path, "x", _connect, SCHEMA, on_reset=said)
    assert db.run(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
    aside = list(tmp_path.glob("x.sqlite3.corrupt-*"))
    assert len(aside) == 1 and len(aside[0].read_bytes()) == 8192
    assert said.kinds() == ["daemon.database_reset"]
    assert db.resets[0]["error"] == "file is not a database"
    db.close()


def test_database_write_errors_are_counted_and_the_file_kept(tmp_path: Path) -> None:
    """A disk I/O error or a full disk drops that write, counted; nothing is set aside, and
    the next write works."""
    health = WriteHealth()
    db = Database(tmp_path / "x.sqlite3", "x", _connect, SCHEMA, health)

    def failing(conn: sqlite3.Connection) -> None:
        raise _sqlite_error(10, "disk I/O error")

    assert not db.run(failing)
    assert health.to_json()["x"]["error"] == "disk I/O error"
    assert not db.run(lambda conn: (_ for _ in ()).throw(_sqlite_error(13, "disk is full")))
    assert health.disk_full
    assert db.run(lambda conn: conn.execute("INSERT INTO t VALUES (1)"))
    assert health.to_json() == {} and db.resets == []
    db.close()


def test_database_corrupt_at_run_time_is_replaced_and_the_write_retried(tmp_path: Path) -> None:
    """A write that finds the file malformed moves it aside and is done on a fresh one."""
    db = Database(tmp_path / "x.sqlite3", "x", _connect, SCHEMA)
    calls = []

    def work(conn: sqlite3.Connection) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise _sqlite_error(11, "database disk image is malformed")
        conn.execute("INSERT INTO t VALUES (7)")

    assert db.run(work)
    assert len(calls) == 2 and len(db.resets) == 1
    conn = _connect(tmp_path / "x.sqlite3")
    assert conn.execute("SELECT x FROM t").fetchall() == [(7,)]
    conn.close()
    db.close()


def test_event_writer_thread_survives_write_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Errors while writing (I/O, malformed data, a bug) never end the writer thread."""
    health = WriteHealth()
    events = EventLog(tmp_path / "events.sqlite3", 1000, health)
    real = EventLog._insert
    failures = [_sqlite_error(10, "disk I/O error"), ValueError("not JSON")]

    def flaky(self: EventLog, conn: sqlite3.Connection, batch: Any, prune: bool) -> None:
        if failures:
            raise failures.pop(0)
        real(self, conn, batch, prune)

    monkeypatch.setattr(EventLog, "_insert", flaky)
    for n in range(3):
        events.emit(EventKind.DAEMON_STARTED, f"number {n}")
        asyncio.run(events.flush())
    assert events._thread.is_alive()
    assert [e.reason for e in asyncio.run(events.query())] == ["number 2"]
    assert "events" not in health.to_json()  # the last write worked
    events.close()


def test_history_writer_thread_survives_write_errors(tmp_path: Path) -> None:
    """A history write that fails is counted; the thread goes on with the next bucket."""
    health = WriteHealth()
    writer = HistoryWriter(tmp_path / "h.sqlite3", Retention(), health=health)
    writer.write([("not", "enough", "columns")])
    writer.flush()
    assert writer._thread.is_alive()
    assert "history" in health.to_json()
    writer.close()


def test_event_log_with_a_folder_in_place_of_its_file_starts_afresh(tmp_path: Path) -> None:
    """A folder where the database should be is moved aside, not an error at start-up."""
    path = tmp_path / "events.sqlite3"
    path.mkdir()
    events = EventLog(path, 1000)
    events.emit(EventKind.DAEMON_STARTED, "after")
    assert [e.reason for e in asyncio.run(events.query())] == ["after"]
    assert "is not a regular file" in events.db.resets[0]["error"]
    events.close()


# -- the registry --------------------------------------------------------------------------


def _spec(name: str) -> EngineSpec:
    return EngineSpec.from_dict(name, {"command": ["true"], "mode": "service"})


def _registry(path: Path, entries: list[Entry]) -> Registry:
    return Registry(path, lambda: list(entries))


def test_registry_save_on_a_full_disk_raises_storage_error_and_leaves_no_temp_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save that cannot be made durable says "no space left on device" and keeps the old
    file; the temp file is removed."""
    path = tmp_path / "registry.json"
    live = [Entry(_spec("a"))]
    reg = _registry(path, live)
    asyncio.run(reg.save())
    before = path.read_bytes()

    def full(fd: int) -> None:
        raise ENOSPC

    monkeypatch.setattr("engctl.daemon.registry.os.fsync", full)
    live.append(Entry(_spec("b")))
    with pytest.raises(StorageError, match="no space left on device") as info:
        asyncio.run(reg.save())
    assert str(path) in info.value.message
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["registry.json"]
    assert reg.health.disk_full


def test_staged_changes_are_durable_before_they_apply_and_not_at_all_if_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`staged` saves first: a refused save applies nothing; saves made meanwhile keep the
    staged change."""
    path = tmp_path / "registry.json"
    live: list[Entry] = []
    reg = _registry(path, live)

    async def register(name: str) -> None:
        async with reg.staged({name: Entry(_spec(name))}):
            on_disk = json.loads(path.read_text())["engines"]
            assert name in on_disk  # durable before it is applied
            await reg.save()  # another change saved meanwhile keeps it
            assert name in json.loads(path.read_text())["engines"]
            live.append(Entry(_spec(name)))

    asyncio.run(register("a"))

    def refuse(path: Path, data: bytes) -> None:
        raise ENOSPC

    monkeypatch.setattr(registry_mod, "atomic_write", refuse)
    applied = []

    async def refused() -> None:
        async with reg.staged({"b": Entry(_spec("b"))}):
            applied.append("b")

    with pytest.raises(StorageError):
        asyncio.run(refused())
    assert applied == []
    assert list(json.loads(path.read_text())["engines"]) == ["a"]


def test_atomic_write_never_writes_through_a_symlinked_temp_file(tmp_path: Path) -> None:
    """A symlink planted at the temp file's name is replaced, its target left alone."""
    target = tmp_path / "target"
    target.write_text("keep\n")
    path = tmp_path / "registry.json"
    (tmp_path / f".registry.json.{os.getpid()}.tmp").symlink_to(target)
    atomic_write(path, b"{}")
    assert path.read_bytes() == b"{}"
    assert target.read_text() == "keep\n"


@pytest.mark.parametrize(
    "content",
    [
        b"\x00garbage",
        b'{"version": 1, "engines": {',
        b"[]",
        b'{"engines": 5}',
        b'{"version": 9, "engines": {}}',
    ],
    ids=["garbage", "truncated", "array", "engines-not-object", "future-version"],
)
def test_unreadable_registry_is_refused_and_left_alone(tmp_path: Path, content: bytes) -> None:
    """A registry that cannot be read raises (the daemon does not start) and stays as it is."""
    path = tmp_path / "registry.json"
    path.write_bytes(content)
    with pytest.raises(DaemonUnreachableError, match="--reset-registry"):
        _registry(path, []).load()
    assert path.read_bytes() == content


def test_bad_registry_entries_are_skipped_with_their_dependents(tmp_path: Path) -> None:
    """Every readable engine loads; bad entries, and engines needing them, are skipped."""
    good = {"spec": {"command": ["true"], "mode": "service"}}
    doc: dict[str, Any] = {
        "version": 1,
        "engines": {
            "ok": good,
            "unknown-key": {"spec": {"command": ["true"], "colour": 1}},
            "no-spec": {"desired": "running"},
            "bad-desired": {**good, "desired": "maybe"},
            "extra-field": {**good, "whatever": 1},
            "needs-bad": {"spec": {"command": ["true"], "depends_on": ["no-spec"]}},
            "not-an-object": 5,
        },
    }
    path = tmp_path / "registry.json"
    path.write_text(json.dumps(doc))
    reg = _registry(path, [])
    assert [e.spec.name for e in reg.load()] == ["ok"]
    assert {s["name"] for s in reg.skipped_json()} == set(doc["engines"]) - {"ok"}


def test_reset_registry_moves_the_file_aside(tmp_path: Path) -> None:
    """`--reset-registry` renames registry.json (never deletes it); a second reset finds none."""
    path = tmp_path / "registry.json"
    path.write_bytes(b"garbage")
    reg = _registry(path, [])
    moved = reg.reset()
    assert moved is not None and moved.name.startswith("registry.json.reset-")
    assert moved.read_bytes() == b"garbage" and not path.exists()
    assert reg.reset() is None and reg.load() == []


# -- the trust rules -----------------------------------------------------------------------


def test_open_file_refuses_symlinks_foreign_owners_and_writable_files(tmp_path: Path) -> None:
    """Only a regular file of ours that nobody else may write is opened, never a symlink."""
    mine = tmp_path / "mine"
    mine.write_text("x")
    os.close(trust.open_file(str(mine), os.O_RDONLY))
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        trust.open_file(str(tmp_path / "link"), os.O_RDONLY)
    mine.chmod(0o666)
    with pytest.raises(UnsafePathError, match=r"writable by group or others \(mode 0666\)"):
        trust.open_file(str(mine), os.O_RDONLY)
    mine.chmod(0o644)
    os.chown(mine, 65534, 65534)
    with pytest.raises(UnsafePathError, match="owned by uid 65534"):
        trust.open_file(str(mine), os.O_RDONLY)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(UnsafePathError, match="not a regular file"):
        trust.open_file(str(fifo), os.O_RDONLY)  # and it does not block


def test_a_home_may_be_a_symlink_of_ours_but_not_a_folder_inside_it(tmp_path: Path) -> None:
    """The home itself may be a symlink (of ours); a folder inside a home may not."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "home").symlink_to(real)
    assert trust.check_folder(str(tmp_path / "home"), root=True)
    with pytest.raises(UnsafePathError, match="is a symlink"):
        trust.check_folder(str(tmp_path / "home"))
    os.lchown(tmp_path / "home", 65534, 65534)
    with pytest.raises(UnsafePathError, match="owned by uid 65534"):
        trust.check_folder(str(tmp_path / "home"), root=True)


def test_ensure_folder_makes_a_private_folder_without_following_symlinks(tmp_path: Path) -> None:
    """A missing folder is made 0700; an existing one of ours is made private by descriptor."""
    run = tmp_path / "run"
    trust.ensure_folder(str(run), private=True)
    assert run.stat().st_mode & 0o777 == 0o700
    run.chmod(0o755)
    trust.ensure_folder(str(run), private=True)
    assert run.stat().st_mode & 0o777 == 0o700
    other = tmp_path / "other"
    other.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(other)
    with pytest.raises(UnsafePathError):
        trust.ensure_folder(str(tmp_path / "link"), private=True)
    assert other.stat().st_mode & 0o777 == 0o755


def test_write_health_is_safe_from_many_threads() -> None:
    """Failures and successes from several threads at once keep exact counts."""
    health = WriteHealth()

    def hammer() -> None:
        for _ in range(500):
            health.failed("logs", ENOSPC)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert health.to_json()["logs"]["count"] == 2000
    assert health.failed_total == 2000


def test_rotating_log_rotates_as_rotating_file_handler_does(tmp_path: Path) -> None:
    """The daemon's log rotates without `logging.handlers`: past max_bytes the file becomes
    NAME.1 (NAME.1 becomes NAME.2), `backups` of them are kept, and every record is in one of
    them, whole, in order; the same files RotatingFileHandler writes."""
    import logging
    import logging.handlers

    from engctl.daemon.storage import RotatingLog

    def write(handler: logging.Handler, folder: Path) -> list[str]:
        handler.setFormatter(logging.Formatter("%(message)s"))
        for i in range(40):
            handler.emit(logging.LogRecord("t", logging.INFO, "", 0, f"record {i:02d}", (), None))
        handler.close()
        return sorted(p.name for p in folder.iterdir())

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir()
    theirs.mkdir()
    names = write(RotatingLog(ours / "d.log", max_bytes=100, backups=2), ours)
    expected = write(
        logging.handlers.RotatingFileHandler(theirs / "d.log", maxBytes=100, backupCount=2), theirs
    )
    assert names == expected == ["d.log", "d.log.1", "d.log.2"]
    for name in names:
        assert (ours / name).read_text() == (theirs / name).read_text()
        assert len((ours / name).read_text()) < 100
    assert (ours / "d.log").read_text().splitlines()[-1] == "record 39"
