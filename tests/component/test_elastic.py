"""Elastic pools and leases with real workers (issue 14): scale from zero on a request, grow
to max under a burst with every request answered, reclaim idle instances after idle_timeout
(draining first), keep a warm pool, prewarm for a while, reclaim under memory pressure; leases
that keep other requests off their instance, expire, end with it or with the daemon."""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import pytest

from engctl.errors import EXIT_LEASE, EXIT_USAGE, BusyError, LeaseError
from tests.conftest import Home, engine_cmd, wait_until

QUICK: dict[str, Any] = {"restart": {"start_seconds": 0.0}, "stop": {"timeout": 5.0}}


def register_pool(home: Home, name: str = "pool", script: str = "slow.py", **scale: Any) -> None:
    """An autoscaled worker engine of type `pool` (slow.py answers after 0.2 s by default)."""
    with home.client() as c:
        c.register(
            {
                name: {
                    "command": engine_cmd(script),
                    "type": "pool",
                    **QUICK,
                    "scale": {"idle_timeout": 60.0, **scale},
                }
            }
        )


def engine(home: Home, name: str = "pool") -> dict[str, Any]:
    for e in home.status()["engines"]:
        if e["name"] == name:
            return cast("dict[str, Any]", e)
    raise KeyError(name)


def scale_of(home: Home, name: str = "pool") -> dict[str, Any]:
    return cast("dict[str, Any]", engine(home, name)["scale"])


def events(home: Home, kind: str, name: str = "pool") -> list[dict[str, Any]]:
    with home.client() as c:
        found = c.events(engine=name, limit=10_000)
    return [cast("dict[str, Any]", e) for e in found if e["kind"] == kind]


def ready_count(home: Home, name: str = "pool") -> int:
    return sum(1 for i in engine(home, name)["instances"] if i["state"] in ("ready", "busy"))


def run_requests(home: Home, n: int, window: int, **options: Any) -> list[dict[str, Any]]:
    with home.client(timeout=120) as c:
        return [
            cast("dict[str, Any]", obj)
            for obj in c.exec_many(range(n), window=window, timeout=60, **options)
        ]


# -- autoscaling -------------------------------------------------------------------------------
def test_a_request_to_an_engine_scaled_to_zero_starts_an_instance_and_is_answered(
    daemon: Home,
) -> None:
    """min = 0: no process until a request comes; it waits for the cold start and is
    answered, and the decision is an event with its reason."""
    register_pool(daemon, script="echo.py", min=0, max=2, target=1.0)
    pool = engine(daemon)
    assert pool["instances"] == [] and pool["scale"]["wanted"] == 0
    with daemon.client() as c:
        result = c.exec({"x": 1}, type="pool", timeout=30)
    assert result["ok"] and result["instance"] == "pool#0"
    assert result["result"] == {"echo": {"x": 1}}
    (decision,) = events(daemon, "engine.autoscaled")
    assert decision["reason"] == "scale 0 -> 1: 1 request waiting, 0/0 slots busy"
    assert decision["data"]["cause"] == "burst"
    assert scale_of(daemon)["last_decision"]["reason"] == decision["reason"]


def test_a_burst_of_20_concurrent_requests_grows_to_max_and_all_are_answered(
    daemon: Home,
) -> None:
    register_pool(daemon, min=1, max=4)
    wait_until(lambda: ready_count(daemon) == 1, 30)
    results = run_requests(daemon, 20, window=20, type="pool")
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]]
    assert len({r["instance"] for r in results}) == 4
    sc = scale_of(daemon)
    assert sc["wanted"] == 4
    grown = events(daemon, "engine.autoscaled")
    assert grown and all(e["data"]["to"] <= 4 for e in grown)
    # However many were waiting when the first decision came (one, on a loaded machine).
    assert re.search(r"\d+ requests? waiting", grown[0]["reason"]), grown[0]["reason"]


