"""Zero-downtime change (issue 12): `reload` replaces every process one slot after another
under load without losing a request, a changed spec rolls out the same way with generations
visible in status, a failing new version stops the rollout while the old processes serve,
service reloads keep `instances - max_unavailable` up, and a daemon killed mid-rollout comes
back with the wanted spec and count. Real daemons, real workers."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import psutil
import pytest

from engctl.errors import RolloutFailedError, RolloutInProgressError
from tests.component.test_lifecycle import Load, events
from tests.conftest import PY, Home, engine_cmd, wait_until

QUICK: dict[str, Any] = {"restart": {"start_seconds": 0.1, "backoff": {"initial": 0.05}}}


def workers(home: Home, name: str, instances: int, *args: str, **spec: Any) -> None:
    """Register `name`: `instances` late.py workers (`args`: START, DELAY); wait until ready."""
    with home.client() as c:
        c.register(
            {
                name: {
                    **QUICK,
                    "command": engine_cmd("late.py", *(args or ("0",))),
                    "instances": instances,
                    **spec,
                }
            }
        )
    for k in range(instances):
        home.wait_state(f"{name}#{k}", "ready")


def engine(home: Home, name: str) -> dict[str, Any]:
    return next(e for e in home.status()["engines"] if e["name"] == name)


def pids(home: Home, name: str) -> dict[str, int]:
    return {i["id"]: i["pid"] for i in engine(home, name)["instances"]}


def home_processes(home: Home) -> list[psutil.Process]:
    """Every live engine process of this home (by the daemon id in its environment)."""
    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            env = p.environ()
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        if env.get("ENGCTL_DAEMON_ID") == home.paths.daemon_id and "ENGCTL_INSTANCE" in env:
            found.append(p)
    return found


# -- 12.1: rolling reload ----------------------------------------------------------------------
def test_reload_under_load_loses_no_request_and_replaces_every_process(daemon: Home) -> None:
    """`reload w` under a steady client with `--retries 0`: every pid is replaced, one slot
    after another, the ids stay w#0..2, the count is restored, 0 requests fail."""
    workers(daemon, "w", 3, "0.2")
    before = pids(daemon, "w")
    with Load(daemon, engine="w") as load:
        r = daemon.cli("reload", "w", "--json")
        assert r.returncode == 0, r.stderr
        load.wait_for(20)
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["engine"] == "w" and doc["reason"] == ""
    assert sorted(doc["replaced"]) == ["w#0", "w#1", "w#2"]
    assert doc["steps"] == 3 and doc["duration_s"] > 0
    assert load.failures == []
    eng = engine(daemon, "w")
    after = pids(daemon, "w")
    assert list(after) == ["w#0", "w#1", "w#2"]
    assert all(after[k] != before[k] for k in before)
    assert eng["generation"] == 2 and eng["surge"] == []
    assert [i["generation"] for i in eng["instances"]] == [2, 2, 2]
    assert [i["state"] for i in eng["instances"]] == ["ready"] * 3
    kinds = [e["kind"] for e in events(daemon, engine="w")]
    assert kinds.count("instance.replaced") == 3
    assert "engine.rollout_started" in kinds and "engine.rollout_finished" in kinds
    # The new process of slot k got {index} = k.
    with daemon.client() as c:
        answers = [c.exec({"n": i}, engine="w")["result"] for i in range(6)]
    assert {(a["instance"], a["index"]) for a in answers} <= {
        ("w#0", "0"),
        ("w#1", "1"),
        ("w#2", "2"),
    }
    assert {a["generation"] for a in answers} == {"2"}


def test_surge_step_shows_both_processes_of_a_slot(daemon: Home) -> None:
    """During a surge step the slot's old process and its successor are both in status (the
    successor in the engine's `surge` with its generation); the ids of the slots never repeat
    among the current instances. (The new version takes 3 s to get ready: `status` has time.)"""
    workers(daemon, "w", 2)
    slow = {**QUICK, "command": engine_cmd("late.py", "3"), "instances": 2}
    with daemon.client() as c:
        [r] = c.register({"w": slow}, wait=False)["engines"]
    assert r["rollout"]["state"] == "running" and r["rollout"]["ok"] is None

    def successor() -> dict[str, Any] | None:
        eng = engine(daemon, "w")
        assert [i["id"] for i in eng["instances"]] == ["w#0", "w#1"]
        return next((s for s in eng["surge"] if s["role"] == "successor"), None)

    succ = wait_until(successor)
    assert succ["generation"] == 2 and succ["eligibility"] == "unavailable"
    r = daemon.cli("status", "w")
    assert "rolling out" in r.stdout and "successor" in r.stdout, r.stdout
    wait_until(lambda: engine(daemon, "w")["rollout"]["state"] == "finished", timeout=30)
    eng = engine(daemon, "w")
    assert eng["rollout"]["ok"] is True and eng["surge"] == []


