"""Admission control and alerts with a real daemon and real workers (docs/admission.md): rate
limits (a wait for a token, or a refusal at once), concurrency caps, priorities under a flood,
an alert firing and resolving on a leaking engine, and command and HTTP hooks (a loopback
server on port 0), including hooks that fail without harming anything."""

from __future__ import annotations

import http.server
import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from engctl.errors import EXIT_RATE_LIMITED, RateLimitedError
from tests.conftest import Home, engine_cmd, wait_until

QUICK: dict[str, Any] = {"restart": {"start_seconds": 0.1, "backoff": {"initial": 0.05}}}
MiB = 1024 * 1024


def start(home: Home, config: str) -> Home:
    """Start the daemon of `home` with this config.toml (policies every 0.2 s)."""
    home.paths.config_file.parent.mkdir(parents=True, exist_ok=True)
    home.paths.config_file.write_text(
        "[daemon]\npolicy_interval = 0.2\nsample_interval = 0.2\n" + config
    )
    return home.start_daemon()


def workers(home: Home, **engines: dict[str, Any]) -> None:
    with home.client() as c:
        c.register({name: {**QUICK, **spec} for name, spec in engines.items()})
    for name, spec in engines.items():
        for k in range(spec.get("instances", 1)):
            home.wait_state(f"{name}#{k}", "ready")


def events(home: Home, kind: str) -> list[dict[str, Any]]:
    with home.client() as c:
        evs = cast("list[dict[str, Any]]", c.events(limit=10_000))
    return [e for e in evs if e["kind"] == kind]


# -- rate limits ------------------------------------------------------------------------------
def test_rate_limit_waits_for_a_token_before_the_deadline_else_refuses_at_once(
    home: Home,
) -> None:
    start(home, "")
    workers(home, echo={"command": engine_cmd("echo.py"), "limits": {"rate": "2/s", "burst": 1}})
    with home.client() as c:
        assert c.exec(1, engine="echo")["ok"]  # the one token of the burst
        began = time.monotonic()
        assert c.exec(2, engine="echo", timeout=5)["ok"]  # waits ~0.5 s for the next token
        assert time.monotonic() - began >= 0.3
        with pytest.raises(RateLimitedError) as info:
            c.exec(3, engine="echo", timeout=0.1)  # the next token comes after the deadline
    # Refused on arrival, not at the deadline (the daemon's own measure of its answer time).
    assert info.value.data["latency_ms"] < 100
    assert info.value.data["scope"] == "engine" and info.value.data["name"] == "echo"
    assert "rate limited: engine echo allows 2/s (burst 1)" in info.value.message
    cli = home.cli("exec", "--engine", "echo", "--timeout", "0.05", "--", "4")
    assert cli.returncode == EXIT_RATE_LIMITED, cli.stderr
    assert cli.stderr.count("\n") == 1 and "rate limited" in cli.stderr
    st = home.status()
    gate = st["engines"][0]["admission"]
    assert gate["rate_limited"] >= 2 and gate["rate"] == {
        "per_second": 2.0,
        "burst": 1,
        "tokens": gate["rate"]["tokens"],
    }
    with home.client() as c:
        text = c.call("metrics.get")["text"]
    assert 'engctl_rate_limited_total{name="echo",scope="engine"} 2.0' in text or (
        'engctl_rate_limited_total{scope="engine",name="echo"}' in text
    ), [line for line in text.splitlines() if "rate_limited" in line]


def test_caller_rate_limit_applies_per_caller(home: Home) -> None:
    start(home, '[daemon.limits.callers]\n"*" = { rate = "1/m" }\n')
    workers(home, echo={"command": engine_cmd("echo.py")})
    with home.client() as c:
        assert c.exec(1, caller="team-a", timeout=1)["ok"]
        assert c.exec(1, caller="team-b", timeout=1)["ok"]  # a bucket of its own
        with pytest.raises(RateLimitedError) as info:
            c.exec(2, caller="team-a", timeout=1)
    data = info.value.data
    assert (data["scope"], data["name"]) == ("caller", "team-a")
    assert data["retry_after_s"] == pytest.approx(60, abs=1)


