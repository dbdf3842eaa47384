"""Typer-free paths for what scripts call in loops and people type most: `--version`,
`--help`, `exec`, plain `status --json` and the plain `status` table.

Importing and building the typer app costs more than everything else `status --json` does
(~45 ms on a 2-core machine). These paths run the same code as the typer commands (`status`
calls `status_json` too); any other form (another flag, --help, a typo) goes through typer.
Imports neither typer nor rich (the table falls back on rich where its text would differ).
"""

from __future__ import annotations

import sys
from collections.abc import Callable


def print_version() -> int:
    from engctl import __version__

    sys.stdout.write(f"engctl {__version__}\n")
    return 0


def status_json(names: list[str], type: str | None = None, labels: list[str] | None = None) -> int:
    """`engctl status --json [NAMES] [--type T] [--label K=V]…`: the status document."""
    from engctl.client import Client

    params = {"names": names or None, "type": type, "labels": labels or None}
    with Client(autostart=False) as c:
        if not sys.stdout.isatty():
            # Compact JSON for a program: the daemon's text as it came, not decoded and
            # encoded again (at 200 instances that was most of the command's own work).
            raw = c.call_raw("status.get", **params)
            sys.stdout.flush()
            sys.stdout.buffer.write(raw + b"\n")
            return 0
        from engctl.render.format import print_json

        print_json(c.call("status.get", **params))
    return 0


NO_ENGINES = "no engines registered (try `engctl register` or `engctl demo`)"


def status_table(names: list[str]) -> int:
    """`engctl status [NAMES]`: the table, as the typer command prints it (rich's text,
    written by `render.status` unless rich must lay it out)."""
    from engctl.client import Client

    with Client(autostart=False) as c:
        result = c.call("status.get", names=names or None, type=None, labels=None)
        warnings = c.daemon_info.get("warnings", [])
    for line in warnings:
        sys.stderr.write(f"engctl: warning: {line}\n")
    if not result["engines"]:
        sys.stdout.write(("no engine matches" if names else NO_ENGINES) + "\n")
        return 0
    from engctl.cli.terminal import stdout_style
    from engctl.render.status import status_text

    style = stdout_style()
    text = None if style is None else status_text(result, *style)
    if text is not None:
        sys.stdout.write(text)
        return 0
    from engctl.cli.terminal import console
    from engctl.render.tables import status_view

    con = console()
    con.print(status_view(result, con.width))
    return 0


def _write(text: str) -> int:
    sys.stdout.write(text)
    return 0


def fast_command(args: list[str]) -> Callable[[], int] | None:
    """The typer-free implementation of `args`, when it is one of the plain forms."""
    import os

    if "_ENGCTL_COMPLETE" in os.environ:  # a shell's Tab: see engctl.cli.complete
        from engctl.cli.complete import main as complete_main

        return lambda: complete_main(args)
    if args in (["--version"], ["-V"]):
        return print_version
    if args in ([], ["--help"], ["-h"]):
        from engctl.cli.help import root_help

        text = root_help()
        if text is not None:
            return lambda: _write(text)
    if args[:1] == ["exec"]:
        from engctl.cli.exec import main as exec_main

        return lambda: exec_main(args[1:])
    if args[:1] == ["status"]:
        rest = [a for a in args[1:] if a != "--json"]
        if all(not a.startswith("-") for a in rest):
            return (lambda: status_json(rest)) if "--json" in args else lambda: status_table(rest)
    return None
