"""`engctl exec` with real worker and oneshot processes: payloads and output, exit codes,
concurrency limits and backpressure, retries after crashes, protocol garbage, hung requests,
oneshot runs, --batch, --explain, observations in status, and the Python client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any, cast

import psutil
import pytest

from engctl.daemon import pipes
from engctl.daemon.pipes import DEFAULT_PIPE_BYTES
from engctl.errors import (
    EXIT_BUSY,
    EXIT_FAILED,
    EXIT_NO_ELIGIBLE,
    EXIT_TIMEOUT,
    EXIT_USAGE,
    InvalidParamsError,
    RequestFailedError,
    RequestTimeoutError,
)
from tests.conftest import PY, Home, engine_cmd, wait_until

# Workers say `ready` at once; they count as started after 0.1 s.
QUICK: dict[str, Any] = {"restart": {"start_seconds": 0.1, "backoff": {"initial": 0.05}}}
RESULT_KEYS = {"request_id", "engine", "instance", "ok", "result", "latency_ms", "attempts"}


# -- helpers -------------------------------------------------------------------------------


def workers(home: Home, **engines: dict[str, Any]) -> None:
    """Register worker engines `{name: spec}` (with QUICK start-up) and wait until every
    instance of them is ready."""
    with home.client() as c:
        c.register({name: {**QUICK, **spec} for name, spec in engines.items()})
    for name, spec in engines.items():
        for k in range(spec.get("instances", 1)):
            home.wait_state(f"{name}#{k}", "ready")


def oneshot(home: Home, name: str, command: list[str], **spec: Any) -> None:
    """Register a oneshot engine (dispatchable at once: it has no processes to wait for)."""
    home.register(name, command, mode="oneshot", **spec)


def exec_cli(home: Home, *args: str, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `engctl exec ARGS` (with a bound, so a hung request fails the test, not the run)."""
    return home.cli("exec", *args, input=input, timeout=20)


def stats(home: Home, inst_id: str) -> dict[str, Any]:
    """The `requests` observations of one instance in `status --json`."""
    r = home.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    for engine in json.loads(r.stdout)["engines"]:
        for inst in engine["instances"]:
            if inst["id"] == inst_id:
                return inst["requests"]  # type: ignore[no-any-return]
    raise KeyError(inst_id)


