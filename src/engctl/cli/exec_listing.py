"""Lists `exec` in `engctl --help`. The command itself is `engctl.cli.exec` (argparse, run
without typer by `engctl.cli.fast`); this entry only forwards to it."""

from __future__ import annotations

import typer

from engctl.cli.app import app


@app.command(
    "exec",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
def exec_(ctx: typer.Context) -> None:
    """Send a request to the best engine instance (`engctl exec --help` for its options)."""
    from engctl.cli.exec import main as exec_main

    raise typer.Exit(exec_main(list(ctx.args)))
