"""Admission-control benchmark (issue 15): prints one JSON object with every figure and target.

Run: `python benchmarks/admission.py [--quick] [--seconds S]` (about two minutes; `--quick` a
few seconds per part). A fresh daemon in a temporary ENGCTL_HOME; requests are sent open-loop
(at fixed times, whatever the answers) by an asyncio driver over a few socket connections:

a. rate limit: an echo engine limited to `rate = "100/s"` (burst 10) driven at 400/s with a
   0.5 s deadline: the admitted rate (target within ±5 % of 100/s), and how fast the rest are
   refused (p99 of a refusal, in the daemon and round trip; target ≤ 1 ms);
b. overload: a worker with a latency knee (benchmarks/knee_worker.py: 8 "cores" of 40 ms ± 50 %,
   capacity 200/s, 64 slots) offered 3× its capacity, with and without `adaptive = true`: p99
   latency of the admitted requests against the unloaded p99 (target with adaptive ≤ 2×) and
   goodput against the capacity (target ≥ 90 %);
c. priorities: high-priority requests at 10 % of a type's capacity (16 slots of 20 ms ± 50 %),
   alone and under a low-priority flood at 2× capacity from another caller: their p99 ratio
   (target ≤ 1.5×);
d. hot path: exec_many throughput (window 64) on 2 echo instances with no limit at all, and
   with every kind of limit configured but never binding (global, type, engine caps, engine,
   type and caller rates): the ratio (target ≥ 0.95), in alternating rounds.

`--baseline-src PATH` (a checkout's folder holding `src/engctl`, e.g. `git archive main`)
also measures d's limits-off throughput with that code, for the cost of the new queue itself.
The daemon, its engines and the home are removed at the end, even on error.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
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

PY = sys.executable
HERE = Path(__file__).resolve().parent
ECHO = [PY, "-m", "engctl.examples.echo_worker"]
# The knee workers: (b) 8 "cores" of 40 ms (200/s), (c) 16 of 20 ms (800/s).
CORES, SERVICE_S = 8, 0.04
CAPACITY = CORES / SERVICE_S  # requests per second the knee worker of (b) can serve
C_CORES, C_SERVICE_S = 16, 0.02
C_CAPACITY = C_CORES / C_SERVICE_S
RATE_LIMITED = -32034
BASE_CONFIG = "[daemon]\nmax_queue = 100000\npolicy_interval = 1.0\n"
LIMITS_CONFIG = (
    BASE_CONFIG
    + "[daemon.limits]\nmax_in_flight = 100000\ntypes.echo-on = { max_in_flight = 100000,"
    ' rate = "1000000/s", burst = 1000000 }\n[daemon.limits.callers]\n'
    '"*" = { rate = "1000000/s", burst = 1000000 }\n'
)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return round(s[min(len(s) - 1, int(q * len(s)))], 3)


class Driver:
    """Open-loop JSON-RPC over a few connections to the daemon's socket."""

    def __init__(self, socket_path: str, connections: int = 4) -> None:
        self.path = socket_path
        self.n = connections
        self.ids = itertools.count(1)
        self.pending: dict[int, tuple[float, asyncio.Future[tuple[float, dict[str, Any]]]]] = {}
        self.writers: list[asyncio.StreamWriter] = []
        self.readers: list[asyncio.Task[None]] = []

    async def open(self) -> None:
        for _ in range(self.n):
            reader, writer = await asyncio.open_unix_connection(self.path, limit=1 << 22)
            self.writers.append(writer)
            self.readers.append(asyncio.create_task(self._read(reader)))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            msg = json.loads(line)
            entry = self.pending.pop(msg.get("id"), None)
            if entry is not None and not entry[1].done():
                entry[1].set_result((time.perf_counter(), msg))

    def send(self, params: dict[str, Any]) -> asyncio.Future[tuple[float, dict[str, Any]]]:
        req_id = next(self.ids)
        fut: asyncio.Future[tuple[float, dict[str, Any]]] = (
            asyncio.get_running_loop().create_future()
        )
        self.pending[req_id] = (time.perf_counter(), fut)
        frame = {"jsonrpc": "2.0", "id": req_id, "method": "request.exec", "params": params}
        self.writers[req_id % self.n].write(json.dumps(frame).encode() + b"\n")
        return fut

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        for t in self.readers:
            t.cancel()