def gone(pid: int) -> bool:
    """Whether `pid` no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def slow(daemon: Home) -> Iterator[Home]:
    """A daemon with one engine `s` of type T: slow.py (0.05 s per request), 1 instance."""
    workers(daemon, s={"command": engine_cmd("slow.py", "0.05"), "type": "T"})
    yield daemon


# -- payloads and output -------------------------------------------------------------------
def test_exec_prints_the_result_of_a_json_payload(slow: Home) -> None:
    """A JSON payload after `--` is sent as JSON and the result is printed as compact JSON."""
    r = exec_cli(slow, "--type", "T", "--", '{"x":1}')
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["echo"] == {"x": 1}
    assert result["instance"] == "s#0"
    assert r.stderr == ""


def test_exec_reads_the_payload_from_stdin_with_dash(slow: Home) -> None:
    """`-` reads the payload from stdin; its trailing newline does not change the JSON value."""
    r = exec_cli(slow, "--type", "T", "-", input='{"x": [1, 2]}\n')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["echo"] == {"x": [1, 2]}


def test_exec_json_prints_the_documented_result_object(slow: Home) -> None:
    """`--json` prints exactly the documented result object of a successful request."""
    r = exec_cli(slow, "--type", "T", "--json", "--", "[1, 2]")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert set(obj) == RESULT_KEYS
    assert obj["ok"] is True
    assert obj["engine"] == "s"
    assert obj["instance"] == "s#0"
    assert obj["attempts"] == 1
    assert obj["result"]["echo"] == [1, 2]
    assert isinstance(obj["request_id"], str) and obj["request_id"]
    # The worker sleeps 0.05 s per request.
    assert 50 <= obj["latency_ms"] < 5000


def test_non_json_payload_is_sent_as_a_string_and_refused_with_json_input(slow: Home) -> None:
    """Text that is not JSON is sent as a JSON string; `--json-input` refuses it with exit 2."""
    r = exec_cli(slow, "--type", "T", "--", "hello world")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["echo"] == "hello world"
    r = exec_cli(slow, "--type", "T", "--json-input", "--", "hello world")
    assert r.returncode == EXIT_USAGE
    assert "not valid JSON" in r.stderr
    assert r.stdout == ""
    assert stats(slow, "s#0")["requests"] == 1  # the refused payload never reached the daemon


def test_string_results_print_as_text(daemon: Home) -> None:
    """A result that is a JSON string is printed as plain text, not as a quoted JSON string."""
    oneshot(daemon, "up", engine_cmd("oneshot_upper.py"), type="U")
    r = exec_cli(daemon, "--type", "U", "--", "some text")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "SOME TEXT\n"


# -- exit codes ----------------------------------------------------------------------------
def test_unknown_type_exits_4_naming_the_type_and_listing_the_known_ones(slow: Home) -> None:
    """An unknown type exits 4 with a message naming the type and the types that exist."""
    oneshot(slow, "up", engine_cmd("oneshot_upper.py"), type="U")
    r = exec_cli(slow, "--type", "nope", "--", "1")
    assert r.returncode == EXIT_NO_ELIGIBLE
    assert "'nope'" in r.stderr
    assert "T" in r.stderr and "U" in r.stderr
    assert r.stdout == ""


def test_unknown_capability_or_label_exits_4_naming_the_filter(daemon: Home) -> None:
    """A capability or label no instance of the type has exits 4 and names what was asked."""
    workers(
        daemon,
        s={
            "command": engine_cmd("slow.py", "0"),
            "type": "T",
            "capabilities": ["fp32"],
            "labels": {"tier": "gold"},
        },
    )
    r = exec_cli(daemon, "--type", "T", "--cap", "gpu", "--", "1")
    assert r.returncode == EXIT_NO_ELIGIBLE
    assert "capability gpu" in r.stderr
    assert "fp32" in r.stderr  # what exists instead
    r = exec_cli(daemon, "--type", "T", "--label", "tier=silver", "--", "1")
    assert r.returncode == EXIT_NO_ELIGIBLE
    assert "tier=silver" in r.stderr
    r = exec_cli(daemon, "--type", "T", "--cap", "fp32", "--label", "tier=gold", "--", "1")
    assert r.returncode == 0, r.stderr


def test_keyed_strategy_without_key_is_a_usage_error(slow: Home) -> None:
    """`--strategy affinity` without `--key` exits 2 and says that the key is missing."""
    r = exec_cli(slow, "--type", "T", "--strategy", "affinity", "--", "1")
    assert r.returncode == EXIT_USAGE
    assert "--key" in r.stderr
    r = exec_cli(slow, "--type", "T", "--strategy", "affinity", "--key", "u1", "--", "1")
    assert r.returncode == 0, r.stderr


def test_timeout_exits_5(daemon: Home) -> None:
    """A request slower than --timeout exits 5 at the timeout, naming the instance."""
    workers(daemon, s={"command": engine_cmd("slow.py", "3"), "type": "T"})
    t0 = time.monotonic()
    r = exec_cli(daemon, "--type", "T", "--timeout", "0.3", "--", "1")
    elapsed = time.monotonic() - t0
    assert r.returncode == EXIT_TIMEOUT, r.stderr
    assert "timed out after 0.3s on s#0" in r.stderr
    assert elapsed < 2.5
    wait_until(lambda: stats(daemon, "s#0")["timeouts"] == 1)


def test_full_queue_answers_busy_at_once(home: Home) -> None:
    """With max_queue 1, one request in flight and one waiting, the next is refused as busy
    (exit 6) at once, and the two accepted ones still succeed."""
    home.start_daemon(max_queue=1)
    workers(home, s={"command": engine_cmd("slow.py", "0.05"), "type": "T"})
    both_sent = threading.Event()
    results: list[dict[str, Any]] = []

    def inputs() -> Iterator[Any]:
        yield {"delay": 1.5}  # in flight
        yield {"delay": 0.0}  # waits in the queue
        both_sent.set()  # asked for a third input: the second one has been sent

    def run() -> None:
        with home.client() as c:
            got = list(c.exec_many(inputs(), window=3, type="T"))
            results.extend(cast("list[dict[str, Any]]", got))

    t = threading.Thread(target=run)
    t.start()
    try:
        assert both_sent.wait(10)
        wait_until(lambda: stats(home, "s#0")["in_flight"] == 1)
        t0 = time.monotonic()
        r = exec_cli(home, "--type", "T", "--", "3")
        elapsed = time.monotonic() - t0
    finally:
        t.join(20)
    assert r.returncode == EXIT_BUSY, (r.returncode, r.stderr)
    assert "busy" in r.stderr and "max_queue 1" in r.stderr
    assert elapsed < 1.2  # refused, not queued behind the 1.5 s request
    assert [o["ok"] for o in results] == [True, True]
    assert [o["result"]["echo"] for o in results] == [{"delay": 1.5}, {"delay": 0.0}]


def test_queued_request_that_timed_out_frees_its_queue_slot(home: Home) -> None:
    """A request that timed out while waiting leaves the queue at once: with max_queue 1 the
    next request is queued (and served), not refused as busy."""
    home.start_daemon(max_queue=1)
    workers(home, s={"command": engine_cmd("slow.py", "0"), "type": "T"})
    first: list[dict[str, Any]] = []

    def run() -> None:
        with home.client() as c:
            first.append(cast("dict[str, Any]", c.exec({"delay": 1.2}, type="T")))

    t = threading.Thread(target=run)
    t.start()
    try:
        wait_until(lambda: stats(home, "s#0")["in_flight"] == 1)
        with home.client() as c:
            with pytest.raises(RequestTimeoutError, match="waiting in the queue"):
                c.exec("queued", type="T", timeout=0.2)
            obj = c.exec("next", type="T", timeout=5)
    finally:
        t.join(20)
    assert obj["ok"] is True and obj["result"]["echo"] == "next"
    assert first and first[0]["ok"] is True


def test_worker_error_exits_1_with_its_message(daemon: Home) -> None:
    """An error answered by the worker exits 1 with the instance and the worker's message."""
    workers(daemon, f={"command": engine_cmd("flaky.py"), "type": "F"})
    assert exec_cli(daemon, "--type", "F", "--", "1").returncode == 0
    r = exec_cli(daemon, "--type", "F", "--", "2")
    assert r.returncode == EXIT_FAILED
    assert "f#0" in r.stderr
    assert "RuntimeError: flaky failure on request 2" in r.stderr
    assert r.stdout == ""


