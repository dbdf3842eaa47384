"""Alert rules and hooks as config.toml declares them (`[alerts.NAME]`, `[hooks.NAME]`): their
checks, with a one-line error naming the field (and, for an expression, its column:
`engctl.alertexpr`). Shared contract between CLI and daemon: stdlib only.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

from engctl.alertexpr import Expr, ExprError, parse_expr
from engctl.errors import SpecError
from engctl.models import parse_argv
from engctl.states import EventKind, InstanceState
from engctl.timespec import config_duration

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


# -- rules ------------------------------------------------------------------------------------
class Severity(StrEnum):
    """How urgent a firing alert is (a label of its events and of the `ALERTS`-like gauge)."""

    INFO = "info"
    WARNING = "warning"
    CRITICAL = "critical"


# The rules the daemon always has (the cpu and memory policies' alerts); no user rule may take
# their names.
BUILTIN_RULES = ("cpu", "memory")


@dataclass(frozen=True)
class AlertRule:
    """`[alerts.NAME]`: a condition that fires after holding `for_seconds`."""

    name: str
    expr: Expr
    for_seconds: float = 0.0
    severity: Severity = Severity.WARNING
    labels: Mapping[str, str] = field(default_factory=dict)
    summary: str = ""

    def to_toml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"expr": self.expr.text}
        if self.for_seconds:
            out["for"] = f"{self.for_seconds:g}s"
        out["severity"] = self.severity.value
        if self.labels:
            out["labels"] = dict(self.labels)
        if self.summary:
            out["summary"] = self.summary
        return out


def _name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise SpecError(
            f"{where}: bad name {name!r} (letters, digits, '.', '_', '-'; starts with a letter"
            " or digit; at most 63 characters)"
        )
    return name


def _keys(data: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise SpecError(
            f"{where}.{unknown[0]}: unknown key {unknown[0]!r} (expected {', '.join(known)})"
        )


def _string_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise SpecError(f'{where}: expected a table of strings such as {{ team = "ops" }}')
    return dict(value)


def parse_alerts(table: Any, where: str = "alerts") -> tuple[AlertRule, ...]:
    """Validate the `[alerts.NAME]` tables; a SpecError names the field (and the column of an
    expression's error)."""
    if not isinstance(table, Mapping):
        raise SpecError(f"{where}: expected tables such as [alerts.slow]")
    rules: list[AlertRule] = []
    for name, data in table.items():
        here = f"{where}.{_name(name, f'{where}.{name}')}"
        if name in BUILTIN_RULES:
            raise SpecError(f"{here}: the name {name!r} belongs to a built-in rule")
        if not isinstance(data, Mapping):
            raise SpecError(f"{here}: expected a table with expr, for, severity, labels")
        _keys(data, ("expr", "for", "severity", "labels", "summary"), here)
        text = data.get("expr")
        if not isinstance(text, str):
            raise SpecError(f'{here}.expr: missing (a condition such as "p99_ms > 250")')
        try:
            expr = parse_expr(text)
        except ExprError as exc:
            raise SpecError(f"{here}.expr: {exc}") from None
        severity = data.get("severity", Severity.WARNING.value)
        if severity not in tuple(Severity):
            raise SpecError(
                f"{here}.severity: expected info, warning or critical, got {severity!r}"
            )
        summary = data.get("summary", "")
        if not isinstance(summary, str):
            raise SpecError(f"{here}.summary: expected a string, got {summary!r}")
        rules.append(
            AlertRule(
                str(name),
                expr,
                config_duration(data.get("for", 0), f"{here}.for"),
                Severity(severity),
                _string_map(data.get("labels", {}), f"{here}.labels"),
                summary,
            )
        )
    return tuple(rules)


# -- hooks ------------------------------------------------------------------------------------
class HookFormat(StrEnum):
    """What a URL hook posts."""

    # Alertmanager's webhook payload (version 4) for alert events; the event object otherwise.
    WEBHOOK = "webhook"
    # A list of alerts, as Alertmanager's POST /api/v2/alerts takes (alert events only).
    ALERTMANAGER = "alertmanager"
    EVENT = "event"  # always the event object (`events --json`'s)


DEFAULT_HOOK_TIMEOUT = 5.0
DEFAULT_HOOK_RETRIES = 3
# The kind of the event `engctl hooks test` sends when no other kind fits a hook's `on`.
TEST_KIND = "hook.test"


def event_kinds() -> list[str]:
    """Every kind a hook may match: the event kinds, `instance.<state>` for the state changes
    (`instance.fatal`, `instance.backoff`, …), and the test event's."""
    kinds = [k.value for k in EventKind]
    kinds += [f"instance.{s.value}" for s in InstanceState if s is not InstanceState.BUSY]
    return [*kinds, TEST_KIND]


@dataclass(frozen=True)
class HookSpec:
    """`[hooks.NAME]`: what runs (a command) or is posted to (a url) for the events it is on."""

    name: str
    on: tuple[str, ...]
    command: tuple[str, ...] | None = None
    url: str | None = None
    timeout: float = DEFAULT_HOOK_TIMEOUT
    retries: int = DEFAULT_HOOK_RETRIES
    format: HookFormat = HookFormat.WEBHOOK

    def wants(self, kinds: tuple[str, ...]) -> bool:
        """Whether an event known by `kinds` (its kind, and its pseudo-kind) is for this hook."""
        return any(fnmatch.fnmatchcase(k, glob) for glob in self.on for k in kinds)

    def to_toml(self) -> dict[str, Any]:
        out: dict[str, Any] = {"on": list(self.on)}
        if self.command is not None:
            out["command"] = list(self.command)
        if self.url is not None:
            out["url"] = self.url
            out["retries"] = self.retries
            out["format"] = self.format.value
        out["timeout"] = self.timeout
        return out


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine: localhost, 127.0.0.0/8 or ::1."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_url(url: Any, allowed_hosts: tuple[str, ...], where: str) -> str:
    """A hook's url: http(s), to a loopback address or a host of `[daemon] hook_hosts`."""
    if not isinstance(url, str) or not url:
        raise SpecError(f"{where}: expected a url such as http://127.0.0.1:9093/api/v2/alerts")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise SpecError(f"{where}: must be an http:// or https:// url, got {url!r}")
    host = parts.hostname or ""
    try:
        port = parts.port
    except ValueError:
        raise SpecError(f"{where}: bad port in {url!r}") from None
    if not host:
        raise SpecError(f"{where}: no host in {url!r}")
    if is_loopback(host):
        return url
    allowed = {h.lower() for h in allowed_hosts}
    if host.lower() in allowed or (port is not None and f"{host.lower()}:{port}" in allowed):
        return url
    raise SpecError(
        f"{where}: {host} is not a loopback address and not in [daemon] hook_hosts"
        f" (add {host!r} there to allow it)"
    )


def parse_hooks(
    table: Any, allowed_hosts: tuple[str, ...] = (), where: str = "hooks"
) -> tuple[HookSpec, ...]:
    """Validate the `[hooks.NAME]` tables."""
    if not isinstance(table, Mapping):
        raise SpecError(f"{where}: expected tables such as [hooks.page-me]")
    known_kinds = event_kinds()
    hooks: list[HookSpec] = []
    for name, data in table.items():
        here = f"{where}.{_name(name, f'{where}.{name}')}"
        if not isinstance(data, Mapping):
            raise SpecError(f"{here}: expected a table with on and a command or a url")
        _keys(data, ("on", "command", "url", "timeout", "retries", "format"), here)
        on = data.get("on")
        if (
            not isinstance(on, list)
            or not on
            or not all(isinstance(g, str) and g.strip() for g in on)
        ):
            raise SpecError(
                f'{here}.on: expected a list of event kinds or globs such as ["alert.*"]'
            )
        for glob in on:
            if not any(fnmatch.fnmatchcase(k, glob) for k in known_kinds):
                raise SpecError(
                    f"{here}.on: {glob!r} matches no event kind (kinds: docs/json.md#events;"
                    " state changes as instance.<state>, e.g. instance.fatal)"
                )
        command, url = data.get("command"), data.get("url")
        if command is None and url is None:
            raise SpecError(f"{here}: needs a command (event JSON on its stdin) or a url")
        if command is not None and url is not None:
            raise SpecError(f"{here}: has both a command and a url; give one (two hooks for both)")
        argv: tuple[str, ...] | None = None
        if command is not None:
            argv = parse_argv(command, f"{here}.command")
        else:
            url = check_url(url, allowed_hosts, f"{here}.url")
        timeout = config_duration(data.get("timeout", DEFAULT_HOOK_TIMEOUT), f"{here}.timeout")
        if not 0 < timeout <= 3600:
            raise SpecError(f"{here}.timeout: must be above 0 and at most 3600 seconds")
        retries = data.get("retries", DEFAULT_HOOK_RETRIES)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 20:
            raise SpecError(
                f"{here}.retries: expected a whole number from 0 to 20, got {retries!r}"
            )
        fmt = data.get("format", HookFormat.WEBHOOK.value)
        if fmt not in tuple(HookFormat):
            raise SpecError(f"{here}.format: expected webhook, alertmanager or event, got {fmt!r}")
        if command is not None and ("retries" in data or "format" in data):
            key = "retries" if "retries" in data else "format"
            raise SpecError(f"{here}.{key}: applies to url hooks only")
        hooks.append(HookSpec(str(name), tuple(on), argv, url, timeout, retries, HookFormat(fmt)))
    return tuple(hooks)
