"""Supervision with real processes: restart and backoff, fatal, stop, process trees, scale,
dependencies, logs and monitoring, observed through the CLI, the client and the event log."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any, cast

import psutil
import pytest

from engctl.errors import SpecError
from tests.conftest import Home, engine_cmd, stays, wait_until

# Every log line starts with a UTC ISO 8601 timestamp with milliseconds.
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ")
MiB = 1024 * 1024


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def fast(home: Home) -> Iterator[Home]:
    """A daemon whose monitor samples every 0.2 s."""
    yield home.start_daemon(sample_interval=0.2)


def gone(pid: int) -> bool:
    """Whether `pid` no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def events(home: Home) -> list[dict[str, Any]]:
    """Every event of the daemon so far, oldest first."""
    with home.client() as c:
        return cast("list[dict[str, Any]]", c.events(limit=10_000))


def transitions(home: Home, inst_id: str, to: str | None = None) -> list[dict[str, Any]]:
    """The `instance.state` events of one instance (optionally only those into `to`)."""
    return [
        e
        for e in events(home)
        if e["kind"] == "instance.state"
        and e["instance"] == inst_id
        and (to is None or e["to"] == to)
    ]


def log_lines(home: Home, target: str, lines: int = 200) -> list[str]:
    """The tail of an instance's log as `engctl logs` prints it."""
    r = home.cli("logs", target, "-n", str(lines))
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def service(command: list[str], **spec: Any) -> dict[str, Any]:
    """A service spec table (not dispatchable, so no ping health check)."""
    return {"command": command, "mode": "service", **spec}


# -- crash, backoff, fatal -----------------------------------------------------------------
def test_crash_restarts_with_doubling_backoff_capped_at_max(daemon: Home) -> None:
    """Crashes are restarted after delays that double from `initial` and stop at `max`."""
    daemon.register(
        "c",
        engine_cmd("crashing.py", "0", "3"),
        mode="service",
        restart={"start_seconds": 0, "backoff": {"initial": 0.1, "factor": 2, "max": 0.4}},
    )
    wait_until(lambda: len(transitions(daemon, "c#0", "backoff")) >= 4, timeout=20)
    r = daemon.cli("events", "--json", "-e", "c", "-n", "500")
    assert r.returncode == 0, r.stderr
    backoffs = [e for e in json.loads(r.stdout)["events"] if e["to"] == "backoff"]
    assert [e["data"]["delay"] for e in backoffs[:4]] == [0.1, 0.2, 0.4, 0.4]
    assert all("exit code 3" in e["reason"] for e in backoffs)
    inst = daemon.instance("c#0")
    assert inst["restarts"] >= 3
    assert inst["last_exit"]["code"] == 3
    assert inst["last_exit"]["signal"] is None
    assert daemon.cli("stop", "c").returncode == 0


def test_crash_loop_goes_fatal_after_max_retries(daemon: Home) -> None:
    """An engine that always dies before start_seconds is given up after max_retries restarts."""
    daemon.register(
        "c",
        engine_cmd("crashing.py", "0", "1"),
        mode="service",
        restart={"start_seconds": 1.0, "max_retries": 2, "backoff": {"initial": 0.05}},
    )
    inst = daemon.wait_state("c#0", "fatal", timeout=20)
    assert "gave up" in inst["state_reason"]
    assert "exit code 1" in inst["state_reason"]
    assert inst["restarts"] == 2
    assert inst["pid"] is None
    assert inst["last_exit"]["code"] == 1
    assert len(transitions(daemon, "c#0", "backoff")) == 2
    assert not transitions(daemon, "c#0", "ready")
    stays(lambda: daemon.instance("c#0")["state"] == "fatal", 0.5)


