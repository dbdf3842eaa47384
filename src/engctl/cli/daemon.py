"""`engctl daemon start|stop|status|run`."""

from __future__ import annotations

import os
import sys
import time
from typing import Annotated

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, emit_json, finite, out, warn
from engctl.errors import (
    DaemonNotRunningError,
    RequestTimeoutError,
    UsageError,
)

daemon_app = typer.Typer(
    help="Start, stop and inspect the background daemon.", no_args_is_help=True
)
app.add_typer(daemon_app, name="daemon")


ResetRegistry = Annotated[
    bool,
    typer.Option(
        "--reset-registry",
        help="Start with no engines: move an unreadable registry.json aside (never deleted).",
    ),
]


@daemon_app.command("start")
def start(json: JsonFlag = False, reset_registry: ResetRegistry = False) -> None:
    """Start the daemon in the background (a no-op when it runs already)."""
    if reset_registry:
        from engctl.client import Client

        try:
            running = client()
        except DaemonNotRunningError:
            pass
        else:
            pid = running.daemon_info.get("pid")
            running.close()
            raise UsageError(
                f"a daemon runs already (pid {pid}): --reset-registry applies when one starts"
                " (stop it first with `engctl daemon stop`)"
            )
        c = Client(autostart=True, daemon_args=("--reset-registry",))
        c.connect()
    else:
        c = client(autostart=True)
    info = c.call("daemon.status")
    if json:
        emit_json(info)
        return
    out(f"daemon running: pid {info['pid']}, socket {info['socket']}")
    warn(info.get("warnings", []))


@daemon_app.command("stop")
def stop(
    json: JsonFlag = False,
    timeout: Annotated[
        float,
        typer.Option(
            help="Seconds to wait for engines to stop and the daemon to exit.", callback=finite
        ),
    ] = 60.0,
) -> None:
    """Stop every engine with its stop policy, then the daemon (a no-op when none runs)."""
    try:
        c = client(autostart=False)
    except DaemonNotRunningError:
        if json:
            emit_json({"stopped": False, "running": False})
        else:
            out("no daemon running")
        return
    pid = int(c.call("daemon.stop")["pid"])
    c.close()
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise RequestTimeoutError(f"daemon pid {pid} still running after {timeout:g}s")
        time.sleep(0.02)
    if json:
        emit_json({"stopped": True, "pid": pid})
    else:
        out(f"daemon stopped (pid {pid})")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process (daemon started by us) counts as gone.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        pass
    # So does a zombie of another process: a program that started the daemon through
    # engctl.Client is its parent and may never reap it.
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return True
    # The state is the first field after the command name, which is in parentheses.
    fields = stat.rpartition(")")[2].split()
    return not fields or fields[0] != "Z"


@daemon_app.command("status")
def status(json: JsonFlag = False) -> None:
    """Whether a daemon runs, its pid, uptime, memory and folders (exit 3 when none runs)."""
    info = client(autostart=False).call("daemon.status")
    if json:
        emit_json(info)
        return
    from engctl.render.format import duration, size

    out(f"daemon running: pid {info['pid']}, engctl {info['version']}")
    out(f"  uptime     {duration(info['uptime_s'])}")
    running = f"{info['instances_running']}/{info['instances']}"
    out(f"  engines    {info['engines']} ({running} instances running)")
    out(f"  memory     {size(info['rss_bytes'])} RSS, {info['cpu_seconds']:.2f}s CPU")
    out(f"  socket     {info['socket']}")
    out(f"  state      {info['state_dir']}")
    out(f"  logs       {info['log_dir']}")
    if info.get("disk_full"):
        out("  disk       full: log, event and history writes are failing (counted)")
    warn(info.get("warnings", []))


@daemon_app.command("reload")
def reload(json: JsonFlag = False) -> None:
    """Re-read config.toml and apply what can change while the daemon runs.

    Says which changed settings need a daemon restart; a file with an error changes nothing.
    """
    result = client().call("daemon.reload")
    if json:
        emit_json(result)
        return
    if not result["changed"]:
        out("config.toml re-read: no setting changed")
        return
    if result["applied"]:
        out(f"applied: {', '.join(result['applied'])}")
    if result["restart_needed"]:
        out(
            f"need a daemon restart: {', '.join(result['restart_needed'])}"
            " (`engctl daemon stop`, then any command)"
        )


@daemon_app.command("run")
def run(
    reset_registry: ResetRegistry = False,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Serve Prometheus /metrics on 127.0.0.1:PORT (overrides metrics_port in"
            " config.toml; 0: off).",
        ),
    ] = None,
) -> None:
    """Run the daemon in the foreground (for systemd or a container); Ctrl-C stops it."""
    sys.stdout.flush()
    argv = [sys.executable, "-m", "engctl.daemon"]
    if metrics_port is not None:
        argv += ["--metrics-port", str(metrics_port)]
    if reset_registry:
        argv.append("--reset-registry")
    # exec keeps the CLI from importing daemon code and gives the daemon the pid systemd sees.
    os.execv(sys.executable, argv)