def test_idle_instances_are_reclaimed_after_idle_timeout_draining_first_losing_none(
    daemon: Home,
) -> None:
    """After the burst, the surplus goes once idle_timeout has passed, the highest instances
    first, each drained before it stops; a trickle of requests meanwhile all succeed."""
    register_pool(daemon, min=1, max=3, idle_timeout=1.0, target=1.0)
    run_requests(daemon, 9, window=9, type="pool")
    assert scale_of(daemon)["wanted"] == 3
    failures: list[dict[str, Any]] = []
    done = threading.Event()

    def trickle() -> None:
        with daemon.client(timeout=120) as c:
            while not done.is_set():
                obj = next(c.exec_many([{"delay": 0.01}], type="pool", timeout=30))
                if not obj["ok"]:
                    failures.append(cast("dict[str, Any]", obj))

    thread = threading.Thread(target=trickle)
    thread.start()
    try:
        wait_until(lambda: scale_of(daemon)["wanted"] == 1, 30)
    finally:
        done.set()
        thread.join()
    assert failures == []
    idle = [e for e in events(daemon, "engine.autoscaled") if e["data"]["cause"] == "idle"]
    assert idle and "idle_timeout 1s" in idle[0]["reason"]
    with daemon.client() as c:
        log = [e for e in c.events(engine="pool", limit=10_000) if e["instance"] == "pool#2"]
    kinds = [(e["kind"], e["to"]) for e in log]
    assert kinds.index(("instance.draining", None)) < kinds.index(("instance.state", "stopping"))
    with daemon.client() as c:
        counts = c.status(["pool"])["engines"][0]["instances"][0]["requests"]
    assert counts["lost"] == 0


def test_the_warm_pool_keeps_min_idle_spares_ready(daemon: Home) -> None:
    """min_idle = 1: one idle instance waits; when a request holds it, another starts."""
    register_pool(daemon, min=0, min_idle=1, max=3)
    wait_until(lambda: scale_of(daemon)["idle"] == 1, 30)
    holder = threading.Thread(target=_exec_slow, args=(daemon, 3.0))
    holder.start()
    try:
        sc = wait_until(lambda: (s := scale_of(daemon))["busy"] == 1 and s["idle"] == 1 and s, 30)
        assert sc["wanted"] == 2
    finally:
        holder.join()
    warm = [e for e in events(daemon, "engine.autoscaled") if e["data"]["cause"] == "floor"]
    assert any("min_idle 1" in e["reason"] for e in warm)


def _exec_slow(home: Home, seconds: float) -> None:
    with home.client(timeout=60) as c:
        c.exec({"delay": seconds}, type="pool", timeout=30)


def test_prewarm_raises_the_floor_for_a_while_with_events_at_both_ends(daemon: Home) -> None:
    register_pool(daemon, script="echo.py", min=0, max=4, idle_timeout=0.5)
    result = daemon.cli("prewarm", "pool", "3", "--for", "1.5s", "--json")
    assert result.returncode == 0, result.stderr
    wait_until(lambda: ready_count(daemon) == 3, 30)
    assert events(daemon, "engine.prewarmed")[0]["reason"].startswith("floor raised to 3")
    wait_until(lambda: events(daemon, "engine.prewarm_ended"), 30)
    wait_until(lambda: scale_of(daemon)["wanted"] == 0, 30)


def test_prewarm_without_for_holds_until_ended_by_hand(daemon: Home) -> None:
    register_pool(daemon, script="echo.py", min=0, max=4, idle_timeout=0.3)
    with daemon.client() as c:
        c.prewarm("pool", 2)
    wait_until(lambda: ready_count(daemon) == 2, 30)
    time.sleep(1.0)  # several idle_timeouts: nothing goes while the prewarm holds
    assert scale_of(daemon)["wanted"] == 2
    assert scale_of(daemon)["prewarm"] == {"instances": 2, "until": None}
    with daemon.client() as c:
        c.prewarm("pool", 0)
    wait_until(lambda: scale_of(daemon)["wanted"] == 0, 30)
    assert "ended by hand" in events(daemon, "engine.prewarm_ended")[0]["reason"]


def test_memory_pressure_reclaims_idle_instances_down_to_min(home: Home) -> None:
    """With min_available_memory above what the host has free, idle instances of an
    autoscaled engine go at once (no idle_timeout), down to min, with an event that names
    them and their RSS."""
    home.start_daemon(scale={"min_available_memory": "1000000GiB"})
    register_pool(home, min=1, max=3, idle_timeout=3600.0)
    results = run_requests(home, 6, window=6, type="pool")
    assert all(r["ok"] for r in results)
    wait_until(lambda: scale_of(home)["wanted"] == 1, 30)
    reclaimed = wait_until(lambda: events(home, "engine.reclaimed"), 10)
    assert "below min_available_memory" in reclaimed[0]["reason"]
    assert "RSS" in reclaimed[0]["reason"] and reclaimed[0]["data"]["reclaimed"]