# -- concurrency ---------------------------------------------------------------------------
def test_max_concurrency_is_never_exceeded(daemon: Home) -> None:
    """Six concurrent requests on an instance with max_concurrency 2 run two at a time."""
    workers(daemon, s={"command": engine_cmd("slow.py", "0.3"), "type": "T", "max_concurrency": 2})
    t0 = time.monotonic()
    with daemon.client() as c:
        out = list(c.exec_many(range(6), window=6, type="T"))
    elapsed = time.monotonic() - t0
    assert [o["ok"] for o in out] == [True] * 6
    assert [o["result"]["echo"] for o in out] == list(range(6))
    seen = [o["result"]["in_flight"] for o in out]  # as counted inside the worker
    assert max(seen) == 2, seen
    assert elapsed >= 3 * 0.3 * 0.9  # three waves of two
    assert stats(daemon, "s#0")["in_flight"] == 0


# -- retries -------------------------------------------------------------------------------
def two_engines_one_dies(home: Home) -> None:
    """Type D: `die` (dies on every execute, preferred by capability) and `ok` (answers)."""
    workers(
        home,
        die={"command": engine_cmd("dies.py"), "type": "D", "capabilities": ["first"]},
        ok={"command": engine_cmd("dies.py", "#never"), "type": "D"},
    )


def test_request_lost_in_a_crash_is_retried_on_another_instance(daemon: Home) -> None:
    """A request whose instance dies under it succeeds on another one with --retries 1."""
    two_engines_one_dies(daemon)
    args = ("--type", "D", "--strategy", "capability", "--prefer", "first", "--json")
    r = exec_cli(daemon, *args, "--retries", "1", "--", '{"n": 1}')
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["attempts"] == 2
    assert obj["instance"] == "ok#0"
    assert obj["result"] == {"echo": {"n": 1}, "instance": "ok#0"}
    wait_until(lambda: daemon.instance("die#0")["last_exit"] is not None)
    assert daemon.instance("die#0")["last_exit"]["code"] == 3


def test_request_lost_in_a_crash_fails_clearly_without_retries(daemon: Home) -> None:
    """Without retries, a request whose instance dies exits 1 at once saying it was lost."""
    two_engines_one_dies(daemon)
    t0 = time.monotonic()
    r = exec_cli(daemon, "--type", "D", "--strategy", "capability", "--prefer", "first", "--", "1")
    assert r.returncode == EXIT_FAILED, r.stderr
    assert "die#0" in r.stderr and "request lost" in r.stderr
    assert "exit code 3" in r.stderr
    assert time.monotonic() - t0 < 5  # the default timeout is 30 s: it did not wait for it


def test_retries_never_hit_the_same_instance_twice(daemon: Home) -> None:
    """With a single instance, --retries 3 reports the failure after one attempt."""
    workers(daemon, die={"command": engine_cmd("dies.py"), "type": "D"})
    with daemon.client() as c, pytest.raises(RequestFailedError) as info:
        c.exec(1, type="D", retries=3, timeout=5)
    assert "request lost" in info.value.message
    assert info.value.data["attempts"] == 1
    assert info.value.data["instance"] == "die#0"
    assert info.value.data["ok"] is False


