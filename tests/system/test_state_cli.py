"""The CLI and the daemon's state (issue 10, items 13, 14 and 16): read commands never start a
daemon, `engctl config` prints what runs as valid TOML, `engctl daemon reload`, and no
library warning on any command."""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any, cast

import pytest

from engctl.config import DaemonConfig
from engctl.errors import EXIT_UNREACHABLE, EXIT_USAGE
from tests.conftest import PY, Home, engine_cmd, wait_until
from tests.daemon_support import all_ready, daemon_processes

NO_DAEMON = "no daemon is running for {home} (start one with `engctl daemon start`)"

# Read commands that need a running daemon: with none, exit 3 and say so.
NEED_DAEMON = [
    ["list"],
    ["list", "--json"],
    ["status"],
    ["status", "--json"],
    ["status", "web"],
    ["policy", "show"],
    ["metrics"],
    ["top", "--once"],
    ["top", "--json"],
    ["export"],
    ["events", "-f"],
    ["logs", "web", "-f"],
    ["daemon", "status"],
    ["daemon", "reload"],
]


@pytest.mark.parametrize("args", NEED_DAEMON, ids=" ".join)
def test_read_command_does_not_start_a_daemon(home: Home, args: list[str]) -> None:
    """A read command with no daemon running exits 3 with one line and starts none."""
    r = home.cli(*args)
    assert r.returncode == EXIT_UNREACHABLE, (r.stdout, r.stderr)
    message = NO_DAEMON.format(home=home.path)
    if "--json" in args:
        assert json.loads(r.stderr)["error"]["message"] == message
    else:
        assert r.stderr == f"engctl: error: {message}\n"
    assert r.stdout == ""
    assert daemon_processes(home) == []


def _stopped_home_with_history(home: Home) -> None:
    """A home whose daemon ran an engine (logs, events) and is now stopped."""
    cmd = " ".join(engine_cmd("chatty.py", "0.05"))
    r = home.cli("register", "web", "--cmd", cmd, "--mode", "service")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: "out 3" in home.paths.instance_log("web", 0).read_text(), 20)
    assert home.cli("daemon", "stop").returncode == 0


def test_events_logs_report_and_config_read_the_files_without_a_daemon(home: Home) -> None:
    """`events`, `logs`, `report` and `config` answer from the files and start no daemon."""
    _stopped_home_with_history(home)
    r = home.cli("events", "--json", "-n", "500")
    assert r.returncode == 0, r.stderr
    kinds = [e["kind"] for e in json.loads(r.stdout)["events"]]
    assert "engine.registered" in kinds and kinds[-1] == "daemon.stopped"
    r = home.cli("events", "-e", "web", "-n", "2")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2
    r = home.cli("logs", "web#0", "-n", "3", "--json")
    assert r.returncode == 0, r.stderr
    lines = json.loads(r.stdout)["lines"]
    assert len(lines) == 3 and {item["instance"] for item in lines} == {"web#0"}
    r = home.cli("logs", "web")
    assert r.returncode == 0 and "web#0 | " in r.stdout
    r = home.cli("logs", "nothing")
    assert r.returncode == 7 and "no log files of nothing" in r.stderr
    assert home.cli("report", "--json").returncode == 0
    r = home.cli("config")
    assert r.returncode == 0 and "No daemon is running" in r.stdout
    assert daemon_processes(home) == []


def test_commands_that_change_something_still_start_the_daemon(home: Home) -> None:
    """`register` (and any command that changes or runs something) starts a daemon."""
    r = home.cli("register", "w", "--cmd", " ".join(engine_cmd("sleeper.py")), "--mode", "service")
    assert r.returncode == 0, r.stderr
    assert len(daemon_processes(home)) == 1


# -- engctl config and daemon reload ---------------------------------------------------------


def _config(home: Home) -> dict[str, Any]:
    r = home.cli("config", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict)
    return doc


def test_config_prints_valid_toml_that_reads_back_as_the_same_settings(daemon: Home) -> None:
    """`engctl config` is a config.toml: it parses, and loads as the settings that run."""
    daemon.paths.config_file.write_text(
        "[daemon]\nmax_queue = 77\n[daemon.policy]\nmax_isolated_percent = 34\n"
        "[daemon.policy.failing]\nconsecutive_errors = 3\n"
    )
    assert daemon.cli("daemon", "reload").returncode == 0
    r = daemon.cli("config")
    assert r.returncode == 0, r.stderr
    doc = tomllib.loads(r.stdout)  # no True, no tuples, no bare strings
    copy = daemon.path / "copy.toml"
    copy.write_text(r.stdout)
    assert DaemonConfig.load(copy) == DaemonConfig.load(daemon.paths.config_file)
    assert doc["daemon"]["max_queue"] == 77
    assert doc["daemon"]["capability_weights"]["type"] == 0.4
    info = _config(daemon)
    assert info["source"] == "daemon" and info["daemon_pid"] == daemon.daemon_pid()
    assert info["file_differs"] == {}


