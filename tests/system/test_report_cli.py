"""`engctl report` and `engctl metrics` end to end: text and --json (the documented schema),
--since and --engine, exit codes and one-line errors, and a report read from the files with
the daemon stopped."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import datetime
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engctl.errors import EXIT_NOT_FOUND, EXIT_USAGE, EngineNotFoundError, UsageError
from tests.conftest import PY, Home, wait_until
from tests.daemon_support import all_ready, daemon_processes, gone
from tests.unit.test_report import SCHEMA_OF_REPORT, check_schema

ECHO = [PY, "-m", "engctl.examples.echo_worker"]
QUICK: dict[str, Any] = {"restart": {"start_seconds": 0.1, "backoff": {"initial": 0.05}}}


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    return lines[0]


def no_daemon(home: Home) -> None:
    """No daemon runs in this home (a stopped one may linger as init's zombie)."""
    pid = home.daemon_pid()
    assert pid is None or gone(pid)
    assert daemon_processes(home) == []


def report_json(home: Home, *args: str) -> dict[str, Any]:
    r = home.cli("report", "--json", *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1  # one compact document in a pipe
    doc = json.loads(r.stdout)
    check_schema(doc, SCHEMA_OF_REPORT)
    return doc  # type: ignore[no-any-return]


@pytest.fixture
def served(daemon: Home) -> Home:
    """A daemon with engines `e` (2 echo instances, type echo) and `z` (1, type zed) that
    answered 30 and 5 requests."""
    with daemon.client() as c:
        c.register({"e": {"command": ECHO, "type": "echo", "instances": 2, **QUICK},
                    "z": {"command": ECHO, "type": "zed", **QUICK}})  # fmt: skip
    wait_until(lambda: all_ready(daemon, "e", 2) and all_ready(daemon, "z", 1), 20)
    with daemon.client() as c:
        assert all(r["ok"] for r in c.exec_many(range(30), type="echo"))
        assert all(r["ok"] for r in c.exec_many(range(5), type="zed"))
    return daemon


def test_report_text(served: Home) -> None:
    """The text report names the period, totals, every engine and instance, and says when
    there is no action or suggestion; the daemon's current bucket is included (no wait)."""
    r = served.cli("report")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # The history of a daemon started seconds ago covers only part of the hour: said too.
    header = r"^Report: .* → .* \(1h\S*, history for \S+ of it, 10 s buckets\)"
    assert re.search(header, out, re.M), out
    assert re.search(r"^35 requests, 100\.00% ok \(0 errors, 0 timeouts, 0 lost\)", out, re.M)
    assert re.search(r"^e \(echo\)\s+30\s+100\.00%", out, re.M), out
    assert re.search(r"^z \(zed\)\s+5\s+100\.00%", out, re.M), out
    for inst in ("e#0", "e#1", "z#0"):
        assert re.search(rf"^\s+{re.escape(inst)}\s+\d+\s+100\.00%", out, re.M), out
    assert "No policy actions in this period." in out
    assert "No suggestions" in out
    assert r.stderr == ""


def test_report_json_schema_and_figures(served: Home) -> None:
    doc = report_json(served)
    assert doc["totals"]["requests"] == 35
    assert doc["totals"]["latency"]["count"] == 35
    assert [e["name"] for e in doc["engines"]] == ["e", "z"]
    assert [i["id"] for i in doc["engines"][0]["instances"]] == ["e#0", "e#1"]
    assert {t["type"] for t in doc["types"]} == {"echo", "zed"}
    assert doc["period"]["bucket_seconds"] == 10
    assert doc["period"]["seconds"] == pytest.approx(3600, abs=5)
    assert doc["suggestions"] == []


def test_report_since_duration_and_date(served: Home) -> None:
    doc = report_json(served, "--since", "10m")
    assert doc["period"]["seconds"] == pytest.approx(600, abs=5)
    assert doc["totals"]["requests"] == 35
    start = datetime.now().replace(microsecond=0)
    five_ago = datetime.fromtimestamp(start.timestamp() - 300)
    doc = report_json(served, "-s", five_ago.isoformat())
    assert doc["period"]["since"] == five_ago.timestamp()
    assert doc["totals"]["requests"] == 35


def test_report_engine_filter(served: Home) -> None:
    doc = report_json(served, "--engine", "z")
    assert doc["period"]["engine"] == "z"
    assert [e["name"] for e in doc["engines"]] == ["z"]
    assert doc["totals"]["requests"] == 5
    assert [t["type"] for t in doc["types"]] == ["zed"]
    r = served.cli("report", "-e", "e")
    assert r.returncode == 0, r.stderr
    assert "for engine e:" in r.stdout and "z#0" not in r.stdout


def test_report_unknown_engine_with_the_daemon_running_is_not_found(served: Home) -> None:
    r = served.cli("report", "--engine", "nope")
    assert r.returncode == EXIT_NOT_FOUND
    line = one_error_line(r)
    assert "unknown engine 'nope'" in line and "e, z" in line
    r = served.cli("report", "--engine", "nope", "--json")
    assert r.returncode == EXIT_NOT_FOUND
    err = json.loads(one_error_line(r))["error"]
    assert err["code"] == EngineNotFoundError.rpc_code


@pytest.mark.parametrize("since", ["yesterday", "10x", "-5m", "", "2026-13-45"])
def test_bad_since_is_a_usage_error_without_starting_a_daemon(home: Home, since: str) -> None:
    r = home.cli("report", "--since", since)
    assert r.returncode == EXIT_USAGE
    line = one_error_line(r)
    assert line.startswith("engctl: error: --since")
    r = home.cli("report", "--since", since, "--json")
    assert r.returncode == EXIT_USAGE
    assert json.loads(one_error_line(r))["error"]["code"] == UsageError.rpc_code
    no_daemon(home)


def test_since_in_the_future_is_a_usage_error(home: Home) -> None:
    r = home.cli("report", "--since", "2999-01-01T00:00")
    assert r.returncode == EXIT_USAGE
    assert "past" in one_error_line(r)


def test_metrics_prints_the_exposition(served: Home) -> None:
    r = served.cli("metrics")
    assert r.returncode == 0, r.stderr
    fams = {f.name: f for f in text_string_to_metric_families(r.stdout)}
    ok = {
        s.labels["engine_instance"]: s.value
        for s in fams["engctl_requests"].samples
        if s.labels["outcome"] == "ok"
    }
    assert set(ok) == {"e#0", "e#1", "z#0"}
    assert (ok["e#0"] + ok["e#1"], ok["z#0"]) == (30, 5)
    assert r.stdout.startswith("# HELP ")


def test_report_with_the_daemon_stopped_reads_the_files(served: Home) -> None:
    """After a graceful stop the report still has everything (the partial buckets were
    written at shutdown); it starts no daemon; --engine is not checked without one."""
    pid = served.daemon_pid()
    assert pid is not None
    r = served.cli("daemon", "stop")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: gone(pid), 20)
    doc = report_json(served)
    assert doc["totals"]["requests"] == 35
    assert [e["name"] for e in doc["engines"]] == ["e", "z"]
    text = served.cli("report", "--since", "1h")
    assert text.returncode == 0 and "35 requests" in text.stdout
    assert report_json(served, "--engine", "nope")["engines"] == []
    no_daemon(served)


def test_report_without_any_history(home: Home) -> None:
    """Never ran: an empty report that says so, exit 0, and no daemon started."""
    r = home.cli("report")
    assert r.returncode == 0, r.stderr
    assert "0 requests" in r.stdout and "no history in this period" in r.stdout
    assert report_json(home)["totals"]["requests"] == 0
    no_daemon(home)


def test_top_json_prints_one_frame(served: Home) -> None:
    """`top --json`: the figures of one frame, sorted like the view, then exit."""
    r = served.cli("top", "--json", "--sort", "rps")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert set(doc) == {"host", "queue", "admission", "instances"}
    rows = doc["instances"]
    assert sorted(i["id"] for i in rows) == ["e#0", "e#1", "z#0"]
    assert set(rows[0]) == {
        "id", "state", "health", "eligibility", "effective_weight", "in_flight", "rps",
        "success_rate", "p50_ms", "p99_ms", "cpu_percent", "rss_bytes", "restarts",
    }  # fmt: skip
    rps = [i["rps"] or 0.0 for i in rows]
    assert rps == sorted(rps, reverse=True)
    assert all(i["state"] == "ready" for i in rows)


def test_metrics_json_is_the_parsed_exposition(served: Home) -> None:
    r = served.cli("metrics", "--json")
    assert r.returncode == 0, r.stderr
    families = {f["name"]: f for f in json.loads(r.stdout)["families"]}
    assert families["engctl_requests"]["type"] == "counter"
    ok = {
        s["labels"]["engine_instance"]: s["value"]
        for s in families["engctl_requests"]["samples"]
        if s["labels"].get("outcome") == "ok"
    }
    assert ok["e#0"] + ok["e#1"] == 30 and ok["z#0"] == 5
    assert families["engctl_request_latency_seconds"]["type"] == "histogram"
