"""The `status` table: its cells, which of them a terminal of a given width gets, and the
text rich prints for it, written here without rich (`status_text`).

The cells and the layout serve both the rich table (`render.tables`, which `--watch` and the
odd cases use) and `status_text`, so the two cannot disagree on what is shown; a test pins
the text to rich's, byte for byte. Stdlib only.
"""

from __future__ import annotations

from engctl.render import styled
from engctl.render.format import (
    duration,
    eligibility,
    last_exit,
    scale_line,
    size,
    standing_reason,
)

TYPE_CHECKING = False  # typing is not imported at run time: it is on every CLI start
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

    # A cell: (text, rich style); a row: one cell per shown column.
    Cell = tuple[str, str]
    Columns = list[tuple[str, str]]  # (header, justify)
    Rows = list[list[Cell]]

STATE_STYLE = {
    "ready": "green",
    "busy": "cyan",
    "starting": "yellow",
    "warming": "yellow",
    "stopping": "yellow",
    "backoff": "magenta",
    "exited": "dim",
    "stopped": "dim",
    "fatal": "bold red",
}

HEALTH_STYLE = {
    "healthy": "green",
    "degraded": "yellow",
    "unhealthy": "bold red",
    "recovering": "cyan",
    "unknown": "dim",
}

ELIGIBILITY_STYLE = {
    "active": "green",
    "downweighted": "yellow",
    "isolated": "bold red",
    "draining": "magenta",
    "unavailable": "dim",
}

HEADER_STYLE = "bold"

COLUMNS = (
    ("INSTANCE", "left"),
    ("PID", "right"),
    ("STATE", "left"),
    ("HEALTH", "left"),
    ("ELIGIBILITY", "left"),
    ("UPTIME", "right"),
    ("RESTARTS", "right"),
    ("CPU%", "right"),
    ("RSS", "right"),
    ("LAST EXIT", "left"),
)

# Columns a narrow terminal drops first (to keep every row on one line), least needed first;
# `status --json` and a wider terminal have them all.
DROPPABLE = ("LAST EXIT", "PID", "RESTARTS", "UPTIME", "CPU%")


def status_cells(
    status: Mapping[str, Any],
    now: float | None = None,
    reason_column: bool = True,
    hidden: frozenset[str] = frozenset(),
    compact: bool = False,
) -> tuple[Columns, Rows]:
    """One row per instance (or per engine without instances), a rollout's extra processes
    under their slot's; with `reason_column`, a REASON column when an instance is not simply
    active and healthy; `hidden` columns left out and `compact` labels (narrow terminals)."""
    pairs: list[tuple[Mapping[str, Any], Mapping[str, Any] | None]] = [
        (eng, inst) for eng in status["engines"] for inst in _rows(eng)
    ]
    reasons = {id(inst): standing_reason(inst) for _, inst in pairs if inst is not None}
    columns = list(COLUMNS)
    if reason_column and any(reasons.values()):
        columns.append(("REASON", "left"))
    shown = [c for c in columns if c[0] not in hidden]
    rows = []
    for eng, inst in pairs:
        if inst is None:
            if eng["mode"] == "oneshot":
                note = f"oneshot ×{eng.get('max_concurrency', 1)}"
            elif eng.get("scale") and eng["desired"] == "running":
                note = "scaled to zero" if compact else "0 instances (scaled to zero)"
            else:
                note = f"0 instances ({eng['desired']})"
            cells: dict[str, Cell] = {"INSTANCE": (eng["name"], ""), "STATE": (note, "dim")}
            rows.append([cells.get(col, ("-", "")) for col, _ in shown])
            continue
        state = inst["state"]
        health = inst.get("health", "unknown")
        elig = inst.get("eligibility", "active")
        cpu = inst.get("cpu_percent")
        cells = {
            "INSTANCE": (_label(eng, inst, compact), ""),
            "PID": (str(inst["pid"]) if inst.get("pid") else "-", ""),
            "STATE": (state, STATE_STYLE.get(state, "")),
            "HEALTH": (health, HEALTH_STYLE.get(health, "")),
            "ELIGIBILITY": (eligibility(inst, now), ELIGIBILITY_STYLE.get(elig, "")),
            "UPTIME": (duration(inst.get("uptime_s")), ""),
            "RESTARTS": (str(inst.get("restarts", 0)), ""),
            "CPU%": ("-" if cpu is None else f"{cpu:.1f}", ""),
            "RSS": (size(inst.get("rss_bytes")), ""),
            "LAST EXIT": (last_exit(inst.get("last_exit")), ""),
            "REASON": (reasons[id(inst)] or "-", ""),
        }
        rows.append([cells[col] for col, _ in shown])
    return shown, rows


