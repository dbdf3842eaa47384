"""`engctl start|stop|restart|scale|prewarm|reload`: act on engines (NAME) or single instances
(NAME#K)."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, console, emit_json, out, waiting
from engctl.errors import RolloutFailedError, UsageError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from engctl.documents import EventDoc

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


@app.command()
def reload(
    target: Annotated[str, typer.Argument(help="An engine (NAME) or one instance (NAME#K).")],
    max_surge: Annotated[
        int | None,
        typer.Option(
            "--max-surge",
            min=0,
            help="New processes at once beyond the instance count (default: the engine's"
            " rollout.max_surge, 1).",
        ),
    ] = None,
    max_unavailable: Annotated[
        int | None,
        typer.Option(
            "--max-unavailable",
            min=0,
            help="Instances that may be out of service at once (default: the engine's"
            " rollout.max_unavailable, 0).",
        ),
    ] = None,
    timeout: Annotated[
        str | None,
        typer.Option(help="Stop it (failed) if not done after this long, e.g. 90s, 10m."),
    ] = None,
    recreate: Annotated[
        bool,
        typer.Option("--recreate", help="Replace every instance at once (drain, stop, start)."),
    ] = False,
    no_wait: Annotated[
        bool,
        typer.Option("--no-wait", help="Return once it started (follow it in `status`, `events`)."),
    ] = False,
    json: JsonFlag = False,
) -> None:
    """Replace the processes with new ones of the engine's spec, one slot after another: start
    a new one, wait until it is ready (and passes its health check), put it into dispatch,
    drain the old one. No request is lost. A new process that fails to start stops the
    rollout (exit 1, with the reason) and the old ones keep serving; a later reload goes on.
    """
    if max_surge == 0 and max_unavailable == 0 and not recreate:
        raise UsageError(
            "--max-surge 0 --max-unavailable 0: no instance could ever be replaced (allow a"
            " surge process, or one instance down at a time)"
        )
    from engctl.timespec import parse_duration

    # One duration syntax with `--ttl`, `--for` and `kubectl rollout status --timeout`.
    seconds = None if timeout is None else parse_duration(timeout, "--timeout")
    progress = None if json or no_wait or not sys.stdout.isatty() else _progress_line()
    c = client(autostart=True)
    name = target.split("#", 1)[0]
    try:
        # The rollout is the daemon's, as a Deployment's is Kubernetes' (Ctrl-C of `kubectl
        # rollout status` stops only the watching): it goes on.
        doc: Mapping[str, Any] = waiting(
            lambda: c.reload(
                target,
                max_surge=max_surge,
                max_unavailable=max_unavailable,
                timeout=seconds,
                recreate=recreate,
                wait=not no_wait,
                progress=progress,
            ),
            f"the rollout of {name} (if it started) goes on in the daemon: `engctl status"
            f" {name}` shows it",
        )
    except RolloutFailedError as exc:
        if json and exc.data:
            emit_json(exc.data)
        raise
    if json:
        emit_json(doc)
    elif no_wait:
        out(f"{doc['engine']}: rollout of generation {doc['generation']} started")
    elif not doc["steps"] and doc["reason"]:
        out(f"{doc['engine']}: nothing to replace: {doc['reason']}")
    else:
        out(
            f"{doc['engine']}: generation {doc['generation']} rolled out:"
            f" {len(doc['replaced'])} replaced in {doc['duration_s']:.1f}s"
        )


def _progress_line() -> Callable[[EventDoc], None]:
    """A line on the terminal for each step of the rollout (its events)."""
    from rich.text import Text

    con = console()

    def show(ev: EventDoc) -> None:
        data = ev.get("data") or {}
        kind = ev.get("kind")
        if kind == "engine.rollout_started":
            con.print(Text.assemble((str(ev["engine"]), "bold"), f": {ev['reason']}"))
        elif kind == "instance.replaced":
            what = ev["reason"].split(" (step")[0]
            step = f"  [{data.get('step')}/{data.get('total')}] "
            con.print(Text.assemble(step, (str(ev["instance"]), "green"), f" {what}"))

    return show
