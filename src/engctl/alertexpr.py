"""The small expression language of an alert rule's `expr`: its figures, its grammar and its
parser (the rules themselves: `engctl.alerting`).

    expr    := or
    or      := and ("or" and)*
    and     := not ("and" not)*
    not     := "not" not | compare
    compare := sum [(">" | ">=" | "<" | "<=" | "==" | "!=") sum]
    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/") unary)*
    unary   := "-" unary | atom
    atom    := NUMBER [size unit] | FIGURE ["{" matcher ("," matcher)* "}"] | "(" expr ")"
    matcher := LABEL ("=" | "!=" | "=~" | "!~") STRING

A rule's expression must be a condition (a comparison, or conditions joined by and/or/not);
errors name their 1-based column. Evaluation is the daemon's (`engctl.daemon.alerts`).
Shared contract between CLI and daemon (`engctl config` validates the file without a daemon):
stdlib only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import IntEnum
from typing import Any


class Scope(IntEnum):
    """What a figure describes; an expression is evaluated once per series of its finest
    scope (an instance's figures with its engine's, its type's and the host's)."""

    INSTANCE = 0
    ENGINE = 1
    TYPE = 2
    HOST = 3


# Every figure an expression may name: its scope and what it is (docs/admission.md).
FIGURES: dict[str, tuple[Scope, str]] = {
    "p50_ms": (Scope.INSTANCE, "median latency of successful requests, last ~10 s"),
    "p99_ms": (Scope.INSTANCE, "99th percentile latency of successful requests, last ~10 s"),
    "rps": (Scope.INSTANCE, "requests finished per second, last ~10 s"),
    "error_rate": (Scope.INSTANCE, "share of requests that failed (0 to 1), last ~10 s"),
    "latency_ewma_ms": (Scope.INSTANCE, "latency EWMA of successful requests"),
    "in_flight": (Scope.INSTANCE, "requests running on it now"),
    "rss_bytes": (Scope.INSTANCE, "RSS of its process tree"),
    "cpu_percent": (Scope.INSTANCE, "CPU % of its process tree"),
    "restarts": (Scope.INSTANCE, "restarts since the daemon started"),
    "isolations": (Scope.INSTANCE, "times isolated since the daemon started"),
    "up": (Scope.INSTANCE, "1 while its process runs, else 0"),
    "max_rss": (Scope.INSTANCE, "its engine's limits.max_rss (absent when unset)"),
    "max_cpu_percent": (Scope.INSTANCE, "its engine's limits.max_cpu_percent (absent when unset)"),
    "engine_in_flight": (Scope.ENGINE, "requests running on the engine's instances"),
    "adaptive_limit": (Scope.ENGINE, "the engine's adaptive concurrency limit (absent when off)"),
    "ready_instances": (Scope.ENGINE, "instances of the engine that are ready"),
    "queue_length": (Scope.TYPE, "requests of the type waiting now"),
    "queue_wait_ms": (Scope.TYPE, "99th percentile of the queue wait, last ~10 s"),
    "rate_limited": (Scope.TYPE, "requests of the type refused by a rate limit, last ~10 s"),
    "host_memory_percent": (Scope.HOST, "share of the host's memory in use"),
    "host_cpu_percent": (Scope.HOST, "the host's CPU %"),
}
# The labels a matcher may test at each scope; at the engine and instance scopes any other
# name is one of the engine's own labels (`labels = { tier = "gold" }`).
_SCOPE_LABELS = {
    Scope.INSTANCE: {"instance", "engine", "type"},
    Scope.ENGINE: {"engine", "type"},
    Scope.TYPE: {"type"},
    Scope.HOST: set(),
}
_UNITS = {
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
COMPARISONS = (">=", "<=", "==", "!=", ">", "<")
MATCH_OPS = ("=~", "!~", "!=", "=")
_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<number>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?P<unit>[A-Za-z]+)?
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<string>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
      | (?P<op>>=|<=|==|!=|=~|!~|[-+*/(){},<>=])""",
    re.X,
)


class ExprError(ValueError):
    """A syntax or meaning error in an expression, at a 1-based column."""

    def __init__(self, message: str, column: int) -> None:
        super().__init__(f"{message} at column {column}")
        self.message = message
        self.column = column


# -- the syntax tree ------------------------------------------------------------------------
@dataclass(frozen=True)
class Num:
    value: float


