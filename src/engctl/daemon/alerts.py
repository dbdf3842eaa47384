"""Alert rules as pure decisions: an expression evaluated for each series of figures, and each
(rule, series) moved through inactive -> pending -> firing -> resolved with time passed in.

A series is one instance, engine, type or the host, with its figures and those of what holds
it (an instance's engine, type and the host). A figure that is missing (no sample yet, a limit
not set, a matcher that does not match) makes its comparison false. A condition that holds
starts a pending alert, which fires once it has held `for` seconds (at once when `for` is 0:
no pending event); a firing alert resolves when the condition stops holding or its series
goes away; a pending one that stops holding leaves without an event (it never fired).

The built-in rules (`cpu`, `memory`) are the cpu and memory policies' alerts: CPU above
`max_cpu_percent` for the cpu policy's window, RSS above `max_rss` with the memory policy's
`action = "alert"`.

Pure: no process, no loop, no clock. Imports the shared contract only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from engctl.alertexpr import (
    Arith,
    Cmp,
    Expr,
    Fig,
    Logic,
    Neg,
    Node,
    Not,
    Num,
    Scope,
)
from engctl.alerting import AlertRule
from engctl.states import EventKind

SeriesKey = tuple[str, ...]


@dataclass(frozen=True)
class Rule(AlertRule):
    """A rule in force: a user's `[alerts.NAME]`, or a built-in one. `for_figure` names a
    figure of each series that gives its own `for` (the built-in cpu rule: the engine's cpu
    window)."""

    builtin: bool = False
    for_figure: str | None = None

    @classmethod
    def of(cls, rule: AlertRule) -> Rule:
        return cls(rule.name, rule.expr, rule.for_seconds, rule.severity, rule.labels, rule.summary)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "expr": self.expr.text,
            "for_s": None if self.for_figure else self.for_seconds,
            "severity": self.severity.value,
            "labels": dict(self.labels),
            "summary": self.summary,
            "builtin": self.builtin,
        }


def _builtin(name: str, text: str, figure: str, limit: str, **kw: Any) -> Rule:
    root = Cmp(">", Fig(figure), Fig(limit))
    expr = Expr(text, root, Scope.INSTANCE, frozenset({figure, limit}))
    return Rule(name, expr, builtin=True, **kw)


# The figures behind the built-in rules (not for users' expressions): each is present only for
# the instances whose engine's policy says "alert".
CPU_LIMIT = "cpu_alert_limit"
CPU_WINDOW = "cpu_alert_window"
MEMORY_LIMIT = "memory_alert_limit"
BUILTIN_RULES = (
    _builtin(
        "cpu",
        "cpu_percent > max_cpu_percent",
        "cpu_percent",
        CPU_LIMIT,
        for_figure=CPU_WINDOW,
        summary="CPU above limits.max_cpu_percent for the cpu policy's window",
    ),
    _builtin(
        "memory",
        "rss_bytes > max_rss",
        "rss_bytes",
        MEMORY_LIMIT,
        summary="RSS above limits.max_rss (the memory policy's action is alert)",
    ),
)


@dataclass
class Series:
    """One thing a rule is evaluated for: its labels, the engine's own labels (matchers may
    test them), and every figure it sees."""

    key: SeriesKey
    labels: dict[str, str]
    values: dict[str, float | None]
    engine_labels: Mapping[str, str] = field(default_factory=dict)

    def label(self, name: str) -> str | None:
        found = self.labels.get(name)
        return found if found is not None else self.engine_labels.get(name)


Value = float | bool | None


def evaluate(node: Node, series: Series) -> Value:
    """The value of `node` for `series` (None: a figure is missing or filtered out)."""
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Fig):
        for m in node.matchers:
            if not m.matches(series.label(m.label)):
                return None
        return series.values.get(node.name)
    if isinstance(node, Neg):
        v = evaluate(node.operand, series)
        return None if v is None else -float(v)
    if isinstance(node, Arith):
        a, b = evaluate(node.left, series), evaluate(node.right, series)
        if a is None or b is None:
            return None
        x, y = float(a), float(b)
        if node.op == "+":
            return x + y
        if node.op == "-":
            return x - y
        if node.op == "*":
            return x * y
        return None if y == 0 else x / y
    if isinstance(node, Cmp):
        a, b = evaluate(node.left, series), evaluate(node.right, series)
        if a is None or b is None:
            return False
        x, y = float(a), float(b)
        op = node.op
        if op == ">":
            return x > y
        if op == ">=":
            return x >= y
        if op == "<":
            return x < y
        if op == "<=":
            return x <= y
        if op == "==":
            return x == y
        return x != y
    if isinstance(node, Logic):
        left = bool(evaluate(node.left, series))
        if node.op == "and":
            return left and bool(evaluate(node.right, series))
        return left or bool(evaluate(node.right, series))
    assert isinstance(node, Not)
    return not bool(evaluate(node.operand, series))


def _number(v: Value) -> float | None:
    return None if v is None or isinstance(v, bool) else round(float(v), 4)


class AlertState(StrEnum):
    PENDING = "pending"
    FIRING = "firing"


@dataclass
class Alert:
    """One rule holding for one series."""

    rule: Rule
    key: SeriesKey
    labels: dict[str, str]
    state: AlertState
    since: float  # clock time the condition started holding
    active_at: float  # the same, epoch seconds
    value: float | None = None
    threshold: float | None = None
    fired_at: float | None = None  # epoch seconds
    for_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        """One alert of `engctl alerts --json`."""
        return {
            "name": self.rule.name,
            "state": self.state.value,
            "severity": self.rule.severity.value,
            "labels": {**self.labels, **self.rule.labels},
            "value": self.value,
            "threshold": self.threshold,
            "expr": self.rule.expr.text,
            "for_s": self.for_seconds,
            "since": round(self.active_at, 3),
            "fired_at": None if self.fired_at is None else round(self.fired_at, 3),
            "summary": self.rule.summary,
            "builtin": self.rule.builtin,
        }


@dataclass(frozen=True)
class Transition:
    """An alert moved: the event to emit, and the alert as it is now."""

    kind: EventKind
    alert: Alert
    reason: str


def describe(alert: Alert, kind: EventKind) -> str:
    """The event's reason: what holds, its value and threshold, and for how long."""
    rule = alert.rule
    what = {
        EventKind.ALERT_PENDING: "pending",
        EventKind.ALERT_FIRING: "firing",
        EventKind.ALERT_RESOLVED: "resolved",
    }[kind]
    where = ", ".join(f"{k}={v}" for k, v in alert.labels.items()) or "host"
    figures = ""
    if alert.value is not None:
        figures = f": value {alert.value:g}"
        if alert.threshold is not None:
            figures += f", threshold {alert.threshold:g}"
    hold = (
        f" for {alert.for_seconds:g}s"
        if kind is EventKind.ALERT_FIRING and alert.for_seconds
        else ""
    )
    return f"{rule.name} {what} on {where}: {rule.expr.text}{figures}{hold}"


