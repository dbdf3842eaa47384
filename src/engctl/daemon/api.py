"""The daemon's whole RPC surface: `noun.verb` methods over the supervisor and the registry.

Parameters are checked here (wrong types raise InvalidParamsError); behaviour lives in
`supervisor`. Each mutating call persists the registry before it answers.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import psutil

from engctl import __version__, protocol
from engctl.errors import (
    EngineNotFoundError,
    IncompatibleDaemonError,
    InvalidParamsError,
    SpecError,
    StorageError,
    UsageError,
)
from engctl.homefiles import tail_logs
from engctl.models import (
    ONESHOT_INDEX,
    EngineSpec,
    check_dependencies,
    instance_id,
    parse_instance_ref,
    split_instance_id,
)
from engctl.paths import Paths
from engctl.policy_config import effective_policy
from engctl.states import DesiredState, Eligibility, EngineMode, EventKind, InstanceState

from . import allow_ssl
from .enforcer import Enforcer
from .events import Event, EventLog
from .fleet import Fleet
from .instance import Engine, Instance
from .logs import InstanceLog
from .membership import Membership
from .metrics import Rollups, prometheus_text, snapshot
from .registry import Entry, Registry
from .router import Router
from .selection import parse_label
from .server import Connection, Handler, Reply
from .supervisor import Supervisor

if TYPE_CHECKING:
    from engctl.documents import EventsDoc, LiveDoc, StatusDoc


def _get(
    params: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    if key not in params or params[key] is None:
        if default is ...:
            raise InvalidParamsError(f"missing parameter {key!r}")
        return default
    value = params[key]
    if kind in (int, float, (int, float)):
        # One numeric check for every edge: no bool, nan, inf (JSON's 1e999).
        return protocol.number(f"parameter {key!r}", value, integer=kind is int)
    if not isinstance(value, kind):
        raise InvalidParamsError(f"parameter {key!r} has the wrong type: {value!r}")
    return value


def _up(engine: Engine) -> bool:
    """Whether an engine is wanted running or still has a process."""
    return engine.desired is DesiredState.RUNNING or any(
        i.state is not InstanceState.STOPPED for i in engine.instances
    )


def _str_list(params: dict[str, Any], key: str, default: Any = ...) -> list[str]:
    value = _get(params, key, list, default)
    if value is not None and not all(isinstance(v, str) for v in value):
        raise InvalidParamsError(f"parameter {key!r} must be a list of strings")
    return value  # type: ignore[no-any-return]


class DaemonControl(Protocol):
    """What the daemon itself answers: its settings, and re-reading them."""

    def config_info(self) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...


class Api:
    """Binds RPC method names to the daemon's parts."""

    # Set by the daemon: `daemon.config` and `daemon.reload` go to it.
    control: DaemonControl | None = None

    def __init__(
        self,
        paths: Paths,
        supervisor: Supervisor,
        fleet: Fleet,
        registry: Registry,
        events: EventLog,
        router: Router,
        membership: Membership,
        enforcer: Enforcer,
        request_shutdown: Callable[[], None],
        rollups: Rollups | None = None,
    ) -> None:
        self.rollups = rollups
        self._prometheus_ready = False
        self.paths = paths
        self.router = router
        self.membership = membership
        self.enforcer = enforcer
        self.sup = supervisor
        self.fleet = fleet
        self.registry = registry
        self.events = events
        self.request_shutdown = request_shutdown
        self.started_at = time.time()
        self._self_proc = psutil.Process()

    def handlers(self) -> dict[str, Handler]:
        return {
            "session.hello": self.hello,
            "daemon.status": self.daemon_status,
            "daemon.stop": self.daemon_stop,
            "daemon.config": self.daemon_config,
            "daemon.reload": self.daemon_reload,
            "engine.register": self.register,
            "engine.apply": self.apply,
            "engine.unregister": self.unregister,
            "engine.list": self.list_engines,
            "engine.export": self.export,
            "engine.start": self.start,
            "engine.stop": self.stop,
            "engine.restart": self.restart,
            "engine.scale": self.scale,
            "status.get": self.status,
            "events.list": self.events_list,
            "events.follow": self.events_follow,
            "logs.read": self.logs_read,
            "logs.follow": self.logs_follow,
            "request.exec": self.request_exec,
            "instance.isolate": self.isolate,
            "instance.drain": self.drain,
            "instance.restore": self.restore,
            "policy.show": self.policy_show,
            "metrics.get": self.metrics_get,
            "metrics.live": self.metrics_live,
            "metrics.flush": self.metrics_flush,
        }

    async def _persist(self) -> None:
        """After a change to the engines: keep dispatch in step, then make it durable."""
        self.membership.engines_changed()
        await self.registry.save()

    # -- requests --------------------------------------------------------------------------
    def request_exec(self, params: dict[str, Any], conn: Connection) -> Reply:
        # A Reply, not a coroutine: completed by callbacks, no task per request.
        return self.router.submit(params)

    # -- session and daemon ----------------------------------------------------------------
    def hello(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        theirs = _get(params, "protocol", int)
        if theirs != protocol.PROTOCOL_VERSION:
            raise IncompatibleDaemonError(
                f"the daemon speaks protocol {protocol.PROTOCOL_VERSION} (engctl {__version__}),"
                f" this client {theirs}: restart the daemon with `engctl daemon stop`"
            )
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "version": __version__,
            "pid": os.getpid(),
            # What a client may send: a batch checks each request against it before sending.
            "max_frame_bytes": self.sup.config.max_frame_bytes,
            "warnings": self._warnings(),
        }

    def _warnings(self, resets: bool = False) -> list[str]:
        """What a user should know about the state files, one line each (the CLI shows them)."""
        out = [
            f"registry entry {s['name']!r} skipped ({s['error']}): not running; the entry is"
            " kept in registry.json (fix it there with the daemon stopped, or register the"
            " engine again)"
            for s in self.registry.skipped_json()
        ]
        health = self.sup.write_health
        if health is not None:
            for target, f in health.to_json().items():
                where = f" ({f['path']})" if f["path"] else ""
                out.append(
                    f"cannot write {target}{where}: {f['error']} ({f['count']} failed writes"
                    f" in {time.time() - f['since']:.0f}s); supervision goes on"
                )
        if resets:
            out += [
                f"{r['path']} could not be used ({r['error']}): moved to {r['moved_to']}"
                for r in self._database_resets()
            ]
        return out

    def _database_resets(self) -> list[dict[str, Any]]:
        writer = self.rollups.writer if self.rollups is not None else None
        resets = list(self.events.db.resets)
        if writer is not None:
            resets += writer.db.resets
        return sorted(resets, key=lambda r: float(r["at"]))

    def daemon_status(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        health = self.sup.write_health
        with self._self_proc.oneshot():
            rss = self._self_proc.memory_info().rss
            cpu = self._self_proc.cpu_times()
        insts = self.sup.all_instances()
        return {
            "pid": os.getpid(),
            "version": __version__,
            "protocol": protocol.PROTOCOL_VERSION,
            "started_at": self.started_at,
            "uptime_s": round(time.time() - self.started_at, 3),
            "socket": str(self.paths.socket),
            "state_dir": str(self.paths.state_dir),
            "log_dir": str(self.paths.log_dir),
            "engines": len(self.sup.engines),
            "instances": len(insts),
            "instances_running": sum(1 for i in insts if i.state.is_running),
            "rss_bytes": rss,
            "cpu_seconds": round(cpu.user + cpu.system, 3),
            "disk_full": health.disk_full if health is not None else False,
            "write_errors": health.to_json() if health is not None else {},
            "registry_skipped": self.registry.skipped_json(),
            "databases_reset": self._database_resets(),
            "warnings": self._warnings(resets=True),
        }

    def daemon_config(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        if self.control is None:
            raise InvalidParamsError("this daemon does not report its settings")
        return {"pid": os.getpid(), **self.control.config_info()}

    async def daemon_reload(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        if self.control is None:
            raise InvalidParamsError("this daemon cannot reload its settings")
        return await self.control.reload()

    def daemon_stop(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        # Answer first; the shutdown starts on the next loop turn.
        asyncio.get_running_loop().call_soon(self.request_shutdown)
        return {"stopping": True, "pid": os.getpid()}

    # -- registration ----------------------------------------------------------------------
    def _parse_specs(self, params: dict[str, Any]) -> list[EngineSpec]:
        raw = _get(params, "engines", dict)
        specs = [EngineSpec.from_dict(name, data) for name, data in raw.items()]
        if not specs:
            raise SpecError("no engines given (expected at least one [engines.NAME] table)")
        return specs

    async def _register_all(
        self, specs: list[EngineSpec], start: bool, prune: bool
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
                    async with engine.lock:
                        detail = await self.fleet.update_engine(engine, spec)
                    self.events.emit(
                        EventKind.ENGINE_UPDATED,
                        f"changed {', '.join(changed)}: {detail}",
                        engine=name,
                    )
                    results.append(
                        {"name": name, "action": "updated", "detail": detail, "changed": changed}
                    )
            self.membership.engines_changed()
        for engine in to_start:
            # Dependencies first: `order` is topological.
            await self.fleet.start_engine(engine, "registered")
        return {"engines": results, "removed": removed}

    async def register(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        specs = self._parse_specs(params)
        return await self._register_all(specs, _get(params, "start", bool, True), prune=False)

    async def apply(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        specs = self._parse_specs(params)
        return await self._register_all(
            specs, _get(params, "start", bool, True), prune=_get(params, "prune", bool, False)
        )

    def _removal_order(self, names: set[str]) -> list[str]:
        """`names` in a safe removal order (dependents first); refuse if a kept engine needs one."""
        for name in sorted(names):
            self._engine(name)  # all must exist before anything is removed
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
        engine = self._engine(name)
        async with engine.lock:
            await self.fleet.remove_engine(engine)
        self.events.emit(EventKind.ENGINE_UNREGISTERED, "unregistered", engine=name)

    async def unregister(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        names = _str_list(params, "names")
        removed = []
        order = self._removal_order(set(names))
        async with self.registry.staged(dict.fromkeys(order)):
            for name in order:
                await self._unregister_one(name)
                removed.append(name)
            self.membership.engines_changed()
        return {"removed": removed}

    def _chosen(self, params: dict[str, Any]) -> list[Engine]:
        """The engines `names` (all when none; an unknown one is an error), narrowed to
        `type` and to every `labels` pair (`k=v`), in name order."""
        names = _str_list(params, "names", None)
        type_ = _get(params, "type", str, None)
        try:
            labels = [parse_label(t) for t in _str_list(params, "labels", None) or []]
        except UsageError as exc:
            raise InvalidParamsError(exc.message) from None
        engines = (
            [self._engine(n) for n in dict.fromkeys(names)]
            if names
            else [self.sup.engines[n] for n in sorted(self.sup.engines)]
        )
        wanted = self.sup.index.find(type_, labels)
        return engines if wanted is None else [e for e in engines if e.spec.name in wanted]

    def list_engines(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        out = []
        for e in self._chosen(params):
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
        names = _str_list(params, "names", None) or sorted(self.sup.engines)
        return {"engines": {n: self._engine(n).spec.to_dict() for n in names}}

    # -- lifecycle -------------------------------------------------------------------------
    def _engine(self, name: str) -> Engine:
        try:
            return self.sup.engines[name]
        except KeyError:
            known = ", ".join(sorted(self.sup.engines)) or "none registered"
            raise EngineNotFoundError(f"unknown engine {name!r} (known: {known})") from None

    def _targets(self, params: dict[str, Any]) -> list[tuple[Engine, list[Instance] | None]]:
        """Resolve NAME or NAME#K refs; None means the whole engine. All must exist."""
        refs = _str_list(params, "targets")
        if not refs:
            raise InvalidParamsError("no engine or instance given")
        out: list[tuple[Engine, list[Instance] | None]] = []
        for ref in refs:
            name, idx = parse_instance_ref(ref)
            engine = self._engine(name)
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
        wait = _get(params, "wait", bool, True)
        refuse = _get(params, "no_dependents", bool, False)
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
        engine = self._engine(_get(params, "name", str))
        n = _get(params, "instances", int)
        if not engine.spec.mode.long_running:
            raise SpecError(f"engine {engine.spec.name!r} is oneshot: it has no instances to scale")
        async with engine.lock:
            detail = await self.fleet.scale_engine(engine, n)
        await self._persist()
        return {"name": engine.spec.name, "instances": n, "detail": detail}

    # -- manual overrides (win over policies until restored; persisted) ---------------------
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
        reason = _get(params, "reason", str, None) or ""
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

    def policy_show(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        names = _str_list(params, "names", None)
        engines = (
            [self._engine(n) for n in names]
            if names
            else [self.sup.engines[n] for n in sorted(self.sup.engines)]
        )
        out = []
        for engine in engines:
            spec = engine.spec
            policy, sources = effective_policy(self.sup.config.policy, spec.policy)
            out.append(
                {
                    "name": spec.name,
                    "type": spec.type,
                    "mode": spec.mode.value,
                    "policy": policy.to_json(),
                    "sources": sources,
                    "restart": {
                        "policy": spec.restart.policy.value,
                        "start_seconds": spec.restart.start_seconds,
                        "max_retries": spec.restart.max_retries,
                        "backoff": {
                            "initial": spec.restart.backoff.initial,
                            "factor": spec.restart.backoff.factor,
                            "max": spec.restart.backoff.max,
                            "reset_after": spec.restart.backoff.reset_after,
                        },
                    },
                    "health": {
                        "check": spec.health.check,
                        "interval": spec.health.interval,
                        "timeout": spec.health.timeout,
                        "failure_threshold": spec.health.failure_threshold,
                        "success_threshold": spec.health.success_threshold,
                        "grace": spec.health.grace,
                        "on_unhealthy": spec.health.on_unhealthy.value,
                    },
                    "limits": {
                        "max_rss": spec.limits.max_rss,
                        "max_cpu_percent": spec.limits.max_cpu_percent,
                    },
                    "applies": spec.mode is not EngineMode.ONESHOT,
                }
            )
        return {"engines": out}

    # -- metrics -----------------------------------------------------------------------------
    async def metrics_text(self) -> bytes:
        """The Prometheus text exposition (also served on --metrics-port)."""
        if not self._prometheus_ready:
            # prometheus-client takes ~100 ms to import: not on the loop, and only if asked.
            allow_ssl()  # prometheus_client.exposition imports it
            await asyncio.to_thread(importlib.import_module, "prometheus_client.exposition")
            self._prometheus_ready = True
        host = self.rollups.host if self.rollups is not None else None
        # The copy is cheap and on the loop; the rendering is not, so it runs on a thread.
        snap = snapshot(self.sup, self.router, host)
        return await asyncio.to_thread(prometheus_text, snap)

    async def metrics_get(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        return {"text": (await self.metrics_text()).decode()}

    async def metrics_flush(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        """Close the 10 s bucket being filled and wait until it and every event are on disk,
        so a report read right after sees everything up to now."""
        rows = 0
        if self.rollups is not None and self.rollups.writer is not None:
            writer = self.rollups.writer
            closed = self.rollups.close(self.rollups.tiers[0], time.time())
            writer.write(closed)
            rows = len(closed)
            await asyncio.to_thread(writer.flush)
        await self.events.flush()
        return {"rows": rows}

    def metrics_live(self, params: dict[str, Any], conn: Connection) -> LiveDoc:
        host = self.rollups.host if self.rollups is not None else None
        return {
            "instances": self.rollups.recent() if self.rollups is not None else {},
            "queue": self.router.queue_by_type(),
            "host": None
            if host is None
            else {
                "cpu_percent": host.cpu_percent,
                "memory_used": host.mem_used,
                "memory_total": host.mem_total,
            },
        }

    # -- reading ---------------------------------------------------------------------------
    def status(self, params: dict[str, Any], conn: Connection) -> StatusDoc:
        return {"engines": [e.to_json() for e in self._chosen(params)]}

    async def events_list(self, params: dict[str, Any], conn: Connection) -> EventsDoc:
        engine = _get(params, "engine", str, None)
        if engine is not None:
            self._engine(engine)
        since = _get(params, "since", (int, float), None)
        limit = _get(params, "limit", int, 100)
        # SQLite takes 64-bit integers: a larger limit means "all", a time is a float.
        events = await self.events.query(
            engine=engine,
            since=None if since is None else float(since),
            limit=min(max(1, limit), 1 << 62),
        )
        return {"events": [e.to_json() for e in events]}

    def events_follow(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        engine = _get(params, "engine", str, None)
        if engine is not None:
            self._engine(engine)

        def push(ev: Event) -> None:
            if engine is None or ev.engine == engine:
                conn.write(protocol.notification("event", ev.to_json()))

        self.events.subscribers.add(push)
        conn.on_close.append(lambda: self.events.subscribers.discard(push))
        return {"following": True}

    def _log_targets(self, ref: str) -> list[tuple[str, InstanceLog]]:
        """(id, log) of each log a NAME or NAME#K names; a oneshot engine (NAME, or
        NAME#oneshot as in reports) has one log for all its runs."""
        name, index = split_instance_id(ref)
        idx = None if index == ONESHOT_INDEX else parse_instance_ref(ref)[1]
        engine = self._engine(name)
        if engine.oneshot_log is not None and idx is None:
            return [(instance_id(name, None), engine.oneshot_log)]
        insts = engine.instances if idx is None else [self.sup.instance(engine, idx)]
        return [(i.id, i.log) for i in insts]

    def _tail(self, targets: list[tuple[str, InstanceLog]], lines: int) -> list[dict[str, str]]:
        sources = []
        for inst_id, inst_log in targets:
            path = inst_log.path
            files = [path.with_name(f"{path.name}.{i}") for i in range(inst_log.backups, 0, -1)]
            sources.append((inst_id, [*files, path]))
        return tail_logs(sources, lines)

    async def logs_read(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        insts = self._log_targets(_get(params, "target", str))
        lines = _get(params, "lines", int, 50)
        return {"lines": await asyncio.to_thread(self._tail, insts, max(0, lines))}

    def logs_follow(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        insts = self._log_targets(_get(params, "target", str))
        lines = max(0, _get(params, "lines", int, 10))
        # Read on the loop (bounded: `lines` × 512 bytes per file) so no line slips between
        # the tail and the subscription.
        tail = self._tail(insts, lines)
        removers = []
        for inst_id, inst_log in insts:

            def push(line: str, inst_id: str = inst_id) -> None:
                conn.write(protocol.notification("log", {"instance": inst_id, "line": line}))

            inst_log.followers.add(push)
            removers.append((inst_log, push))

        def unsubscribe() -> None:
            for inst_log, push in removers:
                inst_log.followers.discard(push)

        conn.on_close.append(unsubscribe)
        return {"lines": tail}
