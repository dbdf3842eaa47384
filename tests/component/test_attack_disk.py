"""Attacks on the files of a home (issue 9, items 1, 3, 4 and 5), run against real daemons.

Another user's files and folders, planted symlinks, corrupt or missing databases, an unreadable
registry and a full disk: the daemon refuses what it cannot trust with one line that names the
path and the fix, never follows a symlink, and never lets an observability file stop
supervision. Each case takes a few seconds at most.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from engctl.errors import EXIT_FAILED, EXIT_UNREACHABLE
from tests.conftest import Home, engine_cmd, wait_until
from tests.daemon_support import all_ready, daemon_processes, gone, kill9_daemon

NOBODY = 65534
PRECIOUS = "precious: must not change\n"
QUICK = {"restart": {"start_seconds": 0.2, "backoff": {"initial": 0.1}}}


def _one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def _refused(home: Home, *args: str) -> str:
    """Run a command that must be refused with exit 3 and one line; no daemon may run after."""
    r = home.cli(*args)
    assert r.returncode == EXIT_UNREACHABLE, (r.returncode, r.stdout, r.stderr)
    line = _one_error_line(r)
    wait_until(lambda: daemon_processes(home) == [], 15)
    return line


def _folders(home: Home) -> None:
    """The home's folders, made the way the daemon makes them."""
    for d in (home.paths.runtime_dir, home.paths.state_dir, home.paths.log_dir):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)


def _precious(path: Path) -> Path:
    path.write_text(PRECIOUS)
    path.chmod(0o644)
    return path


def _daemon_status(home: Home) -> dict[str, Any]:
    with home.client(autostart=False) as c:
        return c.call("daemon.status")  # type: ignore[no-any-return]


def _events(home: Home, kind: str) -> list[dict[str, Any]]:
    with home.client(autostart=False) as c:
        events = cast("list[dict[str, Any]]", c.events(limit=10_000))
    return [e for e in events if e["kind"] == kind]


def _service(home: Home, name: str = "svc", script: str = "sleeper.py", **spec: Any) -> None:
    home.register(name, engine_cmd(script), mode="service", **QUICK, **spec)


# -- trust: other users' files and folders, symlinks (item 1) -------------------------------


def test_registry_planted_by_another_uid_is_refused(home: Home) -> None:
    """A registry.json owned by another uid is never read: its commands never run."""
    _folders(home)
    marker = home.path / "ran"
    planted = {"pwn": {"spec": {"command": ["touch", str(marker)], "mode": "service"}}}
    home.paths.registry.write_text(json.dumps({"version": 1, "engines": planted}))
    os.chown(home.paths.registry, NOBODY, NOBODY)
    line = _refused(home, "daemon", "start")
    assert str(home.paths.registry) in line
    assert f"owned by uid {NOBODY}" in line and "chown" in line
    assert not marker.exists()


def test_group_writable_home_is_refused(home: Home) -> None:
    """A home others may write is refused by the daemon and by the CLI, with the fix."""
    _folders(home)
    home.path.chmod(0o770)
    for args in (("daemon", "start"), ("status",)):
        line = _refused(home, *args)
        assert f"{home.path} is writable by group or others (mode 0770)" in line
        assert f"chmod go-w {home.path}" in line


def test_home_owned_by_another_uid_is_refused(home: Home) -> None:
    """A home that belongs to another user is not used, even when only it may write it."""
    os.chown(home.path, NOBODY, NOBODY)
    line = _refused(home, "daemon", "start")
    assert f"{home.path} is owned by uid {NOBODY}" in line


@pytest.mark.parametrize("file", ["daemon_lock", "start_lock"], ids=["daemon.pid", "start.lock"])
def test_pid_and_lock_symlinks_are_not_followed(home: Home, file: str) -> None:
    """A state/daemon.pid (daemon) or run/start.lock (CLI) symlink is refused; the file it
    points to is untouched."""
    _folders(home)
    target = _precious(home.path / "target")
    link: Path = getattr(home.paths, file)
    link.symlink_to(target)
    line = _refused(home, "daemon", "start")
    assert f"{link} is a symlink" in line
    assert target.read_text() == PRECIOUS


def test_run_folder_symlink_target_is_not_chmoded(home: Home) -> None:
    """A run/ symlink is refused: the folder it points to keeps its mode."""
    target = home.path / "elsewhere"
    target.mkdir(mode=0o755)
    target.chmod(0o755)
    home.paths.runtime_dir.symlink_to(target)
    line = _refused(home, "daemon", "start")
    assert f"{home.paths.runtime_dir} is a symlink" in line
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    assert list(target.iterdir()) == []


