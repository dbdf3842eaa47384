"""`engctl status`: every instance's state, health, uptime, restarts, CPU, RSS and last exit."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, console, out
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
    """Show engines and their instances (table, or --json)."""
    if json:
        status_json(names or [])
        return
    c = client()
    result = c.status(names or None)
    from engctl.render.tables import status_table

    if not watch:
        if not result["engines"]:
            out("no engines registered (try `engctl register` or `engctl demo`)")
            return
        console().print(status_table(result))
        return
    from rich.live import Live

    with Live(status_table(result), console=console(), auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(status_table(c.status(names or None)), refresh=True)
        except KeyboardInterrupt:
            pass
