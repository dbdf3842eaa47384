"""Health checks and failure policies with real misbehaving engines (docs/policies.md): crash
loops, unresponsive, hung, leaking, slow and failing workers, the guard rail, manual overrides, and
command/tcp/http checks; observed through `status`, the event log and dispatch itself."""

from __future__ import annotations

import http.server
import shlex
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import psutil
import pytest

from engctl.errors import NoEligibleEngineError, RequestTimeoutError
from tests.conftest import Home, engine_cmd, wait_until

MiB = 1024 * 1024
# Workers say `ready` at once; they count as started after 0.1 s.
QUICK: dict[str, Any] = {"restart": {"start_seconds": 0.1, "backoff": {"initial": 0.05}}}


# -- helpers -------------------------------------------------------------------------------
@pytest.fixture
def fast(home: Home) -> Iterator[Home]:
    """A daemon that evaluates policies and samples processes every 0.2 s."""
    yield home.start_daemon(policy_interval=0.2, sample_interval=0.2)


@pytest.fixture
def flags(home: Home) -> Path:
    """A folder for the flag files that switch the behaviour of deaf.py and moody.py."""
    path = home.path / "flags"
    path.mkdir()
    return path


def workers(home: Home, **engines: dict[str, Any]) -> None:
    """Register worker engines `{name: spec}` (QUICK start-up) and wait until all are ready."""
    with home.client() as c:
        c.register({name: {**QUICK, **spec} for name, spec in engines.items()})
    for name, spec in engines.items():
        for k in range(spec.get("instances", 1)):
            home.wait_state(f"{name}#{k}", "ready")


def events(
    home: Home, kind: str | None = None, instance: str | None = None
) -> list[dict[str, Any]]:
    """The daemon's events so far, oldest first, optionally of one kind and one instance."""
    with home.client() as c:
        evs = cast("list[dict[str, Any]]", c.events(limit=10_000))
    return [
        e
        for e in evs
        if (kind is None or e["kind"] == kind) and (instance is None or e["instance"] == instance)
    ]


def states(home: Home, inst_id: str, to: str | None = None) -> list[dict[str, Any]]:
    """The `instance.state` events of one instance (optionally only those into `to`)."""
    return [e for e in events(home, "instance.state", inst_id) if to is None or e["to"] == to]


def health_path(home: Home, inst_id: str) -> list[str]:
    """The health an instance moved through, as `from->to` steps of its events."""
    return [
        f"{e['data']['from_health']}->{e['data']['to_health']}"
        for e in events(home, "instance.health", inst_id)
    ]


def call(home: Home, method: str, **params: Any) -> Any:
    with home.client() as c:
        return c.call(method, **params)


def run(home: Home, n: int, window: int = 3, **filters: Any) -> list[dict[str, Any]]:
    """Send `n` requests with up to `window` in flight; their result objects in order."""
    with home.client() as c:
        return cast("list[dict[str, Any]]", list(c.exec_many(range(n), window=window, **filters)))


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def service(command: list[str], **spec: Any) -> dict[str, Any]:
    return {"command": command, "mode": "service", **spec}


# -- crash: backoff, reset, fatal, flapping, cool-down -------------------------------------
def test_crash_backoff_doubles_up_to_max_and_resets_after_healthy_uptime(fast: Home) -> None:
    """Delays double from `initial` and stop at `max`; uptime past `reset_after` resets them."""
    with fast.client() as c:
        c.register(
            {
                "cap": service(
                    engine_cmd("crashing.py", "0", "3"),
                    restart={
                        "start_seconds": 0,
                        "backoff": {"initial": 0.1, "factor": 2, "max": 0.4},
                    },
                ),
                "reset": service(
                    engine_cmd("crashing.py", "0.5", "1"),
                    restart={
                        "start_seconds": 0.1,
                        "max_retries": 0,
                        "backoff": {"initial": 0.1, "reset_after": 0.3},
                    },
                ),
            }
        )

    def delays(inst_id: str) -> list[float]:
        return [e["data"]["delay"] for e in states(fast, inst_id, "backoff")]

    wait_until(lambda: len(delays("cap#0")) >= 5 and len(delays("reset#0")) >= 3, timeout=15)
    assert delays("cap#0")[:5] == [0.1, 0.2, 0.4, 0.4, 0.4]
    assert delays("reset#0")[:3] == [0.1, 0.1, 0.1]
    backoffs = states(fast, "cap#0", "backoff")
    assert "exit code 3; restart in 0.4s (attempt 3)" in backoffs[2]["reason"]
    # The delay is really waited: restart k starts `delay` after the exit.
    starts = states(fast, "cap#0", "starting")[1:]
    for b, s in zip(backoffs[:4], starts, strict=False):
        assert s["at"] - b["at"] >= b["data"]["delay"] - 0.01
    assert not states(fast, "reset#0", "fatal")  # max_retries 0, yet no quick failure
    assert fast.cli("stop", "cap", "reset").returncode == 0


