"""The typer-free paths of the plain `status` table and `engctl --help` print, byte for byte,
what the typer commands print, to a pipe and to a terminal (issue 13.5: the human CLI as
fast as --json)."""

from __future__ import annotations

import json
import subprocess

import pexpect
import pytest

from engctl.errors import EXIT_NOT_FOUND
from tests.conftest import PY, Home, engine_cmd, wait_until
from tests.system.test_cli import _imported, _under


def _fleet(daemon: Home) -> None:
    """Engines whose status does not change while it is read: no pid, uptime, CPU or RSS."""
    with daemon.client() as c:
        c.register(
            {"idle": {"command": engine_cmd("sleeper.py"), "mode": "service", "instances": 2}},
            start=False,
        )
        c.register(
            {
                "upper": {"command": engine_cmd("oneshot_upper.py"), "mode": "oneshot"},
                "gone": {
                    "command": engine_cmd("crashing.py", "0", "3"),
                    "mode": "service",
                    "restart": {"policy": "never"},
                },
            }
        )
    daemon.wait_state("gone#0", "exited")
    # A stopped instance turns unavailable at the daemon's next sweep: wait for a still life.
    wait_until(lambda: all(i["eligibility"] == "unavailable" for i in daemon.instances()))


# Variables a CI system may set that decide how rich writes: each test sets its own.
_TERMINAL_VARIABLES = ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR", "COLUMNS", "TERMINAL_WIDTH")


def _env(home: Home, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in home.env.items() if k not in _TERMINAL_VARIABLES}
    return {**env, "TERM": "xterm-256color", **extra}


def _piped(
    env: dict[str, str], *args: str, python: bool = False
) -> subprocess.CompletedProcess[str]:
    """What `engctl ARGS` (or `python ARGS`) writes to a pipe."""
    command = [PY, *args] if python else [PY, "-m", "engctl", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def _on_a_terminal(env: dict[str, str], args: list[str], columns: int) -> bytes:
    """What `engctl ARGS` writes to a terminal `columns` wide."""
    child = pexpect.spawn(PY, ["-m", "engctl", *args], env=env, dimensions=(50, columns))
    child.expect(pexpect.EOF, timeout=60)
    child.close()
    assert child.exitstatus == 0, child.before
    assert isinstance(child.before, bytes), child.before
    return child.before


def test_plain_status_table_skips_typer_and_matches_the_typer_command(daemon: Home) -> None:
    """Plain `status` runs without typer or rich and prints what the typer command (reached
    here with --interval) prints: to a pipe, at 60 columns (notes under the table), and to
    terminals with and without colours."""
    _fleet(daemon)
    r, mods = _imported(_env(daemon), "status")
    assert r.returncode == 0, r.stderr
    assert "gone#0" in r.stdout and "oneshot ×1" in r.stdout
    assert not _under(mods, "typer")
    assert not _under(mods, "rich")
    for env in (_env(daemon), _env(daemon, COLUMNS="60")):
        fast, slow = _piped(env, "status"), _piped(env, "status", "--interval", "1")
        assert (fast.returncode, fast.stdout, fast.stderr) == (0, slow.stdout, slow.stderr)
    terminals = [(120, _env(daemon)), (60, _env(daemon)), (90, _env(daemon, NO_COLOR="1"))]
    for columns, env in terminals:
        fast_tty = _on_a_terminal(env, ["status"], columns)
        assert fast_tty == _on_a_terminal(env, ["status", "--interval", "1"], columns)
        assert b"\x1b[1mINSTANCE" in fast_tty
        assert (b"too narrow" in fast_tty) == (columns == 60)


def test_plain_status_of_an_unknown_engine_exits_7_like_the_typer_command(daemon: Home) -> None:
    """The fast path's errors are the typer command's: the same line, the same exit code."""
    fast = _piped(_env(daemon), "status", "nope")
    slow = _piped(_env(daemon), "status", "nope", "--interval", "1")
    assert fast.returncode == slow.returncode == EXIT_NOT_FOUND
    assert fast.stderr == slow.stderr and fast.stderr.count("\n") == 1


# What rich's Console decides for stdout, and what `stdout_style` says it decides: for the
# CLI's console (tables) and for a default one (typer's help).
_PROBE = """
import json
from rich.console import Console
from engctl.cli.terminal import console, stdout_style

def decided(con):
    escapes = None if con.color_system is None else "no_color" if con.no_color else "color"
    return [con.width, escapes]

print(json.dumps({
    "tables": {"ours": stdout_style(), "rich": decided(console())},
    "help": {"ours": stdout_style(pipe_width=None), "rich": decided(Console())},
}))
"""


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"COLUMNS": "77"},
        {"COLUMNS": "wide"},
        {"COLUMNS": ""},
        {"NO_COLOR": "1"},
        {"NO_COLOR": ""},
        {"TERM": "xterm"},
        {"TERM": "linux", "COLORTERM": "truecolor"},
        {"TERM": "dumb"},
        {"FORCE_COLOR": "1"},
        {"TTY_COMPATIBLE": "0"},
    ],
    ids=repr,
)
def test_stdout_style_is_what_rich_decides(home: Home, extra: dict[str, str]) -> None:
    """The width and escape codes the fast paths write with are the ones rich's Console
    picks for the same stdout and environment, on a terminal and on a pipe; an environment
    only rich understands is left to it (None)."""
    env = _env(home, **extra)
    piped = _piped(env, "-c", _PROBE, python=True)
    child = pexpect.spawn(PY, ["-c", _PROBE], env=env, dimensions=(24, 93))
    child.expect(pexpect.EOF, timeout=60)
    assert isinstance(child.before, bytes), child.before
    on_tty = json.loads(child.before.decode())
    for seen in (json.loads(piped.stdout), on_tty):
        for console in ("tables", "help"):
            if seen[console]["ours"] is not None:
                assert seen[console]["ours"] == seen[console]["rich"], (console, extra)
    decided_by_rich = {"TERM": "dumb"}.items() <= extra.items() or any(
        k in extra for k in ("FORCE_COLOR", "TTY_COMPATIBLE")
    )
    assert (on_tty["tables"]["ours"] is None) == decided_by_rich
    assert (on_tty["help"]["ours"] is None) == decided_by_rich


