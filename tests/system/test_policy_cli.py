"""`engctl isolate|drain|restore`, `policy show` and the health and eligibility columns of
`status`, end to end against a real daemon; plus the formatters behind them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from engctl.errors import (
    EXIT_NOT_FOUND,
    EXIT_USAGE,
    EngineNotFoundError,
    InstanceNotFoundError,
)
from engctl.render.format import eligibility, standing_reason
from engctl.render.tables import setting_value
from tests.conftest import PY, Home, engine_cmd, wait_until
from tests.daemon_support import all_ready

ROOT = Path(__file__).resolve().parents[2]
# Probes often, healthy after one pass: health settles within a second.
QUICK_HEALTH = {"interval": 0.2, "timeout": 1.0, "success_threshold": 1}


def _one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    return lines[0]


def _ok(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return r.stdout


def _echo(home: Home, name: str = "e", instances: int = 2, **spec: Any) -> list[dict[str, Any]]:
    """Register an echo worker engine and wait until its instances are ready."""
    home.register(name, engine_cmd("echo.py"), type="echo", instances=instances, **spec)
    return wait_until(lambda: all_ready(home, name, instances), 20)  # type: ignore[no-any-return]


def _row(text: str, inst_id: str) -> str:
    """The table line of `inst_id`."""
    for line in text.splitlines():
        if line.startswith(inst_id + " "):
            return line
    raise AssertionError(f"no row for {inst_id} in:\n{text}")


# -- isolate, drain, restore ----------------------------------------------------------------


def test_isolate_drain_restore_print_one_line_per_instance(daemon: Home) -> None:
    """Each override prints `ID ELIGIBILITY (REASON)` per instance; status and JSON agree."""
    _echo(daemon)
    out = _ok(daemon.cli("isolate", "e#1", "--reason", "investigating"))
    assert out == "e#1 isolated (by hand: investigating)\n"
    out = _ok(daemon.cli("drain", "e#0"))
    assert out == "e#0 draining (by hand)\n"
    by_id = {i["id"]: i for i in daemon.instances("e")}
    assert (by_id["e#1"]["eligibility"], by_id["e#1"]["eligibility_reason"]) == (
        "isolated",
        "by hand: investigating",
    )
    assert by_id["e#1"]["isolated_until"] is None  # by hand: no end
    assert by_id["e#1"]["effective_weight"] == 0
    assert by_id["e#0"]["eligibility"] == "draining"
    # Nothing is dispatchable now.
    r = daemon.cli("exec", "--type", "echo", "--timeout", "0.5", "--", "1")
    assert r.returncode != 0

    out = _ok(daemon.cli("restore", "e"))
    assert out.splitlines() == ["e#0 restored: active", "e#1 restored: active"]
    assert {i["eligibility"] for i in daemon.instances("e")} == {"active"}
    r = daemon.cli("exec", "--type", "echo", "--", "1")
    assert r.returncode == 0, r.stderr

    # An engine name means all its instances; --json is the daemon's answer.
    doc = json.loads(_ok(daemon.cli("isolate", "e", "--reason", "maintenance", "--json")))
    assert [i["id"] for i in doc["instances"]] == ["e#0", "e#1"]
    for inst in doc["instances"]:
        assert inst["eligibility"] == "isolated"
        assert inst["eligibility_reason"] == "by hand: maintenance"
    doc = json.loads(_ok(daemon.cli("restore", "e#0", "--json")))
    assert [(i["id"], i["eligibility"]) for i in doc["instances"]] == [("e#0", "active")]

    kinds = [ev["kind"] for ev in daemon.client().events(engine="e", limit=1000)]
    for kind in ("instance.isolated", "instance.drain", "instance.restored"):
        assert kind in kinds


def test_overrides_of_unknown_targets_exit_7_and_change_nothing(daemon: Home) -> None:
    """An unknown engine or instance exits 7 (the not-found error) and nothing is changed;
    a oneshot engine or a malformed target is a usage error (2)."""
    _echo(daemon)
    daemon.register("one", engine_cmd("oneshot_upper.py"), mode="oneshot")
    for verb in ("isolate", "drain", "restore"):
        r = daemon.cli(verb, "nope")
        assert r.returncode == EXIT_NOT_FOUND, (verb, r.stderr)
        assert _one_error_line(r) == "engctl: error: unknown engine 'nope' (known: e, one)"
        r = daemon.cli(verb, "e#0", "e#5")
        assert r.returncode == EXIT_NOT_FOUND, (verb, r.stderr)
        assert "no instance #5" in _one_error_line(r)
    assert {i["eligibility"] for i in daemon.instances("e")} == {"active"}

    r = daemon.cli("isolate", "nope", "--json")
    assert r.returncode == EXIT_NOT_FOUND
    assert json.loads(_one_error_line(r))["error"]["code"] == EngineNotFoundError.rpc_code
    r = daemon.cli("drain", "e#9", "--json")
    assert r.returncode == EXIT_NOT_FOUND
    assert json.loads(_one_error_line(r))["error"]["code"] == InstanceNotFoundError.rpc_code

    r = daemon.cli("isolate", "one")
    assert r.returncode == EXIT_USAGE
    assert "oneshot" in _one_error_line(r)
    r = daemon.cli("isolate", "e#x")
    assert r.returncode == EXIT_USAGE
    assert "NAME#INDEX" in _one_error_line(r)


def test_overrides_need_a_target_and_start_no_daemon(home: Home) -> None:
    """Without a target each command is a usage error (2) and no daemon is started."""
    for verb in ("isolate", "drain", "restore"):
        r = home.cli(verb)
        assert r.returncode == EXIT_USAGE, r.stderr
        assert _one_error_line(r).startswith("engctl: error: Missing argument")
    assert home.daemon_pid() is None


def test_manual_isolation_survives_a_daemon_restart(daemon: Home) -> None:
    """`isolate` holds across `daemon stop` and the next command's daemon; `restore` ends it."""
    _echo(daemon, instances=1)
    _ok(daemon.cli("isolate", "e#0", "--reason", "bad disk"))
    assert _ok(daemon.cli("daemon", "stop")).startswith("daemon stopped")
    _ok(daemon.cli("daemon", "start"))
    out = _ok(daemon.cli("status"))
    row = _row(out, "e#0")
    assert "isolated" in row and "by hand: bad disk" in row
    inst = daemon.instance("e#0")
    assert (inst["eligibility"], inst["eligibility_reason"]) == ("isolated", "by hand: bad disk")
    _ok(daemon.cli("restore", "e#0"))
    # Active once its new process takes requests (unavailable while it starts).
    wait_until(lambda: daemon.instance("e#0")["eligibility"] == "active", 15)


