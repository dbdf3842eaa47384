"""The daemon's whole RPC surface: `noun.verb` methods over the supervisor and the registry.

Parameters are checked here (wrong types raise InvalidParamsError); behaviour lives in
`supervisor`. Each mutating call persists the registry before it answers.
"""

from __future__ import annotations

import asyncio
import importlib
import os
import time
from collections.abc import Callable
from typing import Any

import psutil

from engctl import __version__, protocol
from engctl.errors import (
    EngineNotFoundError,
    IncompatibleDaemonError,
    InvalidParamsError,
    SpecError,
)
from engctl.models import EngineSpec, check_dependencies, parse_instance_ref
from engctl.paths import Paths
from engctl.policy_config import effective_policy
from engctl.states import DesiredState, Eligibility, EngineMode

from . import allow_ssl
from .enforcer import Enforcer
from .events import Event, EventLog
from .logs import InstanceLog, read_tail
from .metrics import Rollups, prometheus_text, snapshot
from .registry import Registry
from .requests import Router
from .server import Connection, Handler, Reply
from .supervisor import Engine, Instance, Supervisor


def _get(
    params: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...
) -> Any:
    if key not in params or params[key] is None:
        if default is ...:
            raise InvalidParamsError(f"missing parameter {key!r}")
        return default
    value = params[key]
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise InvalidParamsError(f"parameter {key!r} must be a number, got {value!r}")
    if not isinstance(value, kind):
        raise InvalidParamsError(f"parameter {key!r} has the wrong type: {value!r}")
    return value


def _str_list(params: dict[str, Any], key: str, default: Any = ...) -> list[str]:
    value = _get(params, key, list, default)
    if value is not None and not all(isinstance(v, str) for v in value):
        raise InvalidParamsError(f"parameter {key!r} must be a list of strings")
    return value  # type: ignore[no-any-return]


