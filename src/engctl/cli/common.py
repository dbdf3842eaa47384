"""Helpers shared by the command modules: options, the client, output. Import-light."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from rich.console import Console

    from engctl.client import Client

JsonFlag = Annotated[
    bool, typer.Option("--json", help="Machine-readable output (schema in the README).")
]


def client(autostart: bool = True) -> Client:
    """A connected client; starts the daemon on first use unless `autostart` is False."""
    from engctl.client import Client

    c = Client(autostart=autostart)
    c.connect()
    return c


def console(stderr: bool = False) -> Console:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, soft_wrap=False)


def out(text: str) -> None:
    sys.stdout.write(text + "\n")


def emit_json(obj: Any) -> None:
    from engctl.render.format import print_json

    print_json(obj)
