"""`engctl isolate|drain|restore`: manual dispatch overrides on engines (NAME) or instances
(NAME#K). They win over the failure policies until `restore`, and survive a daemon restart."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, emit_json, out

Targets = Annotated[
    list[str], typer.Argument(help="Engines (NAME: all their instances) or instances (NAME#K).")
]
Reason = Annotated[
    str | None,
    typer.Option("--reason", "-r", help="Why: shown by `status` and `events`."),
]


def _report(json: bool, result: dict[str, Any], restored: bool = False) -> None:
    """One line per instance: `onnx#1 isolated (by hand: investigating)`."""
    if json:
        emit_json(result)
        return
    from engctl.render.format import eligibility

    for inst in result["instances"]:
        now = eligibility(inst)
        why = inst.get("eligibility_reason") or ""
        in_flight = (inst.get("requests") or {}).get("in_flight") or 0
        if inst.get("eligibility") == "draining" and in_flight:
            why = f"{why}; {in_flight} in flight" if why else f"{in_flight} in flight"
        line = f"{inst['id']} restored: {now}" if restored else f"{inst['id']} {now}"
        out(f"{line} ({why})" if why else line)


@app.command()
def isolate(targets: Targets, reason: Reason = None, json: JsonFlag = False) -> None:
    """Take instances out of dispatch now (requests in flight still finish).

    Wins over the failure policies until `engctl restore`; survives a daemon restart.
    """
    _report(json, client(autostart=True).call("instance.isolate", targets=targets, reason=reason))


@app.command()
def drain(targets: Targets, reason: Reason = None, json: JsonFlag = False) -> None:
    """Let instances finish the requests in flight and give them no new ones.

    The process keeps running; `engctl stop` it once nothing is left in flight.

    Wins over the failure policies until `engctl restore`; survives a daemon restart.
    """
    _report(json, client(autostart=True).call("instance.drain", targets=targets, reason=reason))


@app.command()
def restore(targets: Targets, reason: Reason = None, json: JsonFlag = False) -> None:
    """Undo `isolate` or `drain` and what the policies decided: back to full weight.

    Clears a manual override, a policy's isolation and a lowered weight at once.

    The policies apply again from now on: an instance still failing its checks goes again.
    """
    result = client(autostart=True).call("instance.restore", targets=targets, reason=reason)
    _report(json, result, True)
