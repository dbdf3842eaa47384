"""`engctl --help` (`-h`, and `engctl` alone) without typer: the help typer prints, written
from `help_table` (generated from the typer app by `build_table`, run as
`python -m engctl.cli.help`; tests keep it current and pin the text, escape codes included,
to typer's at every width from MIN_WIDTH up).

Through typer, `--help` took ~250 ms on a 2-core machine, nearly all of it importing typer
and rich and building every command; this takes ~25. A subcommand's --help, a narrow
terminal and an environment only typer or rich understand go through typer. Imports neither
typer nor rich at run time.
"""

from __future__ import annotations

import os

from engctl.render import styled

TYPE_CHECKING = False  # typing is not imported at run time: it is on every CLI start
if TYPE_CHECKING:
    from typing import Any

    from engctl.render.styled import Run

# Below this many columns rich squeezes the panels' columns and breaks the usage line: typer's.
MIN_WIDTH = 50

# Variables with which typer decides how its help looks (a forced width or terminal, plain
# click help): with any of them set, typer prints it.
_TYPER_DECIDES = (
    "TERMINAL_WIDTH",
    "GITHUB_ACTIONS",
    "PY_COLORS",
    "_TYPER_FORCE_DISABLE_TERMINAL",
    "TYPER_USE_RICH",
)


def root_help() -> str | None:
    """The text of `engctl --help` for this stdout, or None when typer must print it."""
    if any(name in os.environ for name in _TYPER_DECIDES):
        return None
    from engctl.cli.terminal import stdout_style

    # typer's Console is rich's default: a pipe gets the terminal's width (or 80), not ours.
    style = stdout_style(pipe_width=None)
    if style is None or style[0] < MIN_WIDTH:
        return None
    return help_text(*style)


def help_text(width: int, escapes: str | None) -> str:
    """What typer's rich help prints for the root command at `width` columns."""
    from engctl.cli.help_table import HELP

    lines: list[list[Run]] = []
    # The usage line: Padding(usage, 1), printed in the usage style; the padding's spaces
    # are segments of their own.
    usage, outer = HELP["usage"], HELP["usage_style"]
    used = sum(styled.cell_width(t) for t, _, _ in usage)
    lines.append([_seg(" " * width, outer)])
    lines.append(
        [_seg(" ", outer), *usage, _seg(" " * (width - 2 - used), outer), _seg(" ", outer)]
    )
    lines.append([_seg(" " * width, outer)])
    # The command's help: Padding(Align(text), (0, 1, 1, 1)), unstyled.
    for text_line in styled.wrap(HELP["text"], width - 2):
        used = sum(styled.cell_width(t) for t, _, _ in text_line)
        lines.append([_seg(" ", ""), *text_line, _seg(" " * (width - 1 - used), "")])
    lines.append([_seg(" " * width, "")])
    for panel in HELP["panels"]:
        lines += _panel(panel, width)
    # click echoes the (empty) help string typer's rich help returns: one more newline.
    return "".join(styled.line(line, escapes) + "\n" for line in lines) + "\n"


def _seg(text: str, style: str) -> Run:
    """A segment of its own (never merged with the text next to it)."""
    return (text, style, True)


def _panel(panel: dict[str, Any], width: int) -> list[list[Run]]:
    """A Panel (rounded box, title on the left) around a borderless table whose last column
    takes the rest of the width and wraps; the other columns come ready made (`prefix`, and
    `blank` for the lines a wrapped help adds)."""
    border = panel["border_style"]
    title = f" {panel['title']} "
    edge = width - 4 - styled.cell_width(title)
    lines = [
        [_seg("╭─", border), _seg(title, border), _seg("─" * edge, border), _seg("─╮", border)]
    ]
    help_width = width - 4 - panel["prefix_width"] - 1
    for prefix, blank, help_runs in panel["rows"]:
        for k, help_line in enumerate(styled.wrap(help_runs, help_width)):
            lines.append(
                [
                    _seg("│", border),
                    _seg(" ", ""),
                    *(prefix if k == 0 else blank),
                    _seg(" ", ""),
                    *styled.pad(help_line, help_width, ""),
                    _seg(" ", ""),
                    _seg("│", border),
                ]
            )
    lines.append([_seg("╰" + "─" * (width - 2) + "╯", border)])
    return lines


# -- the table, from the typer app (needs typer and rich) ---------------------------------


class UnsupportedHelpError(Exception):
    """The root help uses something `help_text` does not write: extend it, or let typer."""