async def open_loop(
    driver: Driver, streams: list[tuple[float, dict[str, Any]]], seconds: float
) -> list[list[tuple[float, float, dict[str, Any]]]]:
    """Send each stream's params at its rate for `seconds`; per stream, (sent, answered, msg)."""
    start = time.perf_counter()
    futures: list[list[tuple[float, asyncio.Future[tuple[float, dict[str, Any]]]]]] = [
        [] for _ in streams
    ]
    sent = [0] * len(streams)
    while True:
        now = time.perf_counter() - start
        if now >= seconds:
            break
        for k, (rate, params) in enumerate(streams):
            due = int(now * rate) + 1
            while sent[k] < due:
                sent[k] += 1
                futures[k].append((time.perf_counter(), driver.send(params)))
        await asyncio.sleep(0.001)
    out = []
    for fs in futures:
        rows = []
        for t0, fut in fs:
            t1, msg = await fut
            rows.append((t0, t1, msg))
        out.append(rows)
    return out


def summary(rows: list[tuple[float, float, dict[str, Any]]], seconds: float) -> dict[str, Any]:
    ok = [(t1 - t0) * 1000 for t0, t1, m in rows if "result" in m]
    # Successes per second over the time they took to come back (a backlog served after the
    # sending stopped counts over its real span, not over the sending window).
    span = max((t1 for _, t1, m in rows if "result" in m), default=0.0) - min(
        (t0 for t0, _, _ in rows), default=0.0
    )
    return {
        "sent": len(rows),
        "ok": len(ok),
        "goodput_per_s": round(len(ok) / max(span, seconds), 1),
        "p50_ms": pct(ok, 0.5),
        "p99_ms": pct(ok, 0.99),
        "errors": dict(
            sorted(
                {
                    str(c): sum(1 for _, _, m in rows if m.get("error", {}).get("code") == c)
                    for c in {m["error"]["code"] for _, _, m in rows if "error" in m}
                }.items()
            )
        ),
    }


def reload(c: Client, home: str, config: str) -> None:
    Path(home, "config.toml").write_text(config)
    c.call("daemon.reload")


async def part_a(sock: str, seconds: float) -> dict[str, Any]:
    d = Driver(sock)
    await d.open()
    params = {"input": 1, "engine": "limited", "timeout": 0.5}
    [rows] = await open_loop(d, [(400.0, params)], seconds)
    await d.close()
    admitted = [r for r in rows if "result" in r[2]]
    refused = [r for r in rows if r[2].get("error", {}).get("code") == RATE_LIMITED]
    # Admitted per second over the span they ran in: those that waited for a token are served
    # up to one deadline after the sending stopped.
    end = max((t1 for _, t1, m in admitted), default=seconds)
    start = min((t0 for t0, _, _ in rows), default=0.0)
    rate = len(admitted) / max(seconds, end - start)
    in_daemon = [r[2]["error"]["data"]["latency_ms"] for r in refused]
    round_trip = [(t1 - t0) * 1000 for t0, t1, _ in refused]
    return {
        "offered_per_s": 400,
        "limit_per_s": 100,
        "burst": 10,
        "seconds": seconds,
        "admitted_per_s": round(rate, 2),
        "admitted_error_percent": round(abs(rate - 100) / 100 * 100, 2),
        "refused": len(refused),
        # Requests that waited for a token but whose run ended after the deadline, by code.
        "other_outcomes": summary(
            [r for r in rows if "result" not in r[2] and r[2]["error"]["code"] != RATE_LIMITED],
            seconds,
        )["errors"],
        "refusal_p99_ms_in_daemon": pct(in_daemon, 0.99),
        "refusal_p99_ms_round_trip": pct(round_trip, 0.99),
        "target": "admitted within ±5 % of 100/s; refusal p99 ≤ 1 ms",
    }