def status_layout(
    status: Mapping[str, Any],
    width: int,
    now: float | None,
    natural_width: Callable[[Columns, Rows], int],
) -> tuple[Columns, Rows, list[Cell]]:
    """The columns and rows for a console `width` columns wide, every row on one line, and
    the notes to print under them: reasons in a REASON column when it fits, else as lines
    under the table (`echo#1  isolated: 5 consecutive errors …`); then the least needed
    columns go. An autoscaled engine adds a line of its figures and last decision.
    `natural_width` measures a table (rich's measure, or `text_width`)."""
    columns, rows = status_cells(status, now)
    scaled = [(f"\n{scale_line(eng, now)}", "") for eng in status["engines"] if eng.get("scale")]
    if natural_width(columns, rows) <= width:
        return columns, rows, scaled + rollout_notes(status)
    notes: list[Cell] = []
    for eng in status["engines"]:
        for inst in eng["instances"]:
            why = standing_reason(inst)
            if why:
                what = inst.get("eligibility", "active")
                if what == "active":
                    what = inst.get("health", "unknown")
                notes.append((f"\n{inst['id']}  ", ""))
                notes.append((what, ELIGIBILITY_STYLE.get(what) or HEALTH_STYLE.get(what, "")))
                notes.append((f": {why}", ""))
    hidden: frozenset[str] = frozenset()
    # Short labels first: a rollout's and a scaled-to-zero engine's would otherwise squeeze
    # every other column to nothing.
    columns, rows = status_cells(status, now, reason_column=False, compact=True)
    for col in DROPPABLE:
        if natural_width(columns, rows) <= width:
            break
        hidden |= {col}
        columns, rows = status_cells(status, now, False, hidden, compact=True)
    if hidden:
        left_out = ", ".join(c for c in DROPPABLE if c in hidden)
        notes.append((f"\n(too narrow for {left_out}: see --json)", "dim"))
    return columns, rows, notes + scaled + rollout_notes(status)


def _rows(eng: Mapping[str, Any]) -> list[Mapping[str, Any] | None]:
    """An engine's rows: each slot's current instance, then a rollout's successor or retiring
    process of that slot right under it."""
    surge = eng.get("surge") or []
    if not surge:
        return eng["instances"] or [None]
    rows: list[Mapping[str, Any] | None] = []
    for inst in eng["instances"]:
        rows.append(inst)
        rows.extend(s for s in surge if s["id"] == inst["id"])
    known = {inst["id"] for inst in eng["instances"]}
    rows.extend(s for s in surge if s["id"] not in known)
    return rows or [None]


_SHORT_ROLE = {"successor": "new", "retiring": "old"}


def _label(eng: Mapping[str, Any], inst: Mapping[str, Any], compact: bool = False) -> str:
    """The INSTANCE cell: the id, with the generation while generations are mixed (a rollout
    under way or stopped) and the role of a rollout's extra process (`compact`: `g4 new`)."""
    gen = inst.get("generation")
    role = inst.get("role", "current")
    if role != "current":
        if compact:
            return f"{inst['id']} (g{gen} {_SHORT_ROLE.get(role, role)})"
        return f"{inst['id']} (gen {gen}, {role})"
    mixed = eng.get("surge") or any(
        i.get("generation") != eng.get("generation") for i in eng["instances"] if i.get("pid")
    )
    if not mixed or gen is None:
        return str(inst["id"])
    return f"{inst['id']} (g{gen})" if compact else f"{inst['id']} (gen {gen})"


