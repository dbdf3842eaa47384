"""Metrics, /metrics and history with a real daemon and echo workers: the Prometheus
exposition parses and counts the requests, the scrape endpoint exists only when enabled,
metrics.flush makes a report see everything up to now, `metrics = false` writes no history,
and the history survives `kill -9` (readable, intact, appended to by the next daemon) and a
graceful restart."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, cast

import psutil
from prometheus_client.parser import text_string_to_metric_families

from engctl.client import Client
from engctl.daemon.monitor import QUIET_AFTER, QUIET_STRIDE
from engctl.report import make_report
from tests.conftest import PY, Home, engine_cmd, wait_until
from tests.daemon_support import all_ready, daemon_processes, engine_processes, gone

MiB = 1024 * 1024

ECHO = [PY, "-m", "engctl.examples.echo_worker"]
QUICK: dict[str, Any] = {"restart": {"start_seconds": 0.1, "backoff": {"initial": 0.05}}}
FAMILIES = {
    "engctl_requests": "counter",
    "engctl_request_latency_seconds": "histogram",
    "engctl_in_flight": "gauge",
    "engctl_instance_success_ratio": "gauge",
    "engctl_instance_cpu_percent": "gauge",
    "engctl_instance_rss_bytes": "gauge",
    "engctl_instance_restarts": "counter",
    "engctl_instance_isolations": "counter",
    "engctl_instance_state_seconds": "counter",
    "engctl_instance_status": "gauge",
    "engctl_instance_effective_weight": "gauge",
    "engctl_queue_length": "gauge",
    "engctl_host_cpu_percent": "gauge",
    "engctl_host_memory_used_bytes": "gauge",
    "engctl_host_memory_total_bytes": "gauge",
    "engctl_host_disk_read_bytes": "counter",
    "engctl_host_disk_written_bytes": "counter",
    "engctl_host_network_sent_bytes": "counter",
    "engctl_host_network_received_bytes": "counter",
    "engctl_protocol_errors": "counter",
}


# -- helpers -------------------------------------------------------------------------------


def echo(home: Home, name: str = "e", instances: int = 2, type: str = "echo") -> None:
    """Register an echo engine and wait until its instances are ready, and until the monitor
    sampled at least once (host figures and queue samples exist)."""
    home.register(name, ECHO, type=type, instances=instances, **QUICK)
    wait_until(lambda: all_ready(home, name, instances), 20)
    with home.client() as c:
        wait_until(lambda: c.call("metrics.live")["host"] is not None, 10)


def run_requests(home: Home, n: int, type: str = "echo") -> None:
    with home.client() as c:
        results = list(c.exec_many(range(n), type=type, window=8))
    assert len(results) == n
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]][:3]


def flush(home: Home) -> dict[str, Any]:
    with home.client() as c:
        return c.call("metrics.flush")  # type: ignore[no-any-return]


def report(home: Home, since: float = 600.0, engine: str | None = None) -> dict[str, Any]:
    now = time.time()
    doc = make_report(home.paths.history_db, home.paths.events_db, now - since, now, engine)
    return cast("dict[str, Any]", doc)


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(fam: Any, suffix: str = "", **labels: str) -> list[Any]:
    return [
        s
        for s in fam.samples
        if s.name == fam.name + suffix and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_get(port: int, path: str, method: str = "GET") -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type") or "", resp.read()
    finally:
        conn.close()


def tcp_listeners(pid: int) -> list[tuple[str, int]]:
    proc = psutil.Process(pid)
    conns = (
        proc.net_connections("tcp") if hasattr(proc, "net_connections") else proc.connections("tcp")
    )
    return [(c.laddr.ip, c.laddr.port) for c in conns if c.status == psutil.CONN_LISTEN]


def integrity(path: Path) -> str:
    conn = sqlite3.connect(path, timeout=10)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def rollup_count(path: Path) -> int:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM rollup").fetchone()[0])
    finally:
        conn.close()


def write_config(home: Home, body: str) -> None:
    home.paths.config_file.parent.mkdir(parents=True, exist_ok=True)
    home.paths.config_file.write_text(f"[daemon]\n{body}\n")


def daemon_pid(home: Home) -> int:
    with home.client(autostart=False) as c:
        pid = int(c.call("daemon.status")["pid"])
    assert pid == home.daemon_pid()
    return pid


# -- the exposition -------------------------------------------------------------------------


def test_metrics_get_parses_and_counts_requests(daemon: Home) -> None:
    """After 60 requests on two instances, the exposition parses with prometheus-client's
    parser, has every family, and its counters and histogram add up to 60."""
    echo(daemon)
    run_requests(daemon, 60)
    with daemon.client() as c:
        text = c.metrics()
    fams = families(text)
    assert {n: f.type for n, f in fams.items() if n in FAMILIES} == FAMILIES
    ids = {"e#0", "e#1"}

    req = fams["engctl_requests"]
    ok = samples(req, "_total", outcome="ok")
    assert {s.labels["engine_instance"] for s in ok} == ids
    assert all(s.labels["engine"] == "e" and s.labels["type"] == "echo" for s in ok)
    assert sum(s.value for s in ok) == 60
    for outcome in ("error", "timeout", "lost"):
        assert sum(s.value for s in samples(req, "_total", outcome=outcome)) == 0

    lat = fams["engctl_request_latency_seconds"]
    assert sum(s.value for s in samples(lat, "_count")) == 60
    for inst in ids:
        buckets = samples(lat, "_bucket", engine_instance=inst)
        values = [s.value for s in buckets]
        assert values == sorted(values)  # cumulative
        assert buckets[-1].labels["le"] == "+Inf"
        (count,) = samples(lat, "_count", engine_instance=inst)
        assert values[-1] == count.value
        (total,) = samples(lat, "_sum", engine_instance=inst)
        assert 0 < total.value < count.value * 1.0  # an echo answers in far under a second

    assert [s.value for s in fams["engctl_in_flight"].samples] == [0, 0]
    assert [s.value for s in fams["engctl_instance_success_ratio"].samples] == [1.0, 1.0]
    status = fams["engctl_instance_status"].samples
    assert {s.labels["engine_instance"]: s.labels["state"] for s in status} == {
        "e#0": "ready",
        "e#1": "ready",
    }
    assert all(s.labels["eligibility"] == "active" and s.value == 1 for s in status)
    assert [(s.labels, s.value) for s in fams["engctl_queue_length"].samples] == [
        ({"type": "echo"}, 0)
    ]
    assert all(s.value > 0 for s in fams["engctl_instance_rss_bytes"].samples)
    ready = samples(fams["engctl_instance_state_seconds"], "_total", state="ready")
    assert {s.labels["engine_instance"] for s in ready} == ids and all(s.value > 0 for s in ready)
    assert [s.value for s in fams["engctl_instance_restarts"].samples] == [0, 0]
    assert fams["engctl_host_memory_total_bytes"].samples[0].value > 0
    assert fams["engctl_protocol_errors"].samples[0].value == 0
    # No label Prometheus sets itself on a scrape (issue 10.23: it arrived as
    # exported_instance).
    assert not {k for f in fams.values() for s in f.samples for k in s.labels} & {"instance", "job"}


def test_errors_and_actions_reach_metrics_and_report(daemon: Home) -> None:
    """A worker failing every 2nd request: outcome="error" counters, a 0.5 success ratio, a
    histogram of the successes only; the report then names the instance among the worst,
    suggests investigating its errors with the real numbers, and lists an isolation made by
    hand with its reason."""
    daemon.register(
        "f", engine_cmd("flaky.py"), type="flaky",
        policy={"failing": {"consecutive_errors": 1000, "min_requests": 1000}}, **QUICK,
    )  # fmt: skip
    wait_until(lambda: all_ready(daemon, "f", 1), 20)
    with daemon.client() as c:
        results = list(c.exec_many(range(40), type="flaky", window=8))
        assert sum(1 for r in results if r["ok"]) == 20
        fams = families(c.metrics())
        c.isolate(["f#0"], reason="looked wrong to the test")
    req = fams["engctl_requests"]
    assert [s.value for s in samples(req, "_total", outcome="ok")] == [20]
    assert [s.value for s in samples(req, "_total", outcome="error")] == [20]
    assert [s.value for s in fams["engctl_instance_success_ratio"].samples] == [0.5]
    assert [s.value for s in samples(fams["engctl_request_latency_seconds"], "_count")] == [20]

    flush(daemon)
    r = report(daemon)
    assert (r["totals"]["ok"], r["totals"]["errors"]) == (20, 20)
    assert r["worst"]["by_error_rate"] == [{"instance": "f#0", "error_rate": 0.5, "requests": 40}]
    s = next(s for s in r["suggestions"] if s["kind"] == "investigate_errors")
    assert s["target"] == "f#0"
    assert s["evidence"] == {"error_rate": 0.5, "requests": 40, "errors": 20, "timeouts": 0,
                             "lost": 0}  # fmt: skip
    isolated = [a for a in r["actions"] if a["kind"] == "instance.isolated"]
    assert len(isolated) == 1
    assert isolated[0]["instance"] == "f#0"
    assert "looked wrong to the test" in isolated[0]["reason"]


# -- /metrics ------------------------------------------------------------------------------


def test_metrics_served_on_the_port_when_enabled(home: Home) -> None:
    """metrics_port in [daemon]: GET /metrics answers 200 text/plain with the exposition on
    127.0.0.1 only; any other path is 404, another method 405."""
    port = free_port()
    home.start_daemon(metrics_port=port)
    echo(home, instances=1)
    run_requests(home, 7)
    status, ctype, body = http_get(port, "/metrics")
    assert status == 200
    assert ctype.startswith("text/plain") and "version=0.0.4" in ctype
    fams = families(body.decode())
    ok = samples(fams["engctl_requests"], "_total", outcome="ok")
    assert sum(s.value for s in ok) == 7
    assert set(FAMILIES) <= set(fams)
    # a query string does not matter; a HEAD has the headers only
    assert http_get(port, "/metrics?x=1")[0] == 200
    head = http_get(port, "/metrics", "HEAD")
    assert head[0] == 200 and head[2] == b""
    status, _, body = http_get(port, "/")
    assert status == 404 and b"/metrics" in body
    assert http_get(port, "/metrics/extra")[0] == 404
    assert http_get(port, "/metrics", "POST")[0] == 405
    assert tcp_listeners(daemon_pid(home)) == [("127.0.0.1", port)]


def test_nothing_listens_when_disabled(daemon: Home) -> None:
    """By default the daemon opens no TCP port at all (only its Unix socket)."""
    echo(daemon, instances=1)
    run_requests(daemon, 3)
    assert tcp_listeners(daemon_pid(daemon)) == []


def test_a_busy_metrics_port_fails_the_start_in_one_line(home: Home) -> None:
    """A port already taken: `daemon start` exits 3 with one line naming the address, and no
    daemon stays behind."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        write_config(home, f"metrics_port = {port}")
        r = home.cli("daemon", "start")
    assert r.returncode == 3
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert "address already in use" in lines[0] and str(port) in lines[0]
    # the failed daemon reported the error and is exiting
    wait_until(lambda: daemon_processes(home) == [], 10)