def test_crash_after_start_seconds_restarts_and_backoff_resets(daemon: Home) -> None:
    """A crash after start_seconds is no quick failure; uptime past reset_after resets backoff."""
    restart = {"start_seconds": 0.2, "max_retries": 0}
    with daemon.client() as c:
        c.register(
            {
                "reset": service(
                    engine_cmd("crashing.py", "0.6", "1"),
                    restart={**restart, "backoff": {"initial": 0.1, "reset_after": 0.3}},
                ),
                "keep": service(
                    engine_cmd("crashing.py", "0.6", "1"),
                    restart={**restart, "backoff": {"initial": 0.1, "reset_after": 60}},
                ),
            }
        )

    def delays(inst_id: str) -> list[float]:
        return [e["data"]["delay"] for e in transitions(daemon, inst_id, "backoff")]

    wait_until(lambda: len(delays("reset#0")) >= 3 and len(delays("keep#0")) >= 3, timeout=20)
    # max_retries 0: a single quick failure would have been fatal.
    assert delays("reset#0")[:3] == [0.1, 0.1, 0.1]
    assert delays("keep#0")[:3] == [0.1, 0.2, 0.4]
    for inst_id in ("reset#0", "keep#0"):
        assert len(transitions(daemon, inst_id, "ready")) >= 3
        assert not transitions(daemon, inst_id, "fatal")
        assert daemon.instance(inst_id)["restarts"] >= 2
    assert daemon.cli("stop", "reset", "keep").returncode == 0


@pytest.mark.parametrize(
    ("policy", "code", "restarted"),
    [("never", "1", False), ("on-failure", "0", False), ("always", "0", True)],
)
def test_restart_policy_decides_after_exit(
    daemon: Home, policy: str, code: str, restarted: bool
) -> None:
    """never and on-failure (after exit 0) leave the instance exited; always restarts it."""
    daemon.register(
        "p",
        engine_cmd("crashing.py", "0", code),
        mode="service",
        restart={"policy": policy, "start_seconds": 0, "backoff": {"initial": 0.05}},
    )
    if restarted:
        wait_until(lambda: daemon.instance("p#0")["restarts"] >= 2, timeout=15)
        assert transitions(daemon, "p#0", "backoff")
        assert daemon.cli("stop", "p").returncode == 0
        return
    inst = daemon.wait_state("p#0", "exited")
    assert f"restart policy {policy}" in inst["state_reason"]
    assert inst["last_exit"]["code"] == int(code)
    stays(lambda: daemon.instance("p#0")["state"] == "exited", 0.5)
    assert daemon.instance("p#0")["restarts"] == 0
    assert not transitions(daemon, "p#0", "backoff")


