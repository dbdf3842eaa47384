"""Peers benchmark (issue 13.6): engctl against what else runs the same echo work, side by side.

Run: `python benchmarks/peers.py [--quick] [--rounds 3]`. Prints one JSON object (every figure,
each round's own beside it, the table, and pass/fail of the targets) on stdout and the table on
stderr. Measured in the
same run, in alternating rounds so that other load on the machine hits every peer alike:

- direct: this process speaks the worker protocol over one echo worker's pipes (the ceiling:
  no daemon in between; it encodes and decodes with orjson, as engctl's client does);
- engctl: a fresh daemon in a temporary ENGCTL_HOME, 2 echo instances (32 slots each),
  `Client.exec` at c=1 and `Client.exec_many(window=64)` at c=64;
- ProcessPoolExecutor(2): the same echo function in 2 worker processes (pickle over pipes);
- Ray Serve's handle, when ray is installed (an optional peer, never a dependency: skipped
  with the reason when it cannot be imported).

Two payloads, a 96 B and a ~115 KB JSON document (records with text, numbers and tags), each at
c=1 (p50 latency) and c=64 (throughput). Targets: engctl leads every peer on every row (the
direct pipe is the ceiling, not a peer); at 115 KB, c=64 throughput ≥ 0.9 × direct and added
p50 ≤ 1 ms. `--quick` scales the counts down ~10× (CI smoke run). Loopback and local pipes only;
the daemon, its engines and the pools are stopped at the end, even on error.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import psutil
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
ECHO = [PY, "-m", "engctl.examples.echo_worker"]
WINDOW = 64
SMALL_BYTES = 96
LARGE_BYTES = 115 * 1024
TARGET_LARGE_RATIO = 0.9
TARGET_LARGE_ADDED_P50_MS = 1.0
EXECUTE = b'{"jsonrpc":"2.0","id":%d,"method":"execute","params":{"input":%s}}\n'


def payload(size: int) -> Any:
    """A JSON document of about `size` bytes (compact): records with text, numbers and tags."""
    if size <= 128:
        doc: dict[str, Any] = {"id": 7, "op": "classify", "text": ""}
        doc["text"] = "x" * (size - len(orjson.dumps(doc)))
        return doc
    records: list[dict[str, Any]] = []
    doc = {"model": "small", "records": records}
    k = 0
    while len(orjson.dumps(doc)) < size - 200:
        records.append(
            {
                "id": k,
                "name": f"record-{k:05d}",
                "score": round(k * 0.731 % 1, 6),
                "tags": ["alpha", "beta", "γ"][: 1 + k % 3],
                "text": "lorem ipsum dolor sit amet, consectetur adipiscing elit " * 2,
                "ok": k % 2 == 0,
            }
        )
        k += 1
    return doc


def echo(value: Any) -> Any:
    """The work every peer does: what `engctl.examples.echo_worker` answers."""
    return {"echo": value}


def p50_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 4)


# -- direct: the worker protocol over one echo worker's pipes --------------------------------
class Direct:
    """A worker-protocol client over one echo worker: writes and reads at once (select), so
    that 64 large requests in flight cannot deadlock on full pipes."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            ECHO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.wfd = self.proc.stdin.fileno()
        self.rfd = self.proc.stdout.fileno()
        first = orjson.loads(self.proc.stdout.readline())
        if first.get("method") != "ready":
            raise RuntimeError(f"echo worker did not say ready: {first!r}")
        os.set_blocking(self.wfd, False)
        self.next_id = 1
        self.inbuf = bytearray()
        # Reads into one buffer: a 1 MiB bytes object per read would be mapped and unmapped
        # by glibc each time (some 15 µs), a cost no well-written client pays.
        self.scratch = memoryview(bytearray(1 << 20))

    def run(self, value: Any, total: int, window: int) -> list[float]:
        """`total` requests with up to `window` in flight: the round trip of each, in seconds."""
        out = bytearray()
        started: dict[int, float] = {}
        times: list[float] = []
        sent = 0
        while len(times) < total:
            while sent < total and sent - len(times) < window:
                req_id = self.next_id
                self.next_id += 1
                out += EXECUTE % (req_id, orjson.dumps(value))
                started[req_id] = time.perf_counter()
                sent += 1
            readable, writable, _ = select.select([self.rfd], [self.wfd] if out else [], [])
            if writable:
                try:
                    n = os.write(self.wfd, out)
                except BlockingIOError:
                    n = 0
                del out[:n]
            if readable:
                n = os.readv(self.rfd, [self.scratch])
                if not n:
                    raise RuntimeError("echo worker closed its stdout")
                self.inbuf += self.scratch[:n]
                start = 0
                while (nl := self.inbuf.find(b"\n", start)) >= 0:
                    msg = orjson.loads(self.inbuf[start:nl])
                    start = nl + 1
                    if "result" not in msg:
                        raise RuntimeError(f"echo worker failed: {msg!r}")
                    times.append(time.perf_counter() - started.pop(msg["id"]))
                del self.inbuf[:start]
        return times

    def check(self, value: Any) -> None:
        os.set_blocking(self.wfd, True)
        os.write(self.wfd, EXECUTE % (0, orjson.dumps(value)))
        os.set_blocking(self.wfd, False)
        line = b""
        while not line.endswith(b"\n"):
            line += os.read(self.rfd, 1 << 20)
        if orjson.loads(line)["result"] != echo(value):
            raise RuntimeError("direct: wrong echo")

    def close(self) -> None:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(timeout=5)
        except Exception:
            self.proc.kill()
            self.proc.wait()


