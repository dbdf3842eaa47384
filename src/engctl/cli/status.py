"""`engctl status`: every instance's state, health, eligibility, uptime, restarts, CPU, RSS,
last exit and, when it is not simply active, why."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, console, finite, out, warn
from engctl.cli.fast import NO_ENGINES as NO_ENGINES  # `list` says it too
from engctl.cli.fast import status_json

if TYPE_CHECKING:
    from engctl.documents import StatusDoc

TypeOpt = Annotated[str | None, typer.Option("--type", help="Only engines of this type.")]
LabelOpt = Annotated[
    list[str],
    typer.Option("--label", help="Only engines with this label, KEY=VALUE (repeatable: all)."),
]


@app.command()
def status(
    names: Annotated[list[str] | None, typer.Argument(help="Engines (default: all).")] = None,
    type_: TypeOpt = None,
    label: LabelOpt = [],  # noqa: B006
    json: JsonFlag = False,
    watch: Annotated[
        bool,
        typer.Option("--watch", "-w", help="Refresh in place until Ctrl-C (--json: NDJSON)."),
    ] = False,
    interval: Annotated[
        float, typer.Option(min=0.1, help="Refresh period for --watch.", callback=finite)
    ] = 1.0,
) -> None:
    """Show engines and their instances (table, or --json).

    HEALTH: healthy, degraded, unhealthy, recovering or unknown (what the probes say).

    ELIGIBILITY (may dispatch pick it?): active, downweighted W, isolated Ns left, draining,
    unavailable (no process that takes requests: stopped, starting, fatal, …).

    REASON (or lines under a narrow table): why an instance is not simply active.
    """
    labels = _labels(label)
    if json and not watch:
        status_json(names or [], type_, labels)
        return
    c = client()

    def fetch() -> StatusDoc:
        result: StatusDoc = c.call(
            "status.get", names=names or None, type=type_, labels=labels or None
        )
        return result

    if json:
        _watch_json(fetch, interval)
        return
    from engctl.render.tables import status_view

    result = fetch()
    warn(c.daemon_info.get("warnings", []))
    con = console()
    if not watch:
        if not result["engines"]:
            filtered = names or type_ or labels
            out("no engine matches" if filtered else NO_ENGINES)
            return
        con.print(status_view(result, con.width))
        return
    from rich.live import Live

    with Live(status_view(result, con.width), console=con, auto_refresh=False) as live:
        try:
            while True:
                time.sleep(interval)
                live.update(status_view(fetch(), con.width), refresh=True)
        except KeyboardInterrupt:
            pass


def _labels(values: list[str]) -> list[str]:
    """`--label` values, checked here: a malformed one starts no daemon."""
    from engctl.errors import UsageError

    for text in values:
        key, sep, _ = text.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--label expects KEY=VALUE, got {text!r}")
    return values


def _watch_json(fetch: Callable[[], StatusDoc], interval: float) -> None:
    """`status --watch --json`: one compact status document per line and refresh (NDJSON)."""
    import json as jsonlib

    try:
        while True:
            sys.stdout.write(jsonlib.dumps(fetch(), separators=(",", ":")) + "\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
