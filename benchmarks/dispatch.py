"""Dispatch benchmark (engctl exec): prints one JSON object with every figure and its target.

Run: `python benchmarks/dispatch.py [--quick]`. Everything is measured in the same run against
the same echo worker (`python -m engctl.examples.echo_worker`):

1. direct: this process speaks the worker protocol (docs/protocol.md) over one echo worker's pipes —
   latency at concurrency 1 and throughput with 64 requests in flight;
2. engctl: a fresh daemon in a temporary ENGCTL_HOME with 2 echo instances (32 slots each),
   the same two figures through `Client.exec` and `Client.exec_many(window=64)`. Direct and
   engctl run in alternating rounds so that other load on the machine hits both alike;
3. derived: added p50 latency (target ≤ 0.25 ms) and throughput ratio (target ≥ 0.35);
4. cold CLI: median wall time of `engctl exec --type echo -- 1` over `engctl --version`
   (target ≤ 1.3×);
5. selection: µs per `CandidatePool.select` at 1,000 instances (target ≤ 50 µs), using the
   simulated load of benchmarks/selection.py;
6. instance count (issue 13.3): throughput with 64 in flight through 2 and through 100 echo
   instances of one engine (target: 100 ≥ 0.75 × 2), beside its ceiling: this process driving
   2 and 100 echo workers directly, one request per idle worker at a time as least-loaded
   spreads them (no daemon in between), so that what the wake-ups of 100 processes cost on
   this machine is measured, not assumed.

Loopback and local pipes only, bounded counts; the worker, the daemon and its engines are
stopped and the home removed at the end, even on error. `--quick` scales the counts down ~5×.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import IO, Any

import psutil
from common import (
    all_ready,
    exit_cleanly_on_sigterm,
    machine_info,
    median_ms,
    source_state,
    stop_daemon,
    wait_for,
)

from engctl.client import Client
from engctl.daemon.selection import Candidate, CandidatePool, Selector

PY = sys.executable
ENGCTL = str(Path(PY).with_name("engctl"))
ECHO = [PY, "-m", "engctl.examples.echo_worker"]
TYPE = "echo"
EXECUTE = b'{"jsonrpc":"2.0","id":%d,"method":"execute","params":{"input":%s}}\n'
WINDOW = 64
MAX_COUNT = 1_000_000
# Direct and engctl alternate in this many rounds (each gets 1/ROUNDS of the counts per round).
ROUNDS = 5

TARGET_ADDED_P50_MS = 0.25
TARGET_THROUGHPUT_RATIO = 0.35
TARGET_CLI_RATIO = 1.3
TARGET_SELECT_US = 50.0
TARGET_INSTANCE_COUNT_RATIO = 0.75
COUNTS = (2, 100)


# -- helpers ---------------------------------------------------------------------------------
def latency_summary(samples_s: list[float]) -> dict[str, Any]:
    """p50/p99/mean in ms of round-trip times given in seconds."""
    ms = sorted(x * 1000 for x in samples_s)
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {
        "p50_ms": round(q[49], 4),
        "p99_ms": round(q[98], 4),
        "mean_ms": round(statistics.fmean(ms), 4),
        "max_ms": round(ms[-1], 4),
        "requests": len(ms),
    }


def cpu_s(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


# -- 1. direct: the worker protocol over one echo worker's pipes ------------------------------
class DirectWorker:
    """A minimal worker-protocol client: JSON-RPC lines on the child's stdin/stdout."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ECHO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.w: IO[bytes] = self.proc.stdin
        self.r: IO[bytes] = self.proc.stdout
        self.ps = psutil.Process(self.proc.pid)
        self.next_id = 1
        first = json.loads(self.r.readline())
        if first.get("method") != "ready":
            raise RuntimeError(f"echo worker did not say ready: {first!r}")

    def send(self, value: Any) -> int:
        req_id = self.next_id
        self.next_id += 1
        msg = {"jsonrpc": "2.0", "id": req_id, "method": "execute", "params": {"input": value}}
        self.w.write((json.dumps(msg, separators=(",", ":")) + "\n").encode())
        return req_id

    def recv(self) -> dict[str, Any]:
        line = self.r.readline()
        if not line:
            raise RuntimeError("echo worker closed its stdout")
        return json.loads(line)  # type: ignore[no-any-return]

    def call(self, value: Any) -> Any:
        req_id = self.send(value)
        self.w.flush()
        msg = self.recv()
        if msg.get("id") != req_id or "result" not in msg:
            raise RuntimeError(f"unexpected answer to {req_id}: {msg!r}")
        return msg["result"]

    def latency(self, n: int) -> list[float]:
        """Round trips of `n` sequential requests, in seconds."""
        out = []
        for i in range(n):
            t = time.perf_counter()
            result = self.call(i)
            out.append(time.perf_counter() - t)
            if result != {"echo": i}:
                raise RuntimeError(f"wrong echo: {result!r}")
        return out

    def throughput(self, total: int, window: int) -> tuple[float, int]:
        """Keep `window` requests in flight until `total` are answered: (seconds, errors)."""
        sent = answered = errors = 0
        t = time.perf_counter()
        while sent < min(window, total):
            self.send(sent)
            sent += 1
        self.w.flush()
        while answered < total:
            msg = self.recv()
            answered += 1
            if "result" not in msg:
                errors += 1
            if sent < total:
                self.send(sent)
                sent += 1
                self.w.flush()
        return time.perf_counter() - t, errors

    def close(self) -> None:
        try:
            self.w.close()
            self.proc.wait(timeout=5)
        except Exception:
            self.proc.kill()
            self.proc.wait()


