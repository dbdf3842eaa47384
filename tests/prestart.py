"""A daemon starter for the tests with the daemon's modules imported once: `Home.start_daemon`
forks it instead of starting an interpreter that imports them again (~0.18 s of CPU a start).

The forked daemon runs `engctl.daemon.main` with `--background` and a ready fd, in its own
session, stderr to the home's daemon.stderr, adopted by init: the process tree of a daemon the
CLI starts. What differs: /proc shows the starter's command line and environment for it (the
kernel keeps the ones of the exec), so `Home` records its pid for the tests that look for a
home's daemons. `ENGCTL_TEST_SPAWN_DAEMONS=1` starts every daemon the CLI's way instead.
Daemons the CLI or the client start (autostart, `engctl daemon start`) are never forked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

START_TIMEOUT = 30.0
ROOT = Path(__file__).resolve().parent.parent


def _fork_daemon(daemon_main: ModuleType, request: dict[str, Any]) -> str:
    """Fork a background daemon as `request` says; return its ready message."""
    from engctl.client import _read_ready

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: main() forks the daemon away from it and ends it at once
        code = 70
        try:
            os.close(read_fd)
            os.setsid()
            os.chdir(request["cwd"])
            os.environ.clear()
            os.environ.update(request["env"])
            null = os.open(os.devnull, os.O_RDONLY)
            err = os.open(request["stderr"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            os.dup2(null, 0)
            os.dup2(err, 1)
            os.dup2(err, 2)
            # Nothing of the starter's stays open in the daemon but the ready pipe.
            os.closerange(3, write_fd)
            os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - lives until os._exit
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
            if request.get("launch_delay"):
                _slow_launches(daemon_main, float(request["launch_delay"]))
            daemon_main.main(["--ready-fd", str(write_fd), "--background", *request["args"]])
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    os.close(write_fd)
    os.waitpid(pid, 0)
    return _read_ready(read_fd, START_TIMEOUT)


def _slow_launches(daemon_main: ModuleType, delay: float) -> None:
    """Fault injection: every launch of the daemon's processes takes `delay` seconds more on
    its launcher thread (the process exists only then), as an exec on a very busy machine:
    it holds open the window between `starting` and a process the tests reach into."""
    import time

    process = daemon_main.process
    launch = process.launch

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return launch(*args, **kwargs)

    process.launch = slow


def serve() -> None:
    """The starter's loop: one request line in, one answer line out, until stdin closes."""
    import engctl.daemon.main as daemon_main

    for line in sys.stdin:
        try:
            message = _fork_daemon(daemon_main, json.loads(line))
        except Exception as exc:  # the test that asked fails with it
            message = f"error: {type(exc).__name__}: {exc}"
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


class Starter:
    """The test process's side: starts the starter on first use, then asks it for daemons."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[str] | None = None

    def start(
        self, env: dict[str, str], stderr: Path, args: list[str], launch_delay: float = 0.0
    ) -> str:
        """Start a background daemon with `env` and daemon `args`; its ready message. With
        `launch_delay`, each of its launches takes that long more (`_slow_launches`)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            # Without the test's ENGCTL_* variables: no home's leftover check may take it.
            clean = {k: v for k, v in os.environ.items() if not k.startswith("ENGCTL_")}
            proc = self._proc = subprocess.Popen(
                [sys.executable, "-c", "from tests.prestart import serve; serve()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
                env=clean,
            )
        assert proc.stdin is not None and proc.stdout is not None
        request = {
            "env": env,
            "cwd": os.getcwd(),
            "stderr": str(stderr),
            "args": args,
            "launch_delay": launch_delay,
        }
        proc.stdin.write(json.dumps(request) + "\n")
        proc.stdin.flush()
        answer = proc.stdout.readline()
        assert answer, "the daemon starter exited"
        message = json.loads(answer)
        assert isinstance(message, str)
        return message

    def close(self) -> None:
        """End the starter (its daemons are not its children: they live on)."""
        if self._proc is not None:
            assert self._proc.stdin is not None and self._proc.stdout is not None
            self._proc.stdin.close()
            self._proc.wait(30)
            self._proc.stdout.close()
            self._proc = None
