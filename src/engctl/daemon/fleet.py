"""Engine-level operations over the supervisor: add an engine's instance slots, start it after
its dependencies, stop engines dependents first, drain several instances at once, restart,
scale, update in place or by a rollout (`rollout`, run holding the engine's lock), remove, and
shut everything down.

The lifecycle of one instance is `supervisor`'s; this module composes it. Imports no failure
policy.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from engctl.errors import RequestTimeoutError
from engctl.models import RESTART_FIELDS, EngineSpec, check_dependencies
from engctl.protocol import load_msgspec
from engctl.states import DesiredState, EngineMode, EventKind, InstanceState, RolloutStrategy

from .instance import Engine, Instance
from .logs import InstanceLog
from .rollout import Rollout, serving_process
from .supervisor import Supervisor

log = logging.getLogger("engctl.supervisor")

S = InstanceState
# How long `start` of a dependent waits for its dependencies to be ready.
DEPENDENCY_WAIT = 30.0


class Fleet:
    """Every engine as a whole: what `engctl start/stop/restart/scale/register/unregister` and
    the daemon's start and shutdown ask for."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self._rollouts: set[asyncio.Task[None]] = set()

    def add_engine(
        self,
        spec: EngineSpec,
        desired: DesiredState,
        stopped_instances: set[int],
        registered_at: float | None = None,
        generation: int = 1,
    ) -> Engine:
        """Create the runtime side of a registered engine (instances stay stopped)."""
        _read_frames_of(spec)
        engine = Engine(spec, desired, registered_at, generation)
        self.sup.engines[spec.name] = engine
        self.sup.index.add(spec)
        engine.stopped_instances = set(stopped_instances)
        # An autoscaled engine starts with what it wants with no demand (its floor).
        self._resize(engine, spec.scale.floor if spec.scale is not None else None)
        return engine

    def _resize(self, engine: Engine, want: int | None = None) -> list[Instance]:
        """Add instance slots up to `want` (by default what the engine wants: its spec's
        count, or an autoscaled engine's current one); return the ones to remove (highest)."""
        if want is None or not engine.spec.mode.long_running:
            want = engine.wanted
        held = serving_process(engine) if len(engine.instances) < want else None
        while len(engine.instances) < want:
            idx = len(engine.instances)
            log_file = InstanceLog(
                self.sup.paths.instance_log(engine.spec.name, idx),
                self.sup.config.log_max_bytes,
                self.sup.config.log_backups,
                self.sup.write_health,
            )
            inst = Instance(engine, idx, log_file, self.sup.clock)
            if held is not None:
                inst.spec, inst.generation = held  # the next rollout replaces it as the others
            engine.instances.append(inst)
        extra = engine.instances[want:]
        del engine.instances[want:]
        oneshot = engine.spec.mode is EngineMode.ONESHOT
        if oneshot and engine.oneshot_log is None:
            name = engine.spec.name
            engine.oneshot_log = InstanceLog(
                self.sup.paths.log_dir / f"{name}.oneshot.log",
                self.sup.config.log_max_bytes,
                self.sup.config.log_backups,
            )
        elif not oneshot and engine.oneshot_log is not None:
            engine.oneshot_log.close()
            engine.oneshot_log = None
        return extra

    async def start_engine(
        self, engine: Engine, reason: str, indices: list[int] | None = None
    ) -> list[str]:
        """Start the engine's instances (all, or `indices`) after its dependencies are ready."""
        await self.sup.spawn_allowed.wait()
        for dep in engine.spec.depends_on:
            dep_engine = self.sup.engines.get(dep)
            if dep_engine is None:
                continue
            if dep_engine.desired is not DesiredState.RUNNING or not any(
                i.state.is_running for i in dep_engine.instances
            ):
                await self.start_engine(dep_engine, f"dependency of {engine.spec.name}")
                try:
                    await self.sup.wait_until(
                        lambda d=dep_engine: all(  # type: ignore[misc]
                            i.state.is_running or i.state is S.FATAL for i in d.instances
                        ),
                        DEPENDENCY_WAIT,
                        f"dependency {dep} to be ready",
                    )
                except RequestTimeoutError as exc:
                    self.sup.events.emit(
                        EventKind.ENGINE_DEPENDENCY_TIMEOUT,
                        f"starting anyway: {exc}",
                        engine=engine.spec.name,
                    )
        engine.desired = DesiredState.RUNNING
        started = []
        launched = []
        for inst in engine.instances:
            if indices is not None and inst.index not in indices:
                continue
            if inst.state is S.STOPPING:
                # A start asked during a stop (`stop --no-wait`) takes effect once it ends.
                await self.sup.wait_until(
                    lambda i=inst: i.state is not S.STOPPING,  # type: ignore[misc]
                    inst.spec.stop.timeout + 10.0,
                    f"{inst.id} to stop",
                )
                if engine.desired is not DesiredState.RUNNING:
                    break  # stopped again meanwhile: the later wish wins
            if inst.state in (S.STOPPED, S.EXITED, S.FATAL, S.BACKOFF):
                if inst.state is S.FATAL:
                    inst.crashes.reset()
                self.sup.start_instance(inst, reason)
                started.append(inst.id)
                launched.append(inst)
        await self.sup.launched(launched)
        return started

    async def stop_instances(self, insts: list[Instance], reason: str, wait: bool) -> list[str]:
        """Stop several instances at once; with `wait`, return when all are stopped."""
        active = [i for i in insts if i.state is not S.STOPPED]
        await self.sup.stop_many(active, reason, wait)
        return [i.id for i in active]

    async def drain_instances(
        self, insts: list[Instance], reason: str, *, restart: bool = False, wait: bool = True
    ) -> list[str]:
        """Drain and stop several instances at once; returns the ids of those not stopped."""
        active = [i for i in insts if i.state is not S.STOPPED]
        await self.sup.drain_and_stop_many(active, reason, restart=restart, wait=wait)
        return [i.id for i in active]

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

    async def update_engine(
        self, engine: Engine, spec: EngineSpec, *, recreate: bool = False
    ) -> tuple[str, Rollout | None]:
        """Apply a changed spec, replacing only what must change: in place, by scaling, or a
        new generation rolled out (`recreate`: every instance at once). Returns what was done
        and the rollout started, which runs once the caller (holding the lock) lets go."""
        old = engine.spec
        _read_frames_of(spec)
        self.sup.index.replace(old, spec)
        if not spec.needs_restart(old):
            engine.set_spec(spec)
            if spec.scale is None and len(engine.instances) != spec.instances:
                return await self.scale_engine(engine, spec.instances), None
            return "updated in place", None
        if spec.mode.long_running != old.mode.long_running:
            # To or from oneshot: there is no process of the other kind to roll over to.
            await self._recreate_now(engine, spec)
            return "restarted", None
        engine.set_spec(spec, generation=engine.generation + 1)
        if spec.scale is None and len(engine.instances) != spec.instances:
            await self.scale_engine(engine, spec.instances)
        if not any(i.state.has_process or i.state is S.BACKOFF for i in engine.instances):
            for inst in engine.instances:
                inst.adopt_wanted()
            return f"generation {engine.generation}: no process to replace", None
        changed = ", ".join(sorted(spec.changed_fields(old) & RESTART_FIELDS))
        rollout = self.start_rollout(
            engine,
            cause=f"spec changed: {changed}",
            strategy=RolloutStrategy.RECREATE if recreate else RolloutStrategy.ROLLING,
        )
        verb = "recreating" if recreate else "rolling out"
        return f"{verb} generation {engine.generation}", rollout

    async def _recreate_now(self, engine: Engine, spec: EngineSpec) -> None:
        """Every instance drains and stops, the engine takes `spec`, then starts again."""
        running = [i for i in engine.records() if i.state is not S.STOPPED]
        for inst in running:
            inst.restarting = True
        try:
            await self.drain_instances(running, "spec changed", restart=True)
            for inst in engine.records():
                inst.log.close()
            engine.set_spec(spec, generation=engine.generation + 1)
            for inst in engine.instances:
                inst.adopt_wanted()
            removed = self._resize(engine)
            for inst in removed:
                inst.removed = True
            if engine.desired is DesiredState.RUNNING:
                await self.start_engine(engine, "spec changed")
        finally:
            for inst in running:
                inst.restarting = False

    # -- rollouts --------------------------------------------------------------------------
    def start_rollout(self, engine: Engine, **options: Any) -> Rollout:
        """Start a rollout of `engine` (`Rollout`'s options); it runs holding the engine's
        lock, so after whatever holds it now."""
        rollout = Rollout(self.sup, engine, **options)
        engine.rollout = rollout
        task = self.sup.loop.create_task(self._run_rollout(engine, rollout))
        self._rollouts.add(task)
        task.add_done_callback(self._rollouts.discard)
        return rollout

    async def _run_rollout(self, engine: Engine, rollout: Rollout) -> None:
        async with engine.lock:
            await rollout.run()

    async def stop_rollout(self, engine: Engine, reason: str) -> None:
        """Stop the engine's rollout under way, if any, and wait until it has ended."""
        rollout = engine.rollout
        if isinstance(rollout, Rollout) and rollout.running:
            rollout.stop(reason)
            await asyncio.shield(rollout.finished)

    async def scale_engine(self, engine: Engine, n: int) -> str:
        """Grow or shrink to `n` instances (the highest indices drain, then stop)."""
        before = len(engine.instances)
        engine.set_spec(engine.spec.with_instances(n))
        leaving = engine.instances[n:]
        for inst in leaving:
            inst.removed = True  # never restarted, whatever happens while it drains
        await self.drain_instances(leaving, f"scaled to {n}")
        for inst in self._resize(engine):
            inst.log.close()
        if engine.desired is DesiredState.RUNNING:
            await self.start_engine(engine, f"scaled to {n}")
        self.sup.events.emit(
            EventKind.ENGINE_SCALED, f"{before} -> {n} instances", engine=engine.spec.name
        )
        self.sup.publish_targets()
        return f"scaled {before} -> {n}"

    async def resize(
        self,
        engine: Engine,
        n: int,
        reason: str,
        prepare: Callable[[Instance], None] | None = None,
    ) -> list[str]:
        """The autoscaler's resize to `n` slots (the spec is left alone): new slots start
        (`prepare` sees each first), the highest ones drain, then stop and go (the ids stay
        NAME#0..NAME#n-1). Returns the ids started. Call with the engine's lock held."""
        leaving = engine.instances[n:]
        for inst in leaving:
            inst.removed = True  # never restarted, whatever happens while it drains
        await self.drain_instances(leaving, reason)
        before = len(engine.instances)
        for inst in self._resize(engine, n):
            inst.log.close()
        if prepare is not None:
            for inst in engine.instances[before:]:
                prepare(inst)
        started: list[str] = []
        if engine.desired is DesiredState.RUNNING and n > before:
            started = await self.start_engine(engine, reason, list(range(before, n)))
        self.sup.publish_targets()
        return started

    async def remove_engine(self, engine: Engine) -> None:
        """Drain and stop every instance and forget the engine."""
        engine.desired = DesiredState.STOPPED
        for inst in engine.records():
            inst.removed = True
        await self.drain_instances(engine.records(), "unregistered")
        for inst in engine.records():
            inst.log.close()
        if engine.oneshot_log is not None:
            engine.oneshot_log.close()
        self.sup.engines.pop(engine.spec.name, None)
        self.sup.index.remove(engine.spec)
        self.sup.publish_targets()

    def dependents(self, names: set[str]) -> list[Engine]:
        """Engines that depend on any of `names`, directly or through others (not those
        named), dependents of dependents first."""
        found: set[str] = set()
        grew = True
        while grew:
            grew = False
            for e in self.sup.engines.values():
                n = e.spec.name
                if n not in found and n not in names and set(e.spec.depends_on) & (names | found):
                    found.add(n)
                    grew = True
        order = check_dependencies({n: e.spec for n, e in self.sup.engines.items()})
        return [self.sup.engines[n] for n in reversed(order) if n in found]

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
            return await self.stop_instances(engine.records(), reason, wait)

        for engine in engines:
            tasks[engine.spec.name] = self.sup.loop.create_task(stop_one(engine))
        results = await asyncio.gather(*tasks.values())
        return list(dict.fromkeys(i for r in results for i in r))  # a slot's two processes: once

    async def end_rollouts(self, reason: str, timeout: float) -> None:
        """Daemon shutdown: nothing starts again; stop every rollout under way and wait up to
        `timeout` until they have ended (what was on its way undone)."""
        self.sup.closing = True
        ending = []
        for engine in self.sup.engines.values():
            rollout = engine.rollout
            if isinstance(rollout, Rollout) and rollout.running:
                rollout.stop(reason)
                ending.append(rollout.finished)
        if ending and timeout > 0:
            await asyncio.wait(ending, timeout=timeout)

    async def shutdown(self, timeout: float) -> None:
        """Stop everything with each engine's stop policy, dependents first (daemon exit)."""
        await self.end_rollouts("the daemon is shutting down", 0)
        try:
            await asyncio.wait_for(
                self.stop_engines(list(self.sup.engines.values()), "daemon shutting down", True),
                timeout,
            )
        except (TimeoutError, RequestTimeoutError):
            self.sup.kill_all()
        except Exception:
            # A bug must not leave engines running after the daemon: kill them all.
            log.exception("graceful stop failed; killing every engine")
            self.sup.kill_all()
        if self._rollouts:
            await asyncio.wait(set(self._rollouts), timeout=timeout)
        await self.sup.wait_sweeps(timeout)
        for inst in self.sup.all_records():
            inst.log.close()
        for engine in self.sup.engines.values():
            if engine.oneshot_log is not None:
                engine.oneshot_log.close()


def _read_frames_of(spec: EngineSpec) -> None:
    """An engine that takes requests has their frames checked and read by msgspec: loaded as
    it is added or becomes one (25 ms), before its first request, not by the loop in the middle
    of one. A daemon that supervises services only never carries it (1.1 MiB)."""
    if spec.mode is not EngineMode.SERVICE:
        load_msgspec()
