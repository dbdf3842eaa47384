"""The admission limits in force: one `Gate` per limited thing (the whole daemon, a type, an
engine, a caller), each with an in-flight cap, a token bucket, an adaptive limit (engines),
or several; and `Admission`, which builds them from the settings and says which apply to a
request going to an engine.

A request runs only when every gate on its way is open: in flight below the limit, a token in
the bucket. It takes a token and an in-flight slot of each when it is sent, and gives the slots
back when it ends. A closed gate makes it wait (the router's queue); a bucket whose next token
comes after its deadline refuses it at once.

Part of `engctl.daemon.admission`: pure, time is passed in. Imports the stdlib, the shared
contract and the package's own modules only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from engctl.admission_config import (
    PRIORITY_MAX,
    DaemonLimits,
    QueueOrder,
    RateLimit,
)
from engctl.models import LimitsSpec

from .bucket import TokenBucket
from .gradient import GradientController, GradientParams

# Caller gates kept at most (callers are free strings): idle ones beyond this are forgotten.
MAX_CALLER_GATES = 10_000


class GateKind(StrEnum):
    """What a gate limits (the `scope` label of its figures)."""

    GLOBAL = "global"
    TYPE = "type"
    ENGINE = "engine"
    CALLER = "caller"


class Gate:
    """One limit: an in-flight cap, a token bucket and (engines) an adaptive limit, any of them;
    with the requests it holds, those waiting for it, and what it refused."""

    __slots__ = (
        "adaptive",
        "bucket",
        "cap",
        "in_flight",
        "kind",
        "name",
        "rate_limited",
        "shed",
        "waited",
        "waiting",
        "weight",
    )

    def __init__(
        self,
        kind: GateKind,
        name: str,
        cap: int | None = None,
        rate: RateLimit | None = None,
        now: float = 0.0,
        adaptive: GradientController | None = None,
        weight: float = 1.0,
    ) -> None:
        self.kind = kind
        self.name = name
        self.cap = cap
        self.bucket = None if rate is None else TokenBucket(rate.rate, rate.burst, now)
        self.adaptive = adaptive
        self.weight = weight  # a caller's share against the other callers of its priority
        self.in_flight = 0
        # Requests in the queue that this gate keeps waiting, by priority (a rate's wait is
        # counted from those of the same or a higher priority).
        self.waiting = [0] * (PRIORITY_MAX + 1)
        self.waited = 0  # requests that had to wait for it, ever
        self.rate_limited = 0  # refused at once: no token before their deadline
        self.shed = 0  # refused at once: over an adaptive limit with enough waiting already

    @property
    def limit(self) -> int | None:
        """The in-flight limit in force: the cap, the adaptive limit, or the lower of both."""
        cap = self.cap
        if self.adaptive is not None:
            lim = self.adaptive.limit
            return lim if cap is None or lim < cap else cap
        return cap

    def is_open(self, now: float) -> bool:
        """Whether a request may pass now: below its limit, and a token in its bucket."""
        limit = self.limit
        if limit is not None and self.in_flight >= limit:
            return False
        return self.bucket is None or self.bucket.has_token(now)

    def by_rate(self, now: float) -> bool:
        """Whether it is closed by its bucket alone (the in-flight limit has room)."""
        limit = self.limit
        room = limit is None or self.in_flight < limit
        return room and self.bucket is not None and not self.bucket.has_token(now)

    def waiting_ahead(self, priority: int) -> int:
        """Requests waiting for it with this priority or a higher one."""
        return sum(self.waiting[priority:])

    @property
    def idle(self) -> bool:
        return self.in_flight == 0 and not any(self.waiting)

    def label(self) -> str:
        """How a message names it: `engine onnx-small`, `type onnx`, `caller team-a`."""
        if self.kind is GateKind.GLOBAL:
            return "the daemon"
        name = self.name or "(anonymous)"
        return f"{self.kind.value} {name}"

    def to_json(self, now: float, wall: float) -> dict[str, Any]:
        """This gate in `status --json` (an engine's `admission`) and `admission` listings."""
        out: dict[str, Any] = {
            "in_flight": self.in_flight,
            "limit": self.limit,
            "max_in_flight": self.cap,
            "waiting": sum(self.waiting),
            "waited": self.waited,
            "rate_limited": self.rate_limited,
            "shed": self.shed,
            "rate": None,
            "adaptive": None,
        }
        if self.bucket is not None:
            out["rate"] = {
                "per_second": self.bucket.rate,
                "burst": self.bucket.burst,
                "tokens": round(self.bucket.level(now), 3),
            }
        if self.adaptive is not None:
            out["adaptive"] = self.adaptive.to_json(now, wall)
        return out


@dataclass(frozen=True)
class EngineLimits:
    """What `Admission` needs of an engine: its type, limits and capacity (instances × slots)."""

    type: str
    limits: LimitsSpec
    capacity: int


# An adaptive engine lets at most this share of its limit (at least one) wait for it; more are
# refused at once as busy, so the excess is shed instead of queueing into the latency.
ADAPTIVE_WAIT_SHARE = 0.25


def adaptive_allowance(gate: Gate) -> int:
    """Requests that may wait for an adaptive engine at its limit."""
    limit = gate.limit or 1
    return max(1, int(limit * ADAPTIVE_WAIT_SHARE))


class Admission:
    """The gates in force, built from `[daemon.limits]` and each engine's limits."""

    def __init__(self, limits: DaemonLimits | None = None, now: float = 0.0) -> None:
        self.limits = limits or DaemonLimits()
        self.global_gate: Gate | None = None
        self.types: dict[str, Gate] = {}
        self.engines: dict[str, Gate] = {}
        self.callers: dict[str, Gate] = {}
        self.sjf_types: frozenset[str] = frozenset()
        # (engine, type) -> the gates a request sent there passes (global, type, engine).
        self._route_gates: dict[tuple[str, str], tuple[Gate, ...]] = {}
        self._engines: Mapping[str, EngineLimits] = {}
        self.active = False  # any limit at all: the one check of the hot path when none
        self.configure(self.limits, {}, now)

    # -- settings ------------------------------------------------------------------------------
    def configure(
        self, limits: DaemonLimits, engines: Mapping[str, EngineLimits], now: float
    ) -> None:
        """Apply new settings; gates that stay keep their counts, tokens and controllers."""
        self.limits = limits
        self._engines = dict(engines)
        g = limits.max_in_flight
        if g is None:
            self.global_gate = None
        elif self.global_gate is None:
            self.global_gate = Gate(GateKind.GLOBAL, "", g, None, now)
        else:
            self.global_gate.cap = g
        types: dict[str, Gate] = {}
        for name, t in limits.types.items():
            if t.rate is None and t.max_in_flight is None:
                continue
            types[name] = self._keep(
                self.types.get(name), GateKind.TYPE, name, t.max_in_flight, t.rate, now
            )
        self.types = types
        self.sjf_types = frozenset(n for n, t in limits.types.items() if t.queue is QueueOrder.SJF)
        gates: dict[str, Gate] = {}
        for name, e in engines.items():
            spec = e.limits
            if spec.rate is None and spec.max_in_flight is None and not spec.adaptive:
                continue
            gate = self._keep(
                self.engines.get(name),
                GateKind.ENGINE,
                name,
                spec.max_in_flight,
                spec.rate_limit,
                now,
            )
            ceiling = max(1, min(e.capacity, spec.max_in_flight or e.capacity))
            if spec.adaptive:
                if gate.adaptive is None:
                    gate.adaptive = GradientController(now, GradientParams(max_limit=ceiling))
                else:
                    gate.adaptive.set_max(ceiling)
            else:
                gate.adaptive = None
            gates[name] = gate
        self.engines = gates
        # Callers: their gates are made when first seen; settings that changed apply now.
        for name, gate in list(self.callers.items()):
            found = limits.caller(name)
            if found is None or found.rate is None:
                del self.callers[name]
                continue
            self._retune(gate, None, found.rate, now)
            gate.weight = found.weight
        self._route_gates.clear()
        self.active = bool(
            self.global_gate is not None
            or self.types
            or self.engines
            or any(c.rate is not None for c in limits.callers.values())
        )

    def _keep(
        self,
        gate: Gate | None,
        kind: GateKind,
        name: str,
        cap: int | None,
        rate: RateLimit | None,
        now: float,
    ) -> Gate:
        if gate is None:
            return Gate(kind, name, cap, rate, now)
        self._retune(gate, cap, rate, now)
        return gate

    @staticmethod
    def _retune(gate: Gate, cap: int | None, rate: RateLimit | None, now: float) -> None:
        if gate.kind is not GateKind.CALLER:
            gate.cap = cap
        if rate is None:
            gate.bucket = None
        elif gate.bucket is None:
            gate.bucket = TokenBucket(rate.rate, rate.burst, now)
        else:
            gate.bucket.resize(rate.rate, rate.burst, now)

    # -- what applies ----------------------------------------------------------------------------
    def caller_gate(self, caller: str, now: float) -> Gate | None:
        """The gate of `caller` (made when first needed), or None when no caller limit applies."""
        gate = self.callers.get(caller)
        if gate is not None:
            return gate
        found = self.limits.caller(caller)
        if found is None:
            return None
        if found.rate is None:
            return None  # a weight only: no gate, the queue reads the weight
        if len(self.callers) >= MAX_CALLER_GATES:
            self._forget_idle_callers()
        gate = self.callers[caller] = Gate(
            GateKind.CALLER, caller, None, found.rate, now, weight=found.weight
        )
        return gate

    def caller_weight(self, caller: str) -> float:
        """A caller's share against the other callers of its priority."""
        found = self.limits.caller(caller)
        return 1.0 if found is None else found.weight

    def _forget_idle_callers(self) -> None:
        for name, gate in list(self.callers.items()):
            if gate.idle and gate.bucket is not None and gate.bucket.tokens >= gate.bucket.burst:
                del self.callers[name]

    def type_gate(self, type_: str | None) -> Gate | None:
        return None if type_ is None else self.types.get(type_)

    def route_gates(self, engine: str, type_: str) -> tuple[Gate, ...]:
        """The gates a request sent to `engine` (of `type_`) passes, besides its caller's."""
        key = (engine, type_)
        gates = self._route_gates.get(key)
        if gates is None:
            found = [self.global_gate, self.types.get(type_), self.engines.get(engine)]
            gates = self._route_gates[key] = tuple(g for g in found if g is not None)
        return gates

    def adaptive_gates(self) -> Iterable[Gate]:
        return (g for g in self.engines.values() if g.adaptive is not None)

    def all_gates(self) -> list[Gate]:
        out = [] if self.global_gate is None else [self.global_gate]
        return [*out, *self.types.values(), *self.engines.values(), *self.callers.values()]


def next_token_at(gates: Iterable[Gate], now: float) -> float | None:
    """When the next token comes for one of `gates` that requests wait for a token of (None:
    none waits for a token)."""
    soon: float | None = None
    for gate in gates:
        if gate.bucket is not None and any(gate.waiting) and gate.by_rate(now):
            at = gate.bucket.next_token_at(now)
            soon = at if soon is None or at < soon else soon
    return soon


def passes(gates: tuple[Gate, ...], now: float, fresh: int | None = None) -> Gate | None:
    """The first gate of `gates` that is closed now, or None when all are open. For a request
    not waiting yet (`fresh`: its priority), a bucket that requests of that priority or a
    higher one wait for is closed too: the tokens are theirs first (no overtaking the queue)."""
    for gate in gates:
        if not gate.is_open(now):
            return gate
        if fresh is not None and gate.bucket is not None and gate.waiting_ahead(fresh):
            return gate
    return None


def acquire(gates: tuple[Gate, ...], now: float) -> None:
    """A request passes `gates`: one in-flight slot and one token of each."""
    for gate in gates:
        gate.in_flight += 1
        bucket = gate.bucket
        if bucket is not None:
            bucket.take(now)


def release(gates: tuple[Gate, ...]) -> None:
    """A request that passed `gates` ended: its in-flight slots are free."""
    for gate in gates:
        if gate.in_flight > 0:
            gate.in_flight -= 1
