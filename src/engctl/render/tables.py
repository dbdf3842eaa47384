"""rich tables for `status`, `list` and `policy show`. Imported only by commands that print
them."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from engctl.render.format import size
from engctl.render.status import status_cells, status_layout

if TYPE_CHECKING:
    from engctl.documents import StatusDoc


def status_table(
    status: StatusDoc,
    now: float | None = None,
    reason_column: bool = True,
    hidden: frozenset[str] = frozenset(),
) -> Table:
    """One row per instance (or per engine without instances), every cell on one line; with
    `reason_column`, a REASON column when an instance is not simply active and healthy;
    `hidden` columns are left out (narrow terminals)."""
    return _table(*status_cells(status, now, reason_column, hidden))


def _table(columns: list[tuple[str, str]], rows: list[list[tuple[str, str]]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col, justify in columns:
        table.add_column(col, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    for row in rows:
        # Text, not str: an engine's name or a reason is never read as rich markup.
        table.add_row(*(Text(text, style=style) for text, style in row))
    return table


def status_view(status: StatusDoc, width: int, now: float | None = None) -> RenderableType:
    """The status table for a console `width` columns wide, every row on one line: reasons
    in a REASON column when it fits, else as lines under the table
    (`echo#1  isolated: 5 consecutive errors …`); then the least needed columns go."""
    columns, rows, notes = status_layout(
        status, width, now, lambda columns, rows: natural_width(_table(columns, rows))
    )
    table = _table(columns, rows)
    if not notes:
        return table
    text = Text()
    for piece, style in notes:
        text.append(piece, style=style)
    return Group(table, text)


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
        "interval", "timeout", "grace", "start_seconds", "backoff.initial", "backoff.max",
        "backoff.reset_after", "flap_window", "cooldown", "ping_timeout", "leak_window",
        "drain_timeout", "window", "restore_interval", "isolation_base", "isolation_max",
        "slow_start", "start_timeout", "hang_timeout", "idle_timeout",
    }
)  # fmt: skip
# Settings whose 0 turns the behaviour off.
_ZERO_IS_OFF = frozenset({"cooldown", "leak_rate", "slow_start"})


def setting_value(key: str, value: Any) -> str:
    """One setting for a person: `30s`, `512.0MiB`, `1.0MiB/s`, `50%`, `true`, `none`; `key`
    as named within its section (`backoff.max`)."""
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
    if key == "rate":
        return f"{value:g}/s"
    if key.endswith("_percent"):
        return f"{value:g}%"
    if key in _SECONDS:
        return f"{value:g}s"
    return f"{value:g}" if isinstance(value, float) else str(value)


def _spec_defaults(mode: str) -> dict[str, dict[str, Any]]:
    """The default health, restart and limits settings of an engine of `mode`, flat."""
    from dataclasses import asdict

    from engctl.models import (
        EngineSpec,
        HealthSpec,
        LimitsSpec,
        RestartSpec,
        RolloutSpec,
        ScaleSpec,
        StopSpec,
    )

    health = asdict(HealthSpec())
    health["check"] = "ping" if mode == "worker" else None
    health["on_unhealthy"] = "isolate" if mode == "worker" else "restart"
    restart = asdict(RestartSpec())
    restart["policy"] = str(restart["policy"])
    restart.update({f"backoff.{k}": v for k, v in restart.pop("backoff").items()})
    top = EngineSpec.__dataclass_fields__
    return {
        "health": health,
        "restart": restart,
        "limits": asdict(LimitsSpec()),
        "engine": {k: top[k].default for k in ("start_timeout", "hang_timeout")},
        "stop": asdict(StopSpec()),
        "rollout": asdict(RolloutSpec()),
        "scale": asdict(ScaleSpec()),
    }


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
        # Older daemons send none of these: nothing is printed for them.
        "engine": engine.get("timeouts") or {},  # top-level keys of [engines.NAME]
        "stop": engine.get("stop") or {},
        "rollout": engine.get("rollout") or {},
        "scale": engine.get("scale") or {},
    }
    for section, values in spec_sections.items():
        known = defaults[section]
        for key, value in values.items():
            source = "default" if key in known and known[key] == value else "engine"
            rows.append((section, key, value, source))
    # The daemon's admission limits for the engine's type ([daemon.limits], admission.md).
    admission = engine.get("admission")
    if admission:
        from engctl.admission_config import DEFAULT_AGING

        cap, aging = admission.get("max_in_flight"), admission.get("aging")
        rows.append(("daemon.limits", "max_in_flight", cap, "default" if cap is None else "daemon"))
        rows.append(
            ("daemon.limits", "aging", aging, "default" if aging == DEFAULT_AGING else "daemon")
        )
        for key, value in (admission.get("type") or {}).items():
            rows.append((f"daemon.limits.types.{engine['type']}", key, value, "daemon"))
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
            setting_value(key, value),
            Text(source, style=SOURCE_STYLE.get(source, "")),
        )
        last = section
    return table
