"""The shipped completion scripts in real shells (issue 10.24): bash, zsh and fish complete
commands, option values and engine and instance names from a running daemon, never start
one, and a completion call answers within 100 ms with the daemon up and with it down."""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PY, Home, engine_cmd

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(PY).parent
SCRIPTS = {"bash": "engctl.bash", "zsh": "_engctl", "fish": "engctl.fish"}


def _env(home: Home) -> dict[str, str]:
    if not (BIN / "engctl").exists():
        pytest.skip("no engctl console script next to this interpreter")
    return {**home.env, "PATH": f"{BIN}{os.pathsep}{home.env.get('PATH', '')}"}


def complete_in(shell: str, home: Home, line: str) -> list[str]:
    """What the shipped script of `shell` offers for `line` (the cursor at its end)."""
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    script = ROOT / "completions" / SCRIPTS[shell]
    words = line.split(" ")
    if shell == "bash":
        quoted = " ".join(f"'{w}'" for w in words)
        code = (
            f'source "{script}"; COMP_WORDS=({quoted}); COMP_CWORD={len(words) - 1};'
            ' _engctl_completion engctl; printf "%s\\n" "${COMPREPLY[@]}"'
        )
        argv = ["bash", "-c", code]
    elif shell == "zsh":
        # compadd and _files print what they are given; compdef is a no-op outside compinit.
        quoted = " ".join(f"'{w}'" for w in words)
        code = (
            "compdef() { :; }; compadd() { shift; printf '%s\\n' \"$@\"; };"
            " _files() { print FILES; };"
            f' source "{script}"; words=({quoted}); CURRENT={len(words)}; _engctl_completion'
        )
        argv = ["zsh", "-f", "-c", code]
    else:
        argv = ["fish", "--no-config", "-c", f'source "{script}"; complete -C "{line}"']
    r = subprocess.run(argv, env=_env(home), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return sorted(x.split("\t")[0] for x in r.stdout.splitlines() if x)


@pytest.mark.parametrize("shell", sorted(SCRIPTS))
def test_scripts_complete_commands_and_option_values_without_a_daemon(
    home: Home, shell: str
) -> None:
    """Commands, subcommands and option values complete with no daemon, and none starts."""
    assert complete_in(shell, home, "engctl daemon st") == ["start", "status", "stop"]
    assert complete_in(shell, home, "engctl exec --strategy least") == ["least_loaded"]
    assert complete_in(shell, home, "engctl register x --mode s") == ["service"]
    assert complete_in(shell, home, "engctl top --sort r") == ["rps", "rss"]
    assert home.daemon_pid() is None


@pytest.mark.parametrize("shell", sorted(SCRIPTS))
def test_scripts_complete_engine_and_instance_names_from_the_daemon(
    daemon: Home, shell: str
) -> None:
    """With a daemon running, targets complete to engines and their instances, --type to the
    registered types."""
    with daemon.client() as c:
        c.register(
            {
                "web": {"command": engine_cmd("sleeper.py"), "mode": "service", "instances": 2,
                        "type": "http"},
                "db": {"command": engine_cmd("sleeper.py"), "mode": "service"},
            },
            start=False,
        )  # fmt: skip
    assert complete_in(shell, daemon, "engctl stop w") == ["web", "web#0", "web#1"]
    assert complete_in(shell, daemon, "engctl status --type h") == ["http"]
    assert complete_in(shell, daemon, "engctl logs d") == ["db", "db#0"]


def _completion_seconds(home: Home, runs: int = 7) -> float:
    """The median CPU time (user + system) of a completion call (`engctl stop <Tab>`),
    process start included: what a Tab costs, whatever else runs on the machine (its wall
    time measured the load of the tests running in parallel)."""
    env = {**_env(home), "_ENGCTL_COMPLETE": "bash"}
    times = []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        r = subprocess.run(
            [str(BIN / "engctl"), "stop", ""], env=env, capture_output=True, text=True, timeout=30
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        assert r.returncode == 0 and r.stderr == "", r.stderr
    return statistics.median(times)


def test_completion_answers_within_100_ms_with_the_daemon_down_and_up(home: Home) -> None:
    """A Tab costs under 100 ms (median of 7 calls) without a daemon, which it never starts,
    and with one running that it asks for the names (typer's own took ~100 ms alone)."""
    assert _completion_seconds(home) < 0.1
    assert home.daemon_pid() is None
    home.start_daemon()
    home.register("web", engine_cmd("sleeper.py"), mode="service", instances=3)
    env = {**_env(home), "_ENGCTL_COMPLETE": "bash"}
    r = subprocess.run([str(BIN / "engctl"), "stop", ""], env=env, capture_output=True, text=True)
    assert r.stdout.split() == ["web", "web#0", "web#1", "web#2"]
    assert _completion_seconds(home) < 0.1