# -- concurrency caps -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("config", "limits", "cap"),
    [
        ("", {"max_in_flight": 2}, 2),
        ("[daemon.limits]\ntypes.slowtype = { max_in_flight = 3 }\n", {}, 3),
        ("[daemon.limits]\nmax_in_flight = 1\n", {}, 1),
    ],
    ids=["engine", "type", "global"],
)
def test_concurrency_caps_keep_requests_waiting_in_the_queue(
    home: Home, config: str, limits: dict[str, Any], cap: int
) -> None:
    """A cap below the instances' capacity: requests over it wait (none fails) and never more
    than the cap run at once."""
    start(home, config)
    workers(
        home,
        slow={
            "command": engine_cmd("slow.py", "0.2"),
            "type": "slowtype",
            "max_concurrency": 8,
            "limits": limits,
        },
    )
    with home.client() as c:
        results = list(c.exec_many([{} for _ in range(8)], window=8, engine="slow", timeout=20))
    assert all(r["ok"] for r in results), results
    peak = max(cast("dict[str, Any]", r["result"])["in_flight"] for r in results)
    assert peak == cap
    st = home.status()
    gates = [
        st["engines"][0]["admission"],
        st["admission"]["global"],
        *st["admission"]["types"].values(),
    ]
    assert any(g is not None and g["waited"] >= 1 for g in gates)


# -- priorities ----------------------------------------------------------------------------------
def test_high_priority_request_overtakes_a_low_priority_flood(home: Home) -> None:
    start(home, "")
    workers(home, slow={"command": engine_cmd("slow.py", "0.15"), "max_concurrency": 1})
    done: dict[str, float] = {}

    def flood() -> None:
        with home.client() as c:
            for n, r in enumerate(
                c.exec_many(
                    [{"n": i} for i in range(8)],
                    window=8,
                    engine="slow",
                    priority="low",
                    caller="batch",
                    timeout=30,
                )
            ):
                assert r["ok"]
                done[f"low{n}"] = time.monotonic()

    thread = threading.Thread(target=flood)
    thread.start()
    try:
        wait_until(lambda: home.status()["admission"]["queue"]["waiting"] >= 6)
        with home.client() as c:
            assert c.exec({}, engine="slow", priority="high", caller="web", timeout=30)["ok"]
        done["high"] = time.monotonic()
    finally:
        thread.join(60)
    later = [k for k, t in done.items() if k.startswith("low") and t > done["high"]]
    assert len(later) >= 5, done  # it went ahead of every low one still waiting


def test_unknown_priority_is_a_usage_error(home: Home) -> None:
    r = home.cli("exec", "--priority", "urgent", "--", "1")
    assert r.returncode == 2
    assert r.stderr.strip().endswith(
        "option --priority: unknown priority 'urgent' (use low, normal, high, or an integer"
        " from 0 to 9; higher is served first)"
    )


# -- alerts and hooks --------------------------------------------------------------------------
class _Sink(http.server.BaseHTTPRequestHandler):
    bodies: list[Any]

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def sink() -> Iterator[tuple[str, list[Any]]]:
    """A loopback HTTP server on port 0 that keeps every JSON body posted to it."""
    bodies: list[Any] = []
    handler = type("Sink", (_Sink,), {"bodies": bodies})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api/v2/alerts", bodies
    finally:
        server.shutdown()
        server.server_close()


def _writer(path: Path) -> str:
    code = f"import sys; open({str(path)!r}, 'a').write(sys.stdin.read())"
    return json.dumps([sys.executable, "-c", code])


