"""`engctl logs` and `engctl events`: past lines or records, and live following with -f."""

from __future__ import annotations

import json as jsonlib
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Any

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, emit_json, out
from engctl.errors import DaemonNotRunningError

if TYPE_CHECKING:
    from engctl.documents import EventDoc

Follow = Annotated[bool, typer.Option("--follow", "-f", help="Keep printing as it happens.")]


def _line(obj: Mapping[str, Any]) -> None:
    sys.stdout.write(jsonlib.dumps(obj) + "\n")
    sys.stdout.flush()


@app.command()
def logs(
    target: Annotated[str, typer.Argument(help="Engine (all its instances) or instance NAME#K.")],
    lines: Annotated[int, typer.Option("--lines", "-n", min=0, help="How many past lines.")] = 50,
    follow: Follow = False,
    json: JsonFlag = False,
) -> None:
    """Print an instance's log (stderr, and stdout of services), each line timestamped.

    With no daemon running, the log files are read directly (-f needs the daemon).
    """
    try:
        c = client()
    except DaemonNotRunningError:
        if follow:
            raise
        c = None
    if not follow:
        result = (
            c.call("logs.read", target=target, lines=lines)
            if c is not None
            else {"lines": _logs_from_files(target, lines)}
        )
        if json:
            emit_json({"lines": [log_record(item) for item in result["lines"]]})
        else:
            many = "#" not in target
            for item in result["lines"]:
                out(f"{item['instance']} | {item['line']}" if many else item["line"])
        return
    many = "#" not in target
    assert c is not None
    first, notes = c.stream("logs.follow", target=target, lines=lines)
    try:
        for item in first["lines"]:
            _print_log(item, many, json)
        for note in notes:
            _print_log(note["params"], many, json)
    except KeyboardInterrupt:
        pass


def log_record(item: dict[str, Any]) -> dict[str, Any]:
    """A log line for `--json`: its UTC time, stream (stdout, stderr or engctl) and text as
    fields, next to the line as written (`line`)."""
    line = str(item["line"])
    stamp, _, rest = line.partition(" ")
    stream, sep, text = rest.partition(": ")
    if not (sep and stamp.endswith("Z") and stream in ("stdout", "stderr", "engctl")):
        stamp, stream, text = "", "", line  # not written by engctl (edited by hand?)
    return {
        "instance": item["instance"],
        "time": stamp or None,
        "stream": stream or None,
        "text": text,
        "line": line,
    }


def _logs_from_files(target: str, lines: int) -> list[dict[str, str]]:
    """What `logs.read` answers, from the log files of a home whose daemon is stopped."""
    from engctl import trust
    from engctl.errors import EngineNotFoundError
    from engctl.homefiles import log_sources, tail_logs
    from engctl.models import parse_instance_ref
    from engctl.paths import resolve_paths

    paths = resolve_paths()
    name, index = parse_instance_ref(target)
    log_dir = str(paths.log_dir)
    trust.check_folders(paths.roots(), log_dir)
    sources = log_sources(paths.log_dir, name, index)
    if not sources:
        raise EngineNotFoundError(
            f"no log files of {target} in {log_dir} (and no daemon is running for"
            f" {paths.where} to ask)"
        )
    return tail_logs(sources, lines)


def _print_log(item: dict[str, Any], many: bool, json: bool) -> None:
    if json:
        _line(log_record(item))
    else:
        sys.stdout.write((f"{item['instance']} | {item['line']}" if many else item["line"]) + "\n")
        sys.stdout.flush()


@app.command()
def events(
    engine: Annotated[str | None, typer.Option("--engine", "-e", help="Only this engine.")] = None,
    lines: Annotated[
        int, typer.Option("--lines", "-n", min=0, help="How many past events (0: none).")
    ] = 50,
    since: Annotated[
        str | None, typer.Option(help="Only events after: 90s, 10m, 2h, 7d, 2w or an ISO time.")
    ] = None,
    follow: Follow = False,
    json: JsonFlag = False,
) -> None:
    """Every state change and action, with its reason (kept across daemon restarts).

    With no daemon running, the event log is read directly (-f needs the daemon).
    """
    from engctl.render.format import event_line
    from engctl.timespec import parse_since

    # The same parser as `report --since`; a usage error starts no daemon.
    since_ts = parse_since(since, time.time()) if since else None
    try:
        c = client()
    except DaemonNotRunningError:
        if follow:
            raise
        _print_events(_events_from_file(engine, since_ts, lines), json)
        return
    notes = None
    if follow:
        # Subscribe (on a connection of its own) before reading the past, so that no event
        # falls between the two; the ones seen twice are skipped by id below.
        _, notes = client().stream("events.follow", engine=engine)
    # -n 0: no past events (with -f: only what happens from now on).
    past = c.events(engine=engine, since=since_ts, limit=lines) if lines else []
    if notes is None:
        _print_events(past, json)
        return
    last_id = past[-1]["id"] if past else 0
    try:
        for ev in past:
            _line(ev) if json else _flush(event_line(ev))
        for note in notes:
            ev = note["params"]
            if ev["id"] <= last_id:
                continue
            _line(ev) if json else _flush(event_line(ev))
    except KeyboardInterrupt:
        pass


def _print_events(past: list[EventDoc], json: bool) -> None:
    from engctl.render.format import event_line

    if json:
        emit_json({"events": past})
    else:
        for ev in past:
            out(event_line(ev))


def _events_from_file(engine: str | None, since: float | None, lines: int) -> list[EventDoc]:
    """What `events.list` answers, from the event log of a home whose daemon is stopped."""
    from engctl import trust
    from engctl.homefiles import read_events
    from engctl.paths import resolve_paths

    paths = resolve_paths()
    trust.check_folders(paths.roots(), str(paths.state_dir))
    return read_events(paths.events_db, engine, since, lines)


def _flush(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