def test_socket_symlink_is_not_connected_to(home: Home) -> None:
    """The CLI does not connect through a symlink in place of the socket."""
    _folders(home)
    os.symlink(home.path / "somewhere.sock", home.paths.socket)
    line = _refused(home, "status")
    assert f"{home.paths.socket} is a symlink" in line


def test_log_symlink_is_not_appended_to(home: Home) -> None:
    """An instance log that is a symlink gets no line; the instance runs, the failure shows."""
    _folders(home)
    target = _precious(home.path / "target")
    home.paths.instance_log("svc", 0).symlink_to(target)
    _service(home, script="chatty.py")
    wait_until(lambda: all_ready(home, "svc", 1), 20)
    failing = wait_until(lambda: _daemon_status(home)["write_errors"].get("logs"), 10)
    assert "is a symlink" in failing["error"]
    assert failing["path"] == str(home.paths.instance_log("svc", 0))
    r = home.cli("logs", "svc#0")
    assert r.returncode != 0 and "is a symlink" in _one_error_line(r)
    assert PRECIOUS not in r.stdout
    assert target.read_text() == PRECIOUS
    assert _events(home, "daemon.write_failed")


@pytest.mark.parametrize("db", ["events", "history"])
def test_database_symlink_is_set_aside_not_followed(home: Home, db: str) -> None:
    """A symlink in place of a database is moved aside (an event says so); its target is
    neither read nor written, and the daemon runs with a fresh database."""
    _folders(home)
    target = _precious(home.path / "target")
    path = home.paths.state_dir / f"{db}.sqlite3"
    path.symlink_to(target)
    _service(home)
    wait_until(lambda: all_ready(home, "svc", 1), 20)
    resets = _daemon_status(home)["databases_reset"]
    assert [r["path"] for r in resets] == [str(path)]
    assert "is a symlink" in resets[0]["error"]
    assert Path(resets[0]["moved_to"]).is_symlink()
    assert not path.is_symlink()
    assert [e["data"]["path"] for e in _events(home, "daemon.database_reset")] == [str(path)]
    assert target.read_text() == PRECIOUS


def test_report_refuses_a_symlinked_history_database(home: Home) -> None:
    """`engctl report` (reading the files itself) does not open a symlinked database."""
    _folders(home)
    target = _precious(home.path / "target")
    home.paths.history_db.symlink_to(target)
    line = _refused(home, "report")
    assert f"{home.paths.history_db} is a symlink" in line


# -- corrupt or missing databases (item 4) -------------------------------------------------


def _corrupt(path: Path, case: str) -> None:
    side = [Path(f"{path}{s}") for s in ("-wal", "-shm", "-journal")]
    if case == "wal":
        wal = side[0]
        size = wal.stat().st_size
        assert size > 32, "the kill -9 left no WAL frames to corrupt"
        with wal.open("r+b") as f:
            f.seek(32)  # keep the header: the frames are garbage
            f.write(os.urandom(size - 32))
        return
    for p in side:
        p.unlink(missing_ok=True)
    if case == "truncated":
        size = path.stat().st_size
        assert size >= 8192
        with path.open("r+b") as f:
            f.truncate(size // 2)
    elif case == "garbage":
        path.write_bytes(os.urandom(max(path.stat().st_size, 4096)))
    elif case == "zero":
        path.write_bytes(b"")
    elif case == "folder":
        path.unlink()
        path.mkdir(mode=0o700)
        (path / "inside").write_text("x")


# Whether the daemon finds the file unusable and moves it aside. SQLite itself reads a
# zero-length file as an empty database and drops WAL frames whose checksums fail.
CORRUPTIONS = {"truncated": True, "garbage": True, "zero": False, "folder": True, "wal": False}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
@pytest.mark.parametrize("db", ["events", "history"])
def test_corrupt_database_does_not_stop_supervision(daemon: Home, db: str, case: str) -> None:
    """With a damaged events or history database the daemon starts, engines run, and an
    event says what was moved aside."""
    _service(daemon)
    wait_until(lambda: all_ready(daemon, "svc", 1), 20)
    with daemon.client() as c:
        c.call("metrics.flush")  # a history file with rows, events on disk
    path = daemon.paths.state_dir / f"{db}.sqlite3"
    if case == "wal":
        kill9_daemon(daemon)
    else:
        assert daemon.cli("daemon", "stop").returncode == 0
    _corrupt(path, case)
    r = daemon.cli("daemon", "start")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: all_ready(daemon, "svc", 1), 20)
    resets = _daemon_status(daemon)["databases_reset"]
    if CORRUPTIONS[case]:
        assert [r["path"] for r in resets] == [str(path)]
        assert os.path.lexists(resets[0]["moved_to"])
        said = _events(daemon, "daemon.database_reset")
        assert [e["data"]["path"] for e in said] == [str(path)]
        assert "moved to" in said[0]["reason"]
    else:
        assert resets == []
    # Both files work again: events are written and read, a history bucket is written.
    with daemon.client() as c:
        assert c.call("metrics.flush")["rows"] >= 1
        assert any(e["kind"] == "daemon.started" for e in c.events(limit=100))
    assert daemon.cli("report", "--json").returncode == 0