# -- status --------------------------------------------------------------------------------


def test_status_shows_health_eligibility_and_the_reason(daemon: Home) -> None:
    """The table has HEALTH and ELIGIBILITY for each instance, and a REASON column once one
    is not active; in a narrow terminal the reasons go under the table."""
    _echo(daemon, health=QUICK_HEALTH)
    wait_until(lambda: all(i["health"] == "healthy" for i in daemon.instances("e")), 15)
    out = _ok(daemon.cli("status"))
    header = out.splitlines()[0].split()
    assert header[:5] == ["INSTANCE", "PID", "STATE", "HEALTH", "ELIGIBILITY"]
    assert "REASON" not in header  # everything is active
    assert _row(out, "e#0").split()[2:5] == ["ready", "healthy", "active"]

    _ok(daemon.cli("isolate", "e#1", "--reason", "investigating"))
    out = _ok(daemon.cli("status"))
    assert out.splitlines()[0].split()[-1] == "REASON"
    assert _row(out, "e#1").split()[2:5] == ["ready", "healthy", "isolated"]
    assert _row(out, "e#1").rstrip().endswith("by hand: investigating")
    assert _row(out, "e#0").rstrip().endswith("-")
    # `status NAME` too; the fast `status --json` path keeps the daemon's document.
    assert "by hand: investigating" in _ok(daemon.cli("status", "e"))
    doc = json.loads(_ok(daemon.cli("status", "--json")))
    inst = doc["engines"][0]["instances"][1]
    assert (inst["health"], inst["eligibility"]) == ("healthy", "isolated")

    narrow = subprocess.run(
        [PY, "-m", "engctl", "status"],
        env={**daemon.env, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert narrow.returncode == 0, narrow.stderr
    lines = narrow.stdout.splitlines()
    assert "REASON" not in lines[0]
    assert all(len(line) <= 80 for line in lines)
    assert "e#1  isolated: by hand: investigating" in lines


def test_status_counts_down_a_policy_isolation(daemon: Home) -> None:
    """An instance the failing policy isolated shows `isolated Ns left` and the policy's
    reason; `restore` brings it back at once."""
    daemon.register(
        "f",
        engine_cmd("flaky.py"),
        type="flaky",
        policy={"failing": {"consecutive_errors": 1, "isolation_base": 120}},
    )
    daemon.wait_state("f#0", "ready", timeout=20)
    for n in (1, 2):  # flaky.py fails every 2nd request
        daemon.cli("exec", "--type", "flaky", "--", str(n))
    inst = wait_until(lambda: (i := daemon.instance("f#0"))["eligibility"] == "isolated" and i, 10)
    assert inst["isolated_until"] > time.time() + 100
    assert inst["isolations"] == 1
    out = _ok(daemon.cli("status", "f"))
    row = _row(out, "f#0")
    assert re.search(r"isolated \d+m\d\ds left", row), row
    assert "1 consecutive error (last" in row
    assert _ok(daemon.cli("restore", "f#0")) == "f#0 restored: active\n"


@pytest.mark.parametrize(
    ("inst", "text"),
    [
        ({"eligibility": "active"}, "active"),
        ({"eligibility": "downweighted", "effective_weight": 0.25}, "downweighted 0.25"),
        ({"eligibility": "isolated", "isolated_until": 1042.2}, "isolated 42s left"),
        ({"eligibility": "isolated", "isolated_until": 1005.5}, "isolated 5.5s left"),
        ({"eligibility": "isolated", "isolated_until": 999.0}, "isolated, probing"),
        ({"eligibility": "isolated", "isolated_until": None}, "isolated"),
        ({"eligibility": "draining"}, "draining"),
        ({}, "active"),
    ],
)
def test_eligibility_text(inst: dict[str, Any], text: str) -> None:
    """How the eligibility reads in `status` (at a fixed `now`)."""
    assert eligibility(inst, now=1000.0) == text


def test_standing_reason_prefers_eligibility_then_bad_health() -> None:
    """The REASON column: why an instance is out or downweighted, else why its health is bad."""
    assert standing_reason({"eligibility": "active", "health": "healthy"}) == ""
    assert (
        standing_reason(
            {"eligibility": "isolated", "eligibility_reason": "x", "health_reason": "y"}
        )
        == "x"
    )
    unhealthy_in_service = {"eligibility": "active", "health": "unhealthy", "health_reason": "y"}
    assert standing_reason(unhealthy_in_service) == "y"
    assert standing_reason({"health": "healthy", "health_reason": "2 passing probe(s)"}) == ""


# -- policy show ---------------------------------------------------------------------------

DAEMON_POLICY = """\
[daemon]
sample_interval = 1.0

[daemon.policy]
max_isolated_percent = 25

[daemon.policy.slow]
threshold = 4.0
"""


def _policy_home(home: Home) -> Home:
    """A daemon with [daemon.policy] settings, a worker with overrides and a oneshot engine."""
    home.paths.config_file.parent.mkdir(parents=True, exist_ok=True)
    home.paths.config_file.write_text(DAEMON_POLICY)
    home.start_daemon()
    home.register(
        "w",
        engine_cmd("echo.py"),
        type="echo",
        health={"interval": 1.5},
        limits={"max_rss": "256MiB"},
        restart={"max_retries": 3},
        policy={"failing": {"consecutive_errors": 3}, "slow": {"threshold": 6.0}},
    )
    home.register("one", engine_cmd("oneshot_upper.py"), mode="oneshot")
    return home


def test_policy_show_json_gives_values_and_sources(home: Home) -> None:
    """`policy show --json` is the daemon's document: merged values, each one's source."""
    _policy_home(home)
    doc = json.loads(_ok(home.cli("policy", "show", "--json")))
    engines = {e["name"]: e for e in doc["engines"]}
    assert list(engines) == ["one", "w"]
    w = engines["w"]
    assert set(w) >= {"name", "type", "mode", "policy", "sources", "restart", "health"}
    assert set(w) >= {"limits", "applies"}
    assert (w["type"], w["mode"], w["applies"]) == ("echo", "worker", True)
    assert engines["one"]["applies"] is False
    policy, sources = w["policy"], w["sources"]
    assert set(policy) == {
        "max_isolated_percent", "crash", "hang", "memory", "cpu", "slow", "failing",
    }  # fmt: skip
    assert (policy["max_isolated_percent"], sources["top"]["max_isolated_percent"]) == (
        25,
        "daemon",
    )
    assert (policy["failing"]["consecutive_errors"], sources["failing"]["consecutive_errors"]) == (
        3,
        "engine",
    )
    # The engine's value wins over the daemon's.
    assert (policy["slow"]["threshold"], sources["slow"]["threshold"]) == (6.0, "engine")
    assert (policy["failing"]["error_rate"], sources["failing"]["error_rate"]) == (0.5, "default")
    # The oneshot engine gets the daemon's value (it has no override).
    one = engines["one"]
    assert (one["policy"]["slow"]["threshold"], one["sources"]["slow"]["threshold"]) == (
        4.0,
        "daemon",
    )
    assert w["health"]["interval"] == 1.5 and w["health"]["check"] == "ping"
    assert w["limits"]["max_rss"] == 256 * 1024 * 1024
    assert w["restart"]["max_retries"] == 3

    only = json.loads(_ok(home.cli("policy", "show", "w", "--json")))
    assert [e["name"] for e in only["engines"]] == ["w"]


def test_policy_show_text_lists_every_setting_with_its_source(home: Home) -> None:
    """The text form: one row per setting, grouped by section, with value and source."""
    _policy_home(home)
    out = _ok(home.cli("policy", "show"))
    for pattern in (
        r"^w  worker, type echo$",
        r"^SECTION\s+SETTING\s+VALUE\s+FROM\s*$",
        r"^health\s+check\s+ping\s+default\s*$",
        r"^\s+interval\s+1\.5s\s+engine\s*$",
        r"^restart\s+policy\s+on-failure\s+default\s*$",
        r"^\s+max_retries\s+3\s+engine\s*$",
        r"^\s+backoff\.initial\s+0\.5s\s+default\s*$",
        r"^limits\s+max_rss\s+256\.0MiB\s+engine\s*$",
        r"^\s+max_cpu_percent\s+none\s+default\s*$",
        r"^policy\s+max_isolated_percent\s+25%\s+daemon\s*$",
        r"^policy\.crash\s+flap_window\s+60s\s+default\s*$",
        r"^policy\.memory\s+leak_window\s+60s\s+default\s*$",
        r"^\s+leak_rate\s+1\.0MiB/s\s+default\s*$",
        r"^policy\.slow\s+enabled\s+true\s+default\s*$",
        r"^\s+threshold\s+6\s+engine\s*$",
        r"^policy\.failing\s+consecutive_errors\s+3\s+engine\s*$",
        r"^\s+error_rate\s+0\.5\s+default\s*$",
        r"^\s+isolation_base\s+30s\s+default\s*$",
        r"^engine\s+start_timeout\s+60s\s+default\s*$",
        r"^\s+hang_timeout\s+60s\s+default\s*$",
        r"^stop\s+signal\s+SIGTERM\s+default\s*$",
        r"^rollout\s+max_surge\s+1\s+default\s*$",
        r"^one  oneshot, type generic: no instances, so no health check or policy acts on it",
    ):
        assert re.search(pattern, out, re.MULTILINE), f"{pattern!r} not in:\n{out}"
    # Every setting of every section is there (the oneshot engine only has its header).
    doc = json.loads(_ok(home.cli("policy", "show", "w", "--json")))["engines"][0]
    policy = doc["policy"]
    settings = 1 + sum(len(v) for v in policy.values() if isinstance(v, dict))
    spec_settings = len(doc["health"]) + len(doc["limits"]) + len(doc["restart"]) - 1 + 4
    spec_settings += 2 + len(doc["admission"]["type"] or {})  # [daemon.limits] for its type
    # start/hang timeouts, [stop], [rollout], and [scale] when it autoscales (not here)
    spec_settings += len(doc["timeouts"]) + len(doc["stop"]) + len(doc["rollout"])
    assert doc["scale"] is None
    rows = out.split("\n\n")[1].splitlines()[2:]  # engine w, without its two header lines
    assert len(rows) == settings + spec_settings


def test_policy_show_unknown_engine_exits_7_and_no_engines_says_so(daemon: Home) -> None:
    """`policy show nope` is the not-found error; with nothing registered it says so."""
    out = _ok(daemon.cli("policy", "show"))
    assert "no engines registered" in out
    assert json.loads(_ok(daemon.cli("policy", "show", "--json"))) == {"engines": []}
    r = daemon.cli("policy", "show", "nope")
    assert r.returncode == EXIT_NOT_FOUND
    assert _one_error_line(r) == "engctl: error: unknown engine 'nope' (known: none registered)"


@pytest.mark.parametrize(
    ("key", "value", "text"),
    [
        ("interval", 5.0, "5s"),
        ("isolation_max", 300.0, "300s"),
        ("cooldown", 0.0, "0 (off)"),
        ("leak_rate", 0, "0 (off)"),
        ("leak_rate", 1048576, "1.0MiB/s"),
        ("max_rss", 536870912, "512.0MiB"),
        ("max_rss", None, "none"),
        ("max_isolated_percent", 50.0, "50%"),
        ("max_cpu_percent", 95.5, "95.5%"),
        ("enabled", True, "true"),
        ("action", "event", "event"),
        ("error_rate", 0.5, "0.5"),
        ("consecutive_errors", 5, "5"),
    ],
)
def test_setting_value_text(key: str, value: Any, text: str) -> None:
    """How `policy show` prints one value."""
    assert setting_value(key, value) == text


# -- help and completion -------------------------------------------------------------------


def test_help_of_the_new_commands(home: Home) -> None:
    """Each new command explains itself; the overrides say they win over policies until
    `restore` and survive a daemon restart. Help starts no daemon."""
    for verb in ("isolate", "drain"):
        text = " ".join(_ok(home.cli(verb, "--help")).split())
        assert f"Usage: engctl {verb} [OPTIONS] {{targets}}..." in text
        assert "Wins over the failure policies until `engctl restore`" in text
        assert "survives a daemon restart" in text
        assert "--reason" in text and "--json" in text
        assert "NAME#K" in text
    text = " ".join(_ok(home.cli("restore", "--help")).split())
    assert "Undo `isolate` or `drain`" in text
    text = " ".join(_ok(home.cli("policy", "show", "--help")).split())
    assert "[daemon.policy]" in text and "[engines.NAME.policy]" in text
    assert "Oneshot engines" in text
    text = _ok(home.cli("policy", "--help"))
    assert "show" in text
    top = _ok(home.cli("--help"))
    for name in ("isolate", "drain", "restore", "policy"):
        assert re.search(rf"^│ {name}\s", top, re.MULTILINE), name
    assert home.daemon_pid() is None


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        ("engctl po", ["policy"]),
        ("engctl policy ", ["show"]),
        ("engctl is", ["isolate"]),
        ("engctl res", ["restart", "restore"]),
        ("engctl dr", ["drain"]),
    ],
)
def test_bash_completion_completes_the_new_commands(
    home: Home, words: str, expected: list[str]
) -> None:
    """The shipped bash script completes the new commands (typer answers at run time)."""
    script = ROOT / "completions" / "engctl.bash"
    bin_dir = str(Path(PY).parent)
    if not (Path(bin_dir) / "engctl").exists():
        pytest.skip("no engctl console script next to this interpreter")
    env = {**home.env, "PATH": bin_dir + os.pathsep + home.env.get("PATH", "")}
    parts = words.split(" ")
    r = subprocess.run(
        [
            "bash",
            "-c",
            f'source "{script}"; COMP_WORDS=({" ".join(repr(p) for p in parts)});'
            f" COMP_CWORD={len(parts) - 1}; _engctl_completion engctl;"
            ' printf "%s\\n" "${COMPREPLY[@]}"',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == expected
    assert home.daemon_pid() is None
