"""Elastic pools benchmark (issue 14, docs/elastic.md): prints one JSON object with every figure.

Run: `python benchmarks/elastic.py [--quick]`. One fresh daemon in a temporary ENGCTL_HOME
(`[daemon.scale] interval = 0.1`), echo workers (`python -m engctl.examples.echo_worker`,
`max_concurrency = 1`, `restart.start_seconds = 0`), in the same run:

a. cold start: the first request's latency on an engine scaled to zero (`min = 0, max = 8`)
   minus the worker's own start-to-first-answer (this process spawns it and speaks the worker
   protocol), in alternating rounds; the difference is what engctl adds (target ≤ 5 ms),
   also measured without the worker's start in it: request -> spawn + ready -> answer, by
   the daemon's event times;
b. a step from 1 to 64 concurrent clients (threads, a connection each) on `min = 0, max = 8`:
   time from the step until 8 instances are ready, failed requests (target 0), p99 and
   throughput during the step; the same step on a fixed `instances = 8` engine to compare;
c. the same step with `min_idle = 2`: p99 of the first 100 requests sent after the step;
d. idle reclaim: after (b), the RSS of the instances that left and how long after the load
   stopped the engine was back at `min` (`idle_timeout` 1 s).

The daemon and its engines are stopped and the home removed at the end, even on error.
`--quick` shortens the step and the rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, cast

import psutil
from common import exit_cleanly_on_sigterm, machine_info, source_state, stop_daemon, wait_for

from engctl.client import Client
from engctl.errors import EngctlError

PY = sys.executable
ECHO = [PY, "-m", "engctl.examples.echo_worker"]
CLIENTS = 64
MAX = 8
IDLE_TIMEOUT = 1.0
TARGET_COLD_OVERHEAD_MS = 5.0


def spec(**scale: Any) -> dict[str, Any]:
    """An echo worker engine; autoscaled with `scale`, else fixed at `MAX` instances."""
    out: dict[str, Any] = {
        "type": "echo",
        "command": ECHO,
        "restart": {"start_seconds": 0.0},
        "stop": {"timeout": 5.0},
    }
    if scale:
        out["scale"] = {"max": MAX, **scale}
    else:
        out["instances"] = MAX
    return out


def instances(c: Client, name: str) -> list[dict[str, Any]]:
    return [cast("dict[str, Any]", i) for e in c.status([name])["engines"] for i in e["instances"]]


def ready(c: Client, name: str) -> int:
    return sum(1 for i in instances(c, name) if i["state"] in ("ready", "busy"))


def quantile_ms(samples_s: list[float], q: int) -> float:
    ms = sorted(x * 1000 for x in samples_s)
    if len(ms) < 2:
        return round(ms[0], 3) if ms else 0.0
    return round(statistics.quantiles(ms, n=100, method="inclusive")[q - 1], 3)


# -- a. cold start ------------------------------------------------------------------------------
def direct_cold_start() -> float:
    """Seconds from spawning an echo worker to its answer to a first request (no engctl)."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        ECHO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(b'{"jsonrpc":"2.0","id":1,"method":"execute","params":{"input":1}}\n')
        proc.stdin.flush()
        while True:  # the `ready` notification, then the answer
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError("echo worker closed its stdout")
            if json.loads(line).get("id") == 1:
                return time.perf_counter() - t
    finally:
        proc.stdin.close()
        proc.wait(10)


def engctl_cold_start(c: Client, name: str) -> tuple[float, float]:
    """Seconds of a first request on `name` scaled to zero (waits until it is at zero), and
    the part of them engctl spent itself by its events' times: from the request to the spawn,
    and from the worker's `ready` to the answer (the worker's own start is between)."""
    wait_for(lambda: not instances(c, name), 30)
    sent = time.time()
    t = time.perf_counter()
    c.exec(1, engine=name, timeout=30)
    took = time.perf_counter() - t
    answered = time.time()
    seen = [e for e in c.events(engine=name, limit=50) if e["at"] >= sent]
    spawned = min(e["at"] for e in seen if e["kind"] == "instance.spawned")
    ready_at = min(e["at"] for e in seen if e["kind"] == "instance.state" and e["to"] == "ready")
    return took, (spawned - sent) + (answered - ready_at)


# -- b, c. a step of concurrent clients ----------------------------------------------------------
class Step:
    """`CLIENTS` threads, a connection each, sending requests back to back to one engine: one
    of them from `start()`, all from `step()` until `stop()`; every request is recorded."""

    def __init__(self, home: str, name: str) -> None:
        self.home, self.name = home, name
        self.records: list[tuple[float, float, bool]] = []  # (sent at, latency, ok)
        self.lock = threading.Lock()
        self.go = [threading.Event() for _ in range(CLIENTS)]
        self.done = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(CLIENTS)
        ]
        self.step_at = 0.0

    def _client(self, k: int) -> None:
        with Client(self.home, autostart=False, timeout=120) as c:
            self.go[k].wait()
            while not self.done.is_set():
                t = time.perf_counter()
                try:
                    c.exec(k, engine=self.name, timeout=60)
                    ok = True
                except EngctlError:
                    ok = False
                with self.lock:
                    self.records.append((t, time.perf_counter() - t, ok))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()
        self.go[0].set()

    def step(self) -> None:
        self.step_at = time.perf_counter()
        for ev in self.go:
            ev.set()

    def stop(self) -> float:
        self.done.set()
        for ev in self.go:
            ev.set()
        for thread in self.threads:
            thread.join(120)
        return time.perf_counter()

    def figures(self, until: float) -> dict[str, Any]:
        during = sorted(r for r in self.records if r[0] >= self.step_at)
        lat = [r[1] for r in during]
        first = [r[1] for r in during[:100]]
        return {
            "requests": len(during),
            "failed": sum(1 for r in self.records if not r[2]),
            "throughput_rps": round(len(during) / max(1e-9, until - self.step_at)),
            "p50_ms": quantile_ms(lat, 50),
            "p99_ms": quantile_ms(lat, 99),
            "first_100_p99_ms": quantile_ms(first, 99),
        }


