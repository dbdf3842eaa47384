"""`status` and `top` at 80 columns (issue 10.25): every row on one line, no column cut to
nothing, the least needed columns left out (and said so); all of them when there is room."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, Any, cast

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.text import Text

from engctl.render import styled
from engctl.render.status import ELIGIBILITY_STYLE, HEALTH_STYLE, STATE_STYLE, status_text
from engctl.render.styled import COLOR, NO_COLOR
from engctl.render.tables import status_view
from engctl.render.top import top_view

if TYPE_CHECKING:
    from engctl.documents import LiveDoc, StatusDoc

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
        con.print(status_view(cast("StatusDoc", FLEET), width, NOW))
    else:
        con.print(top_view(cast("StatusDoc", FLEET), cast("LiveDoc", LIVE), "name", width, NOW))
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


# -- status without rich (issue 13.5) -------------------------------------------------------


def rich_prints(renderable: Any, width: int, escapes: str | None) -> str:
    """What rich's Console writes for `renderable` at `width` columns: to a terminal with
    colours (COLOR), to one with NO_COLOR set, or to a file (None)."""
    out = io.StringIO()
    Console(
        file=out,
        width=width,
        force_terminal=escapes is not None,
        color_system="standard" if escapes else None,
        no_color=escapes == NO_COLOR,
        highlight=False,
        soft_wrap=False,
    ).print(renderable)
    return out.getvalue()


# Words a status may hold: mostly ASCII, sometimes wide and combining characters or rich
# markup (control characters, which only rich prints, have their own test).
ODD = ["[bold]", "[/]", "×", "é", "日本", "\u0301"]
WORDS = st.lists(st.sampled_from([*"abcxyz019 -_.:#()[]"]) | st.sampled_from(ODD), max_size=12).map(
    "".join
)
INSTANCES = st.fixed_dictionaries(
    {
        "id": WORDS.map(lambda w: f"{w}#0"),
        "pid": st.none() | st.integers(1, 4_194_304),
        "state": st.sampled_from([*STATE_STYLE, "odd"]),
        "health": st.sampled_from([*HEALTH_STYLE, "odd"]),
        "health_reason": WORDS,
        "eligibility": st.sampled_from([*ELIGIBILITY_STYLE, "odd"]),
        "eligibility_reason": WORDS | st.text(st.sampled_from([*"abc  :,()", "×"]), max_size=120),
        "isolated_until": st.none() | st.floats(NOW - 10, NOW + 1e6),
        "effective_weight": st.none() | st.floats(0, 1),
        "uptime_s": st.none() | st.floats(0, 1e8),
        "restarts": st.integers(0, 10**6),
        "cpu_percent": st.none() | st.floats(0, 1600),
        "rss_bytes": st.none() | st.integers(0, 2**45),
        "last_exit": st.none()
        | st.fixed_dictionaries(
            {"code": st.none() | st.integers(-255, 255)},
            optional={"signal": st.sampled_from(["SIGKILL", "SIGTERM"]), "error": WORDS},
        ),
    }
)
FLEETS = st.lists(
    st.fixed_dictionaries(
        {
            "name": WORDS,
            "mode": st.sampled_from(["worker", "oneshot", "service"]),
            "desired": st.sampled_from(["running", "stopped"]),
            "max_concurrency": st.integers(1, 64),
            "instances": st.lists(INSTANCES, max_size=4),
        }
    ),
    min_size=1,
    max_size=4,
).map(lambda engines: {"engines": engines})


@settings(max_examples=300, deadline=None)
@given(
    status=FLEETS,
    width=st.integers(20, 260),
    escapes=st.sampled_from([None, COLOR, NO_COLOR]),
)


def test_status_text_is_what_rich_prints(status: dict[str, Any], width: int, escapes: Any) -> None:
    """`status_text` writes exactly what rich writes for the status view, escape codes and
    all, or gives the case back to rich (None)."""
    text = status_text(status, width, escapes, NOW)
    if text is not None:
        view = status_view(cast("StatusDoc", status), width, NOW)
        assert text == rich_prints(view, width, escapes)


@pytest.mark.parametrize("escapes", [None, COLOR, NO_COLOR])
@pytest.mark.parametrize("width", [71, 80, 120, 200, 1000])


def test_status_text_writes_the_usual_tables_itself(width: int, escapes: Any) -> None:
    """A fleet of ordinary names and reasons is written without rich at every width that
    holds its narrowest table (71 columns for this one), with or without notes under it."""
    text = status_text(FLEET, width, escapes, NOW)
    assert text is not None
    assert text == rich_prints(status_view(cast("StatusDoc", FLEET), width, NOW), width, escapes)


def test_status_text_leaves_control_characters_to_rich() -> None:
    """rich expands a tab and strips control codes: such a status is rich's to print."""
    for name, written in (("up\tper", False), ("upper", True)):
        engine = {"name": name, "mode": "oneshot", "desired": "running", "instances": []}
        assert (status_text({"engines": [engine]}, 200, None, NOW) is not None) == written