# -- misbehaving workers -------------------------------------------------------------------
def test_protocol_garbage_fails_the_request_and_is_logged(daemon: Home) -> None:
    """Non-JSON output fails the request clearly, is logged with its bytes as a protocol error,
    and leaves the daemon serving other requests."""
    workers(
        daemon,
        g={"command": engine_cmd("garbage.py"), "type": "G"},
        s={"command": engine_cmd("slow.py", "0"), "type": "T"},
    )
    started = time.monotonic()
    r = exec_cli(daemon, "--type", "G", "--timeout", "10", "--", "1")
    assert r.returncode == EXIT_FAILED, r.stderr
    assert time.monotonic() - started < 8  # failed at the garbage, not at the deadline
    assert "g#0 broke the worker protocol (not JSON): GARBAGE-LINE" in r.stderr
    logs = daemon.cli("logs", "g", "-n", "50")
    assert logs.returncode == 0, logs.stderr
    garbage = [line for line in logs.stdout.splitlines() if "protocol error" in line]
    assert garbage and "GARBAGE-LINE this is not json" in garbage[0], logs.stdout
    assert stats(daemon, "g#0")["errors"] >= 1
    assert daemon.status()["engines"]  # the daemon answers
    r = exec_cli(daemon, "--type", "T", "--", "2")
    assert r.returncode == 0, r.stderr


def test_request_never_answered_times_out_and_nothing_hangs(daemon: Home) -> None:
    """A request the worker never answers exits 5 at its timeout; the worker and the daemon
    go on serving other requests."""
    # max_concurrency 2: the unanswered request keeps its slot (the worker may still be
    # working on it) until the hang policy (docs/policies.md) kills and restarts the instance.
    workers(daemon, h={"command": engine_cmd("hanging.py"), "type": "H", "max_concurrency": 2})
    t0 = time.monotonic()
    r = exec_cli(daemon, "--type", "H", "--timeout", "0.5", "--", "hang")
    assert r.returncode == EXIT_TIMEOUT, r.stderr
    assert "timed out after 0.5s on h#0" in r.stderr
    assert time.monotonic() - t0 < 3
    r = exec_cli(daemon, "--type", "H", "--timeout", "5", "--", "fine")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"echo": "fine"}


# -- oneshot engines -----------------------------------------------------------------------
def test_oneshot_stdout_is_the_result_parsed_as_json_when_valid(daemon: Home) -> None:
    """A oneshot's stdout is the result: JSON when it parses, else text."""
    oneshot(daemon, "up", engine_cmd("oneshot_upper.py"), type="U")
    with daemon.client() as c:
        obj = c.exec({"x": 1}, type="U")
        assert obj["result"] == {"X": 1}
        assert obj["ok"] is True and obj["engine"] == "up" and obj["attempts"] == 1
        assert c.exec("abc", type="U")["result"] == "ABC"


def test_oneshot_failure_carries_exit_code_and_stderr_tail(daemon: Home) -> None:
    """A oneshot that exits non-zero fails (exit 1) with its exit code and stderr tail."""
    oneshot(daemon, "bad", engine_cmd("oneshot_upper.py", "7"), type="U")
    r = exec_cli(daemon, "--type", "U", "--", "abc")
    assert r.returncode == EXIT_FAILED
    assert "exit code 7" in r.stderr
    assert "oneshot failing on purpose with 7" in r.stderr
    assert r.stdout == ""


def test_oneshot_timeout_kills_the_process(daemon: Home) -> None:
    """A oneshot past its timeout exits 5 and its process is killed."""
    pidfile = daemon.path / "oneshot.pid"
    oneshot(daemon, "sleepy", engine_cmd("oneshot_upper.py", "0", "30", str(pidfile)), type="U")
    t0 = time.monotonic()
    r = exec_cli(daemon, "--type", "U", "--timeout", "0.5", "--", "abc")
    assert r.returncode == EXIT_TIMEOUT, r.stderr
    assert "timed out" in r.stderr
    assert time.monotonic() - t0 < 3
    pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text()))
    wait_until(lambda: gone(pid), timeout=5)


def test_oneshot_input_placeholder_goes_into_the_argv(daemon: Home) -> None:
    """`{input}` in the command is replaced by the payload: a string as is, else its JSON."""
    oneshot(daemon, "args", engine_cmd("oneshot_args.py", "--in={input}", "x"), type="A")
    with daemon.client() as c:
        assert c.exec("hello there", type="A")["result"] == {"args": ["--in=hello there", "x"]}
        assert c.exec({"k": [1]}, type="A")["result"] == {"args": ['--in={"k":[1]}', "x"]}


