"""The `engine.*` and `instance.*` calls: register, apply and unregister engines, list and
export them, start, stop, restart, scale and reload them, and the manual overrides (isolate,
drain, restore) of their instances.

Parameters are checked here (`params`); the work is `fleet`'s (engines as a whole) and the
enforcer's (overrides). Each mutating call persists the registry before it answers. Imports no
request code but the membership's `engines_changed`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engctl import protocol
from engctl.errors import (
    EngineNotFoundError,
    InvalidParamsError,
    RolloutFailedError,
    RolloutInProgressError,
    SpecError,
    StorageError,
    UsageError,
)
from engctl.models import EngineSpec, check_dependencies, check_rollout, parse_instance_ref
from engctl.states import (
    DesiredState,
    Eligibility,
    EngineMode,
    EventKind,
    InstanceState,
    RolloutState,
    RolloutStrategy,
)

from .enforcer import Enforcer
from .events import Event, EventLog
from .fleet import Fleet
from .instance import Engine, Instance
from .membership import Membership
from .params import param, str_list
from .registry import Entry, Registry
from .rollout import Rollout
from .scaler import Scaler
from .selection import parse_label
from .server import Connection
from .supervisor import Supervisor

if TYPE_CHECKING:
    from engctl.documents import RolloutDoc

# The events a waiting `reload` streams to its caller (its progress).
ROLLOUT_EVENTS = frozenset(
    {
        EventKind.ENGINE_ROLLOUT_STARTED,
        EventKind.INSTANCE_REPLACED,
        EventKind.ENGINE_ROLLOUT_FINISHED,
        EventKind.ENGINE_ROLLOUT_FAILED,
    }
)


def _up(engine: Engine) -> bool:
    """Whether an engine is wanted running or still has a process."""
    return engine.desired is DesiredState.RUNNING or any(
        i.state is not InstanceState.STOPPED for i in engine.instances
    )


@dataclass(eq=False)
class EngineCalls:
    """The registry's and the engines' side of the RPC surface (bound by `Api.handlers`)."""

    sup: Supervisor
    fleet: Fleet
    registry: Registry
    events: EventLog
    membership: Membership  # told of every change to the engines (oneshot candidates)
    enforcer: Enforcer  # the manual overrides
    scaler: Scaler  # told of every change to the engines (autoscaled ones), and prewarm

    def _engines_changed(self) -> None:
        self.membership.engines_changed()
        self.scaler.engines_changed()

    async def _persist(self) -> None:
        """After a change to the engines: keep dispatch in step, then make it durable."""
        self._engines_changed()
        await self.registry.save()

    def _parse_specs(self, params: dict[str, Any]) -> list[EngineSpec]:
        raw = param(params, "engines", dict)
        specs = [EngineSpec.from_dict(name, data) for name, data in raw.items()]
        if not specs:
            raise SpecError("no engines given (expected at least one [engines.NAME] table)")
        return specs

    async def _register_all(
        self,
        specs: list[EngineSpec],
        start: bool,
        prune: bool,
        recreate: bool = False,
        wait: bool = True,
    ) -> dict[str, Any]:
        incoming = {s.name: s for s in specs}
        after = {n: e.spec for n, e in self.sup.engines.items()}
        if prune:
            after = {n: s for n, s in after.items() if n in incoming}
        after.update(incoming)
        order = check_dependencies(after)  # unknown dependency or cycle: nothing is applied
        results: list[dict[str, Any]] = []
        removed: list[str] = []
        removals = self._removal_order(set(self.sup.engines) - set(incoming)) if prune else []
        desired = DesiredState.RUNNING if start else DesiredState.STOPPED
        # Durable before anything changes: a registration the disk refuses leaves nothing
        # behind (StorageError), and an acknowledged one survives kill -9.
        staged: dict[str, Entry | None] = dict.fromkeys(removals)
        for name, spec in incoming.items():
            current = self.sup.engines.get(name)
            if current is None:
                staged[name] = Entry(spec, desired)
            elif current.spec != spec:
                entry = current.to_entry(self.enforcer.overrides(current))
                staged[name] = dataclasses.replace(entry, spec=spec)
        to_start: list[Engine] = []
        rollouts: list[tuple[dict[str, Any], Rollout]] = []
        async with self.registry.staged(staged):
            for name in removals:
                await self._unregister_one(name)
                removed.append(name)
            for name in order:
                if name not in incoming:
                    continue
                spec = incoming[name]
                engine = self.sup.engines.get(name)
                if engine is None:
                    engine = self.fleet.add_engine(spec, desired, set())
                    self.events.emit(EventKind.ENGINE_REGISTERED, "registered", engine=name)
                    results.append({"name": name, "action": "created", "detail": "registered"})
                    if start:
                        to_start.append(engine)
                elif engine.spec == spec:
                    results.append({"name": name, "action": "unchanged", "detail": "same spec"})
                else:
                    changed = sorted(spec.changed_fields(engine.spec))
                    detail, rollout = await self._update(engine, spec, recreate)
                    self.events.emit(
                        EventKind.ENGINE_UPDATED,
                        f"changed {', '.join(changed)}: {detail}",
                        engine=name,
                    )
                    result: dict[str, Any] = {
                        "name": name,
                        "action": "updated",
                        "detail": detail,
                        "changed": changed,
                    }
                    results.append(result)
                    if rollout is not None:
                        result["rollout"] = rollout.to_json()
                        rollouts.append((result, rollout))
            self._engines_changed()
        for engine in to_start:
            # Dependencies first: `order` is topological.
            await self.fleet.start_engine(engine, "registered")
        for result, rollout in rollouts:
            if wait:
                await asyncio.shield(rollout.finished)
                result["detail"] = _outcome(rollout)
            result["rollout"] = rollout.to_json()
        return {"engines": results, "removed": removed}

    async def _update(
        self, engine: Engine, spec: EngineSpec, recreate: bool
    ) -> tuple[str, Rollout | None]:
        """Apply a changed spec. A rollout under way goes on if only settings change (they
        apply at once); a change that needs new processes or another count supersedes it."""
        old = engine.spec
        settings_only = not spec.needs_restart(old) and spec.instances == old.instances
        if settings_only and engine.rolling_out:
            # No await on this path: the rollout holding the lock sees one spec or the other.
            return await self.fleet.update_engine(engine, spec)
        await self.fleet.stop_rollout(engine, "superseded by a newer spec")
        async with engine.lock:
            return await self.fleet.update_engine(engine, spec, recreate=recreate)

    async def register(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        specs = self._parse_specs(params)
        return await self._register_all(
            specs,
            param(params, "start", bool, True),
            prune=False,
            recreate=param(params, "recreate", bool, False),
            wait=param(params, "wait", bool, True),
        )

    async def apply(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        specs = self._parse_specs(params)
        return await self._register_all(
            specs,
            param(params, "start", bool, True),
            prune=param(params, "prune", bool, False),
            recreate=param(params, "recreate", bool, False),
            wait=param(params, "wait", bool, True),
        )

    def _removal_order(self, names: set[str]) -> list[str]:
        """`names` in a safe removal order (dependents first); refuse if a kept engine needs one."""
        for name in sorted(names):
            self.engine(name)  # all must exist before anything is removed
        for e in self.sup.engines.values():
            needed = sorted(set(e.spec.depends_on) & names)
            if needed and e.spec.name not in names:
                raise SpecError(
                    f"cannot unregister {needed[0]!r}: {e.spec.name!r} depends on it"
                    f" (unregister {e.spec.name!r} too, or drop the dependency first)"
                )
        order = check_dependencies({n: e.spec for n, e in self.sup.engines.items()})
        return [n for n in reversed(order) if n in names]

    async def _unregister_one(self, name: str) -> None:
        engine = self.engine(name)
        await self.fleet.stop_rollout(engine, "the engine was unregistered")
        async with engine.lock:
            await self.fleet.remove_engine(engine)
        self.events.emit(EventKind.ENGINE_UNREGISTERED, "unregistered", engine=name)

    async def unregister(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        names = str_list(params, "names")
        removed = []
        order = self._removal_order(set(names))
        async with self.registry.staged(dict.fromkeys(order)):
            for name in order:
                await self._unregister_one(name)
                removed.append(name)
            self._engines_changed()
        return {"removed": removed}

    def chosen(self, params: dict[str, Any]) -> list[Engine]:
        """The engines `names` (all when none; an unknown one is an error), narrowed to
        `type` and to every `labels` pair (`k=v`), in name order."""
        names = str_list(params, "names", None)
        type_ = param(params, "type", str, None)
        try:
            labels = [parse_label(t) for t in str_list(params, "labels", None) or []]
        except UsageError as exc:
            raise InvalidParamsError(exc.message) from None
        engines = (
            [self.engine(n) for n in dict.fromkeys(names)]
            if names
            else [self.sup.engines[n] for n in sorted(self.sup.engines)]
        )
        wanted = self.sup.index.find(type_, labels)
        return engines if wanted is None else [e for e in engines if e.spec.name in wanted]

    def list_engines(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        out = []
        for e in self.chosen(params):
            s = e.spec
            out.append(
                {
                    "name": s.name,
                    "type": s.type,
                    "mode": s.mode.value,
                    # As `status` counts them: a oneshot engine has no long-running instances.
                    "instances": s.instances if s.mode.long_running else 0,
                    "max_concurrency": s.max_concurrency,
                    "desired": e.desired.value,
                    "command": list(s.command),
                    "capabilities": list(s.capabilities),
                    "labels": dict(s.labels),
                    "weight": s.weight,
                    "depends_on": list(s.depends_on),
                    "version": s.version,
                    "registered_at": e.registered_at,
                }
            )
        return {"engines": out}

    def export(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        names = str_list(params, "names", None) or sorted(self.sup.engines)
        return {"engines": {n: self.engine(n).spec.to_dict() for n in names}}

    def engine(self, name: str) -> Engine:
        try:
            return self.sup.engines[name]
        except KeyError:
            known = ", ".join(sorted(self.sup.engines)) or "none registered"
            raise EngineNotFoundError(f"unknown engine {name!r} (known: {known})") from None

    def _targets(self, params: dict[str, Any]) -> list[tuple[Engine, list[Instance] | None]]:
        """Resolve NAME or NAME#K refs; None means the whole engine. All must exist."""
        refs = str_list(params, "targets")
        if not refs:
            raise InvalidParamsError("no engine or instance given")
        out: list[tuple[Engine, list[Instance] | None]] = []
        for ref in refs:
            name, idx = parse_instance_ref(ref)
            engine = self.engine(name)
            out.append((engine, None if idx is None else [self.sup.instance(engine, idx)]))
        return out

    async def start(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        started: list[str] = []
        for engine, insts in self._targets(params):
            async with engine.lock:
                if insts is None:
                    engine.stopped_instances.clear()
                    started += await self.fleet.start_engine(engine, "started by user")
                else:
                    if engine.desired is DesiredState.STOPPED:
                        # Only the named instances come up; the others stay stopped, also
                        # after a daemon restart.
                        engine.stopped_instances.update(i.index for i in engine.instances)
                    for inst in insts:
                        engine.stopped_instances.discard(inst.index)
                    started += await self.fleet.start_engine(
                        engine, "started by user", [i.index for i in insts]
                    )
        await self._persist()
        return {"started": started}

    async def stop(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        wait = param(params, "wait", bool, True)
        refuse = param(params, "no_dependents", bool, False)
        targets = self._targets(params)
        whole = [engine for engine, insts in targets if insts is None]
        names = {e.spec.name for e in whole}
        # systemd's order: what depends on a stopping engine stops first (stopping one instance
        # leaves the engine serving, so only whole engines count).
        dependents = [e for e in self.fleet.dependents(names) if _up(e)]
        if dependents and refuse:
            listed = ", ".join(repr(e.spec.name) for e in dependents)
            raise UsageError(
                f"not stopping {', '.join(sorted(names))}: {listed}"
                f" {'depends' if len(dependents) == 1 else 'depend'} on it and"
                f" {'is' if len(dependents) == 1 else 'are'} running (stop"
                f" {'it' if len(dependents) == 1 else 'them'} first, or leave out"
                " --no-dependents to stop them too)",
                {"dependents": [e.spec.name for e in dependents]},
            )
        before = [
            (engine, engine.desired, set(engine.stopped_instances))
            for engine in [e for e, _ in targets] + dependents
        ]
        for engine, insts in targets:
            if insts is None:
                engine.desired = DesiredState.STOPPED
            else:
                engine.stopped_instances.update(i.index for i in insts)
        for engine in dependents:
            engine.desired = DesiredState.STOPPED
        # The wish is durable before any signal is sent: a restarted daemon will not undo it.
        try:
            await self._persist()
        except StorageError:
            for engine, desired, stopped_set in before:  # not durable: nothing is stopped
                engine.desired, engine.stopped_instances = desired, stopped_set
            raise
        for engine in whole:
            below = self.fleet.dependents({engine.spec.name})
            mine = [e.spec.name for e in below if e in dependents]
            if mine:
                verb = "it depends" if len(mine) == 1 else "they depend"
                self.events.emit(
                    EventKind.ENGINE_STOPPING_DEPENDENTS,
                    f"stopping {', '.join(mine)} first: {verb} on {engine.spec.name}",
                    engine=engine.spec.name,
                    data={"dependents": mine},
                )
        stopped = await self.fleet.stop_engines(
            dependents + whole,
            "stopped by user (dependents first)" if dependents else "stopped by user",
            wait,
        )
        results = await asyncio.gather(
            *(
                self.fleet.stop_instances(insts, "stopped by user", wait)
                for _engine, insts in targets
                if insts is not None
            )
        )
        return {
            "stopped": stopped + [i for r in results for i in r],
            "waited": wait,
            "dependents": [e.spec.name for e in dependents],
        }

    async def restart(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        targets = self._targets(params)
        restarted: list[str] = []
        for engine, insts in targets:
            async with engine.lock:
                chosen = engine.instances if insts is None else insts
                if insts is None:
                    engine.stopped_instances.clear()
                else:
                    if engine.desired is DesiredState.STOPPED:
                        engine.stopped_instances.update(i.index for i in engine.instances)
                    engine.stopped_instances.difference_update(i.index for i in insts)
                # Each running instance drains first: a restart loses no request.
                restarted += await self.fleet.restart_instances(
                    engine, chosen, "restart requested by user"
                )
        await self._persist()
        return {"restarted": restarted}

    async def scale(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        engine = self.engine(param(params, "name", str))
        n = param(params, "instances", int)
        if not engine.spec.mode.long_running:
            raise SpecError(f"engine {engine.spec.name!r} is oneshot: it has no instances to scale")
        if engine.spec.scale is not None:
            return await self._scale_min(engine, n)
        async with engine.lock:
            detail = await self.fleet.scale_engine(engine, n)
        await self._persist()
        return {"name": engine.spec.name, "instances": n, "detail": detail}

    async def _scale_min(self, engine: Engine, n: int) -> dict[str, Any]:
        """`engctl scale` of an autoscaled engine sets its `scale.min` (kept in the registry,
        as a scaled count is); the autoscaler then keeps at least that many."""
        name = engine.spec.name
        old = engine.spec
        new = old.with_scale_min(n)  # SpecError above scale.max: nothing changes
        assert old.scale is not None and new.scale is not None
        entry = engine.to_entry(self.enforcer.overrides(engine))
        async with self.registry.staged({name: dataclasses.replace(entry, spec=new)}):
            engine.spec = new
            self._engines_changed()
        detail = (
            f"autoscaled: scale.min set to {n} (was {old.scale.min}); its instances follow"
            f" demand between {n} and {new.scale.max}"
        )
        self.events.emit(
            EventKind.ENGINE_SCALED,
            f"scale.min {old.scale.min} -> {n} (autoscaled)",
            engine=name,
            data={"min": n, "was": old.scale.min},
        )
        return {"name": name, "instances": n, "detail": detail, "autoscaled": True}

    async def prewarm(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        engine = self.engine(param(params, "name", str))
        n = param(params, "instances", int)
        if n < 0:
            raise InvalidParamsError(f"parameter 'instances' must be 0 or more, got {n}")
        seconds = param(params, "for", (int, float), None)
        if seconds is not None and seconds <= 0:
            raise InvalidParamsError(f"parameter 'for' must be above 0 seconds, got {seconds}")
        return self.scaler.prewarm(engine, n, None if seconds is None else float(seconds))

    async def reload(self, params: dict[str, Any], conn: Connection) -> RolloutDoc:
        """`engctl reload NAME|NAME#K`: replace the processes with new ones of the wanted
        spec, one slot after another (or all at once with `recreate`)."""
        name, index = parse_instance_ref(param(params, "target", str))
        engine = self.engine(name)
        target = engine.instances if index is None else [self.sup.instance(engine, index)]
        surge = param(params, "max_surge", int, None)
        down = param(params, "max_unavailable", int, None)
        timeout = param(params, "timeout", (int, float), None)
        recreate = param(params, "recreate", bool, False)
        for key, value in (("max_surge", surge), ("max_unavailable", down)):
            if value is not None and value < 0:
                raise InvalidParamsError(f"{key} must be 0 or more, got {value}")
        if timeout is not None and not timeout > 0:
            raise InvalidParamsError(f"timeout must be positive, got {timeout}")
        limits = engine.spec.rollout
        if not recreate:
            check_rollout(
                limits.max_surge if surge is None else surge,
                limits.max_unavailable if down is None else down,
                "--max-surge and --max-unavailable",
            )
        if engine.spec.mode is EngineMode.ONESHOT:
            return _nothing(
                engine,
                f"{name} is a oneshot engine: each request runs a new process of its current"
                " spec, so there is no process to replace",
            )
        rollout = engine.rollout
        if engine.rolling_out and rollout is not None:
            now = rollout.to_json()
            raise RolloutInProgressError(
                f"a rollout of {name} is under way (generation {now['generation']}:"
                f" {len(now['replaced'])} of {now['total']} replaced): wait for it (`engctl"
                f" status {name}`), or apply a new spec to supersede it",
                {"rollout": dict(now)},
            )
        if engine.desired is DesiredState.STOPPED:
            return _nothing(
                engine,
                f"{name} is stopped: nothing to replace (it runs generation"
                f" {engine.generation} when started)",
            )
        running = [i for i in target if i.state.has_process or i.state is InstanceState.BACKOFF]
        if not running:
            if not target:  # an autoscaled engine at zero: its next instance starts as wanted
                return _nothing(
                    engine,
                    f"{name} has no instance (scaled to zero): its next one runs generation"
                    f" {engine.generation}",
                )
            return _nothing(engine, f"{', '.join(i.id for i in target)}: no process to replace")
        cause = "reload" if index is None else f"reload of {target[0].id}"
        if index is None and all(i.generation >= engine.generation for i in running):
            await self._bump_generation(engine)
        elif index is None:
            cause = f"reload: goes on with generation {engine.generation}"
        rollout = self.fleet.start_rollout(
            engine,
            cause=cause,
            strategy=RolloutStrategy.RECREATE if recreate else RolloutStrategy.ROLLING,
            max_surge=surge,
            max_unavailable=down,
            timeout=timeout,
            only=None if index is None else {index},
        )
        if param(params, "progress", bool, False):
            self._stream_progress(conn, rollout)
        if not param(params, "wait", bool, True):
            return rollout.to_json()
        await asyncio.shield(rollout.finished)
        doc = rollout.to_json()
        if not rollout.ok:
            raise RolloutFailedError(f"rollout of {name} stopped: {rollout.failure}", dict(doc))
        return doc

    async def _bump_generation(self, engine: Engine) -> None:
        """A new wanted generation of the same spec (durable before anything is replaced)."""
        engine.set_spec(engine.spec, generation=engine.generation + 1)
        try:
            await self._persist()
        except StorageError:
            engine.set_spec(engine.spec, generation=engine.generation - 1)
            raise

    def _stream_progress(self, conn: Connection, rollout: Rollout) -> None:
        """Send `conn` the rollout's events as notifications until it ends (`reload`'s
        progress lines)."""
        name = rollout.engine.spec.name

        def push(ev: Event) -> None:
            if ev.engine == name and ev.kind in ROLLOUT_EVENTS:
                conn.write(protocol.notification("event", ev.to_json()))

        def unsubscribe(*_: object) -> None:
            self.events.subscribers.discard(push)

        self.events.subscribers.add(push)
        rollout.finished.add_done_callback(unsubscribe)
        conn.on_close.append(unsubscribe)

    def _override_targets(self, params: dict[str, Any]) -> list[Instance]:
        insts: list[Instance] = []
        for engine, chosen in self._targets(params):
            if not engine.spec.mode.long_running:
                raise InvalidParamsError(
                    f"{engine.spec.name} is a oneshot engine: it has no instances to"
                    " isolate, drain or restore"
                )
            insts += engine.instances if chosen is None else chosen
        return insts

    async def _override(
        self, params: dict[str, Any], eligibility: Eligibility | None
    ) -> dict[str, Any]:
        reason = param(params, "reason", str, None) or ""
        insts = self._override_targets(params)
        for inst in insts:
            self.enforcer.set_manual(inst, eligibility, reason)
        await self._persist()
        return {"instances": [i.to_json() for i in insts]}

    async def isolate(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        return await self._override(params, Eligibility.ISOLATED)

    async def drain(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        return await self._override(params, Eligibility.DRAINING)

    async def restore(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        return await self._override(params, None)


def _outcome(rollout: Rollout) -> str:
    """An ended rollout in a few words (`register`/`apply`'s detail)."""
    if rollout.ok:
        n = len(rollout.replaced)
        verb = "recreated" if rollout.strategy is RolloutStrategy.RECREATE else "rolled out"
        return f"{verb} generation {rollout.generation}: {n} replaced"
    return f"rollout of generation {rollout.generation} failed: {rollout.failure}"


def _nothing(engine: Engine, why: str) -> RolloutDoc:
    """The rollout object of a `reload` with nothing to replace (`reason` says why)."""
    return {
        "engine": engine.spec.name,
        "generation": engine.generation,
        "strategy": RolloutStrategy.ROLLING.value,
        "cause": "reload",
        "state": RolloutState.FINISHED.value,
        "ok": True,
        "reason": why,
        "steps": 0,
        "replaced": [],
        "total": 0,
        "max_surge": engine.spec.rollout.max_surge,
        "max_unavailable": engine.spec.rollout.max_unavailable,
        "started_at": time.time(),
        "duration_s": 0.0,
    }
