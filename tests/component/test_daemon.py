"""The daemon as a whole: its socket under hostile input, kill -9 recovery, one start, shutdown."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
from typing import Any

import pytest

from engctl.errors import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    IncompatibleDaemonError,
)
from tests.conftest import PY, Home, engine_cmd, wait_until
from tests.daemon_support import (
    RawConn,
    all_ready,
    daemon_processes,
    engine_processes,
    gone,
    kill9_daemon,
)

TEN_MIB = 10 * 1024 * 1024
QUICK = {"restart": {"start_seconds": 0.2}}


def _valid_call_answers(conn: RawConn, req_id: int) -> None:
    reply = conn.call(req_id, "status.get")
    assert (reply["jsonrpc"], reply["id"], reply["result"]["engines"]) == ("2.0", req_id, [])


# -- hostile frames ------------------------------------------------------------------------


def test_garbage_line_gets_error_with_null_id_and_connection_stays_usable(daemon: Home) -> None:
    """A garbage line is answered with a parse error whose id is null; the next call works."""
    with RawConn(daemon.paths.socket) as conn:
        reply = conn.roundtrip(b"\x00\xffnot json at all\n")
        assert reply["jsonrpc"] == "2.0"
        assert reply["id"] is None
        assert reply["error"]["code"] == PARSE_ERROR
        assert "not valid JSON" in reply["error"]["message"]
        _valid_call_answers(conn, 1)


def test_notifications_get_no_reply_even_when_they_fail(daemon: Home) -> None:
    """A call without an id (a notification) is never answered, as JSON-RPC 2.0 requires."""
    with RawConn(daemon.paths.socket) as conn:
        conn.send(b'{"jsonrpc":"2.0","method":"no.such.method"}\n')
        conn.send(b'{"jsonrpc":"2.0","method":"status.get","params":{"names":5}}\n')
        reply = conn.call(7, "status.get")
        assert reply["id"] == 7
        assert "result" in reply


def _frame(method: object = "status.get", **fields: object) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "id": 3, "method": method, **fields}).encode()


MALFORMED = [
    ("invalid-json", b'{"jsonrpc": "2.0", "id": 3, "method": ', PARSE_ERROR, None),
    ("invalid-utf8", b'{"jsonrpc": "2.0", "id": 3, "method": "\xff"}', PARSE_ERROR, None),
    ("array", b"[" + _frame() + b"]", INVALID_REQUEST, None),
    ("string", b'"just a string"', INVALID_REQUEST, None),
    ("no-jsonrpc", b'{"id": 3, "method": "status.get"}', INVALID_REQUEST, None),
    ("jsonrpc-1.0", b'{"jsonrpc": "1.0", "id": 3, "method": "status.get"}', INVALID_REQUEST, None),
    ("method-not-string", _frame(7), INVALID_REQUEST, 3),
    ("positional-params", _frame(params=[1]), INVALID_REQUEST, 3),
    ("unknown-method", _frame("engine.fly"), METHOD_NOT_FOUND, 3),
    ("names-not-list", _frame(params={"names": 5}), INVALID_PARAMS, 3),
    ("names-not-strings", _frame(params={"names": [1, 2]}), INVALID_PARAMS, 3),
    ("limit-string", _frame("events.list", params={"limit": "ten"}), INVALID_PARAMS, 3),
    ("limit-bool", _frame("events.list", params={"limit": True}), INVALID_PARAMS, 3),
    ("engines-not-object", _frame("engine.register", params={"engines": []}), INVALID_PARAMS, 3),
    ("missing-param", _frame("engine.stop"), INVALID_PARAMS, 3),
]


@pytest.mark.parametrize(
    ("frame", "code", "reply_id"),
    [pytest.param(*case[1:], id=case[0]) for case in MALFORMED],
)
def test_malformed_frame_gets_its_jsonrpc_error(
    daemon: Home, frame: bytes, code: int, reply_id: int | None
) -> None:
    """Each kind of malformed frame gets its JSON-RPC error code and the connection stays usable."""
    with RawConn(daemon.paths.socket) as conn:
        reply = conn.roundtrip(frame + b"\n")
        assert reply["id"] == reply_id
        assert reply["error"]["code"] == code, reply
        assert reply["error"]["message"]
        assert "result" not in reply
        _valid_call_answers(conn, 4)


def test_several_frames_in_one_write_are_all_answered(daemon: Home) -> None:
    """Frames that arrive together, bad and good mixed, are each answered in turn."""
    with RawConn(daemon.paths.socket) as conn:
        conn.send(
            b'{"jsonrpc": "2.0", "id": 1, "method": "status.get"}\n'
            b"garbage\n"
            b"\n"
            b'{"jsonrpc": "2.0", "id": 2, "method": "daemon.status"}\n'
        )
        replies = [conn.recv() for _ in range(3)]
        assert [r["id"] for r in replies] == [1, None, 2]
        assert "result" in replies[0]
        assert replies[1]["error"]["code"] == PARSE_ERROR
        assert replies[2]["result"]["pid"] == daemon.daemon_pid()


@pytest.mark.parametrize("newline", [False, True], ids=["no-newline", "newline"])
def test_ten_mib_line_is_refused_and_daemon_keeps_serving(daemon: Home, newline: bool) -> None:
    """A 10 MiB line gets one frame-limit error; the same and a new connection still get answers."""
    pid = daemon.daemon_pid()
    with RawConn(daemon.paths.socket) as conn:
        conn.send(b"x" * TEN_MIB + (b"\n" if newline else b""))
        reply = conn.recv()
        assert reply["id"] is None
        assert reply["error"]["code"] == INVALID_REQUEST
        assert "limit" in reply["error"]["message"]
        if not newline:
            # The oversized frame ends at its newline; what follows is a fresh frame.
            conn.send(b"y" * 4096 + b"\n")
        # The next answer is the call's: the oversized frame got exactly one error.
        _valid_call_answers(conn, 1)
    with RawConn(daemon.paths.socket) as other:
        _valid_call_answers(other, 2)
    assert daemon.daemon_pid() == pid
    with daemon.client() as c:
        assert c.call("daemon.status")["pid"] == pid


def test_oversized_frame_then_valid_frame_in_the_same_write(daemon: Home) -> None:
    """A valid frame right after an oversized one in the same byte stream is still answered."""
    with RawConn(daemon.paths.socket) as conn:
        frame = json.dumps({"jsonrpc": "2.0", "id": 9, "method": "status.get"}).encode()
        conn.send(b"z" * (2 * 1024 * 1024) + b"\n" + frame + b"\n")
        assert "limit" in conn.recv()["error"]["message"]
        reply = conn.recv()
        assert (reply["jsonrpc"], reply["id"], reply["result"]["engines"]) == ("2.0", 9, [])


@pytest.mark.parametrize(
    "partial",
    [
        b'{"jsonrpc": "2.0", "id": 1, "meth',
        b'{"jsonrpc": "2.0", "id": 1, "method": "engine.register", "params": {"engines": '
        + b"[" * 300_000,
    ],
    ids=["small", "large"],
)
def test_half_sent_frame_then_disconnect_leaves_daemon_fine(daemon: Home, partial: bytes) -> None:
    """A client that sends half a frame and hangs up leaves the daemon serving everyone else."""
    pid = daemon.daemon_pid()
    assert pid is not None
    with RawConn(daemon.paths.socket) as conn:
        conn.send(partial)
    # A second client does the same while the first is being cleaned up.
    sock = RawConn(daemon.paths.socket)
    sock.send(partial[:20])
    sock.sock.shutdown(2)
    sock.close()
    with RawConn(daemon.paths.socket) as conn:
        _valid_call_answers(conn, 1)
    assert daemon.daemon_pid() == pid
    assert not gone(pid)


def test_hello_with_another_protocol_version_is_refused(daemon: Home) -> None:
    """session.hello with a protocol the daemon does not speak gets the incompatible error."""
    with RawConn(daemon.paths.socket) as conn:
        reply = conn.call(1, "session.hello", protocol=999, client="engctl 99")
        assert reply["error"]["code"] == IncompatibleDaemonError.rpc_code
        assert "protocol" in reply["error"]["message"]
        assert "999" in reply["error"]["message"]
        ok = conn.call(2, "session.hello", protocol=1, client="test")
        assert ok["result"]["protocol"] == 1
        assert ok["result"]["pid"] == daemon.daemon_pid()
        missing = conn.call(3, "session.hello")
        assert missing["error"]["code"] == INVALID_PARAMS


def test_socket_is_private(daemon: Home) -> None:
    """The socket is mode 0600 inside a 0700 folder."""
    sock_mode = os.stat(daemon.paths.socket).st_mode
    assert stat.S_ISSOCK(sock_mode)
    assert stat.S_IMODE(sock_mode) == 0o600
    assert stat.S_IMODE(os.stat(daemon.paths.socket.parent).st_mode) == 0o700


# -- kill -9 and restart -------------------------------------------------------------------


def _status_json(home: Home) -> dict[str, Any]:
    """`daemon start` (status, a read command, starts none), then `status --json`."""
    r = home.cli("daemon", "start")
    assert r.returncode == 0, r.stderr
    r = home.cli("status", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert isinstance(doc, dict)
    return doc


def test_kill9_then_status_brings_back_every_engine_once(daemon: Home) -> None:
    """After kill -9 a new daemon replaces the old processes, keeps the registry and still
    lists the events from before the kill."""
    daemon.register("svc", engine_cmd("sleeper.py"), mode="service", instances=2, **QUICK)
    daemon.register("wk", engine_cmd("echo.py"), mode="worker", **QUICK)
    with daemon.client() as c:
        c.register(
            {"off": {"command": engine_cmd("sleeper.py"), "mode": "service", **QUICK}},
            start=False,
        )
    old = wait_until(lambda: all_ready(daemon, "svc", 2), 20) + wait_until(
        lambda: all_ready(daemon, "wk", 1), 20
    )
    old_pids = {i["pid"] for i in old}
    assert engine_processes(daemon) == old_pids
    with daemon.client() as c:
        exported = c.call("engine.export")
        before = c.events(limit=10_000)
    assert {"svc", "wk", "off"} <= {e["engine"] for e in before if e["kind"] == "engine.registered"}

    old_daemon = kill9_daemon(daemon)
    st = _status_json(daemon)
    new_daemon = daemon.daemon_pid()
    assert new_daemon is not None and new_daemon != old_daemon
    assert {e["name"] for e in st["engines"]} == {"svc", "wk", "off"}

    new = wait_until(lambda: all_ready(daemon, "svc", 2), 30) + wait_until(
        lambda: all_ready(daemon, "wk", 1), 30
    )
    new_pids = {i["pid"] for i in new}
    assert not new_pids & old_pids
    wait_until(lambda: all(gone(p) for p in old_pids), 15)
    # Exactly the configured instances run: no old process survives next to a new one.
    assert engine_processes(daemon) == new_pids
    st = daemon.status()
    for engine in st["engines"]:
        ids = [i["id"] for i in engine["instances"]]
        assert ids == [f"{engine['name']}#{k}" for k in range(engine["instances_wanted"])]
    off = next(e for e in st["engines"] if e["name"] == "off")
    assert off["desired"] == "stopped"
    assert [(i["state"], i["pid"]) for i in off["instances"]] == [("stopped", None)]
    assert len(daemon_processes(daemon)) == 1

    with daemon.client() as c:
        assert c.call("engine.export") == exported
        after = c.events(limit=10_000)
    after_ids = {e["id"] for e in after}
    assert {e["id"] for e in before} <= after_ids
    assert min(after_ids) == min(e["id"] for e in before)
    assert any(e["kind"] == "daemon.replaced_orphans" for e in after)


def test_acknowledged_register_survives_immediate_kill9(daemon: Home) -> None:
    """A registration the CLI reported done is still there after kill -9 right after it."""
    r = daemon.cli(
        "register", "keep", "--cmd", " ".join(engine_cmd("sleeper.py")), "--mode", "service"
    )
    assert r.returncode == 0, r.stderr
    kill9_daemon(daemon)
    st = _status_json(daemon)
    assert [e["name"] for e in st["engines"]] == ["keep"]
    with daemon.client() as c:
        spec = c.call("engine.export")["engines"]["keep"]
    assert spec["command"] == engine_cmd("sleeper.py")
    assert spec["mode"] == "service"


def test_daemon_stopped_during_startup_still_ends_the_old_generation(daemon: Home) -> None:
    """A daemon told to stop while it sweeps a killed daemon's processes still kills them all."""
    daemon.register(
        "stubborn", engine_cmd("ignore_sigterm.py"), mode="service", stop={"timeout": 1.0}, **QUICK
    )
    old = wait_until(lambda: all_ready(daemon, "stubborn", 1), 20)[0]["pid"]
    kill9_daemon(daemon)
    r = daemon.cli("daemon", "start", "--json")
    assert r.returncode == 0, r.stderr
    pid = json.loads(r.stdout)["pid"]
    # The sweep gives SIGTERM-ignoring orphans a grace period: stop the daemon inside it.
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: gone(pid), 30)
    wait_until(lambda: gone(old), 10)
    assert engine_processes(daemon) == set()


