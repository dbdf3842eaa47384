"""Runs the alert rules on the policy tick: gathers the figures the rules name (instances,
engines, types, the host) into series, lets `alerts` decide, and emits `alert.pending`,
`alert.firing` and `alert.resolved` events (which the hooks hear like any other).

Reads the supervisor's, the router's and the roll-ups' figures; decides nothing itself.
Imports `alerts`, `events`, `instance`, `metrics`, `router` and `supervisor`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engctl.alertexpr import Scope
from engctl.config import DaemonConfig
from engctl.histogram import Histogram
from engctl.states import EngineMode, InstanceState

from .alerts import (
    BUILTIN_RULES,
    CPU_LIMIT,
    CPU_WINDOW,
    MEMORY_LIMIT,
    Alert,
    AlertBook,
    Rule,
    Series,
    Transition,
)
from .events import EventLog
from .instance import Engine, Instance
from .metrics import Rollups
from .router import Router
from .supervisor import Supervisor

if TYPE_CHECKING:
    from engctl.documents import LiveFigures

# The `queue_wait_ms` and `rate_limited` figures cover at least this many seconds (and at most
# twice as many): counts are taken against a base renewed every WINDOW seconds.
WINDOW = 10.0
# Figures that need the last seconds' request figures of every instance (Rollups.recent).
_RECENT = frozenset({"p50_ms", "p99_ms", "rps", "error_rate"})


class _Window:
    """A cumulative figure's value over the last WINDOW to 2 × WINDOW seconds."""

    def __init__(self, now: float) -> None:
        self.start = now
        self.base_hist: dict[str, Histogram] = {}
        self.base_count: dict[str, int] = {}
        self.prev_hist: dict[str, Histogram] = {}
        self.prev_count: dict[str, int] = {}

    def roll(self, now: float, hists: dict[str, Histogram], counts: dict[str, int]) -> None:
        if now - self.start < WINDOW:
            return
        self.prev_hist, self.prev_count = self.base_hist, self.base_count
        self.base_hist = {k: h.copy() for k, h in hists.items()}
        self.base_count = dict(counts)
        self.start = now