def build_table() -> dict[str, Any]:
    """The root help as typer builds it (the renderables its rich help prints), in the
    terms `help_text` writes it with."""
    import typer.main
    import typer.rich_utils as ru

    from engctl.cli.app import app, load_commands

    load_commands([])
    command = typer.main.get_command(app)
    printed: list[tuple[Any, Any]] = []

    class Capture:
        """Stands in for typer's console: keeps what typer prints, as renderables."""

        def print(self, renderable: Any, style: Any = None) -> None:
            printed.append((renderable, style))

    console = ru._get_rich_console()
    real = ru._get_rich_console
    ru._get_rich_console = lambda stderr=False: Capture()  # type: ignore[assignment,return-value]
    try:
        ctx = command.make_context("engctl", [], resilient_parsing=True)
        ru.rich_format_help(obj=command, ctx=ctx, markup_mode=app.rich_markup_mode or "rich")
    finally:
        ru._get_rich_console = real
    return _table_of(printed, console)


def _table_of(printed: list[tuple[Any, Any]], console: Any) -> dict[str, Any]:
    from rich.align import Align
    from rich.columns import Columns
    from rich.padding import Padding
    from rich.panel import Panel
    from rich.style import Style
    from rich.text import Text

    def check(ok: bool, what: str) -> None:
        if not ok:
            raise UnsupportedHelpError(f"the root help has {what}: extend engctl.cli.help")

    (usage, usage_style), (about, about_style), *panels = printed
    check(isinstance(usage, Padding) and isinstance(usage.renderable, Text), "another usage")
    outer = console.get_style(usage_style)
    check(isinstance(about, Padding) and about_style is None, "another help layout")
    check(isinstance(about.renderable, Align), "another help layout")
    texts = list(about.renderable.renderable.renderables)
    check(len(texts) == 1 and isinstance(texts[0], Text), "more than one paragraph")
    check(not texts[0].style, "a styled first paragraph")

    def runs(text: Any, under: Style) -> list[Run]:
        """`text` as rich splits it into segments, each style under `under` (the table's
        cell style or the print style), and whether it is under a span."""
        out: list[Run] = []
        offset = 0
        for seg in text.render(console):
            spanned = any(s.start <= offset < s.end for s in text.spans)
            style = str(under + seg.style) if seg.style or under else ""
            out.append((seg.text, "" if style == "none" else style, spanned))
            offset += len(seg.text)
        for piece, style, _ in out:
            check("\n" not in piece or not style, "a styled line break")
            styled.sgr(style, styled.COLOR)  # a style it does not write raises ValueError
        return out

    table: dict[str, Any] = {
        "usage_style": str(outer),
        "usage": runs(usage.renderable, outer),
        "text": runs(texts[0], Style()),
        "panels": [],
    }
    for panel, style in panels:
        check(isinstance(panel, Panel) and style is None, "something else than panels")
        check(isinstance(panel.title, str), "a panel title that is not plain")
        grid = panel.renderable
        check(grid.box is None and not grid.show_header and not grid.pad_edge, "another table")
        check(grid.padding == (0, 1, 0, 1) and not grid.row_styles, "another table")
        *prefix_columns, help_column = grid.columns
        check(not help_column.style, "a styled help column")
        widths = []
        for k, column in enumerate(prefix_columns):
            cells = [c if isinstance(c, Text) else Text(c) for c in column._cells]
            check(all("\n" not in c.plain for c in cells), "a cell of several lines")
            content = max((styled.cell_width(c.plain) for c in cells), default=0)
            check(column.width is None or column.width >= content, "a column too narrow")
            widths.append((column.width or content, 0 if k == 0 else 1, 1))
        rows = []
        for r in range(grid.row_count):
            prefix: list[Run] = []
            blank: list[Run] = []
            for column, (content, left, right) in zip(prefix_columns, widths, strict=True):
                under = console.get_style(column.style or "")
                cell = column._cells[r]
                cell = cell if isinstance(cell, Text) else Text(cell)
                check(column.justify == "left", "a column not justified left")
                if left:
                    prefix.append(_seg(" " * left, str(under) if under else ""))
                base = str(under + console.get_style(cell.style)) if under or cell.style else ""
                prefix += [r for r in styled.pad(runs(cell, under), content, base) if r[0]]
                if right:
                    prefix.append(_seg(" " * right, str(under) if under else ""))
                blank.append(_seg(" " * (left + content + right), str(under) if under else ""))
            cell = help_column._cells[r]
            if isinstance(cell, Columns):
                check(len(cell.renderables) == 1, "an option help of several parts")
                cell = cell.renderables[0]
            check(isinstance(cell, Text) and not cell.style and bool(cell.plain), "an unusual help")
            rows.append((prefix, blank, runs(cell, Style())))
        table["panels"].append(
            {
                "title": panel.title,
                "border_style": str(console.get_style(panel.border_style)),
                "prefix_width": sum(left + content + right for content, left, right in widths),
                "rows": rows,
            }
        )
    return table


def render_table() -> str:
    """The text of `help_table.py`."""
    from engctl.cli.generated import module_text

    return module_text(
        "Generated by `python -m engctl.cli.help`: the root help of the typer app, for\n"
        "`engctl --help` without typer. Do not edit; regenerate.",
        "HELP",
        build_table(),
    )


if __name__ == "__main__":
    from engctl.cli.generated import write

    write(__file__, "help_table.py", render_table())
