"""Lifecycle without lost work (issue 10): every replacement drains first (scale-down, restart,
unregister), unhealthy services restart, dependents stop before what they depend on, stopped
instances say why, and `{index}` gives each instance its own values. Real daemons, real
workers, real sockets."""

from __future__ import annotations

import contextlib
import json
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import pytest

from engctl.errors import EngctlError, UsageError
from tests.conftest import Home, engine_cmd, machine_lock, wait_until

# Workers count as started after 0.1 s (they say `ready` at once).
QUICK: dict[str, Any] = {"restart": {"start_seconds": 0.1, "backoff": {"initial": 0.05}}}


def events(home: Home, *kinds: str, engine: str | None = None) -> list[dict[str, Any]]:
    """Past events (of `kinds`, when given), oldest first."""
    with home.client() as c:
        evs = cast("list[dict[str, Any]]", c.events(engine=engine, limit=2000))
    return [e for e in evs if not kinds or e["kind"] in kinds]


def slow_workers(home: Home, name: str, instances: int, delay: float = 0.1, **spec: Any) -> None:
    """Register `name`: `instances` workers that answer after `delay` s (with `spec`'s keys
    too); wait until ready."""
    command = engine_cmd("slow.py", str(delay))
    with home.client() as c:
        c.register({name: {**QUICK, "command": command, "instances": instances, **spec}})
    for k in range(instances):
        home.wait_state(f"{name}#{k}", "ready")


class Load:
    """Steady requests from client threads (`--retries 0`) until the block ends; every failure
    is kept with its message."""

    def __init__(self, home: Home, threads: int = 6, **exec_kw: Any) -> None:
        self.home = home
        self.threads = threads
        self.exec_kw = {"retries": 0, "timeout": 30.0, **exec_kw}
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def _run(self) -> None:
        with self.home.client() as c:
            while not self._stop.is_set():
                try:
                    c.exec({"n": 1}, **self.exec_kw)
                except EngctlError as exc:
                    with self._lock:
                        self.failures.append(exc.message)
                else:
                    with self._lock:
                        self.ok += 1

    def wait_for(self, n: int) -> None:
        """Wait until `n` more requests have succeeded."""
        target = self.ok + n
        wait_until(lambda: self.ok >= target, timeout=30)

    def __enter__(self) -> Load:
        self._workers = [threading.Thread(target=self._run) for _ in range(self.threads)]
        for t in self._workers:
            t.start()
        self.wait_for(20)
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(60)


# -- 10.9: replacements drain first ------------------------------------------------------------
def test_scale_down_under_load_loses_no_request(daemon: Home) -> None:
    """`scale 4 -> 2` with requests in flight on every instance: the leaving instances take no
    new request, finish what they run, then stop; 0 of the requests fail (issue 10.9: 2 lost)."""
    slow_workers(daemon, "w", 4)
    with Load(daemon, engine="w") as load:
        r = daemon.cli("scale", "w", "2")
        assert r.returncode == 0, r.stderr
        load.wait_for(30)
    assert load.failures == []
    assert [i["id"] for i in daemon.instances("w")] == ["w#0", "w#1"]
    drained = events(daemon, "instance.draining", engine="w")
    assert {e["instance"] for e in drained} == {"w#2", "w#3"}
    assert all(e["reason"] == "scaled to 2: draining, then stop" for e in drained)
    assert events(daemon, "instance.drain_timeout") == []


def test_restart_under_load_loses_no_request(daemon: Home) -> None:
    """`restart w` (every instance at once) and `restart w#1`: each running instance drains,
    stops and starts again, and the requests meanwhile wait for it; 0 fail (issue 10.9: 3 of
    300 lost)."""
    slow_workers(daemon, "w", 2)
    pids = {i["id"]: i["pid"] for i in daemon.instances("w")}
    with Load(daemon, engine="w") as load:
        r = daemon.cli("restart", "w", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout) == {"restarted": ["w#0", "w#1"]}
        load.wait_for(20)
        assert daemon.cli("restart", "w#1").returncode == 0
        load.wait_for(20)
    assert load.failures == []
    now = {i["id"]: i["pid"] for i in daemon.instances("w")}
    assert all(now[k] != pids[k] for k in pids)
    assert [i["state"] for i in daemon.instances("w")] == ["ready", "ready"]


