"""Keeps the selection pool in step with the processes: the supervisor's observer (wired in
`main`). A worker that turns ready joins the pool, one that stops being ready leaves it, a
oneshot engine is a candidate of its own; eligibility and weight follow the failure policies.

It hands a spawned worker's stdout to the dispatcher (its channel), fails what a dead process
had in flight, and lets waiting requests try again when what they wait for changes. During a
rollout it makes the swap: the old process of a slot leaves the pool as its successor enters
it under the slot's id, so the pool never holds two candidates of one id. Decides nothing
about requests itself.

Must not import the enforcer (it is wired in as `PolicyHooks`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from engctl.models import EngineSpec, instance_id
from engctl.states import DesiredState, Eligibility, EngineMode, InstanceRole, InstanceState

from .dispatch import Dispatcher
from .instance import Instance
from .process import ChildProcess
from .router import Router
from .selection import Candidate, CandidateKind, CandidatePool
from .supervisor import Supervisor

S = InstanceState
_IN_SERVICE = (Eligibility.ACTIVE, Eligibility.DOWNWEIGHTED)


class PolicyHooks(Protocol):
    """What the failure policies hear first of every change (see `enforcer`)."""

    def state_changed(self, inst: Instance, old: InstanceState, new: InstanceState) -> None: ...

    def draining(self, inst: Instance, reason: str) -> None: ...

    def replaced(self, old: Instance, new: Instance) -> None: ...


class LeaseHooks(Protocol):
    """What the leases hear (see `leases`): a leased instance stopped taking requests, or a
    rollout's successor took a leased slot."""

    def instance_gone(self, inst: Instance, reason: str) -> None: ...

    def slot_replaced(self, old: Instance, new: Instance) -> None: ...