def test_racing_clis_start_exactly_one_daemon(home: Home) -> None:
    """CLIs started together with no daemon running all succeed and share one new daemon."""
    procs = [
        subprocess.Popen(
            [PY, "-m", "engctl", "daemon", "start", "--json"],
            env=home.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    pids = set()
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        pids.add(json.loads(out)["pid"])
    daemons = daemon_processes(home)
    assert [d.pid for d in daemons] == [home.daemon_pid()] == list(pids)


# -- graceful shutdown ---------------------------------------------------------------------


def test_sigterm_stops_engines_with_their_stop_signal(daemon: Home) -> None:
    """SIGTERM to the daemon stops every engine with its configured stop signal, then exits."""
    daemon.register(
        "sig",
        engine_cmd("siglog.py"),
        mode="service",
        instances=2,
        stop={"signal": "SIGINT", "timeout": 10.0},
        **QUICK,
    )
    insts = wait_until(lambda: all_ready(daemon, "sig", 2), 20)
    pid = daemon.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: gone(pid), 30)
    for inst in insts:
        assert gone(inst["pid"])
    for k in range(2):
        text = daemon.paths.instance_log("sig", k).read_text()
        assert "got SIGINT" in text
        assert "exit code 0" in text
    assert not daemon.paths.socket.exists()
    assert engine_processes(daemon) == set()


def test_client_daemon_info_answers_right_after_connect(daemon: Home) -> None:
    """The hello's answer (sent with the first call) is available at once after connect()."""
    with daemon.client() as c:
        c.connect()
        assert c.daemon_info["pid"] == daemon.daemon_pid()
        assert c.daemon_info["protocol"] == 1
        assert c.status()["engines"] == []  # the connection is still in step


# -- parameters of every method --------------------------------------------------------------
def _methods() -> list[str]:
    """Every RPC method the daemon serves (read from Api.handlers, so new ones are covered)."""
    import inspect
    import re

    from engctl.daemon.api import Api

    return re.findall(r'"([a-z]+\.[a-z_]+)": self\.', inspect.getsource(Api.handlers))


JUNK: list[Any] = [
    None, True, -1, 0, 10**20, -(10**20), 1.5, 1e300, "", "x", "f#99", "f#x", "f#0",
    [], [1], ["f"], ["f", 5], ["nosuch"], {}, {"a": 1}, {"f": 5}, {"f": []},
    {"f": {"command": 5}}, {"f": {"command": ["x"], "instances": -1}},
]  # fmt: skip
PARAM_NAMES = [
    "names", "targets", "name", "instances", "engine", "since", "limit", "target", "lines",
    "input", "type", "timeout", "retries", "require", "prefer", "labels", "key", "strategy",
    "engines", "start", "prune", "wait", "reason", "protocol", "client", "explain", "instance",
]  # fmt: skip
# Valid values of the usual parameters, so each junk value is seen past the first check.
VALID = {
    "names": ["f"], "targets": ["f#0"], "name": "f", "target": "f", "input": 1,
    "type": "echo", "protocol": 1, "instances": 1, "engine": "f",
}  # fmt: skip
# Calls that would stop or replace what the others need, tried with one parameter only.
DISRUPTIVE = {"engine.unregister", "engine.stop", "engine.restart", "engine.register",
              "engine.apply", "daemon.stop"}  # fmt: skip


def test_bad_params_of_every_method_are_errors_never_internal_errors(daemon: Home) -> None:
    """Every method, given a wrong value for any parameter (alone, or among valid ones),
    answers a result or an engctl error, never an internal error: parameter checks raise
    InvalidParamsError explicitly (issue 10.27; issue 9.12's 1e999 and the like)."""
    with daemon.client() as c:
        c.register({"f": {"command": engine_cmd("echo.py"), "type": "echo", **QUICK}})
    methods = _methods()
    assert "request.exec" in methods and "engine.scale" in methods
    internal = []
    req_id = 0
    with RawConn(daemon.paths.socket) as conn:
        for method in methods:
            if method == "daemon.stop":
                continue
            bases = [{}] if method in DISRUPTIVE else [{}, VALID]
            for base in bases:
                for name in PARAM_NAMES:
                    for value in JUNK:
                        req_id += 1
                        frame = {"jsonrpc": "2.0", "id": req_id, "method": method}
                        frame["params"] = {**base, name: value}
                        conn.send(json.dumps(frame).encode() + b"\n")
                        reply = conn.recv()
                        while reply.get("id") != req_id:  # stream notifications
                            reply = conn.recv()
                        if reply.get("error", {}).get("code") == -32603:
                            internal.append((method, name, value, reply["error"]["message"]))
    assert not internal, internal[:5]
    assert "internal error" not in daemon.paths.daemon_log.read_text()


def test_a_daemon_of_services_maps_neither_msgspec_nor_shutils_codecs(home: Home) -> None:
    """Issue 13 (memory, regression): a daemon that supervises services only loads no msgspec
    (1.1 MiB of RSS, for the frames of engines that take requests) and argparse's width no
    longer brings shutil with bz2 and lzma (0.4 MiB); the first engine that takes requests
    (here a service changed into one) loads msgspec at once, before its first request."""
    with home.client() as c:
        c.connect()
        pid = c.daemon_info["pid"]
    home.register("svc", ["sleep", "60"], mode="service", instances=2)
    home.wait_state("svc#1", "ready")
    with home.client() as c:
        assert c.status()["engines"]  # a status document written (orjson)

    def maps() -> str:
        with open(f"/proc/{pid}/maps") as f:
            return f.read()

    for library in ("msgspec", "libbz2", "liblzma"):
        assert library not in maps(), f"the daemon loaded {library}"
    with home.client() as c:  # a service becomes a oneshot engine: it takes requests now
        c.apply({"svc": {"command": ["cat"], "mode": "oneshot"}})
    assert "msgspec" in maps()


def test_daemon_maps_neither_psutil_nor_openssl(home: Home) -> None:
    """The daemon reads /proc itself and hashes with CPython's own digests: psutil (~0.8 MiB
    of RSS) and OpenSSL (~3.5 MiB, through hashlib) stay out of its memory, also once an
    instance has exited and its tree was swept. (decimal comes with msgspec, which reads
    the frames of engines that take requests: loaded with the first of them, see the test
    above.) A daemon spawned as the client spawns it (not forked from the test starter,
    which has psutil loaded)."""
    with home.client() as c:
        c.connect()
        pid = c.daemon_info["pid"]
    home.register("w", ["sleep", "60"], mode="service", instances=2)
    first = home.wait_state("w#0", "ready")["pid"]
    os.kill(first, signal.SIGKILL)
    wait_until(
        lambda: home.instance("w#0")["state"] == "ready" and home.instance("w#0")["pid"] != first
    )
    with home.client() as c:
        c.unregister(["w"])
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read()
    for library in ("_psutil_linux", "libcrypto", "_hashlib"):
        assert library not in maps, f"the daemon loaded {library}"
