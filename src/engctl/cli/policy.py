"""`engctl policy show`: the effective health-check, restart and failure-policy settings of
each engine, and where each value comes from."""

from __future__ import annotations

from typing import Annotated

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, console, emit_json, out

policy_app = typer.Typer(
    help="Failure policies: the settings in effect for each engine.", no_args_is_help=True
)
app.add_typer(policy_app, name="policy")


@policy_app.command("show")
def show(
    names: Annotated[list[str] | None, typer.Argument(help="Engines (default: all).")] = None,
    json: JsonFlag = False,
) -> None:
    r"""Show each engine's effective policy: every setting, its value and where it comes from.

    FROM: `default` (built in), `daemon` (\[daemon.policy] in config.toml) or `engine`.

    `engine` is the engine's own spec: \[engines.NAME.policy], .health, .restart, .limits.

    Oneshot engines have no long-running instances: no health check or policy acts on them.
    """
    result = client().call("policy.show", names=names or None)
    if json:
        emit_json(result)
        return
    engines = result["engines"]
    if not engines:
        out("no engines registered (try `engctl register` or `engctl demo`)")
        return
    from rich.text import Text

    from engctl.render.tables import policy_table

    con = console()
    for n, engine in enumerate(engines):
        if n:
            out("")
        head = Text(engine["name"], style="bold")
        head.append(f"  {engine['mode']}, type {engine['type']}")
        if not engine.get("applies", True):
            head.append(
                ": no instances, so no health check or policy acts on it"
                " (`--json` shows the values anyway)",
                style="dim",
            )
            con.print(head)
            continue
        con.print(head)
        con.print(policy_table(engine))
