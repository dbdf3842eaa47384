"""`engctl top` in a terminal (pexpect): instances with state and health, refreshes in place,
sort keys, q and Ctrl-C quit with exit code 0 and the terminal restored; `--once`."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Iterator
from typing import Any

import pexpect
import pytest

from tests.conftest import PY, Home, default_sigint, matched, printed, wait_until
from tests.daemon_support import all_ready

TIMEOUT = 30
# rich colours cells and pads them: spaces and escapes may sit between two cells
SEP = r"(?:\s|\x1b\[[0-9;]*m)+"
QUICK: dict[str, Any] = {"restart": {"start_seconds": 0.1, "backoff": {"initial": 0.05}}}
ECHO = [PY, "-m", "engctl.examples.echo_worker"]

# Runs `engctl top ARGS` on this terminal, then reports how it ended and the terminal's
# modes: a frame of the child process, with SIGINT ignored so that only top receives it.
WRAPPER = textwrap.dedent(
    """
    import signal, subprocess, sys, termios
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    before = termios.tcgetattr(0)
    code = subprocess.call(
        [sys.executable, "-m", "engctl", "top", *sys.argv[1:]],
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    after = termios.tcgetattr(0)
    lflag = after[3]
    print(f"TOP-EXIT {code} ECHO {int(bool(lflag & termios.ECHO))}"
          f" ICANON {int(bool(lflag & termios.ICANON))} SAME {int(before == after)}")
    """
)


@pytest.fixture
def term(daemon: Home) -> Iterator[list[pexpect.spawn[str]]]:
    """Spawned terminals, closed (forcibly if needed) at the end of the test."""
    spawned: list[pexpect.spawn[str]] = []
    yield spawned
    for child in spawned:
        if child.isalive():
            child.close(force=True)


@pytest.fixture
def engines(daemon: Home) -> Home:
    """Engines `e` (2 echo instances) and `z` (1 echo instance of type zed), all ready."""
    with daemon.client() as c:
        c.register({"e": {"command": ECHO, "type": "echo", "instances": 2, **QUICK},
                    "z": {"command": ECHO, "type": "zed", **QUICK}})  # fmt: skip
    wait_until(lambda: all_ready(daemon, "e", 2) and all_ready(daemon, "z", 1), 20)
    return daemon


def spawn_top(home: Home, term: list[pexpect.spawn[str]], *args: str) -> pexpect.spawn[str]:
    child = pexpect.spawn(
        PY,
        ["-c", WRAPPER, *args],
        env=home.env,
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(40, 200),
        preexec_fn=default_sigint,
    )
    term.append(child)
    return child


def row(inst: str, state: str = "ready", health: str = r"\w+") -> str:
    return rf"{inst}{SEP}{state}{SEP}{health}"


def ended(child: pexpect.spawn[str]) -> str:
    """Wait for top to end; check it exited 0 and left the terminal as it found it."""
    child.expect(r"TOP-EXIT (-?\d+) ECHO (\d) ICANON (\d) SAME (\d)")
    code, echo, icanon, same = (int(g) for g in matched(child).groups())
    before = printed(child)
    child.expect(pexpect.EOF)
    child.close()
    assert "Traceback" not in before
    assert "KeyboardInterrupt" not in before
    assert code == 0, before[-2000:]
    assert (echo, icanon, same) == (1, 1, 1)  # cbreak mode undone
    # rich hid the cursor while live and showed it again on the way out
    assert before.rfind("\x1b[?25h") > before.rfind("\x1b[?25l")
    assert "\x1b[?25h" in before
    return before


def test_top_shows_instances_and_quits_on_q(engines: Home, term: list[pexpect.spawn[str]]) -> None:
    """Every instance with its state and health, the header, the key help; q quits."""
    child = spawn_top(engines, term, "--interval", "0.3")
    child.expect(r"engctl top — 3 instances")
    for inst in ("e#0", "e#1", "z#0"):
        child.expect(row(inst, "ready"))
    child.expect(r"q quit")
    child.send("q")
    ended(child)


def test_top_refreshes_with_changes_made_elsewhere(
    engines: Home, term: list[pexpect.spawn[str]]
) -> None:
    """Requests show up as requests/s and latencies; a stop made elsewhere shows as stopped
    on a later frame."""
    child = spawn_top(engines, term, "--interval", "0.3")
    child.expect(row("z#0", "ready"))
    with engines.client() as c:
        for _ in range(10):
            c.exec(1, type="zed")
    # z#0's row gains a rate and p50/p99 (numbers in place of "-")
    child.expect(
        rf"{row('z#0')}{SEP}active{SEP}0{SEP}\d+\.\d{SEP}100\.0{SEP}\d+\.\d\d{SEP}\d+\.\d\d",
        timeout=20,
    )
    r = engines.cli("stop", "z")
    assert r.returncode == 0, r.stderr
    child.expect(row("z#0", "stopped"))
    child.sendintr()
    ended(child)


def test_top_exits_cleanly_on_ctrl_c(engines: Home, term: list[pexpect.spawn[str]]) -> None:
    child = spawn_top(engines, term, "--interval", "0.2")
    child.expect(row("e#1", "ready"))
    child.expect(r"q quit")
    child.expect(r"q quit")  # a second frame: the refresh loop is running
    child.sendintr()
    ended(child)


def frame_order(*cells: str) -> str:
    """One frame (from its header, not past the next one) with `cells` in this order."""
    within = r"(?:(?!engctl top)[\s\S])*?"
    return "engctl top" + "".join(within + c for c in cells)


def test_top_sort_keys_reorder_rows(engines: Home, term: list[pexpect.spawn[str]]) -> None:
    """Key 6 sorts by state (what needs attention first, stopped last), key 1 by name."""
    r = engines.cli("stop", "e#0")
    assert r.returncode == 0, r.stderr
    child = spawn_top(engines, term, "--interval", "0.2")
    by_name = frame_order(row("e#0", "stopped"), row("e#1"), row("z#0"))
    by_state = frame_order(row("e#1"), row("z#0"), row("e#0", "stopped"))
    child.expect(by_name)
    child.send("6")
    child.expect(by_state)
    child.send("1")
    child.expect(by_name)
    child.send("q")
    ended(child)


def test_top_with_no_instances(daemon: Home, term: list[pexpect.spawn[str]]) -> None:
    child = spawn_top(daemon, term, "--interval", "0.2")
    child.expect(r"engctl top — 0 instances")
    child.expect(r"no instances")
    child.send("q")
    ended(child)


def test_top_once_prints_one_frame(engines: Home) -> None:
    """`top --once` prints the frame and exits 0, in a pipe without a terminal too."""
    r = engines.cli("top", "--once")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert out.count("engctl top — 3 instances") == 1
    for inst in ("e#0", "e#1", "z#0"):
        assert re.search(rf"^{re.escape(inst)}\s+ready\s+\w+\s+active", out, re.M), out
    assert "\x1b[" not in out  # no escapes and no live redraw in a pipe
    headers = out.splitlines()[1].split()
    assert headers[:5] == ["INSTANCE", "STATE", "HEALTH", "DISPATCH", "IN"]
    assert {"RPS", "P99ms", "CPU%", "RSS"} <= set(headers)


def test_top_rejects_an_unknown_sort(daemon: Home) -> None:
    r = daemon.cli("top", "--once", "--sort", "colour")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "--sort" in r.stderr