def rollout_notes(status: Mapping[str, Any]) -> list[Cell]:
    """A line under the table for each engine whose rollout is under way or failed."""
    notes: list[Cell] = []
    for eng in status["engines"]:
        r = eng.get("rollout")
        if not r or r["state"] == "finished":
            continue
        notes.append((f"\n{eng['name']}  ", ""))
        if r["state"] == "running":
            notes.append(("rolling out", "yellow"))
            notes.append(
                (
                    f": generation {r['generation']}, {len(r['replaced'])} of {r['total']}"
                    f" replaced (max_surge {r['max_surge']}, max_unavailable"
                    f" {r['max_unavailable']})",
                    "",
                )
            )
        else:
            notes.append(("rollout failed", "bold red"))
            notes.append((f": {r['reason']}", ""))
    return notes


def text_width(columns: Columns, rows: Rows) -> int:
    """The width the table takes when nothing limits it: its widest cells, two spaces apart."""
    widths = _column_widths(columns, rows)
    return sum(w for w, _ in widths) + 2 * (len(widths) - 1)


def _column_widths(columns: Columns, rows: Rows) -> list[tuple[int, Callable[[str], int]]]:
    """Each column's width, and how to measure its texts (`len` when all are one-cell)."""
    out = []
    for k, (header, _) in enumerate(columns):
        texts = [row[k][0] for row in rows]
        texts.append(header)
        measure: Callable[[str], int] = len if styled.narrow("".join(texts)) else styled.cell_width
        out.append((max(map(measure, texts)), measure))
    return out


def status_text(
    status: dict[str, Any], width: int, escapes: str | None, now: float | None = None
) -> str | None:
    """What rich prints for `render.tables.status_view(status, width)` on a console `width`
    columns wide (`escapes`: see `styled`), or None when rich must do it: a text it would
    change (control characters), or a table too wide even without the droppable columns."""
    columns, rows, notes = status_layout(status, width, now, text_width)
    texts = [t for row in rows for t, _ in row] + [t for t, _ in notes]
    if not all(styled.printable(t.replace("\n", "")) for t in texts):
        return None
    if text_width(columns, rows) > width:
        return None  # rich squeezes the columns: its layout, not ours
    try:
        return _table(columns, rows, escapes) + _notes(notes, width, escapes)
    except ValueError:  # a style `styled` does not write
        return None


def _table(columns: Columns, rows: Rows, escapes: str | None) -> str:
    """The rows as rich's Table(box=None, pad_edge=False, header_style="bold") with no_wrap
    columns writes them: each cell justified in its column's width and in its own escape
    sequence, one space of padding on each inner side (in the row's style: bold for the
    header, none for the others)."""
    widths = _column_widths(columns, rows)
    codes = {style: styled.sgr(style, escapes) for style in {s for row in rows for _, s in row}}
    header_codes = styled.sgr(HEADER_STYLE, escapes)
    header = [(h, HEADER_STYLE) for h, _ in columns]
    out = []
    for row in (header, *rows):
        cells = []
        for (text, style), (_, justify), (width, measure) in zip(row, columns, widths, strict=True):
            if justify == "right":
                text = text.rstrip()  # as rich justifies to the right
                cell = " " * (width - measure(text)) + text
            else:
                cell = text + " " * (width - measure(text))
            sgr = header_codes if row is header else codes[style]
            cells.append(f"\x1b[{sgr}m{cell}\x1b[0m" if sgr else cell)
        if row is header and header_codes:
            out.append(f"\x1b[{header_codes}m \x1b[0m\x1b[{header_codes}m \x1b[0m".join(cells))
        else:
            out.append("  ".join(cells))
    out.append("")
    return "\n".join(out)


def _notes(notes: list[Cell], width: int, escapes: str | None) -> str:
    """The notes under a narrow table, as rich writes a Text: wrapped to the console."""
    if not notes:
        return ""
    runs = [(text, style, bool(style)) for text, style in notes]
    return "".join(styled.line(line, escapes) + "\n" for line in styled.wrap(runs, width))