def test_missing_command_backs_off_then_fatal_and_daemon_stays_healthy(daemon: Home) -> None:
    """A command that does not exist goes backoff then fatal naming the error; the daemon lives."""
    daemon.register(
        "m",
        ["/nonexistent/engctl-no-such-engine"],
        mode="service",
        restart={"max_retries": 2, "backoff": {"initial": 0.05}},
    )
    inst = daemon.wait_state("m#0", "fatal")
    assert "No such file" in inst["state_reason"]
    assert "gave up" in inst["state_reason"]
    assert inst["last_exit"]["code"] is None
    assert "No such file" in inst["last_exit"]["error"]
    states = [e["to"] for e in transitions(daemon, "m#0")]
    assert states.index("backoff") < states.index("fatal")
    r = daemon.cli("daemon", "status", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["engines"] == 1
    daemon.register("ok", engine_cmd("sleeper.py"), mode="service", restart={"start_seconds": 0})
    daemon.wait_state("ok#0", "ready")
    assert daemon.cli("stop", "ok").returncode == 0


# -- stopping ------------------------------------------------------------------------------
def _register_stubborn(home: Home, timeout: float) -> int:
    """Register an engine that ignores SIGTERM and wait until its handler is installed."""
    home.register(
        "i",
        engine_cmd("ignore_sigterm.py"),
        mode="service",
        restart={"start_seconds": 0},
        stop={"timeout": timeout},
    )
    wait_until(lambda: any("ignoring SIGTERM" in ln for ln in log_lines(home, "i#0")))
    pid = home.instance("i#0")["pid"]
    assert pid
    return int(pid)


def test_stop_kills_an_engine_that_ignores_sigterm_after_the_timeout(daemon: Home) -> None:
    """`stop` waits the stop timeout, then SIGKILLs; the process is gone when it returns."""
    pid = _register_stubborn(daemon, 1.0)
    t0 = time.monotonic()
    r = daemon.cli("stop", "i")
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert gone(pid)
    # The CLI's own start-up (~0.3 s, seconds on a machine loaded by other suites) adds to
    # the wait; the bound still tells the 1 s timeout from the 10 s default.
    assert 1.0 <= elapsed <= 1.0 + 0.2 + 4.0, elapsed
    inst = daemon.instance("i#0")
    assert inst["state"] == "stopped"
    assert inst["last_exit"]["signal"] == "SIGKILL"
    evs = transitions(daemon, "i#0")
    stopping = next(e for e in evs if e["to"] == "stopping")
    stopped = next(e for e in evs if e["to"] == "stopped")
    assert 1.0 - 0.01 <= stopped["at"] - stopping["at"] <= 1.0 + 0.2
    assert any(e["kind"] == "instance.killed" for e in events(daemon))


def test_stop_no_wait_returns_at_once_in_stopping(daemon: Home) -> None:
    """`stop --no-wait` answers before the stop timeout with the instance still stopping."""
    pid = _register_stubborn(daemon, 2.0)
    t0 = time.monotonic()
    r = daemon.cli("stop", "--no-wait", "--json", "i")
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"stopped": ["i#0"], "waited": False, "dependents": []}
    assert daemon.instance("i#0")["state"] == "stopping"
    assert elapsed < 2.0
    assert not gone(pid)
    daemon.wait_state("i#0", "stopped")
    assert gone(pid)


def test_a_second_stop_while_stopping_keeps_the_kill_after_the_timeout(daemon: Home) -> None:
    """`stop` of an instance already stopping waits for that stop, whose SIGKILL still comes."""
    # Regression: the second stop cancelled the instance's timer, which was the first stop's
    # SIGKILL: a process that ignores SIGTERM then stayed `stopping` for good.
    pid = _register_stubborn(daemon, 1.0)
    assert daemon.cli("stop", "--no-wait", "i").returncode == 0
    t0 = time.monotonic()
    r = daemon.cli("stop", "i")
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert elapsed <= 1.0 + 4.0, elapsed
    assert gone(pid)
    inst = daemon.instance("i#0")
    assert inst["state"] == "stopped"
    assert inst["last_exit"]["signal"] == "SIGKILL"


def test_start_during_a_no_wait_stop_takes_effect_once_stopped(daemon: Home) -> None:
    """`start` while an instance is still stopping starts it again after the stop ends."""
    # Regression: the start used to be dropped ("nothing to do") and the instance stayed stopped.
    pid = _register_stubborn(daemon, 1.0)
    assert daemon.cli("stop", "--no-wait", "i").returncode == 0
    r = daemon.cli("start", "--json", "i")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"started": ["i#0"]}
    inst = daemon.wait_state("i#0", "ready")
    assert gone(pid)
    assert inst["pid"] != pid
    assert daemon.cli("stop", "i").returncode == 0


def test_starting_one_instance_of_a_stopped_engine_keeps_the_others_stopped(home: Home) -> None:
    """After `stop NAME` and `start NAME#0`, NAME#1 stays stopped, also after a daemon restart."""
    # Regression: the engine became wanted as a whole, so a new daemon started NAME#1 too.
    home.start_daemon()
    home.register(
        "s", engine_cmd("sleeper.py"), mode="service", instances=2, restart={"start_seconds": 0}
    )
    home.wait_state("s#1", "ready")
    assert home.cli("stop", "s").returncode == 0
    assert home.cli("start", "s#0").returncode == 0
    home.wait_state("s#0", "ready")
    assert home.instance("s#1")["state"] == "stopped"
    assert home.cli("daemon", "stop").returncode == 0
    home.start_daemon()
    home.wait_state("s#0", "ready")
    stays(lambda: home.instance("s#1")["state"] == "stopped", 0.5)