def test_scale_on_an_autoscaled_engine_sets_min_and_says_so(daemon: Home) -> None:
    register_pool(daemon, script="echo.py", min=0, max=3)
    result = daemon.cli("scale", "pool", "2")
    assert result.returncode == 0, result.stderr
    assert "autoscaled: scale.min set to 2 (was 0)" in result.stdout
    wait_until(lambda: ready_count(daemon) == 2, 30)
    with daemon.client() as c:
        exported = c.call("engine.export", names=["pool"])
    assert exported["engines"]["pool"]["scale"]["min"] == 2
    status = daemon.cli("status", "pool")
    assert "pool: autoscaled 2..3; wanted 2, ready 2" in status.stdout


def test_reload_of_an_engine_scaled_to_zero_says_it_has_no_instance(daemon: Home) -> None:
    register_pool(daemon, script="echo.py", min=0, max=2)
    r = daemon.cli("reload", "pool")
    assert r.returncode == 0, r.stderr
    assert r.stdout == (
        "pool: nothing to replace: pool has no instance (scaled to zero): its next one runs"
        " generation 1\n"
    )
    assert engine(daemon)["instances"] == []


def test_a_scale_up_after_a_failed_rollout_starts_the_generation_still_serving(
    daemon: Home,
) -> None:
    """A rollout of a version that crashes at start fails, and the old process keeps serving;
    a burst then grows the engine with that old generation (not the version that just failed),
    so every request is answered; a later good spec rolls out over every slot."""
    register_pool(daemon, min=1, max=3, target=1.0)
    wait_until(lambda: ready_count(daemon) == 1, 30)
    broken = {"command": engine_cmd("crashing.py"), "type": "pool", **QUICK, "scale": {
        "min": 1, "max": 3, "target": 1.0, "idle_timeout": 60.0}}  # fmt: skip
    with daemon.client() as c:
        [result] = c.register({"pool": broken})["engines"]
    assert result["rollout"]["ok"] is False, result
    assert "the new process failed" in result["rollout"]["reason"]
    assert engine(daemon)["rollout"]["state"] == "failed"
    answers = run_requests(daemon, 24, 6, type="pool")
    assert all(r["ok"] for r in answers), [r for r in answers if not r["ok"]][:2]
    pool = engine(daemon)
    assert len(pool["instances"]) == 3
    assert [i["generation"] for i in pool["instances"]] == [1, 1, 1]
    assert [i["state"] for i in pool["instances"]] == ["ready"] * 3
    assert len({r["instance"] for r in answers}) > 1
    register_pool(daemon, script="echo.py", min=1, max=3, target=1.0)
    wait_until(lambda: engine(daemon)["rollout"]["state"] == "finished", 30)
    assert [i["generation"] for i in engine(daemon)["instances"]] == [3, 3, 3]


def test_a_burst_held_back_by_the_engines_max_in_flight_does_not_grow_it(daemon: Home) -> None:
    """`[limits] max_in_flight = 2` on an engine of 2 slots per instance: a burst of 12 waits
    for admission, not for instances, so the engine stays at 1 (every request answered)."""
    with daemon.client() as c:
        c.register(
            {
                "pool": {
                    "command": engine_cmd("slow.py", "0.2"),
                    "type": "pool",
                    "max_concurrency": 2,
                    **QUICK,
                    "limits": {"max_in_flight": 2},
                    "scale": {"min": 1, "max": 4, "target": 1.0, "idle_timeout": 60.0},
                }
            }
        )
    wait_until(lambda: ready_count(daemon) == 1, 30)
    answers = run_requests(daemon, 12, 12, type="pool")
    assert all(r["ok"] for r in answers)
    assert events(daemon, "engine.autoscaled") == []
    assert len(engine(daemon)["instances"]) == 1


def test_a_burst_held_back_by_the_engines_rate_does_not_grow_it(daemon: Home) -> None:
    """`[limits] rate = "4/s"`, burst 1, on an engine whose requests take 50 ms: a burst of 10
    waits for tokens, not for instances, so the engine stays at 1 (every request answered)."""
    with daemon.client() as c:
        c.register(
            {
                "pool": {
                    "command": engine_cmd("slow.py", "0.05"),
                    "type": "pool",
                    **QUICK,
                    "limits": {"rate": "4/s", "burst": 1},
                    "scale": {"min": 1, "max": 4, "target": 1.0, "idle_timeout": 60.0},
                }
            }
        )
    wait_until(lambda: ready_count(daemon) == 1, 30)
    answers = run_requests(daemon, 10, 10, type="pool")
    assert all(r["ok"] for r in answers)
    assert events(daemon, "engine.autoscaled") == []
    assert len(engine(daemon)["instances"]) == 1


