"""Values a process cannot be started with (issue 9.2): refused at registration, naming the
field, with nothing saved; a spawn that fails anyway is a failed start, never a stuck state;
a oneshot payload the argv cannot carry is a request error that frees its slot."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

from engctl.daemon import process
from engctl.errors import EXIT_USAGE, SpecError, UsageError
from tests.conftest import PY, Home, engine_cmd, wait_until
from tests.daemon_support import kill9_daemon, socket_closed

QUICK: dict[str, Any] = {"restart": {"start_seconds": 0.1, "backoff": {"initial": 0.05}}}


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"command": ["python3", "-c", "print(1)\0"]}, "engines.bad.command[2]"),
        ({"command": "python3 -c 'x\0'"}, "engines.bad.command"),
        ({"command": ["sleep", "60"], "env": {"A\0B": "1"}}, "engines.bad.env"),
        ({"command": ["sleep", "60"], "env": {"A=B": "1"}}, "engines.bad.env"),
        ({"command": ["sleep", "60"], "env": {"OK": "x\0y"}}, "engines.bad.env.OK"),
        ({"command": ["sleep", "60"], "cwd": "/tmp\0x"}, "engines.bad.cwd"),
        (
            {"command": ["sleep", "60"], "mode": "service", "health": {"check": "command:a\0"}},
            "engines.bad.health.check",
        ),
    ],
)
def test_register_refuses_nul_and_bad_env_names_and_saves_nothing(
    daemon: Home, spec: dict[str, Any], field: str
) -> None:
    """Issue 9.2: a NUL byte in command, env or cwd, or '=' in an env name, is one SpecError
    naming the field (exit 2 on the CLI); the engine is neither registered nor saved, and the
    daemon serves on (stop works)."""
    with daemon.client(timeout=60) as c, pytest.raises(SpecError) as info:
        c.register({"bad": spec})
    assert info.value.message.startswith(f"{field}: ")
    assert info.value.exit_code == EXIT_USAGE
    with daemon.client(timeout=60) as c:
        assert c.call("engine.list")["engines"] == []
    saved = daemon.paths.registry
    assert not saved.exists() or "bad" not in json.loads(saved.read_text()).get("engines", {})
    r = daemon.cli("daemon", "stop")
    assert r.returncode == 0, r.stderr


def test_a_spawn_failure_of_any_kind_raises_spawn_error_and_leaves_no_process() -> None:
    """Issue 9.2: values the kernel refuses (not OSError: ValueError for a NUL, an '=' in an
    env name) are SpawnError like a missing command, raised before any process exists, and
    leave no pipe open."""

    def attempt(argv: list[str], env: dict[str, str], cwd: str | None) -> str:
        with pytest.raises(process.SpawnError) as info:
            process.launch(argv, cwd=cwd, env=env, pipe_stdin=True, stdout_to_pipe=True)
        return str(info.value)

    fds = set(os.listdir("/proc/self/fd"))
    assert "embedded null byte" in attempt(["true\0"], {}, None)
    assert "environment" in attempt(["true"], {"A=B": "1"}, None)
    assert "embedded null byte" in attempt(["true"], {}, "/tmp\0")
    assert "No such file" in attempt(["/nonexistent/engctl-test"], {}, None)
    # The daemon makes each child's pipes itself: a launch that fails closes all of them.
    assert set(os.listdir("/proc/self/fd")) == fds


def test_engines_after_one_that_cannot_start_still_start_after_a_daemon_restart(
    daemon: Home,
) -> None:
    """Issue 9.2: at daemon start an engine whose start fails (its command cannot be run)
    ends in backoff/fatal with the reason, and the engines after it start all the same."""
    with daemon.client(timeout=60) as c:
        c.register(
            {
                "a-broken": {"command": ["/nonexistent/engctl-test"], **QUICK},
                "b-fine": {"command": engine_cmd("echo.py"), "depends_on": [], **QUICK},
            }
        )
    daemon.wait_state("b-fine#0", "ready")
    kill9_daemon(daemon)
    wait_until(lambda: socket_closed(daemon))
    daemon.start_daemon()
    daemon.wait_state("b-fine#0", "ready")
    broken = daemon.wait_state("a-broken#0", "backoff", "fatal")
    assert "cannot start '/nonexistent/engctl-test'" in broken["state_reason"]
    assert daemon.cli("unregister", "a-broken").returncode == 0


def test_a_nul_in_a_oneshot_argv_payload_is_a_request_error_that_frees_its_slot(
    daemon: Home,
) -> None:
    """Issue 9.2: a payload with a NUL byte for a oneshot that puts it in its argv
    (`{input}`) fails that request (exit 2, one line), and the engine's only slot is free
    again: the next request is served."""
    daemon.register("args", engine_cmd("oneshot_args.py", "--in={input}"), mode="oneshot", type="A")
    with daemon.client(timeout=60) as c, pytest.raises(UsageError, match="holds a NUL byte"):
        c.exec("a\0b", type="A", timeout=5)
    r = daemon.cli("exec", "--type", "A", "--timeout", "5", "--", '"x\\u0000y"')
    assert r.returncode == EXIT_USAGE, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "NUL byte" in r.stderr
    with daemon.client(timeout=60) as c:
        assert c.exec("fine", type="A", timeout=5)["result"] == {"args": ["--in=fine"]}
    wait_until(lambda: daemon.status()["engines"][0]["requests"]["in_flight"] == 0)


def test_stop_and_unregister_work_for_an_engine_that_never_got_a_process(daemon: Home) -> None:
    """Issue 9.2: an engine whose every start fails can be stopped, updated and
    unregistered, and the daemon stops cleanly (no assertion reachable by users)."""
    daemon.register(
        "nope",
        ["/nonexistent/engctl-test"],
        restart={"start_seconds": 0.1, "max_retries": 100, "backoff": {"initial": 0.05}},
    )
    wait_until(lambda: daemon.instance("nope#0")["restarts"] >= 2)
    assert daemon.cli("stop", "nope").returncode == 0
    assert daemon.instance("nope#0")["state"] == "stopped"
    assert daemon.cli("start", "nope").returncode == 0
    with daemon.client(timeout=60) as c:
        c.register({"nope": {"command": [PY, "-c", "pass"]}})
    assert daemon.cli("unregister", "nope").returncode == 0
    r = daemon.cli("daemon", "stop")
    assert r.returncode == 0, r.stderr
