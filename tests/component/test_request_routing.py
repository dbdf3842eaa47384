"""Where requests go and how they end, with real workers: hard filters on every attempt,
waiting for engines on their way (after a daemon restart, while restarting), saying what is
true when nothing can serve, and one outcome per attempt everywhere."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import pytest

from engctl.errors import (
    EXIT_NO_ELIGIBLE,
    NoEligibleEngineError,
    RequestFailedError,
    RequestTimeoutError,
)
from tests.conftest import Home, engine_cmd, wait_until
from tests.daemon_support import kill9_daemon, socket_closed

QUICK: dict[str, Any] = {"restart": {"start_seconds": 0.1, "backoff": {"initial": 0.05}}}
ERROR_REPLY = '{"jsonrpc":"2.0","id":%ID%,"error":{"code":1,"message":"nope"}}'


def wire_engines(home: Home, **engines: dict[str, Any]) -> None:
    """Register wire.py workers `{name: spec}` and wait until every instance is ready."""
    with home.client() as c:
        c.register(
            {n: {"command": engine_cmd("wire.py"), **QUICK, **s} for n, s in engines.items()}
        )
    for name, spec in engines.items():
        for k in range(spec.get("instances", 1)):
            home.wait_state(f"{name}#{k}", "ready")


def outcomes(requests: dict[str, int]) -> int:
    return requests["ok"] + requests["errors"] + requests["timeouts"] + requests["lost"]


# -- hard filters hold for every attempt (issue 10.2) ----------------------------------------
def test_a_retry_never_leaves_the_pinned_instance(daemon: Home) -> None:
    """Issue 10.2: `--instance kvb#0 --retries 2` whose attempt fails on kvb#0 fails; it is
    never answered by another instance (of this engine, or of another engine and type)."""
    wire_engines(daemon, kva={"type": "A"}, kvb={"type": "B", "instances": 2})
    for _ in range(3):
        with (
            daemon.client(timeout=60) as c,
            pytest.raises(RequestFailedError, match="kvb#0: nope") as info,
        ):
            c.exec({"raw": ERROR_REPLY}, instance="kvb#0", retries=2, timeout=5)
        assert info.value.data["attempts"] == 1
        assert info.value.data["instance"] == "kvb#0"
    for name in ("kva#0", "kvb#1"):
        assert daemon.instance(name)["requests"]["requests"] == 0


def test_a_retry_keeps_the_type_capability_and_label_filters(daemon: Home) -> None:
    """Issue 10.2: a retry only goes to an instance that passes every filter of the first
    attempt: with the one matching instance failing, the request fails rather than landing
    on the instance of another type, another capability or another label."""
    wire_engines(
        daemon,
        bad={"type": "T", "capabilities": ["gpu"], "labels": {"tier": "gold"}},
        other_type={"type": "U", "capabilities": ["gpu"], "labels": {"tier": "gold"}},
        no_cap={"type": "T", "labels": {"tier": "gold"}},
        no_label={"type": "T", "capabilities": ["gpu"]},
    )
    with daemon.client(timeout=60) as c, pytest.raises(RequestFailedError, match="bad#0: nope"):
        c.exec({"raw": ERROR_REPLY}, type="T", require=["gpu"], labels=["tier=gold"], retries=3)
    for name in ("other_type#0", "no_cap#0", "no_label#0"):
        assert daemon.instance(name)["requests"]["requests"] == 0


# -- waiting for engines on their way (issues 9.7 and 10.17) ---------------------------------
def test_requests_right_after_a_daemon_restart_wait_for_their_engines(daemon: Home) -> None:
    """Issue 9.7: after `kill -9` of the daemon, requests sent while the new one is still
    sweeping the old generation and starting its engines wait for them (within their
    deadline) instead of failing with "no dispatchable instances" (exit 4)."""
    wire_engines(daemon, w={"type": "W", "restart": {"start_seconds": 0.3}})
    old = daemon.daemon_pid()
    kill9_daemon(daemon)
    # Its threads may still hold the listening socket a moment after the leader is a zombie
    # (a connection then is reset: the client's business, not this test's).
    wait_until(lambda: socket_closed(daemon))
    results: list[Any] = []

    def one() -> None:
        try:
            with daemon.client(timeout=60) as c:  # the first one starts the new daemon
                results.append(c.exec("hi", type="W", timeout=15))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert daemon.daemon_pid() not in (None, old), results
    assert len(results) == 4
    for r in results:
        assert isinstance(r, dict) and r["result"] == {"echo": "hi"}, r


def test_a_request_waits_for_a_restarting_engine_and_says_so_on_timeout(daemon: Home) -> None:
    """Issue 10.17: while the only instance of type slow is in backoff, a request waits for
    it (and is served once it is back, within its deadline); one whose deadline is too short
    says what it waited for."""
    wire_engines(
        daemon, slow={"type": "slow", "restart": {"start_seconds": 0.1, "backoff": {"initial": 2}}}
    )
    os.kill(daemon.instance("slow#0")["pid"], signal.SIGKILL)
    daemon.wait_state("slow#0", "backoff")
    with daemon.client(timeout=60) as c, pytest.raises(RequestTimeoutError) as info:
        c.exec(1, type="slow", timeout=0.3)
    message = info.value.message
    assert message.startswith(
        "request timed out after 0.3s waiting in the queue: all instances of slow are restarting"
        " (next start in "
    ), message
    with daemon.client(timeout=60) as c:
        assert c.exec(2, type="slow", timeout=15)["result"] == {"echo": 2}


def test_a_service_engine_is_named_as_taking_no_requests(daemon: Home) -> None:
    """Issue 10.17: asking for a registered service engine (by name or type) says that it
    takes no requests (exit 4), not that there is no such engine."""
    daemon.register("svc", engine_cmd("sleeper.py"), mode="service", type="web")
    r = daemon.cli("exec", "--engine", "svc", "--", "1")
    assert r.returncode == EXIT_NO_ELIGIBLE, r.stderr
    assert r.stderr.strip() == "engctl: error: svc is a service engine: it takes no requests"
    with (
        daemon.client(timeout=60) as c,
        pytest.raises(NoEligibleEngineError, match="it takes no requests"),
    ):
        c.exec(1, type="web")


def test_a_fatal_engine_fails_requests_at_once_saying_why(daemon: Home) -> None:
    """Issue 10.17: requests for an engine whose instances are all fatal fail at once (exit
    4) with its reason; a request already waiting for it fails as soon as it goes fatal, not
    at its deadline."""
    daemon.register(
        "bad",
        engine_cmd("crashing.py"),
        type="X",
        restart={"start_seconds": 0.5, "max_retries": 2, "backoff": {"initial": 0.3}},
    )
    t0 = time.monotonic()
    with daemon.client(timeout=60) as c, pytest.raises(NoEligibleEngineError) as info:
        c.exec(1, type="X", timeout=30)  # waits while it restarts, fails when it is fatal
    assert time.monotonic() - t0 < 20
    assert info.value.message.startswith("all instances of bad are fatal: gave up after 3 failed")
    t0 = time.monotonic()
    r = daemon.cli("exec", "--type", "X", "--timeout", "30", "--", "1")
    assert r.returncode == EXIT_NO_ELIGIBLE, r.stderr
    assert "all instances of bad are fatal: gave up after" in r.stderr
    assert time.monotonic() - t0 < 10


def test_a_stopped_engine_says_it_is_stopped(daemon: Home) -> None:
    """Issue 10.17: an engine stopped by hand is named as stopped (exit 4, at once)."""
    wire_engines(daemon, w={"type": "W"})
    assert daemon.cli("stop", "w").returncode == 0
    with daemon.client(timeout=60) as c, pytest.raises(NoEligibleEngineError) as info:
        c.exec(1, type="W", timeout=5)
    assert info.value.message == "all instances of w are stopped"


# -- one outcome per attempt (issue 10.3) ----------------------------------------------------
def test_outcomes_sum_to_requests_in_status_metrics_and_report(daemon: Home) -> None:
    """Issue 10.3: after ok answers, worker errors, a timeout whose instance is then killed
    (it counted as timeout and lost), and a crash mid-request, every instance's requests are
    exactly the sum of its outcomes in status, in `metrics --json` and in the report."""
    wire_engines(daemon, mix={"type": "M"})
    with daemon.client(timeout=60) as c:
        for i in range(3):
            c.exec(i, type="M", timeout=5)
        for _ in range(2):
            with pytest.raises(RequestFailedError):
                c.exec({"raw": ERROR_REPLY}, type="M", timeout=5)
        with pytest.raises(RequestTimeoutError):
            c.exec({"sleep": 30}, type="M", timeout=0.3)
    pid = daemon.instance("mix#0")["pid"]
    os.kill(pid, signal.SIGKILL)  # the timed-out request is still in flight on it
    wait_until(lambda: (i := daemon.instance("mix#0"))["state"] == "ready" and i["pid"] != pid)
    with daemon.client(timeout=60) as c, pytest.raises(RequestFailedError, match="request lost"):
        c.exec({"exit": 3}, type="M", timeout=5)
    daemon.wait_state("mix#0", "ready")
    with daemon.client(timeout=60) as c:
        c.exec("last", type="M", timeout=5)

    req = daemon.instance("mix#0")["requests"]
    assert (req["ok"], req["errors"], req["timeouts"], req["lost"]) == (4, 2, 1, 1)
    assert req["requests"] == outcomes(req) == 8
    assert req["in_flight"] == 0

    r = daemon.cli("metrics", "--json")
    assert r.returncode == 0, r.stderr
    [family] = [f for f in json.loads(r.stdout)["families"] if f["name"] == "engctl_requests"]
    counted: dict[str, float] = {}
    for sample in family["samples"]:
        if "mix#0" in sample["labels"].values():
            counted[sample["labels"]["outcome"]] = sample["value"]
    assert counted == {"ok": 4, "error": 2, "timeout": 1, "lost": 1}

    with daemon.client(timeout=60) as c:
        c.call("metrics.flush")
    r = daemon.cli("report", "--json", "--engine", "mix")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    for figures in (doc["totals"], doc["engines"][0], doc["engines"][0]["instances"][0]):
        assert figures["requests"] == outcomes(figures) == 8, figures
        assert figures["success_rate"] == pytest.approx(4 / 8)