async def part_b(sock: str, seconds: float) -> dict[str, Any]:
    d = Driver(sock)
    await d.open()
    out: dict[str, Any] = {"capacity_per_s": CAPACITY, "offered_per_s": 3 * CAPACITY}
    # Unloaded: 20 % of capacity on the plain engine.
    [rows] = await open_loop(
        d, [(0.2 * CAPACITY, {"input": 1, "engine": "knee", "timeout": 2})], seconds
    )
    out["unloaded"] = summary(rows, seconds)
    for name in ("knee", "knee-adaptive"):
        # Warm the adaptive controller (its min RTT) at a light load first.
        await open_loop(d, [(0.5 * CAPACITY, {"input": 1, "engine": name, "timeout": 2})], 1.0)
        [rows] = await open_loop(
            d, [(3 * CAPACITY, {"input": 1, "engine": name, "timeout": 2})], seconds
        )
        out["adaptive" if name.endswith("adaptive") else "static"] = summary(rows, seconds)
        await asyncio.sleep(2.5)  # let the backlog of the static run drain
    await d.close()
    base = out["unloaded"]["p99_ms"] or 1.0
    for key in ("static", "adaptive"):
        s = out[key]
        s["p99_vs_unloaded"] = round((s["p99_ms"] or 0) / base, 2)
        s["goodput_vs_capacity"] = round(s["goodput_per_s"] / CAPACITY, 3)
    out["target"] = "adaptive: p99 ≤ 2× unloaded, goodput ≥ 0.9 × capacity"
    return out


async def part_c(sock: str, seconds: float) -> dict[str, Any]:
    d = Driver(sock)
    await d.open()
    high = {"input": 1, "type": "prio", "priority": "high", "caller": "web", "timeout": 10}
    low = {"input": 1, "type": "prio", "priority": "low", "caller": "batch", "timeout": 10}
    [alone] = await open_loop(d, [(0.2 * CAPACITY * 2, high)], seconds)
    flooded, lows = await open_loop(
        d, [(0.2 * CAPACITY * 2, high), (3 * CAPACITY * 2, low)], seconds
    )
    await d.close()
    a, f = summary(alone, seconds), summary(flooded, seconds)
    return {
        "capacity_per_s": C_CAPACITY,
        "high_alone": a,
        "high_under_flood": f,
        "low_flood": summary(lows, seconds),
        "p99_ratio": round((f["p99_ms"] or 0) / (a["p99_ms"] or 1), 2),
        "target": "high-priority p99 under the flood ≤ 1.5× without it",
    }


def throughput(c: Client, engine: str, n: int, caller: str | None) -> float:
    opts: dict[str, Any] = {"engine": engine}
    if caller:
        opts["caller"] = caller
    t = time.perf_counter()
    ok = sum(1 for r in c.exec_many(range(n), window=64, **opts) if r["ok"])
    if ok != n:
        raise RuntimeError(f"{n - ok} of {n} requests failed")
    return n / (time.perf_counter() - t)


def part_d(c: Client, home: str, n: int, rounds: int) -> dict[str, Any]:
    off: list[float] = []
    on: list[float] = []
    for _ in range(rounds):
        reload(c, home, BASE_CONFIG)
        off.append(throughput(c, "echo-off", n, None))
        reload(c, home, LIMITS_CONFIG)
        on.append(throughput(c, "echo-on", n, "team-a"))
    reload(c, home, BASE_CONFIG)
    m_off, m_on = statistics.median(off), statistics.median(on)
    return {
        "requests_per_round": n,
        "rounds": rounds,
        "limits_off_per_s": round(m_off),
        "limits_on_per_s": round(m_on),
        "ratio": round(m_on / m_off, 3),
        "target": "≥ 0.95",
    }