def test_apply_of_a_changed_env_rolls_out_with_generations(daemon: Home) -> None:
    """A changed env rolls out by default (`updated`, with the rollout object), and the
    instances show the engine's wanted generation; `--recreate` replaces them all at once."""
    workers(daemon, "w", 2)
    before = pids(daemon, "w")
    with daemon.client() as c:
        res = c.register(
            {
                "w": {
                    **QUICK,
                    "command": engine_cmd("late.py", "0"),
                    "instances": 2,
                    "env": {"X": "1"},
                }
            }
        )
    [r] = res["engines"]
    assert r["action"] == "updated" and r["rollout"]["ok"] is True, r
    assert r["rollout"]["strategy"] == "rolling" and r["rollout"]["total"] == 2
    eng = engine(daemon, "w")
    assert eng["generation"] == 2
    assert [i["generation"] for i in eng["instances"]] == [2, 2]
    mid = pids(daemon, "w")
    assert all(mid[k] != before[k] for k in before)
    with daemon.client() as c:
        res = c.register(
            {
                "w": {
                    **QUICK,
                    "command": engine_cmd("late.py", "0"),
                    "instances": 2,
                    "env": {"X": "2"},
                }
            },
            recreate=True,
        )
    [r] = res["engines"]
    assert r["rollout"]["strategy"] == "recreate" and r["rollout"]["ok"] is True, r
    assert [i["generation"] for i in engine(daemon, "w")["instances"]] == [3, 3]


# -- 12.3: a failing new version stops the rollout ---------------------------------------------
def test_a_new_version_that_crashes_at_start_stops_the_rollout(daemon: Home) -> None:
    """apply of a command that exits at once: exit 1 with the reason, the old processes keep
    answering (same pids), status says `rollout failed`; applying a good spec goes on."""
    workers(daemon, "w", 2)
    before = pids(daemon, "w")
    bad = daemon.path / "bad.toml"
    bad.write_text(
        f"[engines.w]\ncommand = {json.dumps(engine_cmd('crashing.py', '0', '3'))}\n"
        "instances = 2\n[engines.w.restart]\nstart_seconds = 0.1\n"
    )
    r = daemon.cli("apply", "-f", str(bad))
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "rollout of w stopped" in r.stderr and "exit" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert pids(daemon, "w") == before
    with daemon.client() as c:
        assert c.exec({"x": 1}, engine="w", retries=0)["result"]["pid"] in before.values()
    eng = engine(daemon, "w")
    assert eng["rollout"]["state"] == "failed" and eng["rollout"]["ok"] is False
    assert eng["surge"] == [] and [i["generation"] for i in eng["instances"]] == [1, 1]
    assert "rollout failed" in daemon.cli("status", "w").stdout
    assert [e["kind"] for e in events(daemon, "engine.rollout_failed", engine="w")]
    # A later reload goes on (here: with the same failing spec, it fails again the same way);
    # fixing the file and applying again rolls out.
    r = daemon.cli("reload", "w")
    assert r.returncode == 1 and "rollout of w stopped" in r.stderr, r.stderr
    good = daemon.path / "good.toml"
    good.write_text(
        f"[engines.w]\ncommand = {json.dumps(engine_cmd('late.py', '0'))}\n"
        'instances = 2\nenv = { FIXED = "1" }\n[engines.w.restart]\nstart_seconds = 0.1\n'
    )
    r = daemon.cli("apply", "-f", str(good))
    assert r.returncode == 0, r.stderr
    eng = engine(daemon, "w")
    assert eng["rollout"]["ok"] is True
    assert all(i["generation"] == eng["generation"] for i in eng["instances"])
    assert all(p not in before.values() for p in pids(daemon, "w").values())