# -- daemon shutdown -----------------------------------------------------------------------
def test_daemon_stop_lets_requests_in_flight_and_queued_finish(daemon: Home) -> None:
    """`daemon stop` takes no new request but answers those it holds, in flight and
    queued, before the engines stop (as Envoy drains a listener): none fails."""
    workers(
        daemon,
        s={"command": engine_cmd("slow.py", "0.8"), "type": "T"},
        e={"command": engine_cmd("echo.py"), "type": "E"},
    )
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        with daemon.client() as c:
            try:
                results.append(c.exec("x", type="T", timeout=20))
            except Exception as exc:
                errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]  # one runs, two queue
    for t in threads:
        t.start()
    stopper: threading.Thread | None = None
    try:
        wait_until(lambda: stats(daemon, "s#0")["in_flight"] == 1)
        with daemon.client() as c:
            wait_until(lambda: c.status(["s"])["admission"]["queue"]["waiting"] >= 2)
        stopped: list[subprocess.CompletedProcess[str]] = []
        stopper = threading.Thread(target=lambda: stopped.append(daemon.cli("daemon", "stop")))
        stopper.start()

        def refused() -> str | None:
            with daemon.client() as c:
                try:
                    c.exec("y", type="E")
                except RequestFailedError as exc:
                    return str(exc)
            return None

        assert "takes no new request" in wait_until(refused, timeout=5)
    finally:
        for t in threads:
            t.join(20)
        if stopper is not None:
            stopper.join(30)
    assert errors == [] and len(results) == 3
    assert all(r["ok"] for r in results)
    assert stopped and stopped[0].returncode == 0, stopped


def test_daemon_shutdown_fails_requests_past_the_grace_and_kills_oneshots(home: Home) -> None:
    """Requests still running after half of shutdown_timeout fail with an error, on workers
    and oneshots, and no oneshot process is left behind."""
    home.start_daemon(shutdown_timeout=2.0)
    pidfile = home.path / "oneshot.pid"
    workers(home, s={"command": engine_cmd("slow.py", "30"), "type": "T"})
    oneshot(home, "sleepy", engine_cmd("oneshot_upper.py", "0", "30", str(pidfile)), type="U")
    errors: dict[str, BaseException] = {}

    def run(engine_type: str) -> None:
        with home.client() as c:
            try:
                c.exec("x", type=engine_type)
            except Exception as exc:
                errors[engine_type] = exc

    threads = [threading.Thread(target=run, args=(t,)) for t in ("T", "U")]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: stats(home, "s#0")["in_flight"] == 1)
        pid = int(wait_until(lambda: pidfile.exists() and pidfile.read_text()))
        t0 = time.monotonic()
        r = home.cli("daemon", "stop")
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - t0 >= 1.0  # the grace: half of shutdown_timeout
    finally:
        for t in threads:
            t.join(20)
    assert sorted(errors) == ["T", "U"]
    for exc in errors.values():
        assert isinstance(exc, RequestFailedError), repr(exc)
        assert "daemon shutting down" in str(exc)
    wait_until(lambda: gone(pid), timeout=5)


# -- --batch -------------------------------------------------------------------------------
def test_batch_keeps_input_order_with_parallel_requests(daemon: Home) -> None:
    """--batch -j 4 on two instances writes one object per line in input order, whatever the
    order in which the requests finish."""
    workers(daemon, s={"command": engine_cmd("slow.py"), "type": "T", "instances": 2})
    delays = [0.4, 0.05, 0.3, 0.0, 0.2, 0.1, 0.0, 0.25]
    lines = "".join(json.dumps({"delay": d, "i": i}) + "\n" for i, d in enumerate(delays))
    r = exec_cli(daemon, "--type", "T", "--batch", "-j", "4", input=lines)
    assert r.returncode == 0, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["result"]["echo"]["i"] for o in out] == list(range(len(delays)))
    assert all(o["ok"] and set(o) == RESULT_KEYS for o in out)
    assert {o["instance"] for o in out} == {"s#0", "s#1"}


def test_batch_reports_failed_lines_and_goes_on(daemon: Home) -> None:
    """A failing line yields an object with ok false and an error, the batch continues, the
    exit code is 1, and a line that is not JSON is sent as a string."""
    workers(daemon, f={"command": engine_cmd("flaky.py"), "type": "F"})
    r = exec_cli(daemon, "--type", "F", "--batch", "-j", "2", input='{"a":1}\n2\nnot json\n4\n')
    assert r.returncode == EXIT_FAILED, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["ok"] for o in out] == [True, False, True, False]
    assert out[0]["result"]["echo"] == {"a": 1}
    assert out[2]["result"]["echo"] == "not json"
    for failed in (out[1], out[3]):
        assert "result" not in failed
        assert "flaky failure" in failed["error"]["message"]
        assert isinstance(failed["error"]["code"], int)
        assert failed["instance"] == "f#0" and failed["attempts"] == 1