def test_quick_failures_and_flapping_end_fatal_with_the_reason(fast: Home) -> None:
    """max_retries failed starts in a row → fatal; too many restarts in flap_window → fatal."""
    with fast.client() as c:
        c.register(
            {
                "quick": service(
                    engine_cmd("crashing.py", "0", "1"),
                    restart={"start_seconds": 1.0, "max_retries": 2, "backoff": {"initial": 0.05}},
                ),
                "flap": service(
                    engine_cmd("crashing.py", "0.15", "1"),
                    restart={
                        "start_seconds": 0.1,
                        "max_retries": 0,
                        "backoff": {"initial": 0.05, "factor": 1},
                    },
                    policy={"crash": {"flap_window": 30, "flap_max_restarts": 3}},
                ),
            }
        )
    quick = fast.wait_state("quick#0", "fatal")
    assert quick["state_reason"] == "gave up after 3 failed starts (max_retries 2): exit code 1"
    assert quick["restarts"] == 2
    assert len(states(fast, "quick#0", "backoff")) == 2
    flap = fast.wait_state("flap#0", "fatal")
    assert flap["state_reason"] == (
        "flapping: 3 restarts in the last 30s (flap_max_restarts 3): exit code 1"
    )
    assert flap["restarts"] == 3
    # Every start of `flap` lasted past start_seconds: none of them was a failed start.
    assert len(states(fast, "flap#0", "ready")) == 4
    fatal = states(fast, "flap#0", "fatal")[-1]
    assert fatal["data"]["restarts_in_window"] == 3
    time.sleep(0.3)  # no cool-down configured: fatal stays fatal
    assert fast.instance("flap#0")["state"] == "fatal"
    assert fast.instance("quick#0")["state"] == "fatal"


def test_cooldown_brings_a_fatal_instance_back(fast: Home) -> None:
    """With crash.cooldown, a fatal instance is started again after the cool-down."""
    fast.register(
        "cool",
        engine_cmd("crashing.py", "0", "1"),
        mode="service",
        restart={"start_seconds": 1.0, "max_retries": 0, "backoff": {"initial": 0.05}},
        policy={"crash": {"cooldown": 0.5}},
    )
    wait_until(lambda: len(states(fast, "cool#0", "fatal")) >= 2, timeout=10)
    evs = states(fast, "cool#0")
    fatal = next(i for i, e in enumerate(evs) if e["to"] == "fatal")
    retry = evs[fatal + 1]
    assert retry["to"] == "starting"
    assert retry["reason"] == "retry after the 0.5s cool-down"
    assert retry["at"] - evs[fatal]["at"] >= 0.5 - 0.01
    assert "gave up after 1 failed starts (max_retries 0)" in evs[fatal]["reason"]
    assert fast.cli("stop", "cool").returncode == 0
    assert fast.instance("cool#0")["state"] == "stopped"


# -- unresponsive: failed probes -----------------------------------------------------------
def test_worker_that_stops_answering_pings_is_isolated_then_readmitted(
    fast: Home, flags: Path
) -> None:
    """Health moves unknown → healthy → unhealthy → recovering → healthy by the thresholds;
    an unhealthy instance gets no requests and is re-admitted once healthy."""
    health = {"interval": 0.2, "timeout": 0.5, "failure_threshold": 2, "success_threshold": 2}
    workers(
        fast,
        d={
            "command": engine_cmd("deaf.py", str(flags)),
            "type": "D",
            "instances": 2,
            "health": health,
            "policy": {"failing": {"slow_start": 0.3}},
        },
    )
    wait_until(lambda: all(fast.instance(i)["health"] == "healthy" for i in ("d#0", "d#1")))
    (flags / "d#1.deaf").touch()
    inst = wait_until(
        lambda: (i := fast.instance("d#1"))["eligibility"] == "isolated" and i, timeout=10
    )
    assert inst["health"] == "unhealthy"
    assert inst["state"] == "ready"  # alive and not restarted: only out of dispatch
    assert inst["health_reason"] == (
        "2 failed probe(s) (failure_threshold 2); last: no answer to ping within 0.5s"
    )
    assert "unhealthy" in inst["eligibility_reason"]
    assert health_path(fast, "d#1") == ["unknown->healthy", "healthy->unhealthy"]
    [isolated] = events(fast, "instance.isolated", "d#1")
    assert isolated["reason"].startswith("isolated until healthy: 2 failed probe(s)")
    out = run(fast, 10, type="D")
    assert all(o["ok"] for o in out)
    assert {o["instance"] for o in out} == {"d#0"}

    (flags / "d#1.deaf").unlink()
    wait_until(lambda: fast.instance("d#1")["eligibility"] == "active", timeout=10)
    assert fast.instance("d#1")["health"] == "healthy"
    assert health_path(fast, "d#1") == [
        "unknown->healthy",
        "healthy->unhealthy",
        "unhealthy->recovering",
        "recovering->healthy",
    ]
    recovering, healthy = events(fast, "instance.health", "d#1")[2:]
    assert recovering["reason"].endswith("1 passing probe(s) (success_threshold 2)")
    assert healthy["reason"].endswith("2 passing probe(s) (success_threshold 2)")
    assert events(fast, "instance.returned", "d#1")
    assert health_path(fast, "d#0") == ["unknown->healthy"]
    out = run(fast, 10, window=2, type="D")
    assert all(o["ok"] for o in out)
    assert "d#1" in {o["instance"] for o in out}


