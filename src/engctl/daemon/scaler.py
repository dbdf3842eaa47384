"""The autoscaler's controller (docs/elastic.md): for each engine with `[scale]`, read its
figures (its instances, the requests waiting for it, a prewarm, the predictor's floor, host
memory), ask `autoscale` for a decision and carry it out through the fleet (new instances
start; the highest ones drain, then stop, so ids stay NAME#0..NAME#n-1), one resize at a time
per engine, each an event with its reason and numbers.

It reacts within a loop turn when a request has to wait (the router's `on_wait`, set only while
an engine autoscales: nothing is called per request otherwise) and looks at idle time, prewarm
ends and predictions every `[daemon.scale] interval`, at memory on every host sample. An engine
under a rollout (`engine.rolling_out`) is left alone. The history is read on a thread.

Decides nothing itself (`autoscale` does). Imports `autoscale`, `fleet`, `history`, `instance`,
`monitor`, `router`, `standby`, `supervisor`, `events`, `request` and the shared contract.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engctl.config import DaemonConfig
from engctl.errors import UsageError
from engctl.models import format_size
from engctl.states import DesiredState, EventKind, InstanceState, ScaleCause

from .autoscale import (
    DAYS,
    LOOKAHEAD_SECONDS,
    SLOT_SECONDS,
    DaySlot,
    Decision,
    EngineScaler,
    Observation,
    Reclaimable,
    predict,
    reclaim,
)
from .events import EventLog
from .fleet import Fleet
from .history import COARSE_SECONDS
from .history import connect as history_connect
from .instance import Engine, Instance
from .monitor import HostSample
from .request import Request
from .router import Router
from .standby import spec_matches
from .supervisor import Supervisor
from .tasks import TaskSet

log = logging.getLogger("engctl.scaler")

S = InstanceState
Clock = Callable[[], float]


class Scaler:
    """Keeps every autoscaled engine at the size `autoscale` decides, and `prewarm`'s floors."""

    def __init__(
        self,
        sup: Supervisor,
        fleet: Fleet,
        router: Router,
        events: EventLog,
        config: DaemonConfig,
        history_db: Path | None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.sup = sup
        self.fleet = fleet
        self.router = router
        self.events = events
        self.config = config
        self.history_db = history_db  # None: no history (metrics = false), no predictions
        self.clock = clock
        self.loop = sup.loop
        self._scalers: dict[str, EngineScaler] = {}
        self._resizing: dict[str, asyncio.Task[Any]] = {}  # engine -> its resize under way
        self._prewarm_ends: dict[str, float] = {}  # engine -> monotonic end of its prewarm
        self._predicted_slot: dict[str, int] = {}  # engine -> the 5-minute slot last predicted
        self._tasks = TaskSet(sup.loop, "autoscaler task")
        self._react_handle: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.pressure = False  # host memory below min_available_memory
        self.available: int | None = None  # host memory available at the last sample

    # -- which engines autoscale -------------------------------------------------------------
    def _autoscaled(self) -> list[Engine]:
        return [e for e in self.sup.engines.values() if e.spec.scale is not None]

    def engines_changed(self) -> None:
        """Registrations or specs changed: follow them (the router calls `on_wait` only while
        an engine autoscales), and look at every autoscaled engine now."""
        engines = self._autoscaled()
        names = {e.spec.name for e in engines}
        for name in set(self._scalers) - names:
            del self._scalers[name]
            self._prewarm_ends.pop(name, None)
            self._predicted_slot.pop(name, None)
        for engine in engines:
            scale = engine.spec.scale
            assert scale is not None
            current = self._scalers.get(engine.spec.name)
            if current is None or current.spec != scale:
                self._scalers[engine.spec.name] = EngineScaler(scale)
            if not scale.predict:
                engine.predicted = None
        self.router.on_wait = self._on_wait if engines else None
        if engines and self._timer is None and not self._closed:
            self._timer = self.loop.call_later(self.config.scale.interval, self._tick)
        elif not engines and self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.react()

    def close(self) -> None:
        """Daemon shutdown: no more decisions."""
        self._closed = True
        self.router.on_wait = None
        if self._timer is not None:
            self._timer.cancel()
        if self._react_handle is not None:
            self._react_handle.cancel()
        self._tasks.cancel()

    # -- when to look ------------------------------------------------------------------------
    def _on_wait(self, req: Request) -> None:
        """A request had to wait: look at the engines it could run on within this loop turn."""
        if self._react_handle is None and any(
            spec_matches(e.spec, req.selector) for e in self._autoscaled()
        ):
            self._react_handle = self.loop.call_soon(self._react)

    def react(self) -> None:
        """Look at every autoscaled engine within this loop turn."""
        if self._react_handle is None and not self._closed:
            self._react_handle = self.loop.call_soon(self._react)

    def _tick(self) -> None:
        self._timer = None
        if self._closed or not self._scalers:
            return
        self._timer = self.loop.call_later(self.config.scale.interval, self._tick)
        try:
            self._end_prewarms()
            self._predict_due()
            self._react()
        except Exception:
            log.exception("autoscaler tick failed")

    def _react(self) -> None:
        self._react_handle = None
        if self._closed or self.sup.closing:
            return
        now = self.clock()
        waiting = self._waiting()
        for engine in self._autoscaled():
            self._consider(engine, now, waiting.get(engine.spec.name, 0))

    # -- observing -------------------------------------------------------------------------------
    def _waiting(self) -> dict[str, int]:
        """Requests in the queue, by the autoscaled engines that could take them (one that
        several could take counts for each)."""
        out: dict[str, int] = {}
        if not self.router.queue:
            return out
        engines = self._autoscaled()
        seen: dict[object, list[str]] = {}
        for req in self.router.gate.waiting():
            sel = req.selector
            key = (sel.filter_key, sel.instance)
            names = seen.get(key)
            if names is None:
                names = seen[key] = [e.spec.name for e in engines if spec_matches(e.spec, sel)]
            for name in names:
                out[name] = out.get(name, 0) + 1
        return out

    def _observe(self, engine: Engine, waiting: int) -> Observation:
        spec = engine.spec
        insts = engine.instances
        ready = [i for i in insts if i.state is S.READY]
        removable = 0
        for inst in reversed(insts):
            if not _removable(inst):
                break
            removable += 1
        floor, floor_reason = self._floor(engine)
        return Observation(
            size=len(insts),
            ready=len(ready),
            in_flight=sum(i.stats.in_flight for i in ready if i.lease is None),
            waiting=waiting,
            leased=sum(1 for i in insts if i.lease is not None),
            max_concurrency=spec.max_concurrency,
            removable=removable,
            floor=floor,
            floor_reason=floor_reason,
            pressure=self.pressure,
            cap=self._admission_cap(spec.name),
        )

    def _admission_cap(self, name: str) -> int | None:
        """How many requests the engine's own admission gate lets run now: its in-flight
        limit, and with a rate those running plus one per token held (the others wait for a
        token, not for an instance); None without a gate."""
        gate = self.router.gate.admission.engines.get(name)
        if gate is None:
            return None
        cap = gate.limit
        if gate.bucket is not None:
            tokens = math.floor(gate.bucket.level(self.router.gate.loop.time()))
            by_rate = max(1, gate.in_flight + tokens)  # never 0: a cold start needs one
            cap = by_rate if cap is None else min(cap, by_rate)
        return cap

    def _floor(self, engine: Engine) -> tuple[int, str]:
        """The higher of the engine's prewarm and its predicted floor, with what it is."""
        floors = [(0, "")]
        if engine.prewarm is not None:
            n, until = engine.prewarm
            when = f" until {_clock_time(until)}" if until is not None else ""
            floors.append((n, f"prewarm {n}{when}"))
        if engine.predicted is not None:
            floors.append(engine.predicted)
        return max(floors, key=lambda f: f[0])

    # -- deciding and resizing ---------------------------------------------------------------
    def _consider(self, engine: Engine, now: float, waiting: int) -> None:
        name = engine.spec.name
        scaler = self._scalers.get(name)
        if (
            scaler is None
            or name in self._resizing
            or engine.desired is not DesiredState.RUNNING
            or engine.rolling_out  # a rollout resizes nothing
        ):
            return
        decision = scaler.decide(self._observe(engine, waiting), now)
        if decision is not None:
            self._resize(engine, decision, EventKind.ENGINE_AUTOSCALED)

    def _resize(
        self,
        engine: Engine,
        decision: Decision,
        kind: EventKind,
        prepare: Callable[[Instance], None] | None = None,
    ) -> asyncio.Task[Any]:
        """Carry the decision out (one resize at a time per engine), recording it (an event,
        `status`'s last decision) once it still holds under the engine's lock."""
        name = engine.spec.name
        before = len(engine.instances)

        async def resize() -> None:
            try:
                async with engine.lock:
                    if len(engine.instances) != before or engine.spec.scale is None:
                        return  # changed meanwhile (scale, update): look again
                    leaving = engine.instances[decision.size :]
                    if any(not _removable(i) for i in leaving):
                        return  # a request or a lease took one of them meanwhile
                    engine.last_scaling = {
                        "at": time.time(),
                        "to": decision.size,
                        "cause": decision.cause.value,
                        "reason": decision.reason,
                        "data": decision.data,
                    }
                    self.events.emit(
                        kind,
                        decision.reason,
                        engine=name,
                        data={**decision.data, "cause": decision.cause.value},
                    )
                    await self.fleet.resize(engine, decision.size, decision.reason, prepare=prepare)
            finally:
                self._resizing.pop(name, None)
                self.react()  # what changed meanwhile is looked at now

        task = self._tasks.spawn(resize())
        self._resizing[name] = task
        return task

    async def grow_for_lease(
        self, engines: list[Engine], holder: str, prepare: Callable[[Instance], None]
    ) -> Instance | None:
        """Add one instance for a lease that found no idle one, to the first of `engines`
        that may grow; `prepare` reserves it before it starts. None: none may grow."""
        for engine in sorted(engines, key=lambda e: e.spec.name):
            scale = engine.spec.scale
            name = engine.spec.name
            if (
                scale is None
                or engine.desired is not DesiredState.RUNNING
                or engine.rolling_out
                or self._closed
            ):
                continue
            running = self._resizing.get(name)
            if running is not None:
                await asyncio.wait([running])  # one resize at a time: after this one
            n = len(engine.instances)
            if n >= scale.max:
                continue
            who = f" ({holder})" if holder else ""
            reason = f"scale {n} -> {n + 1}: a lease{who} found no idle instance"
            data = {"from": n, "to": n + 1}
            decision = Decision(n + 1, ScaleCause.LEASE, reason, data)
            await asyncio.wait(
                [self._resize(engine, decision, EventKind.ENGINE_AUTOSCALED, prepare)]
            )
            if len(engine.instances) > n:
                return engine.instances[n]
        return None

    # -- prewarm -----------------------------------------------------------------------------
    def prewarm(self, engine: Engine, n: int, seconds: float | None) -> dict[str, Any]:
        """`engctl prewarm NAME N [--for DURATION]`: raise the floor to `n` until the time
        passes (0 ends a prewarm)."""
        scale = engine.spec.scale
        name = engine.spec.name
        if scale is None:
            raise UsageError(
                f"engine {name!r} has no [engines.{name}.scale] table: prewarm raises an"
                " autoscaled engine's floor (`engctl scale` sets a fixed count)"
            )
        if n > scale.max:
            raise UsageError(
                f"prewarm: {n} instances is above scale.max {scale.max} of engine {name!r}"
            )
        if engine.prewarm is not None:
            self._end_prewarm(engine, "replaced by a new prewarm" if n else "ended by hand")
        if n > 0:
            until = None if seconds is None else time.time() + seconds
            engine.prewarm = (n, until)
            if seconds is not None:
                self._prewarm_ends[name] = self.clock() + seconds
            span = "" if seconds is None else f" for {seconds:g}s, until {_clock_time(until)}"
            self.events.emit(
                EventKind.ENGINE_PREWARMED,
                f"floor raised to {n} instances{span}",
                engine=name,
                data={"instances": n, "seconds": seconds, "until": until},
            )
        self.react()
        prewarm = engine.prewarm
        return {
            "name": name,
            "instances": n,
            "until": None if prewarm is None else prewarm[1],
            "max": scale.max,
        }

    def _end_prewarm(self, engine: Engine, why: str) -> None:
        prewarm = engine.prewarm
        if prewarm is None:
            return
        engine.prewarm = None
        self._prewarm_ends.pop(engine.spec.name, None)
        self.events.emit(
            EventKind.ENGINE_PREWARM_ENDED,
            f"floor of {prewarm[0]} instances {why}; idle instances go after idle_timeout",
            engine=engine.spec.name,
            data={"instances": prewarm[0]},
        )

    def _end_prewarms(self) -> None:
        now = self.clock()
        for name, end in list(self._prewarm_ends.items()):
            engine = self.sup.engines.get(name)
            if engine is None:
                self._prewarm_ends.pop(name, None)
            elif now >= end:
                self._end_prewarm(engine, "ended: its time passed")

    # -- the predictor -----------------------------------------------------------------------
    def _predict_due(self) -> None:
        """Once per 5-minute slot, read what the same time of day looked like on the previous
        days (on a thread) for each engine with `scale.predict`."""
        if self.history_db is None:
            return
        slot = int(time.time() // SLOT_SECONDS)
        for engine in self._autoscaled():
            scale = engine.spec.scale
            name = engine.spec.name
            if scale is None or not scale.predict or self._predicted_slot.get(name) == slot:
                continue
            self._predicted_slot[name] = slot
            self._spawn_prediction(engine, time.time())

    def _spawn_prediction(self, engine: Engine, now: float) -> None:
        db = self.history_db
        assert db is not None
        name = engine.spec.name

        async def run() -> None:
            days = await asyncio.to_thread(read_day_slots, db, name, now)
            self._predicted(name, days)

        self._tasks.spawn(run())

    def _predicted(self, name: str, days: list[DaySlot]) -> None:
        engine = self.sup.engines.get(name)
        if engine is None or engine.spec.scale is None or not engine.spec.scale.predict:
            return
        found = predict(days, engine.spec.scale, engine.spec.max_concurrency)
        old = engine.predicted
        engine.predicted = None if found is None else (found.floor, found.reason)
        if (old[0] if old else 0) != (found.floor if found else 0):
            reason = found.reason if found is not None else "no recurring peak at this time of day"
            data = found.evidence if found is not None else {}
            self.events.emit(
                EventKind.ENGINE_PREDICTED,
                reason,
                engine=name,
                data={**data, "floor": found.floor if found else 0},
            )
            self.react()

    # -- memory pressure ---------------------------------------------------------------------
    def host_sampled(self, host: HostSample | None) -> None:
        """A host sample: below `min_available_memory`, reclaim idle instances of autoscaled
        engines (largest RSS first, down to their `min`), and add no warm spares."""
        threshold = self.config.scale.min_available_memory
        if host is None or not host.mem_total:
            return
        available = host.mem_total - host.mem_used
        self.available = available
        was = self.pressure
        self.pressure = bool(threshold) and available < threshold
        if self.pressure != was:
            self.react()
        if not self.pressure or self._closed or self.sup.closing:
            return
        offers: dict[str, list[Reclaimable]] = {}
        for engine in self._autoscaled():
            scale = engine.spec.scale
            name = engine.spec.name
            if (
                scale is None
                or name in self._resizing
                or engine.desired is not DesiredState.RUNNING
                or engine.rolling_out
            ):
                continue
            offers[name] = []
            for inst in reversed(engine.instances[scale.min :]):
                if not _removable(inst):
                    break
                offers[name].append(Reclaimable(name, inst.id, inst.sample.rss_bytes))
        chosen = reclaim(available, threshold, offers)
        for name in dict.fromkeys(r.engine for r in chosen):
            engine = self.sup.engines[name]
            going = [r for r in chosen if r.engine == name]
            size = len(engine.instances)
            listed = ", ".join(f"{r.instance} ({format_size(r.rss_bytes)} RSS)" for r in going)
            reason = (
                f"scale {size} -> {size - len(going)}: host memory available"
                f" {format_size(available)} is below min_available_memory"
                f" {format_size(threshold)}; reclaiming idle {listed}"
            )
            data = {
                "from": size,
                "to": size - len(going),
                "available": available,
                "min_available_memory": threshold,
                "reclaimed": [{"instance": r.instance, "rss_bytes": r.rss_bytes} for r in going],
            }
            decision = Decision(size - len(going), ScaleCause.MEMORY, reason, data)
            self._resize(engine, decision, EventKind.ENGINE_RECLAIMED)


def _removable(inst: Instance) -> bool:
    """Whether an instance may leave now: idle (ready, nothing in flight, no lease) or
    without a process that serves (stopped, exited, fatal, waiting to restart)."""
    if inst.lease is not None:
        return False
    if inst.state is S.READY:
        return inst.stats.in_flight == 0 and not inst.draining
    return inst.state in (S.STOPPED, S.EXITED, S.FATAL, S.BACKOFF)


def _clock_time(at: float | None) -> str:
    return "-" if at is None else time.strftime("%H:%M:%S", time.localtime(at))


def read_day_slots(db: Path, engine: str, now: float) -> list[DaySlot]:
    """For each of the previous days, the peak of requests in flight on `engine`'s instances
    in the 5-minute buckets of the coming minutes of that day (None: no history then). Reads
    the history database (blocking: call it on a thread)."""
    try:
        conn = history_connect(db, readonly=True)
    except sqlite3.Error as exc:  # a missing or unreadable file: no prediction, said in the log
        log.warning("cannot read %s for predictions: %s", db, exc)
        return []
    out: list[DaySlot] = []
    try:
        for days_ago in range(1, DAYS + 1):
            start = now - days_ago * 86400
            rows = conn.execute(
                "SELECT ts, kind, data FROM rollup WHERE tier = ? AND ts > ? AND ts <= ?"
                " AND (kind = 'host' OR (kind = 'instance' AND engine = ?))",
                (COARSE_SECONDS, start, start + LOOKAHEAD_SECONDS, engine),
            ).fetchall()
            if not any(kind == "host" for _, kind, _ in rows):
                out.append(DaySlot(days_ago, None))
                continue
            by_bucket: dict[float, float] = {}
            for ts, kind, data in rows:
                if kind != "instance":
                    continue
                try:
                    peak = float(json.loads(data or "{}").get("in_flight_peak") or 0)
                except (ValueError, TypeError, AttributeError):
                    peak = 0.0
                by_bucket[ts] = by_bucket.get(ts, 0.0) + peak
            out.append(DaySlot(days_ago, max(by_bucket.values(), default=0.0)))
    except sqlite3.Error as exc:
        log.warning("cannot read %s for predictions: %s", db, exc)
    finally:
        conn.close()
    return out