def test_batch_line_over_the_frame_limit_is_one_failed_result_and_the_batch_goes_on(
    home: Home,
) -> None:
    """A --batch line larger than the daemon's frame limit becomes one "ok": false result
    naming the limit and the setting that raises it; the lines after it run (issue 10.18:
    it ended the whole batch)."""
    home.start_daemon(max_frame_bytes=65536)
    workers(home, s={"command": engine_cmd("slow.py", "0"), "type": "T"})
    lines = "1\n" + "x" * 100_000 + "\n3\n"
    r = home.cli("exec", "--type", "T", "--batch", "-j", "2", input=lines, timeout=10)
    assert r.returncode == EXIT_FAILED, r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["ok"] for o in out] == [True, False, True]
    assert out[0]["result"]["echo"] == 1 and out[2]["result"]["echo"] == 3
    message = out[1]["error"]["message"]
    assert "limit of 65536 bytes" in message and "max_frame_bytes" in message
    assert out[1]["attempts"] == 0 and out[1]["request_id"] is None


def test_batch_bad_lines_are_failed_results_in_place(daemon: Home) -> None:
    """Lines that cannot be sent (not UTF-8, not JSON with --json-input, nested too deeply)
    are each one "ok": false result in their place, with a message naming the line; the
    others run, and nothing prints a traceback."""
    workers(daemon, s={"command": engine_cmd("slow.py", "0"), "type": "T"})
    lines = b'1\n\xff\xfe\n{"a": 2}\nnot json\n' + b"[" * 100_000 + b"]" * 100_000 + b"\n4\n"
    r = subprocess.run(
        [PY, "-m", "engctl", "exec", "--type", "T", "--batch", "--json-input"],
        input=lines,
        env=daemon.env,
        capture_output=True,
        timeout=20,
    )
    assert r.returncode == EXIT_FAILED, r.stderr
    assert b"Traceback" not in r.stderr
    out = [json.loads(line) for line in r.stdout.splitlines()]
    assert [o["ok"] for o in out] == [True, False, True, False, False, True]
    assert out[1]["error"]["message"].startswith("stdin line 2 ")
    assert "not UTF-8" in out[1]["error"]["message"]
    assert "stdin line 4: " in out[3]["error"]["message"]
    assert "nests too deeply" in out[4]["error"]["message"]
    assert out[5]["result"]["echo"] == 4


# -- --explain -----------------------------------------------------------------------------
def test_explain_prints_every_candidate_and_the_decision(daemon: Home) -> None:
    """--explain lists every instance (the winner marked, others excluded with the filter)
    and a decision line, then the result."""
    workers(
        daemon,
        s={"command": engine_cmd("slow.py", "0"), "type": "T", "instances": 2},
        other={"command": engine_cmd("slow.py", "0"), "type": "X"},
    )
    r = exec_cli(daemon, "--type", "T", "--explain", "--", "1")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("strategy least_loaded")
    for inst_id in ("s#0", "s#1", "other#0"):
        assert any(inst_id in line for line in lines), r.stdout
    assert any("other#0" in line and "excluded by type" in line for line in lines)
    winner = [line for line in lines if line.startswith(" * ")]
    assert len(winner) == 1
    decision = [line for line in lines if line.startswith("decision: ")]
    assert len(decision) == 1 and decision[0] != "decision: "
    assert json.loads(lines[-1])["echo"] == 1
    assert json.loads(lines[-1])["instance"] in winner[0]


def test_explain_says_why_nothing_qualified(slow: Home) -> None:
    """--explain with no eligible instance still prints the candidates and the decision."""
    r = exec_cli(slow, "--type", "T", "--cap", "gpu", "--explain", "--", "1")
    assert r.returncode == EXIT_NO_ELIGIBLE
    assert "s#0" in r.stdout and "excluded by" in r.stdout
    assert "decision: " in r.stdout


def test_explain_with_json_prints_one_json_document(slow: Home) -> None:
    """--explain --json prints exactly one JSON document, the result object with its
    "explain" key, and no text (issue 10.1); a failure is one document too, ok false."""
    r = exec_cli(slow, "--type", "T", "--explain", "--json", "--", "1")
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)  # the whole of stdout: one document
    assert obj["ok"] and obj["result"]["echo"] == 1
    assert obj["explain"]["winner"] == "s#0" and obj["explain"]["candidates"]
    r = exec_cli(slow, "--type", "T", "--cap", "gpu", "--explain", "--json", "--", "1")
    assert r.returncode == EXIT_NO_ELIGIBLE
    obj = json.loads(r.stdout)
    assert obj["ok"] is False and obj["error"]["code"] == json.loads(r.stderr)["error"]["code"]
    assert obj["explain"]["candidates"][0]["excluded_by"]


