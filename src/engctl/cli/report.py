"""`engctl report` (a period's figures, policy actions, suggestions) and `engctl metrics`
(the Prometheus text exposition)."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, console, emit_json


@app.command()
def report(
    since: Annotated[
        str,
        typer.Option(
            "--since",
            "-s",
            help="Start of the period: a duration ago (90s, 10m, 1h, 7d) or a local date/time"
            " (2026-11-22T10:00).",
        ),
    ] = "1h",
    engine: Annotated[str | None, typer.Option("--engine", "-e", help="Only this engine.")] = None,
    json: JsonFlag = False,
) -> None:
    """What happened in a period: figures, worst instances, policy actions, suggestions.

    Per engine and instance figures, the worst instances by error rate and p99, every policy
    action with its reason, and suggestions that carry the numbers behind them.

    Reads the history database directly (the daemon need not run); when the daemon runs, the
    bucket being filled is written first, so the report reaches up to now.
    """
    from engctl.errors import DaemonNotRunningError, EngineNotFoundError
    from engctl.paths import resolve_paths
    from engctl.report import make_report, parse_since

    now = time.time()
    start = parse_since(since, now)
    paths = resolve_paths()
    try:
        c = client(autostart=False)
    except DaemonNotRunningError:
        pass
    else:
        with c:
            if engine is not None:
                known = [e["name"] for e in c.call("engine.list").get("engines", [])]
                if engine not in known:
                    raise EngineNotFoundError(
                        f"unknown engine {engine!r} (known: {', '.join(sorted(known)) or 'none'})"
                    )
            c.call("metrics.flush")
    from engctl import trust

    trust.check_folders(paths.roots(), str(paths.state_dir))
    result = make_report(paths.history_db, paths.events_db, start, time.time(), engine)
    if json:
        emit_json(result)
        return
    from engctl.render.report import report_view

    console().print(report_view(result))


@app.command()
def metrics(json: JsonFlag = False) -> None:
    r"""Print the Prometheus text exposition of every engine, instance and host figure.

    The daemon can also serve it: `engctl daemon run --metrics-port 9464`, or
    `metrics_port = 9464` under \[daemon] in config.toml (127.0.0.1 only; off by default).
    --json prints the same families parsed (by prometheus-client's own parser).
    """
    c = client()
    with c:
        text: Any = c.call("metrics.get")["text"]
    if not json:
        sys.stdout.write(text)
        return
    from prometheus_client.parser import text_string_to_metric_families

    emit_json(
        {
            "families": [
                {
                    "name": f.name,
                    "type": f.type,
                    "help": f.documentation,
                    "samples": [
                        {"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples
                    ],
                }
                for f in text_string_to_metric_families(text)
            ]
        }
    )