def unregister_while_running(home: Home, inst_id: str, delay: float) -> dict[str, Any]:
    """Unregister engine `w` while `inst_id` runs a request of `delay` seconds: its answer."""
    result: dict[str, Any] = {}

    def long_request() -> None:
        with home.client() as c:
            result["answer"] = c.exec({"delay": delay}, instance=inst_id, timeout=20)

    t = threading.Thread(target=long_request)
    t.start()
    wait_until(lambda: home.instance(inst_id)["requests"]["in_flight"] == 1)
    r = home.cli("unregister", "w")
    assert r.returncode == 0, r.stderr
    t.join(20)
    return cast("dict[str, Any]", result["answer"])


def test_unregister_lets_requests_in_flight_finish(daemon: Home) -> None:
    """`unregister` drains: a request running on the engine finishes with its answer; only
    then do the processes stop and the engine go."""
    slow_workers(daemon, "w", 1, delay=0.1)
    answer = unregister_while_running(daemon, "w#0", 1.0)
    assert answer["ok"] is True
    assert answer["result"]["echo"] == {"delay": 1.0}
    assert daemon.status()["engines"] == []


def test_instances_drained_together_each_stop_when_their_own_requests_end(daemon: Home) -> None:
    """`unregister` of three instances, one running a long request: the two idle ones stop at
    once, not when the busy one's request ends (they drain in one call, each on its own)."""
    slow_workers(daemon, "w", 3)
    assert unregister_while_running(daemon, "w#1", 2.0)["ok"] is True
    stopped = {
        e["instance"]: e["at"]
        for e in events(daemon, "instance.state")  # by kind: `w` is gone, its events stay
        if e["to"] == "stopped"
    }
    draining = {e["instance"]: e["at"] for e in events(daemon, "instance.draining")}
    assert set(draining) == set(stopped) == {"w#0", "w#1", "w#2"}
    assert stopped["w#0"] - draining["w#0"] < 1.0
    assert stopped["w#2"] - draining["w#2"] < 1.0
    assert stopped["w#1"] - draining["w#1"] >= 1.0
    assert events(daemon, "instance.drain_timeout") == []


def test_draining_instance_shows_it_and_drain_timeout_is_an_event(daemon: Home) -> None:
    """While it drains the instance is `draining` with its reason; a request that outlives the
    stop timeout is not waited for forever: the instance stops anyway (drain_timeout event)."""
    slow_workers(daemon, "w", 2, stop={"timeout": 1.0})
    failures: list[str] = []

    def stuck_request() -> None:
        with daemon.client() as c:
            try:
                c.exec({"delay": 30}, instance="w#1", timeout=60)
            except EngctlError as exc:
                failures.append(exc.message)

    t = threading.Thread(target=stuck_request)
    t.start()
    wait_until(lambda: daemon.instance("w#1")["requests"]["in_flight"] == 1)
    scale = threading.Thread(target=lambda: daemon.cli("scale", "w", "1"))
    scale.start()
    draining = wait_until(
        lambda: (i := daemon.instance("w#1"))["eligibility"] == "draining" and i, timeout=5
    )
    assert draining["eligibility_reason"] == "draining to stop: scaled to 1"
    scale.join(30)
    t.join(30)
    assert len(failures) == 1 and "request lost" in failures[0]
    (timeout,) = events(daemon, "instance.drain_timeout")
    assert timeout["instance"] == "w#1"
    assert timeout["reason"] == "stop with 1 request(s) still in flight after 1s"


def test_instances_drained_together_time_out_once_each_and_all_stop(daemon: Home) -> None:
    """`scale 3 -> 0` with a request stuck on two of the instances: the idle one stops at once,
    the two stuck ones each get one drain_timeout event when their stop timeout comes (one
    timer for the stop timeout they share), then all three are stopped."""
    slow_workers(daemon, "w", 3, stop={"timeout": 1.0})

    def stuck_request(inst_id: str) -> None:
        with daemon.client() as c, contextlib.suppress(EngctlError):  # lost when it is killed
            c.exec({"delay": 30}, instance=inst_id, timeout=60)

    threads = [threading.Thread(target=stuck_request, args=(i,)) for i in ("w#0", "w#2")]
    for t in threads:
        t.start()
    wait_until(
        lambda: all(daemon.instance(i)["requests"]["in_flight"] == 1 for i in ("w#0", "w#2"))
    )
    t0 = time.monotonic()
    r = daemon.cli("scale", "w", "0")
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 >= 1.0
    for t in threads:
        t.join(30)
    timeouts = events(daemon, "instance.drain_timeout")
    assert sorted(e["instance"] for e in timeouts) == ["w#0", "w#2"]
    assert all(e["data"] == {"in_flight": 1} for e in timeouts)
    stopped = {
        e["instance"]: e["at"]
        for e in events(daemon, "instance.state", engine="w")
        if e["to"] == "stopped"
    }
    draining = {e["instance"]: e["at"] for e in events(daemon, "instance.draining", engine="w")}
    assert set(stopped) == {"w#0", "w#1", "w#2"}
    assert stopped["w#1"] - draining["w#1"] < 1.0
    assert all(stopped[i] - draining[i] >= 1.0 for i in ("w#0", "w#2"))