# -- limits --------------------------------------------------------------------------------
def test_results_over_eight_mib_are_delivered(daemon: Home) -> None:
    """A result of 9 MiB reaches the client whole (issue 9.8: over ~8 MiB the daemon closed
    the connection), also to a client that reads it slowly. (Any size up to the worker line
    limit goes the same way; larger ones are slow to read from the worker for now.)"""
    workers(daemon, big={"command": engine_cmd("big.py"), "type": "big"})
    size = 9 << 20
    with daemon.client() as c:
        assert len(c.exec(size, type="big")["result"]) == size
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(str(daemon.paths.socket))
    conn.sendall(
        json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "request.exec",
                "params": {"input": size, "type": "big"},
            }
        ).encode()
        + b"\n"
    )
    got = bytearray()
    while not got.endswith(b"\n"):
        chunk = conn.recv(1 << 20)
        assert chunk, "the daemon closed the connection"
        got += chunk
        time.sleep(0.01)  # ~100 MiB/s at most: a reader slower than the daemon
    conn.close()
    assert len(json.loads(got)["result"]["result"]) == size


def test_client_accepts_every_result_the_daemon_can_send() -> None:
    """The client's frame limit is above the largest frame the daemon sends: a worker's
    longest reply line, and a oneshot's longest output encoded as a JSON string."""
    from engctl.client import MAX_RESPONSE_BYTES
    from engctl.daemon.output import MAX_ONESHOT_OUTPUT, MAX_WORKER_LINE

    envelope = 1 << 20  # the result object around it, an explanation
    assert MAX_WORKER_LINE + envelope <= MAX_RESPONSE_BYTES
    assert 6 * MAX_ONESHOT_OUTPUT + envelope <= MAX_RESPONSE_BYTES  # \u0000 is 6 bytes


# -- observations --------------------------------------------------------------------------
def test_status_shows_request_observations_per_instance(daemon: Home) -> None:
    """After N requests, status --json shows each instance's requests, ok, errors and latency."""
    workers(daemon, f={"command": engine_cmd("flaky.py"), "type": "F"})
    with daemon.client() as c:
        out = list(c.exec_many(range(5), window=1, type="F"))
    assert [o["ok"] for o in out] == [True, False, True, False, True]
    st = stats(daemon, "f#0")
    assert st["requests"] == 5
    assert st["ok"] == 3
    assert st["errors"] == 2
    assert st["in_flight"] == 0
    assert st["latency_ewma_ms"] is not None and st["latency_ewma_ms"] > 0


# -- Python API ----------------------------------------------------------------------------
def test_zero_negative_or_nonfinite_timeout_and_retries_are_refused(slow: Home) -> None:
    """A timeout of 0 or less, nan or inf, and retries that are negative or not a finite
    integer are invalid params (exit 2), not a silent fallback nor a request that never
    times out (issue 9.12)."""
    timeout: float
    with slow.client() as c:
        for timeout in (0, -1):
            with pytest.raises(InvalidParamsError, match="timeout must be positive"):
                c.exec(1, type="T", timeout=timeout)
        for timeout in (float("nan"), float("inf")):
            with pytest.raises(InvalidParamsError, match="timeout must be a finite number"):
                c.exec(1, type="T", timeout=timeout)
        for retries in (-1, float("inf"), 1.5):
            with pytest.raises(InvalidParamsError, match="retries must be"):
                c.call("request.exec", input=1, type="T", retries=retries)
        assert c.exec(1, type="T")["ok"]


def test_client_exec_and_exec_many(daemon: Home) -> None:
    """Client.exec returns the result object; exec_many yields results in input order and
    failures as objects; typed errors carry the failed result object."""
    workers(daemon, s={"command": engine_cmd("slow.py", "0"), "type": "T", "instances": 2})
    with daemon.client() as c:
        obj = c.exec({"x": 1}, type="T")
        assert set(obj) == RESULT_KEYS and obj["ok"] is True
        assert obj["result"]["echo"] == {"x": 1}
        inputs = [{"delay": d, "i": i} for i, d in enumerate([0.3, 0.0, 0.2, 0.0, 0.1])]
        out = list(c.exec_many(inputs, window=4, type="T"))
        assert [o["result"]["echo"]["i"] for o in out] == list(range(5))
        failed = list(c.exec_many([1], type="nope"))
        assert failed[0]["ok"] is False and "'nope'" in failed[0]["error"]["message"]
        with pytest.raises(RequestTimeoutError) as info:
            c.exec({"delay": 2}, type="T", timeout=0.2)
        assert info.value.data["ok"] is False and info.value.data["instance"] in ("s#0", "s#1")


