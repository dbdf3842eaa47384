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


# Command name -> the module that registers it on `app`. Only the module of the command being
# run is imported, so `engctl status` does not pay for building the other commands.
COMMAND_MODULES = {
    "register": "engines",
    "unregister": "engines",
    "list": "engines",
    "export": "engines",
    "apply": "engines",
    "start": "lifecycle",
    "stop": "lifecycle",
    "restart": "lifecycle",
    "scale": "lifecycle",
    "prewarm": "lifecycle",
    "lease": "lease",
    "isolate": "overrides",
    "drain": "overrides",
    "restore": "overrides",
    "exec": "exec_listing",
    "status": "status",
    "policy": "policy",
    "top": "top",
    "report": "report",
    "alerts": "alerts",
    "hooks": "alerts",
    "metrics": "report",
    "logs": "logs",
    "events": "logs",
    "daemon": "daemon",
    "demo": "demo",
    "completion": "misc",
    "config": "misc",
}


def load_commands(args: list[str]) -> None:
    """Register the command named in `args`, or every command (help, completion, typos)."""
    import importlib

    first = next((a for a in args if not a.startswith("-")), None)
    wanted = (
        {COMMAND_MODULES[first]}
        if first in COMMAND_MODULES and "--help" not in args and "-h" not in args
        else set(COMMAND_MODULES.values())
    )
    # In table order, which is the order `engctl --help` lists them.
    for module in dict.fromkeys(m for m in COMMAND_MODULES.values() if m in wanted):
        importlib.import_module(f"engctl.cli.{module}")