class Membership:
    """The supervisor's observer: the pool follows each instance's state, eligibility and
    weight, and each oneshot engine's registration."""

    def __init__(
        self, sup: Supervisor, pool: CandidatePool, dispatcher: Dispatcher, router: Router
    ) -> None:
        self.sup = sup
        self.pool = pool
        self.dispatcher = dispatcher
        self.router = router
        self.policies: PolicyHooks | None = None  # wired by the daemon (main.py)
        self.leases: LeaseHooks | None = None  # wired by the daemon (main.py)

    # -- supervision events (InstanceObserver) -------------------------------------------------
    def spawned(self, inst: Instance, proc: ChildProcess) -> Callable[[bytes], None]:
        """A worker process started: its stdout goes to a new channel."""
        return self.dispatcher.open_channel(inst, proc)

    def warming(self, inst: Instance) -> None:
        """A worker stayed up start_seconds: it is ready once it answers a ping."""
        send_ping = self.dispatcher.ping_sender(inst)
        if send_ping is not None:
            send_ping(lambda: self.sup.mark_ready(inst, "answered ping"))

    def state_changed(self, inst: Instance, old: InstanceState, new: InstanceState) -> None:
        # The policies first: the eligibility they settle is the one the pool is given.
        if self.policies is not None:
            self.policies.state_changed(inst, old, new)
        if new is S.STARTING:
            inst.stats.new_process()
        if new is S.READY and inst.spec.mode is EngineMode.WORKER:
            if inst.role is InstanceRole.CURRENT:  # a successor enters at the swap
                self._admit(inst)
        else:
            if old is S.READY and inst.key in self.pool:
                self.pool.remove(inst.key)  # no new requests; those in flight may still finish
            if not new.has_process:
                why = f"{inst.id} {new.value}: {inst.state_reason}"
                self.dispatcher.lose_pending(inst.key, why)
                if new in (S.FATAL, S.EXITED, S.STOPPED):
                    # Requests waiting for it may have nothing left to wait for: they fail
                    # now, saying why, rather than at their deadline.
                    self.router.retry_waiting(len(self.router.queue))
        if new is not S.READY and self.router.draining(inst):
            self.router.drained(inst)  # it stopped taking requests another way
        if inst.lease is not None and old is S.READY and self.leases is not None:
            self.leases.instance_gone(inst, f"{inst.id} {new.value}: {inst.state_reason}")

    def drain(self, inst: Instance, reason: str) -> asyncio.Future[None]:
        """No new request for `inst` (its standing now says draining, with `reason`); the
        future is done when none it runs is still awaited. Waiting requests pick again."""
        if self.policies is not None:
            self.policies.draining(inst, reason)
        elif inst.key in self.pool:
            self.pool.get(inst.key).eligible = False
        return self.router.drain(inst)

    def replaced(self, old: Instance, new: Instance, keys: tuple[str, str]) -> None:
        """A rollout's swap: `new` takes the slot of `old` (now retiring, drained next). In
        one step the old candidate leaves the pool and the new one enters it under the slot's
        id; requests in flight on the old process finish on it (their attempt holds its
        candidate and its channel)."""
        old_key, new_key = keys
        self.dispatcher.refile(old, old_key)  # first: it frees the slot's id
        self.dispatcher.refile(new, new_key)
        if old_key in self.pool:
            self.pool.remove(old_key)
        if self.policies is not None:
            self.policies.replaced(old, new)  # its verdict (and a manual override) first
        if old.lease is not None and self.leases is not None:
            # Before the successor enters the pool: a leased slot stays exclusive.
            self.leases.slot_replaced(old, new)
        self.router.slot_changed(new.id)
        if new.state is S.READY and new.spec.mode is EngineMode.WORKER:
            self._admit(new)

    # -- the failure policies' verdicts ----------------------------------------------------------
    def standing_changed(self, inst: Instance) -> None:
        """The instance's eligibility or effective weight changed: tell the selection pool."""
        if inst.key not in self.pool:
            return
        cand = self.pool.get(inst.key)
        eligible = inst.eligibility in _IN_SERVICE and inst.lease is None
        cand.ineligible_reason = "" if eligible else _ineligible(inst)
        cand.lease = _lease_of(inst)
        cand.effective_weight = inst.effective_weight
        was = cand.eligible
        cand.eligible = eligible
        if eligible and not was:
            self.router.retry_waiting()

    def _admit(self, inst: Instance) -> None:
        spec = inst.spec
        if inst.id in self.pool:
            self.pool.remove(inst.id)
        eligible = inst.eligibility in _IN_SERVICE and inst.lease is None
        cand = Candidate(
            inst.id,
            spec.name,
            spec.type,
            capabilities=spec.capabilities,
            labels=spec.labels,
            weight=spec.weight,
            effective_weight=min(inst.effective_weight, spec.weight),
            max_concurrency=spec.max_concurrency,
            latency_ms=inst.stats.latency_ewma_ms,
            eligible=eligible,
            ineligible_reason="" if eligible else _ineligible(inst),
        )
        cand.lease = _lease_of(inst)
        self.pool.add(cand)
        self.router.retry_waiting()

    # -- registrations -----------------------------------------------------------------------
    def engines_changed(self) -> None:
        """Oneshot engines are candidates without processes: keep them in step."""
        wanted = {
            instance_id(e.spec.name, None): e.spec
            for e in self.sup.engines.values()
            if e.spec.mode is EngineMode.ONESHOT and e.desired is DesiredState.RUNNING
        }
        for cand in list(self.pool):
            if cand.kind is CandidateKind.ONESHOT and cand.id not in wanted:
                self.pool.remove(cand.id)
        for cid, spec in wanted.items():
            if cid in self.pool:
                old = self.pool.get(cid)
                if old.type == spec.type and old.max_concurrency == _oneshot_capacity(spec):
                    continue
                self.pool.remove(cid)
            self.pool.add(
                Candidate(
                    cid,
                    spec.name,
                    spec.type,
                    capabilities=spec.capabilities,
                    labels=spec.labels,
                    weight=spec.weight,
                    max_concurrency=_oneshot_capacity(spec),
                    kind=CandidateKind.ONESHOT,
                )
            )
        self.router.engines_changed()


def _ineligible(inst: Instance) -> str:
    lease = inst.lease
    if lease is not None and inst.eligibility in _IN_SERVICE:
        return f"leased: {lease.id} held by {lease.holder or 'an unnamed holder'}"
    reason = inst.eligibility_reason
    return f"{inst.eligibility.value}: {reason}" if reason else inst.eligibility.value


def _lease_of(inst: Instance) -> str | None:
    """The lease whose requests the instance takes (one handed out, not one still waiting
    for its instance to start)."""
    lease = inst.lease
    return lease.id if lease is not None and lease.held else None


def _oneshot_capacity(spec: EngineSpec) -> int:
    """Runs of a oneshot engine at once: its `max_concurrency` (it has no instances)."""
    return spec.max_concurrency