def test_exec_right_after_register_waits_for_the_instance_to_be_ready(daemon: Home) -> None:
    """A request sent while its only instance is still starting waits for it, not exit 4."""
    with daemon.client() as c:
        c.register(
            {
                "late": {
                    "command": engine_cmd("slow.py", "0"),
                    "type": "L",
                    "restart": {"start_seconds": 0.5},
                }
            }
        )
    r = exec_cli(daemon, "--type", "L", "--json", "--", '"hi"')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["instance"] == "late#0"


def test_a_retry_waits_for_a_busy_untried_instance(daemon: Home) -> None:
    """A retry whose only untried instance is busy waits for it within the deadline."""
    workers(
        daemon,
        bad={"command": engine_cmd("dies.py"), "type": "R", "capabilities": ["first"]},
        good={"command": engine_cmd("slow.py", "0.5"), "type": "R"},
    )
    busy = threading.Thread(target=exec_cli, args=(daemon, "--engine", "good", "--", "1"))
    busy.start()
    try:
        wait_until(lambda: stats(daemon, "good#0")["in_flight"] == 1)
        r = exec_cli(
            daemon,
            "--type",
            "R",
            "--strategy",
            "capability",
            "--prefer",
            "first",
            "--retries",
            "1",
            "--json",
            "--timeout",
            "10",
            "--",
            "2",
        )
    finally:
        busy.join()
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)
    assert (obj["instance"], obj["attempts"]) == ("good#0", 2)


def test_results_pass_through_unchanged(daemon: Home) -> None:
    """Results spliced from the worker's answer arrive exactly as the worker sent them."""
    workers(daemon, e={"command": engine_cmd("echo.py"), "type": "E"})
    payloads = [
        {"text": 'héllo \u2603 "quoted" \\ back', "n": [1, 2.5, -3e-7, None, True]},
        "plain string",
        12345678901234567890,
        [],
        {"deep": {"deeper": {"deepest": ["x" * 1000]}}},
    ]
    with daemon.client() as c:
        for obj, payload in zip(c.exec_many(payloads, window=4, type="E"), payloads, strict=True):
            assert obj["ok"] and obj["result"] == {"echo": payload}
            assert set(obj) == RESULT_KEYS
        explained = c.exec(payloads[0], type="E", explain=True)
        assert explained["result"] == {"echo": payloads[0]} and "explain" in explained


def test_client_reads_into_one_scratch_buffer(daemon: Home) -> None:
    """Issue 13 (regression): every recv of the client asked for a new 256 KiB bytes object,
    which glibc maps and unmaps (15 µs a call). Reads go into one buffer kept for the
    connection's life, and answers larger than it arrive whole."""
    workers(daemon, e={"command": engine_cmd("echo.py"), "type": "echo"})
    with daemon.client() as c:
        assert c.exec(1, type="echo")["result"] == {"echo": 1}
        scratch = c._scratch
        assert scratch is not None
        big = "é" * 400_000  # an answer of some 800 KB: several reads
        assert c.exec(big, type="echo")["result"] == {"echo": big}
        assert list(c.exec_many(range(50), window=8, type="echo"))[-1]["result"] == {"echo": 49}
        assert c._scratch is scratch


def test_a_large_request_grows_the_workers_pipes_to_cross_whole(daemon: Home) -> None:
    """Issue 13 (regression): a 115 KB request and its answer crossed the worker's 64 KiB pipes
    in pieces, a wake-up of each side per piece. The first frame that does not fit grows the
    pipe it crosses (stdin at once, stdout once an answer came in pieces); answers stay whole."""
    workers(daemon, e={"command": engine_cmd("echo.py"), "type": "echo"})
    with daemon.client() as c:
        pid = c.status()["engines"][0]["instances"][0]["pid"]
        flags = os.O_RDONLY | os.O_NONBLOCK
        stdin, stdout = (os.open(f"/proc/{pid}/fd/{n}", flags) for n in (0, 1))
        try:
            assert pipes.pipe_size(stdin) == pipes.pipe_size(stdout) == DEFAULT_PIPE_BYTES
            big = {"text": "é" * 100_000}  # some 200 KB of JSON
            for _ in range(2):
                assert c.exec(big, type="echo")["result"] == {"echo": big}
            assert pipes.pipe_size(stdin) == pipes.pipe_size(stdout) == 256 * 1024
        finally:
            os.close(stdin)
            os.close(stdout)