def test_events_database_corrupted_while_running_is_replaced(daemon: Home) -> None:
    """A database damaged under a running daemon is moved aside at the next use; the daemon,
    its writer thread and the engines go on."""
    _service(daemon)
    pid = wait_until(lambda: all_ready(daemon, "svc", 1), 20)[0]["pid"]
    for p in (daemon.paths.events_db, Path(f"{daemon.paths.events_db}-wal")):
        with p.open("r+b") as f:  # in place: the daemon's connection sees it
            f.write(os.urandom(p.stat().st_size))
    _service(daemon, "more")
    said = wait_until(lambda: _events(daemon, "daemon.database_reset"), 10)
    assert said[0]["data"]["path"] == str(daemon.paths.events_db)
    wait_until(lambda: all_ready(daemon, "more", 1), 20)
    assert daemon.instance("svc#0")["pid"] == pid
    # The writer thread still writes: a later event reaches the fresh file.
    with daemon.client() as c:
        c.stop(["more"])
        later = c.events(limit=100)
    assert any(e["kind"] == "instance.state" and e["engine"] == "more" for e in later)


# -- an unreadable registry (item 5) -------------------------------------------------------


def _valid_registry(home: Home) -> bytes:
    _service(home)
    wait_until(lambda: all_ready(home, "svc", 1), 20)
    return home.paths.registry.read_bytes()


BAD_REGISTRIES: dict[str, Callable[[bytes], bytes]] = {
    "garbage": lambda good: os.urandom(300),
    "truncated": lambda good: good[: len(good) // 2],
    "array": lambda good: b"[]",
    "engines-list": lambda good: b'{"version": 1, "engines": []}',
    "not-utf8": lambda good: b'{"version": 1, "engines": {"\xff": {}}}',
}


@pytest.mark.parametrize("case", sorted(BAD_REGISTRIES))
def test_unreadable_registry_refuses_to_start_and_loses_nothing(daemon: Home, case: str) -> None:
    """A registry the daemon cannot read makes it refuse to start (exit 3, the path, how to
    recover), every time, without changing the file or stopping the running engines."""
    good = _valid_registry(daemon)
    old = daemon.instance("svc#0")["pid"]
    kill9_daemon(daemon)
    bad = BAD_REGISTRIES[case](good)
    daemon.paths.registry.write_bytes(bad)
    for args in (("daemon", "start"), ("register", "x", "--cmd", "true"), ("daemon", "start")):
        line = _refused(daemon, *args)
        assert f"registry {daemon.paths.registry} is unreadable" in line
        assert "engctl daemon start --reset-registry" in line
    assert daemon.paths.registry.read_bytes() == bad
    assert not gone(old), "an engine of the killed daemon was stopped"
    # The user says so: the file is moved aside (kept), and the daemon starts empty.
    r = daemon.cli("daemon", "start", "--reset-registry")
    assert r.returncode == 0, r.stderr
    kept = list(daemon.paths.state_dir.glob("registry.json.reset-*"))
    assert [p.read_bytes() for p in kept] == [bad]
    assert daemon.status()["engines"] == []
    assert _events(daemon, "daemon.registry_reset")
    wait_until(lambda: gone(old), 15)  # the old generation is replaced, as after any kill


def test_reset_registry_is_refused_while_a_daemon_runs(daemon: Home) -> None:
    """--reset-registry applies when a daemon starts; with one running it changes nothing."""
    good = _valid_registry(daemon)
    r = daemon.cli("daemon", "start", "--reset-registry")
    assert r.returncode == 2
    assert "stop it first" in _one_error_line(r)
    assert daemon.paths.registry.read_bytes() == good


def test_bad_entries_are_skipped_reported_and_kept(daemon: Home) -> None:
    """One engine with an unknown key (and one that depends on it) is skipped and reported;
    the good engines run, and the bad entries stay in registry.json through later saves."""
    _service(daemon, "good")
    _service(daemon, "bad")
    _service(daemon, "needs-bad", depends_on=["bad"])
    wait_until(lambda: all_ready(daemon, "needs-bad", 1), 20)
    assert daemon.cli("daemon", "stop").returncode == 0
    doc = json.loads(daemon.paths.registry.read_text())
    doc["engines"]["bad"]["spec"]["colour"] = "blue"
    daemon.paths.registry.write_text(json.dumps(doc))
    assert daemon.cli("daemon", "start").returncode == 0
    wait_until(lambda: all_ready(daemon, "good", 1), 20)
    assert [e["name"] for e in daemon.status()["engines"]] == ["good"]
    info = _daemon_status(daemon)
    skipped = {s["name"]: s["error"] for s in info["registry_skipped"]}
    assert set(skipped) == {"bad", "needs-bad"}
    assert "unknown key 'colour'" in skipped["bad"]
    assert "depends on 'bad'" in skipped["needs-bad"]
    said = {e["engine"] for e in _events(daemon, "registry.entry_skipped")}
    assert said == {"bad", "needs-bad"}
    r = daemon.cli("list")
    assert r.returncode == 0
    assert sum("engctl: warning: registry entry" in ln for ln in r.stderr.splitlines()) == 2
    # A later save (another registration) writes the bad entries back unchanged.
    _service(daemon, "later")
    saved = json.loads(daemon.paths.registry.read_text())["engines"]
    assert saved["bad"] == doc["engines"]["bad"]
    assert saved["needs-bad"] == doc["engines"]["needs-bad"]
    assert set(saved) == {"good", "bad", "needs-bad", "later"}
    # Registering the engine again replaces the bad entry.
    _service(daemon, "bad")
    assert "colour" not in json.loads(daemon.paths.registry.read_text())["engines"]["bad"]["spec"]


# -- a full disk (item 3) ------------------------------------------------------------------


@pytest.fixture
def full_disk(home: Home) -> Iterator[Path]:
    """The home on a small tmpfs of its own; yields a filler file that fills it up when
    written (remove it to free the space)."""
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m,mode=0700", "tmpfs", str(home.path)],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for a full disk: {r.stderr.strip()}")
    try:
        yield home.path / "filler"
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            home.cli("daemon", "stop", timeout=60)
        subprocess.run(["umount", "-l", str(home.path)], check=False)