# -- 10.11: on_unhealthy --------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unhealthy_service_is_restarted_gracefully(daemon: Home) -> None:
    """A service whose tcp check fails `failure_threshold` times is restarted (the default
    `on_unhealthy = "restart"` for services), through the drain, with a fresh process and
    health; one with `on_unhealthy = "isolate"` keeps running (issue 10.11)."""
    health = {
        "check": f"tcp:127.0.0.1:{_free_port()}",
        "interval": 0.2,
        "timeout": 0.5,
        "failure_threshold": 2,
    }
    with daemon.client() as c:
        c.register(
            {
                "svc": {
                    "command": engine_cmd("sleeper.py"),
                    "mode": "service",
                    "restart": {"start_seconds": 0},
                    "health": health,
                },
                "kept": {
                    "command": engine_cmd("sleeper.py"),
                    "mode": "service",
                    "restart": {"start_seconds": 0},
                    "health": {**health, "on_unhealthy": "isolate"},
                },
            }
        )
        policy = {e["name"]: e["health"]["on_unhealthy"] for e in c.policy()["engines"]}
    assert policy == {"svc": "restart", "kept": "isolate"}
    first = daemon.wait_state("svc#0", "ready")["pid"]
    kept = daemon.wait_state("kept#0", "ready")["pid"]
    again = wait_until(
        lambda: (
            (i := daemon.instance("svc#0"))["restarts"] >= 1 and i["pid"] not in (None, first) and i
        ),
        timeout=15,
    )
    assert again["health"] in ("unknown", "unhealthy")  # a new process: probed afresh
    drain = events(daemon, "instance.draining", engine="svc")[0]
    assert drain["reason"].startswith("unhealthy: 2 failed probe(s) (failure_threshold 2)")
    assert drain["reason"].endswith("draining, then a graceful restart")
    assert any(
        e["to"] == "stopping" and e["reason"].startswith("restart: unhealthy")
        for e in events(daemon, "instance.state", engine="svc")
    )
    inst = wait_until(lambda: (i := daemon.instance("kept#0"))["health"] == "unhealthy" and i)
    assert inst["pid"] == kept and inst["restarts"] == 0
    assert inst["eligibility"] == "isolated"


def test_on_unhealthy_is_validated_and_defaults_by_mode() -> None:
    """`on_unhealthy` is isolate or restart; workers isolate and services restart by default,
    and only a non-default value is exported."""
    from engctl.errors import SpecError
    from engctl.models import EngineSpec
    from engctl.states import OnUnhealthy

    worker = EngineSpec.from_dict("w", {"command": ["x"]})
    svc = EngineSpec.from_dict("s", {"command": ["x"], "mode": "service"})
    assert worker.health.on_unhealthy is OnUnhealthy.ISOLATE
    assert svc.health.on_unhealthy is OnUnhealthy.RESTART
    assert "health" not in svc.to_dict()
    odd = EngineSpec.from_dict(
        "s", {"command": ["x"], "mode": "service", "health": {"on_unhealthy": "isolate"}}
    )
    assert odd.to_dict()["health"] == {"on_unhealthy": "isolate"}
    assert EngineSpec.from_dict("s", odd.to_dict()) == odd
    with pytest.raises(SpecError, match=r"engines.w.health.on_unhealthy: must be isolate or"):
        EngineSpec.from_dict("w", {"command": ["x"], "health": {"on_unhealthy": "kill"}})