# -- hang ----------------------------------------------------------------------------------
def test_hung_worker_is_killed_and_restarted(fast: Home) -> None:
    """A request unanswered for the engine's hang_timeout on a worker that does not answer
    ping either: the hang policy kills the process group; the instance restarts and serves
    the next requests."""
    pidfile = fast.path / "child.pid"
    workers(
        fast,
        h={
            "command": engine_cmd("stuck.py", str(pidfile)),
            "type": "H",
            "hang_timeout": 1.0,
            "policy": {"hang": {"ping_timeout": 0.3}},
        },
    )
    pid = fast.instance("h#0")["pid"]
    child = int(wait_until(lambda: pidfile.exists() and pidfile.read_text()))
    pidfile.unlink()
    with fast.client() as c, pytest.raises(RequestTimeoutError, match=r"after 0\.5s on h#0"):
        c.exec("hang", type="H", timeout=0.5)
    [hung] = wait_until(lambda: events(fast, "instance.hung", "h#0"), timeout=5)
    assert hung["reason"].startswith("hang: request ")
    assert "(hang_timeout 1s) and no answer to ping within 0.3s" in hung["reason"]
    assert hung["data"]["unanswered_seconds"] >= 1.0
    wait_until(lambda: gone(pid) and gone(child), timeout=5)  # the whole process group
    inst = wait_until(lambda: (i := fast.instance("h#0"))["last_exit"] and i)
    assert inst["last_exit"]["signal"] == "SIGKILL"
    assert inst["last_exit"]["cause"] == "hang"
    [backoff] = wait_until(lambda: states(fast, "h#0", "backoff"))
    assert backoff["reason"].startswith("killed by SIGKILL (hang); restart in")
    with fast.client() as c:
        for value in ("next", "and next"):
            obj = c.exec(value, type="H", timeout=5)
            assert obj["result"]["echo"] == value
            assert obj["result"]["pid"] not in (pid, None)
    assert fast.instance("h#0")["restarts"] == 1


def test_caller_timeout_does_not_get_a_busy_sync_worker_killed(fast: Home) -> None:
    """Issue 10.6: a 1.5 s request sent with a 0.3 s timeout to a synchronous worker (which
    cannot answer ping while busy) times out for its caller, but the worker is not judged:
    its slot stays busy until the late answer (discarded), nothing more is sent to it
    meanwhile, and the same process serves the next request."""
    workers(
        fast,
        sync={
            "command": engine_cmd("sync_slow.py"),
            "type": "S",
            "policy": {"hang": {"ping_timeout": 0.2}},
        },
    )
    pid = fast.instance("sync#0")["pid"]
    with fast.client() as c, pytest.raises(RequestTimeoutError, match=r"after 0\.3s on sync#0"):
        c.exec({"sleep": 1.5}, type="S", timeout=0.3)
    assert fast.instance("sync#0")["requests"]["in_flight"] == 1  # the slot stays held
    with fast.client() as c, pytest.raises(RequestTimeoutError, match="waiting in the queue"):
        c.exec({"sleep": 0}, type="S", timeout=0.3)  # not sent to the busy slot
    wait_until(lambda: fast.instance("sync#0")["requests"]["in_flight"] == 0, timeout=5)
    with fast.client() as c:
        obj = c.exec({"sleep": 0}, type="S", timeout=5)
    assert obj["result"]["pid"] == pid
    inst = fast.instance("sync#0")
    assert inst["pid"] == pid and inst["restarts"] == 0
    assert inst["requests"]["timeouts"] == 1 and inst["requests"]["ok"] == 1
    assert inst["requests"]["consecutive_errors"] == 0
    assert not events(fast, "instance.hung", "sync#0")


def test_health_ping_does_not_isolate_a_sync_worker_busy_with_one_long_request(
    fast: Home,
) -> None:
    """A synchronous worker reads no ping while it runs a request: pings that time out then
    are no evidence (the hang policy judges a request past hang_timeout), so a 2 s request
    under a 0.2 s health check leaves it healthy and in service."""
    workers(
        fast,
        sync={
            "command": engine_cmd("sync_slow.py"),
            "type": "S",
            "health": {"interval": 0.2, "timeout": 0.1, "failure_threshold": 2},
        },
    )
    pid = fast.instance("sync#0")["pid"]
    with fast.client() as c:
        assert c.exec({"sleep": 2.0}, type="S", timeout=10)["result"]["pid"] == pid
    inst = fast.instance("sync#0")
    assert inst["eligibility"] == "active" and inst["health"] != "unhealthy", inst
    assert not events(fast, "instance.isolated", "sync#0")
    assert all(e["data"]["to_health"] != "unhealthy" for e in events(fast, "instance.health"))


