"""`engctl start|stop|restart|scale|prewarm`: act on engines (NAME) or single instances
(NAME#K)."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, emit_json, out

Targets = Annotated[list[str], typer.Argument(help="Engines (NAME) or instances (NAME#K).")]


def _report(json: bool, result: dict[str, object], key: str, verb: str) -> None:
    if json:
        emit_json(result)
        return
    ids = result.get(key) or []
    assert isinstance(ids, list)
    out(f"{verb}: {', '.join(map(str, ids))}" if ids else f"nothing to do (already {verb})")


@app.command()
def start(targets: Targets, json: JsonFlag = False) -> None:
    """Start engines or instances (dependencies first)."""
    _report(json, client(autostart=True).start(targets), "started", "started")


@app.command()
def stop(
    targets: Targets,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return at once instead of waiting for the exit.")
    ] = False,
    no_dependents: Annotated[
        bool,
        typer.Option(
            "--no-dependents",
            help="Refuse (exit 2, naming them) when running engines depend on one to stop.",
        ),
    ] = False,
    json: JsonFlag = False,
) -> None:
    """Stop engines or instances with their stop signal, then SIGKILL after the stop timeout.

    What depends on a stopped engine (depends_on, directly or not) stops first, as systemd
    does; --no-dependents refuses instead.
    """
    result = client(autostart=True).stop(targets, wait=not no_wait, no_dependents=no_dependents)
    dependents = result.get("dependents") or []
    if json or not dependents:
        _report(json, result, "stopped", "stopped")
        return
    engines = ", ".join(t for t in targets if "#" not in t)
    verb = "depends" if len(dependents) == 1 else "depend"
    out(
        f"stopped: {', '.join(result['stopped'])}"
        f" ({', '.join(dependents)} {verb} on {engines}: stopped first)"
    )


@app.command()
def restart(targets: Targets, json: JsonFlag = False) -> None:
    """Stop, then start engines or instances; each running instance drains first (takes no new
    request and finishes those in flight, up to its stop timeout), so none is lost."""
    _report(json, client(autostart=True).restart(targets), "restarted", "restarted")


@app.command()
def scale(
    name: Annotated[str, typer.Argument(help="Engine name.")],
    instances: Annotated[int, typer.Argument(min=0, max=1000, help="Wanted number of instances.")],
    json: JsonFlag = False,
) -> None:
    r"""Set an engine's number of instances (the highest indices drain, then stop).

    An autoscaled engine (\[engines.NAME.scale]) gets its scale.min set instead: its count then
    follows demand between that and scale.max (the command says so).
    """
    result = client(autostart=True).scale(name, instances)
    if json:
        emit_json(result)
    else:
        out(f"{name}: {result['detail']}")


@app.command()
def prewarm(
    name: Annotated[str, typer.Argument(help="Engine name (an autoscaled one).")],
    instances: Annotated[
        int, typer.Argument(min=0, max=1000, help="The floor: instances kept up (0 ends it).")
    ],
    for_: Annotated[
        str | None,
        typer.Option("--for", help="How long, e.g. 90s, 10m, 1h (default: until changed)."),
    ] = None,
    json: JsonFlag = False,
) -> None:
    """Raise an autoscaled engine's floor to INSTANCES (started now), for a while.

    When the time passes (an event at both ends), idle instances go after idle_timeout.
    """
    from engctl.timespec import parse_duration

    seconds = None if for_ is None else parse_duration(for_, "--for")
    result = client(autostart=True).prewarm(name, instances, seconds)
    if json:
        emit_json(result)
        return
    if not instances:
        out(f"{name}: prewarm ended")
        return
    until = result.get("until")
    when = "" if until is None else f" until {time.strftime('%H:%M:%S', time.localtime(until))}"
    out(f"{name}: floor raised to {instances} instances{when}")