def _fill(filler: Path) -> None:
    """Write until not one more byte fits."""
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        size = 1 << 20
        while size:
            try:
                os.write(fd, b"\0" * size)
            except OSError:
                size //= 2
    finally:
        os.close(fd)


def test_full_disk_loses_no_exit_and_refuses_registrations_cleanly(
    home: Home, full_disk: Path
) -> None:
    """On a full disk an engine's exit is still handled (restarted after backoff), a
    registration is refused with "no space left on device" and leaves nothing behind, and
    `daemon status` says so; once space is back, an event says writes work again."""
    _service(home, script="chatty.py")
    first = wait_until(lambda: all_ready(home, "svc", 1), 20)[0]["pid"]
    _fill(full_disk)
    os.kill(first, 9)

    # The exit is seen and the instance restarted, although its log cannot be written.
    def restarted() -> list[dict[str, Any]] | None:
        insts = all_ready(home, "svc", 1)
        return insts if insts and insts[0]["pid"] != first else None

    assert wait_until(restarted, 20)[0]["restarts"] >= 1
    info = wait_until(lambda: (s := _daemon_status(home))["write_errors"].get("logs") and s, 10)
    assert info["disk_full"]
    assert info["write_errors"]["logs"]["error"] == "no space left on device"
    assert any("no space left on device" in w for w in info["warnings"])
    # A registration the disk refuses: one line, not listed, no temp file left.
    r = home.cli("register", "late", "--cmd", " ".join(engine_cmd("sleeper.py")))
    assert r.returncode == EXIT_FAILED
    line = _one_error_line(r)
    assert "no space left on device" in line and str(home.paths.registry) in line
    assert [e["name"] for e in home.status()["engines"]] == ["svc"]
    assert [p.name for p in home.paths.state_dir.iterdir() if p.name.endswith(".tmp")] == []
    # Space is back: writes work again and an event says so.
    full_disk.unlink()

    def recovered() -> list[dict[str, Any]]:
        return [e for e in _events(home, "daemon.write_recovered") if e["data"]["target"] == "logs"]

    said = wait_until(recovered, 15)
    assert said[0]["data"]["failed"] >= 1
    wait_until(lambda: not _daemon_status(home)["disk_full"], 15)
    r = home.cli("register", "late", "--cmd", " ".join(engine_cmd("sleeper.py")))
    assert r.returncode == 0, r.stderr
    assert "late" in json.loads(home.paths.registry.read_text())["engines"]
