"""`engctl --help` without typer (issue 13.5): the generated table is current, and the text
written from it is typer's own, escape codes included, at every width it is used for.

Both run in a fresh interpreter: the typer app lists its commands in the order their modules
were imported, which other tests change (as `engctl --help` never does)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from engctl.cli import help as fast_help
from engctl.render.styled import COLOR, NO_COLOR
from tests.conftest import PY

# typer's own root help at each width, written as to a terminal with colours (COLOR), one
# with NO_COLOR set, or a file (None), next to `help_text`'s: the widths where they differ.
_COMPARE = """
import io, json, sys
import typer.main
import typer.rich_utils as ru
from rich.console import ColorSystem
from engctl.cli.app import app, load_commands
from engctl.cli.help import help_text

escapes, widths = json.loads(sys.argv[1])
load_commands([])
command = typer.main.get_command(app)
real = ru._get_rich_console

def typers(width):
    out = io.StringIO()
    def console(stderr=False):
        con = real(stderr)  # typer's console (theme, highlighter), sized and aimed here
        con.file = out
        con._width = width
        con._force_terminal = escapes is not None
        con._color_system = ColorSystem.STANDARD if escapes else None
        con.no_color = escapes == "no_color"
        return con
    ru._get_rich_console = console
    ctx = command.make_context("engctl", [], resilient_parsing=True)
    ru.rich_format_help(obj=command, ctx=ctx, markup_mode="rich")
    return out.getvalue() + "\\n"  # click echoes the empty string typer's help returns

print(json.dumps([w for w in widths if help_text(w, escapes) != typers(w)]))
"""


def _fresh(script: str, *args: str) -> str:
    r = subprocess.run(
        [PY, "-c", script, *args], capture_output=True, text=True, timeout=120, check=True
    )
    return r.stdout


def test_the_help_table_is_current() -> None:
    """help_table.py is what `python -m engctl.cli.help` generates from the typer app now:
    a new command or a changed help text shows once the table is regenerated."""
    path = Path(fast_help.__file__).with_name("help_table.py")
    generated = _fresh("from engctl.cli.help import render_table; print(render_table(), end='')")
    assert path.read_text() == generated, "regenerate: python -m engctl.cli.help"


@pytest.mark.parametrize("escapes", [None, COLOR, NO_COLOR])
def test_help_text_is_typers_at_every_width(escapes: str | None) -> None:
    """From MIN_WIDTH to 240 columns, and far wider, the text is typer's byte for byte."""
    widths = [*range(fast_help.MIN_WIDTH, 241), 333, 1000]
    differ = json.loads(_fresh(_COMPARE, json.dumps([escapes, widths])))
    assert not differ, f"differs from typer's at widths {differ}"
