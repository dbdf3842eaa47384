"""Rolling reload benchmark (issue 12): prints one JSON object with every figure and its target.

Run: `python benchmarks/reload.py [--quick] [--seconds 30] [--rate 500] [--strategy both]`.
4 echo worker instances take a steady load (8 client threads, `retries=0`, ~`--rate`
requests/s in all) for `--seconds`, and three changes run during it: `reload`, `apply` of a
changed env, and `scale 4 -> 2 -> 4`. Each strategy (`rolling`, the default path, and
`recreate`, the old stop-all-then-start) runs the same scenario against a fresh daemon in a
temporary ENGCTL_HOME. Targets: 0 failed requests; p99 latency during the reload <= 3x the p99
before it; the reload of 4 instances within 4 x (the worker's start-to-ready time + 0.2 s).
Before the changes, `bare_starts` measures the machine's floor: the same four worker starts
made by another process, no daemon involved (a rollout starts as many processes; on two
cores their start-up alone lifts the p99 of requests in flight).
`--quick`: a few seconds per strategy, every figure, rough (what CI runs so it cannot rot).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from common import (
    all_ready,
    exit_cleanly_on_sigterm,
    machine_info,
    source_state,
    stop_daemon,
    wait_for,
)

from engctl.client import Client
from engctl.errors import EngctlError

PY = sys.executable
NAME = "echo"
INSTANCES = 4
THREADS = 8


# Starts INSTANCES processes of the argv it is given one after another, as a rollout does,
# once its stdin closes (after it has said it is up: its own start is not in the window).
BARE_STARTS = f"""
import subprocess, sys, time
print(flush=True)
sys.stdin.read()
for _ in range({INSTANCES}):
    p = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    p.stdout.readline()
    time.sleep(0.1)
    p.stdin.close()
    p.wait()
    p.stdout.close()
