"""Helpers for the daemon, registry and CLI tests: a raw socket speaker, process checks."""

from __future__ import annotations

import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import Home, alive, wait_until


class RawConn:
    """A bare AF_UNIX connection to the daemon that sends bytes and reads JSON lines."""

    def __init__(self, path: Path, timeout: float = 20.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._rfile = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        line = self._rfile.readline()
        assert line, "the daemon closed the connection"
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    def roundtrip(self, data: bytes) -> dict[str, Any]:
        self.send(data)
        return self.recv()

    def call(self, req_id: int, method: str, **params: Any) -> dict[str, Any]:
        frame = {"jsonrpc": "2.0", "id": req_id, "method": method, "params": params}
        return self.roundtrip(json.dumps(frame).encode() + b"\n")

    def close(self) -> None:
        self._rfile.close()
        self.sock.close()

    def __enter__(self) -> RawConn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie counts as exited; our own zombie is reaped)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return True
    except ChildProcessError:
        pass
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill9_daemon(home: Home) -> int:
    """SIGKILL the home's daemon and wait until it is dead; return its pid."""
    pid = home.daemon_pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: gone(pid), 10)
    return pid


def socket_closed(home: Home) -> bool:
    """Whether nothing listens on the home's socket: a killed daemon's threads may hold it a
    moment after its leader is a zombie (a connection then is reset)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(home.paths.socket))
        except (ConnectionRefusedError, FileNotFoundError):
            return True
    return False


def daemon_processes(home: Home, engctl_home: Path | None = None) -> list[psutil.Process]:
    """Live daemon processes of this home (or of another ENGCTL_HOME)."""
    want = str(engctl_home or home.path)
    found = [p for p in home.forked if alive(p)] if engctl_home is None else []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = p.cmdline()
            if "engctl.daemon" in cmd and p.environ().get("ENGCTL_HOME") == want and p not in found:
                found.append(p)
        except psutil.Error:
            continue
    return found


def engine_processes(home: Home) -> set[int]:
    """Pids of live processes started by this home's daemons (marked in their environment)."""
    pids = set()
    for p in psutil.process_iter(["pid"]):
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                continue
            if p.environ().get("ENGCTL_DAEMON_ID") == home.paths.daemon_id:
                pids.add(p.pid)
        except psutil.Error:
            continue
    return pids


def all_ready(home: Home, engine: str, n: int) -> list[dict[str, Any]] | None:
    """The engine's instances if there are `n` and every one is ready with a pid."""
    insts = home.instances(engine)
    if len(insts) == n and all(i["state"] == "ready" and i["pid"] for i in insts):
        return insts
    return None