# -- memory --------------------------------------------------------------------------------
def test_memory_over_max_rss_or_leaking_is_drained_and_restarted(fast: Home) -> None:
    """RSS above max_rss (checked before it reaches 2× max_rss), or a steady climb over the
    leak window without any max_rss: drain, then a graceful restart."""
    workers(
        fast,
        big={"command": engine_cmd("bloat.py", "10"), "type": "M", "limits": {"max_rss": "40MiB"}},
        leak={
            "command": engine_cmd("bloat.py", "10"),
            "type": "L",
            "policy": {"memory": {"leak_window": 1.5, "leak_rate": "4MiB"}},
        },
    )
    pids = {name: fast.instance(f"{name}#0")["pid"] for name in ("big", "leak")}
    wait_until(
        lambda: {e["instance"] for e in events(fast, "instance.draining")} == {"big#0", "leak#0"},
        timeout=15,
    )

    [over] = events(fast, "instance.draining", "big#0")[:1]
    assert over["data"]["max_rss"] == 40 * MiB
    assert over["data"]["cause"] == "memory"  # what `report` reads (issue 11), not the reason
    assert 40 * MiB < over["data"]["rss_bytes"] < 2 * 40 * MiB
    assert "above max_rss 40.0 MiB: draining, then a graceful restart" in over["reason"]
    [leak] = events(fast, "instance.draining", "leak#0")[:1]
    assert leak["reason"].startswith("memory leak: RSS grew ")
    assert "leak_rate 4.0 MiB/s" in leak["reason"]
    assert leak["data"]["rate_bytes_s"] >= 4 * MiB
    assert leak["data"]["cause"] == "memory_leak"
    assert leak["data"]["rss_bytes"] < 80 * MiB

    wait_until(lambda: all(fast.instance(f"{n}#0")["restarts"] >= 1 for n in pids), timeout=10)
    for name in ("big", "leak"):
        inst_id = f"{name}#0"
        stopping = states(fast, inst_id, "stopping")[0]
        assert stopping["reason"].startswith("restart: memory")
        restarted = states(fast, inst_id, "starting")[1]
        assert restarted["reason"].startswith("restarted: memory")
        assert gone(pids[name])
        # A graceful restart: the stop signal, not a kill, and the instance serves again.
        assert fast.instance(inst_id)["last_exit"]["signal"] == "SIGTERM"
        with fast.client() as c:
            obj = c.exec("after", engine=name, timeout=10)
        assert obj["result"]["pid"] != pids[name]
    assert fast.cli("stop", "big", "leak").returncode == 0


def test_cpu_above_the_limit_for_the_window_is_an_alert_or_a_restart(fast: Home) -> None:
    """CPU above max_cpu_percent for cpu.window: the built-in `cpu` alert fires (issue 15:
    no more `instance.cpu` special case), or (action restart) a restart."""
    spin = [sys.executable, "-c", "while True: pass"]
    limits = {"max_cpu_percent": 5}  # a spinning process stays above it even on a busy host
    with fast.client() as c:
        c.register(
            {
                "warn": service(spin, limits=limits, policy={"cpu": {"window": 0.6}}),
                "cycle": service(
                    spin, limits=limits, policy={"cpu": {"window": 0.6, "action": "restart"}}
                ),
            }
        )
    warned = wait_until(lambda: events(fast, "alert.firing", "warn#0"), timeout=10)[0]
    assert warned["data"]["name"] == "cpu" and warned["data"]["builtin"] is True
    assert warned["data"]["threshold"] == 5 and warned["data"]["value"] > 5
    assert warned["data"]["for_s"] == 0.6
    assert "cpu_percent > max_cpu_percent" in warned["reason"]
    pending = events(fast, "alert.pending", "warn#0")
    assert pending and pending[0]["id"] < warned["id"]  # pending for the window first
    drained = wait_until(lambda: events(fast, "instance.draining", "cycle#0"), timeout=10)[0]
    assert drained["reason"].startswith("cpu: above max_cpu_percent 5% for ")
    wait_until(lambda: fast.instance("cycle#0")["restarts"] >= 1, timeout=10)
    assert fast.instance("warn#0")["restarts"] == 0  # an alert only
    assert not events(fast, "alert.firing", "cycle#0")  # restarted, not alerted
    assert fast.cli("stop", "warn", "cycle").returncode == 0


# -- slow: latency against peers -----------------------------------------------------------
def test_slow_worker_is_downweighted_then_restored_step_by_step(fast: Home, flags: Path) -> None:
    """One of three instances 10× slower than its peers gets a lower effective weight (and
    less traffic) under load; when it is fast again its weight comes back in steps."""
    (flags / "s#2.slow").touch()
    workers(
        fast,
        s={
            "command": engine_cmd("moody.py", str(flags), "0.01"),
            "type": "S",
            "instances": 3,
            "health": {"interval": 0.3},
            "policy": {
                "slow": {
                    "min_requests": 5,
                    "threshold": 3,
                    "downweight": 0.5,
                    "floor": 0.1,
                    "restore_interval": 0.3,
                }
            },
        },
    )
    load: dict[str, Any] = {"type": "S", "strategy": "weighted_round_robin"}

    def downweighted_to(limit: float) -> dict[str, Any] | None:
        out = run(fast, 30, **load)
        assert all(o["ok"] for o in out)
        inst = fast.instance("s#2")
        return inst if inst["effective_weight"] <= limit else None

    inst = wait_until(lambda: downweighted_to(0.25), timeout=20)
    assert inst["eligibility"] == "downweighted"
    assert inst["health"] == "degraded"
    assert inst["eligibility_reason"].startswith("slow (× ")
    first = events(fast, "instance.downweighted", "s#2")[0]
    assert first["reason"].startswith("slow: latency EWMA ")
    assert "its peers' median" in first["reason"]
    assert first["reason"].endswith("(threshold 3×): weight × 0.50")
    assert first["data"] == {"from": 1.0, "to": 0.5}
    for peer in ("s#0", "s#1"):
        assert fast.instance(peer)["eligibility"] == "active"
        assert fast.instance(peer)["effective_weight"] == 1.0
    out = run(fast, 40, **load)
    share = sum(o["instance"] == "s#2" for o in out) / len(out)
    assert share <= 0.2, share  # an equal share would be a third

    (flags / "s#2.slow").unlink()

    def restored() -> bool:
        run(fast, 15, **load)
        return bool(fast.instance("s#2")["eligibility"] == "active")

    wait_until(restored, timeout=20)
    inst = fast.instance("s#2")
    assert inst["effective_weight"] == 1.0
    assert inst["health"] == "healthy"
    steps = [e["data"] for e in events(fast, "instance.weight_restored", "s#2")]
    assert len(steps) >= 2  # step by step, not at once
    assert all(s["to"] > s["from"] for s in steps)
    assert steps[-1]["to"] == 1.0
    changes = events(fast, "instance.eligibility", "s#2")
    assert changes[-1]["reason"] == "downweighted -> active: full weight"