# -- 2. through engctl -----------------------------------------------------------------------
def engctl_latency(c: Client, n: int) -> tuple[list[float], list[float]]:
    """Round trips of `n` sequential `Client.exec`, and the daemon's own `latency_ms` of each."""
    out, inner = [], []
    for i in range(n):
        t = time.perf_counter()
        obj = c.exec(i, type=TYPE)
        out.append(time.perf_counter() - t)
        if not obj["ok"] or obj["result"] != {"echo": i}:
            raise RuntimeError(f"wrong answer: {obj!r}")
        latency_ms = obj.get("latency_ms")
        if latency_ms is not None:
            inner.append(latency_ms / 1000)
    return out, inner


def engctl_throughput(c: Client, total: int, window: int, per_instance: Counter[str]) -> float:
    """`Client.exec_many` over a bounded generator; returns the seconds it took and counts the
    successes per instance (failures under "failed")."""

    def inputs() -> Iterator[int]:
        yield from range(total)

    got = 0
    t = time.perf_counter()
    for obj in c.exec_many(inputs(), window=window, type=TYPE):
        got += 1
        per_instance[(obj["instance"] or "?") if obj["ok"] else "failed"] += 1
    elapsed = time.perf_counter() - t
    if got != total:
        raise RuntimeError(f"exec_many yielded {got} results for {total} inputs")
    return elapsed


def count_throughput(c: Client, engine_type: str, total: int) -> float:
    """Requests per second of `total` echo requests, 64 in flight, to the engine of `type`."""
    t = time.perf_counter()
    failed = sum(not o["ok"] for o in c.exec_many(range(total), window=WINDOW, type=engine_type))
    elapsed = time.perf_counter() - t
    if failed:
        raise RuntimeError(f"{failed} of {total} requests to {engine_type} failed")
    return total / elapsed