# -- engctl ----------------------------------------------------------------------------------
def engctl_run(c: Client, value: Any, total: int, window: int) -> list[float]:
    """`total` requests through the daemon: one at a time (`exec`, each timed) or `window` in
    flight (`exec_many`; the mean time per request, repeated)."""
    if window == 1:
        times = []
        for _ in range(total):
            t = time.perf_counter()
            obj = c.exec(value, type="echo")
            times.append(time.perf_counter() - t)
            if not obj["ok"]:
                raise RuntimeError(f"engctl: {obj!r}")
        return times

    def inputs() -> Iterator[Any]:
        for _ in range(total):
            yield value

    t = time.perf_counter()
    n = 0
    for obj in c.exec_many(inputs(), window=window, type="echo"):
        n += 1
        if not obj["ok"]:
            raise RuntimeError(f"engctl: {obj!r}")
    return [(time.perf_counter() - t) / max(n, 1)] * n


# -- ProcessPoolExecutor(2) ------------------------------------------------------------------
def pool_run(
    ex: concurrent.futures.ProcessPoolExecutor, value: Any, total: int, window: int
) -> list[float]:
    """`total` echo calls with up to `window` futures in flight: each one's time, in seconds."""
    times: list[float] = []
    flight: collections.deque[tuple[float, concurrent.futures.Future[Any]]] = collections.deque()
    sent = 0
    while len(times) < total:
        while sent < total and len(flight) < window:
            flight.append((time.perf_counter(), ex.submit(echo, value)))
            sent += 1
        t, fut = flight.popleft()
        fut.result()
        times.append(time.perf_counter() - t)
    return times


# -- Ray Serve (optional) --------------------------------------------------------------------
Run = Callable[[Any, int, int], list[float]]


def _nothing() -> None:
    pass


def ray_peer() -> tuple[Run | None, str, Callable[[], None]]:
    """Ray Serve's handle over a 2-replica echo deployment, or None and why not."""
    try:
        import ray  # type: ignore[import-not-found, unused-ignore]
        from ray import serve  # type: ignore[import-not-found, unused-ignore]
    except ImportError as exc:
        return None, f"skipped: ray is not installed ({exc})", _nothing
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)

    @serve.deployment(num_replicas=2, max_ongoing_requests=32)  # type: ignore[misc, unused-ignore]
    class Echo:
        def __call__(self, value: Any) -> Any:
            return echo(value)

    handle = serve.run(Echo.bind())  # type: ignore[attr-defined, unused-ignore]

    def run(value: Any, total: int, window: int) -> list[float]:
        times: list[float] = []
        flight: collections.deque[tuple[float, Any]] = collections.deque()
        sent = 0
        while len(times) < total:
            while sent < total and len(flight) < window:
                flight.append((time.perf_counter(), handle.remote(value)))
                sent += 1
            t, resp = flight.popleft()
            resp.result()
            times.append(time.perf_counter() - t)
        return times

    def close() -> None:
        serve.shutdown()
        ray.shutdown()

    return run, "ray serve handle, 2 replicas", close


