"""Processes are launched off the daemon's loop (issue 12): the fork and exec wait until the
child has exec'd, 3-19 ms on two busy cores, and on the loop every request in flight waited
with them at each step of a rolling reload. Meanwhile an instance is `starting` with no
process yet. These tests widen that window (a daemon whose every launch takes LAUNCH_DELAY
seconds more, `tests.prestart._slow_launches`) and act inside it: the loop serves on, and a
stop, an unregister, a shutdown or a oneshot's deadline that comes first loses no process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from engctl.errors import EngctlError
from tests.conftest import (
    FORK_DAEMONS,
    Home,
    _home_processes,
    alive,
    engine_cmd,
    stays,
    wait_until,
)
from tests.daemon_support import RawConn

pytestmark = pytest.mark.skipif(
    not FORK_DAEMONS, reason="the launch delay is injected into a forked daemon"
)

LAUNCH_DELAY = 0.8
QUICK = {"restart": {"start_seconds": 0.05}, "stop": {"timeout": 5}}


def same_pid(home: Home, pid: int) -> bool:
    return bool(home.instance("crashy#0")["pid"] == pid)


def engine_processes(home: Home) -> list[psutil.Process]:
    """Live processes of this home but its daemon."""
    daemon = home.daemon_pid()
    return [p for p in _home_processes(home.path, home.paths.daemon_id, []) if p.pid != daemon]


@contextlib.contextmanager
def registering(home: Home, name: str, command: list[str], **spec: Any) -> Iterator[RawConn]:
    """Register (and start) `name` without waiting for the answer, which comes once its
    processes exist: the test acts meanwhile, inside the launch window."""
    frame = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "engine.register",
        "params": {"engines": {name: {"command": command, **spec}}},
    }
    conn = RawConn(home.paths.socket, timeout=30)
    try:
        conn.send(json.dumps(frame).encode() + b"\n")
        yield conn
    finally:
        conn.close()


def launching(home: Home, inst_id: str) -> None:
    """Wait until `inst_id` is starting with no process yet: inside the launch window."""

    def starting() -> bool:
        return any(i["id"] == inst_id and i["state"] == "starting" for i in home.instances())

    wait_until(starting, timeout=10)
    assert home.instance(inst_id)["pid"] is None


def test_a_slow_launch_does_not_stall_the_loop(home: Home) -> None:
    """Issue 12 (regression): a launch used to fork and exec on the daemon's loop, which
    waited for the exec: every call and request waited with it. With a launch that takes
    0.8 s, requests to another engine and status answer at once meanwhile."""
    home.start_daemon(launch_delay=LAUNCH_DELAY)
    home.register("ready", engine_cmd("echo.py"), type="E", **QUICK)
    home.wait_state("ready#0", "ready")
    slowest = 0.0
    with registering(home, "new", engine_cmd("echo.py"), type="N", **QUICK) as reg:
        launching(home, "new#0")
        with home.client(timeout=30) as c:
            c.connect()
            while home.instance("new#0")["pid"] is None:
                t0 = time.monotonic()
                answer = c.exec({"n": 1}, type="E", retries=0, timeout=5)
                assert answer["result"] == {"echo": {"n": 1}}
                c.status()
                slowest = max(slowest, time.monotonic() - t0)
        assert "result" in reg.recv()
    assert slowest < LAUNCH_DELAY / 4, f"a call took {slowest:.3f}s during a launch"
    home.wait_state("new#0", "ready")


def test_a_stop_during_a_launch_stops_the_process_once_it_exists(home: Home) -> None:
    """A stop that comes while the process is on its way waits for it and gives it the
    stop policy the moment it exists: `stop` returns with the instance stopped and no
    process left (it never reaches ready)."""
    home.start_daemon(launch_delay=LAUNCH_DELAY)
    with registering(home, "w", engine_cmd("echo.py"), **QUICK):
        launching(home, "w#0")
        r = home.cli("stop", "w")
        assert r.returncode == 0, r.stderr
    inst = home.instance("w#0")
    assert inst["state"] == "stopped" and inst["pid"] is None
    wait_until(lambda: engine_processes(home) == [], timeout=10)
    with home.client() as c:
        events = c.call("events.list", engine="w", limit=100)["events"]
    assert "instance.spawned" in [e["kind"] for e in events]
    states = [e["to"] for e in events if e["kind"] == "instance.state"]
    assert states[-2:] == ["stopping", "stopped"] and "ready" not in states


def test_unregister_during_a_launch_leaves_no_process(home: Home) -> None:
    """Unregistering an engine whose process is on its way: the process, once it exists,
    is stopped, and the engine is gone."""
    home.start_daemon(launch_delay=LAUNCH_DELAY)
    with registering(home, "w", engine_cmd("echo.py"), **QUICK):
        launching(home, "w#0")
        r = home.cli("unregister", "w")
        assert r.returncode == 0, r.stderr
    assert home.status()["engines"] == []
    wait_until(lambda: engine_processes(home) == [], timeout=10)


@pytest.mark.parametrize("signals", [1, 2], ids=["graceful", "second-signal"])
def test_daemon_shutdown_during_a_launch_leaves_no_process(home: Home, signals: int) -> None:
    """The daemon asked to stop (once: graceful; twice: kill everything now) while a
    process is on its way waits for it to exist and ends it: nothing outlives the daemon."""
    home.start_daemon(launch_delay=LAUNCH_DELAY)
    pid = home.daemon_pid()
    assert pid is not None
    daemon = psutil.Process(pid)
    with registering(home, "w", engine_cmd("echo.py"), **QUICK):
        launching(home, "w#0")
        for _ in range(signals):
            os.kill(pid, signal.SIGTERM)
        wait_until(lambda: not alive(daemon), timeout=20)
    assert engine_processes(home) == []


def test_a_oneshot_past_its_deadline_before_its_process_exists_is_killed_when_it_does(
    home: Home,
) -> None:
    """A oneshot request whose deadline passes while its process is on its way fails with
    its timeout; the process is killed the moment it exists, and the slot is free again."""
    home.start_daemon(launch_delay=LAUNCH_DELAY)
    home.register("one", engine_cmd("oneshot_upper.py"), mode="oneshot", type="U")
    r = home.cli("exec", "--type", "U", "--timeout", "0.3", "--retries", "0", "--", '"x"')
    assert r.returncode != 0 and "timed out" in r.stderr, r.stderr
    wait_until(lambda: engine_processes(home) == [], timeout=10)
    with home.client(timeout=30) as c:
        assert c.exec("y", type="U", timeout=10)["result"] == "Y"
    wait_until(lambda: engine_processes(home) == [], timeout=10)


def test_oneshot_runs_launch_side_by_side(home: Home) -> None:
    """Oneshot runs of an engine with several slots launch at once (the launcher has
    threads to spare): three runs whose launches each take 0.8 s end in well under 3 x."""
    home.start_daemon(launch_delay=LAUNCH_DELAY)
    home.register(
        "par", engine_cmd("oneshot_upper.py"), mode="oneshot", type="P", max_concurrency=3
    )
    results: list[object] = []

    def run(text: str) -> None:
        with home.client(timeout=30) as c:
            results.append(c.exec(text, type="P", timeout=20)["result"])

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(t,)) for t in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    took = time.monotonic() - t0
    assert sorted(results) == ["A", "B", "C"]  # type: ignore[type-var]
    assert took < LAUNCH_DELAY * 2.5, f"three runs took {took:.2f}s"


def test_daemon_shutdown_during_a_oneshot_launch_leaves_no_process(home: Home) -> None:
    """A oneshot run whose process is on its way when the daemon is told to stop twice
    (kill everything now): the run is killed the moment its process exists, before the
    daemon exits."""
    home.start_daemon(launch_delay=LAUNCH_DELAY)
    home.register("one", engine_cmd("oneshot_upper.py"), mode="oneshot", type="U")
    pid = home.daemon_pid()
    assert pid is not None
    daemon = psutil.Process(pid)

    def run() -> None:
        with home.client(timeout=30) as c, contextlib.suppress(EngctlError):
            c.exec("x", type="U", timeout=20)

    caller = threading.Thread(target=run)
    caller.start()
    wait_until(lambda: home.status()["engines"][0]["requests"]["in_flight"] == 1, timeout=10)
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not alive(daemon), timeout=20)
    caller.join(30)
    assert engine_processes(home) == []


def test_a_crash_restart_is_not_swept_with_the_process_it_replaces(home: Home) -> None:
    """Issue 12 (regression): after a crash, the sweep of the dead process's tree looked for
    its adopted orphans by instance id and generation; the restart, launched meanwhile and
    not yet watched, matched and was killed (supervise.py's crash loop: the pid `status`
    gave was gone). Ten kill -9s in a row: each restart lives on, one restart per kill."""
    home.start_daemon()
    home.register(
        "crashy",
        ["sleep", "3600"],
        mode="service",
        restart={"policy": "always", "start_seconds": 0.05, "backoff": {"initial": 0}},
        stop={"timeout": 0.3},  # the sweep's grace: its SIGKILL would come 0.3 s after
        policy={"crash": {"flap_max_restarts": 1000}},
    )
    pid = home.wait_state("crashy#0", "ready")["pid"]
    for n in range(1, 11):
        os.kill(pid, signal.SIGKILL)
        old = pid

        def restarted(old: int = old) -> dict[str, Any] | None:
            inst = home.instance("crashy#0")
            return inst if inst["state"] == "ready" and inst["pid"] != old else None

        pid = wait_until(restarted, timeout=10)["pid"]
        # Past the sweep's grace, a restart taken for an orphan would be dead: it lives on.
        stays(functools.partial(same_pid, home, pid), 0.5)
        inst = home.instance("crashy#0")
        assert (inst["state"], inst["restarts"]) == ("ready", n), inst
        assert psutil.pid_exists(pid)


def test_start_returns_once_its_processes_exist(home: Home) -> None:
    """`start` (and register, scale, restart) returns once the processes it started exist,
    as when the loop launched them itself (systemd's Type=exec): status right after it
    shows every pid, even when each launch takes 0.8 s more."""
    home.start_daemon(launch_delay=LAUNCH_DELAY)
    with home.client(timeout=60) as c:
        c.register({"s": {"command": ["sleep", "60"], "mode": "service", "instances": 3}})
        assert all(i["pid"] for i in c.status(["s"])["engines"][0]["instances"])
        c.stop(["s"])
        c.start(["s"])
        pids = [i["pid"] for i in c.status(["s"])["engines"][0]["instances"]]
        assert all(p is not None and psutil.pid_exists(p) for p in pids), pids
        c.scale("s", 5)
        assert all(i["pid"] for i in c.status(["s"])["engines"][0]["instances"])