def baseline(src: str, n: int, rounds: int) -> dict[str, Any]:
    """d's limits-off throughput with the code of another checkout (its own daemon)."""
    code = f"""
import sys, json, time, statistics, tempfile, shutil
sys.path.insert(0, {str(Path(src) / "src")!r}); sys.path.insert(1, {str(HERE)!r})
import engctl
from engctl.client import Client
from common import all_ready, wait_for, stop_daemon
home = tempfile.mkdtemp(prefix='ebase', dir='/tmp')
open(home + '/config.toml', 'w').write({BASE_CONFIG!r})
c = Client(home); c.connect(); pid = c.daemon_info['pid']
try:
    c.register({{'echo-off': {{'type': 'echo-off', 'command': {ECHO!r}, 'instances': 2,
        'max_concurrency': 32, 'restart': {{'start_seconds': 0.1}}}}}})
    wait_for(lambda: all_ready(c, 'echo-off', 2))
    list(c.exec_many(range(2000), window=64, engine='echo-off'))
    rates = []
    for _ in range({rounds}):
        t = time.perf_counter(); list(c.exec_many(range({n}), window=64, engine='echo-off'))
        rates.append({n} / (time.perf_counter() - t))
    print(json.dumps({{'file': engctl.__file__, 'per_s': statistics.median(rates)}}))
finally:
    c.close(); stop_daemon(home, pid); shutil.rmtree(home, ignore_errors=True)
"""
    env = {k: v for k, v in os.environ.items() if k != "ENGCTL_HOME"}
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        return {"error": r.stderr[-500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds of a (b)/(c) run")
    parser.add_argument("--baseline-src", default=None, help="a checkout to compare d with")
    args = parser.parse_args()
    seconds_a = 2.0 if args.quick else 20.0
    seconds = args.seconds or (1.5 if args.quick else 8.0)
    n_d, rounds_d = (1000, 2) if args.quick else (10_000, 5)
    result: dict[str, Any] = {
        "benchmark": "admission",
        "machine": machine_info(),
        "source": source_state(),
        "quick": args.quick,
    }
    home = tempfile.mkdtemp(prefix="eadm", dir="/tmp")
    os.environ["ENGCTL_HOME"] = home
    Path(home, "config.toml").write_text(BASE_CONFIG)
    c = Client(home)
    daemon_pid: int | None = None
    try:
        c.connect()
        daemon_pid = int(c.daemon_info["pid"])
        quick = {"restart": {"start_seconds": 0.1}}
        knee = [PY, str(HERE / "knee_worker.py"), str(CORES), str(SERVICE_S)]
        prio = [PY, str(HERE / "knee_worker.py"), str(C_CORES), str(C_SERVICE_S)]
        engines: dict[str, dict[str, Any]] = {
            "limited": {"type": "lim", "command": ECHO, "max_concurrency": 64,
                        "limits": {"rate": "100/s", "burst": 10}},
            "knee": {"type": "knee", "command": knee, "max_concurrency": 64},
            "knee-adaptive": {"type": "knee2", "command": knee, "max_concurrency": 64,
                              "limits": {"adaptive": True}},
            "prio": {"type": "prio", "command": prio, "max_concurrency": C_CORES},
            "echo-off": {"type": "echo-off", "command": ECHO, "instances": 2,
                         "max_concurrency": 32},
            "echo-on": {"type": "echo-on", "command": ECHO, "instances": 2, "max_concurrency": 32,
                        "limits": {"rate": "1000000/s", "burst": 1000000,
                                   "max_in_flight": 100000}},
        }  # fmt: skip
        c.register({name: {**quick, **spec} for name, spec in engines.items()})
        for name, spec in engines.items():
            wait_for(lambda name=name, spec=spec: all_ready(c, name, spec.get("instances", 1)))
        sock = str(c.paths.socket_file)
        result["a_rate_limit"] = asyncio.run(part_a(sock, seconds_a))
        result["b_overload"] = asyncio.run(part_b(sock, seconds))
        result["c_priority"] = asyncio.run(part_c(sock, seconds))
        throughput(c, "echo-off", 2000, None)  # warm-up
        result["d_hot_path"] = part_d(c, home, n_d, rounds_d)
        status = c.status(["knee-adaptive"])["engines"][0]["admission"]
        result["b_overload"]["adaptive_gate"] = status
    finally:
        c.close()
        stop_daemon(home, daemon_pid)
        shutil.rmtree(home, ignore_errors=True)
    if args.baseline_src:
        result["d_hot_path"]["baseline"] = baseline(args.baseline_src, n_d, rounds_d)
        base = result["d_hot_path"]["baseline"].get("per_s")
        if base:
            result["d_hot_path"]["limits_off_vs_baseline"] = round(
                result["d_hot_path"]["limits_off_per_s"] / base, 3
            )
    result["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