@pytest.mark.parametrize("args", [["--help"], ["-h"], []], ids=repr)
def test_root_help_skips_typer_and_matches_typers(home: Home, args: list[str]) -> None:
    """`engctl --help`, `-h` and `engctl` alone print typer's help without importing typer
    or rich: to a pipe (80 columns, as typer's rich sizes a pipe), at COLUMNS=61, and to
    terminals with and without colours. TERMINAL_WIDTH hands the help to typer: the
    reference."""
    r, mods = _imported(_env(home), *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[1].strip() == "Usage: engctl [OPTIONS] COMMAND [ARGS]..."
    assert not _under(mods, "typer")
    assert not _under(mods, "rich")
    for width, env in ((80, _env(home)), (61, _env(home, COLUMNS="61"))):
        fast = _piped(env, *args)
        slow = _piped({**env, "TERMINAL_WIDTH": str(width)}, *args)
        assert (fast.returncode, fast.stdout, fast.stderr) == (0, slow.stdout, slow.stderr)
        assert max(len(line) for line in fast.stdout.splitlines()) == width
    for columns, env in ((100, _env(home)), (72, _env(home, NO_COLOR="1"))):
        fast_tty = _on_a_terminal(env, args, columns)
        slow_tty = _on_a_terminal({**env, "TERMINAL_WIDTH": str(columns)}, args, columns)
        assert fast_tty == slow_tty
        assert (b"\x1b[1;36m" in fast_tty) == ("NO_COLOR" not in env)


def test_subcommand_help_still_goes_through_typer(home: Home) -> None:
    """A subcommand's --help is typer's, as before."""
    r, mods = _imported(_env(home), "status", "--help")
    assert r.returncode == 0, r.stderr
    assert "Usage: engctl status [OPTIONS] [names]..." in r.stdout
    assert _under(mods, "typer")


def test_commands_of_ordinary_size_do_not_load_orjson(daemon: Home) -> None:
    """Issue 13.2: orjson's import (dataclasses, uuid, datetime, inspect) costs more than it
    saves one command: `status`, `status --json` and `exec` of a small input run without it,
    while a large input is encoded and its result decoded by it."""
    with daemon.client() as c:
        c.register({"e": {"command": engine_cmd("echo.py"), "type": "echo"}})
    daemon.wait_state("e#0", "ready")
    for args in (["status"], ["status", "--json"], ["exec", "--type", "echo", "--", "1"]):
        r, mods = _imported(_env(daemon), *args)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "orjson" not in mods, args
    big = json.dumps({"x": "y" * 100_000})
    r, mods = _imported(_env(daemon), "exec", "--type", "echo", "--json-input", "--", big)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "orjson" in mods
    assert json.loads(r.stdout) == {"echo": json.loads(big)}  # the echo engine's answer
