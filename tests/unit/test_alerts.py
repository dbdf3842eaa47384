"""Alert rules as pure code: the expression parser (errors at a column; generated expressions),
the evaluation over series of figures, and the pending -> firing -> resolved state machine
with time passed in; and the checks of `[alerts.*]`, `[hooks.*]` and the admission settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engctl.admission_config import parse_daemon_limits, parse_priority, parse_rate
from engctl.alertexpr import FIGURES, ExprError, Scope, parse_expr
from engctl.alerting import parse_alerts, parse_hooks
from engctl.config import DaemonConfig
from engctl.daemon.alerts import AlertBook, AlertState, Rule, Series, evaluate
from engctl.errors import InvalidParamsError, SpecError
from engctl.states import EventKind


# -- the parser -------------------------------------------------------------------------------
def test_expression_parses_with_matchers_units_and_logic() -> None:
    e = parse_expr("p99_ms{type='onnx'} > 250 and rss_bytes > 1.5GiB or not up == 1")
    assert e.scope is Scope.INSTANCE
    assert e.figures == {"p99_ms", "rss_bytes", "up"}
    assert parse_expr("host_memory_percent > 90").scope is Scope.HOST
    assert parse_expr("queue_wait_ms{type='onnx'} > 100").scope is Scope.TYPE


@pytest.mark.parametrize(
    ("text", "column", "words"),
    [
        ("p99_ms >", 9, "expected a number or a figure, found the end"),
        ("p99 > 250", 1, "unknown figure 'p99'"),
        ("p99_ms > 250 )", 14, "unexpected ')'"),
        ("p99_ms{type=onnx} > 1", 13, "expected a quoted string"),
        ("p99_ms + 1", 1, "an alert needs a condition"),
        ("rss_bytes > 3 parsecs", 15, "unexpected 'parsecs'"),
        ("rss_bytes > 3XB", 13, "unknown unit 'XB'"),
        ("queue_wait_ms{instance='a#0'} > 1", 15, "takes only ['type']"),
        ("p99_ms > 1 and 2", 16, "joins conditions"),
        ("p99_ms $ 1", 8, "unexpected character '$'"),
        ("", 1, "empty expression"),
    ],
)
def test_expression_errors_point_at_the_column(text: str, column: int, words: str) -> None:
    with pytest.raises(ExprError) as info:
        parse_expr(text)
    assert info.value.column == column, str(info.value)
    assert words in info.value.message
    assert str(info.value).endswith(f"at column {column}")


_figure = st.sampled_from(sorted(FIGURES))
_number = st.integers(0, 10**6).map(str) | st.sampled_from(["0.5", "1e3", "2GiB", "250"])


@st.composite
def _sums(draw: st.DrawFn, depth: int = 2) -> str:
    if depth == 0 or draw(st.booleans()):
        return draw(_figure | _number)
    op = draw(st.sampled_from(["+", "-", "*", "/"]))
    return f"({draw(_sums(depth - 1))} {op} {draw(_sums(depth - 1))})"


@st.composite
def _conditions(draw: st.DrawFn, depth: int = 2) -> str:
    if depth == 0 or draw(st.booleans()):
        op = draw(st.sampled_from([">", ">=", "<", "<=", "==", "!="]))
        return f"{draw(_sums())} {op} {draw(_sums())}"
    kind = draw(st.sampled_from(["and", "or", "not"]))
    if kind == "not":
        return f"not ({draw(_conditions(depth - 1))})"
    return f"({draw(_conditions(depth - 1))}) {kind} {draw(_conditions(depth - 1))}"


@settings(max_examples=200)
@given(_conditions())
def test_generated_conditions_parse_and_evaluate_to_a_truth(text: str) -> None:
    e = parse_expr(text)
    values: dict[str, float | None] = dict.fromkeys(FIGURES, 1.0)
    assert isinstance(evaluate(e.root, Series(("x",), {}, values)), bool)
    assert isinstance(evaluate(e.root, Series(("x",), {}, {})), bool)  # every figure missing


@settings(max_examples=300)
@given(st.text(alphabet="p9_ms{}'=~!<>()+-*/ .andortypex0123456789GiB", max_size=40))
def test_any_text_parses_or_fails_with_a_column(text: str) -> None:
    try:
        parse_expr(text)
    except ExprError as exc:
        assert 1 <= exc.column <= len(text) + 1


# -- the state machine ------------------------------------------------------------------------
def _rule(text: str, hold: float = 0.0) -> Rule:
    return Rule("slow", parse_expr(text), hold)


def _instances(p99: float | None) -> dict[Scope, list[Series]]:
    values = {"p99_ms": p99}
    return {
        Scope.INSTANCE: [
            Series(("web#0",), {"instance": "web#0", "engine": "web", "type": "onnx"}, values)
        ]
    }


def test_alert_goes_pending_then_firing_then_resolved() -> None:
    book, rule = AlertBook(), _rule("p99_ms{type='onnx'} > 250", hold=30)
    assert book.evaluate([rule], _instances(100), 0.0, 1000.0) == []
    [t] = book.evaluate([rule], _instances(300), 1.0, 1001.0)
    assert t.kind is EventKind.ALERT_PENDING and t.alert.value == 300 and t.alert.threshold == 250
    assert book.evaluate([rule], _instances(320), 20.0, 1020.0) == []  # held 19 s of 30
    [t] = book.evaluate([rule], _instances(330), 31.0, 1031.0)
    assert t.kind is EventKind.ALERT_FIRING and t.alert.state is AlertState.FIRING
    assert "value 330, threshold 250 for 30s" in t.reason
    [t] = book.evaluate([rule], _instances(100), 40.0, 1040.0)
    assert t.kind is EventKind.ALERT_RESOLVED and not book.alerts()


def test_pending_alert_that_stops_holding_leaves_without_an_event() -> None:
    book, rule = AlertBook(), _rule("p99_ms > 250", hold=30)
    assert [t.kind for t in book.evaluate([rule], _instances(300), 0.0, 0.0)] == [
        EventKind.ALERT_PENDING
    ]
    assert book.evaluate([rule], _instances(10), 5.0, 5.0) == []
    assert not book.alerts()


def test_alert_without_for_fires_at_once_and_resolves_when_its_series_goes() -> None:
    book, rule = AlertBook(), _rule("p99_ms > 250")
    [t] = book.evaluate([rule], _instances(300), 0.0, 0.0)
    assert t.kind is EventKind.ALERT_FIRING
    [t] = book.evaluate([rule], {Scope.INSTANCE: []}, 1.0, 1.0)
    assert t.kind is EventKind.ALERT_RESOLVED


def test_a_missing_figure_never_fires() -> None:
    book = AlertBook()
    assert book.evaluate([_rule("p99_ms > 250")], _instances(None), 0.0, 0.0) == []


# -- bad input: one line naming the field -------------------------------------------------------
@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"x": {"expr": "p99 > 1"}}, "alerts.x.expr: unknown figure 'p99'"),
        ({"x": {"expr": "p99_ms >"}}, "at column 9"),
        ({"x": {"expr": "p99_ms > 1", "for": "soon"}}, "alerts.x.for: expected a duration"),
        ({"x": {"expr": "p99_ms > 1", "severity": "dire"}}, "alerts.x.severity: expected info"),
        ({"x": {}}, "alerts.x.expr: missing"),
        ({"cpu": {"expr": "p99_ms > 1"}}, "belongs to a built-in rule"),
    ],
)
def test_bad_alert_rules_name_the_field(table: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_alerts(table)
    assert message in info.value.message and "\n" not in info.value.message


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"h": {"on": ["alert.*"]}}, "hooks.h: needs a command (event JSON on its stdin) or a url"),
        ({"h": {"on": ["*"], "url": "ftp://127.0.0.1/x"}}, "hooks.h.url: must be an http://"),
        (
            {"h": {"on": ["*"], "url": "http://example.com/x"}},
            "not a loopback address and not in [daemon] hook_hosts",
        ),
        ({"h": {"on": ["*"], "command": "x", "url": "http://127.0.0.1/"}}, "has both"),
    ],
)
def test_bad_hooks_name_the_field(table: dict[str, object], message: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_hooks(table, (), "hooks")
    assert message in info.value.message, info.value.message


def test_a_hook_url_may_go_to_a_host_of_the_allow_list() -> None:
    [hook] = parse_hooks({"h": {"on": ["*"], "url": "https://am.lan:9093/x"}}, ("am.lan",), "hooks")
    assert hook.url == "https://am.lan:9093/x"


def test_bad_rates_bursts_and_priorities_name_the_field() -> None:
    with pytest.raises(
        SpecError, match=r'daemon.limits.types.onnx.rate: expected a rate such as "200/s"'
    ):
        parse_daemon_limits({"types": {"onnx": {"rate": "fast"}}}, "daemon.limits")
    with pytest.raises(SpecError, match=r"daemon.limits.types.onnx.burst: must be from 1"):
        parse_daemon_limits({"types": {"onnx": {"rate": "10/s", "burst": -1}}}, "daemon.limits")
    with pytest.raises(SpecError, match=r"daemon.limits.types.onnx.queue: expected fair or sjf"):
        parse_daemon_limits({"types": {"onnx": {"queue": "lifo"}}}, "daemon.limits")
    with pytest.raises(InvalidParamsError, match=r"--priority: unknown priority 'urgent'"):
        parse_priority("urgent", "--priority")
    assert parse_priority("high") == 8 and parse_priority("3") == 3 and parse_priority(0) == 0
    assert parse_rate("30/m", "rate") == 0.5


def test_config_file_with_a_bad_alert_is_refused_whole(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('[alerts.slow]\nexpr = "p99_ms >> 3"\n')
    with pytest.raises(SpecError, match=r"alerts.slow.expr: .* at column 9"):
        DaemonConfig.load(path)
    path.write_text(
        '[daemon.limits]\nmax_in_flight = 4\ntypes.onnx = { max_in_flight = 2, rate = "5/s" }\n'
        '[alerts.slow]\nexpr = "p99_ms > 3"\nfor = "10s"\n'
        '[hooks.log]\non = ["alert.*"]\ncommand = ["cat"]\n'
    )
    cfg = DaemonConfig.load(path)
    assert cfg.limits.max_in_flight == 4 and cfg.limits.types["onnx"].max_in_flight == 2
    assert [r.name for r in cfg.alerts] == ["slow"] and cfg.alerts[0].for_seconds == 10
    assert [h.name for h in cfg.hooks] == ["log"]
