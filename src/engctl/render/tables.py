"""rich tables for `status`, `list` and `policy show`. Imported only by commands that print
them."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from engctl.render.format import duration, eligibility, last_exit, size, standing_reason

if TYPE_CHECKING:
    from engctl.documents import StatusDoc

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


# Columns a narrow terminal drops first (to keep every row on one line), least needed first;
# `status --json` and a wider terminal have them all.
_DROPPABLE = ("LAST EXIT", "PID", "RESTARTS", "UPTIME", "CPU%")


def status_table(
    status: StatusDoc,
    now: float | None = None,
    reason_column: bool = True,
    hidden: frozenset[str] = frozenset(),
) -> Table:
    """One row per instance (or per engine without instances), every cell on one line; with
    `reason_column`, a REASON column when an instance is not simply active and healthy;
    `hidden` columns are left out (narrow terminals)."""
    rows: list[tuple[Mapping[str, Any], Mapping[str, Any] | None]] = []
    for e in status["engines"]:
        rows += [(e, inst) for inst in e["instances"]] if e["instances"] else [(e, None)]
    reasons = {id(inst): standing_reason(inst) for _, inst in rows if inst is not None}
    with_reason = reason_column and any(reasons.values())
    table = Table(box=None, header_style="bold", pad_edge=False)
    columns: list[tuple[str, str]] = [
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
    ]
    if with_reason:
        columns.append(("REASON", "left"))
    shown = [c for c in columns if c[0] not in hidden]
    for col, justify in shown:
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for eng, inst in rows:
        if inst is None:
            if eng["mode"] == "oneshot":
                note = f"oneshot ×{eng.get('max_concurrency', 1)}"
            else:
                note = f"0 instances ({eng['desired']})"
            cells: dict[str, str | Text] = {"INSTANCE": eng["name"], "STATE": Text(note, "dim")}
            table.add_row(*(cells.get(col, "-") for col, _ in shown))
            continue
        state = inst["state"]
        health = inst.get("health", "unknown")
        elig = inst.get("eligibility", "active")
        cpu = inst.get("cpu_percent")
        cells = {
            "INSTANCE": inst["id"],
            "PID": str(inst["pid"]) if inst.get("pid") else "-",
            "STATE": Text(state, style=STATE_STYLE.get(state, "")),
            "HEALTH": Text(health, style=HEALTH_STYLE.get(health, "")),
            "ELIGIBILITY": Text(eligibility(inst, now), style=ELIGIBILITY_STYLE.get(elig, "")),
            "UPTIME": duration(inst.get("uptime_s")),
            "RESTARTS": str(inst.get("restarts", 0)),
            "CPU%": "-" if cpu is None else f"{cpu:.1f}",
            "RSS": size(inst.get("rss_bytes")),
            "LAST EXIT": last_exit(inst.get("last_exit")),
            "REASON": reasons[id(inst)] or "-",
        }
        table.add_row(*(cells[col] for col, _ in shown))
    return table


def status_view(status: StatusDoc, width: int, now: float | None = None) -> RenderableType:
    """The status table for a console `width` columns wide, every row on one line: reasons
    in a REASON column when it fits, else as lines under the table
    (`echo#1  isolated: 5 consecutive errors …`); then the least needed columns go."""
    table = status_table(status, now)
    if natural_width(table) <= width:
        return table
    notes = Text()
    for eng in status["engines"]:
        for inst in eng["instances"]:
            why = standing_reason(inst)
            if why:
                what = inst.get("eligibility", "active")
                if what == "active":
                    what = inst.get("health", "unknown")
                notes.append(f"\n{inst['id']}  ")
                notes.append(what, style=ELIGIBILITY_STYLE.get(what) or HEALTH_STYLE.get(what, ""))
                notes.append(f": {why}")
    hidden: frozenset[str] = frozenset()
    table = status_table(status, now, reason_column=False)
    for col in _DROPPABLE:
        if natural_width(table) <= width:
            break
        hidden |= {col}
        table = status_table(status, now, reason_column=False, hidden=hidden)
    if hidden:
        left_out = ", ".join(c for c in _DROPPABLE if c in hidden)
        notes.append(f"\n(too narrow for {left_out}: see --json)", "dim")
    return Group(table, notes) if notes else table


_MEASURE = Console(width=100_000, color_system=None)


def natural_width(table: Table) -> int:
    """The width `table` takes when nothing limits it."""
    return Measurement.get(_MEASURE, _MEASURE.options, table).maximum


def engines_table(engines: list[dict[str, Any]]) -> Table:
    """`engctl list`: one row per registered engine."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    # CONCURRENCY: requests at once per instance; for a oneshot engine, runs at once.
    columns = (
        "NAME", "TYPE", "MODE", "INSTANCES", "CONCURRENCY", "DESIRED", "VERSION", "REGISTERED",
        "CAPABILITIES", "LABELS", "COMMAND",
    )  # fmt: skip
    for col in columns:
        table.add_column(col, overflow="fold")
    for e in engines:
        at = e.get("registered_at")
        table.add_row(
            e["name"],
            e["type"],
            e["mode"],
            str(e["instances"]),
            str(e.get("max_concurrency", 1)),
            e["desired"],
            e.get("version") or "-",
            "-" if at is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(at)),
            ",".join(e.get("capabilities") or []) or "-",
            ",".join(f"{k}={v}" for k, v in sorted((e.get("labels") or {}).items())) or "-",
            " ".join(e["command"]),
        )
    return table