def test_a_new_version_never_ready_hits_start_timeout(daemon: Home) -> None:
    """A new process that never says ready is judged at start_seconds + start_timeout: the
    rollout stops, the successor is stopped, the old ones serve."""
    workers(daemon, "w", 2, start_timeout=0.5)
    before = pids(daemon, "w")
    with daemon.client() as c:
        res = c.register(
            {
                "w": {
                    **QUICK,
                    "command": [PY, "-c", "import time; time.sleep(60)"],
                    "instances": 2,
                    "start_timeout": 0.5,
                }
            }
        )
    [r] = res["engines"]
    assert r["rollout"]["ok"] is False
    # The supervisor's start timeout judges it (or the rollout's own bound, whichever first).
    reason = r["rollout"]["reason"]
    assert ("ready" in reason and "within 0.5s" in reason) or "within 0.6s" in reason, r
    assert pids(daemon, "w") == before
    assert engine(daemon, "w")["surge"] == []
    with daemon.client() as c:
        assert c.exec({"x": 1}, engine="w", retries=0)["result"]["pid"] in before.values()
        try:
            c.reload("w")
        except RolloutFailedError as exc:
            assert exc.data is not None and exc.data["ok"] is False
            assert "within 0.5s" in exc.message or "within 0.6s" in exc.message
        else:
            raise AssertionError("reload of a version that never gets ready succeeded")


# -- 12.1: services ----------------------------------------------------------------------------
def test_service_reload_keeps_instances_minus_max_unavailable_up(daemon: Home) -> None:
    """A service of 3 reloaded with `--max-surge 0 --max-unavailable 1` (a fixed port per
    index): never fewer than 2 of its processes run, observed by polling their pids."""
    with daemon.client() as c:
        c.register(
            {
                "svc": {
                    "command": engine_cmd("sleeper.py"),
                    "mode": "service",
                    "instances": 3,
                    # Each step waits 1 s for the new process: the poll (slow on a loaded
                    # machine: it reads every process) has time to look.
                    "restart": {"start_seconds": 1.0},
                }
            }
        )
    for k in range(3):
        daemon.wait_state(f"svc#{k}", "ready")
    before = set(pids(daemon, "svc").values())
    fewest = [3]
    polls = [0]
    stop = threading.Event()

    def poll() -> None:
        # Only svc runs in this home: every engine process of it is one of svc's.
        while not stop.is_set():
            fewest[0] = min(fewest[0], len(home_processes(daemon)))
            polls[0] += 1
            time.sleep(0.01)

    t = threading.Thread(target=poll)
    t.start()
    try:
        r = daemon.cli("reload", "svc", "--max-surge", "0", "--max-unavailable", "1", "--json")
    finally:
        stop.set()
        t.join(10)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True
    assert polls[0] >= 3 and t.is_alive() is False
    assert fewest[0] >= 2
    after = set(pids(daemon, "svc").values())
    assert len(after) == 3 and not after & before