# -- 10.12: dependents ------------------------------------------------------------------------
def _chain(home: Home) -> None:
    """db <- app <- web, and an unrelated `other`; all running."""
    svc = {"command": engine_cmd("sleeper.py"), "mode": "service", "restart": {"start_seconds": 0}}
    with home.client() as c:
        c.register(
            {
                "db": svc,
                "app": {**svc, "depends_on": ["db"]},
                "web": {**svc, "depends_on": ["app"]},
                "other": svc,
            }
        )
    for name in ("db", "app", "web", "other"):
        home.wait_state(f"{name}#0", "ready")


def _stopped_order(home: Home) -> list[str]:
    evs = events(home, "instance.state")
    return [e["instance"].split("#")[0] for e in evs if e["to"] == "stopped"]


def test_stopping_a_dependency_stops_its_dependents_first(daemon: Home) -> None:
    """`stop db` stops web, then app, then db, says so in the result and an event, and marks
    them stopped (a restarted daemon leaves them so); `other` is untouched (issue 10.12)."""
    _chain(daemon)
    r = daemon.cli("stop", "db", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["dependents"] == ["web", "app"]
    assert out["stopped"] == ["web#0", "app#0", "db#0"]
    assert _stopped_order(daemon) == ["web", "app", "db"]
    (ev,) = events(daemon, "engine.stopping_dependents")
    assert ev["engine"] == "db"
    assert ev["reason"] == "stopping web, app first: they depend on db"
    assert ev["data"] == {"dependents": ["web", "app"]}
    assert {e["name"]: e["desired"] for e in daemon.status()["engines"]} == {
        "app": "stopped",
        "db": "stopped",
        "other": "running",
        "web": "stopped",
    }
    assert daemon.instance("other#0")["state"] == "ready"
    text = daemon.cli("stop", "other")
    assert text.stdout == "stopped: other#0\n"
    assert daemon.cli("start", "db", "app", "web").returncode == 0
    for name in ("db", "app", "web"):
        daemon.wait_state(f"{name}#0", "ready")
    text = daemon.cli("stop", "app")
    assert text.stdout == "stopped: web#0, app#0 (web depends on app: stopped first)\n"


def test_stop_no_dependents_refuses_and_names_them(daemon: Home) -> None:
    """`stop --no-dependents db` stops nothing and exits 2 naming the running dependents."""
    _chain(daemon)
    r = daemon.cli("stop", "--no-dependents", "db")
    assert r.returncode == 2
    assert r.stderr == (
        "engctl: error: not stopping db: 'web', 'app' depend on it and are running"
        " (stop them first, or leave out --no-dependents to stop them too)\n"
    )
    assert all(i["state"] == "ready" for i in daemon.instances())
    with daemon.client() as c, pytest.raises(UsageError) as err:
        c.stop(["app"], no_dependents=True)
    assert err.value.data["dependents"] == ["web"]
    # Once the dependents are stopped, the refusal has nothing to refuse.
    assert daemon.cli("stop", "web", "app").returncode == 0
    r = daemon.cli("stop", "--no-dependents", "db", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dependents"] == []


def test_daemon_shutdown_stops_dependents_first(daemon: Home) -> None:
    """Daemon shutdown stops in reverse dependency order: each engine only once everything
    that depends on it has stopped (independent engines at the same time)."""
    _chain(daemon)
    assert daemon.cli("daemon", "stop").returncode == 0
    wait_until(lambda: daemon.daemon_pid() is None, timeout=30)
    evs = events(daemon, "instance.state")  # starts a new daemon, which reads the old events
    first = next(e["id"] for e in evs if e["reason"] == "daemon shutting down")
    shutdown = [e for e in evs if e["id"] >= first]

    def at(name: str, to: str) -> int:
        ids = (e["id"] for e in shutdown if e["instance"] == f"{name}#0" and e["to"] == to)
        return int(next(ids))

    assert at("web", "stopped") < at("app", "stopping")
    assert at("app", "stopped") < at("db", "stopping")


# -- 10.19: stopped and fatal say why ---------------------------------------------------------
def test_a_registered_instance_never_started_is_unavailable_at_once(daemon: Home) -> None:
    """An instance registered without a start is `unavailable` ("stopped: registered") in the
    very first status, not `active` until the enforcer's first look."""
    with daemon.client() as c:
        c.register({"idle": {**QUICK, "command": engine_cmd("echo.py")}}, start=False)
        inst = cast("dict[str, Any]", c.status(["idle"]))["engines"][0]["instances"][0]
    assert (inst["state"], inst["eligibility"]) == ("stopped", "unavailable")
    assert inst["eligibility_reason"] == "stopped: registered"


def test_stopped_and_fatal_instances_are_unavailable_with_their_reason(daemon: Home) -> None:
    """A stopped or fatal instance is `unavailable` (not `active`), and its reason (the state
    and why) is in `eligibility_reason` and the status table's REASON column."""
    with daemon.client() as c:
        c.register(
            {
                "gone": {
                    "command": engine_cmd("crashing.py", "0", "3"),
                    "mode": "service",
                    "restart": {"max_retries": 1, "backoff": {"initial": 0.05}},
                },
                "w": {**QUICK, "command": engine_cmd("echo.py")},
            }
        )
    daemon.wait_state("w#0", "ready")
    assert daemon.instance("w#0")["eligibility"] == "active"
    fatal = daemon.wait_state("gone#0", "fatal")
    assert fatal["eligibility"] == "unavailable"
    assert fatal["eligibility_reason"].startswith("fatal: gave up after 2 failed starts")
    assert daemon.cli("stop", "w").returncode == 0
    stopped = daemon.instance("w#0")
    assert stopped["eligibility"] == "unavailable"
    assert stopped["eligibility_reason"].startswith("stopped: stopped (")
    assert stopped["effective_weight"] == 0
    env = {**daemon.env, "COLUMNS": "200"}
    table = subprocess.run(
        [sys.executable, "-m", "engctl", "status"], env=env, capture_output=True, text=True
    ).stdout
    rows = {line.split()[0]: line for line in table.splitlines()[1:]}
    assert "fatal: gave up after 2 failed starts" in rows["gone#0"]
    assert "unavailable" in rows["w#0"] and "stopped: stopped (" in rows["w#0"]
    # No eligibility event for what a state change already says.
    assert events(daemon, "instance.eligibility") == []


# -- 10.21: {index} -----------------------------------------------------------------------------
def test_index_in_command_and_env_and_the_instance_index_variable(daemon: Home) -> None:
    """`{index}` in command and env values becomes the instance's index, `{{index}}` stays a
    literal `{index}`, and ENGCTL_INSTANCE_INDEX is set (supervisord's process_num)."""
    code = (
        "import os, sys, time; print(sys.argv[1:], os.environ['ENGCTL_INSTANCE_INDEX'],"
        " os.environ['SLOT'], flush=True); time.sleep(3600)"
    )
    with daemon.client() as c:
        c.register(
            {
                "ix": {
                    "command": [sys.executable, "-c", code, "port-80{index}", "{{index}}"],
                    "env": {"SLOT": "slot-{index}"},
                    "mode": "service",
                    "instances": 2,
                    "restart": {"start_seconds": 0},
                }
            }
        )
    for k in range(2):
        daemon.wait_state(f"ix#{k}", "ready")

    def printed(k: int) -> str | None:
        r = daemon.cli("logs", f"ix#{k}", "--json")
        lines = [d["text"] for d in json.loads(r.stdout)["lines"] if d["stream"] == "stdout"]
        return lines[0] if lines else None

    assert wait_until(lambda: printed(0)) == "['port-800', '{index}'] 0 slot-0"
    assert wait_until(lambda: printed(1)) == "['port-801', '{index}'] 1 slot-1"


@pytest.fixture
def tour_ports() -> Iterator[None]:
    """The tour's fixed ports 8120 and 8121, held until its engines are stopped (request it
    before `daemon`): parallel test runs on this machine take turns."""
    with machine_lock("ports-8120-8121"):
        yield


def test_readme_tour_two_web_instances_on_their_own_ports(tour_ports: None, daemon: Home) -> None:
    """The README tour's exact command: two http.server instances, each on its own port
    (812{index}), both stay up and answer (issue 10.21: one went fatal on a port in use)."""
    for port in (8120, 8121):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.skip(f"port {port} is in use on this machine")
    tour = "register web --cmd 'python3 -m http.server 812{index}' --mode service --instances 2"
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert f"engctl {tour}" in readme
    r = daemon.cli(*shlex.split(tour))
    assert r.returncode == 0, r.stderr

    def answers(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(lambda: answers(8120) and answers(8121), timeout=15)
    for k in range(2):
        daemon.wait_state(f"web#{k}", "ready")
    assert all(i["restarts"] == 0 for i in daemon.instances("web"))
