"""`engctl demo`: start the daemon, register the bundled example engines, show their status."""

from __future__ import annotations

import sys
import time
from typing import Annotated

import typer

from engctl.cli.app import app
from engctl.cli.common import client, console, out


def demo_engines() -> dict[str, dict[str, object]]:
    """The example engines, run by this Python (so they work in any venv)."""
    py = sys.executable
    return {
        "demo-echo": {
            "type": "echo",
            "mode": "worker",
            "command": [py, "-m", "engctl.examples.echo_worker"],
            "instances": 2,
            "capabilities": ["json"],
            "restart": {"start_seconds": 0.5},
        },
        "demo-web": {
            "type": "http",
            "mode": "service",
            "command": [py, "-u", "-m", "http.server", "0", "--bind", "127.0.0.1"],
            "restart": {"start_seconds": 0.5},
            "stop": {"timeout": 5.0},
        },
        "demo-clock": {
            "type": "clock",
            "mode": "service",
            "command": [py, "-m", "engctl.examples.clock_service"],
            "depends_on": ["demo-web"],
            "restart": {"start_seconds": 0.5, "policy": "always"},
        },
    }


@app.command()
def demo(
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the engines to be ready.")
    ] = 20.0,
) -> None:
    """Register the bundled example engines (echo worker, web service, clock) and show status."""
    c = client()
    result = c.register(demo_engines())
    for r in result["engines"]:
        out(f"{r['action']:9} {r['name']}")
    names = list(demo_engines())
    deadline = time.monotonic() + timeout
    st = c.status(names)
    while time.monotonic() < deadline:
        st = c.status(names)
        states = [i["state"] for e in st["engines"] for i in e["instances"]]
        if states and all(s in ("ready", "busy", "fatal", "exited") for s in states):
            break
        time.sleep(0.1)
    from engctl.render.tables import status_table

    console().print(status_table(st))
    out("")
    out("skipped: wasm and onnx example engines (they arrive with `engctl exec`)")
    out("next:    engctl logs demo-clock -f    engctl events -f    engctl stop demo-web")
    out("         engctl export > engines.toml  engctl unregister demo-echo demo-web demo-clock")
