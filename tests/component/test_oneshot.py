"""Oneshot engines as first-class engines (issue 10.22): runs at once up to max_concurrency,
their stderr in the engine's log, their requests in report, top and Prometheus."""

from __future__ import annotations

import json
import threading
from pathlib import Path

from tests.conftest import Home, engine_cmd, wait_until


def test_oneshot_runs_up_to_max_concurrency_at_once_and_says_so(
    daemon: Home, tmp_path: Path
) -> None:
    """max_concurrency of a oneshot engine is how many runs go at once (shown by status and
    list); the default is 1, and says so."""
    trace = tmp_path / "trace"
    command = f"echo start >> {trace}; sleep 0.5; echo end >> {trace}; echo done"
    daemon.register("par", [command], shell=True, mode="oneshot", type="P", max_concurrency=3)
    daemon.register("one", engine_cmd("oneshot_upper.py"), mode="oneshot", type="U")

    results: list[object] = []

    def run() -> None:
        with daemon.client(timeout=60) as c:
            results.append(c.exec("x", type="P", timeout=20)["result"])

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == ["done"] * 3
    # All three started before the first one ended: they ran at once.
    assert trace.read_text().split()[:3] == ["start"] * 3

    engines = {e["name"]: e for e in daemon.status()["engines"]}
    assert engines["par"]["max_concurrency"] == 3
    assert engines["one"]["max_concurrency"] == 1
    with daemon.client(timeout=60) as c:
        listed = {e["name"]: e for e in c.call("engine.list")["engines"]}
    assert (listed["par"]["max_concurrency"], listed["one"]["max_concurrency"]) == (3, 1)
    r = daemon.cli("status")
    assert "oneshot ×3" in r.stdout
    assert "oneshot ×1" in r.stdout


def test_oneshot_stderr_goes_to_the_engine_log(daemon: Home) -> None:
    """The stderr of every run goes to NAME.oneshot.log, read by `engctl logs NAME`, with
    engctl's own lines on each run's start and exit."""
    daemon.register("bad", engine_cmd("oneshot_upper.py", "7"), mode="oneshot", type="U")
    with daemon.client(timeout=60) as c:
        for _ in range(2):
            assert c.exec_many(["x"], type="U").__next__()["ok"] is False
    log = daemon.paths.log_dir / "bad.oneshot.log"
    wait_until(lambda: log.exists() and log.read_text().count("exit code 7") == 2)
    r = daemon.cli("logs", "bad", "-n", "20")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert sum("stderr: oneshot failing on purpose with 7" in ln for ln in lines) == 2
    assert sum(" engctl: " in ln and "started pid" in ln for ln in lines) == 2
    assert sum(" engctl: pid " in ln and "exit code 7 after" in ln for ln in lines) == 2
    r = daemon.cli("logs", "bad#oneshot", "-n", "1")  # the id reports name it by
    assert r.returncode == 0 and "exit code 7" in r.stdout, r.stderr


def test_oneshot_requests_show_in_report_top_and_metrics(daemon: Home) -> None:
    """A oneshot engine's requests are figures like an instance's (`NAME#oneshot`): in the
    history report, in `top --json` and in the Prometheus exposition."""
    daemon.register("up", engine_cmd("oneshot_upper.py"), mode="oneshot", type="U")
    with daemon.client(timeout=60) as c:
        assert all(r["ok"] for r in c.exec_many(["a", "b", "c"], type="U"))
    r = daemon.cli("top", "--json")
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)["instances"]
    assert row["id"] == "up#oneshot" and row["state"] == "oneshot"
    assert row["success_rate"] == 1.0 and row["in_flight"] == 0

    with daemon.client(timeout=60) as c:
        c.call("metrics.flush")
    r = daemon.cli("report", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    [engine] = doc["engines"]
    assert engine["name"] == "up" and engine["requests"] == 3 and engine["ok"] == 3
    assert [i["id"] for i in engine["instances"]] == ["up#oneshot"]
    assert engine["latency"]["count"] == 3

    r = daemon.cli("metrics", "--json")
    [family] = [f for f in json.loads(r.stdout)["families"] if f["name"] == "engctl_requests"]
    ok = [
        s["value"]
        for s in family["samples"]
        if "up#oneshot" in s["labels"].values() and s["labels"]["outcome"] == "ok"
    ]
    assert ok == [3]
