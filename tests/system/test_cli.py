"""The `engctl` command end to end: daemon control, exit codes, messages, JSON, imports."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engctl.errors import (
    EXIT_NOT_FOUND,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    DaemonNotRunningError,
    DaemonUnreachableError,
    EngineNotFoundError,
    InstanceNotFoundError,
)
from tests.conftest import PY, Home, engine_cmd, wait_until
from tests.daemon_support import all_ready, daemon_processes, engine_processes, gone

ROOT = Path(__file__).resolve().parents[2]
SLEEPER = " ".join(engine_cmd("sleeper.py"))


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "engctl", *args], env=env, capture_output=True, text=True, timeout=60
    )


def _one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert r.stdout == ""
    assert "Traceback" not in r.stderr
    return lines[0]


def _json_error(r: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    doc = json.loads(_one_error_line(r))
    assert set(doc) == {"error"}
    assert set(doc["error"]) == {"code", "message"}
    assert isinstance(doc["error"]["code"], int)
    return doc["error"]  # type: ignore[no-any-return]


# -- the daemon commands -------------------------------------------------------------------


def test_daemon_status_without_daemon_exits_3_and_starts_none(home: Home) -> None:
    """`daemon status` with no daemon exits 3 with a hint, and does not start one."""
    r = home.cli("daemon", "status")
    assert r.returncode == EXIT_UNREACHABLE
    line = _one_error_line(r)
    assert "no daemon is running" in line
    assert "engctl daemon start" in line
    err = _json_error(home.cli("daemon", "status", "--json"))
    assert err["code"] == DaemonNotRunningError.rpc_code
    assert home.daemon_pid() is None
    assert daemon_processes(home) == []


def test_daemon_stop_without_daemon_says_so(home: Home) -> None:
    """`daemon stop` with no daemon exits 0 saying none runs, and starts none."""
    r = home.cli("daemon", "stop")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "no daemon running"
    r = home.cli("daemon", "stop", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"stopped": False, "running": False}
    assert daemon_processes(home) == []


def test_daemon_start_twice_runs_one_daemon(home: Home) -> None:
    """A second `daemon start` finds the first daemon and starts no other."""
    first = home.cli("daemon", "start", "--json")
    assert first.returncode == 0, first.stderr
    pid = json.loads(first.stdout)["pid"]
    second = home.cli("daemon", "start")
    assert second.returncode == 0, second.stderr
    assert second.stdout.startswith(f"daemon running: pid {pid},")
    assert [p.pid for p in daemon_processes(home)] == [pid]
    r = home.cli("daemon", "status")
    assert r.returncode == 0, r.stderr
    assert f"pid {pid}" in r.stdout


def test_daemon_stop_stops_engines_then_the_daemon(home: Home) -> None:
    """`daemon stop` stops every engine with its stop signal, then the daemon exits."""
    r = home.cli(
        "register", "sig", "--cmd", " ".join(engine_cmd("siglog.py")), "--mode", "service",
        "--instances", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    insts = wait_until(lambda: all_ready(home, "sig", 2), 20)
    pid = home.daemon_pid()
    r = home.cli("daemon", "stop")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"daemon stopped (pid {pid})"
    assert pid is not None and gone(pid)
    assert all(gone(i["pid"]) for i in insts)
    assert engine_processes(home) == set()
    for k in range(2):
        assert "got SIGTERM" in home.paths.instance_log("sig", k).read_text()
    assert home.cli("daemon", "status").returncode == EXIT_UNREACHABLE
    assert home.cli("daemon", "stop").stdout.strip() == "no daemon running"


def _unstartable_home(home: Home, where: str) -> Path:
    """An ENGCTL_HOME in which the CLI (`home`) or the daemon (`state`) cannot make a folder."""
    if where == "state":
        # The runtime folder can be made, so a daemon is spawned; its state folder cannot.
        target = home.path / "h"
        target.mkdir()
        (target / "state").write_text("not a folder\n")
        return target
    if os.geteuid() == 0:
        # Permission bits do not stop root: put the home under a regular file instead.
        blocker = home.path / "a-file"
        blocker.write_text("not a folder\n")
        return blocker / "home"
    ro = home.path / "read-only"
    ro.mkdir()
    ro.chmod(0o500)
    return ro / "home"


@pytest.mark.parametrize("where", ["home", "state"])
def test_daemon_not_startable_exits_3_with_the_reason(home: Home, where: str) -> None:
    """When the home's folders cannot be created, the CLI exits 3 with a one-line reason."""
    target = _unstartable_home(home, where)
    env = {**home.env, "ENGCTL_HOME": str(target)}
    try:
        r = _run(env, "daemon", "start")
        assert r.returncode == EXIT_UNREACHABLE
        line = _one_error_line(r)
        assert line.startswith("engctl: error: cannot ")
        assert str(target) in line
        if where == "state":
            assert line.startswith("engctl: error: cannot start the daemon: cannot create")
        err = _json_error(_run(env, "start", "x", "--json"))
        assert err["code"] == DaemonUnreachableError.rpc_code
        assert str(target) in err["message"]
        assert _run(env, "daemon", "status").returncode == EXIT_UNREACHABLE
        wait_until(lambda: daemon_processes(home, target) == [], 15)
    finally:
        for p in home.path.iterdir():
            if p.is_dir():
                p.chmod(0o700)


