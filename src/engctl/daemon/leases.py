"""Leases (docs/elastic.md): exclusive use of one idle, ready worker instance by a holder for a
time (`lease.acquire|renew|release|list`). A leased instance takes only its lease's requests
(`exec --lease`: pinned there, the router asks `pin`); the lease ends when it is released, when
it is not renewed within its ttl (capped by `[daemon] max_lease_ttl`), when its instance stops
taking requests, and with the daemon: a lease id names the daemon that granted it, so a holder
of one from before a restart is told so (LeaseError, exit 8).

Acquiring takes an idle instance matching the filters, has the autoscaler add one when none is
idle and an engine may grow, or waits up to `wait` seconds. The record is the instance's `lease`
(the membership keeps the pool in step); timers run on the loop's clock. Imports `instance`,
`scaler`, `selection`, `standby`, `supervisor`, `events` and the shared contract.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engctl.config import DaemonConfig
from engctl.errors import (
    BusyError,
    EngctlError,
    EngineNotFoundError,
    LeaseError,
    NoEligibleEngineError,
    UsageError,
)
from engctl.models import split_instance_id
from engctl.states import DesiredState, EngineMode, EventKind, InstanceState

from .events import EventLog
from .instance import Engine, Instance, Lease
from .scaler import Scaler
from .selection import CandidateKind, CandidatePool, Selector
from .standby import spec_matches
from .supervisor import Supervisor

if TYPE_CHECKING:
    from engctl.documents import LeaseDoc, LeasesDoc

S = InstanceState
# How often a waiting `acquire` looks for an idle instance (requests end without telling it).
POLL_SECONDS = 0.02
# Ended leases remembered for their holders' errors ("expired at …" rather than "unknown").
ENDED_KEPT = 4096
_LEASE_ID = re.compile(r"^L-([0-9a-f]{6})-\d+$")


class Leases:
    """Every lease held, by id; grants, renews, ends them, and answers the router about them."""

    def __init__(
        self,
        sup: Supervisor,
        pool: CandidatePool,
        scaler: Scaler,
        events: EventLog,
        config: DaemonConfig,
        on_standing: Callable[[Instance], None],
        on_ended: Callable[[], None],
    ) -> None:
        self.sup = sup
        self.pool = pool
        self.scaler = scaler
        self.events = events
        self.config = config
        self.loop = sup.loop
        # The membership: the pool follows an instance's lease (its eligibility).
        self._on_standing = on_standing
        # The router: requests of an ended lease that wait fail now, saying why.
        self._on_ended = on_ended
        # Names this daemon in every lease id (os.urandom, as secrets.token_hex: `secrets`
        # loads hashlib and with it OpenSSL, ~4 MiB of RSS).
        self.token = os.urandom(3).hex()
        self._seq = 0
        self.held: dict[str, Lease] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._ended: collections.OrderedDict[str, str] = collections.OrderedDict()

    # -- acquire -------------------------------------------------------------------------------
    async def acquire(
        self, selector: Selector, ttl: float, holder: str, wait: float
    ) -> tuple[LeaseDoc, float]:
        """Lease an idle ready instance passing `selector`'s filters (creating one if an
        engine may grow, else waiting up to `wait`); returns the lease and the ttl asked."""
        engines = self._engines(selector)
        granted = min(ttl, self.config.max_lease_ttl)
        deadline = self.loop.time() + wait
        while True:
            inst = self._idle(selector)
            if inst is not None:
                return self._grant(inst, granted, holder), ttl
            # Every turn, not once: an engine that may not grow now (a rollout under way, a
            # resize, at max) may when the rollout ends or instances leave.
            inst = await self._grow(engines, selector, holder)
            if inst is not None:
                return self._grant(inst, granted, holder), ttl
            left = deadline - self.loop.time()
            if left <= 0:
                raise BusyError(self._none_idle(engines, wait))
            await asyncio.sleep(min(POLL_SECONDS, left))

    def _engines(self, selector: Selector) -> list[Engine]:
        """The worker engines the filters allow; a filter no registered engine can pass is a
        one-line error naming it."""
        name = selector.engine
        if selector.instance is not None:
            owner = split_instance_id(selector.instance)[0]
            if name is not None and owner != name:
                raise UsageError(f"--instance {selector.instance} is not of engine {name!r}")
            name = owner
        if name is not None:
            engine = self.sup.engines.get(name)
            if engine is None:
                known = ", ".join(sorted(self.sup.engines)) or "none registered"
                raise EngineNotFoundError(f"unknown engine {name!r} (known: {known})")
            spec = engine.spec
            if selector.type is not None and spec.type != selector.type:
                raise UsageError(
                    f"--type {selector.type}: engine {name!r} is of type {spec.type!r}"
                )
            if spec.mode is not EngineMode.WORKER:
                raise UsageError(
                    f"engine {name!r} is a {spec.mode} engine: only a worker's instance can be"
                    " leased"
                )
        engines = [
            e
            for e in self.sup.engines.values()
            if e.spec.mode is EngineMode.WORKER and spec_matches(e.spec, selector)
        ]
        if not engines:
            raise NoEligibleEngineError(
                f"no worker engine matches the lease's filters ({_filters(selector)})"
            )
        return engines

    def _idle(self, selector: Selector) -> Instance | None:
        """The lowest-numbered idle instance the filters allow: ready, in service, no
        request in flight, no lease (the pool's eligible members hold no lease)."""
        pool_selector = dataclasses.replace(selector, instance=None)
        best: tuple[str, int] | None = None
        found: Instance | None = None
        for cand in self.pool.candidate_set(pool_selector).members:
            if cand.kind is not CandidateKind.INSTANCE or cand.in_flight:
                continue
            if selector.instance is not None and cand.id != selector.instance:
                continue
            inst = self.sup.find_instance(cand.id)
            if inst is None or inst.state is not S.READY or inst.lease is not None:
                continue
            rank = (inst.engine.spec.name, inst.index)
            if best is None or rank < best:
                best, found = rank, inst
        return found

    async def _grow(
        self, engines: list[Engine], selector: Selector, holder: str
    ) -> Instance | None:
        """Have the autoscaler add an instance for this lease (reserved from the start, so no
        request takes it), and wait for it to be ready; None when no engine may grow."""
        if selector.instance is not None:
            return None  # a named instance is leased as it is, or waited for
        reservation = Lease("", holder, "", "", 0.0, 0.0, 0.0, held=False)

        def reserve(inst: Instance) -> None:
            # Its id only when an instance starts for it: most calls of a waiting acquire
            # grow nothing.
            reservation.id = self._next_id()
            reservation.instance, reservation.engine = inst.id, inst.spec.name
            inst.lease = reservation

        inst = await self.scaler.grow_for_lease(engines, holder, reserve)
        if inst is None:
            return None
        spec = inst.spec
        limit = spec.restart.start_seconds + spec.start_timeout + 10.0
        try:
            await self.sup.wait_until(
                lambda: inst.state is S.READY or inst.removed or not inst.state.has_process,
                limit,
                f"{inst.id} to be ready",
            )
        finally:
            if inst.lease is reservation:
                inst.lease = None
                if inst.state is not S.READY:
                    self._on_standing(inst)
        if inst.state is not S.READY:
            raise BusyError(
                f"no idle instance to lease: {inst.id}, started for it, is {inst.state.value}:"
                f" {inst.state_reason}"
            )
        return inst

    def _grant(self, inst: Instance, ttl: float, holder: str) -> LeaseDoc:
        now = time.time()
        lease = Lease(self._next_id(), holder, inst.id, inst.spec.name, ttl, now, now + ttl)
        inst.lease = lease
        self.held[lease.id] = lease
        self._arm(lease)
        self._on_standing(inst)
        who = holder or "an unnamed holder"
        self.events.emit(
            EventKind.LEASE_ACQUIRED,
            f"{lease.id} held by {who} for {ttl:g}s",
            engine=lease.engine,
            instance=lease.instance,
            data={"lease": lease.id, "holder": holder, "ttl": ttl},
        )
        self.scaler.react()  # a warm pool may want a new spare
        return lease.to_json()

    def _next_id(self) -> str:
        self._seq += 1
        return f"L-{self.token}-{self._seq}"

    def _none_idle(self, engines: list[Engine], wait: float) -> str:
        ready = [i for e in engines for i in e.instances if i.state is S.READY]
        leased = sum(1 for i in ready if i.lease is not None)
        busy = sum(1 for i in ready if i.lease is None and i.stats.in_flight)
        names = ", ".join(sorted(e.spec.name for e in engines))
        waited = f" within {wait:g}s" if wait else " (no --wait)"
        stuck = [why for e in engines if (why := _not_growing(e))]
        cap = "; " + ", ".join(stuck) if stuck else ""
        return (
            f"no idle instance to lease{waited}: {names} has {len(ready)} ready, {leased}"
            f" leased, {busy} busy{cap}"
        )

    # -- renew, release, list ------------------------------------------------------------------
    def renew(self, lease_id: str, ttl: float | None) -> tuple[LeaseDoc, float]:
        """Hold `lease_id` for `ttl` more seconds from now (by default its own ttl)."""
        lease = self._held(lease_id)
        asked = lease.ttl if ttl is None else ttl
        lease.ttl = min(asked, self.config.max_lease_ttl)
        lease.expires_at = time.time() + lease.ttl
        self._arm(lease)
        return lease.to_json(), asked

    def release(self, lease_id: str) -> dict[str, Any]:
        """Give the instance back to the pool."""
        lease = self._held(lease_id)
        self._end(lease, EventKind.LEASE_RELEASED, f"was released at {_at(time.time())}")
        return {"released": lease.id, "instance": lease.instance, "engine": lease.engine}

    def list(self) -> LeasesDoc:
        leases = sorted(self.held.values(), key=lambda lease: (lease.acquired_at, lease.id))
        return {"leases": [lease.to_json() for lease in leases]}

    def _held(self, lease_id: str) -> Lease:
        lease = self.held.get(lease_id)
        if lease is None:
            raise self._not_held(lease_id)
        return lease

    def _not_held(self, lease_id: str) -> LeaseError:
        why = self._ended.get(lease_id)
        if why is not None:
            return LeaseError(f"lease {lease_id} is not held: it {why} (acquire a new one)")
        m = _LEASE_ID.match(lease_id)
        if m is not None and m.group(1) != self.token:
            return LeaseError(
                f"lease {lease_id} was granted by an earlier daemon: a daemon restart ends every"
                " lease (acquire a new one)"
            )
        return LeaseError(f"unknown lease {lease_id!r} (`engctl lease list` shows those held)")

    # -- ending ----------------------------------------------------------------------------------
    def _arm(self, lease: Lease) -> None:
        old = self._timers.pop(lease.id, None)
        if old is not None:
            old.cancel()
        self._timers[lease.id] = self.loop.call_later(lease.ttl, self._expire, lease)

    def _expire(self, lease: Lease) -> None:
        self._timers.pop(lease.id, None)
        if self.held.get(lease.id) is lease:
            why = f"expired at {_at(time.time())} (not renewed within its ttl of {lease.ttl:g}s)"
            self._end(lease, EventKind.LEASE_EXPIRED, why)

    def instance_gone(self, inst: Instance, reason: str) -> None:
        """The membership: a leased instance stopped taking requests (stopped, died,
        restarted): its lease ends."""
        lease = inst.lease
        if lease is not None and self.held.get(lease.id) is lease:
            self._end(lease, EventKind.LEASE_ENDED, f"ended at {_at(time.time())}: {reason}")

    def slot_replaced(self, old: Instance, new: Instance) -> None:
        """A rollout's successor took the leased slot: the lease goes with the slot (as its id
        does), so its holder's next requests run on the new process, still exclusively; those
        in flight finish on the old one."""
        lease = old.lease
        old.lease = None  # its drain and stop no longer end the lease
        if lease is not None and self.held.get(lease.id) is lease:
            new.lease = lease

    def _end(self, lease: Lease, kind: EventKind, why: str) -> None:
        self.held.pop(lease.id, None)
        timer = self._timers.pop(lease.id, None)
        if timer is not None:
            timer.cancel()
        self._ended[lease.id] = why
        while len(self._ended) > ENDED_KEPT:
            self._ended.popitem(last=False)
        inst = self.sup.find_instance(lease.instance)
        if inst is not None and inst.lease is lease:
            inst.lease = None
            self._on_standing(inst)  # back in the pool: waiting requests may take it
        who = f" (holder {lease.holder})" if lease.holder else ""
        self.events.emit(
            kind,
            f"{lease.id}{who} {why}",
            engine=lease.engine,
            instance=lease.instance,
            data={"lease": lease.id, "holder": lease.holder},
        )
        self._on_ended()
        self.scaler.react()

    def close(self) -> None:
        """Daemon shutdown: the timers go (a restart ends every lease anyway)."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()

    # -- the router's questions (requests that carry a lease) ----------------------------------
    def pin(self, selector: Selector) -> Selector:
        """The request's selector pinned to its lease's instance; LeaseError when the lease
        is not held, UsageError naming a filter that contradicts it."""
        assert selector.lease is not None
        lease = self.held.get(selector.lease)
        if lease is None or not lease.held:
            raise self._not_held(selector.lease)
        inst = self.sup.find_instance(lease.instance)
        if inst is None:
            raise self._not_held(selector.lease)
        spec = inst.spec
        where = f"lease {lease.id}: its instance {inst.id}"
        if selector.type is not None and selector.type != spec.type:
            raise UsageError(f"--type {selector.type} contradicts {where} is of type {spec.type}")
        if selector.engine is not None and selector.engine != spec.name:
            raise UsageError(f"--engine {selector.engine} contradicts {where} is of {spec.name}")
        if selector.instance is not None and selector.instance != inst.id:
            raise UsageError(f"--instance {selector.instance} contradicts {where} is another")
        missing = sorted(selector.require - frozenset(spec.capabilities))
        if missing:
            raise UsageError(f"--cap {missing[0]} contradicts {where} lacks it")
        wrong = sorted((k, v) for k, v in selector.labels if spec.labels.get(k) != v)
        if wrong:
            k, v = wrong[0]
            raise UsageError(f"--label {k}={v} contradicts {where} lacks it")
        return dataclasses.replace(selector, instance=inst.id)

    def not_held(self, lease_id: str) -> EngctlError | None:
        """The error for a request whose lease ended (None while it is held)."""
        lease = self.held.get(lease_id)
        return self._not_held(lease_id) if lease is None or not lease.held else None


def _not_growing(engine: Engine) -> str:
    """Why an autoscaled engine added no instance for a lease ("" when it is not one)."""
    scale = engine.spec.scale
    name = engine.spec.name
    if scale is None:
        return ""
    if engine.rolling_out:
        return f"{name} is rolling out (it grows again once the rollout ends)"
    if engine.desired is not DesiredState.RUNNING:
        return f"{name} is stopped"
    if len(engine.instances) >= scale.max:
        return f"{name} is at scale.max {scale.max}"
    return f"{name} is resizing"


def _at(when: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(when))


def _filters(selector: Selector) -> str:
    parts = [
        f"{flag} {value}"
        for flag, value in (
            ("--type", selector.type),
            ("--engine", selector.engine),
            ("--instance", selector.instance),
        )
        if value is not None
    ]
    parts += [f"--cap {c}" for c in sorted(selector.require)]
    parts += [f"--label {k}={v}" for k, v in sorted(selector.labels)]
    return " ".join(parts) or "no filters"
