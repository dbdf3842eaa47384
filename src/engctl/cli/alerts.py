"""`engctl alerts` (pending and firing alerts) and `engctl hooks list|test` (the event hooks):
read from the daemon, rendered as plain lines or `--json`."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, emit_json, out


def _ago(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    seconds = max(0.0, time.time() - epoch)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def _figure(value: Any) -> str:
    return "-" if value is None else f"{value:g}"


@app.command("alerts")
def alerts(json: JsonFlag = False) -> None:
    r"""Show pending and firing alerts: rule, state, where, value against threshold, since when.

    Rules are \[alerts.NAME] tables of config.toml, plus the built-in `cpu` and `memory` rules
    (docs/admission.md#alerts).
    """
    result = client().call("alerts.list")
    if json:
        emit_json(result)
        return
    items = result["alerts"]
    if not items:
        out(f"no alerts pending or firing ({len(result['rules'])} rules)")
        return
    for a in items:
        where = ", ".join(f"{k}={v}" for k, v in a["labels"].items()) or "host"
        since = _ago(a["fired_at"] if a["state"] == "firing" else a["since"])
        out(
            f"{a['state']:<8} {a['severity']:<8} {a['name']}  {where}  value"
            f" {_figure(a['value'])} threshold {_figure(a['threshold'])}  since {since}"
        )


hooks_app = typer.Typer(help="Event hooks: list them, or fire a test event.", no_args_is_help=True)
app.add_typer(hooks_app, name="hooks")


@hooks_app.command("list")
def hooks_list(json: JsonFlag = False) -> None:
    r"""List the hooks (\[hooks.NAME] in config.toml) with their queues and counters."""
    result = client().call("hooks.list")
    if json:
        emit_json(result)
        return
    if not result["hooks"]:
        out("no hooks configured (see [hooks.NAME] in docs/admission.md#hooks)")
        return
    for h in result["hooks"]:
        target = h["url"] or " ".join(h["command"] or [])
        out(
            f"{h['name']}  on {','.join(h['on'])}  -> {target}  delivered {h['delivered']}"
            f" failed {h['failed']} dropped {h['dropped']} queued {h['queued']}"
        )


@hooks_app.command("test")
def hooks_test(
    name: Annotated[str, typer.Argument(help=r"The hook (\[hooks.NAME]).")],
    json: JsonFlag = False,
) -> None:
    """Fire a synthetic event through a hook now and show what happened.

    Exit code 1 when the delivery failed (the hook's exit code, HTTP status or error shown).
    """
    result = client().call("hooks.test", name=name)
    if json:
        emit_json(result)
    else:
        how = f"{result['attempts']} attempt(s), {result['duration_ms']:.0f} ms"
        state = "delivered" if result["ok"] else "FAILED"
        if result["skipped"]:
            state = "skipped"
        out(f"hook {name}: {state} {result['event']['kind']} ({how})")
        if result["status"] is not None:
            out(f"  HTTP status {result['status']}")
        if result["exit_code"] is not None:
            out(f"  exit code {result['exit_code']}")
        if result["error"]:
            out(f"  error: {result['error']}")
        if result["output"]:
            out("  output: " + result["output"].rstrip("\n").replace("\n", "\n          "))
    if not result["ok"]:
        raise typer.Exit(1)
