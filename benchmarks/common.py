"""Helpers shared by the benchmark scripts (run as `python benchmarks/NAME.py`)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from engctl.client import Client

SLEEP = shutil.which("sleep") or "/bin/sleep"


def median_ms(cmd: list[str], runs: int, env: dict[str, str]) -> float:
    """Median wall time of a command, in milliseconds (one warm-up run first)."""
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def wait_for(pred: Any, timeout: float = 60.0) -> Any:
    """Poll `pred` until it returns something truthy (TimeoutError after `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise TimeoutError(str(pred))


def all_ready(c: Client, name: str, n: int) -> bool:
    """Whether engine `name` has exactly `n` instances, all ready."""
    insts = [i for e in c.status([name])["engines"] for i in e["instances"]]
    return len(insts) == n and all(i["state"] == "ready" for i in insts)


def exit_cleanly_on_sigterm() -> None:
    """Turn SIGTERM (e.g. from `timeout`) into SystemExit, so `finally` stops the daemon."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def source_state() -> str:
    """The commit measured, `+dirty` when the working tree has changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{'+dirty' if dirty else ''}"


def machine_info(**extra: Any) -> dict[str, Any]:
    """What a figure depends on: CPUs, Python, and the load other processes put on them."""
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
        # Other load on the machine skews the figures (every process shares the CPUs).
        "loadavg_1m_at_start": round(os.getloadavg()[0], 2),
        **extra,
    }


def stop_daemon(home: str, daemon_pid: int | None) -> None:
    """Stop the daemon of `home` (never autostarting one to do so); SIGKILL it if that fails."""
    import psutil

    try:
        with Client(home, autostart=False) as stopper:
            stopper.call("daemon.stop")
        if daemon_pid is not None:
            wait_for(lambda: not psutil.pid_exists(daemon_pid), 30)
    except Exception as exc:  # report, but never leave the daemon behind
        print(f"cleanup: {exc}", file=sys.stderr)
        pid_file = Path(home, "state", "daemon.pid")
        pid = pid_file.read_text().strip() if pid_file.exists() else ""
        if pid.isdigit():
            os.kill(int(pid), signal.SIGKILL)


@contextlib.contextmanager
def supervisord(venv: Path, programs: int) -> Iterator[list[str]]:
    """A supervisord (of `venv`, where supervisor is installed) running `programs` sleep
    programs; yields the supervisorctl command. Shut down at the end, even on error."""
    folder = Path(tempfile.mkdtemp(prefix="svbench", dir="/tmp"))
    conf = folder / "supervisord.conf"
    lines = [
        "[unix_http_server]", f"file={folder}/s.sock",
        "[supervisord]", f"logfile={folder}/d.log", f"pidfile={folder}/d.pid",
        f"childlogdir={folder}", "nodaemon=false",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "[supervisorctl]", f"serverurl=unix://{folder}/s.sock",
    ]  # fmt: skip
    for k in range(programs):
        lines += [
            f"[program:p{k}]", f"command={SLEEP} 3600", "startsecs=0",
            "stdout_logfile=NONE", "stderr_logfile=NONE",
        ]  # fmt: skip
    conf.write_text("\n".join(lines) + "\n")
    ctl = [str(venv / "bin" / "supervisorctl"), "-c", str(conf)]
    subprocess.run([str(venv / "bin" / "supervisord"), "-c", str(conf)], check=True)
    pid_file = folder / "d.pid"
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text().strip())

        def all_running() -> bool:
            out = subprocess.run([*ctl, "status"], capture_output=True, text=True).stdout
            return out.count(" RUNNING ") == programs

        wait_for(all_running, 120)
        yield ctl
    finally:
        pid = int(pid_file.read_text().strip()) if pid_file.exists() else None
        subprocess.run([*ctl, "shutdown"], capture_output=True)
        if pid is not None:
            try:
                wait_for(lambda: not alive(pid), 30)
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