def test_daemon_with_a_bad_config_file_exits_3_naming_it(home: Home) -> None:
    """A daemon that refuses its config.toml makes the CLI exit 3 with the daemon's reason."""
    home.paths.config_file.write_text("[daemon]\nsample_interval = 1.0\nbogus_setting = 2\n")
    r = home.cli("daemon", "start")
    assert r.returncode == EXIT_UNREACHABLE
    line = _one_error_line(r)
    assert "cannot start the daemon" in line
    assert "bogus_setting" in line
    assert "config.toml" in line
    # The daemon that refused to start exits right after it said why.
    wait_until(lambda: daemon_processes(home) == [], 15)


def test_too_long_home_exits_3_with_the_reason(home: Home) -> None:
    """An ENGCTL_HOME too long for an AF_UNIX socket path is refused with exit 3."""
    env = {**home.env, "ENGCTL_HOME": str(home.path / ("x" * 120))}
    r = _run(env, "status")
    assert r.returncode == EXIT_UNREACHABLE
    assert "longer than" in _one_error_line(r)


# -- exit codes and messages ---------------------------------------------------------------


def test_unknown_engine_exits_7_listing_known_names(daemon: Home) -> None:
    """Every command given an unknown engine exits 7 and lists the registered names."""
    for name in ("beta", "alpha"):
        r = daemon.cli("register", name, "--cmd", SLEEPER, "--mode", "service", "--no-start")
        assert r.returncode == 0, r.stderr
    for args in (
        ["stop", "nope"],
        ["start", "nope"],
        ["restart", "nope"],
        ["status", "nope"],
        ["scale", "nope", "2"],
        ["logs", "nope"],
        ["events", "--engine", "nope"],
        ["unregister", "nope"],
        ["export", "nope"],
        ["stop", "alpha", "nope"],
    ):
        r = daemon.cli(*args)
        assert r.returncode == EXIT_NOT_FOUND, (args, r.stderr)
        assert _one_error_line(r) == "engctl: error: unknown engine 'nope' (known: alpha, beta)"
    r = daemon.cli("stop", "alpha#3")
    assert r.returncode == EXIT_NOT_FOUND
    assert "alpha" in _one_error_line(r)
    err = _json_error(daemon.cli("stop", "alpha#3", "--json"))
    assert err["code"] == InstanceNotFoundError.rpc_code
    # Nothing was stopped by the command that named a good and a bad engine.
    assert [e["desired"] for e in daemon.status()["engines"]] == ["stopped", "stopped"]


def test_json_errors_are_a_json_object_on_stderr(daemon: Home) -> None:
    """With --json an error is one JSON object with code and message on stderr, stdout empty."""
    r = daemon.cli("stop", "nope", "--json")
    assert r.returncode == EXIT_NOT_FOUND
    err = _json_error(r)
    assert err["code"] == EngineNotFoundError.rpc_code
    assert err["message"] == "unknown engine 'nope' (known: none registered)"
    r = daemon.cli("status", "--json", "--bogus")
    assert r.returncode == EXIT_USAGE
    assert "--bogus" in _json_error(r)["message"]