"""


def spec(env: dict[str, str] | None = None) -> dict[str, Any]:
    """The echo worker engine (engctl's own example worker)."""
    out: dict[str, Any] = {
        "command": [PY, "-m", "engctl.examples.echo_worker"],
        "instances": INSTANCES,
        "restart": {"start_seconds": 0.1},
    }
    if env:
        out["env"] = env
    return out


class Load:
    """`THREADS` client threads pacing `rate` requests/s in all; every request's send time,
    latency and outcome is kept."""

    def __init__(self, home: str, rate: float) -> None:
        self.home = home
        self.period = THREADS / rate
        self.samples: list[tuple[float, float, str | None]] = []  # (sent, latency s, error)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(THREADS)]

    def _run(self) -> None:
        mine: list[tuple[float, float, str | None]] = []
        with Client(self.home) as c:
            c.connect()
            nxt = time.perf_counter()
            while not self._stop.is_set():
                t0 = time.perf_counter()
                error = None
                try:
                    c.exec({"x": 1}, engine=NAME, retries=0, timeout=30.0)
                except EngctlError as exc:
                    error = exc.message
                mine.append((t0, time.perf_counter() - t0, error))
                nxt += self.period
                pause = nxt - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                else:
                    nxt = time.perf_counter()  # behind: do not burst to catch up
        with self._lock:
            self.samples.extend(mine)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def window(self, t0: float, t1: float) -> list[tuple[float, float, str | None]]:
        return [s for s in self.samples if t0 <= s[0] < t1]


def p99_ms(samples: list[tuple[float, float, str | None]]) -> float | None:
    lat = sorted(s[1] for s in samples if s[2] is None)
    if len(lat) < 2:
        return None
    return round(statistics.quantiles(lat, n=100)[98] * 1000, 2)


def start_to_ready(c: Client, runs: int) -> float:
    """Median seconds from an echo worker's spawn to its `ready` (the daemon's events)."""
    c.register({"probe": {**spec(), "instances": 1}}, start=False)
    times = []
    for _ in range(runs):
        c.start(["probe"])
        wait_for(lambda: all_ready(c, "probe", 1))
        evs = c.events(engine="probe", limit=50)
        spawned = [e["at"] for e in evs if e["kind"] == "instance.spawned"][-1]
        ready = [e["at"] for e in evs if e["kind"] == "instance.state" and e["to"] == "ready"][-1]
        times.append(ready - spawned)
        c.stop(["probe"])
    c.unregister(["probe"])
    return statistics.median(times)


def scenario(strategy: str, seconds: float, rate: float, quick: bool) -> dict[str, Any]:
    """One run of the scenario with `strategy` against a fresh daemon."""
    home = tempfile.mkdtemp(prefix="ebreload", dir="/tmp")
    recreate = strategy == "recreate"
    c = Client(home)
    daemon_pid = None
    out: dict[str, Any] = {"strategy": strategy}
    try:
        c.connect()
        daemon_pid = c.daemon_info["pid"]
        ready_s = start_to_ready(c, 2 if quick else 5)
        c.register({NAME: spec()})
        wait_for(lambda: all_ready(c, NAME, INSTANCES))
        load = Load(home, rate)
        t_begin = time.perf_counter()
        load.start()
        # A quarter of the time for the figures before any change; the changes follow one
        # another with a pause between; the load runs until `seconds` are over.
        time.sleep(seconds / 4)
        pause = seconds / 10
        changes: dict[str, tuple[float, float]] = {}

        # The machine's floor: the same four worker starts, made by another process with no
        # daemon involved (each started, ready, kept 0.1 s, ended, as a rollout's steps).
        starter = subprocess.Popen(
            [PY, "-c", BARE_STARTS, *spec()["command"]],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert starter.stdin is not None and starter.stdout is not None
        starter.stdout.readline()  # its own start-up is over: the window opens now
        t = time.perf_counter()
        starter.stdin.close()
        starter.stdout.read()
        starter.wait(60)
        starter.stdout.close()
        changes["bare_starts"] = (t, time.perf_counter())
        time.sleep(pause)

        t = time.perf_counter()
        reload = c.reload(NAME, recreate=recreate)
        changes["reload"] = (t, time.perf_counter())
        time.sleep(pause)

        t = time.perf_counter()
        res = c.apply({NAME: spec({"BENCH": "1"})}, recreate=recreate)
        changes["apply_env"] = (t, time.perf_counter())
        time.sleep(pause)

        t = time.perf_counter()
        c.scale(NAME, 2)
        c.scale(NAME, INSTANCES)
        wait_for(lambda: all_ready(c, NAME, INSTANCES))
        changes["scale_4_2_4"] = (t, time.perf_counter())

        left = t_begin + seconds - time.perf_counter()
        if left > 0:
            time.sleep(left)
        load.stop()
        t_end = time.perf_counter()

        samples = load.samples
        failures = [s[2] for s in samples if s[2] is not None]
        before = load.window(t_begin, changes["bare_starts"][0])
        p99_before = p99_ms(before)
        per_change = {}
        for name, (a, b) in changes.items():
            win = load.window(a, b)
            p99 = p99_ms(win)
            per_change[name] = {
                "seconds": round(b - a, 3),
                "requests": len(win),
                "failed": sum(1 for s in win if s[2] is not None),
                "p99_ms": p99,
                "p99_ratio": None if p99 is None or not p99_before else round(p99 / p99_before, 2),
            }
        reload_s = changes["reload"][1] - changes["reload"][0]
        reload_limit = INSTANCES * (ready_s + 0.2)
        p99_reload = per_change["reload"]["p99_ms"]
        out.update(
            {
                "requests": len(samples),
                "failed": len(failures),
                "failure_samples": sorted(set(failures))[:5],
                "rate_rps": round(len(samples) / (t_end - t_begin), 1),
                "p99_before_ms": p99_before,
                "changes": per_change,
                "worker_start_to_ready_s": round(ready_s, 3),
                "reload_s": round(reload_s, 3),
                "reload_limit_s": round(reload_limit, 3),
                "reload_object": {k: reload[k] for k in ("ok", "steps", "replaced", "duration_s")},
                "apply_detail": res["engines"][0]["detail"],
                "targets": {
                    "zero_failed": not failures,
                    "p99_during_reload_le_3x": (
                        p99_before is not None
                        and p99_reload is not None
                        and p99_reload <= 3 * p99_before
                    ),
                    "reload_within_limit": reload_s <= reload_limit,
                },
            }
        )
    finally:
        c.close()
        stop_daemon(home, daemon_pid)
    return out


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a few seconds per strategy")
    parser.add_argument("--seconds", type=float, default=None, help="load duration (30)")
    parser.add_argument("--rate", type=float, default=None, help="requests/s in all (500)")
    parser.add_argument(
        "--strategy", choices=("rolling", "recreate", "both"), default="both",
        help="which path changes the instances (both: one scenario each)",
    )  # fmt: skip
    args = parser.parse_args()
    q = args.quick
    seconds = args.seconds or (8.0 if q else 30.0)
    rate = args.rate or (200.0 if q else 500.0)
    strategies = ["rolling", "recreate"] if args.strategy == "both" else [args.strategy]
    result: dict[str, Any] = {
        "machine": machine_info(),
        "source": source_state(),
        "quick": q,
        "seconds": seconds,
        "target_rate_rps": rate,
        "instances": INSTANCES,
        "client_threads": THREADS,
        "scenarios": {s: scenario(s, seconds, rate, q) for s in strategies},
    }
    result["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
