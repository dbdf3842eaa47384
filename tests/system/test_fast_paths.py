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
    return child.before  # type: ignore[no-any-return]


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


# What rich's Console decides for stdout, and what `stdout_style` says it decides.
_PROBE = """
import json
from engctl.cli.terminal import console, stdout_style
con = console()
escapes = None if con.color_system is None else "no_color" if con.no_color else "color"
print(json.dumps({"ours": stdout_style(), "rich": [con.width, escapes]}))
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
    for seen in (json.loads(piped.stdout), json.loads(child.before.decode())):
        if seen["ours"] is not None:
            assert seen["ours"] == seen["rich"], extra
    decided_by_rich = {"TERM": "dumb"}.items() <= extra.items() or any(
        k in extra for k in ("FORCE_COLOR", "TTY_COMPATIBLE")
    )
    assert (json.loads(child.before.decode())["ours"] is None) == decided_by_rich
