"""Unit tests of the /proc readings `engctl.daemon.process` makes of processes it did not
spawn (a killed daemon's engines, orphans it adopted), on real processes, against psutil."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import psutil
import pytest

from engctl.daemon import memory, process, proctree
from tests.conftest import wait_until


@pytest.fixture
def marked() -> Iterator[subprocess.Popen[bytes]]:
    """A sleeping process carrying a daemon id marker in its environment."""
    env = {**os.environ, process.DAEMON_ID_ENV: f"test-{os.getpid()}"}
    child = subprocess.Popen(["sleep", "60"], env=env)
    try:
        yield child
    finally:
        child.kill()
        child.wait()


def test_create_time_is_psutils(marked: subprocess.Popen[bytes]) -> None:
    created = proctree.create_time(marked.pid)
    assert created is not None
    assert abs(created - psutil.Process(marked.pid).create_time()) < 0.01


def test_create_time_of_a_gone_or_zombie_process_is_none() -> None:
    child = subprocess.Popen(["true"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped yet
    assert proctree.create_time(child.pid) is None  # a zombie
    child.wait()
    assert proctree.create_time(child.pid) is None  # gone


def test_find_old_generation_finds_the_marked_processes_only(
    marked: subprocess.Popen[bytes],
) -> None:
    found = proctree.find_old_generation(f"test-{os.getpid()}")
    assert [pid for pid, _created in found] == [marked.pid]
    assert proctree.find_old_generation(f"other-{os.getpid()}") == []


def test_signal_alive_spares_a_recycled_pid(marked: subprocess.Popen[bytes]) -> None:
    created = proctree.create_time(marked.pid)
    assert created is not None
    proctree.signal_alive([(marked.pid, created - 5.0)], signal.SIGKILL)  # another process
    assert marked.poll() is None
    proctree.signal_alive([(marked.pid, created)], signal.SIGKILL)
    assert marked.wait(5) == -signal.SIGKILL


def test_own_rss_is_psutils() -> None:
    assert abs(memory.own_rss() - psutil.Process().memory_info().rss) < 4 * 2**20


def test_a_launch_that_exits_before_it_is_watched_keeps_its_exit_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 12: launches happen on a thread, and a process may exit before the loop
    watches it. The SIGCHLD reaper, which takes any child it does not know (adopted
    orphans), must leave it be: its exit status (3) reaches its own watcher, not 0."""
    import asyncio
    import threading
    import time

    real_launch = process.launch
    exited = threading.Event()

    def launch_then_wait(*args: Any, **kwargs: Any) -> process.Launched:
        launched = real_launch(*args, **kwargs)
        os.waitid(os.P_PID, launched.pid, os.WEXITED | os.WNOWAIT)  # it has exited, unwatched
        exited.set()
        time.sleep(0.2)  # the loop's reaper runs meanwhile
        return launched

    monkeypatch.setattr(process, "launch", launch_then_wait)

    async def scenario() -> process.ExitStatus:
        loop = asyncio.get_running_loop()
        status: asyncio.Future[process.ExitStatus] = loop.create_future()
        results: list[object] = []
        process.spawn_soon(
            ["sh", "-c", "exit 3"],
            cwd=None,
            env=dict(os.environ),
            pipe_stdin=False,
            stdout_to_pipe=False,
            loop=loop,
            on_exit=lambda _proc, st: status.set_result(st),
            then=results.append,
        )
        assert results == []  # never before spawn_soon returns
        while not exited.is_set():
            await asyncio.sleep(0.01)
        for _ in range(5):
            process.reap_children()  # as on SIGCHLD
            await asyncio.sleep(0.01)
        st = await asyncio.wait_for(status, 10)
        assert len(results) == 1 and isinstance(results[0], process.ChildProcess)
        results[0].close_pipes()
        return st

    assert asyncio.run(scenario()) == process.ExitStatus(3, None)


def test_a_failed_launch_reaches_then_as_a_spawn_error() -> None:
    """A command that cannot start is a SpawnError handed to `then` on the loop."""
    import asyncio

    async def scenario() -> object:
        loop = asyncio.get_running_loop()
        got: asyncio.Future[object] = loop.create_future()
        process.spawn_soon(
            ["/nonexistent/engctl-test"],
            cwd=None,
            env={},
            pipe_stdin=True,
            stdout_to_pipe=True,
            loop=loop,
            on_exit=lambda _p, _s: None,
            then=got.set_result,
        )
        return await asyncio.wait_for(got, 10)

    result = asyncio.run(scenario())
    assert isinstance(result, process.SpawnError) and "No such file" in str(result)