@dataclass(frozen=True)
class Matcher:
    """`label op 'value'` inside a figure's braces."""

    label: str
    op: str
    value: str

    def matches(self, actual: str | None) -> bool:
        if self.op in ("=", "!="):
            return (actual == self.value) == (self.op == "=")
        hit = actual is not None and re.fullmatch(self.value, actual) is not None
        return hit == (self.op == "=~")


@dataclass(frozen=True)
class Fig:
    """A figure of the series, filtered by its matchers."""

    name: str
    matchers: tuple[Matcher, ...] = ()

    @property
    def scope(self) -> Scope:
        return FIGURES[self.name][0]


@dataclass(frozen=True)
class Neg:
    operand: Node


@dataclass(frozen=True)
class Arith:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Cmp:
    op: str
    left: Node
    right: Node


@dataclass(frozen=True)
class Logic:
    op: str  # "and" | "or"
    left: Node
    right: Node


@dataclass(frozen=True)
class Not:
    operand: Node


Node = Num | Fig | Neg | Arith | Cmp | Logic | Not
_CONDITIONS = (Cmp, Logic, Not)


@dataclass(frozen=True)
class Expr:
    """A parsed condition: its text, its tree, and the scope its series have."""

    text: str
    root: Node
    scope: Scope
    figures: frozenset[str]

    def first_comparison(self) -> Cmp | None:
        """The comparison whose two sides an alert reports as its value and threshold."""
        todo: list[Node] = [self.root]
        while todo:
            node = todo.pop(0)
            if isinstance(node, Cmp):
                return node
            if isinstance(node, Logic):
                todo[:0] = [node.left, node.right]
            elif isinstance(node, Not):
                todo.insert(0, node.operand)
        return None


