"""The frame of `engctl top`: one row per instance with its live figures."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from engctl.render.format import eligibility, size
from engctl.render.status import HEALTH_STYLE, STATE_STYLE
from engctl.render.tables import natural_width

if TYPE_CHECKING:
    from engctl.documents import LiveDoc, StatusDoc

# Worst first when sorting by state: what needs attention is on top.
STATE_RANK = {
    "fatal": 0,
    "backoff": 1,
    "exited": 2,
    "starting": 3,
    "warming": 4,
    "stopping": 5,
    "busy": 6,
    "ready": 7,
    "stopped": 8,
}


def _num(v: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v)


def _oneshot_row(engine: Mapping[str, Any]) -> dict[str, Any]:
    """A oneshot engine as a row of its own (`NAME#oneshot`): it has no instances."""
    return {
        "id": f"{engine['name']}#oneshot",
        "state": "oneshot" if engine.get("desired") == "running" else "stopped",
        "health": "unknown",
        "eligibility": "active",
        "requests": engine.get("requests", {}),
        "cpu_percent": None,
        "rss_bytes": None,
        "restarts": 0,
    }


def _joined(status: StatusDoc, live: LiveDoc, sort: str) -> list[tuple[Any, Any, Any]]:
    rows = []
    figures: Mapping[str, Any] = live.get("instances", {})
    for e in status["engines"]:
        insts: list[Mapping[str, Any]] = list(e["instances"])
        if e.get("mode") == "oneshot":
            insts = [_oneshot_row(e)]  # its runs' figures, as one row
        for i in insts:
            m = figures.get(i["id"], {})
            rows.append((e, i, m))
    keyers = {
        "name": lambda r: (r[1]["id"],),
        "rps": lambda r: (-(r[2].get("rps") or 0.0), r[1]["id"]),
        "p99": lambda r: (-(r[2].get("p99_ms") or 0.0), r[1]["id"]),
        "cpu": lambda r: (-(r[1].get("cpu_percent") or 0.0), r[1]["id"]),
        "rss": lambda r: (-(r[1].get("rss_bytes") or 0), r[1]["id"]),
        "state": lambda r: (STATE_RANK.get(r[1]["state"], 9), r[1]["id"]),
    }
    rows.sort(key=keyers.get(sort, keyers["name"]))
    return rows


def top_rows(status: StatusDoc, live: LiveDoc, sort: str) -> list[dict[str, Any]]:
    """The figures of one frame as plain objects (`engctl top --json`)."""
    out = []
    for _e, i, m in _joined(status, live, sort):
        out.append(
            {
                "id": i["id"],
                "state": i["state"],
                "health": i["health"],
                "eligibility": i["eligibility"],
                "effective_weight": i.get("effective_weight"),
                "in_flight": i.get("requests", {}).get("in_flight", 0),
                "rps": m.get("rps"),
                "success_rate": m.get("success_rate"),
                "p50_ms": m.get("p50_ms"),
                "p99_ms": m.get("p99_ms"),
                "cpu_percent": i.get("cpu_percent"),
                "rss_bytes": i.get("rss_bytes"),
                "restarts": i.get("restarts", 0),
            }
        )
    return out


# Columns a narrow terminal drops first, so every row stays on one line (`--json` has all).
_DROPPABLE = ("RESTARTS", "P50ms", "IN", "OK%", "HEALTH")
_COLUMNS = (
    ("INSTANCE", "left"),
    ("STATE", "left"),
    ("HEALTH", "left"),
    ("DISPATCH", "left"),
    ("IN", "right"),
    ("RPS", "right"),
    ("OK%", "right"),
    ("P50ms", "right"),
    ("P99ms", "right"),
    ("CPU%", "right"),
    ("RSS", "right"),
    ("RESTARTS", "right"),
)


def _table(rows: list[tuple[Any, Any, Any]], hidden: frozenset[str], now: float | None) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold", expand=False)
    shown = [c for c in _COLUMNS if c[0] not in hidden]
    for col, just in shown:
        table.add_column(col, justify=just, no_wrap=True)  # type: ignore[arg-type]
    for _e, i, m in rows:
        req = i.get("requests", {})
        ok = m.get("success_rate")
        elig = eligibility(i, now)
        cells = {
            "INSTANCE": i["id"],
            "STATE": Text(i["state"], style=STATE_STYLE.get(i["state"], "")),
            "HEALTH": Text(i["health"], style=HEALTH_STYLE.get(i["health"], "")),
            "DISPATCH": Text(elig, style="" if elig == "active" else "yellow"),
            "IN": str(req.get("in_flight", 0)),
            "RPS": _num(m.get("rps")),
            "OK%": "-" if ok is None else f"{ok * 100:.1f}",
            "P50ms": _num(m.get("p50_ms"), "{:.2f}"),
            "P99ms": _num(m.get("p99_ms"), "{:.2f}"),
            "CPU%": _num(i.get("cpu_percent")),
            "RSS": size(i.get("rss_bytes")),
            "RESTARTS": str(i.get("restarts", 0)),
        }
        table.add_row(*(cells[col] for col, _ in shown))
    return table


def top_view(
    status: StatusDoc,
    live: LiveDoc,
    sort: str,
    width: int | None = None,
    now: float | None = None,
) -> RenderableType:
    """Header (host, queue) and the instance table, sorted by `sort`; in a console `width`
    columns wide every row stays on one line (the least needed columns go first)."""
    rows = _joined(status, live, sort)
    hidden: frozenset[str] = frozenset()
    table = _table(rows, hidden, now)
    for col in _DROPPABLE:
        if width is None or natural_width(table) <= width:
            break
        hidden |= {col}
        table = _table(rows, hidden, now)
    host: Mapping[str, Any] = live.get("host") or {}
    queue: Mapping[str, int] = live.get("queue") or {}
    head = f"engctl top — {len(rows)} instances"
    if host:
        head += (
            f" · host CPU {host.get('cpu_percent', 0):.0f}%"
            f" · memory {size(host.get('memory_used'))}/{size(host.get('memory_total'))}"
        )
    waiting = sum(queue.values())
    head += f" · queued {waiting}" if waiting else ""
    keys = Text("q quit · sort 1 name 2 rps 3 p99 4 cpu 5 rss 6 state", style="dim")
    if not rows:
        return Group(Text(head, style="bold"), Text("no instances (try `engctl demo`)"), keys)
    limits = admission_lines(live.get("admission") or {})
    return Group(Text(head, style="bold"), table, *limits, keys)


def admission_lines(gates: Mapping[str, Mapping[str, Any]]) -> list[Text]:
    """One line per engine with admission limits: in flight against the limit, waiting,
    refusals, and (adaptive) why the limit last moved."""
    out = []
    for name, g in sorted(gates.items()):
        line = f"{name}: in flight {g['in_flight']}/{g['limit'] if g['limit'] is not None else '∞'}"
        line += f" · waiting {g['waiting']}" if g["waiting"] else ""
        line += f" · rate limited {g['rate_limited']}" if g["rate_limited"] else ""
        line += f" · shed {g['shed']}" if g["shed"] else ""
        adaptive = g.get("adaptive")
        if adaptive:
            line += f" · adaptive limit {adaptive['limit']} ({adaptive['reason']})"
        out.append(Text(line, style="dim", no_wrap=True, overflow="ellipsis"))
    return out
