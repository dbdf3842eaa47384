"""rich tables for `status`, `list` and `events`. Imported only by commands that print them."""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from engctl.render.format import duration, last_exit, size

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


def status_table(status: dict[str, Any]) -> Table:
    """One row per instance (or per engine without instances)."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col, justify in (
        ("INSTANCE", "left"),
        ("PID", "right"),
        ("STATE", "left"),
        ("HEALTH", "left"),
        ("UPTIME", "right"),
        ("RESTARTS", "right"),
        ("CPU%", "right"),
        ("RSS", "right"),
        ("LAST EXIT", "left"),
    ):
        table.add_column(col, justify=justify, no_wrap=col != "LAST EXIT")  # type: ignore[arg-type]
    for eng in status["engines"]:
        insts = eng["instances"]
        if not insts:
            note = "oneshot" if eng["mode"] == "oneshot" else f"0 instances ({eng['desired']})"
            table.add_row(eng["name"], "-", Text(note, style="dim"), *["-"] * 6)
            continue
        for inst in insts:
            state = inst["state"]
            cpu = inst.get("cpu_percent")
            table.add_row(
                inst["id"],
                str(inst["pid"]) if inst.get("pid") else "-",
                Text(state, style=STATE_STYLE.get(state, "")),
                inst.get("health", "unknown"),
                duration(inst.get("uptime_s")),
                str(inst.get("restarts", 0)),
                "-" if cpu is None else f"{cpu:.1f}",
                size(inst.get("rss_bytes")),
                last_exit(inst.get("last_exit")),
            )
    return table


def engines_table(engines: list[dict[str, Any]]) -> Table:
    """`engctl list`: one row per registered engine."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "TYPE", "MODE", "INSTANCES", "DESIRED", "COMMAND"):
        table.add_column(col, overflow="fold")
    for e in engines:
        table.add_row(
            e["name"],
            e["type"],
            e["mode"],
            str(e["instances"]),
            e["desired"],
            " ".join(e["command"]),
        )
    return table