# -- the parser ---------------------------------------------------------------------------------
@dataclass
class _Tok:
    kind: str  # number | name | string | op | end
    text: str
    column: int
    value: Any = None


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise ExprError(f"unexpected character {text[pos]!r}", pos + 1)
        kind = m.lastgroup or ""
        col = pos + 1
        pos = m.end()
        if m.group("space"):
            continue
        if m.group("number") is not None:
            value = float(m.group("number"))
            unit = m.group("unit")
            if unit is not None:
                mult = _UNITS.get(unit.lower())
                if mult is None:
                    units = ", ".join(("KiB", "MiB", "GiB", "TiB", "KB", "MB", "GB", "TB"))
                    raise ExprError(f"unknown unit {unit!r} (units: {units})", col)
                value *= mult
            out.append(_Tok("number", m.group(0), col, value))
        elif kind == "string":
            raw = m.group("string")
            out.append(_Tok("string", raw, col, re.sub(r"\\(.)", r"\1", raw[1:-1])))
        else:
            out.append(_Tok("name" if kind == "name" else "op", m.group(0), col))
    out.append(_Tok("end", "", len(text) + 1))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def at(self, *texts: str) -> bool:
        tok = self.tok
        return tok.kind in ("op", "name") and tok.text in texts

    def expect(self, text: str, what: str) -> _Tok:
        if not self.at(text):
            raise ExprError(f"expected {what}, found {_shown(self.tok)}", self.tok.column)
        return self.take()

    def parse(self) -> tuple[Node, int]:
        node, col = self.logic("or")
        if self.tok.kind != "end":
            raise ExprError(f"unexpected {_shown(self.tok)}", self.tok.column)
        return node, col

    def logic(self, op: str) -> tuple[Node, int]:
        sub = self.logic_and if op == "or" else self.negation
        left, col = sub()
        while self.at(op):
            tok = self.take()
            right, rcol = sub()
            _condition(left, col, tok.text)
            _condition(right, rcol, tok.text)
            left = Logic(op, left, right)
        return left, col

    def logic_and(self) -> tuple[Node, int]:
        return self.logic("and")

    def negation(self) -> tuple[Node, int]:
        if self.at("not"):
            tok = self.take()
            operand, col = self.negation()
            _condition(operand, col, "not")
            return Not(operand), tok.column
        return self.compare()

    def compare(self) -> tuple[Node, int]:
        left, col = self.sum()
        if self.tok.kind == "op" and self.tok.text in COMPARISONS:
            tok = self.take()
            right, rcol = self.sum()
            _number(left, col, tok.text)
            _number(right, rcol, tok.text)
            return Cmp(tok.text, left, right), col
        if self.at("="):
            raise ExprError(
                "'=' compares labels only; use '==' to compare numbers", self.tok.column
            )
        return left, col

    def sum(self) -> tuple[Node, int]:
        left, col = self.product()
        while self.at("+", "-"):
            tok = self.take()
            right, rcol = self.product()
            _number(left, col, tok.text)
            _number(right, rcol, tok.text)
            left = Arith(tok.text, left, right)
        return left, col

    def product(self) -> tuple[Node, int]:
        left, col = self.unary()
        while self.at("*", "/"):
            tok = self.take()
            right, rcol = self.unary()
            _number(left, col, tok.text)
            _number(right, rcol, tok.text)
            left = Arith(tok.text, left, right)
        return left, col

    def unary(self) -> tuple[Node, int]:
        if self.at("-"):
            tok = self.take()
            operand, col = self.unary()
            _number(operand, col, "-")
            return Neg(operand), tok.column
        return self.atom()

    def atom(self) -> tuple[Node, int]:
        tok = self.tok
        if tok.kind == "number":
            self.take()
            return Num(float(tok.value)), tok.column
        if self.at("("):
            self.take()
            node, _ = self.logic("or")
            self.expect(")", "')'")
            return node, tok.column
        if tok.kind == "name" and tok.text not in ("and", "or", "not"):
            self.take()
            if tok.text not in FIGURES:
                known = ", ".join(sorted(FIGURES))
                raise ExprError(f"unknown figure {tok.text!r} (figures: {known})", tok.column)
            matchers = self.matchers(tok.text) if self.at("{") else ()
            return Fig(tok.text, matchers), tok.column
        raise ExprError(f"expected a number or a figure, found {_shown(tok)}", tok.column)

    def matchers(self, figure: str) -> tuple[Matcher, ...]:
        self.take()  # {
        scope = FIGURES[figure][0]
        out: list[Matcher] = []
        while True:
            label = self.tok
            if label.kind != "name":
                raise ExprError(f"expected a label name, found {_shown(label)}", label.column)
            self.take()
            allowed = _SCOPE_LABELS[scope]
            if label.text not in allowed and scope in (Scope.TYPE, Scope.HOST):
                what = "takes no labels" if not allowed else f"takes only {sorted(allowed)}"
                raise ExprError(f"{figure} ({scope.name.lower()} figure) {what}", label.column)
            if label.text == "instance" and scope is not Scope.INSTANCE:
                raise ExprError(f"{figure} is an engine figure: no instance label", label.column)
            op = self.tok
            if op.kind != "op" or op.text not in MATCH_OPS:
                raise ExprError(f"expected =, !=, =~ or !~, found {_shown(op)}", op.column)
            self.take()
            value = self.tok
            if value.kind != "string":
                raise ExprError(f"expected a quoted string, found {_shown(value)}", value.column)
            self.take()
            if op.text in ("=~", "!~"):
                try:
                    re.compile(value.value)
                except re.error as exc:
                    raise ExprError(f"bad regular expression: {exc}", value.column) from None
            out.append(Matcher(label.text, op.text, value.value))
            if self.at(","):
                self.take()
                continue
            self.expect("}", "',' or '}'")
            return tuple(out)


def _shown(tok: _Tok) -> str:
    return "the end" if tok.kind == "end" else repr(tok.text)


def _condition(node: Node, column: int, where: str) -> None:
    if not isinstance(node, _CONDITIONS):
        raise ExprError(f"'{where}' joins conditions (comparisons), not numbers", column)


def _number(node: Node, column: int, where: str) -> None:
    if isinstance(node, _CONDITIONS):
        raise ExprError(f"'{where}' takes numbers, not a condition", column)


def _figures(node: Node) -> set[str]:
    if isinstance(node, Fig):
        return {node.name}
    if isinstance(node, Num):
        return set()
    if isinstance(node, Neg | Not):
        return _figures(node.operand)
    return _figures(node.left) | _figures(node.right)


def parse_expr(text: str) -> Expr:
    """Parse a condition; ExprError (with its column) when it is not one."""
    if not text.strip():
        raise ExprError("empty expression (e.g. p99_ms > 250)", 1)
    try:
        root, col = _Parser(text).parse()
    except RecursionError:
        raise ExprError("nested too deeply", 1) from None
    if not isinstance(root, _CONDITIONS):
        raise ExprError("an alert needs a condition, e.g. p99_ms > 250 (a comparison)", col)
    figures = _figures(root)
    scope = min((FIGURES[f][0] for f in figures), default=Scope.HOST)
    return Expr(text, root, scope, frozenset(figures))
