"""`engctl top`: a live view of every instance (like `pm2 monit` or `htop`)."""

from __future__ import annotations

import contextlib
import os
import select
import sys
import time
from collections.abc import Iterator
from typing import Annotated

import typer

from engctl.cli.app import app
from engctl.cli.common import JsonFlag, client, console, emit_json, finite

SORT_KEYS = ("name", "rps", "p99", "cpu", "rss", "state")


@contextlib.contextmanager
def _keys() -> Iterator[int | None]:
    """Single keys from the terminal without Enter (cbreak mode), restored on exit."""
    if not sys.stdin.isatty():
        yield None
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _read_key(fd: int | None, timeout: float) -> str | None:
    if fd is None:
        time.sleep(timeout)
        return None
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        return None
    data = os.read(fd, 32)
    return data.decode(errors="replace")[:1] if data else "q"


@app.command()
def top(
    interval: Annotated[
        float, typer.Option(min=0.2, help="Refresh period in seconds.", callback=finite)
    ] = 1.0,
    sort: Annotated[
        str, typer.Option(help=f"Sort by: {', '.join(SORT_KEYS)} (keys 1-6 switch it live).")
    ] = "name",
    once: Annotated[
        bool, typer.Option("--once", help="Print one frame and exit (for scripts).")
    ] = False,
    json: JsonFlag = False,
) -> None:
    """Live view of every instance: state, health, eligibility, requests/s, p50/p99, CPU, RSS.

    Sorted and colored by state and health; refreshes in place. Keys: q or Ctrl-C quits,
    1-6 sort by name, rps, p99, cpu, rss, state. --json prints one frame's figures and exits.
    """
    from engctl.errors import UsageError

    if sort not in SORT_KEYS:
        raise UsageError(f"--sort {sort!r}: expected one of {', '.join(SORT_KEYS)}")
    if json:
        from engctl.render.top import top_rows

        with client() as c:
            live = c.call("metrics.live")
            emit_json(
                {
                    "host": live.get("host"),
                    "queue": live.get("queue", {}),
                    "admission": live.get("admission", {}),
                    "instances": top_rows(c.status(), live, sort),
                }
            )
        return
    # Ctrl-C is how a live view is left, even before its first refresh.
    with contextlib.suppress(KeyboardInterrupt):
        _run(interval, sort, once)


def _run(interval: float, sort: str, once: bool) -> None:
    from rich.console import RenderableType
    from rich.live import Live

    from engctl.render.top import top_view

    c = client()
    con = console()

    def frame() -> RenderableType:
        return top_view(c.status(), c.call("metrics.live"), sort, con.width)

    if once:
        con.print(frame())
        return
    with (
        c,
        _keys() as fd,
        Live(frame(), console=con, auto_refresh=False, screen=False, transient=False) as live,
    ):
        while True:
            key = _read_key(fd, interval)
            if key in ("q", "Q", "\x03", "\x1b"):
                break
            if key is not None and key in "123456":
                sort = SORT_KEYS[int(key) - 1]
            live.update(frame(), refresh=True)
