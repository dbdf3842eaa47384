"""`engctl status`: every instance's state, health, eligibility, uptime, restarts, CPU, RSS,
last exit and, when it is not simply active, why."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, console, out, warn
from engctl.cli.fast import status_json


@app.command()
def status(
    names: Annotated[list[str] | None, typer.Argument(help="Engines (default: all).")] = None,
    json: JsonFlag = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh in place until Ctrl-C.")
    ] = False,
    interval: Annotated[float, typer.Option(min=0.1, help="Refresh period for --watch.")] = 1.0,
) -> None:
    """Show engines and their instances (table, or --json).

    HEALTH: healthy, degraded, unhealthy, recovering or unknown (what the probes say).

    ELIGIBILITY (may dispatch pick it?): active, downweighted W, isolated Ns left, draining.

    REASON (or lines under a narrow table): why an instance is not simply active.
    """
    if json:
        status_json(names or [])
        return
    c = client()
    result = c.status(names or None)
    warn(c.daemon_info.get("warnings", []))
    from engctl.render.tables import status_view

    con = console()
    if not watch:
        if not result["engines"]:
            out("no engines registered (try `engctl register` or `engctl demo`)")
            return
        con.print(status_view(result, con.width))
        return
    from rich.live import Live

    with Live(status_view(result, con.width), console=con, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(status_view(c.status(names or None), con.width), refresh=True)
        except KeyboardInterrupt:
            pass