def test_a_burst_of_launches_all_land_through_a_few_pool_jobs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 13 (memory): a fleet that starts at once queues its launches as plain callables;
    no more than LAUNCH_THREADS jobs reach the thread pool (each held a future, a lock and a
    condition, about 1 KiB, for every waiting launch), and every launch lands, in order of
    its call, each with its own process."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    jobs: list[object] = []

    class CountingPool(ThreadPoolExecutor):
        def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
            jobs.append(fn)
            return super().submit(fn, *args, **kwargs)

    pool = CountingPool(process.LAUNCH_THREADS, thread_name_prefix="test-launch")
    monkeypatch.setattr(process, "_launcher", pool)
    n = 40

    async def scenario() -> list[object]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGCHLD, process.reap_children)  # as the daemon does
        results: list[object] = []
        exits: list[process.ExitStatus] = []
        for k in range(n):
            process.spawn_soon(
                ["sh", "-c", f"exit {k % 7}"],
                cwd=None,
                env={"PATH": os.environ["PATH"]},
                pipe_stdin=False,
                stdout_to_pipe=False,
                loop=loop,
                on_exit=lambda _p, st: exits.append(st),
                then=results.append,
            )
        await process.launches_landed(30)
        while len(exits) < n:
            await asyncio.sleep(0.01)
        assert sorted(st.code or 0 for st in exits) == sorted(k % 7 for k in range(n))
        for r in results:
            assert isinstance(r, process.ChildProcess)
            r.close_pipes()
        return results

    try:
        results = asyncio.run(scenario())
    finally:
        pool.shutdown()
    assert len(results) == n
    assert len({r.pid for r in results if isinstance(r, process.ChildProcess)}) == n
    assert 1 <= len(jobs) <= n // 2, len(jobs)  # one per launch before
    assert not process._waiting and process._taking == 0


def _launch_marker(pid: int) -> str | None:
    return proctree._environ(pid).get(process.LAUNCH_ENV)


def test_orphan_search_takes_only_the_orphans_of_its_own_start() -> None:
    """Issue 12 (regression): the search for a stopped process's adopted orphans matched any
    child of the daemon carrying the instance's id and generation. With launches off the
    loop, the instance's restart can exist (launched, not yet watched) when the search runs:
    it was taken for an orphan of the old process and killed (seen in supervise.py's crash
    loop). Each start now has its own token, and the search takes only its own start's."""
    base = {**os.environ, process.INSTANCE_ENV: "x#0", process.GENERATION_ENV: "1"}
    old_orphan = subprocess.Popen(["sleep", "60"], env={**base, process.LAUNCH_ENV: "A"})
    restart = subprocess.Popen(["sleep", "60"], env={**base, process.LAUNCH_ENV: "B"})
    try:
        # Popen returns as the child execs, before its new environment is readable.
        for child in (old_orphan, restart):
            wait_until(functools.partial(_launch_marker, child.pid))
        found = [pid for pid, _ct in proctree.adopted_orphans(("x#0", "1", "A"))]
        assert found == [old_orphan.pid]
        assert [pid for pid, _ct in proctree.adopted_orphans(("x#0", "1", "B"))] == [restart.pid]
    finally:
        for child in (old_orphan, restart):
            child.kill()
            child.wait()


def test_an_instances_stderr_pipe_holds_one_page() -> None:
    """Issue 13 (fleet size): Linux counts pipe pages per user (fs.pipe-user-pages-soft,
    16,384) and past that gives every new pipe of the user 8 KiB: three 64 KiB pipes per
    worker reached it at 341 workers. stderr, a log read at once, holds one page; the
    protocol pipes keep the default."""
    import fcntl

    launched = process.launch(
        ["sleep", "60"], cwd=None, env=dict(os.environ), pipe_stdin=True, stdout_to_pipe=True
    )
    try:
        stdin, stdout, stderr = launched.stdin, launched.stdout, launched.stderr
        assert stdin is not None and stdout is not None and stderr is not None
        assert fcntl.fcntl(stderr, fcntl.F_GETPIPE_SZ) == 4096
        assert fcntl.fcntl(stdin, fcntl.F_GETPIPE_SZ) == 65536
        assert fcntl.fcntl(stdout, fcntl.F_GETPIPE_SZ) == 65536
    finally:
        launched.popen.kill()
        launched.popen.wait()
        launched.close_pipes()


def test_a_sweep_with_no_child_but_instances_takes_no_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 13 (memory): after an instance's leader exits, the search for its adopted
    orphans runs on a thread only when the daemon has children other than its instances;
    with none (the common case) no thread's round trip is made for each stopped process."""
    import asyncio

    async def no_thread(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a thread was used")

    monkeypatch.setattr(proctree, "own_children", lambda: [])
    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    leader = subprocess.Popen(["true"], start_new_session=True)
    leader.wait()
    asyncio.run(proctree.sweep_tree(leader.pid, [], ("w#0", "1", "x"), 1.0, set))