@pytest.mark.parametrize(
    "args",
    [
        ["status", "--bogus"],
        ["frobnicate"],
        ["scale", "s", "many"],
        ["status", "--interval", "0"],
        ["completion", "tcsh"],
        ["logs"],
        ["register", "x"],
        ["register", "x", "--cmd", "ls", "--label", "novalue"],
        ["register", "x", "--cmd", "ls", "--instances", "5000"],
        ["register", "x", "--cmd", "ls", "--mode", "daemonish"],
        ["events", "--since", "yesterday"],
        ["apply"],
    ],
    ids=lambda a: "-".join(a),
)
def test_usage_errors_exit_2_with_one_line(home: Home, args: list[str]) -> None:
    """A bad flag, argument or value exits 2 with one line on stderr and starts no daemon."""
    r = home.cli(*args)
    assert r.returncode == EXIT_USAGE, r.stderr
    assert _one_error_line(r).startswith("engctl: error: ")
    assert home.daemon_pid() is None


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("[engines.a]\ncommand = [x]\n", "line 2, column 12"),
        ('[engines.a]\ncommand = ["x"\n', "line 3, column 1"),
        ('[engines.a\ncommand = ["x"]\n', "line 1, column 11"),
        ('[engines.a]\ncommand = ["x"]\nlabels = { a = "b" \n', "line 3"),
    ],
    ids=["bad-value", "unclosed-at-end", "bad-header", "unclosed-inline-table"],
)
def test_malformed_toml_exits_2_naming_line_and_column(
    home: Home, tmp_path: Path, text: str, where: str
) -> None:
    """A malformed engines file exits 2 and the message names the file, line and column."""
    path = tmp_path / "engines.toml"
    path.write_text(text)
    for cmd in ("register", "apply"):
        r = home.cli(cmd, "-f", str(path))
        assert r.returncode == EXIT_USAGE
        line = _one_error_line(r)
        assert str(path) in line
        assert "invalid TOML" in line
        assert where in line
    r = home.cli("register", "-f", "-", input=text)
    assert r.returncode == EXIT_USAGE
    assert "<stdin>" in r.stderr and where in r.stderr
    assert home.daemon_pid() is None


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ('colour = "red"\n', "engines.a.colour: unknown key 'colour'"),
        ('[engines.a.restart]\npolcy = "always"\n', "engines.a.restart.polcy: unknown key"),
        ("[engines.a.restart.backoff]\nmaximum = 3\n", "engines.a.restart.backoff.maximum"),
    ],
    ids=["top", "restart", "backoff"],
)
def test_unknown_key_exits_2_naming_it(home: Home, tmp_path: Path, extra: str, field: str) -> None:
    """An unknown key anywhere in an engines file exits 2 and the message names it."""
    path = tmp_path / "engines.toml"
    path.write_text('[engines.a]\ncommand = ["x"]\n' + extra)
    r = home.cli("register", "-f", str(path))
    assert r.returncode == EXIT_USAGE
    assert field in _one_error_line(r)


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ("instances = 5000\n", "engines.a.instances: must be from 0 to 1000, got 5000"),
        ("weight = -1\n", "engines.a.weight: must be above 0"),
        ("max_concurrency = 0\n", "engines.a.max_concurrency"),
        ("[engines.a.stop]\ntimeout = -2\n", "engines.a.stop.timeout"),
        ("[engines.a.restart.backoff]\nfactor = 0.5\n", "engines.a.restart.backoff.factor"),
        ('[engines.a.limits]\nmax_rss = "lots"\n', "engines.a.limits.max_rss"),
    ],
    ids=["instances", "weight", "max_concurrency", "stop-timeout", "backoff-factor", "max_rss"],
)
def test_out_of_range_value_exits_2_naming_the_field(
    home: Home, tmp_path: Path, extra: str, field: str
) -> None:
    """A value out of its range exits 2 and the message names the field."""
    path = tmp_path / "engines.toml"
    path.write_text('[engines.a]\ncommand = ["x"]\n' + extra)
    r = home.cli("register", "-f", str(path))
    assert r.returncode == EXIT_USAGE
    assert field in _one_error_line(r)


