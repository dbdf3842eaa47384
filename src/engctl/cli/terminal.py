"""The console the CLI prints to: rich's Console for stdout or stderr (`console`), and what
that Console would decide about stdout (its width, whether and how it writes escape codes),
decided here without importing rich (`stdout_style`) for the commands that print without it.

Imports rich only inside `console()`; no typer.
"""

from __future__ import annotations

import os
import sys

from engctl.render.styled import COLOR, NO_COLOR

TYPE_CHECKING = False  # typing is not imported at run time: it is on every CLI start
if TYPE_CHECKING:
    from rich.console import Console

# Width of tables written to a pipe or a file: rich would assume 80 columns and squeeze or
# fold them; a reader such as grep wants one whole line per row.
PIPE_WIDTH = 1000

# Variables with which rich decides what this module does not model: they send a command
# back to rich (a forced terminal, a declared terminal kind).
_RICH_DECIDES = ("FORCE_COLOR", "TTY_COMPATIBLE")


def console(stderr: bool = False) -> Console:
    """The rich Console the commands print with: no highlighting, no soft wrap, and
    PIPE_WIDTH columns when writing to a pipe or a file (unless COLUMNS says otherwise)."""
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and not os.environ.get("COLUMNS")
    return Console(
        stderr=stderr, highlight=False, soft_wrap=False, width=PIPE_WIDTH if piped else None
    )


def stdout_style(pipe_width: int | None = PIPE_WIDTH) -> tuple[int, str | None] | None:
    """(width, escapes) as rich's Console decides them for stdout: `console()`'s when
    `pipe_width` is PIPE_WIDTH, a default Console's (typer's) when it is None. None when the
    environment asks for what only rich should decide (see _RICH_DECIDES, a dumb terminal,
    an output encoding other than UTF-8)."""
    env = os.environ
    if sys.platform == "win32" or any(name in env for name in _RICH_DECIDES):
        return None
    if not (getattr(sys.stdout, "encoding", None) or "utf-8").lower().startswith("utf"):
        return None  # rich would draw ASCII boxes
    tty = sys.stdout.isatty()
    columns = env.get("COLUMNS")
    if not tty and not columns and pipe_width is not None:
        return pipe_width, None
    if tty and env.get("TERM", "").lower() in ("dumb", "unknown"):
        return None
    width = int(columns) if columns and columns.isdigit() else _terminal_width()
    if width < 1:
        return None
    if not tty:
        return width, None
    return width, NO_COLOR if env.get("NO_COLOR") else COLOR


def _terminal_width() -> int:
    """The first of stdin, stdout and stderr that is a terminal says how wide (rich's order)."""
    for fd in (0, 1, 2):
        try:
            return os.get_terminal_size(fd).columns or 80
        except (AttributeError, ValueError, OSError):
            continue
    return 80