def test_alert_fires_and_resolves_on_a_leaking_engine_through_hooks(
    home: Home, sink: tuple[str, list[Any]]
) -> None:
    url, bodies = sink
    written = home.path / "hook.ndjson"
    start(
        home,
        '[alerts.fat]\nexpr = "rss_bytes{engine=\'leak\'} > 60MiB"\nfor = "0.4s"\n'
        'severity = "critical"\nlabels = { team = "ops" }\n'
        f'[hooks.file]\non = ["alert.*"]\ncommand = {_writer(written)}\n'
        f'[hooks.am]\non = ["alert.firing", "alert.resolved"]\nurl = "{url}"\n',
    )
    workers(
        home,
        leak={
            "command": engine_cmd("leaking.py", "40"),
            "mode": "service",
            "limits": {"max_rss": "80MiB"},
            "policy": {"memory": {"action": "alert", "leak_rate": 0}},
        },
    )
    fired = wait_until(
        lambda: [e for e in events(home, "alert.firing") if e["data"]["name"] == "fat"], timeout=20
    )[0]
    assert fired["data"]["threshold"] == 60 * MiB and fired["data"]["value"] > 60 * MiB
    labels = fired["data"]["labels"]
    assert (labels["instance"], labels["engine"], labels["team"]) == ("leak#0", "leak", "ops")
    pending = [e for e in events(home, "alert.pending") if e["data"]["name"] == "fat"]
    assert pending and pending[0]["id"] < fired["id"]
    # The built-in memory rule alerts instead of restarting (memory.action = "alert").
    wait_until(
        lambda: [e for e in events(home, "alert.firing") if e["data"]["name"] == "memory"],
        timeout=20,
    )
    assert home.instance("leak#0")["restarts"] == 0
    listed = json.loads(home.cli("alerts", "--json").stdout)
    assert {a["name"] for a in listed["alerts"] if a["state"] == "firing"} >= {"fat", "memory"}
    assert home.cli("stop", "leak").returncode == 0
    resolved = wait_until(
        lambda: [e for e in events(home, "alert.resolved") if e["data"]["name"] == "fat"],
        timeout=10,
    )
    assert resolved[0]["id"] > fired["id"]

    # The command hook got every alert event as JSON on stdin; the url hook the firing and
    # the resolution in Alertmanager's webhook shape.
    def hooked() -> list[dict[str, Any]] | None:
        if not written.exists():
            return None
        kinds = [json.loads(line) for line in written.read_text().splitlines()]
        return kinds if any(k["kind"] == "alert.resolved" for k in kinds) else None

    lines = wait_until(hooked, timeout=10)
    assert {"alert.pending", "alert.firing", "alert.resolved"} <= {e["kind"] for e in lines}
    wait_until(lambda: any(b["status"] == "resolved" for b in bodies), timeout=10)
    firing = next(
        b for b in bodies if b["status"] == "firing" and b["commonLabels"]["alertname"] == "fat"
    )
    assert firing["alerts"][0]["labels"]["severity"] == "critical"
    assert firing["alerts"][0]["labels"]["team"] == "ops"