def test_missing_engines_file_exits_2(home: Home, tmp_path: Path) -> None:
    """An engines file that cannot be read exits 2 naming it."""
    missing = tmp_path / "nope.toml"
    r = home.cli("register", "-f", str(missing))
    assert r.returncode == EXIT_USAGE
    assert str(missing) in _one_error_line(r)


def test_stop_of_a_stopped_engine_exits_0(daemon: Home) -> None:
    """Stopping an engine that is already stopped succeeds and says there was nothing to do."""
    r = daemon.cli("register", "s", "--cmd", SLEEPER, "--mode", "service", "--no-start")
    assert r.returncode == 0, r.stderr
    r = daemon.cli("stop", "s")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "nothing to do (already stopped)"
    r = daemon.cli("start", "s")
    assert r.returncode == 0, r.stderr
    daemon.wait_state("s#0", "ready", timeout=20)
    for expected in ("stopped: s#0", "nothing to do (already stopped)"):
        r = daemon.cli("stop", "s")
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == expected
    r = daemon.cli("stop", "s", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"stopped": [], "waited": True, "dependents": []}


# -- status --json -------------------------------------------------------------------------

ENGINE_KEYS = {"name", "type", "mode", "instances_wanted", "instances"}
INSTANCE_KEYS = {
    "id", "pid", "state", "health", "eligibility", "restarts", "uptime_s", "cpu_percent",
    "rss_bytes", "last_exit",
}  # fmt: skip