# -- 12.5, edge cases --------------------------------------------------------------------------
def test_reload_bad_input_and_edge_cases(daemon: Home) -> None:
    """Unknown engine: exit 7. Both limits 0: exit 2. A oneshot engine, a stopped engine:
    nothing to replace, exit 0 saying why. A second reload during a rollout: refused (exit 6)."""
    r = daemon.cli("reload", "nope")
    assert r.returncode == 7 and "nope" in r.stderr, r.stderr
    workers(daemon, "w", 1, "1.5")
    r = daemon.cli("reload", "w", "--max-surge", "0", "--max-unavailable", "0")
    assert r.returncode == 2 and "max-surge" in r.stderr, r.stderr
    with daemon.client() as c:
        c.register({"one": {"command": engine_cmd("oneshot_upper.py"), "mode": "oneshot"}})
    r = daemon.cli("reload", "one")
    assert r.returncode == 0 and "nothing to replace" in r.stdout, r.stdout
    assert "oneshot" in r.stdout
    with daemon.client() as c:
        c.register({"off": {"command": engine_cmd("late.py", "0")}}, start=False)
    r = daemon.cli("reload", "off")
    assert r.returncode == 0 and "is stopped" in r.stdout, r.stdout
    with daemon.client() as c:
        assert c.reload("w", wait=False)["state"] == "running"
        with pytest.raises(RolloutInProgressError) as caught:
            c.reload("w")
    assert caught.value.exit_code == 6 and "under way" in caught.value.message
    wait_until(lambda: engine(daemon, "w")["rollout"]["state"] == "finished", timeout=20)
    r = daemon.cli("reload", "w#0", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["replaced"] == ["w#0"]
    r = daemon.cli("reload", "w", "--no-wait")
    assert r.returncode == 0 and "rollout of generation" in r.stdout and "started" in r.stdout
    wait_until(lambda: engine(daemon, "w")["rollout"]["state"] == "finished", timeout=20)


def test_reload_during_a_flood_that_fills_the_queue(home: Home) -> None:
    """With a queue of 4 and 12 clients the queue is full all along: requests beyond it are
    refused `busy` as always, the rollout still finishes, and no admitted request is lost."""
    daemon = home.start_daemon(max_queue=4)
    workers(daemon, "w", 2, "0", "0.05")
    with Load(daemon, threads=12, engine="w") as load:
        r = daemon.cli("reload", "w", "--json")
        assert r.returncode == 0, r.stderr
        load.wait_for(20)
    assert json.loads(r.stdout)["ok"] is True
    busy = [f for f in load.failures if f.startswith("busy:") and "max_queue 4" in f]
    assert busy, "the queue was never full"
    assert [f for f in load.failures if f not in busy] == []


# -- 12.5: the daemon killed mid-rollout ------------------------------------------------------
def test_daemon_killed_mid_rollout_comes_back_with_the_wanted_spec(daemon: Home) -> None:
    """kill -9 of the daemon while a successor warms up: the next daemon stops what the last
    one left, then runs the wanted generation with the wanted count: no duplicates, no
    orphans."""
    workers(daemon, "w", 2, "1.5")
    with daemon.client() as c:
        c.reload("w", wait=False)
    wait_until(lambda: engine(daemon, "w")["surge"])
    pid = daemon.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: daemon.daemon_pid() is None)
    daemon.start_daemon()
    wait_until(
        lambda: [i["state"] for i in engine(daemon, "w")["instances"]] == ["ready", "ready"],
        timeout=20,
    )
    eng = engine(daemon, "w")
    assert eng["generation"] == 2 and eng["surge"] == []
    assert [i["generation"] for i in eng["instances"]] == [2, 2]
    live = {
        p.pid
        for p in wait_until(lambda: len(home_processes(daemon)) == 2 and home_processes(daemon))
    }
    assert live == set(pids(daemon, "w").values())
    assert eng["instances_wanted"] == 2


# -- 12.4: every replacement drains ------------------------------------------------------------
def test_recreate_drains_every_instance_and_loses_no_request(daemon: Home) -> None:
    """`reload --recreate` (and `apply --recreate`) replace every instance at once, but each
    drains first and the requests meanwhile wait for the new processes: 0 fail."""
    workers(daemon, "w", 2, "0", "0.1")
    before = pids(daemon, "w")
    with Load(daemon, engine="w") as load:
        r = daemon.cli("reload", "w", "--recreate", "--json")
        assert r.returncode == 0, r.stderr
        load.wait_for(20)
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["strategy"] == "recreate"
    assert load.failures == []
    after = pids(daemon, "w")
    assert all(after[k] != before[k] for k in before)
    drained = events(daemon, "instance.draining", engine="w")
    assert {e["instance"] for e in drained} >= {"w#0", "w#1"}


# -- 12.5: progress ----------------------------------------------------------------------------
def test_reload_prints_a_progress_line_per_step_on_a_terminal(daemon: Home) -> None:
    """On a terminal `reload` prints the rollout's start, one line per replaced instance with
    the old and new pid, then the summary."""
    import pexpect

    workers(daemon, "w", 2)
    child = pexpect.spawn(
        PY, ["-m", "engctl", "reload", "w"], env=daemon.env, dimensions=(24, 120),
        encoding="utf-8",
    )  # fmt: skip
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    text = str(child.before)
    assert child.exitstatus == 0, text
    assert "rolling out generation 2" in text, text
    assert "[1/2]" in text and "[2/2]" in text and "pid" in text, text
    assert "generation 2 rolled out: 2 replaced" in text, text


