"""The text form of `engctl report`: totals, tables per engine and instance, queues, host,
worst instances, policy actions and suggestions."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from engctl.render.format import clock, duration, size

if TYPE_CHECKING:
    from engctl.documents import ReportDoc, ReportFigures


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v * 100:.{digits}f}%"


def _row(name: str, f: ReportFigures, extra: list[str]) -> list[str]:
    lat = f["latency"]
    return [
        name,
        str(f["requests"]),
        _pct(f["success_rate"], 2),
        "-" if f["throughput_rps"] is None else f"{f['throughput_rps']:.2f}",
        _ms(lat["p50_ms"]),
        _ms(lat["p90_ms"]),
        _ms(lat["p99_ms"]),
        _ms(lat["max_ms"]),
        *extra,
        str(f["restarts"]),
        str(f["isolations"]),
    ]


def report_view(r: ReportDoc) -> RenderableType:
    """Everything of one report, in reading order."""
    p = r["period"]
    parts: list[RenderableType] = []
    scope = f" for engine {p['engine']}" if p.get("engine") else ""
    part = p.get("covered_seconds", p["seconds"])
    covered = f", history for {duration(part)} of it" if part < p["seconds"] - 10 else ""
    parts.append(
        Text.assemble(
            ("Report", "bold"),
            f"{scope}: {clock(p['since'])[:19]} → {clock(p['until'])[:19]}"
            f" ({duration(p['seconds'])}{covered}, {p['bucket_seconds']} s buckets)",
        )
    )
    t = r["totals"]
    lat = t["latency"]
    parts.append(
        Text(
            f"{t['requests']} requests, {_pct(t['success_rate'], 2)} ok"
            f" ({t['errors']} errors, {t['timeouts']} timeouts, {t['lost']} lost),"
            f" p50 {_ms(lat['p50_ms'])} ms, p99 {_ms(lat['p99_ms'])} ms,"
            f" max {_ms(lat['max_ms'])} ms; {t['restarts']} restarts,"
            f" {t['isolations']} isolations"
        )
    )
    if not r["engines"]:
        parts.append(Text("no history in this period (is the daemon running with metrics on?)"))
    else:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("ENGINE/INSTANCE", "REQS", "OK", "RPS", "P50ms", "P90ms", "P99ms", "MAXms"):
            table.add_column(col, justify="left" if col.startswith("ENGINE") else "right")
        for col in ("CPU%", "RSS", "RESTARTS", "ISOL"):
            table.add_column(col, justify="right")
        for e in r["engines"]:
            table.add_row(*_row(f"[bold]{e['name']}[/] ({e['type']})", e, ["", ""]))
            for i in e["instances"]:
                cpu = i["cpu_percent_mean"]
                table.add_row(
                    *_row(
                        f"  {i['id']}",
                        i,
                        ["-" if cpu is None else f"{cpu:.1f}", size(i["rss_bytes_max"])],
                    )
                )
        parts.append(table)
    queued = [q for q in r["types"] if q["queued_share"]]
    if queued:
        parts.append(
            Text(
                "Queues: "
                + "; ".join(
                    f"{q['type']} waited {_pct(q['queued_share'], 0)} of the time"
                    f" (longest {q['queue_max']})"
                    for q in queued
                )
            )
        )
    h = r["host"]
    if h["cpu_percent_mean"] is not None:
        parts.append(
            Text(
                f"Host: CPU {h['cpu_percent_mean']:.0f}% mean, memory up to"
                f" {size(h['memory_used_max'])} of {size(h['memory_total'])},"
                f" disk {size(h['disk_read_bytes'])} read / {size(h['disk_write_bytes'])}"
                f" written, network {size(h['net_sent_bytes'])} sent /"
                f" {size(h['net_recv_bytes'])} received"
            )
        )
    worst = r["worst"]
    if worst["by_error_rate"] or worst["by_p99"]:
        lines = []
        if worst["by_error_rate"]:
            lines.append(
                "Worst by error rate: "
                + ", ".join(
                    f"{w['instance']} {_pct(w['error_rate'])} of {w['requests']}"
                    for w in worst["by_error_rate"]
                )
            )
        if worst["by_p99"]:
            lines.append(
                "Worst by p99: "
                + ", ".join(f"{w['instance']} {_ms(w['p99_ms'])} ms" for w in worst["by_p99"])
            )
        parts.append(Text("\n".join(lines)))
    if r["actions"]:
        actions = Table(box=None, pad_edge=False, header_style="bold", title_justify="left")
        actions.add_column("POLICY ACTIONS", no_wrap=True)
        actions.add_column("")
        actions.add_column("")
        for a in r["actions"]:
            actions.add_row(clock(a["at"])[11:19], a["instance"] or a["engine"] or "-", a["reason"])
        parts.append(actions)
    else:
        parts.append(Text("No policy actions in this period."))
    if r["suggestions"]:
        parts.append(Text("Suggestions:", style="bold"))
        for s in r["suggestions"]:
            parts.append(Text(f"  • {s['message']}"))
    else:
        parts.append(Text("No suggestions: nothing in the figures calls for a change."))
    return Group(*parts)