# -- leases ------------------------------------------------------------------------------------
@pytest.fixture
def pair(daemon: Home) -> Iterator[Home]:
    """Two fixed instances of type `pool` (slow.py, 20 ms per request), ready."""
    with daemon.client() as c:
        c.register(
            {
                "pair": {
                    "command": engine_cmd("slow.py", "0.02"),
                    "type": "pool",
                    "instances": 2,
                    **QUICK,
                }
            }
        )
    wait_until(lambda: ready_count(daemon, "pair") == 2, 30)
    yield daemon


def test_a_leased_instance_takes_only_its_lease_requests_under_concurrent_load(
    pair: Home,
) -> None:
    with pair.client() as c:
        lease = c.lease_acquire(type="pool", ttl=60, holder="job-17")
    leased = lease["instance"]
    assert lease["lease"].startswith("L-") and lease["holder"] == "job-17"
    others: list[dict[str, Any]] = []
    mine: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda: others.extend(run_requests(pair, 40, 8, type="pool"))),
        threading.Thread(
            target=lambda: mine.extend(run_requests(pair, 15, 3, lease=lease["lease"]))
        ),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r["ok"] for r in others + mine)
    assert {r["instance"] for r in mine} == {leased}
    assert leased not in {r["instance"] for r in others}
    inst = pair.instance(leased)
    assert inst["lease"]["lease"] == lease["lease"]
    listed = pair.cli("lease", "list", "--json")
    assert f'"lease":"{lease["lease"]}"' in listed.stdout.replace(" ", "")


def test_a_rolling_reload_moves_a_lease_to_its_slots_new_process(pair: Home) -> None:
    """`reload` of an engine with a leased instance: the successor takes the slot and its
    lease, so the holder's requests (before, during and after) all run on that slot, no
    other request runs there, the lease is never ended, and it now runs the new process."""
    with pair.client() as c:
        lease = c.lease_acquire(engine="pair", ttl=120, holder="job-9")
    leased = lease["instance"]
    old_pid = pair.instance(leased)["pid"]
    others: list[dict[str, Any]] = []
    mine: list[dict[str, Any]] = []
    threads = [
        threading.Thread(target=lambda: others.extend(run_requests(pair, 60, 4, type="pool"))),
        threading.Thread(
            target=lambda: mine.extend(run_requests(pair, 30, 1, lease=lease["lease"]))
        ),
    ]
    for t in threads:
        t.start()
    reload = pair.cli("reload", "pair")
    for t in threads:
        t.join()
    assert reload.returncode == 0, reload.stderr
    assert all(r["ok"] for r in others + mine), [r for r in others + mine if not r["ok"]]
    assert {r["instance"] for r in mine} == {leased}
    assert leased not in {r["instance"] for r in others}
    inst = pair.instance(leased)
    assert inst["pid"] != old_pid and inst["generation"] == 2
    assert inst["lease"]["lease"] == lease["lease"]
    assert events(pair, "lease.ended", "pair") == []
    with pair.client() as c:
        after = c.exec({"after": True}, lease=lease["lease"])
        c.lease_renew(lease["lease"])
    assert after["ok"] and after["instance"] == leased
    assert after["result"]["pid"] == inst["pid"]


def test_an_expired_lease_is_freed_with_an_event_and_its_holder_told(pair: Home) -> None:
    with pair.client() as c:
        lease = c.lease_acquire(engine="pair", ttl=0.5)
    expired = wait_until(lambda: events(pair, "lease.expired", "pair"), 10)
    assert lease["lease"] in expired[0]["reason"]
    assert pair.instance(lease["instance"])["lease"] is None
    with pair.client() as c, pytest.raises(LeaseError, match="is not held: it expired at"):
        c.exec(1, lease=lease["lease"])
    renewed = pair.cli("lease", "renew", lease["lease"])
    assert renewed.returncode == EXIT_LEASE
    assert renewed.stderr.startswith(f"engctl: error: lease {lease['lease']} is not held")
    # back in the pool: both instances take requests again
    assert len({r["instance"] for r in run_requests(pair, 20, 4, type="pool")}) == 2