# -- main ------------------------------------------------------------------------------------
def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="counts scaled down ~10x")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (3)")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    # Requests per round, per (payload, concurrency).
    counts = {
        ("96B", 1): int(1500 * scale),
        ("96B", WINDOW): int(20000 * scale),
        ("115KB", 1): int(200 * scale),
        ("115KB", WINDOW): int(1000 * scale),
    }
    values = {"96B": payload(SMALL_BYTES), "115KB": payload(LARGE_BYTES)}
    result: dict[str, Any] = {
        "benchmark": "peers",
        "machine": machine_info(),
        "source": source_state(),
        "quick": args.quick,
        "payload_bytes": {k: len(orjson.dumps(v)) for k, v in values.items()},
    }
    home = tempfile.mkdtemp(prefix="ebench", dir="/tmp")
    os.environ["ENGCTL_HOME"] = home
    c = Client(home)
    daemon_pid: int | None = None
    direct: Direct | None = None
    pool = concurrent.futures.ProcessPoolExecutor(2)
    ray_run: Run | None = None
    ray_note, ray_close = "", _nothing
    try:
        direct = Direct()
        c.connect()
        daemon_pid = int(c.daemon_info["pid"])
        daemon = psutil.Process(daemon_pid)
        c.register(
            {
                "echo": {
                    "type": "echo",
                    "command": ECHO,
                    "mode": "worker",
                    "instances": 2,
                    "max_concurrency": 32,
                    "restart": {"start_seconds": 0.1},
                }
            }
        )
        wait_for(lambda: all_ready(c, "echo", 2))
        ray_run, ray_note, ray_close = ray_peer()
        d, e = direct, c
        peers: dict[str, Run] = {
            "direct": lambda v, n, w: d.run(v, n, w),
            "engctl": lambda v, n, w: engctl_run(e, v, n, w),
            "ppe2": lambda v, n, w: pool_run(pool, v, n, w),
        }
        if ray_run is not None:
            peers["ray_serve"] = ray_run
        for value in values.values():  # warm-up, and the echo is right everywhere
            direct.check(value)
            if c.exec(value, type="echo")["result"] != echo(value):
                raise RuntimeError("engctl: wrong echo")
            for run in peers.values():
                run(value, 20, WINDOW)
        times: dict[tuple[str, str, int], list[float]] = collections.defaultdict(list)
        seconds: dict[tuple[str, str, int], float] = collections.defaultdict(float)
        # Each round's own figure: this machine's speed drifts from one minute to the next,
        # and the rounds show how far (the row's figure is over all rounds).
        per_round: dict[tuple[str, str, int], list[float]] = collections.defaultdict(list)
        daemon_cpu: dict[tuple[str, int], float] = collections.defaultdict(float)
        for _ in range(args.rounds):
            for (size, window), n in counts.items():
                for name, run in peers.items():
                    cpu0 = daemon.cpu_times()
                    t = time.perf_counter()
                    got = run(values[size], n, window)
                    took = time.perf_counter() - t
                    times[name, size, window] += got
                    seconds[name, size, window] += took
                    per_round[name, size, window].append(
                        p50_ms(got) if window == 1 else round(n / took, 1)
                    )
                    if name == "engctl":
                        cpu1 = daemon.cpu_times()
                        daemon_cpu[size, window] += (cpu1.user + cpu1.system) - (
                            cpu0.user + cpu0.system
                        )
        rows = []
        for (size, window), n in counts.items():
            total = n * args.rounds
            row: dict[str, Any] = {"payload": size, "concurrency": window}
            for name in peers:
                key = (name, size, window)
                if window == 1:
                    row[name] = {"p50_ms": p50_ms(times[key]), "rounds_p50_ms": per_round[key]}
                else:
                    rps = round(total / seconds[key], 1)
                    row[name] = {"rps": rps, "rounds_rps": per_round[key]}
            figure = "p50_ms" if window == 1 else "rps"
            mine = row["engctl"][figure]
            others = [row[p][figure] for p in peers if p not in ("engctl", "direct")]
            row["engctl_leads"] = all(
                mine <= other if window == 1 else mine >= other for other in others
            )
            row["engctl_daemon_cpu_us_per_request"] = round(
                daemon_cpu[size, window] / total * 1e6, 1
            )
            if window == 1:
                row["engctl_added_p50_ms"] = round(mine - row["direct"]["p50_ms"], 4)
            else:
                row["engctl_over_direct"] = round(mine / row["direct"]["rps"], 3)
            rows.append(row)
        result["rows"] = rows
        result["peers"] = list(peers)
        result["ray_serve"] = ray_note if ray_run is None else "measured"
        large_c1 = next(r for r in rows if r["payload"] == "115KB" and r["concurrency"] == 1)
        large_c64 = next(r for r in rows if r["payload"] == "115KB" and r["concurrency"] > 1)
        result["targets"] = {
            "engctl_leads_every_peer_on_every_row": all(r["engctl_leads"] for r in rows),
            "large_c64_ge_0_9x_direct": large_c64["engctl_over_direct"] >= TARGET_LARGE_RATIO,
            "large_added_p50_le_1ms": large_c1["engctl_added_p50_ms"] <= TARGET_LARGE_ADDED_P50_MS,
        }
        result["table"] = table(rows, list(peers))
        result["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
        print("\n".join(result["table"]), file=sys.stderr)
    finally:
        ray_close()
        pool.shutdown(cancel_futures=True)
        if direct is not None:
            direct.close()
        c.close()
        stop_daemon(home, daemon_pid)
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(result, indent=2))


def table(rows: list[dict[str, Any]], peers: list[str]) -> list[str]:
    """The rows as a text table: p50 ms at c=1, requests/s at c=64."""
    head = f"{'payload':>8} {'c':>3} {'figure':>7} " + " ".join(f"{p:>10}" for p in peers)
    lines = [head]
    for r in rows:
        figure = "p50_ms" if r["concurrency"] == 1 else "rps"
        cells = " ".join(f"{r[p][figure]:>10}" for p in peers)
        lines.append(f"{r['payload']:>8} {r['concurrency']:>3} {figure:>7} {cells}")
    return lines


if __name__ == "__main__":
    main()
