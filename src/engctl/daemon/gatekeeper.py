"""The router's wait queue and admission limits at work: what to do with a request that meets a
closed gate (wait for it, or be refused at once: a rate with no token before the deadline, an
adaptive engine with enough waiting), which gates a request passes on its way to an instance,
the queue's scan when capacity or tokens come, one loop timer for the next token, and the
figures (queue wait by priority and type, refusals).

The decisions are `admission`'s (pure); this applies them to requests. With no limit configured
(`Admission.active` false) the router skips every gate: nothing here is on its hot path.
Imports `admission`, `request` and `selection` only.
"""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from engctl.admission_config import DaemonLimits, format_rate
from engctl.errors import BusyError, EngctlError, RateLimitedError
from engctl.histogram import Histogram

from .admission import (
    Admission,
    EngineLimits,
    Gate,
    WaitQueue,
    acquire,
    adaptive_allowance,
    next_token_at,
    passes,
    release,
)
from .request import Request
from .selection import Candidate, CandidatePool

# Seconds a request admitted to wait for a token keeps for its run, at the least.
RUN_MARGIN = 0.02


class Wait:
    """A placement's outcome: the request waits in the queue."""


WAIT = Wait()
Outcome = EngctlError | Wait | None  # None: sent


class Gatekeeper:
    """The wait queue, the admission limits in force, and their figures."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pool: CandidatePool,
        limits: DaemonLimits,
        retry: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.pool = pool
        self.retry = retry  # the router's scan of the queue (a token came)
        self.queue = WaitQueue(limits.aging)
        self.admission = Admission(limits, loop.time())
        self._token_timer: asyncio.TimerHandle | None = None
        self._token_at = math.inf
        self._rate_waits: set[Gate] = set()  # gates with a bucket that requests wait for
        self._scan_soon = False  # a scan of the queue is due at the loop's next turn
        # Time requests waited in the queue: by priority (Prometheus) and by type (the
        # `queue_wait_ms` figure of alert rules); requests refused by a rate, by type.
        self.record = True
        self.queue_wait_by_priority: dict[int, Histogram] = {}
        self.queue_wait_by_type: dict[str, Histogram] = {}
        self.rate_limited_by_type: collections.Counter[str] = collections.Counter()

    def configure(self, limits: DaemonLimits, engines: Mapping[str, EngineLimits]) -> None:
        """New settings or engines: the limits and the queue's aging apply now."""
        self.queue.aging = limits.aging
        self.admission.configure(limits, engines, self.loop.time())

    # -- gates on the way --------------------------------------------------------------------
    def before_pick(self, req: Request) -> tuple[Gate | None, Outcome]:
        """The caller's gate, and the outcome when a gate known before a pick (the daemon's,
        the caller's, the type asked for) is closed (None: all open)."""
        adm = self.admission
        now = self.loop.time()
        caller_gate = adm.caller_gate(req.caller, now)
        fresh = None if req.queued_at else req.priority
        known = tuple(
            g for g in (adm.global_gate, caller_gate, adm.type_gate(req.selector.type)) if g
        )
        closed = passes(known, now, fresh)
        if closed is not None:
            return caller_gate, self.closed(req, closed, now)
        return caller_gate, None

    def admit(
        self,
        req: Request,
        cand: Candidate,
        caller_gate: Gate | None,
        free: list[Candidate] | None,
    ) -> Candidate | EngctlError | Wait:
        """Where `req` goes: `cand` if every gate on the way is open, else another free
        candidate whose gates are (`free`, or the free members of its filters); its gates are
        taken (`req.gates`). Or the outcome of the gate that holds it."""
        adm = self.admission
        now = self.loop.time()
        gates = adm.route_gates(cand.engine, cand.type)
        fresh = None if req.queued_at else req.priority
        closed = passes(gates, now, fresh)
        if closed is not None:
            # Another engine of the request's filters may have room (a scan: only when the
            # pick's engine or type is held back).
            members = free if free is not None else self.pool.candidate_set(req.selector).free
            others = [
                c
                for c in members
                if c.engine != cand.engine
                and not c.full
                and req.selector.instance in (None, c.id)
                and passes(adm.route_gates(c.engine, c.type), now, fresh) is None
            ]
            if not others:
                return self.closed(req, closed, now)
            cand = min(others, key=lambda c: (c.load, c.id))
            gates = adm.route_gates(cand.engine, cand.type)
        if caller_gate is not None:
            gates = (caller_gate, *gates)
        self.unblock(req)
        acquire(gates, now)
        req.gates = gates
        return cand

    def closed(self, req: Request, gate: Gate, now: float) -> EngctlError | Wait:
        """`req` meets a closed gate: it waits for it, or is refused at once when a rate gives
        it no token before its deadline, or an adaptive engine has enough waiting already."""
        bucket = gate.bucket
        if req.blocked is gate:
            # Already waiting for this gate: it was judged on arrival (a token in time, room to
            # wait) and keeps its place; its deadline still bounds the wait. Judging it again
            # would count the requests behind it too, and refuse it late instead of at once.
            pass
        elif bucket is not None and (gate.by_rate(now) or gate.waiting_ahead(req.priority)):
            if not self._scan_soon and bucket.has_token(now):
                # A token is there and older requests wait for it: they take it now (one scan
                # soon for any number of arrivals), rather than at the next timer.
                self._scan_soon = True
                self.loop.call_soon(self._scan_now)
            ahead = gate.waiting_ahead(req.priority)
            wait = bucket.wait(now, ahead)
            # The token must come in time for the request to run, not just before its deadline:
            # the run takes what the matching instances' latency says, and at least RUN_MARGIN
            # (the loop's own delays between a token and the dispatch).
            run = max(RUN_MARGIN, self._expected_seconds(req)) if wait else 0.0
            left = req.deadline - now - run
            if wait > left:
                gate.rate_limited += 1
                self.rate_limited_by_type[req.selector.type or ""] += 1
                return RateLimitedError(
                    f"rate limited: {gate.label()} allows {format_rate(bucket.rate)}"
                    f" (burst {bucket.burst}); the next token for this request comes in"
                    f" {wait:.2f}s, too late for its deadline ({max(0.0, left):.2f}s left to"
                    " start)",
                    {"scope": gate.kind.value, "name": gate.name, "retry_after_s": round(wait, 3)},
                )
        elif gate.adaptive is not None and gate.in_flight >= gate.adaptive.limit:
            waiting = sum(gate.waiting)
            allowance = adaptive_allowance(gate)
            if waiting >= allowance:
                gate.shed += 1
                return BusyError(
                    f"busy: {gate.label()} is at its adaptive concurrency limit"
                    f" {gate.adaptive.limit} and {waiting} requests already wait for it"
                    f" (at most {allowance})"
                )
        self._block(req, gate)
        why = "has no token yet" if gate.by_rate(now) else f"is at its limit ({gate.limit})"
        req.waiting_for = f"{gate.label()} {why}"
        return WAIT

    def _block(self, req: Request, gate: Gate | None) -> None:
        """`gate` keeps `req` waiting now (None: a free instance does)."""
        old = req.blocked
        if old is gate:
            return
        if old is not None:
            old.waiting[req.priority] -= 1
            if old.bucket is not None and not any(old.waiting):
                self._rate_waits.discard(old)
        elif gate is not None:
            gate.waited += 1
        req.blocked = gate
        if gate is not None:
            gate.waiting[req.priority] += 1
            if gate.bucket is not None:
                self._rate_waits.add(gate)

    def unblock(self, req: Request) -> None:
        """No gate holds `req` any more (it runs, leaves, or waits for an instance)."""
        if req.blocked is not None:
            self._block(req, None)

    def finished(self, req: Request, ok: bool, latency_ms: float) -> None:
        """An attempt that passed gates ended: their slots are free; a success's latency goes
        to the adaptive limit of its engine."""
        gates, req.gates = req.gates, ()
        release(gates)
        if ok and not req.settled:
            for gate in gates:
                if gate.adaptive is not None:
                    gate.adaptive.sample(latency_ms, self.loop.time())

    # -- the queue -----------------------------------------------------------------------------
    def enqueue(self, req: Request) -> None:
        """`req` waits: in the queue, in its class (what it waits for)."""
        now = self.loop.time()
        if not req.queued_at:
            req.queued_at = now
        selector = req.selector
        # Requests of one class wait for the same thing: a retry waits for its own untried
        # instances, so it is a class of its own.
        key: Any = ("retry", req.id) if req.tried else (selector.filter_key, selector.instance)
        adm = self.admission
        expected = 0.0
        if selector.type in adm.sjf_types and not req.tried:
            expected = self._expected_seconds(req)
        weight = adm.caller_weight(req.caller) if adm.limits.callers else 1.0
        req.entry = self.queue.push(req, req.priority, req.caller, now, key, weight, expected)
        if req.blocked is not None and req.blocked.bucket is not None:
            self._arm_token_timer(now)

    def _expected_seconds(self, req: Request) -> float:
        """What a request of an `sjf` type is expected to run: the mean latency EWMA of the
        instances its filters match (0 when none has one yet)."""
        members = self.pool.candidate_set(req.selector)
        known = [c.latency_ms for c in members if c.latency_ms is not None]
        return sum(known) / len(known) / 1000 if known else 0.0

    def dequeue(self, req: Request) -> None:
        """`req` leaves the queue without running (timed out, failed)."""
        entry, req.entry = req.entry, None
        if entry is not None:
            self.queue.discard(entry)
        self.unblock(req)

    def waited(self, req: Request) -> None:
        """A request that waited in the queue runs now: its wait is counted."""
        waited_ms = max(0.0, (self.loop.time() - req.queued_at) * 1000)
        req.queued_at = 0.0
        if not self.record:
            return
        by_priority = self.queue_wait_by_priority.get(req.priority)
        if by_priority is None:
            by_priority = self.queue_wait_by_priority[req.priority] = Histogram()
        by_priority.record_ms(waited_ms)
        t = req.selector.type or ""
        by_type = self.queue_wait_by_type.get(t)
        if by_type is None:
            by_type = self.queue_wait_by_type[t] = Histogram()
        by_type.record_ms(waited_ms)

    def scan(
        self,
        place: Callable[[Request], Outcome],
        fail: Callable[[Request, EngctlError], None],
        tries: int,
    ) -> None:
        """Offer what freed up to waiting requests in service order: up to `tries` placements,
        skipping the classes found blocked on the way."""
        queue = self.queue
        whole = self.admission.global_gate
        if whole is not None and whole.cap is not None and whole.in_flight >= whole.cap:
            return  # the daemon-wide cap: nothing can run until a request ends
        kept = []
        blocked: set[object] = set()  # classes that found nothing to run on in this scan
        while tries > 0:
            entry = queue.take(blocked.__contains__)
            if entry is None:
                break
            req: Request = entry.item
            if req.future.done:  # answered meanwhile: it leaves the queue
                req.entry = None
                self.unblock(req)
                continue
            tries -= 1
            outcome = place(req)
            if outcome is WAIT:
                blocked.add(entry.cls.key)
                kept.append(entry)
                continue
            req.entry = None
            if isinstance(outcome, EngctlError):
                self.unblock(req)
                fail(req, outcome)
            else:
                queue.served(entry)
        queue.put_back(kept)
        queue.tidy()
        if kept and self.admission.active:
            self._arm_token_timer(self.loop.time())

    def _arm_token_timer(self, now: float) -> None:
        """One loop timer for the next token of a rate that requests wait for."""
        at = next_token_at(self._rate_waits, now)
        if at is None or at >= self._token_at:
            return
        if self._token_timer is not None:
            self._token_timer.cancel()
        self._token_at = at
        self._token_timer = self.loop.call_at(at, self._token_due)

    def _scan_now(self) -> None:
        self._scan_soon = False
        self.retry()

    def _token_due(self) -> None:
        self._token_timer = None
        self._token_at = math.inf
        self.retry()
        if self.queue:
            self._arm_token_timer(self.loop.time())

    def waiting(self) -> Iterator[Request]:
        """The requests in the queue that still wait (in no particular order)."""
        for entry in self.queue.entries():
            req: Request = entry.item
            if not req.future.done:
                yield req

    def by_type(self) -> dict[str, int]:
        """Requests waiting, by the type they asked for ("" for none)."""
        out: dict[str, int] = {}
        for req in self.waiting():
            t = req.selector.type or ""
            out[t] = out.get(t, 0) + 1
        return out

    def close(self) -> list[Request]:
        """Empty the queue (daemon shutdown); returns what waited, for the router to fail."""
        if self._token_timer is not None:
            self._token_timer.cancel()
            self._token_timer = None
        return self.queue.clear()