def test_a_released_lease_returns_its_instance_and_a_second_release_fails(pair: Home) -> None:
    acquired = pair.cli("lease", "acquire", "--engine", "pair", "--ttl", "30s", "--json")
    assert acquired.returncode == 0, acquired.stderr
    lease_id = acquired.stdout.split('"lease":')[1].split('"')[1]
    first = pair.cli("lease", "release", lease_id)
    assert first.returncode == 0 and first.stdout.startswith(f"released {lease_id}")
    second = pair.cli("lease", "release", lease_id)
    assert second.returncode == EXIT_LEASE
    assert "was released at" in second.stderr and second.stderr.count("\n") == 1
    assert events(pair, "lease.released", "pair")


def test_the_lease_of_an_instance_that_dies_ends_and_its_requests_fail(pair: Home) -> None:
    with pair.client() as c:
        lease = c.lease_acquire(engine="pair", ttl=60)
    pid = pair.instance(lease["instance"])["pid"]
    os.kill(pid, signal.SIGKILL)
    ended = wait_until(lambda: events(pair, "lease.ended", "pair"), 10)
    assert lease["instance"] in ended[0]["reason"]
    with pair.client() as c, pytest.raises(LeaseError, match="is not held: it ended at"):
        c.exec(1, lease=lease["lease"])


def test_a_daemon_restart_ends_every_lease(pair: Home) -> None:
    with pair.client() as c:
        lease = c.lease_acquire(engine="pair", ttl=600)
    assert pair.cli("daemon", "stop").returncode == 0
    pair.start_daemon()
    result = pair.cli("exec", "--lease", lease["lease"], "--", "1")
    assert result.returncode == EXIT_LEASE
    assert "granted by an earlier daemon: a daemon restart ends every lease" in result.stderr


def test_a_lease_creates_an_instance_when_none_is_idle_and_the_engine_may_grow(
    daemon: Home,
) -> None:
    register_pool(daemon, script="echo.py", min=1, max=2)
    wait_until(lambda: ready_count(daemon) == 1, 30)
    with daemon.client() as c:
        first = c.lease_acquire(type="pool", ttl=60)
        second = c.lease_acquire(type="pool", ttl=60, holder="job-2")
        assert {first["instance"], second["instance"]} == {"pool#0", "pool#1"}
        with pytest.raises(Exception, match="no idle instance to lease"):
            c.lease_acquire(type="pool", ttl=60, wait=0.2)
    grown = [e for e in events(daemon, "engine.autoscaled") if e["data"]["cause"] == "lease"]
    assert grown and "a lease (job-2) found no idle instance" in grown[0]["reason"]


def test_a_waiting_lease_acquire_grows_the_engine_once_its_rollout_ends(daemon: Home) -> None:
    """An autoscaled engine under a rollout adds no instance: a lease without --wait is told
    why (not "at scale.max"); one with --wait gets a new instance once the rollout ends."""
    with daemon.client() as c:
        c.register(
            {
                "pool": {
                    "command": engine_cmd("late.py", "1.5"),
                    "type": "pool",
                    **QUICK,
                    "scale": {"min": 1, "max": 3, "idle_timeout": 60.0},
                }
            }
        )
    wait_until(lambda: ready_count(daemon) == 1, 30)
    with daemon.client() as c:
        first = c.lease_acquire(type="pool", ttl=60)
        assert c.reload("pool", wait=False)["state"] == "running"
        with pytest.raises(BusyError, match="pool is rolling out") as caught:
            c.lease_acquire(type="pool", ttl=60)
        assert "scale.max" not in caught.value.message
    with daemon.client(timeout=60) as c:
        second = c.lease_acquire(type="pool", ttl=60, wait=30)
    assert engine(daemon)["rollout"]["state"] == "finished"
    assert first["instance"] == "pool#0" and second["instance"] == "pool#1"
    grown = [e for e in events(daemon, "engine.autoscaled") if e["data"]["cause"] == "lease"]
    assert len(grown) == 1
    with daemon.client() as c:
        assert {lease["lease"] for lease in c.leases()} == {
            first["lease"],
            second["lease"],
        }