def run_step(c: Client, home: str, name: str, before_s: float, step_s: float) -> dict[str, Any]:
    """One client for `before_s`, then `CLIENTS` for `step_s`: the step's figures, and how long
    after the step `MAX` instances were ready."""
    load = Step(home, name)
    load.start()
    time.sleep(before_s)  # the 1-client phase: a duration of load, not a wait for a condition
    load.step()
    at_max: float | None = None
    deadline = load.step_at + step_s
    while time.perf_counter() < deadline:
        if at_max is None and ready(c, name) >= MAX:
            at_max = time.perf_counter() - load.step_at
        time.sleep(0.005)
    until = load.stop()
    out = load.figures(until)
    out["seconds_to_max_ready"] = None if at_max is None else round(at_max, 4)
    return out


# -- d. idle reclaim ----------------------------------------------------------------------------
def reclaim(c: Client, name: str) -> dict[str, Any]:
    """After the load stopped: the RSS of the instances that leave, and how long until the
    engine is back at its `min` (0)."""
    t = time.perf_counter()
    pids = [i["pid"] for i in instances(c, name) if i["pid"]]
    rss = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):  # gone already
            rss += psutil.Process(pid).memory_info().rss
    available = psutil.virtual_memory().available
    wait_for(lambda: not instances(c, name), IDLE_TIMEOUT + 60)
    back_at_min = time.perf_counter() - t
    gone = sum(1 for pid in pids if not psutil.pid_exists(pid))
    return {
        "instances_before": len(pids),
        "instances_stopped": gone,
        "rss_returned_bytes": rss,
        "host_available_delta_bytes": psutil.virtual_memory().available - available,
        "seconds_to_min_after_load": round(back_at_min, 3),
        "idle_timeout": IDLE_TIMEOUT,
    }


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a shorter step, fewer rounds")
    parser.add_argument("--rounds", type=int, default=10, help="cold starts of each kind")
    parser.add_argument("--step-seconds", type=float, default=5.0)
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    step_s = 1.5 if args.quick else args.step_seconds
    before_s = 0.3 if args.quick else 1.0

    result: dict[str, Any] = {
        "benchmark": "elastic",
        "machine": machine_info(),
        "source": source_state(),
        "counts": {"quick": args.quick, "rounds": rounds, "step_seconds": step_s,
                   "clients": CLIENTS, "max": MAX},
    }  # fmt: skip
    home = tempfile.mkdtemp(prefix="eelastic", dir="/tmp")
    Path(home, "config.toml").write_text("[daemon.scale]\ninterval = 0.1\n")
    c = Client(home, timeout=120)
    daemon_pid: int | None = None
    try:
        c.connect()
        daemon_pid = int(c.daemon_info["pid"])
        c.register(
            {
                "cold": spec(min=0, target=1.0, idle_timeout=0.2),
                "step": spec(min=0, idle_timeout=IDLE_TIMEOUT),
                "fixed": spec(),
                "warm": spec(min=0, min_idle=2, idle_timeout=IDLE_TIMEOUT),
            }
        )
        wait_for(lambda: ready(c, "fixed") == MAX and ready(c, "warm") == 2, 60)

        # a. alternating rounds, so that other load on the machine hits both alike
        direct_cold_start()  # warm-up: the interpreter's files in the page cache
        engctl_cold_start(c, "cold")
        direct: list[float] = []
        through: list[float] = []
        added: list[float] = []
        for _ in range(rounds):
            direct.append(direct_cold_start())
            took, own = engctl_cold_start(c, "cold")
            through.append(took)
            added.append(own)
        d_ms, e_ms = statistics.median(direct) * 1000, statistics.median(through) * 1000
        own_ms = statistics.median(added) * 1000
        result["cold_start"] = {
            "worker_start_to_answer_ms": round(d_ms, 3),
            "engctl_first_request_ms": round(e_ms, 3),
            # the difference of two medians: noisy on a loaded machine
            "engctl_overhead_ms": round(e_ms - d_ms, 3),
            # request -> spawn plus worker ready -> answer, by the daemon's event times
            "engctl_own_ms_by_events": round(own_ms, 3),
            "target_overhead_ms": TARGET_COLD_OVERHEAD_MS,
            "met": own_ms <= TARGET_COLD_OVERHEAD_MS,
            "rounds": rounds,
        }

        # b. the step on the autoscaled engine and on the fixed one, then d. its reclaim
        result["step_autoscaled"] = run_step(c, home, "step", before_s, step_s)
        result["idle_reclaim"] = reclaim(c, "step")
        result["step_fixed_8"] = run_step(c, home, "fixed", before_s, step_s)
        # c. the step with a warm pool of 2
        result["step_min_idle_2"] = run_step(c, home, "warm", before_s, step_s)
    finally:
        c.close()
        stop_daemon(home, daemon_pid)
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