# -- failing: error rate, consecutive errors, isolation, slow start --------------------------
def test_failing_worker_is_isolated_and_returns_with_slow_start(fast: Home) -> None:
    """A worker failing every 2nd request is isolated for isolation_base by its error rate,
    gets nothing meanwhile, comes back after a passing probe with slow start; with retries 2
    every request succeeds on its peers."""
    workers(
        fast,
        flaky={
            "command": engine_cmd("flaky.py"),
            "type": "F",
            "policy": {
                "failing": {
                    "error_rate": 0.5,
                    "min_requests": 6,
                    "window": 10,
                    "isolation_base": 1.5,
                    "isolation_max": 10,
                    # Long enough that a loaded machine still sees it downweighted.
                    "slow_start": 3,
                },
                # Its failures are slower than its answers (the first imports traceback:
                # ~6 ms): on a loaded machine the latency policy may downweight it too, and
                # this test is about the failing policy's reason alone.
                "slow": {"enabled": False},
            },
        },
        ok={"command": engine_cmd("echo.py"), "type": "F", "instances": 2},
    )
    results: list[dict[str, Any]] = []

    def isolated() -> bool:
        results.extend(run(fast, 20, type="F", retries=2))
        return bool(fast.instance("flaky#0")["eligibility"] == "isolated")

    wait_until(isolated, timeout=15)
    assert all(o["ok"] for o in results)
    assert any(o["attempts"] == 2 for o in results)  # failures on flaky#0 were retried
    inst = fast.instance("flaky#0")
    assert inst["isolations"] == 1
    assert inst["isolated_until"] > time.time()
    assert inst["eligibility_reason"].startswith("error rate 50% over ")
    [ev] = events(fast, "instance.isolated", "flaky#0")
    assert ev["reason"].startswith("isolated for 1.5s: error rate 50% over ")
    assert ev["reason"].endswith("in 10s (at or above 50%, min_requests 6)")
    assert ev["data"]["seconds"] == 1.5 and ev["data"]["error_rate"] == 0.5
    served = inst["requests"]["requests"]
    out = run(fast, 10, type="F")
    if fast.instance("flaky#0")["eligibility"] == "isolated":
        assert all(o["ok"] and o["instance"] != "flaky#0" for o in out)
        assert fast.instance("flaky#0")["requests"]["requests"] == served

    inst = wait_until(
        lambda: (i := fast.instance("flaky#0"))["eligibility"] != "isolated" and i, timeout=5
    )
    assert inst["eligibility"] == "downweighted"
    assert inst["eligibility_reason"].startswith("slow start after isolation (")
    assert 0 < inst["effective_weight"] < 1.0
    assert inst["isolated_until"] is None
    [back] = events(fast, "instance.returned", "flaky#0")
    assert back["reason"] == "back in service: answered ping; slow start over 3s"
    wait_until(lambda: fast.instance("flaky#0")["eligibility"] == "active", timeout=5)
    ramp_end = events(fast, "instance.eligibility", "flaky#0")[-1]
    assert ramp_end["reason"] == "downweighted -> active: full weight"
    assert ramp_end["at"] - back["at"] >= 1.5 - 0.05