def test_a_lease_acquire_with_wait_gets_the_instance_another_lease_releases(pair: Home) -> None:
    """With every instance leased, `--wait` waits for one to be released and takes it."""
    with pair.client() as c:
        first = c.lease_acquire(engine="pair", ttl=60)
        second = c.lease_acquire(engine="pair", ttl=60)
        with pytest.raises(Exception, match="no idle instance to lease"):
            c.lease_acquire(engine="pair", ttl=60)
    got: list[dict[str, Any]] = []
    asking = threading.Event()

    def waiter() -> None:
        with pair.client(timeout=60) as c:
            c.connect()
            asking.set()
            got.append(cast("dict[str, Any]", c.lease_acquire(engine="pair", ttl=60, wait=30)))

    thread = threading.Thread(target=waiter)
    thread.start()
    try:
        assert asking.wait(10)
        with pair.client() as c:
            c.lease_release(second["lease"])
    finally:
        thread.join()
    assert got and got[0]["instance"] == second["instance"]
    assert got[0]["lease"] not in (first["lease"], second["lease"])


def test_a_lease_ttl_above_max_lease_ttl_is_capped_and_said(home: Home) -> None:
    """`[daemon] max_lease_ttl` caps the ttl asked; the command says so on stderr."""
    home.start_daemon(max_lease_ttl=5.0)
    with home.client() as c:
        c.register({"pair": {"command": engine_cmd("echo.py"), "type": "pool", **QUICK}})
    wait_until(lambda: ready_count(home, "pair") == 1, 30)
    result = home.cli("lease", "acquire", "--engine", "pair", "--ttl", "1h", "--json")
    assert result.returncode == 0, result.stderr
    assert "ttl 3600s capped to 5s (max_lease_ttl in config.toml)" in result.stderr
    with home.client() as c:
        (held,) = c.leases()
    assert held["ttl"] == 5.0


def test_client_lease_renews_while_held_and_releases_at_the_end(pair: Home) -> None:
    with pair.client() as c:
        with c.lease(engine="pair", ttl=0.6, holder="ctx") as held:
            for _ in range(6):
                assert held.exec({"delay": 0.2})["instance"] == held.instance
        assert held.error is None
        assert c.leases() == []
    assert events(pair, "lease.released", "pair") and not events(pair, "lease.expired", "pair")


# -- bad input: one line, a documented code, nothing changed ------------------------------------
def test_bad_elastic_input_is_one_line_with_its_exit_code_and_changes_nothing(
    pair: Home, tmp_path: Any
) -> None:
    register_pool(pair, script="echo.py", min=0, max=2)
    before = pair.status()
    bad_file = tmp_path / "bad.toml"
    bad_file.write_text('[engines.x]\ncommand = ["x"]\n[engines.x.scale]\nmin = 3\nmax = 2\n')
    cases = [
        (("register", "-f", str(bad_file)), EXIT_USAGE, "engines.x.scale.min: 3 is above"),
        (("prewarm", "pool", "3"), EXIT_USAGE, "prewarm: 3 instances is above scale.max 2"),
        (("prewarm", "pair", "1"), EXIT_USAGE, "has no [engines.pair.scale] table"),
        (("scale", "pool", "5"), EXIT_USAGE, "scale.min: 5 is above scale.max 2"),
        (
            ("lease", "acquire", "--type", "onnx", "--engine", "pair"),
            EXIT_USAGE,
            "--type onnx: engine 'pair' is of type 'pool'",
        ),
        (("lease", "renew", "L-000000-1"), EXIT_LEASE, "granted by an earlier daemon"),
        (("prewarm", "pool", "1", "--for", "soon"), EXIT_USAGE, "--for 'soon': expected"),
    ]
    for args, code, message in cases:
        result = pair.cli(*args)
        assert result.returncode == code, (args, result.stderr)
        assert message in result.stderr, (args, result.stderr)
        assert result.stderr.count("\n") == 1, result.stderr
    with pair.client() as c:
        lease = c.lease_acquire(engine="pair", ttl=60)
    contradiction = pair.cli("exec", "--lease", lease["lease"], "--type", "other", "--", "1")
    assert contradiction.returncode == EXIT_USAGE
    assert f"--type other contradicts lease {lease['lease']}" in contradiction.stderr
    after = pair.status()
    names = [e["name"] for e in after["engines"]]
    assert names == [e["name"] for e in before["engines"]]
    assert scale_of(pair)["min"] == 0
