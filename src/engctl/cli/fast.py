"""Typer-free paths for what scripts call in loops: `--version`, `exec` and plain
`status --json`.

Importing and building the typer app costs more than everything else `status --json` does
(~45 ms on a 2-core machine). These paths run the same code as the typer commands (`status`
calls `status_json` too); any other form (another flag, --help, a typo) goes through typer.
Imports neither typer nor rich.
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


def fast_command(args: list[str]) -> Callable[[], int] | None:
    """The typer-free implementation of `args`, when it is one of the plain forms."""
    import os

    if "_ENGCTL_COMPLETE" in os.environ:  # a shell's Tab: see engctl.cli.complete
        from engctl.cli.complete import main as complete_main

        return lambda: complete_main(args)
    if args in (["--version"], ["-V"]):
        return print_version
    if args[:1] == ["exec"]:
        from engctl.cli.exec import main as exec_main

        return lambda: exec_main(args[1:])
    if args[:1] == ["status"] and "--json" in args:
        rest = [a for a in args[1:] if a != "--json"]
        if all(not a.startswith("-") for a in rest):
            return lambda: status_json(rest)
    return None
