"""The daemon's whole RPC surface: every `noun.verb` method bound to what answers it (`handlers`),
and the calls of the session, the daemon, requests, metrics and reading (status, events, logs,
policies). The `engine.*` and `instance.*` calls are `engine_calls`'.

Parameters are checked here (`params`: wrong types raise InvalidParamsError); behaviour lives in
the parts it calls. Imports neither the failure policies nor the supervision's internals.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from engctl import __version__, protocol
from engctl.errors import (
    IncompatibleDaemonError,
    InvalidParamsError,
)
from engctl.homefiles import tail_logs
from engctl.models import (
    ONESHOT_INDEX,
    instance_id,
    parse_instance_ref,
    split_instance_id,
)
from engctl.paths import Paths
from engctl.policy_config import effective_policy
from engctl.states import EngineMode

from . import allow_ssl, memory
from .alerter import Alerter
from .engine_calls import EngineCalls
from .events import Event, EventLog
from .hooks import Hooks
from .leases import Leases
from .logs import InstanceLog
from .metrics import Rollups
from .params import param, str_list
from .registry import Registry
from .router import Router
from .selection import Selector
from .server import Connection, Handler, RawJSON, Reply
from .supervisor import Supervisor

if TYPE_CHECKING:
    from engctl.documents import EventsDoc, LeasesDoc, LiveDoc, StatusDoc

# A lease's ttl when `lease acquire` gives none (seconds).
DEFAULT_LEASE_TTL = 60.0


class Readings(Protocol):
    """The CPU/RSS readings of instances (the monitor): quiet ones are read less often."""

    def stale(self) -> bool: ...

    async def fresh(self) -> None: ...


class DaemonControl(Protocol):
    """What the daemon itself answers: its settings, and re-reading them."""

    def config_info(self) -> dict[str, Any]: ...

    async def reload(self) -> dict[str, Any]: ...


@dataclass(eq=False)
class Api:
    """Binds RPC method names to the daemon's parts."""

    paths: Paths
    sup: Supervisor
    engines: EngineCalls  # the `engine.*` and `instance.*` calls
    registry: Registry
    events: EventLog
    router: Router
    request_shutdown: Callable[[], None]
    rollups: Rollups | None = None
    leases: Leases | None = None
    # Set by the daemon: `daemon.config` and `daemon.reload` go to it.
    control: DaemonControl | None = field(default=None, init=False)
    # Set by the daemon: the alert rules (`alerts.list`) and the hooks (`hooks.*`).
    alerter: Alerter | None = field(default=None, init=False)
    hooks: Hooks | None = field(default=None, init=False)
    # Set by the daemon: the monitor, whose readings of quiet instances may be older than the
    # sampling interval (`Monitor.stale`); readers of them wait for fresh ones (`fresh`).
    monitor: Readings | None = field(default=None, init=False)
    started_at: float = field(default_factory=time.time, init=False)
    _prometheus_ready: bool = field(default=False, init=False)

    def handlers(self) -> dict[str, Handler]:
        return {
            "session.hello": self.hello,
            "daemon.status": self.daemon_status,
            "daemon.stop": self.daemon_stop,
            "daemon.config": self.daemon_config,
            "daemon.reload": self.daemon_reload,
            "engine.register": self.engines.register,
            "engine.apply": self.engines.apply,
            "engine.unregister": self.engines.unregister,
            "engine.list": self.engines.list_engines,
            "engine.export": self.engines.export,
            "engine.start": self.engines.start,
            "engine.stop": self.engines.stop,
            "engine.restart": self.engines.restart,
            "engine.scale": self.engines.scale,
            "engine.prewarm": self.engines.prewarm,
            "lease.acquire": self.lease_acquire,
            "lease.renew": self.lease_renew,
            "lease.release": self.lease_release,
            "lease.list": self.lease_list,
            "engine.reload": self.engines.reload,
            "status.get": self.status,
            "events.list": self.events_list,
            "events.follow": self.events_follow,
            "logs.read": self.logs_read,
            "logs.follow": self.logs_follow,
            "request.exec": self.request_exec,
            "instance.isolate": self.engines.isolate,
            "instance.drain": self.engines.drain,
            "instance.restore": self.engines.restore,
            "policy.show": self.policy_show,
            "metrics.get": self.metrics_get,
            "metrics.live": self.metrics_live,
            "metrics.flush": self.metrics_flush,
            "alerts.list": self.alerts_list,
            "hooks.list": self.hooks_list,
            "hooks.test": self.hooks_test,
        }

    # -- requests --------------------------------------------------------------------------
    def request_exec(self, params: dict[str, Any], conn: Connection) -> Reply:
        # A Reply, not a coroutine: completed by callbacks, no task per request.
        return self.router.submit(params)

    # -- leases ----------------------------------------------------------------------------
    def _leases(self) -> Leases:
        if self.leases is None:
            raise InvalidParamsError("this daemon holds no leases")
        return self.leases

    async def lease_acquire(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        ttl = _seconds(params, "ttl", None) or DEFAULT_LEASE_TTL
        wait = param(params, "wait", (int, float), 0.0)
        if wait < 0:
            raise InvalidParamsError(f"parameter 'wait' must be 0 or more seconds, got {wait}")
        selector = Selector.of(
            type=param(params, "type", str, None),
            engine=param(params, "engine", str, None),
            instance=param(params, "instance", str, None),
            require=str_list(params, "require", None) or (),
            labels=str_list(params, "labels", None) or [],
        )
        holder = param(params, "holder", str, "")
        lease, asked = await self._leases().acquire(selector, ttl, holder, float(wait))
        return {**lease, "ttl_asked": asked}

    def lease_renew(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        ttl = _seconds(params, "ttl", None)
        lease, asked = self._leases().renew(param(params, "lease", str), ttl)
        return {**lease, "ttl_asked": asked}

    def lease_release(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        return self._leases().release(param(params, "lease", str))

    def lease_list(self, params: dict[str, Any], conn: Connection) -> LeasesDoc:
        return self._leases().list()

    # -- alerts and hooks ----------------------------------------------------------------------
    def alerts_list(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        if self.alerter is None:
            raise InvalidParamsError("this daemon runs no alert rules")
        return self.alerter.to_json()

    def hooks_list(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        if self.hooks is None:
            raise InvalidParamsError("this daemon runs no hooks")
        return self.hooks.to_json()

    async def hooks_test(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        if self.hooks is None:
            raise InvalidParamsError("this daemon runs no hooks")
        return await self.hooks.test(param(params, "name", str))

    # -- session and daemon ----------------------------------------------------------------
    def hello(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        theirs = param(params, "protocol", int)
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
        rss = memory.own_rss()
        cpu = os.times()
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

    def policy_show(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        names = str_list(params, "names", None)
        engines = (
            [self.engines.engine(n) for n in names]
            if names
            else [self.sup.engines[n] for n in sorted(self.sup.engines)]
        )
        out = []
        for engine in engines:
            spec = engine.spec
            bucket = spec.limits.rate_limit
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
                        "rate": spec.limits.rate,
                        "burst": None if bucket is None else bucket.burst,
                        "max_in_flight": spec.limits.max_in_flight,
                        "adaptive": spec.limits.adaptive,
                    },
                    "timeouts": {
                        "start_timeout": spec.start_timeout,
                        "hang_timeout": spec.hang_timeout,
                    },
                    "stop": {"signal": spec.stop.signal, "timeout": spec.stop.timeout},
                    "rollout": {
                        "max_surge": spec.rollout.max_surge,
                        "max_unavailable": spec.rollout.max_unavailable,
                    },
                    "scale": None if spec.scale is None else dataclasses.asdict(spec.scale),
                    "admission": self._admission_settings(spec.type),
                    "applies": spec.mode is not EngineMode.ONESHOT,
                }
            )
        return {"engines": out}

    def _admission_settings(self, type_: str) -> dict[str, Any]:
        """The daemon's limits that apply to an engine of `type_` (`policy show`)."""
        limits = self.sup.config.limits
        t = limits.types.get(type_)
        return {
            "max_in_flight": limits.max_in_flight,
            "aging": limits.aging,
            "type": None
            if t is None
            else {
                "rate": None if t.rate is None else t.rate.rate,
                "burst": None if t.rate is None else t.rate.burst,
                "max_in_flight": t.max_in_flight,
                "queue": t.queue.value,
            },
        }

    def _admission_status(self) -> dict[str, Any]:
        """The admission limits now: gates with their counts, and the queue (status, top)."""
        adm = self.router.admission
        now, wall = self.router.loop.time(), time.time()
        return {
            "global": None if adm.global_gate is None else adm.global_gate.to_json(now, wall),
            "types": {t: g.to_json(now, wall) for t, g in sorted(adm.types.items())},
            "callers": {c: g.to_json(now, wall) for c, g in sorted(adm.callers.items())},
            "queue": {"waiting": len(self.router.queue), "max_queue": self.sup.config.max_queue},
        }

    # -- metrics -----------------------------------------------------------------------------
    async def metrics_text(self) -> bytes:
        """The Prometheus text exposition (also served on --metrics-port)."""
        if not self._prometheus_ready:
            # prometheus-client takes ~100 ms to import: not on the loop, and only if asked.
            allow_ssl()  # prometheus_client.exposition imports it
            await asyncio.to_thread(importlib.import_module, "prometheus_client.exposition")
            # The exposition's own module too: a daemon nobody scrapes does not hold it.
            await asyncio.to_thread(importlib.import_module, "engctl.daemon.prometheus")
            self._prometheus_ready = True
        from .prometheus import prometheus_text, snapshot

        if self.monitor is not None and self.monitor.stale():
            await self.monitor.fresh()
        host = self.rollups.host if self.rollups is not None else None
        # The copy is cheap and on the loop; the rendering is not, so it runs on a thread.
        snap = snapshot(self.sup, self.router, host, self.alerter, self.hooks)
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
        adm = self.router.admission
        now, wall = self.router.loop.time(), time.time()
        return {
            "instances": self.rollups.recent() if self.rollups is not None else {},
            "queue": self.router.queue_by_type(),
            "admission": {n: g.to_json(now, wall) for n, g in sorted(adm.engines.items())},
            "host": None
            if host is None
            else {
                "cpu_percent": host.cpu_percent,
                "memory_used": host.mem_used,
                "memory_total": host.mem_total,
            },
        }

    # -- reading ---------------------------------------------------------------------------
    def status(self, params: dict[str, Any], conn: Connection) -> RawJSON | Awaitable[RawJSON]:
        """The StatusDoc, encoded here (`protocol.encode_doc`: 8× `json` on a large fleet): at
        once, or once a quiet instance's reading older than the sampling interval has been
        taken again (CPU and RSS are never older than it)."""
        if self.monitor is not None and self.monitor.stale():
            return self._status_when_fresh(params, self.monitor)
        return RawJSON(protocol.encode_doc(self._status(params)))

    async def _status_when_fresh(self, params: dict[str, Any], monitor: Readings) -> RawJSON:
        await monitor.fresh()
        return RawJSON(protocol.encode_doc(self._status(params)))

    def _status(self, params: dict[str, Any]) -> StatusDoc:
        gates = self.router.admission.engines
        now, wall = self.router.loop.time(), time.time()
        engines = []
        for engine in self.engines.chosen(params):
            doc = engine.to_json()
            gate = gates.get(engine.spec.name)
            doc["admission"] = None if gate is None else gate.to_json(now, wall)
            engines.append(doc)
        return {"engines": engines, "admission": self._admission_status()}

    async def events_list(self, params: dict[str, Any], conn: Connection) -> EventsDoc:
        engine = param(params, "engine", str, None)
        if engine is not None:
            self.engines.engine(engine)
        since = param(params, "since", (int, float), None)
        limit = param(params, "limit", int, 100)
        # SQLite takes 64-bit integers: a larger limit means "all", a time is a float.
        events = await self.events.query(
            engine=engine,
            since=None if since is None else float(since),
            limit=min(max(1, limit), 1 << 62),
        )
        return {"events": [e.to_json() for e in events]}

    def events_follow(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        engine = param(params, "engine", str, None)
        if engine is not None:
            self.engines.engine(engine)

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
        engine = self.engines.engine(name)
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
        insts = self._log_targets(param(params, "target", str))
        lines = param(params, "lines", int, 50)
        return {"lines": await asyncio.to_thread(self._tail, insts, max(0, lines))}

    def logs_follow(self, params: dict[str, Any], conn: Connection) -> dict[str, Any]:
        insts = self._log_targets(param(params, "target", str))
        lines = max(0, param(params, "lines", int, 10))
        # Read on the loop (bounded: `lines` × 512 bytes per file) so no line slips between
        # the tail and the subscription.
        tail = self._tail(insts, lines)
        removers = []
        for inst_id, inst_log in insts:

            def push(line: str, inst_id: str = inst_id) -> None:
                conn.write(protocol.notification("log", {"instance": inst_id, "line": line}))

            inst_log.follow(push)
            removers.append((inst_log, push))

        def unsubscribe() -> None:
            for inst_log, push in removers:
                inst_log.unfollow(push)

        conn.on_close.append(unsubscribe)
        return {"lines": tail}


def _seconds(params: dict[str, Any], key: str, default: float | None) -> float | None:
    """A duration parameter in seconds: a number above 0 (`default` when absent)."""
    value = param(params, key, (int, float), None)
    if value is None:
        return default
    if value <= 0:
        raise InvalidParamsError(f"parameter {key!r} must be above 0 seconds, got {value}")
    return float(value)