def test_manual_stop_is_not_undone_by_restart_policy_always(daemon: Home) -> None:
    """A stopped engine with policy always stays stopped; stopping it again is a no-op."""
    daemon.register(
        "s",
        engine_cmd("sleeper.py"),
        mode="service",
        restart={"policy": "always", "start_seconds": 0.2, "backoff": {"initial": 0.05}},
    )
    pid = daemon.wait_state("s#0", "ready")["pid"]
    r = daemon.cli("stop", "s")
    assert r.returncode == 0, r.stderr
    assert gone(pid)
    stays(lambda: daemon.instance("s#0")["state"] == "stopped", 1.0)
    assert daemon.instance("s#0")["restarts"] == 0
    again = daemon.cli("stop", "s")
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stdout
    assert daemon.instance("s#0")["state"] == "stopped"


def test_stop_during_backoff_cancels_the_pending_restart(daemon: Home) -> None:
    """Stopping an instance that waits in backoff cancels its restart for good."""
    daemon.register(
        "c",
        engine_cmd("crashing.py", "0", "1"),
        mode="service",
        # Long enough that the stop (a CLI start) lands in it on a loaded machine; the check
        # below outlasts it, so an uncancelled restart would be seen.
        restart={"policy": "always", "start_seconds": 0, "backoff": {"initial": 1.5}},
    )
    daemon.wait_state("c#0", "backoff")
    assert daemon.cli("stop", "c").returncode == 0
    assert daemon.instance("c#0")["state"] == "stopped"
    stays(lambda: daemon.instance("c#0")["state"] == "stopped", 2.0)
    assert daemon.instance("c#0")["restarts"] == 0


# -- process trees -------------------------------------------------------------------------
@pytest.mark.parametrize("setsid", [False, True], ids=["same-group", "setsid"])
@pytest.mark.parametrize("how", ["stop", "unregister", "daemon-stop"])
def test_grandchildren_are_gone_after(fast: Home, how: str, setsid: bool) -> None:
    """A forked grandchild (also one in its own session) dies with its engine."""
    pidfile = fast.path / "grandchild.pid"
    args = [str(pidfile), "--setsid"] if setsid else [str(pidfile)]
    fast.register(
        "g",
        engine_cmd("grandchild.py", *args),
        mode="service",
        restart={"start_seconds": 0},
        stop={"timeout": 1.0},
    )
    gpid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text()))
    pid = fast.instance("g#0")["pid"]
    # Both processes are single-threaded: 2 threads means the monitor saw the descendant.
    wait_until(lambda: (fast.instance("g#0")["threads"] or 0) >= 2)
    assert not gone(gpid)
    if how == "stop":
        r = fast.cli("stop", "g")
    elif how == "unregister":
        r = fast.cli("unregister", "g")
    else:
        daemon_pid = fast.daemon_pid()
        assert daemon_pid
        r = fast.cli("daemon", "stop")
    assert r.returncode == 0, r.stderr
    assert gone(pid)
    wait_until(lambda: gone(gpid), timeout=5)
    if how == "daemon-stop":
        assert daemon_pid is not None and gone(daemon_pid)


def test_setsid_grandchild_unseen_by_the_monitor_dies_with_its_engine(home: Home) -> None:
    """A grandchild that left the group before any sample is adopted and killed at stop."""
    slow = home.start_daemon(sample_interval=30.0)  # the monitor never samples in time
    pidfile = slow.path / "grandchild.pid"
    slow.register(
        "g",
        engine_cmd("grandchild.py", str(pidfile), "--setsid"),
        mode="service",
        restart={"start_seconds": 0},
        stop={"timeout": 1.0},
    )
    gpid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text()))
    r = slow.cli("stop", "g")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: gone(gpid), timeout=5)