@settings(max_examples=500, deadline=None)
@given(
    text=st.lists(st.sampled_from([*"ab cd-", "  ", "\n", "×", "日", "xyzxyzxyzxyzxyz"])).map(
        "".join
    ),
    width=st.integers(1, 30),
)


def test_wrap_breaks_lines_where_rich_does(text: str, width: int) -> None:
    """`styled.wrap` cuts a text into the lines rich's Text.wrap makes (a word longer than a
    line folded, trailing spaces dropped only where they overflow), wide characters too."""
    try:
        wrapped = styled.wrap([(text, "", False)], width)
    except ValueError:  # a character wider than the line, which rich crops: rich's to print
        assume(False)
    lines = ["".join(t for t, _, _ in line) for line in wrapped]
    con = Console(width=width, color_system=None)
    assert lines == [line.plain for line in Text(text).wrap(con, width)]


def test_status_shows_names_and_reasons_as_written() -> None:
    """A reason (here given to `isolate --reason`) that looks like rich markup shows as it was
    written, in the table and without rich alike (issue 13.5)."""
    fleet = {
        "engines": [
            {
                "name": "e",
                "mode": "worker",
                "desired": "running",
                "instances": [
                    inst("e#0", eligibility="isolated", eligibility_reason="[bold]by hand[/]")
                ],
            }
        ]
    }
    for width in (200, 80):  # a REASON column, then a note under the table
        view = status_view(cast("StatusDoc", fleet), width, NOW)
        assert "[bold]by hand[/]" in rich_prints(view, width, None)
        assert "[bold]by hand[/]" in (status_text(fleet, width, None, NOW) or "")


def test_policy_show_formats_each_setting_by_its_section() -> None:
    """A setting is formatted by its name within its section: backoff.max is seconds, the
    [scale] table's max a count; a scale value the engine set is marked as the engine's."""
    from engctl.render.tables import policy_rows, setting_value

    assert setting_value("backoff.max", 30.0) == "30s"
    assert setting_value("max", 8) == "8"
    assert setting_value("hang_timeout", 60.0) == "60s"
    engine = {
        "mode": "worker",
        "type": "t",
        "health": {},
        "restart": {"backoff": {}},
        "limits": {},
        "timeouts": {"start_timeout": 60.0, "hang_timeout": 5.0},
        "stop": {"signal": "SIGTERM", "timeout": 10.0},
        "rollout": {"max_surge": 0, "max_unavailable": 1},
        "scale": {"min": 0, "max": 8, "min_idle": 0, "target": 0.8, "idle_timeout": 60.0},
        "policy": {},
        "sources": {},
    }
    rows = {(section, key): (value, source) for section, key, value, source in policy_rows(engine)}
    assert rows[("engine", "hang_timeout")] == (5.0, "engine")
    assert rows[("engine", "start_timeout")] == (60.0, "default")
    assert rows[("rollout", "max_surge")] == (0, "engine")
    assert rows[("scale", "max")] == (8, "engine") and rows[("scale", "min")] == (0, "engine")
    assert rows[("scale", "idle_timeout")] == (60.0, "default")


def test_a_rollout_and_an_engine_scaled_to_zero_leave_80_columns_readable() -> None:
    """A surge row's label and a scaled-to-zero engine's cell are short on a narrow terminal
    (`w#0 (g2 new)`, `scaled to zero`), so no other cell is cut; the wide view spells them."""
    fleet = {
        "engines": [
            {
                "name": "onnx-small-model", "mode": "worker", "desired": "running",
                "generation": 2,
                "instances": [inst("onnx-small-model#0", generation=1, role="current")],
                "surge": [inst("onnx-small-model#0", generation=2, role="successor",
                               state="warming")],
            },
            {"name": "idle-pool", "mode": "worker", "desired": "running", "instances": [],
             "scale": {"min": 0, "max": 4, "wanted": 0, "ready": 0, "busy": 0, "idle": 0}},
        ]
    }  # fmt: skip
    for rich in (False, True):
        narrow = _status(fleet, 80, rich)
        assert "onnx-small-model#0 (g2 new)" in narrow and "scaled to zero" in narrow
        assert "…" not in narrow, narrow
        wide = _status(fleet, 250, rich)
        assert "onnx-small-model#0 (gen 2, successor)" in wide
        assert "0 instances (scaled to zero)" in wide


def _status(status: dict[str, Any], width: int, rich: bool) -> str:
    """`status` at `width` columns, by rich or by `status_text`."""
    if not rich:
        return status_text(status, width, NO_COLOR, NOW) or ""
    con = Console(width=width, record=True, color_system=None)
    con.print(status_view(cast("StatusDoc", status), width, NOW))
    return con.export_text()
