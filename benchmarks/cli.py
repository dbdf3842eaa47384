"""Human CLI benchmark (issue 13.5): prints one JSON object with every figure and its target.

Run: `python benchmarks/cli.py [--quick] [--runs N] [--supervisor-venv PATH]
[--baseline-engctl PATH]` (about a minute; `--quick` a few seconds).

Start-up time of what people type, each command the median of N runs and its ratio to
`python -c pass`, all measured in the same rounds (each round runs every command once, in
turn, so load from elsewhere hits them alike):
- `engctl --version`, `engctl --help`;
- `engctl status` (the table, written to a pseudo-terminal of a fixed size, so rich's own
  layout and colours are what is measured) and `engctl status --json` (to a pipe), with 10
  and with 200 instances of `sleep` (20 with --quick) in a fresh daemon;
- with `--supervisor-venv`, a venv where `supervisor` is installed (never a dependency of
  engctl): `supervisorctl help`, and `supervisorctl status` against a supervisord running as
  many `sleep` programs;
- with `--baseline-engctl`, another install's `engctl` (e.g. main's) on the same commands.

Measure an installed copy (`pip install .` into a fresh venv, not editable: an installed copy
has its bytecode compiled) by running this script with that venv's Python, or pass its
`engctl` with `--engctl`. The daemon, supervisord, their processes and the temporary folders
are removed at the end, even on error, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pty
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path
from typing import Any

from common import (
    SLEEP,
    all_ready,
    exit_cleanly_on_sigterm,
    machine_info,
    source_state,
    stop_daemon,
    supervisord,
    wait_for,
)

from engctl.client import Client

PY = sys.executable
# The pseudo-terminal the human commands write to.
COLUMNS, LINES = 160, 50


def on_terminal(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds `cmd` takes from start to exit, writing to a terminal COLUMNS wide (read as it
    comes, as a terminal would)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", LINES, COLUMNS, 0, 0))
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    with contextlib.suppress(OSError):  # EIO once the last writer is gone
        while os.read(master, 65536):
            pass
    code = proc.wait()
    elapsed = time.perf_counter() - t
    os.close(master)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}")
    return elapsed


def on_pipe(cmd: list[str], env: dict[str, str]) -> float:
    """Seconds `cmd` takes from start to exit, writing to a pipe (as a script reads it)."""
    t = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t


def interleaved(
    commands: dict[str, tuple[Any, list[str]]],
    runs: int,
    env: dict[str, str],
    times: dict[str, list[float]],
) -> None:
    """Time each command `runs` times, in rounds, into `times` (milliseconds); one warm-up
    round first."""
    for round_ in range(runs + 1):
        for name, (how, cmd) in commands.items():
            elapsed = how(cmd, env) * 1000
            if round_:
                times.setdefault(name, []).append(elapsed)


def fleet(c: Client, instances: int, settle: float) -> None:
    """Exactly one engine of `instances` sleep instances, all ready, then `settle` seconds for
    the monitor to sample them (a settled fleet shows CPU and RSS)."""
    names = [e["name"] for e in c.status()["engines"]]
    if names:
        c.unregister(names)
    name = f"sleep{instances}"
    c.register({name: {"command": [SLEEP, "3600"], "mode": "service", "instances": instances}})
    wait_for(lambda: all_ready(c, name, instances), 120)
    time.sleep(settle)


def main() -> None:
    exit_cleanly_on_sigterm()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="3 runs, 20 instances: seconds")
    parser.add_argument("--runs", type=int, help="runs per command (default 15; 3 with --quick)")
    parser.add_argument("--engctl", help="the engctl measured (default: next to this Python)")
    parser.add_argument("--baseline-engctl", help="another install's engctl, measured alike")
    parser.add_argument("--supervisor-venv", type=Path, help="a venv with supervisor installed")
    args = parser.parse_args()
    runs = args.runs or (3 if args.quick else 15)
    big = 20 if args.quick else 200
    engctls = {"engctl": args.engctl or str(Path(PY).with_name("engctl"))}
    if args.baseline_engctl:
        engctls["baseline"] = args.baseline_engctl
    venv = args.supervisor_venv
    if venv is not None and not (venv / "bin" / "supervisorctl").exists():
        parser.error(f"no supervisorctl in {venv}/bin (pip install supervisor there)")

    home = tempfile.mkdtemp(prefix="cbench", dir="/tmp")
    # As installed: pip writes bytecode at install time, so the timed commands may write it too
    # (with PYTHONDONTWRITEBYTECODE=1 every run would recompile engctl from source).
    env = {**os.environ, "ENGCTL_HOME": home, "TERM": "xterm-256color"}
    for name in ("PYTHONDONTWRITEBYTECODE", "COLUMNS", "LINES", "FORCE_COLOR", "NO_COLOR"):
        env.pop(name, None)
    result: dict[str, Any] = {
        "machine": machine_info(source=source_state()),
        "runs": runs,
        "terminal": f"{COLUMNS}x{LINES}",
        "engctl": engctls,
    }
    times: dict[str, list[float]] = {}
    c = Client(home)
    daemon_pid = None
    try:
        c.connect()
        daemon_pid = c.daemon_info["pid"]
        for instances in (10, big):
            fleet(c, instances, settle=0.5 if args.quick else 1.5)
            with contextlib.ExitStack() as stack:
                ctl = stack.enter_context(supervisord(venv, instances)) if venv else None
                commands = phase(engctls, instances, ctl)
                interleaved(commands, runs, env, times)
    finally:
        c.close()
        stop_daemon(home, daemon_pid)
        shutil.rmtree(home, ignore_errors=True)

    figures = {name: statistics.median(t) for name, t in times.items()}
    base = figures["python -c pass"]
    result["machine"]["loadavg_1m_at_end"] = round(os.getloadavg()[0], 2)
    result["figures"] = {
        name: {"median_ms": round(ms, 1), "ratio_to_python": round(ms / base, 2)}
        for name, ms in figures.items()
    }
    status, helps = figures[f"engctl status ({big})"], figures["engctl --help"]
    sv_status = figures.get(f"supervisorctl status ({big})")
    sv_help = figures.get("supervisorctl help")
    result["targets"] = {
        f"status_table_{big}_le_120ms": status <= 120,
        "help_le_150ms": helps <= 150,
        "status_table_ahead_of_supervisorctl": None if sv_status is None else status < sv_status,
        "help_ahead_of_supervisorctl": None if sv_help is None else helps < sv_help,
        "version_le_3x_python": figures["engctl --version"] <= 3 * base,
        "status_json_le_3x_python": all(
            figures[f"engctl status --json ({n})"] <= 3 * base for n in (10, big)
        ),
    }
    print(json.dumps(result, indent=2))


def phase(
    engctls: dict[str, str], instances: int, ctl: list[str] | None
) -> dict[str, tuple[Any, list[str]]]:
    """The commands timed with `instances` instances running (and as many supervisord
    programs, when `ctl` is its supervisorctl): the ones that do not depend on the fleet
    only in the first phase. Scripts' commands to a pipe, people's to a terminal."""
    first = instances == 10
    commands: dict[str, tuple[Any, list[str]]] = {"python -c pass": (on_pipe, [PY, "-c", "pass"])}
    for who, exe in engctls.items():
        if first:
            commands[f"{who} --version"] = (on_pipe, [exe, "--version"])
            commands[f"{who} --help"] = (on_terminal, [exe, "--help"])
        commands[f"{who} status ({instances})"] = (on_terminal, [exe, "status"])
        commands[f"{who} status --json ({instances})"] = (on_pipe, [exe, "status", "--json"])
    if ctl is not None:
        if first:
            commands["supervisorctl help"] = (on_terminal, [*ctl, "help"])
        commands[f"supervisorctl status ({instances})"] = (on_terminal, [*ctl, "status"])
    return commands


if __name__ == "__main__":
    main()
