"""The lifecycle of each instance: start, warm up, watch its exit, restart with backoff, give
up (fatal), stop, drain, kill; and a rollout's records of a slot (start a successor beside the
current process, let it take the slot). Engine-level operations (dependencies, scale, update,
rollouts) are `fleet`'s and `rollout`'s.

Every state change goes through `Supervisor.transition`, which checks the edge and records the
event with its reason. Spawning, signalling and reading pipes are `process`'s job; this module
decides when, with the restart backoff's decisions (`backoff`). It imports neither the enforcer
nor any request code: both hear of each change through `InstanceObserver` (wired in `main`).
One piece past 600 lines: start, exit, backoff, stop, drain and a rollout's swap all change
the same records through the one `transition` and the timers it cancels.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import os
import signal
import time
from collections.abc import Callable
from typing import Any, Protocol

from engctl.config import DaemonConfig
from engctl.errors import InstanceNotFoundError, RequestTimeoutError
from engctl.models import split_instance_id
from engctl.paths import Paths
from engctl.states import (
    DesiredState,
    EngineMode,
    EventKind,
    InstanceRole,
    InstanceState,
    can_transition,
)

from . import process, proctree
from .backoff import spawn_retry_delay
from .events import EventLog
from .instance import Engine, EngineIndex, Instance
from .logs import InstanceLog
from .monitor import Sample
from .policies import Action
from .process import ChildProcess, ExitStatus, SpawnError
from .storage import WriteHealth

log = logging.getLogger("engctl.supervisor")

S = InstanceState
Clock = Callable[[], float]
_LAUNCHES = itertools.count(1)  # the launch tokens of this daemon's starts
# The longest a start waits for its processes to exist (a launch is ms; an exec from a hung
# file system is not, and the start is not held for it).
LAUNCH_WAIT = 30.0


class InstanceObserver(Protocol):
    """What the request layer needs to hear from supervision (it owns workers' stdin/stdout)."""

    def spawned(self, inst: Instance, proc: ChildProcess) -> Callable[[bytes], None] | None:
        """A worker process started: return the consumer of its stdout (b"" is EOF)."""

    def warming(self, inst: Instance) -> None:
        """The process stayed up start_seconds; it is ready once it answers (ping or `ready`)."""

    def state_changed(self, inst: Instance, old: InstanceState, new: InstanceState) -> None:
        """Called after every transition."""

    def drain(self, inst: Instance, reason: str) -> asyncio.Future[None]:
        """Send `inst` no new request (its eligibility now says draining, with `reason`); the
        future is done once no request it runs is still awaited (at once when it runs none)."""

    def replaced(self, old: Instance, new: Instance, keys: tuple[str, str]) -> None:
        """`new` took the slot of `old` (a rollout's swap): what was filed under their keys
        before (`keys`: old's, new's) follows them; `new` enters dispatch in `old`'s place."""


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
        clock: Clock = time.monotonic,
    ) -> None:
        self.paths = paths
        self.clock = clock  # monotonic: the `now` of restart decisions, time spent in states
        self.config = config
        self.events = events
        self.engines: dict[str, Engine] = {}
        self.loop = asyncio.get_running_loop()
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []
        self._on_targets_changed = on_targets_changed
        self._sweeps: set[asyncio.Task[None]] = set()
        self.observer: InstanceObserver | None = None  # wired by the daemon (main.py)
        self.index = EngineIndex()
        self.closing = False
        self.killing = False  # `kill_all` was called: a process that starts now is killed
        # Closed until the processes of a killed predecessor are gone: they carry the same
        # marker, and the sweep must not take new instances for old ones.
        self.spawn_allowed = asyncio.Event()

    # -- the one place where an instance changes state ------------------------------------
    def transition(self, inst: Instance, new: InstanceState, reason: str, **data: Any) -> None:
        """Move `inst` to `new`, recording the event; an illegal edge is a bug and raises."""
        old = inst.state
        if not can_transition(old, new):
            raise RuntimeError(f"illegal transition {inst.id}: {old} -> {new} ({reason})")
        inst.entered(old)
        inst.state = new
        inst.state_reason = reason
        inst.state_since = time.time()
        if inst.role is not InstanceRole.CURRENT:
            # A second record of the slot: say which process the event is about.
            data = {**data, "role": inst.role.value, "generation": inst.generation}
        self.events.emit(
            EventKind.INSTANCE_STATE,
            reason,
            engine=inst.spec.name,
            instance=inst.id,
            from_state=old.value,
            to_state=new.value,
            data=data or None,
        )
        if old.has_process != new.has_process:
            self.publish_targets()
        if self.observer is not None:
            self.observer.state_changed(inst, old, new)
        self._check_waiters()

    def changed(self) -> None:
        """Something a waiter may wait for changed outside a transition (health, a record
        gone): `wait_until` predicates are checked again."""
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

    def publish_targets(self) -> None:
        """Tell the monitor which pids to sample (every live instance's)."""
        targets = {
            i.key: i.proc.pid
            for e in self.engines.values()
            for i in e.records()
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
        """The current instance of every slot (what status, metrics and policies look at)."""
        return [i for e in self.engines.values() for i in e.instances]

    def all_records(self) -> list[Instance]:
        """Every record with or without a process: also a rollout's successors and retiring."""
        return [i for e in self.engines.values() for i in e.records()]

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
        own = spec.env_for(inst.index)
        own[process.DAEMON_ID_ENV] = self.paths.daemon_id
        own[process.INSTANCE_ENV] = inst.id
        own[process.INSTANCE_INDEX_ENV] = str(inst.index)
        own[process.GENERATION_ENV] = str(inst.generation)
        inst.launch_token = f"{os.getpid()}-{next(_LAUNCHES)}"
        own[process.LAUNCH_ENV] = inst.launch_token
        # The daemon's environment under the instance's own, read as the process is launched:
        # a copy of it for each launch waiting its turn (a fleet starting at once) was 1-2 KiB
        # each, and what the daemon holds at such a peak stays its RSS (CPython's arenas).
        env = collections.ChainMap(own, os.environ)
        argv = spec.argv_for(inst.index)
        inst.launching = True
        inst.launch_mono = time.monotonic()
        # Off the loop: the fork and exec wait for the child to exec (ms on a busy machine).
        # The instance stays `starting` meanwhile; a stop asked for then waits for its
        # process, which `_launched` signals the moment it exists.
        process.spawn_soon(
            argv,
            cwd=spec.cwd,
            env=env,
            pipe_stdin=spec.mode is EngineMode.WORKER,
            stdout_to_pipe=True,
            loop=self.loop,
            on_exit=functools.partial(self._on_exit, inst),  # less than a closure, held by each
            then=lambda result: self._launched(inst, argv, result),
        )

    def _launched(self, inst: Instance, argv: list[str], result: ChildProcess | SpawnError) -> None:
        """The process of `start_instance` exists (or could not be started): go on from the
        state the instance is in now, `starting`, or `stopping` if a stop came meanwhile."""
        inst.launching = False
        try:
            self._after_launch(inst, argv, result)
        finally:
            self._check_waiters()  # `launched` waits on this

    async def launched(self, insts: list[Instance], timeout: float = LAUNCH_WAIT) -> None:
        """Until the processes of `insts` on their way exist (or could not start): a start
        returns with its pids, as when the loop launched them itself (systemd's Type=exec)."""
        pending = [i for i in insts if i.launching]

        def all_landed() -> bool:
            # Launches land about in order: each record is looked at once it has landed.
            while pending and not pending[-1].launching:
                pending.pop()
            return not pending

        with contextlib.suppress(RequestTimeoutError):  # the start goes on regardless
            await self.wait_until(all_landed, timeout, "their processes to start")

    def _after_launch(
        self, inst: Instance, argv: list[str], result: ChildProcess | SpawnError
    ) -> None:
        """A failed launch is a failed start (or ends a stop); a process is watched, then
        stopped if a stop or the daemon's kill came first, else it goes on to warm up."""
        if isinstance(result, SpawnError):
            inst.log.note(str(result))
            inst.last_exit = {"code": None, "signal": None, "at": time.time(), "error": str(result)}
            if inst.state is S.STOPPING:
                # stopping -> stopped: the stop came first, and no process ever ran
                self.transition(inst, S.STOPPED, f"{inst.state_reason} (it could not start)")
            elif result.transient:
                self._retry_transient_spawn(inst, str(result))
            else:
                self._after_unexpected_exit(inst, str(result), quick=True, wants_restart=True)
            return
        proc = result
        spec = inst.spec
        inst.spawn_retries = 0
        inst.proc = proc
        inst.sample = Sample()
        inst.failure = inst.warmup_note = ""
        inst.failed_start = False
        inst.log.note(f"started pid {proc.pid}: {' '.join(argv)}")
        self._attach_output(inst, proc)
        self.publish_targets()
        self.events.emit(
            EventKind.INSTANCE_SPAWNED,
            f"pid {proc.pid}",
            engine=spec.name,
            instance=inst.id,
            data={"pid": proc.pid},
        )
        if self.killing:
            proctree.kill_tree_now(proc.pgid, ())
            return
        if inst.state is S.STOPPING:
            self._signal_stop(inst, proc, inst.state_reason)
            return
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
                EventKind.INSTANCE_WARMUP_PROBLEM, text, engine=inst.spec.name, instance=inst.id
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
            EventKind.INSTANCE_FAILED,
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
        inst.ready_seen = False
        stdout = None
        if inst.spec.mode is EngineMode.WORKER and self.observer is not None:
            # A worker's stdout carries the request protocol: it goes to the request layer.
            stdout = self.observer.spawned(inst, proc)
        process.read_output(
            self.loop,
            proc,
            stdout or _to_log(inst.log, "stdout", proc.pid),
            _to_log(inst.log, "stderr", proc.pid),
        )

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
        proc.close_pipe(proc.stdin)
        self.publish_targets()
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
        if inst.role is InstanceRole.SUCCESSOR:
            # A rollout's new process that ended: the rollout stops (it judges), nothing restarts.
            self.transition(inst, S.EXITED, f"{desc}; not restarted (a rollout's new process)")
            return
        if inst.removed or self.closing or inst.engine.desired is DesiredState.STOPPED:
            self.transition(inst, S.EXITED, f"{desc}; not restarted (engine stopping)")
            return
        if not wants_restart:
            self.transition(inst, S.EXITED, f"{desc}; restart policy {spec.restart.policy}")
            return
        policy = inst.engine.policy(self.config.policy)
        now = self.clock()
        decision = inst.crashes.on_exit(now, uptime, quick, desc, spec.restart, policy.crash)
        if decision.action is Action.FATAL:
            self.transition(inst, S.FATAL, decision.reason, **decision.data)
            cooldown = policy.crash.cooldown
            if cooldown > 0:
                # A fatal instance comes back after a cool-down, if one is set.
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
        if inst.state is not S.STOPPING:
            process.signal_group(proc.pgid, signal.SIGTERM)

        def live_groups() -> set[int]:
            return {
                i.proc.pgid
                for i in self.all_records()
                if i.proc is not None and i.proc is not proc and i.proc.alive
            }

        marker = (inst.id, str(inst.generation), inst.launch_token)
        sweep = proctree.sweep_tree(
            proc.pgid, list(inst.sample.descendants), marker, inst.spec.stop.timeout, live_groups
        )
        task = self.loop.create_task(sweep)
        self._sweeps.add(task)
        task.add_done_callback(self._sweeps.discard)

    async def wait_sweeps(self, timeout: float) -> None:
        """Wait (up to `timeout`) for every launch under way to land (each process is then
        watched, and stopped if it is no longer wanted), and for the sweeps of exited
        instances' trees to end."""
        await process.launches_landed(timeout)
        if self._sweeps:
            await asyncio.wait(set(self._sweeps), timeout=timeout)

    # -- stopping --------------------------------------------------------------------------
    async def stop_instance(self, inst: Instance, reason: str, wait: bool = True) -> None:
        """Stop one instance with its stop policy; never restarted until started again."""
        await self.stop_many([inst], reason, wait)

    def begin_stop(self, inst: Instance, reason: str) -> bool:
        """The stop policy's first step, at once: `stopped` when there is no process, else
        its signal and `stopping`. True while there is a stop to wait for."""
        if inst.state is S.STOPPING:
            # Stopping already: its timer is that stop's SIGKILL, which must still come.
            return True
        inst.cancel_timer()
        if inst.state in (S.BACKOFF, S.EXITED, S.FATAL):
            self.transition(inst, S.STOPPED, reason)
            return False
        if inst.state is S.STOPPED:
            return False
        proc = inst.proc
        self.transition(inst, S.STOPPING, reason)
        if inst.launching:
            return True  # its process is on its way: `_launched` signals it once it exists
        if proc is None or not proc.alive:
            # stopping -> stopped: no process to signal (none was ever started, or its exit
            # came first); a state must never wait for an exit that cannot come.
            self.transition(inst, S.STOPPED, f"{reason} (no process was running)")
            return False
        self._signal_stop(inst, proc, reason)
        return True

    async def wait_stopped(self, insts: list[Instance]) -> None:
        """Wait until none of `insts` is stopping, with one waiter for all of them (each
        stop's SIGKILL comes after its timeout; 10 s more is a bug's margin)."""
        left = collections.deque(insts)

        def all_stopped() -> bool:
            # One that is no longer stopping stays done: each is looked at until it is.
            while left and left[0].state is not S.STOPPING:
                left.popleft()
            return not left

        limit = max(i.spec.stop.timeout for i in insts) + 10.0
        what = insts[0].id if len(insts) == 1 else f"{len(insts)} instances"
        try:
            await self.wait_until(all_stopped, limit, f"{what} to stop")
        except RequestTimeoutError:
            if len(insts) == 1:
                raise
            names = ", ".join(i.id for i in left)
            raise RequestTimeoutError(
                f"timed out after {limit:g}s waiting for {names} to stop"
            ) from None

    async def stop_many(self, insts: list[Instance], reason: str, wait: bool) -> None:
        """`stop_instance` for several at once, in the caller's task."""
        stopping = [i for i in insts if self.begin_stop(i, reason)]
        if wait and stopping:
            await self.wait_stopped(stopping)

    def _signal_stop(self, inst: Instance, proc: ChildProcess, reason: str) -> None:
        """The stop policy's signal to the group, then SIGKILL after its timeout."""
        sig = signal.Signals[inst.spec.stop.signal]
        inst.log.note(f"sending {sig.name} to process group {proc.pgid} ({reason})")
        process.signal_group(proc.pgid, sig)
        inst.timer = self.loop.call_later(
            inst.spec.stop.timeout, self._kill_after_timeout, inst, proc
        )

    def kill_hung(self, inst: Instance, reason: str) -> None:
        """Kill a hung instance's process tree now; its exit is then handled as a crash."""
        proc = inst.proc
        if proc is None or not proc.alive:
            return
        inst.kill_cause = reason.split(":", 1)[0]
        inst.log.note(f"{reason}: SIGKILL to process group {proc.pgid}")
        proctree.kill_tree_now(proc.pgid, inst.sample.descendants)

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
        await self._drain_and_stop_together([inst], reason, restart, wait, timeout, data)

    async def drain_and_stop_many(
        self, insts: list[Instance], reason: str, *, restart: bool = False, wait: bool = True
    ) -> None:
        """`drain_and_stop` for several at once, each stopped as soon as its own requests
        are done, in one task: a task, a waiter and their timers per instance held some 4 KB
        each while a fleet stopped, and the daemon's memory keeps such a peak."""
        together = [i for i in insts if not i.draining]
        # One drained already (by a policy) finishes that drain first, on its own.
        alone = [
            self.drain_and_stop(i, reason, restart=restart, wait=wait) for i in insts if i.draining
        ]
        await asyncio.gather(self._drain_and_stop_together(together, reason, restart, wait), *alone)

    async def _drain_and_stop_together(
        self,
        insts: list[Instance],
        reason: str,
        restart: bool,
        wait: bool,
        timeout: float | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        """Drain `insts` (none of them draining already) and stop each once its requests are
        done or its drain's time is up (`timeout`, by default its stop timeout)."""
        then = "a graceful restart" if restart else "stop"
        why = f"draining to {'restart' if restart else 'stop'}: {reason}"
        stop_reason = f"restart: {reason}" if restart else reason
        stopping: list[Instance] = []
        drains: dict[asyncio.Future[None], Instance] = {}  # those whose requests still run
        all_drained: asyncio.Future[None] = self.loop.create_future()
        timers: list[asyncio.TimerHandle] = []

        def stop(inst: Instance) -> None:
            if self.begin_stop(inst, stop_reason):
                stopping.append(inst)

        def drained(fut: asyncio.Future[None]) -> None:
            inst = drains.pop(fut)
            if not fut.cancelled():  # cancelled: stopped when its stop timeout came
                stop(inst)
            if not drains and not all_drained.done():
                all_drained.set_result(None)

        def limit_of(inst: Instance) -> float:
            return inst.spec.stop.timeout if timeout is None else timeout

        def overdue(limit: float) -> None:
            for fut, inst in list(drains.items()):
                if limit_of(inst) == limit and not fut.done():
                    left = inst.stats.in_flight
                    self._emit(
                        inst,
                        EventKind.INSTANCE_DRAIN_TIMEOUT,
                        f"{then} with {left} request(s) still in flight after {limit:g}s",
                        {"in_flight": left},
                    )
                    stop(inst)
                    fut.cancel()

        for inst in insts:
            inst.draining = True
        try:
            for inst in insts:
                if inst.state is S.READY and self.observer is not None:
                    self._emit(
                        inst, EventKind.INSTANCE_DRAINING, f"{reason}: draining, then {then}", data
                    )
                    fut = self.observer.drain(inst, why)
                    drains[fut] = inst
                    fut.add_done_callback(drained)
                else:
                    stop(inst)
            if drains:
                for limit in {limit_of(i) for i in drains.values()}:
                    timers.append(self.loop.call_later(limit, overdue, limit))
                await all_drained
            if wait and stopping:
                await self.wait_stopped(stopping)
        finally:
            for timer in timers:
                timer.cancel()
            for fut in list(drains):  # cancelled before their turn: not stopped, as before
                fut.remove_done_callback(drained)
                fut.cancel()
            for inst in insts:
                inst.draining = False
            self._check_waiters()

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

    # -- a rollout's records: a successor beside the slot's process, then the swap -----------
    def start_successor(self, inst: Instance, reason: str) -> Instance:
        """Start a process of the engine's wanted spec beside `inst`'s, for its slot; it takes
        no request until it takes the slot (`swap`)."""
        engine = inst.engine
        succ = Instance(engine, inst.index, inst.log, self.clock, InstanceRole.SUCCESSOR)
        succ.gated = True
        engine.surge.append(succ)
        self.start_instance(succ, reason)
        return succ

    def swap(self, old: Instance, new: Instance) -> None:
        """`new` (a ready successor) takes the slot of `old`, which retires: it is never
        restarted, and the caller drains and stops it."""
        engine = old.engine
        keys = (old.key, new.key)
        engine.instances[engine.instances.index(old)] = new
        engine.surge.remove(new)
        engine.surge.append(old)
        old.role, new.role = InstanceRole.RETIRING, InstanceRole.CURRENT
        old.removed = True
        new.gated = False
        if self.observer is not None:
            self.observer.replaced(old, new, keys)
        self.publish_targets()
        self._check_waiters()

    def forget(self, inst: Instance) -> None:
        """Drop a successor or retiring record whose process is gone."""
        surge = inst.engine.surge
        if inst in surge:
            surge.remove(inst)
        self._check_waiters()

    def _emit(
        self, inst: Instance, kind: EventKind, reason: str, data: dict[str, Any] | None
    ) -> None:
        self.events.emit(kind, reason, engine=inst.spec.name, instance=inst.id, data=data or None)

    def _kill_after_timeout(self, inst: Instance, proc: ChildProcess) -> None:
        inst.timer = None
        if not proc.alive:
            return
        timeout = inst.spec.stop.timeout
        inst.log.note(f"still alive {timeout:g}s after the stop signal: SIGKILL to the group")
        self.events.emit(
            EventKind.INSTANCE_KILLED,
            f"did not stop within {timeout:g}s; killed the process group",
            engine=inst.spec.name,
            instance=inst.id,
        )
        proctree.kill_tree_now(proc.pgid, inst.sample.descendants)

    def kill_all(self) -> None:
        """SIGKILL every process tree now (second signal during shutdown), and each process
        still on its way the moment it exists."""
        self.killing = True
        for inst in self.all_records():
            if inst.proc is not None and inst.proc.alive:
                proctree.kill_tree_now(inst.proc.pgid, inst.sample.descendants)


def _to_log(log_file: InstanceLog, stream: str, pid: int) -> Callable[[bytes], None]:
    """A consumer of a pipe that writes what process `pid` writes to the instance's log (a
    partial: 130 B less than a closure, and every instance holds two)."""
    return functools.partial(_write_to_log, log_file, stream, pid)


def _write_to_log(log_file: InstanceLog, stream: str, pid: int, data: bytes) -> None:
    if data:
        log_file.feed(stream, data, pid)
    else:
        log_file.close_stream(stream, pid)