class AlertBook:
    """The alerts of every rule now, moved on each evaluation."""

    def __init__(self) -> None:
        self.active: dict[tuple[str, SeriesKey], Alert] = {}

    def evaluate(
        self, rules: Iterable[Rule], series: Mapping[Scope, list[Series]], now: float, wall: float
    ) -> list[Transition]:
        """Evaluate every rule over the series of its scope; the transitions, in order."""
        out: list[Transition] = []
        seen: set[tuple[str, SeriesKey]] = set()
        for rule in rules:
            first = rule.expr.first_comparison()
            for s in series.get(rule.expr.scope, []):
                if not evaluate(rule.expr.root, s):
                    continue
                ident = (rule.name, s.key)
                seen.add(ident)
                value = threshold = None
                if first is not None:
                    value = _number(evaluate(first.left, s))
                    threshold = _number(evaluate(first.right, s))
                hold = rule.for_seconds
                if rule.for_figure is not None:
                    hold = float(s.values.get(rule.for_figure) or 0.0)
                alert = self.active.get(ident)
                if alert is None:
                    state = AlertState.PENDING if hold > 0 else AlertState.FIRING
                    alert = Alert(rule, s.key, dict(s.labels), state, now, wall)
                    alert.value, alert.threshold, alert.for_seconds = value, threshold, hold
                    self.active[ident] = alert
                    if state is AlertState.PENDING:
                        out.append(self._moved(alert, EventKind.ALERT_PENDING))
                        continue
                    alert.fired_at = wall
                    out.append(self._moved(alert, EventKind.ALERT_FIRING))
                    continue
                alert.rule = rule  # the same rule, or its new settings after a reload
                alert.value, alert.threshold, alert.for_seconds = value, threshold, hold
                if alert.state is AlertState.PENDING and now - alert.since >= hold:
                    alert.state = AlertState.FIRING
                    alert.fired_at = wall
                    out.append(self._moved(alert, EventKind.ALERT_FIRING))
        for ident, alert in list(self.active.items()):
            if ident in seen:
                continue
            del self.active[ident]
            if alert.state is AlertState.FIRING:
                out.append(self._moved(alert, EventKind.ALERT_RESOLVED))
        return out

    @staticmethod
    def _moved(alert: Alert, kind: EventKind) -> Transition:
        return Transition(kind, alert, describe(alert, kind))

    def alerts(self) -> list[Alert]:
        """Pending and firing alerts, firing first, then by rule and series."""
        return sorted(
            self.active.values(),
            key=lambda a: (a.state is not AlertState.FIRING, a.rule.name, a.key),
        )
