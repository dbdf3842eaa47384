"""The worker protocol pipe under misuse, with real workers (tests/engines/wire.py): huge and
oversized lines, deep nesting, duplicate keys, a closed stdout, a worker that never warms
up; and oneshot output that does not parse."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, cast

import psutil
import pytest

from engctl.daemon.output import MAX_WORKER_LINE
from engctl.errors import RequestFailedError
from tests.conftest import PY, Home, engine_cmd, wait_until

MiB = 1024 * 1024
QUICK: dict[str, Any] = {"restart": {"start_seconds": 0.1, "backoff": {"initial": 0.05}}}


def wire(home: Home, name: str = "w", *args: str, **spec: Any) -> None:
    """Register a wire.py worker of type W and wait until it is ready."""
    home.register(name, engine_cmd("wire.py", *args), type="W", **{**QUICK, **spec})
    home.wait_state(f"{name}#0", "ready")


def events(home: Home, kind: str, instance: str) -> list[dict[str, Any]]:
    with home.client() as c:
        events = cast("list[dict[str, Any]]", c.events(limit=10_000))
    return [e for e in events if e["kind"] == kind and e["instance"] == instance]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def daemon_log(home: Home) -> str:
    return home.paths.daemon_log.read_text(errors="replace")


# -- long lines (issues 9.9 and 10.5) --------------------------------------------------------
def test_a_32mib_line_is_read_in_bounded_time_and_the_daemon_stays_responsive(
    daemon: Home,
) -> None:
    """Issues 9.9/10.5: a 32 MiB line on a worker's stdout is read in linear time: its
    request is answered (a protocol error: the line is not JSON) within a few seconds,
    where re-joining the buffer per pipe read took 6.5 s here, and status calls made
    meanwhile on another connection each answer within 0.5 s."""
    wire(daemon)
    latencies: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with daemon.client(timeout=60) as c:
            while not done.is_set():
                t = time.perf_counter()
                c.status()
                latencies.append(time.perf_counter() - t)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        t0 = time.monotonic()
        with (
            daemon.client(timeout=60) as c,
            pytest.raises(RequestFailedError, match=r"\(not JSON\): xxx"),
        ):
            c.exec({"garbage": 32 * MiB}, type="W", timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        done.set()
        poller.join(30)
    assert elapsed < 3.0, f"a 32 MiB line took {elapsed:.2f}s"
    assert latencies and max(latencies) < 0.5, f"status took up to {max(latencies):.2f}s"
    with daemon.client(timeout=60) as c:  # the same worker serves on
        assert c.exec("next", type="W", timeout=10)["result"] == {"echo": "next"}


def test_a_line_over_the_limit_fails_its_requests_at_once_and_is_not_buffered(
    daemon: Home,
) -> None:
    """Issue 9.9: a line longer than MAX_WORKER_LINE fails the instance's requests as soon
    as the limit is passed (a protocol error naming the limit), its rest is dropped as it
    arrives (the daemon's memory stays far below the line), and the lines after it are
    read normally."""
    wire(daemon)
    pid = daemon.daemon_pid()
    assert pid is not None
    rss_before = psutil.Process(pid).memory_info().rss
    size = MAX_WORKER_LINE + 40 * MiB
    t0 = time.monotonic()
    with daemon.client(timeout=60) as c, pytest.raises(RequestFailedError) as info:
        c.exec({"garbage": size}, type="W", timeout=60)
    assert time.monotonic() - t0 < 5.0
    assert f"a line longer than the limit of {MAX_WORKER_LINE} bytes" in info.value.message
    with daemon.client(timeout=60) as c:
        assert c.exec("after", type="W", timeout=10)["result"] == {"echo": "after"}
    grown = psutil.Process(pid).memory_info().rss - rss_before
    assert grown < size, f"the daemon grew by {grown / MiB:.0f} MiB for a {size / MiB:.0f} MiB line"
    inst = daemon.instance("w#0")
    assert inst["requests"]["protocol_errors"] == 1
    assert inst["restarts"] == 0


# -- parse failures (issue 9.10) -------------------------------------------------------------
def test_deeply_nested_json_from_a_worker_is_a_protocol_error(daemon: Home) -> None:
    """Issue 9.10: a reply nested deeper than the JSON parser goes fails its request at once
    as a protocol error (not at its deadline), logs no traceback, and the worker serves on."""
    wire(daemon)
    t0 = time.monotonic()
    with daemon.client(timeout=60) as c, pytest.raises(RequestFailedError) as info:
        c.exec({"nested": 200_000}, type="W", timeout=30)
    assert time.monotonic() - t0 < 5.0
    assert "broke the worker protocol (JSON nested too deeply)" in info.value.message
    with daemon.client(timeout=60) as c:
        assert c.exec(2, type="W", timeout=10)["result"] == {"echo": 2}
    log = daemon_log(daemon)
    assert "RecursionError" not in log and "Traceback" not in log


def test_deeply_nested_oneshot_output_is_text_and_frees_its_slot(daemon: Home) -> None:
    """Issue 9.10: a oneshot whose stdout is nested too deeply to parse answers it as text,
    and its slot is free again: a second run (max_concurrency 1) is served too."""
    deep = "'[' * 200000 + ']' * 200000"
    daemon.register(
        "deep", [PY, "-c", f"import sys; sys.stdout.write({deep})"], mode="oneshot", type="D"
    )
    with daemon.client(timeout=60) as c:
        for _ in range(2):
            out = c.exec("x", type="D", timeout=10)
            assert out["result"] == "[" * 200_000 + "]" * 200_000
    assert "Traceback" not in daemon_log(daemon)


# -- duplicate keys (issue 10.4) -------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ('{"jsonrpc":"2.0","id":%ID%,"result":{"a":1},"id":%ID%}', {"a": 1}),
        ('{"jsonrpc":"2.0","result":{"a":1},"id":%ID%,"id":%ID%}', {"a": 1}),
        ('{"jsonrpc":"2.0","id":%ID%,"result":{"a":1},"result":{"b":2}}', {"b": 2}),
        ('{"jsonrpc":"2.0","id":%ID%,"result":{"a":1},"leak":true}', {"a": 1}),
        ('{"jsonrpc":"2.0","id":%ID%,"result":{"a":1},"jsonrpc":"2.0"}', {"a": 1}),
        ('{ "jsonrpc" : "2.0", "id" : %ID%, "result" : [ 1 , "é" ] }', [1, "é"]),
    ],
)
def test_a_reply_with_repeated_keys_gives_what_json_decodes(
    daemon: Home, raw: str, expected: Any
) -> None:
    """Issue 10.4: duplicate or extra keys after the result never leak into it; with and
    without --explain (the decoded path) the caller gets the same object."""
    wire(daemon)
    with daemon.client(timeout=60) as c:
        plain = c.exec({"raw": raw}, type="W", timeout=10)
        explained = c.exec({"raw": raw}, type="W", timeout=10, explain=True)
    assert plain["result"] == expected
    assert explained["result"] == expected
    assert json.dumps(plain["result"]) == json.dumps(explained["result"])


# -- a worker without its protocol pipe (issue 9.14) -----------------------------------------
def test_a_worker_that_closes_its_stdout_is_restarted(daemon: Home) -> None:
    """Issue 9.14: a worker that closes its stdout and lives on fails its request at once
    (lost), is stopped with its stop policy and restarted like a crash, with the reason."""
    wire(daemon)
    pid = daemon.instance("w#0")["pid"]
    t0 = time.monotonic()
    with (
        daemon.client(timeout=60) as c,
        pytest.raises(RequestFailedError, match="closed its stdout"),
    ):
        c.exec({"close_stdout": True}, type="W", timeout=30)
    assert time.monotonic() - t0 < 5.0
    wait_until(lambda: gone(pid), timeout=10)
    [backoff] = wait_until(
        lambda: [e for e in events(daemon, "instance.state", "w#0") if e["to"] == "backoff"]
    )
    assert backoff["reason"].startswith("worker closed its stdout: without its protocol pipe")
    assert "; restart in " in backoff["reason"]
    inst = daemon.wait_state("w#0", "ready")
    assert inst["pid"] != pid and inst["restarts"] == 1
    assert inst["last_exit"]["cause"] == "no protocol pipe"
    with daemon.client(timeout=60) as c:
        assert c.exec(3, type="W", timeout=10)["result"] == {"echo": 3}
    assert inst["requests"]["lost"] == 1 and inst["requests"]["requests"] == 1


def test_a_worker_that_closes_its_stdout_at_start_ends_fatal(daemon: Home) -> None:
    """Issue 9.14: a worker without stdout from the start is a failed start every time:
    fatal after max_retries, with the reason, and no process left."""
    daemon.register(
        "w",
        engine_cmd("wire.py", "--close-stdout"),
        restart={"start_seconds": 0.1, "max_retries": 1, "backoff": {"initial": 0.05}},
        stop={"timeout": 1.0},
    )
    inst = daemon.wait_state("w#0", "fatal", timeout=20)
    assert inst["state_reason"].startswith("gave up after 2 failed starts (max_retries 1)")
    assert "worker closed its stdout" in inst["state_reason"]
    assert inst["pid"] is None


# -- warm-up that never ends (issue 10.10) ---------------------------------------------------
def test_a_worker_that_never_answers_fails_its_start_after_start_timeout(daemon: Home) -> None:
    """Issue 10.10: a worker that neither answers ping nor says `ready` (an HTTP server
    registered as a worker, printing its banner) fails its start after start_timeout: the
    process is stopped, the start counts towards max_retries, the reason says what was
    awaited and what it printed instead."""
    daemon.register(
        "web",
        engine_cmd("wire.py", "--silent", "--print", "Serving HTTP on 0.0.0.0 port 8000"),
        start_timeout=0.5,
        restart={"start_seconds": 0.1, "max_retries": 1, "backoff": {"initial": 0.05}},
        stop={"timeout": 1.0},
    )
    warming = daemon.wait_state("web#0", "warming")
    first_pid = warming["pid"]
    assert warming["state_reason"].startswith("up for 0.1s; waiting for it to answer ping")
    assert "(last: protocol error on stdout (not JSON): Serving HTTP on" in warming["state_reason"]
    inst = daemon.wait_state("web#0", "fatal", timeout=20)
    reason = inst["state_reason"]
    assert reason.startswith("gave up after 2 failed starts (max_retries 1): start failed:")
    assert "no answer to ping and no `ready` within 0.5s" in reason
    assert "(last: protocol error on stdout (not JSON): Serving HTTP on" in reason
    assert inst["last_exit"]["cause"] == "start_timeout"
    assert gone(first_pid)
    failed = events(daemon, "instance.failed", "web#0")
    assert len(failed) == 2 and failed[0]["reason"].startswith("start failed: no answer")
    [problem] = events(daemon, "instance.warmup_problem", "web#0")[:1]
    assert "Serving HTTP" in problem["reason"]
