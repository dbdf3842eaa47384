"""Keeps each engine at its wanted instances: start, stop, restart with backoff, give up (fatal).

Every state change goes through `Supervisor.transition`, which checks the edge and records the
event with its reason. Spawning and signalling are `process`'s job; this module decides when.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from engctl.config import DaemonConfig
from engctl.errors import InstanceNotFoundError, RequestTimeoutError
from engctl.models import EngineSpec, check_dependencies, instance_id, split_instance_id
from engctl.paths import Paths
from engctl.policy_config import PolicySpec, effective_policy
from engctl.states import (
    DesiredState,
    Eligibility,
    EngineMode,
    Health,
    InstanceState,
    can_transition,
)

from . import process
from .backoff import CrashTracker, spawn_retry_delay
from .events import EventLog
from .logs import InstanceLog
from .policies import (
    Action,
    CpuWatch,
    FailureTracker,
    HealthTracker,
    MemoryWatch,
    SlowTracker,
    Standing,
)
from .process import ChildProcess, ExitStatus, SpawnError
from .registry import Entry
from .stats import RequestStats
from .storage import WriteHealth

log = logging.getLogger("engctl.supervisor")

S = InstanceState
_K = TypeVar("_K")
# How long `start` of a dependent waits for its dependencies to be ready.
DEPENDENCY_WAIT = 30.0


@dataclass
class Sample:
    """The latest psutil reading of an instance (process plus descendants)."""

    cpu_percent: float = 0.0
    rss_bytes: int = 0
    threads: int = 0
    fds: int = 0
    descendants: list[tuple[int, float]] = field(default_factory=list)
    pid: int = 0  # the leader it was taken of: a reading of a replaced process is dropped


class InstanceObserver(Protocol):
    """What the request layer needs to hear from supervision (it owns workers' stdin/stdout)."""

    def spawned(self, inst: Instance, proc: ChildProcess) -> Callable[[bytes], None] | None:
        """A worker process started: return the consumer of its stdout (b"" is EOF)."""

    def warming(self, inst: Instance) -> None:
        """The process stayed up start_seconds; it is ready once it answers (ping or `ready`)."""

    def state_changed(self, inst: Instance, old: InstanceState, new: InstanceState) -> None:
        """Called after every transition."""

    def drain(self, inst: Instance) -> asyncio.Future[None]:
        """Send `inst` no new request (its eligibility now says draining); the future is done
        once no request it runs is still awaited (at once when it runs none)."""


class Instance:
    """One process slot of an engine, `name#index`; survives restarts of its process."""

    def __init__(self, engine: Engine, index: int, log_file: InstanceLog) -> None:
        self.engine = engine
        self.index = index
        self.id = instance_id(engine.spec.name, index)
        self.state = S.STOPPED
        self.state_reason = "registered"
        self.state_since = time.time()
        self._state_mono = time.monotonic()
        self._state_time: dict[str, float] = {}
        self.isolations_total = 0  # by policy or by hand, since the daemon started
        self.health = Health.UNKNOWN
        self.eligibility = Eligibility.ACTIVE
        self.proc: ChildProcess | None = None
        self.restarts = 0
        self.crashes = CrashTracker()
        self.last_exit: dict[str, Any] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.sample = Sample()
        self.log = log_file
        self.removed = False
        self.ready_seen = False  # the worker announced `ready` before start_seconds passed
        self.stats = RequestStats()
        # Failure-policy state (decisions in `policies`, carried out by `enforcer`).
        self.standing = Standing()
        self.health_check = HealthTracker()
        self.health_reason = ""
        self.memory = MemoryWatch()
        self.cpu = CpuWatch()
        self.slow = SlowTracker()
        self.failures = FailureTracker()
        self.effective_weight = engine.spec.weight
        self.eligibility_reason = ""
        self.isolated_until: float | None = None  # wall-clock time
        # A drain is under way (then a stop); `restarting`: and a start after it, so requests
        # for it wait instead of failing.
        self.draining = False
        self.restarting = False
        self.kill_cause = ""  # why the daemon killed the process (hang), for the exit record
        self.spawn_retries = 0  # spawns in a row that failed for lack of fds or processes
        # Set when the daemon ends a process it judged failed (no answer during warm-up, no
        # stdout): its exit is then handled as a crash with this reason.
        self.failure = ""
        self.failed_start = False  # ... and counts as a failed start (towards max_retries)
        self.warmup_note = ""  # the last protocol error seen while warming up

    @property
    def spec(self) -> EngineSpec:
        return self.engine.spec

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.alive else None

    def state_seconds(self) -> dict[str, float]:
        """Seconds spent in each state since the daemon started, the current one included."""
        out = dict(self._state_time)
        cur = self.state.value
        out[cur] = out.get(cur, 0.0) + (time.monotonic() - self._state_mono)
        return out

    def _entered(self, old: InstanceState) -> None:
        now = time.monotonic()
        self._state_time[old.value] = self._state_time.get(old.value, 0.0) + (
            now - self._state_mono
        )
        self._state_mono = now

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def to_json(self) -> dict[str, Any]:
        """The documented per-instance object of `status --json`."""
        running = self.proc is not None and self.proc.alive
        # Until the monitor's first reading of this process its figures are unknown, not 0.
        sampled = running and self.sample.pid == self.pid
        state = self.state
        # busy is derived from the in-flight count, not recorded as an event per request.
        if state is S.READY and self.stats.in_flight >= self.spec.max_concurrency:
            state = S.BUSY
        return {
            "id": self.id,
            "pid": self.pid,
            "state": state.value,
            "state_reason": self.state_reason,
            "state_since": self.state_since,
            "health": self.health.value,
            "health_reason": self.health_reason,
            "eligibility": self.eligibility.value,
            "eligibility_reason": self.eligibility_reason,
            "isolated_until": self.isolated_until,
            "weight": self.spec.weight,
            "effective_weight": round(self.effective_weight, 4),
            "isolations": self.failures.isolations,
            "restarts": self.restarts,
            "uptime_s": round(time.monotonic() - self.proc.started_mono, 3)
            if running and self.proc
            else None,
            "cpu_percent": round(self.sample.cpu_percent, 1) if sampled else None,
            "rss_bytes": self.sample.rss_bytes if sampled else None,
            "threads": self.sample.threads if sampled else None,
            "fds": self.sample.fds if sampled else None,
            "last_exit": self.last_exit,
            "requests": self.stats.to_json(),
        }


class Engine:
    """A registered engine's runtime side: its current spec and instances."""

    def __init__(
        self, spec: EngineSpec, desired: DesiredState, registered_at: float | None = None
    ) -> None:
        self.spec = spec
        self.desired = desired
        # First registration (kept across updates and daemon restarts); unknown in a registry
        # written before it was recorded: then the first daemon to load it records its time.
        self.registered_at = time.time() if registered_at is None else registered_at
        # Indices stopped by hand: `start ENGINE` of the whole engine leaves them alone
        # only if they were named; persisted with the registry.
        self.stopped_instances: set[int] = set()
        self.instances: list[Instance] = []
        self.lock = asyncio.Lock()
        self.stats = RequestStats()  # requests of a oneshot engine (it has no instances)
        self.oneshot_log: InstanceLog | None = None  # stderr of a oneshot engine's runs
        self._policy: tuple[EngineSpec, Any, PolicySpec] | None = None

    def policy(self, daemon_policy: Any) -> PolicySpec:
        """The effective failure policy (defaults < daemon config < this engine)."""
        cached = self._policy
        if cached is None or cached[0] is not self.spec or cached[1] is not daemon_policy:
            merged = effective_policy(daemon_policy, self.spec.policy)[0]
            cached = self._policy = (self.spec, daemon_policy, merged)
        return cached[2]

    def to_entry(self) -> Entry:
        overrides = {
            i.index: {
                "eligibility": i.standing.manual.value,
                "reason": i.standing.manual_reason,
                "since": i.standing.manual_since,
            }
            for i in self.instances
            if i.standing.manual is not None
        }
        return Entry(
            self.spec, self.desired, set(self.stopped_instances), overrides, self.registered_at
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "type": self.spec.type,
            "mode": self.spec.mode.value,
            "desired": self.desired.value,
            "instances_wanted": self.spec.instances if self.spec.mode.long_running else 0,
            "instances": [i.to_json() for i in self.instances],
            **(
                {"requests": self.stats.to_json(), "max_concurrency": self.spec.max_concurrency}
                if self.spec.mode is EngineMode.ONESHOT
                else {}
            ),
        }


class EngineIndex:
    """Engine names by type and by label (seed 003's registry indexes): `list` and `status`
    filters look up instead of scanning the registry."""

    def __init__(self) -> None:
        self._by_type: dict[str, set[str]] = {}
        self._by_label: dict[tuple[str, str], set[str]] = {}

    def add(self, spec: EngineSpec) -> None:
        self._by_type.setdefault(spec.type, set()).add(spec.name)
        for pair in spec.labels.items():
            self._by_label.setdefault(pair, set()).add(spec.name)

    def remove(self, spec: EngineSpec) -> None:
        _discard(self._by_type, spec.type, spec.name)
        for pair in spec.labels.items():
            _discard(self._by_label, pair, spec.name)

    def replace(self, old: EngineSpec, new: EngineSpec) -> None:
        self.remove(old)
        self.add(new)

    def find(self, type: str | None, labels: list[tuple[str, str]]) -> set[str] | None:
        """Names of the engines of `type` with every label in `labels`; None: no filter."""
        found: set[str] | None = None
        if type is not None:
            found = set(self._by_type.get(type, ()))
        for pair in labels:
            names = self._by_label.get(pair, set())
            found = set(names) if found is None else found & names
        return found


def _discard(index: dict[_K, set[str]], key: _K, name: str) -> None:
    names = index.get(key)
    if names is not None:
        names.discard(name)
        if not names:
            del index[key]


class Supervisor:
    """Owns every engine's instances and their processes."""

    # Counts failed log writes; set by the daemon (a full disk never stops supervision).
    write_health: WriteHealth | None = None

    def __init__(
        self,
        paths: Paths,
        config: DaemonConfig,
        events: EventLog,
        on_targets_changed: Callable[[dict[str, int]], None] = lambda _t: None,
    ) -> None:
        self.paths = paths
        self.config = config
        self.events = events
        self.engines: dict[str, Engine] = {}
        self.loop = asyncio.get_running_loop()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._on_targets_changed = on_targets_changed
        self._sweeps: set[asyncio.Task[None]] = set()
        self.observer: InstanceObserver | None = None
        self.index = EngineIndex()
        self.closing = False
        # Closed until the processes of a killed predecessor are gone: they carry the same
        # marker, and the sweep must not take new instances for old ones.
        self.spawn_allowed = asyncio.Event()

    # -- the one place where an instance changes state ------------------------------------
    def transition(self, inst: Instance, new: InstanceState, reason: str, **data: Any) -> None:
        """Move `inst` to `new`, recording the event; an illegal edge is a bug and raises."""
        old = inst.state
        if not can_transition(old, new):
            raise RuntimeError(f"illegal transition {inst.id}: {old} -> {new} ({reason})")
        inst._entered(old)
        inst.state = new
        inst.state_reason = reason
        inst.state_since = time.time()
        self.events.emit(
            "instance.state",
            reason,
            engine=inst.spec.name,
            instance=inst.id,
            from_state=old.value,
            to_state=new.value,
            data=data or None,
        )
        if old.has_process != new.has_process:
            self._publish_targets()
        if self.observer is not None:
            self.observer.state_changed(inst, old, new)
        self._check_waiters()

    def _check_waiters(self) -> None:
        if not self._waiters:
            return
        keep = []
        for pred, fut in self._waiters:
            if fut.done():
                continue
            if pred():
                fut.set_result(None)
            else:
                keep.append((pred, fut))
        self._waiters = keep

    async def wait_until(self, pred: Callable[[], bool], timeout: float | None, what: str) -> None:
        """Wait until `pred()` holds after some transition, or raise RequestTimeoutError."""
        if pred():
            return
        fut: asyncio.Future[None] = self.loop.create_future()
        self._waiters.append((pred, fut))
        try:
            await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise RequestTimeoutError(f"timed out after {timeout:g}s waiting for {what}") from None

    def _publish_targets(self) -> None:
        targets = {
            i.id: i.proc.pid
            for e in self.engines.values()
            for i in e.instances
            if i.proc is not None and i.proc.alive
        }
        self._on_targets_changed(targets)

    # -- lookups ---------------------------------------------------------------------------
    def instance(self, engine: Engine, index: int) -> Instance:
        for inst in engine.instances:
            if inst.index == index:
                return inst
        raise InstanceNotFoundError(
            f"engine {engine.spec.name!r} has no instance #{index}"
            f" (it has {len(engine.instances)}: #0..#{len(engine.instances) - 1})"
            if engine.instances
            else f"engine {engine.spec.name!r} has no instances"
        )

    def all_instances(self) -> list[Instance]:
        return [i for e in self.engines.values() for i in e.instances]

    def find_instance(self, inst_id: str) -> Instance | None:
        """The instance `name#k`, or None."""
        name, idx = split_instance_id(inst_id)
        engine = self.engines.get(name)
        if engine is None or idx is None or not idx.isdigit():
            return None
        k = int(idx)
        insts = engine.instances
        return insts[k] if k < len(insts) and insts[k].id == inst_id else None

    # -- starting --------------------------------------------------------------------------
    def start_instance(self, inst: Instance, reason: str) -> None:
        """Spawn the instance's process now (from stopped, exited, fatal or backoff)."""
        inst.cancel_timer()
        if inst.removed or self.closing:
            return
        spec = inst.spec
        self.transition(inst, S.STARTING, reason)
        env = dict(os.environ)
        env.update(spec.env_for(inst.index))
        env[process.DAEMON_ID_ENV] = self.paths.daemon_id
        env[process.INSTANCE_ENV] = inst.id
        env[process.INSTANCE_INDEX_ENV] = str(inst.index)
        argv = spec.argv_for(inst.index)
        try:
            proc = process.spawn(
                argv,
                cwd=spec.cwd,
                env=env,
                pipe_stdin=spec.mode is EngineMode.WORKER,
                stdout_to_pipe=True,
                loop=self.loop,
                on_exit=lambda proc, status: self._on_exit(inst, proc, status),
            )
        except SpawnError as exc:
            inst.log.note(str(exc))
            inst.last_exit = {"code": None, "signal": None, "at": time.time(), "error": str(exc)}
            if exc.transient:
                self._retry_transient_spawn(inst, str(exc))
                return
            self._after_unexpected_exit(inst, str(exc), quick=True, wants_restart=True)
            return
        inst.spawn_retries = 0
        inst.proc = proc
        inst.sample = Sample()
        inst.failure = inst.warmup_note = ""
        inst.failed_start = False
        # A new process: what was measured of the old one says nothing about it.
        inst.health_check.reset(time.monotonic())
        inst.health_reason = ""
        inst.memory.reset()
        inst.cpu = CpuWatch()
        inst.slow.reset()
        inst.stats.latency_ewma_ms = None
        inst.stats.consecutive_errors = 0
        inst.standing.slow_multiplier = 1.0
        inst.standing.draining_reason = ""
        inst.log.note(f"started pid {proc.pid}: {' '.join(argv)}")
        self._attach_output(inst, proc)
        self._publish_targets()
        self.events.emit(
            "instance.spawned",
            f"pid {proc.pid}",
            engine=spec.name,
            instance=inst.id,
            data={"pid": proc.pid},
        )
        delay = spec.restart.start_seconds
        if delay <= 0:
            self._mark_running(inst, proc)
        else:
            inst.timer = self.loop.call_later(delay, self._mark_running, inst, proc)

    def _mark_running(self, inst: Instance, proc: ChildProcess) -> None:
        inst.timer = None
        if inst.proc is not proc or not proc.alive or inst.state is not S.STARTING:
            return
        up = f"up for {inst.spec.restart.start_seconds:g}s"
        if inst.spec.mode is not EngineMode.WORKER or inst.ready_seen or self.observer is None:
            inst.crashes.started()
            # starting -> ready: the process stayed up start_seconds
            self.transition(inst, S.READY, up)
            return
        # starting -> warming: a worker is ready once it answers ping or says `ready`; it
        # has not started until then (a start that times out counts towards max_retries).
        why = f"{up}; waiting for it to answer ping or say ready"
        if inst.warmup_note:
            why += f" (last: {inst.warmup_note})"
        self.transition(inst, S.WARMING, why)
        inst.timer = self.loop.call_later(
            inst.spec.start_timeout, self._start_timed_out, inst, proc
        )
        self.observer.warming(inst)

    def mark_ready(self, inst: Instance, reason: str) -> None:
        """A worker showed it can take requests (answered ping, or sent `ready`)."""
        if inst.failure:
            return  # judged failed already: it is being stopped
        if inst.state is S.STARTING:
            inst.ready_seen = True
        elif inst.state is S.WARMING:
            inst.cancel_timer()  # the start timeout
            inst.crashes.started()
            # warming -> ready: the worker answered
            self.transition(inst, S.READY, reason)

    def warmup_problem(self, inst: Instance, text: str) -> None:
        """Something wrong seen while a worker warms up (garbage on its stdout): shown in
        its state reason, and named if the start then times out."""
        first = not inst.warmup_note
        inst.warmup_note = text
        if inst.state is S.WARMING:
            base = inst.state_reason.split(" (last: ", 1)[0]
            inst.state_reason = f"{base} (last: {text})"
        if first:
            self.events.emit(
                "instance.warmup_problem", text, engine=inst.spec.name, instance=inst.id
            )

    def _start_timed_out(self, inst: Instance, proc: ChildProcess) -> None:
        inst.timer = None
        if inst.proc is not proc or not proc.alive or inst.state is not S.WARMING:
            return
        timeout = inst.spec.start_timeout
        why = f"start failed: no answer to ping and no `ready` within {timeout:g}s"
        if inst.warmup_note:
            why += f" (last: {inst.warmup_note})"
        self.fail_instance(inst, why, cause="start_timeout", failed_start=True)

    def fail_instance(self, inst: Instance, reason: str, *, cause: str, failed_start: bool) -> None:
        """End a process the daemon judged failed, with its stop policy (signal, then SIGKILL
        to the group after the stop timeout); its exit is handled as a crash with `reason`
        (backoff, or fatal), and as a failed start with `failed_start`."""
        proc = inst.proc
        if proc is None or not proc.alive or inst.failure or inst.state is S.STOPPING:
            return
        inst.failure = reason
        inst.failed_start = failed_start
        inst.kill_cause = cause
        inst.cancel_timer()
        sig = signal.Signals[inst.spec.stop.signal]
        inst.log.note(f"{reason}: sending {sig.name} to process group {proc.pgid}")
        self.events.emit(
            "instance.failed",
            reason,
            engine=inst.spec.name,
            instance=inst.id,
            data={"cause": cause},
        )
        process.signal_group(proc.pgid, sig)
        inst.timer = self.loop.call_later(
            inst.spec.stop.timeout, self._kill_after_timeout, inst, proc
        )

    def _attach_output(self, inst: Instance, proc: ChildProcess) -> None:
        popen = proc.popen
        inst.ready_seen = False
        protocol_consumer = None
        if inst.spec.mode is EngineMode.WORKER and self.observer is not None:
            # A worker's stdout carries the request protocol: it goes to the request layer.
            protocol_consumer = self.observer.spawned(inst, proc)
        for name, pipe in (("stderr", popen.stderr), ("stdout", popen.stdout)):
            if pipe is None:
                continue
            fd = pipe.fileno()
            os.set_blocking(fd, False)
            consumer = protocol_consumer if name == "stdout" else None
            self.loop.add_reader(fd, self._read_pipe, inst, name, pipe, consumer)

    def _read_pipe(
        self, inst: Instance, stream: str, pipe: Any, consumer: Callable[[bytes], None] | None
    ) -> None:
        fd = pipe.fileno()
        data = process.read_available(fd)
        if data is None:
            return
        if data:
            if consumer is not None:
                consumer(data)
            else:
                inst.log.feed(stream, data)
            return
        self.loop.remove_reader(fd)
        if consumer is not None:
            consumer(b"")
        else:
            inst.log.close_stream(stream)
        pipe.close()

    # -- exits -----------------------------------------------------------------------------
    def _on_exit(self, inst: Instance, proc: ChildProcess, status: ExitStatus) -> None:
        if inst.proc is not proc:
            return
        inst.cancel_timer()
        now = time.time()
        uptime = time.monotonic() - proc.started_mono
        inst.last_exit = {"code": status.code, "signal": status.signal, "at": now}
        desc = status.describe()
        if inst.kill_cause:
            desc = f"{desc} ({inst.kill_cause})"
            inst.last_exit["cause"] = inst.kill_cause
            inst.kill_cause = ""
        inst.log.note(f"pid {proc.pid} {desc} after {uptime:.2f}s")
        failure, failed_start = inst.failure, inst.failed_start
        inst.failure, inst.failed_start = "", False
        self._sweep_group(inst, proc)
        if proc.popen.stdin is not None:
            with contextlib.suppress(OSError):
                proc.popen.stdin.close()
        self._publish_targets()
        if inst.state is S.STOPPING:
            # stopping -> stopped: the exit we asked for
            self.transition(inst, S.STOPPED, f"stopped ({desc})", code=status.code)
            return
        if failure:
            # Ended by the daemon as failed: a crash, whatever its exit code said.
            inst.last_exit["error"] = failure
            wants = inst.spec.restart.policy.wants_restart(None, expected=False)
            self._after_unexpected_exit(
                inst, failure, quick=failed_start, wants_restart=wants, uptime=uptime
            )
            return
        quick = inst.state is S.STARTING
        wants = inst.spec.restart.policy.wants_restart(status.code, expected=False)
        self._after_unexpected_exit(inst, desc, quick=quick, wants_restart=wants, uptime=uptime)

    def _after_unexpected_exit(
        self, inst: Instance, desc: str, *, quick: bool, wants_restart: bool, uptime: float = 0.0
    ) -> None:
        spec = inst.spec
        if inst.removed or self.closing or inst.engine.desired is DesiredState.STOPPED:
            self.transition(inst, S.EXITED, f"{desc}; not restarted (engine stopping)")
            return
        if not wants_restart:
            self.transition(inst, S.EXITED, f"{desc}; restart policy {spec.restart.policy}")
            return
        policy = inst.engine.policy(self.config.policy)
        decision = inst.crashes.on_exit(
            time.monotonic(), uptime, quick, desc, spec.restart, policy.crash
        )
        if decision.action is Action.FATAL:
            self.transition(inst, S.FATAL, decision.reason, **decision.data)
            cooldown = policy.crash.cooldown
            if cooldown > 0:
                # SPEC §6: a fatal instance comes back after a cool-down, if one is set.
                inst.timer = self.loop.call_later(cooldown, self._retry_after_cooldown, inst)
            return
        self.transition(inst, S.BACKOFF, decision.reason, delay=decision.delay, **decision.data)
        inst.timer = self.loop.call_later(decision.delay, self._restart_after_backoff, inst)

    def _retry_transient_spawn(self, inst: Instance, desc: str) -> None:
        """A spawn that failed for lack of the daemon's resources (fds, processes): retry
        with backoff, and count no failed start (the engine did nothing wrong)."""
        delay = spawn_retry_delay(inst.spec.restart.backoff, inst.spawn_retries)
        inst.spawn_retries = min(inst.spawn_retries + 1, 64)
        # starting -> backoff: out of resources for now; not a crash
        self.transition(inst, S.BACKOFF, f"{desc}; retrying in {delay:.2g}s", delay=delay)
        inst.timer = self.loop.call_later(delay, self._restart_after_backoff, inst)

    def _retry_after_cooldown(self, inst: Instance) -> None:
        inst.timer = None
        if inst.state is not S.FATAL or inst.engine.desired is not DesiredState.RUNNING:
            return
        inst.crashes.reset()
        inst.restarts += 1
        cooldown = inst.engine.policy(self.config.policy).crash.cooldown
        self.start_instance(inst, f"retry after the {cooldown:g}s cool-down")

    def _restart_after_backoff(self, inst: Instance) -> None:
        inst.timer = None
        if inst.state is not S.BACKOFF:
            return
        inst.restarts += 1
        # backoff -> starting: delay elapsed
        self.start_instance(inst, f"restart {inst.restarts} after backoff")

    def _sweep_group(self, inst: Instance, proc: ChildProcess) -> None:
        """After the leader exits, give what is left of its tree the stop grace, then SIGKILL.

        "What is left" is the process group, descendants the monitor saw leave it, and
        orphans of this instance the daemon adopted as subreaper (found by their marker).
        """
        escaped = list(inst.sample.descendants)
        grace = inst.spec.stop.timeout
        if inst.state is not S.STOPPING:
            process.signal_group(proc.pgid, signal.SIGTERM)

        async def sweep() -> None:
            found = await asyncio.to_thread(process.adopted_orphans, inst.id)
            # The scan runs in a thread: a successor spawned meanwhile (a restart) carries the
            # same marker and may not have been registered yet when it was seen. Back on the
            # loop it is: keep out every process of a live instance's group.
            live = {
                i.proc.pgid
                for i in self.all_instances()
                if i.proc is not None and i.proc is not proc and i.proc.alive
            }
            adopted = [(p, ct) for p, ct in found if process.pgid_of(p) not in live]
            process.signal_pids(adopted, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and (
                process.group_alive(proc.pgid) or process.any_alive(adopted)
            ):
                await asyncio.sleep(0.05)
            process.kill_tree_now(proc.pgid, escaped + adopted)

        task = self.loop.create_task(sweep())
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    # -- stopping --------------------------------------------------------------------------
    async def stop_instance(self, inst: Instance, reason: str, wait: bool = True) -> None:
        """Stop one instance with its stop policy; never restarted until started again."""
        inst.cancel_timer()
        if inst.state in (S.BACKOFF, S.EXITED, S.FATAL):
            self.transition(inst, S.STOPPED, reason)
            return
        if inst.state is S.STOPPED:
            return
        if inst.state is not S.STOPPING:
            proc = inst.proc
            spec = inst.spec
            self.transition(inst, S.STOPPING, reason)
            if proc is None or not proc.alive:
                # stopping -> stopped: no process to signal (none was ever started, or its
                # exit came first); a state must never wait for an exit that cannot come.
                self.transition(inst, S.STOPPED, f"{reason} (no process was running)")
                return
            sig = signal.Signals[spec.stop.signal]
            inst.log.note(f"sending {sig.name} to process group {proc.pgid} ({reason})")
            process.signal_group(proc.pgid, sig)
            inst.timer = self.loop.call_later(
                spec.stop.timeout, self._kill_after_timeout, inst, proc
            )
        if wait:
            await self.wait_until(
                lambda: inst.state is not S.STOPPING,
                inst.spec.stop.timeout + 10.0,
                f"{inst.id} to stop",
            )

    def kill_hung(self, inst: Instance, reason: str) -> None:
        """Kill a hung instance's process tree now; its exit is then handled as a crash."""
        proc = inst.proc
        if proc is None or not proc.alive:
            return
        inst.kill_cause = reason.split(":", 1)[0]
        inst.log.note(f"{reason}: SIGKILL to process group {proc.pgid}")
        process.kill_tree_now(proc.pgid, inst.sample.descendants)

    # -- draining: stop without losing a request -------------------------------------------
    async def drain_and_stop(
        self,
        inst: Instance,
        reason: str,
        *,
        restart: bool = False,
        timeout: float | None = None,
        data: dict[str, Any] | None = None,
        wait: bool = True,
    ) -> None:
        """Stop `inst` without losing a request: dispatch sends it nothing new (eligibility
        `draining`, requests waiting go elsewhere), those in flight finish (up to `timeout`,
        by default its stop timeout), then its stop policy. Every replacement stops an
        instance this way: restart, scale-down, policy restarts, unregister.

        `restart` only words the events (the caller starts it again, and marks it
        `restarting` meanwhile so requests for it wait instead of failing).
        """
        if inst.draining:
            # Another drain of it is under way (a policy's and a person's): let it finish.
            await self.wait_until(
                lambda: not inst.draining, inst.spec.stop.timeout * 2 + 10.0, f"{inst.id} to drain"
            )
        then = "a graceful restart" if restart else "stop"
        inst.draining = True
        try:
            if inst.state in (S.READY, S.BUSY) and self.observer is not None:
                inst.standing.draining_reason = f"draining to {'restart' if restart else 'stop'}"
                inst.standing.draining_reason += f": {reason}"
                self._emit(inst, "instance.draining", f"{reason}: draining, then {then}", data)
                drained = self.observer.drain(inst)
                limit = inst.spec.stop.timeout if timeout is None else timeout
                try:
                    await asyncio.wait_for(drained, limit)
                except TimeoutError:
                    left = inst.stats.in_flight
                    self._emit(
                        inst,
                        "instance.drain_timeout",
                        f"{then} with {left} request(s) still in flight after {limit:g}s",
                        {"in_flight": left},
                    )
            await self.stop_instance(inst, f"restart: {reason}" if restart else reason, wait)
        finally:
            inst.draining = False
            inst.standing.draining_reason = ""
            self._check_waiters()

    async def drain_instances(
        self, insts: list[Instance], reason: str, *, restart: bool = False, wait: bool = True
    ) -> list[str]:
        """Drain and stop several instances at once; returns the ids of those not stopped."""
        active = [i for i in insts if i.state is not S.STOPPED]
        await asyncio.gather(
            *(self.drain_and_stop(i, reason, restart=restart, wait=wait) for i in active)
        )
        return [i.id for i in active]

    async def restart_instance(
        self,
        inst: Instance,
        reason: str,
        *,
        timeout: float | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        """A graceful restart a policy asked for: drain, the stop policy, a fresh process."""
        async with inst.engine.lock:
            if not inst.state.is_running or inst.removed:
                return
            inst.restarting = True
            try:
                await self.drain_and_stop(inst, reason, restart=True, timeout=timeout, data=data)
                if (
                    inst.state is S.STOPPED
                    and not inst.removed
                    and not self.closing
                    and inst.engine.desired is DesiredState.RUNNING
                ):
                    inst.restarts += 1
                    self.start_instance(inst, f"restarted: {reason}")
            finally:
                inst.restarting = False

    async def restart_instances(
        self, engine: Engine, insts: list[Instance], reason: str
    ) -> list[str]:
        """`engctl restart`: every running one drains and stops, then each starts again (the
        stopped ones just start). Call with the engine's lock held."""
        running = [i for i in insts if i.state is not S.STOPPED]
        for inst in running:
            inst.restarting = True
        try:
            await self.drain_instances(running, reason, restart=True)
            return await self.start_engine(engine, reason, [i.index for i in insts])
        finally:
            for inst in running:
                inst.restarting = False

    def _emit(self, inst: Instance, kind: str, reason: str, data: dict[str, Any] | None) -> None:
        self.events.emit(kind, reason, engine=inst.spec.name, instance=inst.id, data=data or None)

    def _kill_after_timeout(self, inst: Instance, proc: ChildProcess) -> None:
        inst.timer = None
        if not proc.alive:
            return
        timeout = inst.spec.stop.timeout
        inst.log.note(f"still alive {timeout:g}s after the stop signal: SIGKILL to the group")
        self.events.emit(
            "instance.killed",
            f"did not stop within {timeout:g}s; killed the process group",
            engine=inst.spec.name,
            instance=inst.id,
        )
        process.kill_tree_now(proc.pgid, inst.sample.descendants)

    # -- engines ---------------------------------------------------------------------------
    def add_engine(
        self,
        spec: EngineSpec,
        desired: DesiredState,
        stopped_instances: set[int],
        registered_at: float | None = None,
    ) -> Engine:
        """Create the runtime side of a registered engine (instances stay stopped)."""
        engine = Engine(spec, desired, registered_at)
        self.engines[spec.name] = engine
        self.index.add(spec)
        engine.stopped_instances = set(stopped_instances)
        self._resize(engine)
        return engine

    def _resize(self, engine: Engine) -> list[Instance]:
        """Add instance slots up to the spec's count; return the ones to remove (highest)."""
        want = engine.spec.instances if engine.spec.mode.long_running else 0
        while len(engine.instances) < want:
            idx = len(engine.instances)
            log_file = InstanceLog(
                self.paths.instance_log(engine.spec.name, idx),
                self.config.log_max_bytes,
                self.config.log_backups,
                self.write_health,
            )
            engine.instances.append(Instance(engine, idx, log_file))
        extra = engine.instances[want:]
        del engine.instances[want:]
        oneshot = engine.spec.mode is EngineMode.ONESHOT
        if oneshot and engine.oneshot_log is None:
            name = engine.spec.name
            engine.oneshot_log = InstanceLog(
                self.paths.log_dir / f"{name}.oneshot.log",
                self.config.log_max_bytes,
                self.config.log_backups,
            )
        elif not oneshot and engine.oneshot_log is not None:
            engine.oneshot_log.close()
            engine.oneshot_log = None
        return extra

    async def start_engine(
        self, engine: Engine, reason: str, indices: list[int] | None = None
    ) -> list[str]:
        """Start the engine's instances (all, or `indices`) after its dependencies are ready."""
        await self.spawn_allowed.wait()
        for dep in engine.spec.depends_on:
            dep_engine = self.engines.get(dep)
            if dep_engine is None:
                continue
            if dep_engine.desired is not DesiredState.RUNNING or not any(
                i.state.is_running for i in dep_engine.instances
            ):
                await self.start_engine(dep_engine, f"dependency of {engine.spec.name}")
                try:
                    await self.wait_until(
                        lambda d=dep_engine: all(  # type: ignore[misc]
                            i.state.is_running or i.state is S.FATAL for i in d.instances
                        ),
                        DEPENDENCY_WAIT,
                        f"dependency {dep} to be ready",
                    )
                except RequestTimeoutError as exc:
                    self.events.emit(
                        "engine.dependency_timeout",
                        f"starting anyway: {exc}",
                        engine=engine.spec.name,
                    )
        engine.desired = DesiredState.RUNNING
        started = []
        for inst in engine.instances:
            if indices is not None and inst.index not in indices:
                continue
            if inst.state is S.STOPPING:
                # A start asked during a stop (`stop --no-wait`) takes effect once it ends.
                await self.wait_until(
                    lambda i=inst: i.state is not S.STOPPING,  # type: ignore[misc]
                    inst.spec.stop.timeout + 10.0,
                    f"{inst.id} to stop",
                )
                if engine.desired is not DesiredState.RUNNING:
                    break  # stopped again meanwhile: the later wish wins
            if inst.state in (S.STOPPED, S.EXITED, S.FATAL, S.BACKOFF):
                if inst.state is S.FATAL:
                    inst.crashes.reset()
                self.start_instance(inst, reason)
                started.append(inst.id)
        return started

    async def stop_instances(self, insts: list[Instance], reason: str, wait: bool) -> list[str]:
        """Stop several instances at once; with `wait`, return when all are stopped."""
        active = [i for i in insts if i.state is not S.STOPPED]
        await asyncio.gather(*(self.stop_instance(i, reason, wait) for i in active))
        return [i.id for i in active]

    async def update_engine(self, engine: Engine, spec: EngineSpec) -> str:
        """Apply a changed spec, restarting only what must change; returns what was done."""
        old = engine.spec
        if spec.needs_restart(old):
            running = [i for i in engine.instances if i.state is not S.STOPPED]
            for inst in running:
                inst.restarting = True
            try:
                await self.drain_instances(running, "spec changed", restart=True)
                for inst in engine.instances:
                    inst.log.close()
                self.index.replace(engine.spec, spec)
                engine.spec = spec
                removed = self._resize(engine)
                for inst in removed:
                    inst.removed = True
                if engine.desired is DesiredState.RUNNING:
                    await self.start_engine(engine, "spec changed")
            finally:
                for inst in running:
                    inst.restarting = False
            return "restarted"
        self.index.replace(old, spec)
        engine.spec = spec
        if old.instances != spec.instances:
            return await self.scale_engine(engine, spec.instances)
        return "updated in place"

    async def scale_engine(self, engine: Engine, n: int) -> str:
        """Grow or shrink to `n` instances (the highest indices drain, then stop)."""
        before = len(engine.instances)
        engine.spec = engine.spec.with_instances(n)
        leaving = engine.instances[n:]
        for inst in leaving:
            inst.removed = True  # never restarted, whatever happens while it drains
        await self.drain_instances(leaving, f"scaled to {n}")
        for inst in self._resize(engine):
            inst.log.close()
        if engine.desired is DesiredState.RUNNING:
            await self.start_engine(engine, f"scaled to {n}")
        self.events.emit("engine.scaled", f"{before} -> {n} instances", engine=engine.spec.name)
        self._publish_targets()
        return f"scaled {before} -> {n}"

    async def remove_engine(self, engine: Engine) -> None:
        """Drain and stop every instance and forget the engine."""
        engine.desired = DesiredState.STOPPED
        for inst in engine.instances:
            inst.removed = True
        await self.drain_instances(engine.instances, "unregistered")
        for inst in engine.instances:
            inst.log.close()
        if engine.oneshot_log is not None:
            engine.oneshot_log.close()
        self.engines.pop(engine.spec.name, None)
        self.index.remove(engine.spec)
        self._publish_targets()

    def dependents(self, names: set[str]) -> list[Engine]:
        """Engines that depend on any of `names`, directly or through others (not those
        named), dependents of dependents first."""
        found: set[str] = set()
        grew = True
        while grew:
            grew = False
            for e in self.engines.values():
                n = e.spec.name
                if n not in found and n not in names and set(e.spec.depends_on) & (names | found):
                    found.add(n)
                    grew = True
        order = check_dependencies({n: e.spec for n, e in self.engines.items()})
        return [self.engines[n] for n in reversed(order) if n in found]

    async def stop_engines(self, engines: list[Engine], reason: str, wait: bool) -> list[str]:
        """Stop whole engines, each once those among them that depend on it have stopped
        (systemd's order: dependents first; independent engines stop at the same time)."""
        tasks: dict[str, asyncio.Task[list[str]]] = {}

        async def stop_one(engine: Engine) -> list[str]:
            before = [
                tasks[e.spec.name]
                for e in engines
                if engine.spec.name in e.spec.depends_on and e.spec.name in tasks
            ]
            if before:
                await asyncio.wait(before)
            return await self.stop_instances(engine.instances, reason, wait)

        for engine in engines:
            tasks[engine.spec.name] = self.loop.create_task(stop_one(engine))
        results = await asyncio.gather(*tasks.values())
        return [i for r in results for i in r]

    async def shutdown(self, timeout: float) -> None:
        """Stop everything with each engine's stop policy, dependents first (daemon exit)."""
        self.closing = True
        try:
            await asyncio.wait_for(
                self.stop_engines(list(self.engines.values()), "daemon shutting down", True),
                timeout,
            )
        except (TimeoutError, RequestTimeoutError):
            self.kill_all()
        except Exception:
            # A bug must not leave engines running after the daemon: kill them all.
            log.exception("graceful stop failed; killing every engine")
            self.kill_all()
        if self._sweeps:
            await asyncio.wait(set(self._sweeps), timeout=timeout)
        for inst in self.all_instances():
            inst.log.close()
        for engine in self.engines.values():
            if engine.oneshot_log is not None:
                engine.oneshot_log.close()

    def kill_all(self) -> None:
        """SIGKILL every process tree now (second signal during shutdown)."""
        for inst in self.all_instances():
            if inst.proc is not None and inst.proc.alive:
                process.kill_tree_now(inst.proc.pgid, inst.sample.descendants)
