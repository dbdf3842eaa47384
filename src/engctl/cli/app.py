"""The typer application: global options and the command groups, registered from their modules."""

from __future__ import annotations

from typing import Annotated

import typer

from engctl import __version__

app = typer.Typer(
    name="engctl",
    help="Supervise execution engines, dispatch requests to them, report how they do.",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"engctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """engctl: a local engine manager.

    Set ENGCTL_HOME to keep the socket, state and logs in one folder.
    """


from engctl.cli import (  # noqa: E402  (commands register themselves on `app`)
    daemon,
    demo,
    engines,
    lifecycle,
    logs,
    misc,
    status,
)

__all__ = ["app", "daemon", "demo", "engines", "lifecycle", "logs", "misc", "status"]
