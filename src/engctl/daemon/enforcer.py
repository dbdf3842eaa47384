"""Carries out the failure policies: feeds observations to `policies`, acts on what they
decide, and keeps each instance's health, eligibility and effective weight in step with
dispatch.

Observations arrive from the router (request errors), the dispatcher's channels (requests
left unanswered, pings), the monitor (RSS and CPU samples), health probes (one timer per
instance) and a periodic tick (error rates, latency against peers, isolation ends, slow
start). Every action is an event with its reason. The policies' state of each instance is
its own (`PolicyState`), started afresh when it sees `starting`.

Must not import the router or the membership: it hears of them through the hooks wired in
`main`, and acts through the supervisor and the dispatcher's channels (pings). One piece
past 600 lines: every policy's action changes the same standing under the same guard rail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from engctl.config import DaemonConfig
from engctl.models import DEFAULT_TYPE, expand_index
from engctl.policy_config import PolicySpec
from engctl.states import (
    DrainCause,
    Eligibility,
    EngineMode,
    EventKind,
    Health,
    InstanceRole,
    InstanceState,
    OnUnhealthy,
)

from .events import EventLog
from .health import ping_probe, probe_env, run_probe
from .instance import Engine, Instance
from .monitor import Sample
from .policies import (
    Action,
    Decision,
    HealthChange,
    PolicyState,
    guard_rail,
    hang_suspected,
    hang_verdict,
    peer_median,
)
from .supervisor import Supervisor
from .tasks import TaskSet

if TYPE_CHECKING:
    from .dispatch import Dispatcher

log = logging.getLogger("engctl.enforcer")
Clock = Callable[[], float]

S = InstanceState
# Probes in flight at once, daemon-wide: a thousand instances must not fork a thousand checks.
MAX_CONCURRENT_PROBES = 16
_IN_SERVICE = (Eligibility.ACTIVE, Eligibility.DOWNWEIGHTED)
# Taken out of service by a policy or a person: what the guard rail counts.
_TAKEN_OUT = (Eligibility.ISOLATED, Eligibility.DRAINING)
_DISPATCHABLE = (InstanceState.READY,)


class StandingListener(Protocol):
    """Who hears of each new verdict (eligibility, effective weight): the selection pool."""

    def standing_changed(self, inst: Instance) -> None: ...


class TickListener(Protocol):
    """What else runs on the policy tick: the alert rules (`alerting`)."""

    def tick(self, now: float) -> object: ...


class Enforcer:
    """Applies every engine's effective policy to its instances."""

    def __init__(
        self,
        sup: Supervisor,
        channels: Dispatcher,
        config: DaemonConfig,
        events: EventLog,
        clock: Clock = time.monotonic,
    ) -> None:
        self.sup = sup
        self.clock = clock  # monotonic, the `now` of every decision (the loop's own clock)
        self.channels = channels  # the workers' pipes: pings, unanswered requests
        self.listener: StandingListener | None = None  # wired by the daemon (main.py)
        self.alerts: TickListener | None = None  # wired by the daemon (main.py)
        self.config = config
        self.events = events
        self.loop = sup.loop
        self._sem = asyncio.Semaphore(MAX_CONCURRENT_PROBES)
        self._tasks = TaskSet(sup.loop, "policy task")
        self._probe_timers: dict[Instance, asyncio.TimerHandle] = {}
        self._probing: set[Instance] = set()
        self._hang_checks: set[Instance] = set()
        self._returning: set[Instance] = set()
        self._guard_notes: set[Instance] = set()  # kept in service by the guard rail now
        # The policies' own state of each instance (trackers, standing), gone with it: a
        # plain dict (a weak one costs a weakref per lookup, four lookups per instance and
        # tick), purged of departed instances on the tick.
        self._states: dict[Instance, PolicyState] = {}
        self._closed = False
        self._timer = self.loop.call_later(config.policy_interval, self._tick)

    def policy(self, inst: Instance) -> PolicySpec:
        return inst.engine.policy(self.config.policy)

    def _state(self, inst: Instance) -> PolicyState:
        st = self._states.get(inst)
        if st is None:
            st = self._states[inst] = PolicyState()
        return st

    def overrides(self, engine: Engine) -> dict[int, dict[str, Any]]:
        """The manual overrides of `engine`'s instances by index (kept in the registry)."""
        out: dict[int, dict[str, Any]] = {}
        for inst in engine.instances:
            st = self._states.get(inst)
            manual = st.standing.manual if st is not None else None
            if st is not None and manual is not None:
                standing = st.standing
                out[inst.index] = {
                    "eligibility": manual.value,
                    "reason": standing.manual_reason,
                    "since": standing.manual_since,
                }
        return out

    def close(self) -> None:
        """Stop every timer and probe (daemon shutdown)."""
        self._closed = True
        self._timer.cancel()
        for handle in self._probe_timers.values():
            handle.cancel()
        self._probe_timers.clear()
        self._tasks.cancel()

    def _emit(self, inst: Instance, kind: EventKind, reason: str, **data: Any) -> None:
        self.events.emit(kind, reason, engine=inst.spec.name, instance=inst.id, data=data or None)

    # -- lifecycle ---------------------------------------------------------------------------
    def state_changed(self, inst: Instance, old: InstanceState, new: InstanceState) -> None:
        """From supervision (through the membership): a process came up or went away."""
        st = self._state(inst)
        if new is S.STARTING:
            # A new process: the trackers start afresh (the supervisor knows none of them).
            st.new_process(self.clock())
            inst.health_reason = ""
        elif not new.has_process:
            st.standing.draining_reason = ""  # a drain ends with its process
        if new is S.READY and old in (S.STARTING, S.WARMING):
            # A rollout waits for this process to pass its check: the first probe at once.
            self._arm_probe(inst, 0.0 if inst.gated else inst.spec.health.interval)
        elif not new.has_process:
            handle = self._probe_timers.pop(inst, None)
            if handle is not None:
                handle.cancel()
        self.refresh(inst)

    # -- eligibility ---------------------------------------------------------------------------
    def _refresh_inputs(self, inst: Instance, st: PolicyState) -> tuple[object, ...]:
        """All that `refresh` reads but the clock (which only a slow start or an isolation
        makes count): the same objects again give the same outcome."""
        standing = st.standing
        return (
            inst.state,
            inst.state_reason,
            inst.role,
            inst.spec,
            self.policy(inst),
            standing.manual,
            standing.manual_reason,
            standing.draining_reason,
            standing.isolated_until,
            standing.isolation_reason,
            standing.unhealthy_isolated,
            standing.health_reason,
            standing.slow_multiplier,
            standing.slow_start_since,
            st.health.state,
            st.failures.isolations,
        )

    def refresh(self, inst: Instance, announce: bool = True) -> None:
        """Recompute health, eligibility and effective weight, and tell dispatch."""
        now = self.clock()
        st = self._state(inst)
        st.refreshed_on = self._refresh_inputs(inst, st)
        standing = st.standing
        elig, reason, weight, until = standing.resolve(
            now, inst.spec.weight, self.policy(inst).failing.slow_start
        )
        if standing.manual is None and inst.state not in _DISPATCHABLE:
            # Nothing to pick, whatever the policies think of it: say which state and why.
            elig, weight, until = Eligibility.UNAVAILABLE, 0.0, None
            reason = f"{inst.state.value}: {inst.state_reason}"
        elif inst.role is InstanceRole.SUCCESSOR:
            elig, weight, until = Eligibility.UNAVAILABLE, 0.0, None
            reason = f"successor: in dispatch once it takes the place of {inst.id}'s process"
        elif inst.role is InstanceRole.RETIRING:
            elig, weight, until = Eligibility.DRAINING, 0.0, None
            reason = standing.draining_reason or "replaced by its successor: draining"
        probed = st.health.state
        if not inst.state.has_process:
            health = Health.UNKNOWN
        elif standing.slow_multiplier < 1.0 and probed in (Health.HEALTHY, Health.UNKNOWN):
            health = Health.DEGRADED
        else:
            health = probed
        old = inst.eligibility
        health_was = inst.health
        inst.health = health
        inst.eligibility = elig
        inst.eligibility_reason = reason
        inst.effective_weight = weight
        inst.isolated_until = None if until is None else time.time() + (until - now)
        inst.isolations = st.failures.isolations
        # To and from unavailable follows a state change, which is an event of its own.
        if announce and elig is not old and Eligibility.UNAVAILABLE not in (elig, old):
            self._emit(
                inst,
                EventKind.INSTANCE_ELIGIBILITY,
                f"{old.value} -> {elig.value}: {reason or 'full weight'}",
                from_eligibility=old.value,
                to_eligibility=elig.value,
            )
        if self.listener is not None:
            self.listener.standing_changed(inst)
        if elig is not old or health is not health_was:
            self.sup.changed()  # a rollout waits for readiness and counts who serves

    def _serving(self, inst: Instance) -> tuple[list[Instance], str]:
        """The guard rail's group of `inst` and its name: the instances that serve its type,
        or, for an engine left at the default type, its own engine's (`generic` is no type:
        unrelated services must not count as one group)."""
        spec = inst.spec
        if spec.type == DEFAULT_TYPE:
            engines = [inst.engine]
            group = f"engine {spec.name!r}"
        else:
            engines = [e for e in self.sup.engines.values() if e.spec.type == spec.type]
            group = f"type {spec.type!r}"
        serving = [
            i
            for e in engines
            if e.spec.mode is not EngineMode.ONESHOT
            for i in e.instances
            if i.state.has_process or i.state is S.BACKOFF
        ]
        return serving, group

    def _guard(self, inst: Instance, what: str) -> bool:
        """The guard rail: may `inst` be taken out of service? A refusal is an event when the
        decision changes (not on every failed request while it holds)."""
        serving, group = self._serving(inst)
        isolated = sum(1 for i in serving if i is not inst and i.eligibility in _TAKEN_OUT)
        pct = self.policy(inst).max_isolated_percent
        allowed, cap = guard_rail(len(serving), isolated, pct)
        if allowed:
            self._guard_notes.discard(inst)
            return True
        if inst not in self._guard_notes:
            self._guard_notes.add(inst)
            note = (
                f"guard rail kept {inst.id} in service ({what}): {isolated} of {len(serving)}"
                f" instances of {group} are already out"
                f" (max_isolated_percent {pct:g}% allows {cap})"
            )
            self._emit(
                inst, EventKind.POLICY_GUARD_RAIL, note, isolated=isolated, serving=len(serving)
            )
        return False

    def _isolate(self, inst: Instance, decision: Decision, now: float) -> None:
        standing = self._state(inst).standing
        if standing.isolated_until is not None or standing.manual is not None:
            return
        if inst.eligibility not in _IN_SERVICE:
            return
        if not self._guard(inst, decision.reason):
            return
        self._begin_isolation(inst, decision.reason, now, decision.data)
        self.refresh(inst, announce=False)

    def _begin_isolation(
        self, inst: Instance, reason: str, now: float, data: dict[str, Any]
    ) -> None:
        """Isolate for base × n (capped); the next one will last longer."""
        st = self._state(inst)
        length = st.failures.isolation_length(self.policy(inst).failing)
        st.failures.isolated(now)
        inst.isolations = st.failures.isolations
        inst.isolations_total += 1
        inst.stats.consecutive_errors = 0
        standing = st.standing
        standing.isolated_until = now + length
        standing.isolation_reason = reason
        standing.slow_start_since = None
        self._emit(
            inst,
            EventKind.INSTANCE_ISOLATED,
            f"isolated for {length:g}s: {reason}",
            seconds=length,
            isolations=st.failures.isolations,
            **data,
        )

    # -- request observations (from the router) ----------------------------------------------
    def request_failed(self, inst_id: str) -> None:
        """An attempt on `inst_id` failed (not lost to a dying process, not timed out)."""
        inst = self.sup.find_instance(inst_id)
        if inst is None:
            return
        decision = self._state(inst).failures.on_errors(
            inst.stats.consecutive_errors, inst.stats.last_error, self.policy(inst).failing
        )
        if decision is not None:
            self._isolate(inst, decision, self.clock())

    def _watch_hang(self, inst: Instance) -> None:
        """The hang policy, each tick: a request unanswered for the engine's hang_timeout
        gets the instance pinged. A caller's deadline plays no part (a busy synchronous
        worker cannot answer ping, and a short --timeout must not get it killed)."""
        if inst in self._hang_checks or inst.restarting or inst.proc is None:
            return
        hang = self.policy(inst).hang
        if not hang.enabled or inst.spec.mode is not EngineMode.WORKER:
            return
        if not hang_suspected(self.channels.unanswered_ages(inst), inst.spec.hang_timeout):
            return
        self._hang_checks.add(inst)
        self._tasks.spawn(self._check_hang(inst, inst.proc.pid, hang.ping_timeout))

    async def _check_hang(self, inst: Instance, pid: int, ping_timeout: float) -> None:
        try:
            heard = self.channels.last_read(inst)
            passed, _ = await ping_probe(self.channels.ping_sender(inst), ping_timeout)
            if inst.pid != pid or not inst.state.is_running:
                return
            # Answers to other requests while the ping waited: alive, if busy.
            alive = passed or self.channels.last_read(inst) > heard
            decision = hang_verdict(
                self.channels.unanswered_ages(inst),
                inst.spec.hang_timeout,
                ping_timeout,
                alive,
                inst.spec.max_concurrency,
            )
            if decision is None:
                return
            if decision.action is Action.KILL:
                self._emit(inst, EventKind.INSTANCE_HUNG, decision.reason, **decision.data)
                self.sup.kill_hung(inst, decision.reason)
            elif not inst.restarting:
                # Nothing to drain for those requests: their callers gave up already.
                self._drain_restart(inst, decision, self.policy(inst).memory.drain_timeout)
        finally:
            self._hang_checks.discard(inst)

    # -- monitor samples -----------------------------------------------------------------------
    def samples_taken(self, samples: dict[str, Sample]) -> None:
        """RSS and CPU of running instances: the memory and CPU policies (their restarts; with
        `action = "alert"` the built-in alert rules watch the limits instead)."""
        now = self.clock()
        for inst in self.sup.all_instances():
            sample = samples.get(inst.key)
            if sample is None or sample.pid != inst.pid or not inst.state.is_running:
                continue
            if inst.restarting or inst.draining:
                continue
            policy = self.policy(inst)
            limits = inst.spec.limits
            st = self._state(inst)
            max_rss = None if policy.memory.action == "alert" else limits.max_rss
            decision = st.memory.observe(now, sample.rss_bytes, max_rss, policy.memory)
            if decision is None and policy.cpu.action == "restart":
                decision = st.cpu.observe(
                    now, sample.cpu_percent, limits.max_cpu_percent, policy.cpu
                )
            if decision is not None:
                self._drain_restart(inst, decision, policy.memory.drain_timeout)

    def _drain_restart(self, inst: Instance, decision: Decision, timeout: float | None) -> None:
        """A graceful restart through the supervisor's drain (`drain_and_stop`): no new
        requests, those in flight finish (up to `timeout`; None: the stop timeout)."""
        if inst.restarting or inst.draining:
            return
        inst.restarting = True  # at once: the next sample must not ask a second time
        data = (
            decision.data if decision.cause is None else {**decision.data, "cause": decision.cause}
        )

        async def restart() -> None:
            try:
                await self.sup.restart_instance(inst, decision.reason, timeout=timeout, data=data)
            finally:
                inst.restarting = False

        self._tasks.spawn(restart())

    # -- health probes -------------------------------------------------------------------------
    def _arm_probe(self, inst: Instance, delay: float) -> None:
        if self._closed or inst.spec.health.check is None:
            return
        old = self._probe_timers.pop(inst, None)
        if old is not None:
            old.cancel()
        self._probe_timers[inst] = self.loop.call_later(delay, self._probe_due, inst)

    def _probe_due(self, inst: Instance) -> None:
        self._probe_timers.pop(inst, None)
        if inst.removed or not inst.state.is_running or inst in self._probing:
            return
        self._probing.add(inst)
        self._tasks.spawn(self._probe(inst))

    async def _check(self, inst: Instance) -> tuple[bool, str]:
        """Run the engine's check once (or a ping, or a liveness look, when it has none)."""
        spec = inst.spec
        check = spec.health.check
        if check is None:
            check = "ping" if spec.mode is EngineMode.WORKER else ""
        if not check:
            alive = inst.proc is not None and inst.proc.alive
            return alive, "process alive" if alive else "process gone"
        check = expand_index(check, inst.index)
        env = probe_env(spec, inst.id, inst.pid, self.sup.paths.daemon_id)
        async with self._sem:
            return await run_probe(
                check, spec, spec.health.timeout, self.channels.ping_sender(inst), env
            )

    async def _probe(self, inst: Instance) -> None:
        pid = inst.pid
        try:
            started = self.channels.last_read(inst)
            passed, detail = await self._check(inst)
            if inst.pid != pid or not inst.state.is_running:
                return
            if not passed and inst.spec.health.check == "ping" and inst.stats.in_flight > 0:
                if self.channels.last_read(inst) > started:
                    # A worker busy with requests answers them, not pings: it is alive.
                    passed, detail = True, "busy (answered requests while the ping waited)"
                elif not hang_suspected(
                    self.channels.unanswered_ages(inst), inst.spec.hang_timeout
                ):
                    # Busy with a request younger than hang_timeout (a synchronous worker reads
                    # no ping meanwhile): no evidence either way. Too long a request is the
                    # hang policy's to judge, not the health check's.
                    return
            now = self.clock()
            change = self._state(inst).health.observe(passed, now, inst.spec.health, detail)
            if change is not None:
                self._health_changed(inst, change, now)
        finally:
            self._probing.discard(inst)
            if inst.state.is_running:
                self._arm_probe(inst, inst.spec.health.interval)

    def _health_changed(self, inst: Instance, change: HealthChange, now: float) -> None:
        inst.health_reason = change.reason
        self._emit(
            inst,
            EventKind.INSTANCE_HEALTH,
            f"{change.old.value} -> {change.new.value}: {change.reason}",
            from_health=change.old.value,
            to_health=change.new.value,
        )
        standing = self._state(inst).standing
        if change.new is Health.UNHEALTHY and inst.spec.health.on_unhealthy is OnUnhealthy.RESTART:
            # Kubernetes' liveness probe: a graceful restart (drained first), not isolation.
            self._drain_restart(
                inst,
                Decision(
                    Action.DRAIN_RESTART,
                    f"unhealthy: {change.reason}",
                    cause=DrainCause.UNHEALTHY,
                ),
                None,
            )
        elif change.new is Health.UNHEALTHY:
            self._take_out_unhealthy(inst)
        elif change.new is Health.HEALTHY and standing.unhealthy_isolated:
            standing.unhealthy_isolated = False
            self._guard_notes.discard(inst)
            self._start_slow(inst, now)
            self._emit(inst, EventKind.INSTANCE_RETURNED, f"healthy again: {change.reason}")
        self.refresh(inst, announce=False)

    def _take_out_unhealthy(self, inst: Instance) -> None:
        standing = self._state(inst).standing
        if standing.unhealthy_isolated:
            return
        why = f"unhealthy: {inst.health_reason}"
        if self._guard(inst, why):
            standing.unhealthy_isolated = True
            standing.health_reason = why
            inst.isolations_total += 1
            self._emit(
                inst, EventKind.INSTANCE_ISOLATED, f"isolated until healthy: {inst.health_reason}"
            )

    def _start_slow(self, inst: Instance, now: float) -> None:
        if self.policy(inst).failing.slow_start > 0:
            self._state(inst).standing.slow_start_since = now

    # -- the periodic tick ---------------------------------------------------------------------
    def _tick(self) -> None:
        if self._closed:
            return
        self._timer = self.loop.call_later(self.config.policy_interval, self._tick)
        now = self.clock()
        try:
            self._evaluate(now)
        except Exception:
            log.exception("policy tick failed")
        if self.alerts is not None:
            try:
                self.alerts.tick(now)
            except Exception:  # a broken rule must not stop the policies' next look
                log.exception("alert rules failed")

    def _quiet(self, inst: Instance, st: PolicyState) -> bool:
        """Whether this tick would change nothing of `inst`: no request ended or is under way
        since the last tick, no failure, isolation, slow start, downweight or unhealthy check
        to follow, never judged slow (so no peer can make it so), and all a refresh reads as
        it was. Such an instance (an idle one) is skipped: a thousand of them cost a tenth."""
        stats = inst.stats
        failures = st.failures
        standing = st.standing
        return (
            stats.in_flight == 0
            and stats.ok == failures.ok_seen
            and stats.errors == failures.err_seen
            and not failures.window
            and not failures.isolations
            and standing.isolated_until is None
            and standing.slow_start_since is None
            and st.slow.multiplier >= 1.0
            and (stats.latency_ewma_ms is None or stats.ok < self.policy(inst).slow.min_requests)
            and st.health.state is not Health.UNHEALTHY
            and inst not in self._guard_notes
            and inst not in self._returning
            and st.refreshed_on == self._refresh_inputs(inst, st)
        )

    def _evaluate(self, now: float) -> None:
        latencies: dict[str, dict[str, float]] = {}
        running: list[Instance] = []
        instances = self.sup.all_instances()
        if len(self._states) > len(instances):
            alive = set(self.sup.all_records())
            for gone in [i for i in self._states if i not in alive]:
                del self._states[gone]
        for inst in instances:
            if inst.state.is_running and self._quiet(inst, self._state(inst)):
                continue
            if not inst.state.is_running:
                if (
                    inst.eligibility is not Eligibility.UNAVAILABLE
                    or inst.health is not Health.UNKNOWN
                ):
                    self.refresh(inst)
                continue
            running.append(inst)
            self._watch_hang(inst)
            policy = self.policy(inst)
            stats = inst.stats
            st = self._state(inst)
            standing = st.standing
            # Timeouts are the callers' deadlines, not failures of the worker: not counted.
            decision = st.failures.on_tick(now, stats.ok, stats.errors, policy.failing)
            if decision is not None:
                self._isolate(inst, decision, now)
            if (
                standing.isolated_until is not None
                and now >= standing.isolated_until
                and inst not in self._returning
            ):
                self._returning.add(inst)
                self._tasks.spawn(self._try_return(inst))
            unhealthy = st.health.state is Health.UNHEALTHY
            if (
                unhealthy
                and not standing.unhealthy_isolated
                and inst.spec.health.on_unhealthy is OnUnhealthy.ISOLATE
            ):
                self._take_out_unhealthy(inst)  # the guard rail may allow it now
            if (
                decision is None
                and not unhealthy
                and stats.consecutive_errors < policy.failing.consecutive_errors
            ):
                self._guard_notes.discard(inst)  # nothing to take it out for any more
            if (
                inst.eligibility in _IN_SERVICE
                and stats.latency_ewma_ms is not None
                and stats.ok >= policy.slow.min_requests
            ):
                latencies.setdefault(inst.spec.type, {})[inst.id] = stats.latency_ewma_ms
        for inst in running:
            peers = latencies.get(inst.spec.type, {})
            policy = self.policy(inst)
            own = peers.get(inst.id, inst.stats.latency_ewma_ms)
            st = self._state(inst)
            decision = st.slow.evaluate(
                now, own, inst.stats.ok, peer_median(inst.id, peers), policy.slow
            )
            if decision is not None:
                st.standing.slow_multiplier = st.slow.multiplier
                kind = (
                    EventKind.INSTANCE_DOWNWEIGHTED
                    if decision.action is Action.DOWNWEIGHT
                    else EventKind.INSTANCE_WEIGHT_RESTORED
                )
                self._emit(inst, kind, decision.reason, **decision.data)
            self.refresh(inst)

    async def _try_return(self, inst: Instance) -> None:
        """An isolation ended: a passing probe brings the instance back (with slow start)."""
        try:
            passed, detail = await self._check(inst)
            now = self.clock()
            standing = self._state(inst).standing
            if standing.isolated_until is None:
                return  # restored by hand meanwhile
            if passed:
                standing.isolated_until = None
                standing.isolation_reason = ""
                self._start_slow(inst, now)
                slow = self.policy(inst).failing.slow_start
                ramp = f"; slow start over {slow:g}s" if slow > 0 else ""
                self._emit(inst, EventKind.INSTANCE_RETURNED, f"back in service: {detail}{ramp}")
            else:
                self._begin_isolation(inst, f"still failing after isolation ({detail})", now, {})
            self.refresh(inst, announce=False)
        finally:
            self._returning.discard(inst)

    def replaced(self, old: Instance, new: Instance) -> None:
        """A rollout's new process took the slot of `old`: a manual override of the slot
        (isolate, drain by hand) stays with the slot, as it does across restarts."""
        was = self._states.get(old)
        if was is not None and was.standing.manual is not None:
            standing = self._state(new).standing
            standing.manual = was.standing.manual
            standing.manual_reason = was.standing.manual_reason
            standing.manual_since = was.standing.manual_since
        self.refresh(new, announce=False)
        self.refresh(old, announce=False)

    def draining(self, inst: Instance, reason: str) -> None:
        """The supervisor drains `inst` before a stop or restart: no dispatch, with `reason`
        (until its process is gone)."""
        self._state(inst).standing.draining_reason = reason
        self.refresh(inst, announce=False)

    # -- manual overrides ----------------------------------------------------------------------
    def set_manual(self, inst: Instance, eligibility: Eligibility | None, reason: str) -> None:
        """`isolate`/`drain` (win over policies until undone) or `restore` (None)."""
        st = self._state(inst)
        standing = st.standing
        if eligibility is None:
            standing.manual = None
            standing.manual_reason = ""
            standing.isolated_until = None
            standing.isolation_reason = ""
            standing.unhealthy_isolated = False
            standing.slow_multiplier = 1.0
            standing.slow_start_since = None
            st.slow.reset()
            inst.stats.consecutive_errors = 0
            self._guard_notes.discard(inst)
            self._emit(inst, EventKind.INSTANCE_RESTORED, _by_hand("restored", reason))
        else:
            if eligibility is Eligibility.ISOLATED and standing.manual is not eligibility:
                inst.isolations_total += 1
            standing.manual = eligibility
            standing.manual_reason = reason
            standing.manual_since = time.time()
            kind = (
                EventKind.INSTANCE_ISOLATED
                if eligibility is Eligibility.ISOLATED
                else EventKind.INSTANCE_DRAIN
            )
            verb = "isolated" if eligibility is Eligibility.ISOLATED else "draining"
            self._emit(inst, kind, _by_hand(verb, reason))
        self.refresh(inst, announce=False)

    def apply_saved(self, inst: Instance, saved: dict[str, Any]) -> None:
        """A manual override from the registry (a previous daemon's)."""
        with contextlib.suppress(ValueError, KeyError, TypeError):
            standing = self._state(inst).standing
            standing.manual = Eligibility(saved["eligibility"])
            standing.manual_reason = str(saved.get("reason", ""))
            standing.manual_since = float(saved.get("since", 0.0))
            self.refresh(inst, announce=False)


def _by_hand(verb: str, reason: str) -> str:
    return f"{verb} by hand: {reason}" if reason else f"{verb} by hand"
