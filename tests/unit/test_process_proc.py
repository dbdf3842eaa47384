"""Unit tests of the /proc readings `engctl.daemon.process` makes of processes it did not
spawn (a killed daemon's engines, orphans it adopted), on real processes, against psutil."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import psutil
import pytest

from engctl.daemon import process


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
    created = process.create_time(marked.pid)
    assert created is not None
    assert abs(created - psutil.Process(marked.pid).create_time()) < 0.01


def test_create_time_of_a_gone_or_zombie_process_is_none() -> None:
    child = subprocess.Popen(["true"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped yet
    assert process.create_time(child.pid) is None  # a zombie
    child.wait()
    assert process.create_time(child.pid) is None  # gone


def test_find_old_generation_finds_the_marked_processes_only(
    marked: subprocess.Popen[bytes],
) -> None:
    found = process.find_old_generation(f"test-{os.getpid()}")
    assert [pid for pid, _created in found] == [marked.pid]
    assert process.find_old_generation(f"other-{os.getpid()}") == []


def test_signal_alive_spares_a_recycled_pid(marked: subprocess.Popen[bytes]) -> None:
    created = process.create_time(marked.pid)
    assert created is not None
    process.signal_alive([(marked.pid, created - 5.0)], signal.SIGKILL)  # another process
    assert marked.poll() is None
    process.signal_alive([(marked.pid, created)], signal.SIGKILL)
    assert marked.wait(5) == -signal.SIGKILL


def test_own_rss_is_psutils() -> None:
    assert abs(process.own_rss() - psutil.Process().memory_info().rss) < 4 * 2**20