def test_a_retry_that_times_out_in_the_queue_is_not_blamed_again(fast: Home, flags: Path) -> None:
    """A request that failed on one instance and timed out waiting for a busy peer: the
    failed instance is charged one error, not a timeout too (the failing policy counts both)."""
    # Regression: the timeout was charged to the instance of the failed attempt ("timed out
    # on bad#0", consecutive errors 2) and the dead request kept its max_queue slot.
    (flags / "bad#0.fail").touch()
    workers(
        fast,
        bad={
            "command": engine_cmd("moody.py", str(flags), "0"),
            "type": "R",
            "capabilities": ["first"],
        },
        good={"command": engine_cmd("slow.py", "0"), "type": "R"},
    )
    busy: list[dict[str, Any]] = []

    def occupy() -> None:
        with fast.client() as c:
            busy.append(cast("dict[str, Any]", c.exec({"delay": 1.0}, engine="good", timeout=10)))

    thread = threading.Thread(target=occupy)
    thread.start()
    try:
        wait_until(lambda: fast.instance("good#0")["requests"]["in_flight"] == 1)
        with fast.client() as c, pytest.raises(RequestTimeoutError) as info:
            c.exec(1, type="R", strategy="capability", prefer=["first"], retries=1, timeout=0.4)
    finally:
        thread.join(15)
    assert "waiting in the queue for a retry (last error: bad#0: " in info.value.message
    assert info.value.data["attempts"] == 1
    stats = fast.instance("bad#0")["requests"]
    assert (stats["errors"], stats["timeouts"], stats["consecutive_errors"]) == (1, 0, 1)
    assert busy and busy[0]["ok"]
    assert fast.instance("good#0")["requests"]["timeouts"] == 0


def test_guard_rail_keeps_half_of_the_type_in_service(fast: Home, flags: Path) -> None:
    """Three of four instances fail every request: only two (50 %) are isolated, the guard
    rail says so in an event, and requests still succeed with retries."""
    for k in (1, 2, 3):
        (flags / f"g#{k}.fail").touch()
    workers(
        fast,
        g={
            "command": engine_cmd("moody.py", str(flags), "0"),
            "type": "G",
            "instances": 4,
            "policy": {
                "max_isolated_percent": 50,
                "failing": {"consecutive_errors": 2, "min_requests": 1000, "isolation_base": 30},
            },
        },
    )
    results: list[dict[str, Any]] = []

    def guarded() -> list[dict[str, Any]]:
        results.extend(run(fast, 20, window=1, type="G", retries=3))
        return events(fast, "policy.guard_rail")

    guards = wait_until(guarded, timeout=15)
    assert all(o["ok"] and o["instance"] == "g#0" for o in results)
    insts = {i["id"]: i for i in fast.instances("g")}
    out = sorted(i for i, v in insts.items() if v["eligibility"] == "isolated")
    assert len(out) == 2 and "g#0" not in out
    [kept] = {"g#1", "g#2", "g#3"} - set(out)
    assert insts[kept]["eligibility"] == "active"
    assert insts["g#0"]["eligibility"] == "active"
    for inst_id in out:
        [ev] = events(fast, "instance.isolated", inst_id)
        assert ev["reason"].startswith("isolated for 30s: 2 consecutive errors (last: ")
        assert "g#" in ev["reason"] and "failing on purpose" in ev["reason"]
    assert {g["instance"] for g in guards} == {kept}
    assert guards[0]["reason"].startswith(f"guard rail kept {kept} in service (")
    assert guards[0]["reason"].endswith(
        "2 of 4 instances of type 'G' are already out (max_isolated_percent 50% allows 2)"
    )
    assert guards[0]["data"] == {"isolated": 2, "serving": 4}
    out2 = run(fast, 20, window=2, type="G", retries=3)
    assert all(o["ok"] for o in out2)
    assert len([i for i in fast.instances("g") if i["eligibility"] == "isolated"]) == 2
    # The effective policy says where each value came from.
    [shown] = call(fast, "policy.show", names=["g"])["engines"]
    assert shown["policy"]["max_isolated_percent"] == 50
    assert shown["sources"]["top"]["max_isolated_percent"] == "engine"
    assert shown["policy"]["failing"]["consecutive_errors"] == 2
    assert shown["sources"]["failing"]["consecutive_errors"] == "engine"
    assert shown["sources"]["failing"]["error_rate"] == "default"


def test_guard_rail_event_once_per_decision_and_untyped_engines_grouped_by_engine(
    fast: Home, flags: Path
) -> None:
    """Two engines left at the default type are two guard-rail groups, not one `generic`
    group: with both of a's instances failing, one is isolated and the other kept (50 % of
    2); the guard rail says so once, not once per failed request (issue 10.26: 14 events in
    under a second)."""
    for k in (0, 1):
        (flags / f"a#{k}.fail").touch()
    spec = {
        "command": engine_cmd("moody.py", str(flags), "0"),
        "instances": 2,
        "policy": {
            "max_isolated_percent": 50,
            "failing": {"consecutive_errors": 2, "min_requests": 1000, "isolation_base": 60},
        },
    }
    workers(fast, a=spec, b=spec)

    def guarded() -> list[dict[str, Any]]:
        run(fast, 10, window=1, engine="a")
        return events(fast, "policy.guard_rail")

    [guard] = wait_until(guarded, timeout=15)
    kept = guard["instance"]
    out = [i["id"] for i in fast.instances("a") if i["eligibility"] == "isolated"]
    assert len(out) == 1 and kept not in out
    assert guard["reason"].endswith(
        "1 of 2 instances of engine 'a' are already out (max_isolated_percent 50% allows 1)"
    )
    results = run(fast, 20, window=2, instance=kept)  # every one fails on the kept instance
    assert not any(r["ok"] for r in results)
    assert len(events(fast, "policy.guard_rail")) == 1
    assert fast.instance(kept)["eligibility"] == "active"
    assert all(i["eligibility"] == "active" for i in fast.instances("b"))


