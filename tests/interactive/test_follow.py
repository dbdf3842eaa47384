"""Follow modes and live views in a terminal (pexpect): new output appears, Ctrl-C ends cleanly."""

from __future__ import annotations

from collections.abc import Iterator

import pexpect
import pytest

from tests.conftest import PY, Home, default_sigint, engine_cmd, matched, printed

TIMEOUT = 30
# rich colours the table in a terminal: an SGR escape may sit between two cells.
SGR = r"(?:\x1b\[[0-9;]*m)*"


@pytest.fixture
def term(daemon: Home) -> Iterator[list[pexpect.spawn[str]]]:
    """Spawned terminals, closed (forcibly if needed) at the end of the test."""
    spawned: list[pexpect.spawn[str]] = []
    yield spawned
    for child in spawned:
        if child.isalive():
            child.close(force=True)


def _spawn(home: Home, term: list[pexpect.spawn[str]], *args: str) -> pexpect.spawn[str]:
    child = pexpect.spawn(
        PY,
        ["-m", "engctl", *args],
        env=home.env,
        encoding="utf-8",
        timeout=TIMEOUT,
        dimensions=(40, 200),
        preexec_fn=default_sigint,
    )
    term.append(child)
    return child


def _interrupt(child: pexpect.spawn[str]) -> str:
    """Ctrl-C the command; return what it printed after, checking it exited cleanly."""
    child.sendintr()
    child.expect(pexpect.EOF)
    tail = printed(child)
    child.close()
    assert "Traceback" not in tail
    assert "KeyboardInterrupt" not in tail
    # Ended by its own exit (0, or 130 for an interrupt between two reads), not by the signal.
    assert child.signalstatus is None
    assert child.exitstatus in (0, 130), tail
    return tail


def test_logs_follow_shows_new_lines_and_stops_on_ctrl_c(
    daemon: Home, term: list[pexpect.spawn[str]]
) -> None:
    """`logs NAME -f` prints lines as the engine writes them and exits cleanly on Ctrl-C."""
    daemon.register(
        "chat", engine_cmd("chatty.py", "0.1"), mode="service", restart={"start_seconds": 0}
    )
    child = _spawn(daemon, term, "logs", "chat", "-f", "--lines", "1")
    child.expect(r"chat#0 \| .*(out|err) (\d+)")
    first = int(matched(child).group(2))
    # Lines written after the command started arrive while it runs.
    child.expect(rf"err {first + 3}\b")
    child.expect(rf"out {first + 5}\b")
    _interrupt(child)


def test_logs_follow_of_one_instance_prints_bare_lines(
    daemon: Home, term: list[pexpect.spawn[str]]
) -> None:
    """`logs NAME#0 -f --json` prints one JSON object per new line, its time and stream as
    fields (issue 10.25)."""
    daemon.register(
        "chat", engine_cmd("chatty.py", "0.1"), mode="service", restart={"start_seconds": 0}
    )
    child = _spawn(daemon, term, "logs", "chat#0", "-f", "--json", "--lines", "0")
    child.expect(
        r'\{"instance": "chat#0", "time": "[0-9T:.-]+Z", "stream": "stderr", "text": "err (\d+)",'
        r' "line": "[^"]*err \d+"\}'
    )
    n = int(matched(child).group(1))
    child.expect(rf'"text": "err {n + 2}"')
    _interrupt(child)


def test_events_follow_prints_a_stop_made_elsewhere(
    daemon: Home, term: list[pexpect.spawn[str]]
) -> None:
    """`events -f` prints the state changes of a `stop` issued by another process."""
    daemon.register("s", engine_cmd("sleeper.py"), mode="service", restart={"start_seconds": 0})
    daemon.wait_state("s#0", "ready", timeout=20)
    child = _spawn(daemon, term, "events", "-f", "--engine", "s")
    # The past is printed first: registration and start.
    child.expect(r"s#0 starting -> ready")
    r = daemon.cli("stop", "s")
    assert r.returncode == 0, r.stderr
    child.expect(r"s#0 ready -> stopping: stopped by user")
    child.expect(r"s#0 stopping -> stopped")
    _interrupt(child)


def test_status_watch_refreshes_and_stops_on_ctrl_c(
    daemon: Home, term: list[pexpect.spawn[str]]
) -> None:
    """`status --watch` redraws with changes made elsewhere and exits cleanly on Ctrl-C."""
    daemon.register("s", engine_cmd("sleeper.py"), mode="service", restart={"start_seconds": 0})
    pid = daemon.wait_state("s#0", "ready", timeout=20)["pid"]
    child = _spawn(daemon, term, "status", "--watch", "--interval", "0.2")
    child.expect(rf"s#0{SGR}\s+{pid}\s+{SGR}ready")
    r = daemon.cli("stop", "s")
    assert r.returncode == 0, r.stderr
    child.expect(rf"s#0{SGR}\s+-\s+{SGR}stopped")
    child.expect(r"code 0")
    r = daemon.cli("register", "late", "--cmd", " ".join(engine_cmd("sleeper.py")),
                   "--mode", "service", "--no-start")  # fmt: skip
    assert r.returncode == 0, r.stderr
    child.expect(r"late#0")
    _interrupt(child)


def test_ctrl_c_of_a_command_that_is_not_a_live_view_exits_130(
    daemon: Home, term: list[pexpect.spawn[str]]
) -> None:
    """Ctrl-C while `exec` waits for its answer ends it with 130 (128 + SIGINT), quietly;
    live views and follow modes end with 0, as Ctrl-C is how they are left (issue 10.25)."""
    daemon.register("w", engine_cmd("slow.py", "30"), restart={"start_seconds": 0.1})
    daemon.wait_state("w#0", "ready")
    child = _spawn(daemon, term, "exec", "--engine", "w", "--", "1")
    with daemon.client() as c:
        c.wait_for(lambda st: st["engines"][0]["instances"][0]["requests"]["in_flight"] == 1)
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert "Traceback" not in printed(child)
    assert (child.signalstatus, child.exitstatus) == (None, 130)