def test_hooks_test_fires_a_synthetic_event_and_a_failing_hook_harms_nothing(
    home: Home, sink: tuple[str, list[Any]]
) -> None:
    url, bodies = sink
    written = home.path / "hook.ndjson"
    start(
        home,
        f'[hooks.file]\non = ["alert.*"]\ncommand = {_writer(written)}\n'
        f'[hooks.am]\non = ["alert.*"]\nurl = "{url}"\n'
        '[hooks.broken]\non = ["*"]\ncommand = ["sh", "-c", "echo no >&2; exit 3"]\n'
        '[hooks.nowhere]\non = ["*"]\nurl = "http://127.0.0.1:9/x"\nretries = 1\ntimeout = "1s"\n'
        '[hooks.stuck]\non = ["*"]\ncommand = ["sleep", "30"]\ntimeout = "0.5s"\n',
    )
    r = home.cli("hooks", "test", "file", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["ok"] is True
    sent = json.loads(written.read_text())
    assert sent["kind"] == "alert.firing" and sent["data"]["test"] is True
    r = home.cli("hooks", "test", "am")
    assert r.returncode == 0 and "HTTP status 200" in r.stdout, r.stdout
    assert bodies[-1]["alerts"][0]["labels"]["alertname"] == "engctl-test"
    r = home.cli("hooks", "test", "broken")
    assert r.returncode == 1 and "exit code 3" in r.stdout, r.stdout
    r = home.cli("hooks", "test", "nowhere", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["attempts"] == 2
    r = home.cli("hooks", "test", "ghost")
    assert r.returncode == 7 and "no hook 'ghost'" in r.stderr
    # Every event now goes to the failing hooks too (registering, starting): supervision and
    # dispatch go on as if they were not there.
    workers(home, echo={"command": engine_cmd("echo.py")})
    with home.client() as c:
        assert all(r["ok"] for r in c.exec_many(range(50), window=8, engine="echo"))
    listed = json.loads(home.cli("hooks", "list", "--json").stdout)
    by_name = {h["name"]: h for h in listed["hooks"]}
    wait_until(
        lambda: json.loads(home.cli("hooks", "list", "--json").stdout)["hooks"][2]["failed"] >= 2
    )
    assert by_name["file"]["delivered"] >= 1


def test_policy_show_and_config_list_the_limits_alerts_and_hooks(home: Home) -> None:
    start(
        home,
        '[daemon.limits]\nmax_in_flight = 9\ntypes.echo = { rate = "5/s", queue = "sjf" }\n'
        '[alerts.slow]\nexpr = "p99_ms > 100"\n[hooks.log]\non = ["alert.*"]\ncommand = ["cat"]\n',
    )
    workers(
        home,
        echo={
            "command": engine_cmd("echo.py"),
            "type": "echo",
            "limits": {"rate": "30/m", "max_in_flight": 3, "adaptive": True},
        },
    )
    shown = json.loads(home.cli("policy", "show", "--json").stdout)["engines"][0]
    assert shown["limits"]["rate"] == 0.5 and shown["limits"]["burst"] == 1
    assert shown["limits"]["max_in_flight"] == 3 and shown["limits"]["adaptive"] is True
    assert shown["admission"]["max_in_flight"] == 9
    assert shown["admission"]["type"] == {
        "rate": 5.0,
        "burst": 5,
        "max_in_flight": None,
        "queue": "sjf",
    }
    table = home.cli("policy", "show").stdout
    assert "0.5/s" in table and "daemon.limits.types.echo" in table
    config = json.loads(home.cli("config", "--json").stdout)
    assert config["daemon"]["limits"]["types"]["echo"] == {"rate": "5/s", "queue": "sjf"}
    assert config["alerts"] == {"slow": {"expr": "p99_ms > 100", "severity": "warning"}}
    assert config["hooks"]["log"]["command"] == ["cat"]
    assert "[alerts.slow]" in home.cli("config").stdout
    gate = home.status()["engines"][0]["admission"]
    assert gate["adaptive"]["phase"] == "measuring" and gate["limit"] == 1


def test_requests_admitted_to_wait_for_a_token_run_before_their_deadline(home: Home) -> None:
    """A burst far over the rate: each request either waits for a token that comes in time to
    run (and succeeds) or is refused at once; none times out waiting or running."""
    start(home, "")
    limits = {"rate": "20/s", "burst": 1}
    workers(home, echo={"command": engine_cmd("echo.py"), "max_concurrency": 64, "limits": limits})
    with home.client() as c:
        results = list(c.exec_many(range(60), window=60, engine="echo", timeout=1))
    codes = [r["error"]["code"] for r in results if not r["ok"]]
    assert set(codes) <= {RateLimitedError.rpc_code}, codes
    ok = sum(1 for r in results if r["ok"])
    assert 10 <= ok <= 21  # one token at first, then 20/s within the 1 s deadline


def test_daemon_reload_applies_new_limits_and_rules_at_once(home: Home) -> None:
    start(home, "")
    workers(home, slow={"command": engine_cmd("slow.py", "0.2"), "type": "t", "max_concurrency": 8})
    assert home.status()["admission"]["types"] == {}
    home.paths.config_file.write_text(
        "[daemon]\npolicy_interval = 0.2\n[daemon.limits]\ntypes.t = { max_in_flight = 1 }\n"
        "[alerts.any]\nexpr = \"up{engine='slow'} == 1\"\n"
    )
    assert home.cli("daemon", "reload").returncode == 0
    assert home.status()["admission"]["types"]["t"]["max_in_flight"] == 1
    with home.client() as c:
        results = list(c.exec_many([{} for _ in range(4)], window=4, engine="slow", timeout=20))
    assert max(cast("dict[str, Any]", r["result"])["in_flight"] for r in results) == 1
    wait_until(lambda: [e for e in events(home, "alert.firing") if e["data"]["name"] == "any"])
    home.paths.config_file.write_text('[daemon]\nlimits = { max_in_flight = "x" }\n')
    bad = home.cli("daemon", "reload")
    assert (
        bad.returncode == 2 and "daemon.limits.max_in_flight: expected a whole number" in bad.stderr
    )
    assert home.status()["admission"]["types"]["t"]["max_in_flight"] == 1  # nothing applied


@pytest.mark.parametrize(
    ("limits", "message"),
    [
        ({"rate": "fast"}, 'engines.e.limits.rate: expected a rate such as "200/s"'),
        ({"rate": "5/s", "burst": -1}, "engines.e.limits.burst: must be from 1 to 1000000, got -1"),
        ({"burst": 3}, "engines.e.limits.burst: needs a rate"),
        ({"max_in_flight": 0}, "engines.e.limits.max_in_flight: must be from 1 to 1000000, got 0"),
        ({"adaptive": "yes"}, "engines.e.limits.adaptive"),
    ],
)
def test_bad_engine_limits_are_refused_and_nothing_is_registered(
    daemon: Home, limits: dict[str, Any], message: str
) -> None:
    spec = daemon.path / "engines.toml"
    import tomli_w

    spec.write_text(tomli_w.dumps({"engines": {"e": {"command": ["true"], "limits": limits}}}))
    r = daemon.cli("register", "-f", str(spec))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1
    assert daemon.status()["engines"] == []