# -- scale, restart of one instance --------------------------------------------------------
def test_scale_down_removes_highest_indices_and_restart_one_instance(daemon: Home) -> None:
    """Scaling removes the highest indices with their processes; `restart NAME#K` renews one."""
    daemon.register(
        "s", engine_cmd("sleeper.py"), mode="service", instances=3, restart={"start_seconds": 0}
    )
    pids = {i: daemon.wait_state(f"s#{i}", "ready")["pid"] for i in range(3)}
    r = daemon.cli("scale", "s", "1")
    assert r.returncode == 0, r.stderr
    assert [i["id"] for i in daemon.instances("s")] == ["s#0"]
    assert gone(pids[1]) and gone(pids[2])
    assert daemon.instance("s#0")["pid"] == pids[0]

    assert daemon.cli("scale", "s", "2").returncode == 0
    new1 = daemon.wait_state("s#1", "ready")["pid"]
    assert new1 not in pids.values()

    r = daemon.cli("restart", "s#1")
    assert r.returncode == 0, r.stderr
    renewed = daemon.wait_state("s#1", "ready")["pid"]
    assert renewed != new1
    assert gone(new1)
    assert daemon.instance("s#0")["pid"] == pids[0]
    assert [i["id"] for i in daemon.instances("s")] == ["s#0", "s#1"]


# -- dependencies --------------------------------------------------------------------------
def test_dependency_is_ready_before_the_dependent_starts(daemon: Home) -> None:
    """depends_on starts the dependency first and the dependent only once it is ready."""
    with daemon.client() as c:
        c.register(
            {
                "app": service(
                    engine_cmd("sleeper.py"), depends_on=["db"], restart={"start_seconds": 0}
                ),
                "db": service(engine_cmd("sleeper.py"), restart={"start_seconds": 0.5}),
            }
        )
    daemon.wait_state("app#0", "ready")

    def check_order() -> None:
        evs = events(daemon)
        db_ready = [e for e in evs if e["instance"] == "db#0" and e["to"] == "ready"][-1]
        app_start = [e for e in evs if e["instance"] == "app#0" and e["to"] == "starting"][-1]
        assert db_ready["id"] < app_start["id"]
        assert db_ready["at"] <= app_start["at"]

    check_order()
    assert daemon.instance("db#0")["state_since"] <= daemon.instance("app#0")["state_since"]
    # Starting only the dependent starts its dependency first, again.
    assert daemon.cli("stop", "app", "db").returncode == 0
    r = daemon.cli("start", "app")
    assert r.returncode == 0, r.stderr
    daemon.wait_state("app#0", "ready")
    assert daemon.instance("db#0")["state"] == "ready"
    check_order()


def test_dependency_cycle_is_rejected_with_its_path_and_registers_nothing(daemon: Home) -> None:
    """A cycle is an error naming its path; neither new nor existing engines change."""
    cmd = engine_cmd("sleeper.py")
    with daemon.client() as c:
        with pytest.raises(SpecError, match=r"dependency cycle: a -> b -> a"):
            c.register({"a": service(cmd, depends_on=["b"]), "b": service(cmd, depends_on=["a"])})
        assert c.status()["engines"] == []
        c.register({"x": service(cmd)}, start=False)
    engines_file = daemon.path / "cycle.toml"
    engines_file.write_text(
        f"[engines.x]\ncommand = {json.dumps(cmd)}\nmode = 'service'\ndepends_on = ['y']\n"
        f"[engines.y]\ncommand = {json.dumps(cmd)}\nmode = 'service'\ndepends_on = ['x']\n"
    )
    r = daemon.cli("register", "-f", str(engines_file))
    assert r.returncode != 0
    assert "x -> y -> x" in r.stderr
    listed = json.loads(daemon.cli("list", "--json").stdout)["engines"]
    assert [(e["name"], e["depends_on"]) for e in listed] == [("x", [])]