class SpreadWorkers:
    """N echo workers driven by this process with `WINDOW` requests in flight, each sent to the
    worker with the fewest in flight (one per idle worker while there are idle ones): the
    dispatch of least-loaded with no daemon in between, the ceiling of item 6."""

    def __init__(self, n: int) -> None:
        import selectors

        self.procs = [
            subprocess.Popen(ECHO, stdin=subprocess.PIPE, stdout=subprocess.PIPE) for _ in range(n)
        ]
        self.selector = selectors.DefaultSelector()
        for k, proc in enumerate(self.procs):
            assert proc.stdout is not None
            if b'"ready"' not in proc.stdout.readline():
                raise RuntimeError("echo worker did not say ready")
            self.selector.register(proc.stdout.fileno(), selectors.EVENT_READ, k)
        self.scratch = memoryview(bytearray(1 << 18))

    def run(self, total: int) -> float:
        """Requests per second of `total` echo requests, `WINDOW` in flight."""
        n = len(self.procs)
        wfds = [p.stdin.fileno() for p in self.procs if p.stdin is not None]
        inflight = [0] * n
        pending = [bytearray() for _ in range(n)]
        idle = list(range(n))
        sent = done = 0
        t = time.perf_counter()
        while done < total:
            while sent - done < WINDOW and sent < total:
                k = idle.pop() if idle else min(range(n), key=inflight.__getitem__)
                os.write(wfds[k], EXECUTE % (sent, b"%d" % sent))
                inflight[k] += 1
                sent += 1
            for key, _ in self.selector.select():
                k = key.data
                got = os.readv(key.fd, [self.scratch])
                if not got:
                    raise RuntimeError("echo worker closed its stdout")
                buf = pending[k]
                buf += self.scratch[:got]
                answers = buf.count(b"\n")
                del buf[: buf.rfind(b"\n") + 1]
                done += answers
                inflight[k] -= answers
                if answers and not inflight[k]:
                    idle.append(k)
        return total / (time.perf_counter() - t)

    def close(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def instance_count(c: Client, total: int) -> dict[str, Any]:
    """Item 6: engctl's throughput at 2 and 100 instances and the direct ceiling at 2 and 100
    workers, in alternating rounds."""
    for k in COUNTS:
        c.register(
            {
                f"count{k}": {
                    "type": f"count{k}",
                    "command": ECHO,
                    "mode": "worker",
                    "instances": k,
                    "max_concurrency": 32,
                    "restart": {"start_seconds": 0.1},
                }
            }
        )
    spread: dict[int, SpreadWorkers] = {}
    engctl_rps: dict[int, list[float]] = {k: [] for k in COUNTS}
    direct_rps: dict[int, list[float]] = {k: [] for k in COUNTS}
    try:
        for k in COUNTS:
            name = f"count{k}"
            wait_for(lambda: all_ready(c, name, k), 120)  # noqa: B023  # called at once
            spread[k] = SpreadWorkers(k)
            count_throughput(c, f"count{k}", min(total, 2000))  # warm-up
            spread[k].run(min(total, 2000))
        for _ in range(2):
            for k in COUNTS:
                engctl_rps[k].append(count_throughput(c, f"count{k}", total))
                direct_rps[k].append(spread[k].run(total))
    finally:
        for workers in spread.values():
            workers.close()
        c.unregister([f"count{k}" for k in COUNTS])
    low, high = COUNTS
    e = {k: statistics.median(v) for k, v in engctl_rps.items()}
    d = {k: statistics.median(v) for k, v in direct_rps.items()}
    return {
        "requests": total,
        "engctl_rps": {str(k): round(v) for k, v in e.items()},
        "direct_spread_rps": {str(k): round(v) for k, v in d.items()},
        "engctl_ratio": round(e[high] / e[low], 3),
        "direct_spread_ratio": round(d[high] / d[low], 3),
    }


class Meter:
    """Wall time, requests and CPU seconds (this process and others) over alternating rounds."""

    def __init__(self, others: list[psutil.Process]) -> None:
        self.others = others
        self.seconds = 0.0
        self.requests = 0
        self.client_cpu = 0.0
        self.other_cpu = [0.0] * len(others)
        self.rounds_rps: list[int] = []

    def measure(self, requests: int, run: Any) -> Any:
        other0 = [cpu_s(p) for p in self.others]
        cpu0 = time.process_time()
        t = time.perf_counter()
        out = run()
        elapsed = time.perf_counter() - t
        self.client_cpu += time.process_time() - cpu0
        for k, p in enumerate(self.others):
            self.other_cpu[k] += cpu_s(p) - other0[k]
        self.seconds += elapsed
        self.requests += requests
        self.rounds_rps.append(round(requests / elapsed))
        return out

    def us(self, cpu: float) -> float:
        return round(cpu / self.requests * 1e6, 1)


# -- 5. selection ------------------------------------------------------------------------------
def load_selection() -> ModuleType:
    """benchmarks/selection.py (not a package): its load simulation `run` is reused here."""
    path = Path(__file__).with_name("selection.py")
    spec = importlib.util.spec_from_file_location("_bench_selection", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def selection_costs(picks: int, seed: int = 1) -> dict[str, Any]:
    """µs per `pool.select(Selector.of(type=...))` over 1,000 candidates of one type, under the
    simulated 40 % load of benchmarks/selection.py, for least_loaded and round_robin."""
    sel = load_selection()
    out: dict[str, Any] = {"instances": 1000, "picks": picks}
    for strategy in ("least_loaded", "round_robin"):
        rng = random.Random(seed)
        pool = CandidatePool(rng=random.Random(seed))
        for k in range(1000):
            pool.add(
                Candidate(
                    f"{TYPE}-{k % 10}#{k // 10}",
                    f"{TYPE}-{k % 10}",
                    TYPE,
                    max_concurrency=4,
                    latency_ms=rng.uniform(2.0, 40.0),
                )
            )
        # Selector.of with no strategy: the pool's default (least_loaded).
        selector = Selector.of(type=TYPE, strategy=None if strategy == "least_loaded" else strategy)
        r = sel.run(pool, [selector], picks, sel.BUSY_SHARE, rng)
        out[strategy] = {
            "us_per_pick": r["us_per_pick"],
            "p50_us": r["p50_us"],
            "p99_us": r["p99_us"],
            "upkeep_us_per_request": r["upkeep_us_per_request"],
        }
    return out


# -- main --------------------------------------------------------------------------------------
def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="counts scaled down ~5x")
    parser.add_argument("--latency-requests", type=int, default=2000)
    parser.add_argument("--throughput-requests", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=15, help="runs per CLI timing")
    parser.add_argument("--picks", type=int, default=50_000, help="selections per strategy")
    args = parser.parse_args()
    scale = 5 if args.quick else 1
    n_lat = max(ROUNDS * 20, min(args.latency_requests, MAX_COUNT) // scale)
    n_tput = max(ROUNDS * WINDOW, min(args.throughput_requests, MAX_COUNT) // scale)
    runs = max(5, args.runs // scale)
    picks = max(1000, min(args.picks, MAX_COUNT) // scale)
    warmup = max(50, n_lat // 10)
    lat_block, tput_block = n_lat // ROUNDS, n_tput // ROUNDS
    n_lat, n_tput = lat_block * ROUNDS, tput_block * ROUNDS

    result: dict[str, Any] = {
        "benchmark": "dispatch",
        "machine": machine_info(),
        "source": source_state(),
        "counts": {
            "quick": args.quick,
            "rounds": ROUNDS,
            "latency_requests": n_lat,
            "latency_warmup": warmup,
            "throughput_requests": n_tput,
            "throughput_window": WINDOW,
            "cli_runs": runs,
            "selection_picks": picks,
        },
    }
    t_start = time.perf_counter()

    home = tempfile.mkdtemp(prefix="ebench", dir="/tmp")
    env = {**os.environ, "ENGCTL_HOME": home}
    os.environ["ENGCTL_HOME"] = home
    c = Client(home)
    daemon_pid: int | None = None
    direct: DirectWorker | None = None
    try:
        direct = DirectWorker()
        c.connect()
        daemon_pid = int(c.daemon_info["pid"])
        daemon = psutil.Process(daemon_pid)
        c.register(
            {
                "echo": {
                    "type": TYPE,
                    "command": ECHO,
                    "mode": "worker",
                    "instances": 2,
                    "max_concurrency": 32,
                    "restart": {"start_seconds": 0.1},
                }
            }
        )
        wait_for(lambda: all_ready(c, "echo", 2))
        workers = [psutil.Process(i["pid"]) for i in c.status(["echo"])["engines"][0]["instances"]]

        # Warm-up of both paths (first requests build the daemon's selection state).
        direct.latency(warmup)
        engctl_latency(c, warmup)
        direct.throughput(min(n_tput, 2000), WINDOW)
        engctl_throughput(c, min(n_tput, 2000), WINDOW, Counter())

        # Concurrency 1, alternating blocks.
        d_lat: list[float] = []
        e_lat: list[float] = []
        inner: list[float] = []
        d_c1, e_c1 = Meter([direct.ps]), Meter([daemon])
        for _ in range(ROUNDS):
            d_lat += d_c1.measure(lat_block, lambda: direct.latency(lat_block))
            samples, daemon_side = e_c1.measure(lat_block, lambda: engctl_latency(c, lat_block))
            e_lat += samples
            inner += daemon_side

        # Concurrency 64, alternating chunks.
        d_c64, e_c64 = Meter([direct.ps]), Meter([daemon, *workers])
        direct_errors = 0
        per_instance: Counter[str] = Counter()
        for _ in range(ROUNDS):
            direct_errors += d_c64.measure(
                tput_block, lambda: direct.throughput(tput_block, WINDOW)
            )[1]
            e_c64.measure(
                tput_block, lambda: engctl_throughput(c, tput_block, WINDOW, per_instance)
            )

        counts = instance_count(c, n_tput // 2)

        # As installed: pip compiles bytecode at install time, so the CLI runs here may write
        # it too (an environment with PYTHONDONTWRITEBYTECODE=1 would otherwise recompile
        # every engctl module on every run, which no installed copy does). The warm-up run of
        # each command writes what it needs.
        cli_env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
        exec_ms = median_ms([ENGCTL, "exec", "--type", TYPE, "--", "1"], runs, cli_env)
        version_ms = median_ms([ENGCTL, "--version"], runs, cli_env)
    finally:
        if direct is not None:
            direct.close()
        c.close()
        stop_daemon(home, daemon_pid)
        shutil.rmtree(home, ignore_errors=True)

    direct_lat, engctl_lat = latency_summary(d_lat), latency_summary(e_lat)
    direct_rps = d_c64.requests / d_c64.seconds
    engctl_rps = e_c64.requests / e_c64.seconds
    result["direct"] = {
        "latency_c1": direct_lat,
        "throughput_c64_rps": round(direct_rps),
        "throughput_rounds_rps": d_c64.rounds_rps,
        "throughput_errors": direct_errors,
        "cpu_us_per_request_c64": {
            "client": d_c64.us(d_c64.client_cpu),
            "worker": d_c64.us(d_c64.other_cpu[0]),
        },
    }
    result["engctl"] = {
        "instances": 2,
        "max_concurrency": 32,
        "latency_c1": engctl_lat,
        # The daemon's own latency_ms (request read -> reply built, worker included).
        "daemon_reported_latency_p50_ms": round(statistics.median(inner) * 1000, 4)
        if inner
        else None,
        "throughput_c64_rps": round(engctl_rps),
        "throughput_rounds_rps": e_c64.rounds_rps,
        "throughput_per_instance": dict(sorted(per_instance.items())),
        "cpu_us_per_request_c1": {
            "client": e_c1.us(e_c1.client_cpu),
            "daemon": e_c1.us(e_c1.other_cpu[0]),
        },
        "cpu_us_per_request_c64": {
            "client": e_c64.us(e_c64.client_cpu),
            "daemon": e_c64.us(e_c64.other_cpu[0]),
            "workers": e_c64.us(sum(e_c64.other_cpu[1:])),
        },
    }
    result["cli"] = {
        "exec_echo_ms": round(exec_ms, 1),
        "version_ms": round(version_ms, 1),
        "ratio": round(exec_ms / version_ms, 3),
    }

    # 5. selection cost.
    result["selection"] = selection_costs(picks)
    result["instance_count"] = counts

    # 3. derived figures and targets.
    added_p50 = engctl_lat["p50_ms"] - direct_lat["p50_ms"]
    ratio = engctl_rps / direct_rps
    sel = result["selection"]
    worst_pick = max(sel[s]["us_per_pick"] for s in ("least_loaded", "round_robin"))
    result["derived"] = {
        "added_p50_ms": round(added_p50, 4),
        "added_p99_ms": round(engctl_lat["p99_ms"] - direct_lat["p99_ms"], 4),
        "throughput_ratio": round(ratio, 3),
    }
    result["targets"] = {
        "added_p50_le_0_25ms": added_p50 <= TARGET_ADDED_P50_MS,
        "throughput_ratio_ge_0_35": ratio >= TARGET_THROUGHPUT_RATIO,
        "cli_exec_le_1_3x_version": result["cli"]["ratio"] <= TARGET_CLI_RATIO,
        "selection_le_50us_at_1000": worst_pick <= TARGET_SELECT_US,
        "instances_100_ge_0_75_of_2": counts["engctl_ratio"] >= TARGET_INSTANCE_COUNT_RATIO,
    }
    result["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