def test_guard_rail_holds_for_unhealthy_instances_and_swaps_when_one_recovers(
    fast: Home, flags: Path
) -> None:
    """Three of four instances stop answering pings: two are isolated, the third is kept in
    service (an event says why); when an isolated one recovers, the kept one goes out."""
    for k in (1, 2, 3):
        (flags / f"u#{k}.deaf").touch()
    health = {"interval": 0.2, "timeout": 0.5, "failure_threshold": 2, "success_threshold": 2}
    workers(
        fast,
        u={
            "command": engine_cmd("deaf.py", str(flags)),
            "type": "U",
            "instances": 4,
            "health": health,
            "policy": {"max_isolated_percent": 50, "failing": {"slow_start": 0.3}},
        },
    )

    def unhealthy() -> list[str]:
        return sorted(i["id"] for i in fast.instances("u") if i["health"] == "unhealthy")

    wait_until(lambda: unhealthy() == ["u#1", "u#2", "u#3"], timeout=10)
    [guard] = wait_until(lambda: events(fast, "policy.guard_rail"), timeout=5)
    kept = guard["instance"]
    out = sorted(i["id"] for i in fast.instances("u") if i["eligibility"] == "isolated")
    assert len(out) == 2 and kept not in out and "u#0" not in out
    assert fast.instance(kept)["eligibility"] == "active"
    assert guard["reason"].startswith(f"guard rail kept {kept} in service (unhealthy: ")
    assert guard["reason"].endswith(
        "2 of 4 instances of type 'U' are already out (max_isolated_percent 50% allows 2)"
    )
    results = run(fast, 12, window=2, type="U")
    assert all(o["ok"] for o in results)  # deaf to pings, not to requests
    assert {o["instance"] for o in results} <= {"u#0", kept}

    (flags / f"{out[0]}.deaf").unlink()
    wait_until(lambda: fast.instance(kept)["eligibility"] == "isolated", timeout=10)
    assert fast.instance(out[0])["health"] == "healthy"
    assert fast.instance(out[0])["eligibility"] in ("active", "downweighted")
    assert sum(i["eligibility"] == "isolated" for i in fast.instances("u")) == 2


# -- manual overrides ----------------------------------------------------------------------
def test_manual_isolate_survives_a_daemon_restart_until_restored(fast: Home) -> None:
    """`isolate` with a reason keeps an instance out of dispatch, also in a new daemon;
    `restore` brings it back."""
    workers(fast, e={"command": engine_cmd("echo.py"), "type": "E", "instances": 2})
    res = call(fast, "instance.isolate", targets=["e#1"], reason="investigating")
    [inst] = res["instances"]
    assert (inst["id"], inst["eligibility"]) == ("e#1", "isolated")
    assert inst["eligibility_reason"] == "by hand: investigating"
    assert {o["instance"] for o in run(fast, 8, window=2, type="E")} == {"e#0"}
    [ev] = events(fast, "instance.isolated", "e#1")
    assert ev["reason"] == "isolated by hand: investigating"

    r = fast.cli("daemon", "stop")
    assert r.returncode == 0, r.stderr
    fast.start_daemon()
    for k in (0, 1):
        fast.wait_state(f"e#{k}", "ready")
    inst = fast.instance("e#1")
    assert inst["eligibility"] == "isolated"
    assert inst["eligibility_reason"] == "by hand: investigating"
    assert {o["instance"] for o in run(fast, 8, window=2, type="E")} == {"e#0"}

    res = call(fast, "instance.restore", targets=["e#1"], reason="fixed")
    assert res["instances"][0]["eligibility"] == "active"
    assert events(fast, "instance.restored", "e#1")[-1]["reason"] == "restored by hand: fixed"
    assert "e#1" in {o["instance"] for o in run(fast, 8, window=2, type="E")}
    r = fast.cli("daemon", "stop")
    assert r.returncode == 0, r.stderr
    fast.start_daemon()
    fast.wait_state("e#1", "ready")
    assert fast.instance("e#1")["eligibility"] == "active"


def test_drain_finishes_in_flight_requests_and_takes_no_new_ones(fast: Home) -> None:
    """A drained instance completes what it is running, gets nothing new (not even when
    named), and takes requests again once restored."""
    workers(
        fast,
        t={
            "command": engine_cmd("slow.py", "0"),
            "type": "T",
            "instances": 2,
            "max_concurrency": 2,
        },
    )
    long: list[dict[str, Any]] = []

    def run_long() -> None:
        with fast.client() as c:
            long.append(cast("dict[str, Any]", c.exec({"delay": 1.0}, instance="t#1", timeout=10)))

    thread = threading.Thread(target=run_long)
    thread.start()
    try:
        wait_until(lambda: fast.instance("t#1")["requests"]["in_flight"] == 1)
        res = call(fast, "instance.drain", targets=["t#1"], reason="maintenance")
        assert res["instances"][0]["eligibility"] == "draining"
        out = run(fast, 10, window=3, type="T")
        assert {o["instance"] for o in out} == {"t#0"}
        with fast.client() as c, pytest.raises(NoEligibleEngineError, match="draining"):
            c.exec(1, instance="t#1", timeout=2)
    finally:
        thread.join(15)
    assert long and long[0]["ok"] and long[0]["instance"] == "t#1"
    inst = fast.instance("t#1")
    assert inst["eligibility"] == "draining"  # still out: a person undoes it
    assert inst["eligibility_reason"] == "by hand: maintenance"
    assert inst["state"] == "ready"  # drained, not stopped
    assert {o["instance"] for o in run(fast, 10, window=3, type="T")} == {"t#0"}
    assert events(fast, "instance.drain", "t#1")[0]["reason"] == "draining by hand: maintenance"
    call(fast, "instance.restore", targets=["t#1"])
    assert "t#1" in {o["instance"] for o in run(fast, 10, window=3, type="T")}


