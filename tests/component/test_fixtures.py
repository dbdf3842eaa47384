"""The fixtures' own promises: a daemon `Home.start_daemon` forked from the test starter
(tests/prestart.py) is a detached daemon like one the CLI starts, and the leftover check and
`daemon_processes` find it although /proc shows it with the starter's environment."""

from __future__ import annotations

import os

import psutil

from tests.conftest import Home, _home_processes, engine_cmd
from tests.daemon_support import daemon_processes


def test_started_daemon_is_detached_and_found_with_its_engines(daemon: Home) -> None:
    """The daemon is in its own session and not this process's child; `daemon_processes`
    finds it alone, and the leftover check finds it and its engine."""
    daemon.register("s", engine_cmd("sleeper.py"), mode="service", restart={"start_seconds": 0})
    engine = daemon.wait_state("s#0", "ready")["pid"]
    pid = daemon.daemon_pid()
    assert pid is not None
    assert os.getsid(pid) != os.getsid(0)
    assert psutil.Process(pid).ppid() != os.getpid()
    assert [p.pid for p in daemon_processes(daemon)] == [pid]
    found = {p.pid for p in _home_processes(daemon.path, daemon.paths.daemon_id, daemon.forked)}
    assert {pid, engine} <= found