class Alerter:
    """The alert rules in force and their alerts; `tick` evaluates them (enforcer's tick)."""

    def __init__(
        self,
        sup: Supervisor,
        router: Router,
        rollups: Rollups | None,
        events: EventLog,
        config: DaemonConfig,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.sup = sup
        self.router = router
        self.rollups = rollups
        self.events = events
        self.wall = wall
        self.book = AlertBook()
        self.rules: tuple[Rule, ...] = ()
        self.config = config
        self.configure(config)
        self._window = _Window(0.0)
        self.evaluations = 0

    def configure(self, config: DaemonConfig) -> None:
        """New settings: the built-in rules and `[alerts.NAME]` (their alerts carry over)."""
        self.config = config
        self.rules = (*BUILTIN_RULES, *(Rule.of(r) for r in config.alerts))

    # -- the tick --------------------------------------------------------------------------------
    def tick(self, now: float) -> list[Transition]:
        """Evaluate every rule now; emit an event for each alert that moved."""
        router = self.router
        self._window.roll(
            now, router.gate.queue_wait_by_type, dict(router.gate.rate_limited_by_type)
        )
        series = self._series({r.expr.scope for r in self.rules}, self._figures())
        moved = self.book.evaluate(self.rules, series, now, self.wall())
        self.evaluations += 1
        for t in moved:
            self._emit(t)
        return moved

    def _figures(self) -> frozenset[str]:
        names: set[str] = set()
        for rule in self.rules:
            names |= rule.expr.figures
        return frozenset(names)

    def _emit(self, t: Transition) -> None:
        alert = t.alert
        self.events.emit(
            t.kind,
            t.reason,
            engine=alert.labels.get("engine"),
            instance=alert.labels.get("instance"),
            data=alert_data(alert),
        )

    # -- figures ---------------------------------------------------------------------------------
    def _series(self, scopes: set[Scope], figures: frozenset[str]) -> dict[Scope, list[Series]]:
        host = self._host()
        types = self._types(host) if scopes & {Scope.TYPE, Scope.ENGINE, Scope.INSTANCE} else {}
        out: dict[Scope, list[Series]] = {Scope.HOST: [Series(("host",), {}, host)]}
        if Scope.TYPE in scopes:
            out[Scope.TYPE] = [Series(("type", t), {"type": t}, v) for t, v in types.items()]
        if not scopes & {Scope.ENGINE, Scope.INSTANCE}:
            return out
        recent = self.rollups.recent() if self.rollups is not None and figures & _RECENT else {}
        # The built-in rules compare figures an instance has only where its engine's policy
        # says "alert": without rules of the users' own over instances, the others can fire
        # nothing and their series are not built (a fleet of 1,000 idle instances, each tick).
        every_instance = any(not r.builtin and r.expr.scope is Scope.INSTANCE for r in self.rules)
        engines: list[Series] = []
        instances: list[Series] = []
        for engine in self.sup.engines.values():
            spec = engine.spec
            if spec.mode is EngineMode.SERVICE and Scope.INSTANCE not in scopes:
                continue
            values = {**types.get(spec.type, host), **self._engine(engine)}
            labels = {"engine": spec.name, "type": spec.type}
            engines.append(Series(("engine", spec.name), labels, values, spec.labels))
            if Scope.INSTANCE not in scopes:
                continue
            if spec.mode is EngineMode.ONESHOT:
                member = f"{spec.name}#oneshot"
                own = _requests(engine.stats, recent.get(member))
                instances.append(
                    Series(
                        ("instance", member),
                        {"instance": member, **labels},
                        {**values, **own},
                        spec.labels,
                    )
                )
                continue
            for inst in engine.instances:
                if not every_instance and self._alert_limits(inst) == (False, False):
                    continue
                own = self._instance(inst, recent.get(inst.id))
                instances.append(
                    Series(
                        ("instance", inst.id),
                        {"instance": inst.id, **labels},
                        {**values, **own},
                        spec.labels,
                    )
                )
        out[Scope.ENGINE] = engines
        out[Scope.INSTANCE] = instances
        return out

    def _host(self) -> dict[str, float | None]:
        host = self.rollups.host if self.rollups is not None else None
        if host is None:
            return {"host_memory_percent": None, "host_cpu_percent": None}
        mem = 100.0 * host.mem_used / host.mem_total if host.mem_total else None
        return {"host_memory_percent": mem, "host_cpu_percent": host.cpu_percent}

    def _types(self, host: dict[str, float | None]) -> dict[str, dict[str, float | None]]:
        router = self.router
        waiting = router.queue_by_type()
        names = {e.spec.type for e in self.sup.engines.values()} | set(waiting) - {""}
        window = self._window
        out: dict[str, dict[str, float | None]] = {}
        for t in sorted(names):
            hist = router.gate.queue_wait_by_type.get(t)
            wait_p99 = None
            if hist is not None:
                base = window.prev_hist.get(t) or window.base_hist.get(t)
                recent = hist.minus(base) if base is not None else hist
                wait_p99 = recent.percentile_ms(0.99) if recent.count else None
            refused = router.gate.rate_limited_by_type.get(t, 0)
            refused -= window.prev_count.get(t, window.base_count.get(t, 0))
            out[t] = {
                **host,
                "queue_length": float(waiting.get(t, 0)),
                "queue_wait_ms": wait_p99,
                "rate_limited": float(max(0, refused)),
            }
        return out

    def _engine(self, engine: Engine) -> dict[str, float | None]:
        gate = self.router.admission.engines.get(engine.spec.name)
        adaptive = gate.adaptive.limit if gate is not None and gate.adaptive is not None else None
        in_flight = sum(i.stats.in_flight for i in engine.instances) + engine.stats.in_flight
        ready = sum(1 for i in engine.instances if i.state is InstanceState.READY)
        return {
            "engine_in_flight": float(in_flight),
            "adaptive_limit": None if adaptive is None else float(adaptive),
            "ready_instances": float(ready),
        }

    def _instance(self, inst: Instance, recent: LiveFigures | None) -> dict[str, float | None]:
        out = _requests(inst.stats, recent)
        spec = inst.spec
        sampled = inst.pid is not None and inst.sample.pid == inst.pid
        policy = inst.engine.policy(self.config.policy)
        limits = spec.limits
        cpu_alert, mem_alert = self._alert_limits(inst)
        out.update(
            {
                "rss_bytes": float(inst.sample.rss_bytes) if sampled else None,
                "cpu_percent": inst.sample.cpu_percent if sampled else None,
                "restarts": float(inst.restarts),
                "isolations": float(inst.isolations_total),
                "up": 1.0 if inst.pid is not None else 0.0,
                "max_rss": None if limits.max_rss is None else float(limits.max_rss),
                "max_cpu_percent": limits.max_cpu_percent,
                CPU_LIMIT: limits.max_cpu_percent if cpu_alert else None,
                CPU_WINDOW: policy.cpu.window if cpu_alert else None,
                MEMORY_LIMIT: float(limits.max_rss) if mem_alert and limits.max_rss else None,
            }
        )
        return out

    def _alert_limits(self, inst: Instance) -> tuple[bool, bool]:
        """Whether the built-in cpu and memory rules watch `inst` (its policy's action is
        "alert" and it has that limit)."""
        policy = inst.engine.policy(self.config.policy)
        limits = inst.spec.limits
        return (
            policy.cpu.action == "alert" and limits.max_cpu_percent is not None,
            policy.memory.action == "alert" and limits.max_rss is not None,
        )

    # -- reading ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """`alerts.list`: pending and firing alerts, and every rule with its counts."""
        alerts = self.book.alerts()
        counts: dict[str, list[int]] = {r.name: [0, 0] for r in self.rules}
        for a in alerts:
            c = counts.setdefault(a.rule.name, [0, 0])
            c[0 if a.state.value == "pending" else 1] += 1
        rules = []
        for r in self.rules:
            doc = r.to_json()
            doc["pending"], doc["firing"] = counts[r.name]
            rules.append(doc)
        return {
            "alerts": [a.to_json() for a in alerts],
            "rules": rules,
            "evaluations": self.evaluations,
        }


def _requests(stats: Any, recent: LiveFigures | None) -> dict[str, float | None]:
    rate = recent.get("success_rate") if recent is not None else None
    return {
        "p50_ms": recent.get("p50_ms") if recent is not None else None,
        "p99_ms": recent.get("p99_ms") if recent is not None else None,
        "rps": recent.get("rps") if recent is not None else None,
        "error_rate": None if rate is None else round(1.0 - rate, 4),
        "latency_ewma_ms": stats.latency_ewma_ms,
        "in_flight": float(stats.in_flight),
    }


def alert_data(alert: Alert) -> dict[str, Any]:
    """The `data` of an alert event: the alert as `alerts --json` shows it."""
    return alert.to_json()