# -- other health checks -------------------------------------------------------------------
class _Http(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/ok" else 500)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def http_port() -> Iterator[int]:
    """A tiny local HTTP server: /ok answers 200, anything else 500."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Http)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_command_tcp_and_http_checks(fast: Home, http_port: int) -> None:
    """command (exit 0 vs 1), tcp (listening vs refused) and http (200 vs 500) checks end
    healthy or unhealthy; a tcp check turns unhealthy when its listener goes away."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    listener.settimeout(0.05)
    port = listener.getsockname()[1]
    closing = threading.Event()

    def accept() -> None:  # so the backlog never fills up with the probes' connections
        while not closing.is_set():
            try:
                listener.accept()[0].close()
            except TimeoutError:
                continue

    acceptor = threading.Thread(target=accept)
    acceptor.start()
    try:
        checks = {
            "cmd_ok": "command:" + shlex.join(["sh", "-c", "exit 0"]),
            "cmd_bad": "command:" + shlex.join(["sh", "-c", "exit 1"]),
            "tcp_ok": f"tcp:127.0.0.1:{port}",
            "tcp_bad": f"tcp:127.0.0.1:{_free_port()}",
            "http_ok": f"http://127.0.0.1:{http_port}/ok",
            "http_bad": f"http:127.0.0.1:{http_port}/bad",
        }
        health = {
            "interval": 0.2,
            "timeout": 1.0,
            "failure_threshold": 2,
            "success_threshold": 2,
            "on_unhealthy": "isolate",  # this test watches the checks, not what follows
        }
        with fast.client() as c:
            c.register(
                {
                    name: service(
                        engine_cmd("sleeper.py"),
                        restart={"start_seconds": 0},
                        health={"check": check, **health},
                    )
                    for name, check in checks.items()
                }
            )

        def settled() -> dict[str, dict[str, Any]] | None:
            insts = {i["id"].split("#")[0]: i for i in fast.instances()}
            done = all(
                insts[n]["health"] == ("healthy" if n.endswith("_ok") else "unhealthy")
                for n in checks
            )
            return insts if done else None

        insts = wait_until(settled, timeout=10)
        for name in checks:
            assert health_path(fast, f"{name}#0") == [
                "unknown->healthy" if name.endswith("_ok") else "unknown->unhealthy"
            ]
            assert insts[name]["state"] == "ready"
        assert insts["cmd_ok"]["health_reason"] == "2 passing probe(s) (success_threshold 2)"
        assert insts["cmd_bad"]["health_reason"].startswith("2 failed probe(s) (failure_threshold")
        assert "exit code 1" in insts["cmd_bad"]["health_reason"]
        assert "Connection refused" in insts["tcp_bad"]["health_reason"]
        assert insts["http_bad"]["health_reason"].endswith(
            f"last: GET http://127.0.0.1:{http_port}/bad: HTTP 500"
        )
    finally:
        closing.set()
        acceptor.join(5)
        listener.close()
    # The listener is gone: the tcp check that passed now fails.
    wait_until(lambda: fast.instance("tcp_ok#0")["health"] == "unhealthy", timeout=10)
    assert health_path(fast, "tcp_ok#0") == ["unknown->healthy", "healthy->unhealthy"]
    assert fast.cli("stop", *checks).returncode == 0


def test_idle_instances_skipped_by_the_tick_still_follow_a_weight_change(fast: Home) -> None:
    """Issue 13.1 (regression guard of the enforcer's quiet path): instances with nothing to
    judge are skipped by the policy tick, unless something a refresh reads changed: a new
    `weight` applied to an idle engine reaches its effective weight (and the selection)."""
    spec = {**QUICK, "command": engine_cmd("echo.py"), "type": "echo", "instances": 2}
    with fast.client() as c:
        c.register({"w": {**spec, "weight": 1.0}})
    for k in (0, 1):
        fast.wait_state(f"w#{k}", "ready")
    # Several ticks with nothing to judge: both are quiet.
    wait_until(lambda: fast.instance("w#1")["effective_weight"] == 1.0, 5)
    time.sleep(1.0)
    with fast.client() as c:
        c.apply({"w": {**spec, "weight": 3.0}})
    wait_until(
        lambda: all(i["effective_weight"] == 3.0 for i in fast.instances("w")), 5, interval=0.1
    )
    with fast.client() as c:  # and the quiet instances still serve, at that weight
        assert c.exec({"x": 1}, type="echo", timeout=10)["ok"]
