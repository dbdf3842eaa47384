"""Styled text written as rich writes it (escape codes, word wrap, padding), for the commands
that must print a table or the help in a few milliseconds: importing rich costs more.

Only what those outputs use: runs of text with a style, rich's word wrap, padding to a width.
Tests pin every output made with it to rich's own, byte for byte. Stdlib only (rich's cell
width and wrap functions are imported for wide or combining characters, where they are the
rule).
"""

from __future__ import annotations

import re

TYPE_CHECKING = False  # typing is not imported at run time: it is on every CLI start
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

# A run of text: (text, rich style, spanned). `spanned` is False for text in its Text's base
# style: rich writes base text and the padding after it as one escape sequence, and text under
# a span (highlighted, or appended with a style) as its own.
Run = tuple[str, str, bool]

# How escape codes are written: COLOR, NO_COLOR (the NO_COLOR convention: attributes such
# as bold stay, colours go) or None (not a terminal: plain text).
COLOR = "color"
NO_COLOR = "no_color"

# Style words -> SGR parameters, in the order rich writes them (attributes, then colour).
_ATTRIBUTES = {"bold": "1", "dim": "2", "italic": "3", "underline": "4"}
_COLORS = {
    name: str(30 + k)
    for k, name in enumerate(("black", "red", "green", "yellow", "blue", "magenta", "cyan"))
} | {"white": "37"}


def sgr(style: str, escapes: str | None) -> str:
    """The SGR parameters rich writes for `style` ("" for none, and for no escapes at all);
    ValueError for a style outside the few this module knows (callers then let rich do the
    work)."""
    if escapes is None:
        return ""
    attrs: list[str] = []
    color = ""
    for word in style.split():
        if word in _ATTRIBUTES:
            attrs.append(_ATTRIBUTES[word])
        elif word in _COLORS and not color:
            color = _COLORS[word]
        else:
            raise ValueError(f"style not supported here: {style!r}")
    codes = sorted(set(attrs))
    if color and escapes == COLOR:
        codes.append(color)
    return ";".join(codes)


def line(runs: Iterable[Run], escapes: str | None) -> str:
    """One line of runs as rich writes it: each styled run in its own escape sequence."""
    if escapes is None:
        return "".join(text for text, _, _ in runs)
    out = []
    for text, style, _ in runs:
        codes = sgr(style, escapes) if style else ""
        out.append(f"\x1b[{codes}m{text}\x1b[0m" if codes and text else text)
    return "".join(out)


def cell_width(text: str) -> int:
    """Terminal cells `text` takes (as rich counts them)."""
    if narrow(text):
        return len(text)
    from rich.cells import cell_len

    return cell_len(text)


def narrow(text: str) -> bool:
    """Whether every character of `text` takes one cell: ASCII, and the Latin ranges rich
    itself counts as one cell without its tables (`×`, `é`)."""
    return text.isascii() or all(
        " " <= c < "\x7f" or ("\xa0" <= c < "\u0300" and c != "\xad") for c in text
    )


def printable(text: str) -> bool:
    """Whether rich would print `text` as it is: no control characters, tabs or newlines
    (rich strips, expands or breaks at those; this module leaves them to it)."""
    return text.isprintable()


def pad(runs: list[Run], width: int, base_style: str) -> list[Run]:
    """`runs` padded with spaces to `width` cells, as rich justifies text to the left: the
    spaces join the last run when it is base text, else are a run of their own."""
    missing = width - sum(cell_width(t) for t, _, _ in runs)
    if missing <= 0:
        return runs
    if runs and not runs[-1][2]:
        text, style, _ = runs[-1]
        return [*runs[:-1], (text + " " * missing, style, False)]
    return [*runs, (" " * missing, base_style, False)]


def wrap(runs: list[Run], width: int) -> list[list[Run]]:
    """Lines of `runs` word-wrapped to `width` cells as rich's `Text.wrap` does (overflow
    "fold": a word longer than a line is cut), before any justification. ValueError for a
    character wider than a line (callers then let rich do it)."""
    lines: list[list[Run]] = [[]]
    for text, style, spanned in runs:
        first, *more = text.split("\n")
        lines[-1].append((first, style, spanned))
        lines.extend([(piece, style, spanned)] for piece in more)
    out = []
    for parts in lines:
        parts = [p for p in parts if p[0]]
        plain = "".join(t for t, _, _ in parts)
        divide: Callable[[str, int], list[int]] = _divide_narrow
        if not narrow(plain):
            from rich._wrap import divide_line as divide
        offsets = divide(plain, width)
        for start, end in zip([0, *offsets], [*offsets, len(plain)], strict=True):
            # rich drops the trailing spaces of a line only as far as they overflow it
            excess = (end - start) - width
            if excess > 0:
                spaces = len(plain[start:end]) - len(plain[start:end].rstrip())
                end -= min(spaces, excess)
            if cell_width(plain[start:end]) > width:
                # A character wider than the whole line: rich crops it; not done here.
                raise ValueError("a character wider than the line")
            out.append(_slice(parts, start, end))
    return out


def _slice(parts: list[Run], start: int, end: int) -> list[Run]:
    out = []
    pos = 0
    for text, style, spanned in parts:
        lo, hi = max(start, pos), min(end, pos + len(text))
        if lo < hi:
            out.append((text[lo - pos : hi - pos], style, spanned))
        pos += len(text)
    return out


_WORD = re.compile(r"\s*\S+\s*")


def _divide_narrow(text: str, width: int) -> list[int]:
    """rich's `divide_line` for text of one-cell characters: the offsets where lines break."""
    breaks: list[int] = []
    offset = 0
    for match in _WORD.finditer(text):
        start, word = match.start(), match.group()
        length = len(word.rstrip())
        if width - offset >= length:
            offset += len(word)
        elif length > width:  # longer than a line: folded over as many as it takes
            for k in range(0, len(word), width):
                if start + k:
                    breaks.append(start + k)
            offset = len(word) - (len(word) - 1) // width * width
        elif offset and start:
            breaks.append(start)
            offset = len(word)
    return breaks