def interrupted(daemon: Home, args: list[str]) -> str:
    """Run `engctl ARGS` on a terminal, Ctrl-C once a rollout of `w` is under way; its output
    (exit 130, no traceback)."""
    import pexpect

    child = pexpect.spawn(
        PY, ["-m", "engctl", *args], env=daemon.env, dimensions=(24, 120), encoding="utf-8"
    )
    wait_until(lambda: engine(daemon, "w")["surge"], 30)
    child.sendcontrol("c")
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    text = str(child.before)
    assert child.exitstatus == 130, text
    assert "Traceback" not in text
    return text


def test_ctrl_c_of_a_waiting_reload_leaves_the_rollout_going_on_and_says_so(
    daemon: Home,
) -> None:
    """Ctrl-C while `reload` waits: exit 130 with one line saying the rollout goes on in the
    daemon, no traceback; the daemon finishes the rollout (every slot replaced)."""
    workers(daemon, "w", 2, "1.5")
    before = pids(daemon, "w")
    text = interrupted(daemon, ["reload", "w"])
    note = "interrupted: only the waiting stopped; the rollout of w (if it started) goes on"
    assert note in text
    wait_until(lambda: events(daemon, "engine.rollout_finished", engine="w"), 60)
    after = pids(daemon, "w")
    assert all(after[k] != before[k] for k in before)
    assert [i["generation"] for i in engine(daemon, "w")["instances"]] == [2, 2]


def test_reload_timeout_takes_a_duration_like_ttl_and_for(daemon: Home) -> None:
    """`reload --timeout 500ms|1s` is a duration as `lease --ttl` and `prewarm --for` are: a
    new version slower than it stops the rollout (exit 1); `--timeout soon` is one usage
    line (exit 2) and starts nothing."""
    workers(daemon, "w", 1, "4")
    bad = daemon.cli("reload", "w", "--timeout", "soon")
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.startswith("engctl: error: --timeout 'soon': expected a duration")
    assert bad.stderr.count("\n") == 1
    assert engine(daemon, "w")["generation"] == 1
    r = daemon.cli("reload", "w", "--timeout", "1s")
    assert r.returncode == 1, r.stderr
    assert engine(daemon, "w")["rollout"]["state"] == "failed"
    assert [i["generation"] for i in engine(daemon, "w")["instances"]] == [1]


def test_ctrl_c_of_an_apply_that_rolls_out_says_the_new_spec_stays_and_rolls_on(
    daemon: Home, tmp_path: Any
) -> None:
    """Ctrl-C while `apply` waits for its rollout: exit 130 with one line saying the
    registration is done and its rollout goes on; the daemon finishes it (new env everywhere)."""
    workers(daemon, "w", 2, "1.5")
    cmd = ", ".join(json.dumps(part) for part in engine_cmd("late.py", "1.5"))
    path = tmp_path / "w.toml"
    path.write_text(
        f"[engines.w]\ncommand = [{cmd}]\ninstances = 2\n"
        'env = { X = "2" }\n[engines.w.restart]\nstart_seconds = 0.1\n'
    )
    text = interrupted(daemon, ["apply", "-f", str(path)])
    note = "interrupted: only the waiting stopped; what the daemon received is registered"
    assert note in text
    wait_until(lambda: events(daemon, "engine.rollout_finished", engine="w"), 60)
    assert [i["generation"] for i in engine(daemon, "w")["instances"]] == [2, 2]


def test_daemon_stop_answers_a_waiting_reload_that_its_rollout_stopped(daemon: Home) -> None:
    """`daemon stop` while a `reload` waits: the rollout stops and the waiting caller gets
    that answer (RolloutFailedError, "the daemon is shutting down"), not a closed connection;
    no process is left."""
    workers(daemon, "w", 1, "2")  # each new process takes 2 s to get ready
    outcome: list[object] = []

    def waiting_reload() -> None:
        with daemon.client(timeout=30) as c:
            try:
                outcome.append(c.reload("w"))
            except BaseException as exc:
                outcome.append(exc)

    t = threading.Thread(target=waiting_reload)
    t.start()
    try:
        wait_until(lambda: engine(daemon, "w")["surge"] != [])
        procs = home_processes(daemon)
        r = daemon.cli("daemon", "stop")
        assert r.returncode == 0, r.stderr
    finally:
        t.join(30)
    assert len(outcome) == 1 and isinstance(outcome[0], RolloutFailedError), outcome
    assert "the daemon is shutting down" in str(outcome[0])
    wait_until(lambda: not any(p.is_running() and p.status() != "zombie" for p in procs))
