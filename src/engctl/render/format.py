"""Small formatters for human output: durations, sizes, times. Stdlib only."""

from __future__ import annotations

import json
import sys
import time

TYPE_CHECKING = False  # typing is not imported at run time: it is on every CLI start
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from engctl.documents import EventDoc


def duration(seconds: float | None) -> str:
    """`3s`, `4m12s`, `2h05m`, `3d04h`; `-` when unknown."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size(n: int | None) -> str:
    """Bytes in binary units: `512B`, `14.2MiB`; `-` when unknown."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return f"{value:.1f}GiB"


def clock(at: float | None) -> str:
    """Local wall-clock time of an epoch timestamp, to the millisecond."""
    if at is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f".{int(at % 1 * 1000):03d}"


def last_exit(info: Mapping[str, Any] | None) -> str:
    """`code 1`, `SIGKILL`, or the spawn error, for the status table."""
    if not info:
        return "-"
    if info.get("error"):
        return str(info["error"])
    if info.get("signal"):
        return str(info["signal"])
    return f"code {info.get('code')}"


def eligibility(inst: Mapping[str, Any], now: float | None = None) -> str:
    """`active`, `downweighted 0.25` (effective weight), `isolated 42s left` (`isolated` when
    by hand: no end), `draining`: an instance's dispatch eligibility for a person."""
    elig = str(inst.get("eligibility", "active"))
    if elig == "downweighted":
        weight = inst.get("effective_weight")
        return elig if weight is None else f"{elig} {weight:.2f}"
    if elig == "isolated":
        until = inst.get("isolated_until")
        if until is None:
            return elig
        left = until - (time.time() if now is None else now)
        # At the end the daemon probes it before it returns (or isolates it again).
        return f"{elig} {duration(max(0.0, left))} left" if left > 0 else f"{elig}, probing"
    return elig


def standing_reason(inst: Mapping[str, Any]) -> str:
    """Why an instance is not simply active and healthy, or whose lease holds it ("" when
    it is simply active)."""
    if inst.get("eligibility", "active") != "active" and inst.get("eligibility_reason"):
        return str(inst["eligibility_reason"])
    lease = inst.get("lease")
    if lease:
        holder = lease.get("holder") or "an unnamed holder"
        until = time.strftime("%H:%M:%S", time.localtime(lease.get("expires_at", 0)))
        return f"leased: {lease.get('lease')} held by {holder} until {until}"
    if inst.get("health") in ("degraded", "unhealthy", "recovering"):
        return str(inst.get("health_reason") or "")
    return ""


def print_json(obj: Any) -> None:
    """The one way JSON reaches stdout: one document, newline-ended; indented for a person
    at a terminal, one compact line for a program (json's C encoder does not indent, and
    the indenting one costs more than the rest of `status --json` at 200 instances)."""
    if sys.stdout.isatty():
        sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    else:
        sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")


def event_line(ev: EventDoc | Mapping[str, Any]) -> str:
    """One event as a line of text (fields an older daemon did not send show as `-`)."""
    subject = ev.get("instance") or ev.get("engine") or "daemon"
    edge = f" {ev['from']} -> {ev['to']}" if ev.get("from") else ""
    return f"{clock(ev.get('at'))}  {subject}{edge}: {ev.get('reason', '')}"


def scale_line(engine: Mapping[str, Any], now: float | None = None) -> str:
    """An autoscaled engine in one line: its range, wanted / ready / busy / idle / leased,
    a floor raised by prewarm or prediction, and the last decision with its reason."""
    sc = engine["scale"]
    parts = [
        f"{engine['name']}: autoscaled {sc['min']}..{sc['max']}",
        f"wanted {sc['wanted']}, ready {sc['ready']}, busy {sc['busy']}, idle {sc['idle']}"
        + (f", leased {sc['leased']}" if sc.get("leased") else ""),
    ]
    prewarm = sc.get("prewarm")
    if prewarm:
        until = prewarm.get("until")
        when = "" if until is None else time.strftime(" until %H:%M:%S", time.localtime(until))
        parts.append(f"prewarm {prewarm['instances']}{when}")
    predicted = sc.get("predicted")
    if predicted:
        parts.append(f"predicted {predicted['instances']}")
    last = sc.get("last_decision")
    if last:
        ago = (time.time() if now is None else now) - float(last.get("at", 0))
        parts.append(f"last: {last.get('reason', '')} ({duration(max(0.0, ago))} ago)")
    return "; ".join(parts)