class Api:
    """Binds RPC method names to the daemon's parts."""

    def __init__(
        self,
        paths: Paths,
        supervisor: Supervisor,
        registry: Registry,
        events: EventLog,
        router: Router,
        enforcer: Enforcer,
        request_shutdown: Callable[[], None],
        rollups: Rollups | None = None,
    ) -> None:
        self.rollups = rollups
        self._prometheus_ready = False
        self.paths = paths
        self.router = router
        self.enforcer = enforcer
        self.sup = supervisor
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
        self.router.engines_changed()
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
        return {"protocol": protocol.PROTOCOL_VERSION, "version": __version__, "pid": os.getpid()}

    def daemon_status(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
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
        }

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
        if prune:
            for name in self._removal_order(set(self.sup.engines) - set(incoming)):
                await self._unregister_one(name)
                removed.append(name)
        to_start: list[Engine] = []
        for name in order:
            spec = incoming.get(name)
            if spec is None:
                continue
            engine = self.sup.engines.get(name)
            if engine is None:
                engine = self.sup.add_engine(
                    spec, DesiredState.RUNNING if start else DesiredState.STOPPED, set()
                )
                self.events.emit("engine.registered", "registered", engine=name)
                results.append({"name": name, "action": "created", "detail": "registered"})
                if start:
                    to_start.append(engine)
            elif engine.spec == spec:
                results.append({"name": name, "action": "unchanged", "detail": "same spec"})
            else:
                changed = sorted(spec.changed_fields(engine.spec))
                async with engine.lock:
                    detail = await self.sup.update_engine(engine, spec)
                self.events.emit(
                    "engine.updated",
                    f"changed {', '.join(changed)}: {detail}",
                    engine=name,
                )
                results.append(
                    {"name": name, "action": "updated", "detail": detail, "changed": changed}
                )
        await self._persist()
        for engine in to_start:
            # Dependencies first: `order` is topological.
            await self.sup.start_engine(engine, "registered")
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
            await self.sup.remove_engine(engine)
        self.events.emit("engine.unregistered", "unregistered", engine=name)

    async def unregister(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        names = _str_list(params, "names")
        removed = []
        for name in self._removal_order(set(names)):
            await self._unregister_one(name)
            removed.append(name)
        await self._persist()
        return {"removed": removed}

    def list_engines(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        out = []
        for name in sorted(self.sup.engines):
            e = self.sup.engines[name]
            s = e.spec
            out.append(
                {
                    "name": name,
                    "type": s.type,
                    "mode": s.mode.value,
                    "instances": s.instances,
                    "max_concurrency": s.max_concurrency,
                    "desired": e.desired.value,
                    "command": list(s.command),
                    "capabilities": list(s.capabilities),
                    "labels": dict(s.labels),
                    "weight": s.weight,
                    "depends_on": list(s.depends_on),
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
                    started += await self.sup.start_engine(engine, "started by user")
                else:
                    if engine.desired is DesiredState.STOPPED:
                        # Only the named instances come up; the others stay stopped, also
                        # after a daemon restart.
                        engine.stopped_instances.update(i.index for i in engine.instances)
                    for inst in insts:
                        engine.stopped_instances.discard(inst.index)
                    started += await self.sup.start_engine(
                        engine, "started by user", [i.index for i in insts]
                    )
        await self._persist()
        return {"started": started}

    async def stop(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        wait = _get(params, "wait", bool, True)
        targets = self._targets(params)
        for engine, insts in targets:
            if insts is None:
                engine.desired = DesiredState.STOPPED
            else:
                engine.stopped_instances.update(i.index for i in insts)
        # The wish is durable before any signal is sent: a restarted daemon will not undo it.
        await self._persist()
        results = await asyncio.gather(
            *(
                self.sup.stop_instances(
                    engine.instances if insts is None else insts, "stopped by user", wait
                )
                for engine, insts in targets
            )
        )
        return {"stopped": [i for r in results for i in r], "waited": wait}

    async def restart(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        targets = self._targets(params)
        restarted: list[str] = []
        for engine, insts in targets:
            async with engine.lock:
                chosen = engine.instances if insts is None else insts
                await self.sup.stop_instances(chosen, "restart requested", wait=True)
                if insts is None:
                    engine.stopped_instances.clear()
                else:
                    if engine.desired is DesiredState.STOPPED:
                        engine.stopped_instances.update(i.index for i in engine.instances)
                    engine.stopped_instances.difference_update(i.index for i in insts)
                restarted += await self.sup.start_engine(
                    engine, "restarted by user", [i.index for i in chosen]
                )
        await self._persist()
        return {"restarted": restarted}

    async def scale(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        engine = self._engine(_get(params, "name", str))
        n = _get(params, "instances", int)
        if not engine.spec.mode.long_running:
            raise SpecError(f"engine {engine.spec.name!r} is oneshot: it has no instances to scale")
        async with engine.lock:
            detail = await self.sup.scale_engine(engine, n)
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

    def metrics_live(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
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
    def status(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        names = _str_list(params, "names", None)
        engines = (
            [self._engine(n) for n in names]
            if names
            else [self.sup.engines[n] for n in sorted(self.sup.engines)]
        )
        return {"engines": [e.to_json() for e in engines]}

    async def events_list(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        engine = _get(params, "engine", str, None)
        if engine is not None:
            self._engine(engine)
        since = _get(params, "since", (int, float), None)
        limit = _get(params, "limit", int, 100)
        events = await self.events.query(engine=engine, since=since, limit=max(1, limit))
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
        name, idx = parse_instance_ref(ref.removesuffix("#oneshot"))
        engine = self._engine(name)
        if engine.oneshot_log is not None and idx is None:
            return [(f"{name}#oneshot", engine.oneshot_log)]
        insts = engine.instances if idx is None else [self.sup.instance(engine, idx)]
        return [(i.id, i.log) for i in insts]

    def _tail(self, targets: list[tuple[str, InstanceLog]], lines: int) -> list[dict[str, str]]:
        out: list[dict[str, str]] = []
        for inst_id, inst_log in targets:
            path = inst_log.path
            files = [path.with_name(f"{path.name}.{i}") for i in range(inst_log.backups, 0, -1)]
            out += [{"instance": inst_id, "line": ln} for ln in read_tail([*files, path], lines)]
        # Lines start with an ISO timestamp, so text order is time order across instances.
        out.sort(key=lambda d: d["line"][:24])
        return out[-lines:] if lines else []

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
