"""Helpers shared by the command modules: options, the client, output. Import-light."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

# The Console lives with the typer-free terminal code; the commands find it here.
from engctl.cli.terminal import console as console

if TYPE_CHECKING:
    from collections.abc import Callable

    from engctl.client import Client

JsonFlag = Annotated[
    bool, typer.Option("--json", help="Machine-readable output (schema in docs/json.md).")
]


def client(autostart: bool = False) -> Client:
    """A connected client. Only commands that change or run something pass `autostart`: a
    read command never starts a stopped daemon (which would restart the whole fleet)."""
    from engctl.client import Client

    c = Client(autostart=autostart)
    c.connect()
    return c


def out(text: str) -> None:
    sys.stdout.write(text + "\n")


T = TypeVar("T")


def waiting(call: Callable[[], T], goes_on: str) -> T:
    """`call` (a request the daemon carries out whether or not we wait for it); Ctrl-C stops
    only our waiting, and says so and what `goes_on` (exit 130 as any Ctrl-C)."""
    try:
        return call()
    except KeyboardInterrupt:
        sys.stderr.write(f"engctl: interrupted: only the waiting stopped; {goes_on}\n")
        raise


def warn(lines: list[str]) -> None:
    """Warnings the daemon has for the user (an unreadable registry entry, a full disk)."""
    for line in lines:
        sys.stderr.write(f"engctl: warning: {line}\n")


def emit_json(obj: Any) -> None:
    from engctl.render.format import print_json

    print_json(obj)


def finite(value: float | None) -> float | None:
    """Option callback: refuse nan and inf, which float options otherwise accept."""
    from engctl.errors import InvalidParamsError
    from engctl.protocol import number

    if value is None:
        return None
    try:
        return number("the value", value)  # type: ignore[no-any-return]
    except InvalidParamsError as exc:
        raise typer.BadParameter(exc.message.removeprefix("the value ")) from None