def test_daemon_run_metrics_port_overrides_the_config(home: Home) -> None:
    """`engctl daemon run --metrics-port N` (python -m engctl.daemon --metrics-port N) serves
    on N even when config.toml names another port, which stays closed."""
    configured, wanted = free_port(), free_port()
    write_config(home, f"metrics_port = {configured}")
    proc = subprocess.Popen(
        [PY, "-m", "engctl", "daemon", "run", "--metrics-port", str(wanted)],
        env=home.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def serving() -> bool:
            with contextlib.suppress(OSError):
                return http_get(wanted, "/metrics")[0] == 200
            return False

        wait_until(serving, 20)
        assert home.daemon_pid() == proc.pid  # exec'd: the daemon is this process
        assert tcp_listeners(proc.pid) == [("127.0.0.1", wanted)]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


# -- history ---------------------------------------------------------------------------------


def test_flush_then_report_shows_the_requests(daemon: Home) -> None:
    """metrics.flush writes the 10 s bucket being filled: a report read right after has
    every request, per instance and engine, with latencies, queue samples and host figures."""
    echo(daemon)
    run_requests(daemon, 40)
    result = flush(daemon)
    assert result["rows"] >= 3  # two instances, the type, the host
    r = report(daemon)
    assert r["totals"]["requests"] == 40
    assert r["totals"]["ok"] == 40 and r["totals"]["success_rate"] == 1.0
    assert r["totals"]["latency"]["count"] == 40
    p50, p99, mx = (r["totals"]["latency"][k] for k in ("p50_ms", "p99_ms", "max_ms"))
    assert 0 < p50 <= p99 <= mx < 1000
    (e,) = r["engines"]
    assert (e["name"], e["type"], e["requests"]) == ("e", "echo", 40)
    assert [i["id"] for i in e["instances"]] == ["e#0", "e#1"]
    assert sum(i["requests"] for i in e["instances"]) == 40
    assert all(i["rss_bytes_max"] and i["state_seconds"].get("ready", 0) > 0
               for i in e["instances"])  # fmt: skip
    assert all(i["cpu_percent_mean"] is not None for i in e["instances"])
    (t,) = r["types"]
    assert t["type"] == "echo" and t["instances"] == 2 and t["samples"] >= 1
    assert r["host"]["memory_total"] and r["host"]["cpu_percent_mean"] is not None
    assert r["period"]["bucket_seconds"] == 10
    # A second flush adds only what came since.
    run_requests(daemon, 5)
    flush(daemon)
    assert report(daemon)["totals"]["requests"] == 45
    assert report(daemon, engine="e")["totals"]["requests"] == 45
    assert report(daemon, engine="other")["engines"] == []


def test_a_reader_holding_a_snapshot_does_not_block_flush(daemon: Home) -> None:
    """WAL: a report's open read transaction neither blocks the daemon's writes nor sees them
    before it ends."""
    echo(daemon, instances=1)
    run_requests(daemon, 5)
    flush(daemon)
    conn = sqlite3.connect(f"file:{daemon.paths.history_db}?mode=ro", uri=True, timeout=10)
    try:
        conn.execute("BEGIN")
        before = conn.execute("SELECT SUM(requests) FROM rollup WHERE tier = 10").fetchone()[0]
        run_requests(daemon, 6)
        started = time.monotonic()
        flush(daemon)
        assert time.monotonic() - started < 5
        same = conn.execute("SELECT SUM(requests) FROM rollup WHERE tier = 10").fetchone()[0]
        assert same == before == 5
        conn.execute("COMMIT")
    finally:
        conn.close()
    assert report(daemon)["totals"]["requests"] == 11


def test_metrics_off_writes_no_history_but_serves_metrics(home: Home) -> None:
    """`metrics = false`: no history file, flush writes nothing, reports are empty; the
    exposition (engctl metrics and /metrics) still counts requests."""
    port = free_port()
    write_config(home, f"metrics = false\nmetrics_port = {port}")
    home.start_daemon()
    echo(home, instances=1)
    run_requests(home, 9)
    assert flush(home) == {"rows": 0}
    assert not home.paths.history_db.exists()
    assert report(home)["totals"]["requests"] == 0
    with home.client() as c:
        fams = families(c.metrics())
        live = c.call("metrics.live")
    assert sum(s.value for s in samples(fams["engctl_requests"], "_total", outcome="ok")) == 9
    assert "e#0" in live["instances"]
    status, ctype, body = http_get(port, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert "engctl_requests_total" in body.decode()
    assert not home.paths.history_db.exists()


class Load:
    """Requests and flushes from two threads until stopped (or the daemon goes away)."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.stop = threading.Event()
        self.done = 0  # answers received
        self.flushed_ok = 0  # answers received before the start of a flush that succeeded
        self.flushes = 0
        self.threads = [
            threading.Thread(target=self._requests, daemon=True),
            threading.Thread(target=self._flushes, daemon=True),
        ]

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(20)
        assert not any(t.is_alive() for t in self.threads)

    def _client(self) -> Client:
        # Never autostart: a daemon killed under the load must stay dead.
        return Client(self.home.path, autostart=False, timeout=20)

    def _requests(self) -> None:
        with contextlib.suppress(Exception), self._client() as c:
            while not self.stop.is_set():
                for r in c.exec_many(range(20), type="echo", window=8):
                    assert r["ok"]
                    self.done += 1

    def _flushes(self) -> None:
        with contextlib.suppress(Exception), self._client() as c:
            while not self.stop.is_set():
                answered = self.done
                c.call("metrics.flush")
                self.flushed_ok = answered
                self.flushes += 1
                time.sleep(0.02)


def test_kill_9_during_writes_leaves_intact_databases(home: Home) -> None:
    """SIGKILL while requests flow and buckets are flushed: both databases open read-only
    for a report and pass integrity_check; at most the bucket being filled is lost; a new
    daemon on the same home stops the old engines and keeps appending."""
    home.start_daemon()
    echo(home)
    old_engines = engine_processes(home)
    assert len(old_engines) == 2
    pid = daemon_pid(home)
    with Load(home) as load:
        wait_until(lambda: load.flushes >= 10 and load.done >= 300, 30)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: gone(pid), 10)  # dead (a zombie until init reaps it)

    # Read with no daemon at all: a WAL reader needs nothing from the writer.
    r = report(home)
    assert r["totals"]["ok"] >= load.flushed_ok > 0
    assert r["totals"]["ok"] <= load.done + 8  # never more than was answered (+ a window)
    assert integrity(home.paths.history_db) == "ok"
    assert integrity(home.paths.events_db) == "ok"
    rows_before = rollup_count(home.paths.history_db)
    counted = r["totals"]["requests"]

    # The next daemon ends the old generation, restarts the engine, and appends.
    home.start_daemon()
    wait_until(lambda: all(gone(p) for p in old_engines), 20)
    wait_until(lambda: all_ready(home, "e", 2), 20)
    run_requests(home, 25)
    flush(home)
    assert rollup_count(home.paths.history_db) > rows_before
    assert report(home)["totals"]["requests"] == counted + 25
    assert not (engine_processes(home) & old_engines)


def test_history_survives_a_graceful_restart(home: Home) -> None:
    """A graceful stop writes the partial buckets (no flush needed); the next daemon adds to
    the same file; the report counts each request exactly once."""
    home.start_daemon()
    echo(home)
    run_requests(home, 30)
    pid = daemon_pid(home)
    r = home.cli("daemon", "stop")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: gone(pid), 20)
    assert report(home)["totals"]["requests"] == 30
    assert integrity(home.paths.history_db) == "ok"

    home.start_daemon()
    wait_until(lambda: all_ready(home, "e", 2), 20)
    run_requests(home, 20)
    flush(home)
    r2 = report(home)
    assert r2["totals"]["requests"] == 50
    assert r2["totals"]["latency"]["count"] == 50
    assert r2["period"]["bucket_seconds"] == 10
    (e,) = r2["engines"]
    assert sum(i["requests"] for i in e["instances"]) == 50


def test_status_shows_a_quiet_instance_read_no_longer_ago_than_the_interval(
    home: Home, tmp_path: Path
) -> None:
    """Issue 13.1 (regression guard of the quiet schedule): an idle instance is read only
    every few intervals, but `status` never shows a reading older than `sample_interval`:
    it waits for a fresh one. Three times, a process idle long enough to be quiet grows by
    40 MiB; one interval later, status shows it."""
    interval = 0.25
    home.start_daemon(sample_interval=interval)
    marker = tmp_path / "grown"
    home.register("g", engine_cmd("grow_on_signal.py", str(marker)), mode="service")
    pid = home.wait_state("g#0", "ready")["pid"]
    for n in (1, 2, 3):
        # Idle for longer than it takes to become quiet (same readings, then a stride).
        time.sleep(interval * (QUIET_AFTER + QUIET_STRIDE + 2))
        before = home.instance("g#0")["rss_bytes"]
        os.kill(pid, signal.SIGUSR1)
        wait_until(lambda: marker.exists() and marker.read_text() == str(n), 10)  # noqa: B023
        # A kept reading older than the interval is taken again; so is any, if the monitor
        # is late by more than two intervals (a loaded machine).
        time.sleep(interval * 2.5)
        rss = home.instance("g#0")["rss_bytes"]
        assert rss >= before + 35 * MiB, (n, before, rss)
