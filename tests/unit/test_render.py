"""`status` and `top` at 80 columns (issue 10.25): every row on one line, no column cut to
nothing, the least needed columns left out (and said so); all of them when there is room."""

from __future__ import annotations

from typing import Any

import pytest
from rich.console import Console

from engctl.render.tables import status_view
from engctl.render.top import top_view

NOW = 1_800_000_000.0


def inst(id: str, **kw: Any) -> dict[str, Any]:
    """An instance of `status --json`, ready and busy with a request unless told otherwise."""
    base = {
        "id": id, "pid": 1234567, "state": "ready", "state_reason": "up for 1s",
        "health": "healthy", "health_reason": "", "eligibility": "active",
        "eligibility_reason": "", "isolated_until": None, "weight": 1.0,
        "effective_weight": 1.0, "restarts": 12, "uptime_s": 93_784.0, "cpu_percent": 100.0,
        "rss_bytes": 1_288_490_188, "threads": 3, "fds": 9,
        "last_exit": {"code": None, "signal": "SIGKILL", "at": NOW}, "requests": {"in_flight": 4},
    }  # fmt: skip
    return {**base, **kw}


FLEET: dict[str, Any] = {
    "engines": [
        {
            "name": "onnx-small-model",
            "mode": "worker",
            "desired": "running",
            "instances": [
                inst("onnx-small-model#0"),
                inst(
                    "onnx-small-model#1", eligibility="downweighted", effective_weight=0.25,
                    health="degraded", eligibility_reason="slow (× 0.25)",
                ),
                inst(
                    "onnx-small-model#2", eligibility="isolated", isolated_until=NOW + 299,
                    eligibility_reason="5 consecutive errors (last: timeout after 5.0s)",
                ),
                inst(
                    "onnx-small-model#3", state="fatal", pid=None, uptime_s=None,
                    cpu_percent=None, rss_bytes=None, eligibility="unavailable",
                    eligibility_reason="fatal: gave up after 6 failed starts (max_retries 5)",
                ),
                inst("onnx-small-model#4", state="warming", health="recovering",
                     eligibility="draining", eligibility_reason="draining to stop: scaled"),
            ],
        },
        {"name": "upper", "mode": "oneshot", "desired": "running", "instances": []},
    ]
}  # fmt: skip
LIVE = {
    "instances": {
        i["id"]: {"rps": 1234.5, "success_rate": 0.9987, "p50_ms": 123.45, "p99_ms": 9876.54}
        for i in FLEET["engines"][0]["instances"]
    },
    "host": {"cpu_percent": 45.0, "memory_used": 8 << 30, "memory_total": 16 << 30},
    "queue": {"onnx": 3},
}


def rendered(width: int, which: str) -> list[str]:
    con = Console(width=width, record=True, color_system=None)
    if which == "status":
        con.print(status_view(FLEET, width, NOW))
    else:
        con.print(top_view(FLEET, LIVE, "name", width, NOW))
    return con.export_text().splitlines()


@pytest.mark.parametrize("which", ["status", "top"])
def test_readable_at_80_columns(which: str) -> None:
    """At 80 columns each instance is one line that fits, no cell is cut (no ellipsis), and
    the columns kept are whole."""
    lines = rendered(80, which)
    assert all(len(line) <= 80 for line in lines), lines
    assert not any("…" in line for line in lines), lines
    ids = [f"onnx-small-model#{k}" for k in range(5)]
    header = next(k for k, line in enumerate(lines) if line.startswith("INSTANCE"))
    rows = lines[header + 1 : header + 1 + len(ids) + (which == "status")]
    assert [r.split()[0] for r in rows[: len(ids)]] == ids
    for row in rows[: len(ids)]:
        assert len(row.split()) >= 5, row  # every kept column has its value on this line
    wanted = {"INSTANCE", "STATE", "ELIGIBILITY" if which == "status" else "DISPATCH", "RSS"}
    assert wanted <= set(lines[header].split())
    if which == "status":
        assert lines[-1] == "(too narrow for LAST EXIT, PID, RESTARTS, UPTIME: see --json)"
        assert any("isolated 4m59s left" in r for r in rows)
        assert any(line.startswith("onnx-small-model#2  isolated: 5 consecutive") for line in lines)


@pytest.mark.parametrize("which", ["status", "top"])
def test_every_column_when_there_is_room(which: str) -> None:
    lines = rendered(200, which)
    header = next(line for line in lines if line.startswith("INSTANCE")).split()
    if which == "status":
        assert header == ["INSTANCE", "PID", "STATE", "HEALTH", "ELIGIBILITY", "UPTIME",
                          "RESTARTS", "CPU%", "RSS", "LAST", "EXIT", "REASON"]  # fmt: skip
    else:
        assert header == ["INSTANCE", "STATE", "HEALTH", "DISPATCH", "IN", "RPS", "OK%",
                          "P50ms", "P99ms", "CPU%", "RSS", "RESTARTS"]  # fmt: skip
    assert not any("too narrow" in line for line in lines)
