"""`engctl --help` without typer (issue 13.5): the generated table is current, and the text
written from it is typer's own, escape codes included, at every width it is used for."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import typer.main
import typer.rich_utils as ru
from rich.console import ColorSystem

from engctl.cli import help as fast_help
from engctl.cli.app import app, load_commands
from engctl.render.styled import COLOR, NO_COLOR

TyperHelp = Callable[[int, str | None], str]


@pytest.fixture(scope="module")
def typer_help() -> Iterator[TyperHelp]:
    """typer's own root help at a given width, written as to a terminal with colours
    (COLOR), one with NO_COLOR set, or a file (None)."""
    load_commands([])
    command = typer.main.get_command(app)
    real = ru._get_rich_console

    def render(width: int, escapes: str | None) -> str:
        out = io.StringIO()

        def console(stderr: bool = False) -> object:
            con = real(stderr)  # typer's console (theme, highlighter), sized and aimed here
            con.file = out
            con._width = width
            con._force_terminal = escapes is not None
            con._color_system = ColorSystem.STANDARD if escapes else None
            con.no_color = escapes == NO_COLOR
            return con

        ru._get_rich_console = console  # type: ignore[assignment]
        try:
            ctx = command.make_context("engctl", [], resilient_parsing=True)
            ru.rich_format_help(obj=command, ctx=ctx, markup_mode="rich")
        finally:
            ru._get_rich_console = real
        return out.getvalue() + "\n"  # click echoes the empty string typer's help returns

    yield render


def test_the_help_table_is_current() -> None:
    """help_table.py is what `python -m engctl.cli.help` generates from the typer app now:
    a new command or a changed help text shows once the table is regenerated."""
    path = Path(fast_help.__file__).with_name("help_table.py")
    assert path.read_text() == fast_help.render_table(), "regenerate: python -m engctl.cli.help"


@pytest.mark.parametrize("escapes", [None, COLOR, NO_COLOR])
def test_help_text_is_typers_at_every_width(typer_help: TyperHelp, escapes: str | None) -> None:
    """From MIN_WIDTH to 240 columns, and far wider, the text is typer's byte for byte."""
    widths = [*range(fast_help.MIN_WIDTH, 241), 333, 1000]
    differ = [w for w in widths if fast_help.help_text(w, escapes) != typer_help(w, escapes)]
    assert not differ, f"differs from typer's at widths {differ}"