def test_config_marks_settings_the_file_changes_and_reload_applies_them(daemon: Home) -> None:
    """A changed config.toml is marked in `config`; `daemon reload` applies what can change
    live and names what needs a restart, and the daemon then runs with it."""
    with daemon.client() as c:
        assert c.call("daemon.config")["settings"]["default_timeout"] == 30.0
    daemon.paths.config_file.write_text(
        "[daemon]\ndefault_timeout = 7.5\nmax_frame_bytes = 2000000\n"
        "[daemon.policy.failing]\nconsecutive_errors = 2\n"
    )
    r = daemon.cli("config")
    assert "default_timeout = 30.0  # config.toml says 7.5: `engctl daemon reload` applies it" in (
        r.stdout
    )
    assert "max_frame_bytes = 1048576  # config.toml says 2000000: a daemon restart" in r.stdout
    assert "#   policy.failing.consecutive_errors = 2" in r.stdout
    assert _config(daemon)["file_differs"] == {
        "default_timeout": 7.5,
        "max_frame_bytes": 2000000,
        "policy.failing.consecutive_errors": 2,
    }
    r = daemon.cli("daemon", "reload", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {
        "changed": ["max_frame_bytes", "default_timeout", "policy"],
        "applied": ["default_timeout", "policy"],
        "restart_needed": ["max_frame_bytes"],
    }
    with daemon.client() as c:
        running = c.call("daemon.config")
    assert running["settings"]["default_timeout"] == 7.5
    assert running["settings"]["max_frame_bytes"] == 1048576
    assert running["restart_needed"] == ["max_frame_bytes"]
    assert _config(daemon)["file_differs"] == {"max_frame_bytes": 2000000}
    daemon.register("e", engine_cmd("echo.py"))
    with daemon.client() as c:
        shown = c.call("policy.show")["engines"][0]
    assert shown["policy"]["failing"]["consecutive_errors"] == 2
    assert shown["sources"]["failing"]["consecutive_errors"] == "daemon"
    events = [e for e in _events(daemon) if e["kind"] == "daemon.reloaded"]
    assert "applied default_timeout, policy" in events[0]["reason"]


def _events(home: Home) -> list[dict[str, Any]]:
    with home.client() as c:
        return cast("list[dict[str, Any]]", c.events(limit=1000))


def test_reload_applies_nothing_from_a_broken_file(daemon: Home) -> None:
    """A config.toml with an error: one line with its line and column, nothing applied."""
    daemon.paths.config_file.write_text("[daemon]\nmax_queue = 5\ndefault_timeout = = 3\n")
    r = daemon.cli("daemon", "reload")
    assert r.returncode == EXIT_USAGE
    assert len(r.stderr.splitlines()) == 1
    assert "line 3, column" in r.stderr and "config.toml" in r.stderr
    with daemon.client() as c:
        assert c.call("daemon.config")["settings"]["max_queue"] == 1000
    r = daemon.cli("config")
    assert r.returncode == 0
    assert "# config.toml has an error, nothing of it applies:" in r.stdout
    tomllib.loads(r.stdout)


def test_reload_changes_dispatch_defaults_live(daemon: Home) -> None:
    """`default_timeout` from a reload bounds the next request without a restart."""
    daemon.register("slow", engine_cmd("slow.py"), type="slow")
    wait_until(lambda: all_ready(daemon, "slow", 1), 20)
    daemon.paths.config_file.write_text("[daemon]\ndefault_timeout = 0.3\n")
    assert daemon.cli("daemon", "reload").returncode == 0
    r = daemon.cli("exec", "--type", "slow", "--", '{"delay": 2}')
    assert r.returncode == 5, (r.stdout, r.stderr)
    assert "0.3" in r.stderr


# -- no library warning reaches the user -------------------------------------------------------


def test_no_runtime_dir_warning_without_xdg_runtime_dir(home: Home) -> None:
    """With no XDG_RUNTIME_DIR and no ENGCTL_HOME, commands print no platformdirs warning and
    use a runtime folder under the state folder."""
    # The user's home: a short folder, as the socket path in it must fit AF_UNIX's 108 bytes
    # (pytest's tmp_path under xdist, /tmp/pytest-of-root/pytest-N/popen-gwK/..., does not).
    tmp_path: Path = home.path
    env = {k: v for k, v in os.environ.items() if k not in ("ENGCTL_HOME", "XDG_RUNTIME_DIR")}
    env["HOME"] = str(tmp_path)
    for k in ("XDG_STATE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME"):
        env.pop(k, None)
    r = subprocess.run(
        [PY, "-m", "engctl", "config", "--json"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    info = json.loads(r.stdout)
    state = tmp_path / ".local" / "state" / "engctl"
    assert info["state_dir"] == str(state)
    assert info["socket"] == str(state / "run" / "engctl.sock")
    r = subprocess.run([PY, "-m", "engctl", "status"], env=env, capture_output=True, text=True)
    assert r.returncode == EXIT_UNREACHABLE
    assert r.stderr.count("\n") == 1 and "Warning" not in r.stderr
