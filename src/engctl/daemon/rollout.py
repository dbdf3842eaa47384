"""Carries out one engine's rollout (`engctl reload`, or a spec change that needs new
processes): describes the engine to `rollout_plan` at each change and does what the plan
decides through the supervisor. A surge step starts a successor beside a slot's process and
swaps it in once ready (the old one then drains and stops); an in-place step drains and stops
the slot's process, then starts the new one. On a failure what is on its way is undone: the
old processes keep serving. Keeps the rollout's record: status, events, the final object.

Supervision only: imports the supervisor, the records and the plan; no request code, no
failure policy.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from engctl.errors import RequestTimeoutError
from engctl.models import EngineSpec
from engctl.states import (
    DesiredState,
    Eligibility,
    EngineMode,
    EventKind,
    Health,
    InstanceRole,
    InstanceState,
    RolloutState,
    RolloutStrategy,
)

from .instance import Engine, Instance
from .process import ChildProcess
from .rollout_plan import Move, Phase, Plan, Proc, Settings, Slot, Step, View, plan
from .supervisor import Supervisor
from .tasks import TaskSet

if TYPE_CHECKING:
    from engctl.documents import RolloutDoc

log = logging.getLogger("engctl.rollout")

S = InstanceState
_IN_DISPATCH = (Eligibility.ACTIVE, Eligibility.DOWNWEIGHTED)
_PASSING = (Health.HEALTHY, Health.DEGRADED)
_IDLE = (S.STOPPED, S.EXITED, S.FATAL)
_VERB = {RolloutStrategy.ROLLING: "rolling out", RolloutStrategy.RECREATE: "recreating"}


def check_gates(spec: EngineSpec) -> bool:
    """Whether a configured health check gates readiness (a worker's `ping` does not: its
    warm-up answered one already)."""
    return spec.health.check not in (None, "ping")


def serving_process(engine: Engine) -> tuple[EngineSpec, int] | None:
    """What a new slot of `engine` runs while its last rollout failed: the spec and generation
    of the oldest generation still serving (a scale-up must not start the version that just
    failed, as the old processes keep serving); None otherwise (the wanted spec)."""
    rollout = engine.rollout
    if not isinstance(rollout, Rollout) or rollout.state is not RolloutState.FAILED:
        return None
    older = [i for i in engine.instances if i.generation < engine.generation]
    if not older:
        return None
    oldest = min(older, key=lambda i: i.generation)
    return engine.spec.with_process_of(oldest.spec), oldest.generation


class Rollout:
    """One rollout of one engine: run by `run` while the caller holds the engine's lock."""

    def __init__(
        self,
        sup: Supervisor,
        engine: Engine,
        *,
        cause: str,
        strategy: RolloutStrategy = RolloutStrategy.ROLLING,
        max_surge: int | None = None,
        max_unavailable: int | None = None,
        timeout: float | None = None,
        only: set[int] | None = None,
    ) -> None:
        self.sup = sup
        self.engine = engine
        self.cause = cause
        self.strategy = strategy
        spec = engine.spec.rollout
        self.max_surge = spec.max_surge if max_surge is None else max_surge
        self.max_unavailable = spec.max_unavailable if max_unavailable is None else max_unavailable
        self.timeout = timeout
        self.generation = engine.generation
        # Slots the rollout may touch (None: all); each named one's process is replaced even
        # if it runs the wanted generation (`reload NAME#K`).
        self.only = only
        self.renew: dict[int, ChildProcess] = {}
        if only is not None:
            for inst in engine.instances:
                if inst.index in only and inst.proc is not None and inst.state.has_process:
                    self.renew[inst.index] = inst.proc
        self.state = RolloutState.RUNNING
        self.ok: bool | None = None
        self.failure = ""
        self.started_at = time.time()
        self._t0 = sup.clock()
        self._t1: float | None = None
        self.steps = 0
        self.total = 0
        self.replaced: list[str] = []
        self.finished: asyncio.Future[None] = sup.loop.create_future()
        self._stop_reason: str | None = None
        self._vacating: set[int] = set()  # drained and stopped, the new process not started yet
        self._replacing: set[int] = set()  # replaced in place, the new process not ready yet
        # What an in-place step replaced: (spec, generation, pid), to report it or go back.
        self._before: dict[int, tuple[EngineSpec, int, int | None]] = {}
        self._tasks = TaskSet(sup.loop, "rollout step", sup.changed)

    # -- what others see ---------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.state is RolloutState.RUNNING

    def to_json(self) -> RolloutDoc:
        """The rollout object (`reload --json`, `status --json` "rollout")."""
        end = self._t1 if self._t1 is not None else self.sup.clock()
        return {
            "engine": self.engine.spec.name,
            "generation": self.generation,
            "strategy": self.strategy.value,
            "cause": self.cause,
            "state": self.state.value,
            "ok": self.ok,
            "reason": self.failure,
            "steps": self.steps,
            "replaced": list(self.replaced),
            "total": self.total,
            "max_surge": self.max_surge,
            "max_unavailable": self.max_unavailable,
            "started_at": self.started_at,
            "duration_s": round(end - self._t0, 3),
        }

    def stop(self, reason: str) -> None:
        """End the rollout at its next look (superseded, unregistered, daemon shutdown); what
        is on its way is undone."""
        if self._stop_reason is None:
            self._stop_reason = reason
        self.sup.changed()

    # -- the loop ----------------------------------------------------------------------------
    async def run(self) -> None:
        """Plan, act, wait for a change; until finished or stopped. The caller holds the
        engine's lock."""
        try:
            # Not while a starting daemon still stops its predecessor's processes (they carry
            # the marker new ones would).
            await self.sup.spawn_allowed.wait()
            self._respec_idle()
            first = self._view(self.sup.clock())
            self.total = sum(1 for s in first.slots if s.wanted and s.due)
            self._emit(
                EventKind.ENGINE_ROLLOUT_STARTED,
                f"{_VERB[self.strategy]} generation {self.generation} ({self.cause}):"
                f" {self.total} instance(s) to replace, max_surge {self._settings().max_surge},"
                f" max_unavailable {self._max_unavailable()}",
                {
                    "generation": self.generation,
                    "total": self.total,
                    "strategy": self.strategy.value,
                    "max_surge": self._settings().max_surge,
                    "max_unavailable": self._max_unavailable(),
                },
            )
            while True:
                self._respec_idle()
                view = self._view(self.sup.clock())
                decided = self._decide(view)
                for step in decided.steps:
                    self._act(step)
                if decided.over:
                    abort = [s for s in decided.steps if s.move is Move.ABORT]
                    await self._end(abort[0].reason if abort else None)
                    return
                await self._wait(view, decided.wake_at)
        except Exception as exc:
            log.exception("rollout of %s failed", self.engine.spec.name)
            if self.running:
                await self._end(f"internal error: {exc} (see the daemon log)")
        finally:
            if not self.finished.done():
                self.finished.set_result(None)

    def _decide(self, view: View) -> Plan:
        if self._stop_reason is not None:
            return Plan((Step(Move.ABORT, None, self._stop_reason),))
        if self.engine.desired is not DesiredState.RUNNING or self.sup.closing:
            why = "the daemon is shutting down" if self.sup.closing else "the engine was stopped"
            return Plan((Step(Move.ABORT, None, why),))
        return plan(view, self._settings())

    def _max_unavailable(self) -> int:
        if self.strategy is RolloutStrategy.RECREATE:
            return max(1, len(self.engine.instances))  # every one at once
        return self.max_unavailable

    def _settings(self) -> Settings:
        spec = self.engine.spec
        return Settings(
            max_surge=0 if self.strategy is RolloutStrategy.RECREATE else self.max_surge,
            max_unavailable=self._max_unavailable(),
            ready_within=spec.restart.start_seconds + spec.start_timeout,
            deadline=None if self.timeout is None else self._t0 + self.timeout,
        )

    async def _wait(self, view: View, wake_at: float | None) -> None:
        """Until the view changes, the rollout is stopped, or `wake_at` (monotonic)."""
        seen = dataclasses.replace(view, now=0.0)

        def changed() -> bool:
            now = dataclasses.replace(self._view(0.0), now=0.0)
            return self._stop_reason is not None or now != seen

        timeout = None if wake_at is None else max(0.0, wake_at - self.sup.clock())
        with contextlib.suppress(RequestTimeoutError):
            await self.sup.wait_until(changed, timeout, "a rollout step")

    # -- the engine as the plan sees it -----------------------------------------------------
    def _view(self, now: float) -> View:
        engine = self.engine
        successors = {i.index: i for i in engine.surge if i.role is InstanceRole.SUCCESSOR}
        slots = []
        for inst in engine.instances:
            k = inst.index
            succ = successors.get(k)
            replacing = k in self._replacing
            if k in self._vacating:
                current = Proc(Phase.STOPPING)
            elif replacing:
                current = self._new_process(inst)
            else:
                current = self._current(inst)
            slots.append(
                Slot(
                    k,
                    inst.id,
                    current,
                    wanted=self._wanted(inst),
                    due=not replacing and self._due(inst),
                    successor=None if succ is None else self._new_process(succ),
                    replacing=replacing,
                )
            )
        retiring = sum(1 for i in engine.surge if i.role is InstanceRole.RETIRING)
        return View(tuple(slots), retiring, now)

    def _wanted(self, inst: Instance) -> bool:
        engine = self.engine
        return (
            engine.desired is DesiredState.RUNNING
            and inst.index not in engine.stopped_instances
            and not inst.removed
            and not self.sup.closing
        )

    def _due(self, inst: Instance) -> bool:
        """Whether the slot's process must be replaced by this rollout."""
        if self.only is not None and inst.index not in self.only:
            return False
        if not (inst.state.has_process or inst.state is S.BACKOFF):
            return False
        renew = self.renew.get(inst.index)
        return inst.generation < self.generation or (renew is not None and inst.proc is renew)

    def _respec_idle(self) -> None:
        """A slot without a process, and none on its way, runs the wanted spec from its next
        start: nothing to replace (its own lifecycle starts it, or a `start`)."""
        for inst in self.engine.instances:
            busy = inst.index in self._vacating or inst.index in self._replacing
            if not busy and inst.state in _IDLE and inst.generation != self.engine.generation:
                inst.adopt_wanted()

    def _current(self, inst: Instance) -> Proc:
        """A slot's process as the availability count sees it: serving when it is in dispatch
        (a worker) or ready (a service), and passing its check if one is configured."""
        since = inst.launch_mono
        state = inst.state
        if inst.failure:
            return Proc(Phase.FAILED, since, inst.failure)
        if state is S.READY:
            serving = not inst.draining and (
                inst.spec.mode is not EngineMode.WORKER or inst.eligibility in _IN_DISPATCH
            )
            if serving and check_gates(inst.spec):
                serving = inst.health in _PASSING
            return Proc(Phase.SERVING if serving else Phase.STARTING, since)
        return self._phase(inst, since)

    def _new_process(self, inst: Instance) -> Proc:
        """A new process (a successor, or one started in place): serving once ready, and
        passing its check if one is configured."""
        since = inst.launch_mono
        if inst.failure:
            return Proc(Phase.FAILED, since, inst.failure)
        if inst.state is S.READY:
            passing = not check_gates(inst.spec) or inst.health in _PASSING
            return Proc(Phase.SERVING if passing else Phase.STARTING, since)
        return self._phase(inst, since)

    @staticmethod
    def _phase(inst: Instance, since: float) -> Proc:
        state = inst.state
        if state in (S.STARTING, S.WARMING):
            return Proc(Phase.STARTING, since)
        if state is S.STOPPING:
            return Proc(Phase.STOPPING, since)
        if state is S.STOPPED:
            return Proc(Phase.NONE, since)
        # backoff, exited, fatal: what ended it, without what the supervisor did next
        return Proc(Phase.FAILED, since, inst.state_reason.split("; ")[0])

    # -- carrying out the plan ---------------------------------------------------------------
    def _act(self, step: Step) -> None:
        if step.index is None:
            return  # the end of the rollout: `run` ends it
        engine = self.engine
        inst = engine.instances[step.index]
        if step.move is Move.SURGE:
            self.steps += 1
            self.sup.start_successor(inst, f"rollout to generation {self.generation}")
        elif step.move is Move.SWAP:
            succ = self._successor(step.index)
            if succ is not None:
                old_gen, old_pid = inst.generation, inst.pid
                self.sup.swap(inst, succ)
                self._replaced(succ, old_gen, old_pid)
                self._tasks.spawn(self._retire(inst))
        elif step.move is Move.VACATE:
            self.steps += 1
            self._vacating.add(step.index)
            self._replacing.add(step.index)
            self._before[step.index] = (inst.spec, inst.generation, inst.pid)
            self._tasks.spawn(self._vacate(inst))
        elif step.move is Move.SETTLED:
            self._replacing.discard(step.index)
            inst.gated = False
            _spec, old_gen, old_pid = self._before.pop(step.index)
            self._replaced(inst, old_gen, old_pid)
        elif step.move is Move.DROP:
            succ = self._successor(step.index)
            if succ is not None and succ.state is not S.STOPPING:
                self._tasks.spawn(self._stop(succ, "its slot is no longer wanted running"))

    def _successor(self, index: int) -> Instance | None:
        for inst in self.engine.surge:
            if inst.index == index and inst.role is InstanceRole.SUCCESSOR:
                return inst
        return None

    async def _retire(self, old: Instance) -> None:
        """A replaced process: it drains (requests in flight finish on it), then stops."""
        try:
            await self.sup.drain_and_stop(old, f"replaced by generation {self.generation}")
        finally:
            self.sup.forget(old)

    async def _stop(self, inst: Instance, reason: str) -> None:
        """Stop a successor that will not take its slot."""
        try:
            await self.sup.stop_instance(inst, reason)
        finally:
            self.sup.forget(inst)

    async def _vacate(self, inst: Instance) -> None:
        """An in-place step: drain and stop the slot's process, then start the wanted spec
        (unless the rollout stopped meanwhile: then the old one starts again)."""
        k = inst.index
        inst.restarting = True  # requests for it wait for the new process
        try:
            await self.sup.drain_and_stop(
                inst, f"rollout to generation {self.generation}", restart=True
            )
            if inst.state is not S.STOPPED or not self._wanted(inst):
                self._replacing.discard(k)
                return
            if not self.running or self._stop_reason is not None:
                self._replacing.discard(k)
                self.sup.start_instance(inst, "the rollout stopped: its generation again")
                return
            inst.adopt_wanted()
            inst.gated = True
            self.sup.start_instance(inst, f"rollout to generation {self.generation}")
        finally:
            inst.restarting = False
            self._vacating.discard(k)

    async def _roll_back(self, inst: Instance) -> None:
        """An in-place step that failed: the slot runs its old generation again."""
        k = inst.index
        spec, generation, _pid = self._before.pop(k)
        inst.gated = False
        inst.restarting = True
        try:
            await self.sup.drain_and_stop(inst, "the rollout stopped", restart=True)
            inst.spec = self.engine.spec.with_process_of(spec)
            inst.generation = generation
            if inst.state is S.STOPPED and self._wanted(inst):
                why = f"the rollout stopped: back to generation {generation}"
                self.sup.start_instance(inst, why)
        finally:
            inst.restarting = False
            self._replacing.discard(k)

    def _replaced(self, new: Instance, old_gen: int, old_pid: int | None) -> None:
        """One step done: a process of the wanted generation serves the slot."""
        self.replaced.append(new.id)
        done, total = len(self.replaced), max(self.total, len(self.replaced))
        old = "-" if old_pid is None else str(old_pid)
        self._emit(
            EventKind.INSTANCE_REPLACED,
            f"generation {old_gen} -> {new.generation}: pid {old} -> {new.pid}"
            f" (step {done} of {total})",
            {
                "from_generation": old_gen,
                "generation": new.generation,
                "old_pid": old_pid,
                "pid": new.pid,
                "step": done,
                "total": total,
            },
            instance=new.id,
        )

    async def _end(self, failure: str | None) -> None:
        """Finish, or stop and undo what is on its way; wait for every step to settle."""
        if failure is not None:
            undo: list[Coroutine[Any, Any, None]] = []
            for inst in list(self.engine.surge):
                if inst.role is InstanceRole.SUCCESSOR and inst.state is not S.STOPPING:
                    undo.append(self._stop(inst, f"the rollout stopped: {failure}"))
            for k in sorted(self._replacing - self._vacating):
                undo.append(self._roll_back(self.engine.instances[k]))
            self.state = RolloutState.FAILED  # vacating steps now start the old spec again
            await asyncio.gather(*undo, return_exceptions=True)
        await self._tasks.join()
        self._t1 = self.sup.clock()
        self.ok = failure is None
        self.failure = failure or ""
        self.state = RolloutState.FINISHED if self.ok else RolloutState.FAILED
        doc = dict(self.to_json())
        if self.ok:
            self._emit(
                EventKind.ENGINE_ROLLOUT_FINISHED,
                f"generation {self.generation}: {len(self.replaced)} replaced in"
                f" {doc['duration_s']:.1f}s",
                doc,
            )
        else:
            self._emit(EventKind.ENGINE_ROLLOUT_FAILED, self.failure, doc)

    def _emit(
        self, kind: EventKind, reason: str, data: dict[str, Any], instance: str | None = None
    ) -> None:
        self.sup.events.emit(
            kind, reason, engine=self.engine.spec.name, instance=instance, data=data
        )