# -- logs ----------------------------------------------------------------------------------
def test_service_stdout_and_stderr_lines_are_logged_with_timestamps(daemon: Home) -> None:
    """A service's stdout and stderr both reach `engctl logs`, every line timestamped."""
    daemon.register("c", engine_cmd("chatty.py", "0.05"), mode="service")

    def enough() -> list[str] | None:
        lines = log_lines(daemon, "c#0")
        outs = [ln for ln in lines if " stdout: out " in ln]
        errs = [ln for ln in lines if " stderr: err " in ln]
        return lines if len(outs) >= 3 and len(errs) >= 3 else None

    lines = wait_until(enough)
    bad = [ln for ln in lines if not TIMESTAMP.match(ln)]
    assert not bad
    assert any(" engctl: started pid " in ln for ln in lines)


def test_worker_stdout_garbage_is_logged_as_protocol_errors(daemon: Home) -> None:
    """A worker's stderr is its log; non-protocol stdout lines are logged as protocol errors."""
    daemon.register("w", engine_cmd("chatty.py", "0.05"), mode="worker", health={"check": "none"})

    def enough() -> list[str] | None:
        lines = log_lines(daemon, "w#0")
        errs = [ln for ln in lines if re.search(r" stderr: err \d+$", ln)]
        return lines if len(errs) >= 3 else None

    lines = wait_until(enough)
    assert all(TIMESTAMP.match(ln) for ln in lines)
    outs = [ln for ln in lines if " out " in ln]
    assert outs and all(
        re.search(r" engctl: protocol error \(not JSON\): out \d+$", ln) for ln in outs
    )
    # It never answers the warm-up ping, so it is never offered requests; what it printed
    # shows in its state reason while it warms up (issue 10.10).
    inst = daemon.wait_state("w#0", "warming")
    assert inst["requests"]["protocol_errors"] >= 1
    assert inst["requests"]["errors"] == inst["requests"]["requests"] == 0
    assert re.search(
        r"\(last: protocol error on stdout \(not JSON\): out \d+\)$", inst["state_reason"]
    )


def test_log_rotation_keeps_backups(home: Home) -> None:
    """With a small log_max_bytes the instance log rotates to NAME.K.log.1."""
    home.start_daemon(log_max_bytes=4096, log_backups=2)
    home.register("c", engine_cmd("chatty.py", "0.005"), mode="service")
    rotated = home.paths.log_dir / "c.0.log.1"
    wait_until(rotated.exists, timeout=15)
    assert rotated.stat().st_size >= 4096
    lines = log_lines(home, "c#0", 50)
    assert len(lines) == 50
    assert all(TIMESTAMP.match(ln) for ln in lines)
    assert home.cli("stop", "c").returncode == 0
    assert not (home.paths.log_dir / "c.0.log.3").exists()


# -- monitoring ----------------------------------------------------------------------------
def test_monitor_samples_running_instances_and_clears_when_stopped(fast: Home) -> None:
    """RSS of a leaking engine grows between samples; figures are numbers, null once stopped."""
    fast.register("leak", engine_cmd("leaking.py", "40"), mode="service")
    first = wait_until(lambda: fast.instance("leak#0")["rss_bytes"])
    wait_until(lambda: fast.instance("leak#0")["rss_bytes"] > first + 8 * MiB)
    inst = fast.instance("leak#0")
    assert isinstance(inst["cpu_percent"], float)
    assert isinstance(inst["threads"], int) and inst["threads"] >= 1
    assert isinstance(inst["fds"], int) and inst["fds"] >= 3
    assert isinstance(inst["uptime_s"], float)
    assert fast.cli("stop", "leak").returncode == 0
    inst = fast.instance("leak#0")
    for key in ("pid", "cpu_percent", "rss_bytes", "threads", "fds", "uptime_s"):
        assert inst[key] is None, key
