"""`list` and `status` through the installed CLI (issues 10.20 and 10.25): filters by names,
type and labels, version and registration time, and the small JSON and CLI consistencies —
null figures before the first sample, a fresh health_reason after a restart, oneshot
instances, NDJSON from `status --watch --json`, one `--since` parser, `events -f -n 0`, and
a quiet exit when the reader of stdout goes away."""

from __future__ import annotations

import json
import select
import signal
import subprocess
import time
from typing import Any, cast

from engctl.errors import EXIT_BROKEN_PIPE, EXIT_NOT_FOUND, EXIT_USAGE
from tests.conftest import PY, Home, engine_cmd, wait_until

SLEEPER = engine_cmd("sleeper.py")


def _json(home: Home, *args: str) -> Any:
    r = home.cli(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _fleet(home: Home) -> None:
    svc = {"command": SLEEPER, "mode": "service"}
    with home.client() as c:
        c.register(
            {
                "web": {**svc, "type": "http", "labels": {"tier": "gold", "team": "a"},
                        "version": "2.1.0", "capabilities": ["tls"]},
                "api": {**svc, "type": "http", "labels": {"tier": "silver"}},
                "db": {**svc, "type": "sql", "labels": {"tier": "gold"}},
                "up": {"command": engine_cmd("oneshot_upper.py"), "mode": "oneshot"},
            },
            start=False,
        )  # fmt: skip


def test_list_and_status_filter_by_names_type_and_labels(home: Home) -> None:
    """`--type`, repeatable `--label k=v` (all must match) and names narrow both commands;
    an unknown name exits 7, a malformed label 2 before any daemon starts."""
    r = home.cli("list", "--label", "tier")
    assert r.returncode == EXIT_USAGE and "KEY=VALUE" in r.stderr
    assert home.daemon_pid() is None
    _fleet(home)

    def names(*args: str) -> list[str]:
        return [e["name"] for e in _json(home, "list", *args)["engines"]]

    def status_names(*args: str) -> list[str]:
        return [e["name"] for e in _json(home, "status", *args)["engines"]]

    assert names() == ["api", "db", "up", "web"]
    assert names("--type", "http") == ["api", "web"]
    assert names("--label", "tier=gold") == ["db", "web"]
    assert names("--label", "tier=gold", "--label", "team=a") == ["web"]
    assert names("--type", "http", "--label", "tier=gold") == ["web"]
    assert names("db", "web", "--type", "http") == ["web"]
    assert names("--type", "nope") == []
    assert status_names("--type", "http") == ["api", "web"]
    assert status_names("--label", "tier=gold") == ["db", "web"]
    assert status_names("db", "api") == ["db", "api"]  # in the order asked
    r = home.cli("list", "nope")
    assert r.returncode == EXIT_NOT_FOUND and "unknown engine 'nope'" in r.stderr
    text = home.cli("status", "--type", "nope")
    assert text.returncode == 0 and text.stdout == "no engine matches\n"
    table = home.cli("list", "--label", "team=a").stdout.splitlines()
    assert table[0].split() == ["NAME", "TYPE", "MODE", "INSTANCES", "CONCURRENCY", "DESIRED",
                                "VERSION", "REGISTERED", "CAPABILITIES", "LABELS",
                                "COMMAND"]  # fmt: skip
    assert table[1].split()[:7] == ["web", "http", "service", "1", "1", "stopped", "2.1.0"]
    assert "tls" in table[1] and "team=a,tier=gold" in table[1]


def test_version_and_registration_time_survive_updates_and_daemon_restarts(home: Home) -> None:
    """`list` shows the spec's `version` and when the engine was first registered; an
    update (a new version) keeps that time, and so does a new daemon."""
    before = time.time()
    _fleet(home)
    web = {e["name"]: e for e in _json(home, "list")["engines"]}["web"]
    assert web["version"] == "2.1.0"
    assert before <= web["registered_at"] <= time.time()
    assert {e["name"]: e["version"] for e in _json(home, "list")["engines"]}["api"] == ""
    with home.client() as c:
        c.register({"web": {"command": SLEEPER, "mode": "service", "version": "2.2.0"}},
                   start=False)  # fmt: skip
    again = {e["name"]: e for e in _json(home, "list")["engines"]}["web"]
    assert (again["version"], again["registered_at"]) == ("2.2.0", web["registered_at"])
    assert home.cli("daemon", "stop").returncode == 0
    wait_until(lambda: home.daemon_pid() is None, 20)
    assert home.cli("daemon", "start").returncode == 0  # read commands start none
    after = {e["name"]: e for e in _json(home, "list")["engines"]}["web"]
    assert after["registered_at"] == web["registered_at"]
    exported = home.cli("export", "web").stdout
    assert 'version = "2.2.0"' in exported


def test_oneshot_instances_agree_between_list_and_status(home: Home) -> None:
    """A oneshot engine has no long-running instances: 0 in `list` as in `status`."""
    _fleet(home)
    listed = {e["name"]: e for e in _json(home, "list")["engines"]}["up"]
    status = {e["name"]: e for e in _json(home, "status")["engines"]}["up"]
    assert listed["instances"] == status["instances_wanted"] == 0


def test_figures_are_null_until_the_first_sample_and_health_reason_is_fresh(home: Home) -> None:
    """Before the monitor's first reading of a process its CPU, RSS, threads and fds are
    null, not 0; and a new process starts with an empty health_reason (issue 10.25)."""
    home.start_daemon(sample_interval=60.0)
    home.register(
        "s",
        SLEEPER,
        mode="service",
        restart={"start_seconds": 0},
        health={
            "check": "command:false",
            "interval": 0.2,
            "failure_threshold": 1,
            "on_unhealthy": "isolate",
        },
    )
    inst = home.wait_state("s#0", "ready")
    assert isinstance(inst["pid"], int)
    assert [inst[k] for k in ("cpu_percent", "rss_bytes", "threads", "fds")] == [None] * 4
    wait_until(lambda: home.instance("s#0")["health_reason"].startswith("1 failed probe"))
    with home.client() as c:
        c.call("engine.stop", targets=["s"])  # wait for the stop, then a fresh start
        c.start(["s"])
        inst = cast("dict[str, Any]", c.status(["s"]))["engines"][0]["instances"][0]
    assert (inst["health"], inst["health_reason"]) == ("unknown", "")


def test_status_watch_json_streams_one_document_per_refresh(daemon: Home) -> None:
    """`status --watch --json` prints NDJSON: a compact document per refresh, until Ctrl-C
    (was: one document, then silence)."""
    daemon.register("s", SLEEPER, mode="service")
    p = subprocess.Popen(
        [PY, "-m", "engctl", "status", "--watch", "--json", "--interval", "0.1"],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        docs = [json.loads(p.stdout.readline()) for _ in range(3)]
        assert all([e["name"] for e in d["engines"]] == ["s"] for d in docs)
    finally:
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
    assert p.returncode == 0 and err == ""


def test_events_and_report_read_since_the_same_way(daemon: Home) -> None:
    """One `--since` parser: `2w` works for both commands (it was refused by `events`), and
    a bad value gets the same message from both."""
    assert daemon.cli("events", "--since", "2w").returncode == 0
    assert daemon.cli("report", "--since", "2w").returncode == 0
    bad = [daemon.cli(cmd, "--since", "fortnight") for cmd in ("events", "report")]
    assert [r.returncode for r in bad] == [EXIT_USAGE, EXIT_USAGE]
    assert bad[0].stderr == bad[1].stderr
    assert "2w" in bad[0].stderr


def test_events_follow_with_no_past_events(daemon: Home) -> None:
    """`events -f -n 0` prints only what happens from then on (it was refused)."""
    daemon.register("s", SLEEPER, mode="service", restart={"start_seconds": 0})
    daemon.wait_state("s#0", "ready")
    with daemon.client() as c:
        last = c.events(limit=1)[-1]["id"]
    p = subprocess.Popen(
        [PY, "-m", "engctl", "events", "-f", "-n", "0", "--json"],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        out = p.stdout

        def printed() -> bool:
            # Changes until the follow (subscribed without a word) prints one of them.
            daemon.cli("restart", "s")
            return bool(select.select([out], [], [], 0.2)[0])

        wait_until(printed, timeout=20)
        first = json.loads(out.readline())
        assert first["id"] > last and first["instance"] == "s#0"
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=20)


def test_a_reader_that_goes_away_ends_the_command_quietly(daemon: Home) -> None:
    """`engctl events -f | head -1`: once the reader is gone the next write ends engctl
    with exit 141 (as SIGPIPE would) and nothing on stderr, no traceback."""
    daemon.register("s", SLEEPER, mode="service", restart={"start_seconds": 0})
    daemon.wait_state("s#0", "ready")
    p = subprocess.Popen(
        [PY, "-m", "engctl", "events", "-f", "-n", "1"],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert p.stdout is not None
    p.stdout.readline()  # the one past event: the reader has what it wanted
    p.stdout.close()
    for _ in range(3):  # new events: writes into a pipe nobody reads
        assert daemon.cli("stop", "s").returncode == 0
        assert daemon.cli("start", "s").returncode == 0
    assert p.wait(timeout=20) == EXIT_BROKEN_PIPE
    assert p.stderr is not None and p.stderr.read() == b""