def test_status_json_has_the_documented_keys(daemon: Home) -> None:
    """`status --json` gives every documented engine and instance key with the documented values."""
    r = daemon.cli(
        "register", "web", "--cmd", SLEEPER, "--mode", "service", "--type", "http",
        "--instances", "2",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    r = daemon.cli("register", "idle", "--cmd", SLEEPER, "--mode", "service", "--no-start")
    assert r.returncode == 0, r.stderr
    wait_until(lambda: all_ready(daemon, "web", 2), 20)
    r = daemon.cli("stop", "web#1")
    assert r.returncode == 0, r.stderr
    # CPU and memory figures are null until the monitor's first reading of the process.
    wait_until(lambda: daemon.instance("web#0")["rss_bytes"] is not None)

    r = daemon.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    doc = json.loads(r.stdout)
    assert set(doc) >= {"engines"}
    engines = {e["name"]: e for e in doc["engines"]}
    assert list(engines) == ["idle", "web"]
    for e in doc["engines"]:
        assert set(e) >= ENGINE_KEYS, ENGINE_KEYS - set(e)
        assert e["mode"] == "service"
        assert len(e["instances"]) == e["instances_wanted"]
        for i in e["instances"]:
            assert set(i) >= INSTANCE_KEYS, INSTANCE_KEYS - set(i)
            assert i["health"] == "unknown"
            # Not active without a process that takes requests (issue 10.19).
            assert i["eligibility"] == ("active" if i["state"] == "ready" else "unavailable"), i
            assert i["restarts"] == 0
    web = engines["web"]
    assert (web["type"], web["instances_wanted"]) == ("http", 2)
    running, stopped = web["instances"]
    assert running["id"] == "web#0" and running["state"] == "ready"
    assert isinstance(running["pid"], int) and running["pid"] > 0
    assert isinstance(running["uptime_s"], int | float) and running["uptime_s"] >= 0
    assert isinstance(running["cpu_percent"], int | float)
    assert isinstance(running["rss_bytes"], int)
    assert running["last_exit"] is None
    assert stopped["id"] == "web#1" and stopped["state"] == "stopped"
    assert (stopped["pid"], stopped["uptime_s"], stopped["cpu_percent"], stopped["rss_bytes"]) == (
        None,
        None,
        None,
        None,
    )
    assert set(stopped["last_exit"]) >= {"code", "signal", "at"}
    assert stopped["last_exit"]["code"] == 0
    idle = engines["idle"]["instances"][0]
    assert (idle["state"], idle["pid"], idle["last_exit"]) == ("stopped", None, None)

    r = daemon.cli("status", "web", "--json")
    assert [e["name"] for e in json.loads(r.stdout)["engines"]] == ["web"]


def test_status_text_lists_instances(daemon: Home) -> None:
    """`status` prints a table naming each instance and its state."""
    r = daemon.cli("status")
    assert r.returncode == 0, r.stderr
    assert "no engines registered" in r.stdout
    daemon.register("web", engine_cmd("sleeper.py"), mode="service", restart={"start_seconds": 0})
    daemon.wait_state("web#0", "ready", timeout=20)
    r = daemon.cli("status")
    assert r.returncode == 0, r.stderr
    assert "web#0" in r.stdout and "ready" in r.stdout


# -- import discipline ---------------------------------------------------------------------


def _imported(env: dict[str, str], *args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    r = subprocess.run(
        [PY, "-X", "importtime", "-m", "engctl", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    mods = {
        line.rsplit("|", 1)[1].strip()
        for line in r.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return r, mods


def _under(mods: set[str], package: str) -> set[str]:
    return {m for m in mods if m == package or m.startswith(package + ".")}


def test_version_imports_no_heavy_module(home: Home) -> None:
    """`engctl --version` imports neither rich, psutil, the client nor the daemon."""
    r, mods = _imported(home.env, "--version")
    assert r.returncode == 0
    assert r.stdout.strip().startswith("engctl ")
    assert "engctl.cli" in mods  # the import list was read
    for package in ("rich", "psutil", "engctl.client", "engctl.daemon"):
        assert not _under(mods, package), package


def test_cli_talking_to_a_daemon_imports_no_daemon_code(daemon: Home) -> None:
    """`engctl status --json` against a running daemon never imports engctl.daemon."""
    daemon.register("s", engine_cmd("sleeper.py"), mode="service", restart={"start_seconds": 0})
    r, mods = _imported(daemon.env, "status", "--json")
    assert r.returncode == 0
    assert [e["name"] for e in json.loads(r.stdout)["engines"]] == ["s"]
    assert "engctl.client" in mods
    assert not _under(mods, "engctl.daemon")
    assert not _under(mods, "psutil")


def test_plain_status_json_skips_typer_and_matches_the_typer_command(daemon: Home) -> None:
    """Plain `status --json` runs without typer and prints what the typer command prints."""
    daemon.register("s", engine_cmd("sleeper.py"), mode="service", restart={"start_seconds": 0})
    daemon.wait_state("s#0", "ready")
    r, mods = _imported(daemon.env, "status", "--json", "s")
    assert r.returncode == 0, r.stderr
    assert not _under(mods, "typer")
    assert not _under(mods, "rich")
    # Any other flag (here --interval) goes through typer; it prints the same document.
    slow = daemon.cli("status", "s", "--json", "--interval", "1")
    assert slow.returncode == 0, slow.stderr
    fast_doc, slow_doc = json.loads(r.stdout), json.loads(slow.stdout)
    for doc in (fast_doc, slow_doc):
        for inst in doc["engines"][0]["instances"]:
            for volatile in ("uptime_s", "cpu_percent", "rss_bytes", "threads", "fds"):
                inst.pop(volatile)
    assert fast_doc == slow_doc


# -- completions ---------------------------------------------------------------------------

COMPLETION_FILES = {"bash": "engctl.bash", "zsh": "_engctl", "fish": "engctl.fish"}


@pytest.mark.parametrize("shell", sorted(COMPLETION_FILES))
def test_completion_output_matches_the_shipped_file(home: Home, shell: str) -> None:
    """`engctl completion SHELL` prints exactly the file shipped in completions/."""
    r = home.cli("completion", shell)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (ROOT / "completions" / COMPLETION_FILES[shell]).read_text()
    assert "engctl" in r.stdout


def test_bash_completion_script_completes_subcommands(home: Home) -> None:
    """Sourcing the shipped bash script completes `engctl daemon st` to start, status, stop."""
    script = ROOT / "completions" / "engctl.bash"
    bin_dir = str(Path(PY).parent)
    env = {**home.env, "PATH": bin_dir + os.pathsep + home.env.get("PATH", "")}
    if not (Path(bin_dir) / "engctl").exists():
        pytest.skip("no engctl console script next to this interpreter")
    r = subprocess.run(
        [
            "bash",
            "-c",
            f'source "{script}"; COMP_WORDS=(engctl daemon st); COMP_CWORD=2;'
            ' _engctl_completion engctl; printf "%s\\n" "${COMPREPLY[@]}"',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split()) == ["start", "status", "stop"]
    assert home.daemon_pid() is None