SOURCE_STYLE = {"default": "dim", "daemon": "cyan", "engine": "yellow"}

# Settings in seconds, shown with their unit.
_SECONDS = frozenset(
    {
        "interval", "timeout", "grace", "start_seconds", "initial", "max", "reset_after",
        "flap_window", "cooldown", "ping_timeout", "leak_window", "drain_timeout", "window",
        "restore_interval", "isolation_base", "isolation_max", "slow_start",
    }
)  # fmt: skip
# Settings whose 0 turns the behaviour off.
_ZERO_IS_OFF = frozenset({"cooldown", "leak_rate", "slow_start"})


def setting_value(key: str, value: Any) -> str:
    """One setting for a person: `30s`, `512.0MiB`, `1.0MiB/s`, `50%`, `true`, `none`."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if value == 0 and key in _ZERO_IS_OFF:
        return "0 (off)"
    if key == "max_rss":
        return size(value)
    if key == "leak_rate":
        return f"{size(value)}/s"
    if key.endswith("_percent"):
        return f"{value:g}%"
    if key in _SECONDS:
        return f"{value:g}s"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _spec_defaults(mode: str) -> dict[str, dict[str, Any]]:
    """The default health, restart and limits settings of an engine of `mode`, flat."""
    from dataclasses import asdict

    from engctl.models import HealthSpec, LimitsSpec, RestartSpec

    health = asdict(HealthSpec())
    health["check"] = "ping" if mode == "worker" else None
    health["on_unhealthy"] = "isolate" if mode == "worker" else "restart"
    restart = asdict(RestartSpec())
    restart["policy"] = str(restart["policy"])
    restart.update({f"backoff.{k}": v for k, v in restart.pop("backoff").items()})
    return {"health": health, "restart": restart, "limits": asdict(LimitsSpec())}


def policy_rows(engine: dict[str, Any]) -> list[tuple[str, str, Any, str]]:
    """(section, setting, value, from) for every setting `policy show` prints; a section is
    named as its TOML table under [engines.NAME] (the policy ones also go under [daemon])."""
    rows: list[tuple[str, str, Any, str]] = []
    # The engine spec's own tables: a value is the engine's when it is not the default.
    defaults = _spec_defaults(engine["mode"])
    restart = dict(engine["restart"])
    backoff = restart.pop("backoff", {})
    spec_sections = {
        "health": engine["health"],
        "restart": {**restart, **{f"backoff.{k}": v for k, v in backoff.items()}},
        "limits": engine["limits"],
    }
    for section, values in spec_sections.items():
        known = defaults[section]
        for key, value in values.items():
            source = "default" if key in known and known[key] == value else "engine"
            rows.append((section, key, value, source))
    policy, sources = engine["policy"], engine["sources"]
    for key, value in policy.items():
        if not isinstance(value, dict):
            rows.append(("policy", key, value, sources.get("top", {}).get(key, "default")))
    for section, values in policy.items():
        if isinstance(values, dict):
            for key, value in values.items():
                source = sources.get(section, {}).get(key, "default")
                rows.append((f"policy.{section}", key, value, source))
    return rows


def policy_table(engine: dict[str, Any]) -> Table:
    """`engctl policy show`: one engine's settings, grouped by section, with their source."""
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("SECTION", "SETTING", "VALUE", "FROM"):
        table.add_column(col, no_wrap=True)
    last = None
    for section, key, value, source in policy_rows(engine):
        table.add_row(
            section if section != last else "",
            key,
            setting_value(key.rpartition(".")[2], value),
            Text(source, style=SOURCE_STYLE.get(source, "")),
        )
        last = section
    return table
