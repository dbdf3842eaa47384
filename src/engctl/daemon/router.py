"""Routes `engctl exec` requests: place each on an instance (`selection`) through the admission
limits (`gatekeeper`), queue it when it cannot run (by priority, fairly between callers), retry
elsewhere, time it out, make it wait for instances on their way (`standby`), let drains finish,
count every attempt's outcome (`stats`) and answer the caller.

Sending is `dispatch`'s job, processes are `supervisor`'s. The hot path creates no task per
request: a Request is a plain object moved along by callbacks and one loop timer (`deadlines`).
Imports no failure policy: failed requests are reported through `PolicyHooks`.

One piece although long: placing, waiting, retrying, timing out, draining and answering are
the states of one request, moved by the same callbacks over the same counters; apart, each
would reach into the others' state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from engctl import protocol
from engctl.admission_config import ANONYMOUS, DEFAULT_PRIORITY, parse_priority
from engctl.config import DaemonConfig
from engctl.errors import (
    BusyError,
    EngctlError,
    InvalidParamsError,
    NoEligibleEngineError,
    RequestFailedError,
    RequestTimeoutError,
)
from engctl.states import DesiredState, EngineMode, InstanceState

from .admission import EngineLimits, Gate
from .deadlines import Deadlines
from .dispatch import Dispatcher
from .gatekeeper import WAIT as _WAIT
from .gatekeeper import Gatekeeper
from .gatekeeper import Wait as _Wait
from .instance import Engine, Instance
from .request import Request
from .selection import (
    Candidate,
    CandidateKind,
    CandidatePool,
    Outcome,
    Selector,
    selector_from_params,
    selector_key,
)
from .server import RawJSON, Reply
from .standby import InstanceView, Standby, spec_matches, standby
from .stats import RequestStats
from .supervisor import Supervisor

S = InstanceState
# On each completion, this many waiting requests are tried against the freed capacity (the
# classes found blocked on the way are skipped without a try).
QUEUE_SCAN = 8
# A caller's name: printable and short (a label of figures, a key of the settings).
MAX_CALLER_LENGTH = 128


class PolicyHooks(Protocol):
    """What the failure policies hear from the router (see `enforcer`)."""

    def request_failed(self, inst_id: str) -> None: ...


class LeaseHooks(Protocol):
    """What the router asks the leases (see `leases`), for requests that carry one only."""

    def pin(self, selector: Selector) -> Selector:
        """The selector pinned to the lease's instance; LeaseError when the lease is not
        held, UsageError when a filter contradicts it."""

    def not_held(self, lease_id: str) -> EngctlError | None:
        """The error for a request of a lease that ended meanwhile (None: still held)."""


class Router:
    """Owns the wait queue and every request in flight; places, retries and answers them."""

    def __init__(
        self,
        sup: Supervisor,
        pool: CandidatePool,
        dispatcher: Dispatcher,
        config: DaemonConfig,
    ) -> None:
        self.sup = sup
        self.pool = pool
        self.dispatcher = dispatcher
        self.config = config
        self.loop = sup.loop
        # The wait queue (priorities, fairness, aging) and the admission limits in force.
        self.gate = Gatekeeper(self.loop, pool, config.limits, self.retry_waiting)
        self.gate.record = config.metrics
        self.queue = self.gate.queue
        self.admission = self.gate.admission
        self._explained: dict[str, Any] = {}
        self.deadlines = Deadlines(self.loop, self._timed_out)
        self.policies: PolicyHooks | None = None  # wired by the daemon (main.py)
        self.leases: LeaseHooks | None = None  # wired by the daemon (main.py)
        # Told of each request that has to wait (the autoscaler's cue to grow): set only while
        # an engine autoscales, so nothing is called otherwise.
        self.on_wait: Callable[[Request], None] | None = None
        self.record_latency = config.metrics  # the histograms behind report, metrics and top
        # Shutdown: no new request is taken; set when the last one held has ended.
        self.accepting = True
        self._settled: asyncio.Event | None = None
        # Instance or oneshot-engine id -> its counters; rebuilt when the engines change.
        self._stats_by_id: dict[str, RequestStats] = {}
        self._selectors: dict[tuple[Any, ...], Selector] = {}
        # Instances draining before a stop, and what waits for their last request (by record:
        # a rollout's retiring process drains under the id of the slot its successor serves).
        self._drains: dict[Instance, asyncio.Future[None]] = {}
        self._seq = 0
        self._id_prefix = f"r{os.getpid():x}-"

    @property
    def protocol_errors(self) -> int:
        """Lines on workers' stdout that broke the protocol, since the daemon started."""
        return self.dispatcher.protocol_errors

    def engines_changed(self) -> None:
        """The registered engines changed: counters are looked up afresh, their limits apply,
        and what waiting requests wait for may be gone now."""
        self._stats_by_id.clear()
        self.configure(self.config)

    def configure(self, config: DaemonConfig) -> None:
        """New settings (`daemon reload`) or engines: their limits apply now."""
        self.config = config
        engines = {}
        for name, engine in self.sup.engines.items():
            spec = engine.spec
            instances = 1 if spec.mode is EngineMode.ONESHOT else spec.instances
            slots = max(1, spec.max_concurrency * instances)
            engines[name] = EngineLimits(spec.type, spec.limits, slots)
        self.gate.configure(config.limits, engines)
        if self.queue:
            self.retry_waiting(len(self.queue))

    # -- requests ----------------------------------------------------------------------------
    def submit(self, params: dict[str, Any]) -> Reply:
        """Start one request from `request.exec` params; the Reply gets its result object."""
        if "input" not in params:
            raise InvalidParamsError("missing parameter 'input'")
        if not self.accepting:
            raise RequestFailedError("daemon shutting down: it takes no new request")
        key: Any = selector_key(params)
        try:
            selector = self._selectors.get(key)
        except TypeError:  # unhashable: a list or an object where a string belongs
            selector = key = None
        if selector is None:
            selector = selector_from_params(params)  # refuses values of the wrong type
            if selector.lease is not None:
                if self.leases is None:
                    raise InvalidParamsError("this daemon holds no leases")
                # Pinned to the lease's instance once; a lease that ends later is caught
                # where the request is placed (its instance no longer carries the lease).
                selector = self.leases.pin(selector)
            if len(self._selectors) >= 1024:
                self._selectors.clear()  # bounded: many distinct keys (affinity) churn it
            if key is not None:
                self._selectors[key] = selector
        raw_timeout = params.get("timeout")
        timeout = (
            self.config.default_timeout
            if raw_timeout is None
            else protocol.number("timeout", raw_timeout, positive=True)
        )
        raw_retries = params.get("retries")
        retries = (
            0
            if raw_retries is None
            else protocol.number("retries", raw_retries, integer=True, minimum=0)
        )
        raw_priority = params.get("priority")
        priority = (
            DEFAULT_PRIORITY
            if raw_priority is None
            else parse_priority(raw_priority, "parameter 'priority'")
        )
        caller = params.get("caller")
        if caller is None:
            caller = ANONYMOUS
        elif type(caller) is not str or not 0 < len(caller) <= MAX_CALLER_LENGTH:
            raise InvalidParamsError(
                f"parameter 'caller' must be a name of 1 to {MAX_CALLER_LENGTH} characters,"
                f" got {caller!r}"
            )
        elif not caller.isprintable():
            raise InvalidParamsError(f"parameter 'caller' must be printable, got {caller!r}")
        self._seq += 1
        fut = Reply()
        req = Request(
            f"{self._id_prefix}{self._seq}",
            _input_json(params["input"]),
            selector,
            timeout,
            retries,
            bool(params.get("explain")),
            fut,
            priority,
            caller,
        )
        self.deadlines.add(req)
        self._route(req)
        return fut

    def _route(self, req: Request) -> None:
        """Dispatch a new or retried request, queue it, or fail it."""
        outcome = self._place(req, req.explain)
        if outcome is _WAIT:
            if len(self.queue) >= self.config.max_queue:
                self.gate.unblock(req)
                self._fail(
                    req,
                    BusyError(
                        f"busy: no free instance and {len(self.queue)} requests already wait"
                        f" (max_queue {self.config.max_queue})"
                    ),
                )
                return
            self.gate.enqueue(req)
            if self.on_wait is not None:
                self.on_wait(req)
        elif isinstance(outcome, EngctlError):
            self.gate.unblock(req)
            self._fail(req, outcome)

    def _place(self, req: Request, explain: bool = False) -> EngctlError | _Wait | None:
        """Dispatch `req` now (None), leave it to wait (_WAIT), or the error that ends it."""
        selector = req.selector
        admission = self.admission.active
        caller_gate: Gate | None = None
        if admission:
            caller_gate, closed = self.gate.before_pick(req)
            if closed is not None:
                return closed
        if req.tried:
            # A retry goes to an instance not tried yet, through every hard filter of the
            # first attempt: the set is keyed by type, engine, capabilities and labels, and
            # the instance filter is applied here. Retries are rare: scanning is fine.
            members = self.pool.candidate_set(selector)
            pinned = selector.instance
            untried = [c for c in members if c.id not in req.tried and pinned in (None, c.id)]
            free = [c for c in untried if not c.full]
            if free:
                cand = min(free, key=lambda c: (c.load, c.id))
                if admission:
                    return self._admit(req, cand, caller_gate, free)
                self._dispatch(req, cand)
                return None
            if untried:
                return self._wait(req)
            waiting = self._standby(selector, req.tried)
            if waiting is not None and waiting.wait:
                req.waiting_for = waiting.wait
                return self._wait(req)
            if req.last_error is not None:
                return req.last_error
            return RequestFailedError("no other instance to retry on")
        sel = self.pool.select(selector, explain=explain)
        if sel.outcome is Outcome.PICKED:
            assert sel.candidate is not None
            if explain and sel.explanation is not None:
                self._explained[req.id] = sel.explanation.to_json()
            if admission:
                return self._admit(req, sel.candidate, caller_gate, None)
            self._dispatch(req, sel.candidate)
            return None
        if sel.outcome is Outcome.ALL_FULL:
            return self._wait(req)
        if selector.lease is not None and self.leases is not None:
            ended = self.leases.not_held(selector.lease)
            if ended is not None:
                return ended
        waiting = self._standby(selector)
        if waiting is not None and waiting.wait:
            # Registered and on its way (starting, warming up, restarting, or not started
            # yet by a daemon that is starting): not "no engine". Wait within the deadline.
            req.waiting_for = waiting.wait
            return self._wait(req)
        assert sel.no_match is not None
        error = sel.no_match.error(sel.explanation)
        if waiting is not None and waiting.error:
            return NoEligibleEngineError(waiting.error, error.data)
        return error

    def _wait(self, req: Request) -> _Wait:
        """`req` waits for a free instance (no gate holds it)."""
        if req.blocked is not None:
            self.gate.unblock(req)
        return _WAIT

    def _admit(
        self, req: Request, cand: Candidate, caller_gate: Gate | None, free: list[Candidate] | None
    ) -> EngctlError | _Wait | None:
        """Send `req` through the admission limits (to `cand`, or another free candidate whose
        gates are open), or say why it waits or is refused."""
        found = self.gate.admit(req, cand, caller_gate, free)
        if isinstance(found, Candidate):
            self._dispatch(req, found)
            return None
        return found

    def _standby(self, selector: Selector, tried: list[str] | None = None) -> Standby | None:
        """What the registered engines say about a request nothing in the pool can take:
        something to wait for, a reason to fail at once, or None (the pool's diagnosis of
        the filters stands). Scans the engines: only on the way to waiting or failing."""
        views: list[InstanceView] = []
        services: list[str] = []
        for engine in self.sup.engines.values():
            spec = engine.spec
            if not spec_matches(spec, selector):
                continue
            if spec.mode is EngineMode.SERVICE:
                services.append(spec.name)
                continue
            running = engine.desired is DesiredState.RUNNING and not self.sup.closing
            if spec.mode is EngineMode.ONESHOT:
                views.append(InstanceView(spec.name, spec.name, "ready" if running else "stopped"))
                continue
            if (
                spec.scale is not None
                and running
                and selector.instance is None
                and len(engine.instances) < spec.scale.max
                and not engine.rolling_out
            ):
                # It may grow: the autoscaler starts an instance for the request (told by
                # `on_wait`), which waits for it within its deadline (a cold start).
                views.append(InstanceView(spec.name, spec.name, "scaling"))
            elif not engine.instances:
                views.append(InstanceView(spec.name, spec.name, "stopped", "it has 0 instances"))
            for inst in engine.instances:
                if selector.instance not in (None, inst.id) or (tried and inst.id in tried):
                    continue
                views.append(self._view(engine, inst, running))
        return standby(views, services, whole=selector.instance is None and not tried)

    def _view(self, engine: Engine, inst: Instance, running: bool) -> InstanceView:
        """One instance for `standby`: where it is headed, in plain values."""
        state = inst.state
        name = engine.spec.name
        pending = running and inst.index not in engine.stopped_instances and not inst.removed
        if inst.restarting and pending:
            # draining before a restart (still in the pool, taking nothing new): it comes back
            return InstanceView(inst.id, name, "restarting")
        if state is S.READY and inst.id in self.pool:
            return InstanceView(inst.id, name, "ready")
        if state is S.BACKOFF:
            left = None if inst.timer is None else max(0.0, inst.timer.when() - self.loop.time())
            return InstanceView(inst.id, name, "restarting", next_start=left)
        if state in (S.STARTING, S.WARMING):
            return InstanceView(inst.id, name, "starting" if not inst.failure else "restarting")
        if state.has_process or (state is S.STOPPED and pending):
            # stopping to restart, ready but without its protocol pipe (being replaced), or
            # not started yet by a daemon that is still starting its engines
            return InstanceView(inst.id, name, "restarting" if pending else "stopping")
        # Why it is fatal or exited matters; a stopped one was stopped (its exit says how).
        why = "" if state is S.STOPPED else inst.state_reason
        return InstanceView(inst.id, name, state.value, why)

    def _dispatch(self, req: Request, cand: Candidate) -> None:
        if req.queued_at:
            self.gate.waited(req)
        req.attempts += 1
        req.tried.append(cand.id)
        req.target = req.cand = cand
        cand.in_flight += 1
        req.sent_at = time.perf_counter()
        req.stats = self._stats(cand)
        if req.stats is not None:
            req.stats.in_flight += 1
        self.dispatcher.send(req, cand)

    def _stats(self, cand: Candidate) -> RequestStats | None:
        stats = self._stats_by_id.get(cand.id)
        if stats is None:
            stats = self._find_stats(cand)
            if stats is not None:
                self._stats_by_id[cand.id] = stats
        return stats

    def _find_stats(self, cand: Candidate) -> RequestStats | None:
        """The counters of an instance, or of a oneshot engine's runs."""
        if cand.kind is CandidateKind.ONESHOT:
            oneshot = self.sup.engines.get(cand.engine)
            return oneshot.stats if oneshot is not None else None
        inst = self.sup.find_instance(cand.id)
        return inst.stats if inst is not None else None

    # -- outcomes (what the dispatcher reports) ----------------------------------------------
    def finished(
        self,
        req: Request,
        ok: bool,
        result: Any,
        error: EngctlError | None,
        blame: bool = True,
    ) -> None:
        """One attempt ended: record it, then answer, retry elsewhere, or ignore (late).

        `blame` False: the request was lost with its process (the crash policy's business),
        not failed by a running instance (the failing policy's).
        """
        latency_ms = (time.perf_counter() - req.sent_at) * 1000
        cand, stats = req.cand, req.stats
        req.cand = req.stats = None
        if req.gates:
            self.gate.finished(req, ok, latency_ms)
        if cand is not None and cand.in_flight > 0:
            cand.in_flight -= 1  # harmless on a candidate already withdrawn from the pool
        if stats is not None:
            stats.in_flight = max(0, stats.in_flight - 1)
            if req.settled:
                req.settled = False  # the late end of a timed-out attempt: counted already
            elif ok:
                ewma = stats.record_ok(latency_ms, self.record_latency)
                # The selection index re-sorts on a latency change: tell it only when the
                # EWMA has moved by a tenth since it last heard, not on every request.
                known = cand.latency_ms if cand is not None else None
                if cand is not None and (known is None or abs(ewma - known) > 0.1 * known):
                    cand.latency_ms = ewma
            elif blame:
                assert error is not None
                stats.record_error(error.message)
                if cand is not None and cand.id in self.pool and self.pool.get(cand.id) is cand:
                    # (not a process already replaced under the same id: not the new one's)
                    self._failed(cand.id, cand.kind)
            else:
                stats.record_lost()
        if self._drains and cand is not None:
            self._check_drains(cand.id)
        if req.future.done:
            self.retry_waiting()
            return
        if ok:
            self._succeed(req, result)
        else:
            assert error is not None
            req.last_error = error
            if req.retries_left > 0:
                req.retries_left -= 1
                self._route(req)
            else:
                self._fail(req, error)
        self.retry_waiting()

    def _failed(self, cand_id: str, kind: CandidateKind) -> None:
        """An instance failed: the failing policy hears of it (a oneshot engine has none)."""
        if self.policies is not None and kind is CandidateKind.INSTANCE:
            self.policies.request_failed(cand_id)

    def blame(self, inst: Instance, why: str) -> None:
        """An error of an instance outside any request (protocol garbage between answers)."""
        inst.stats.blame(why)
        if inst.key == inst.id:  # the slot's current process (not a rollout's other one)
            self._failed(inst.id, CandidateKind.INSTANCE)

    def queue_by_type(self) -> dict[str, int]:
        """Requests waiting, by the type they asked for ("" for none)."""
        return self.gate.by_type()

    def retry_waiting(self, scan: int = QUEUE_SCAN) -> None:
        """Offer freed capacity (or new tokens) to waiting requests in service order: up to
        `scan` tries, the classes found blocked on the way skipped (a bounded scan)."""
        if self.queue:
            self.gate.scan(self._place, self._fail, scan)

    def _timed_out(self, req: Request) -> None:
        if req.future.done:
            return
        # Only an attempt in flight (req.cand) times out on its instance. A request waiting in
        # the queue for a retry also names an instance (the one that failed it, already blamed
        # for that failure): it must neither be charged a timeout nor keep its queue slot.
        running = req.cand is not None
        target = req.target.id if req.target is not None else None
        if running:
            where = f" on {target}"
        elif target and req.last_error is not None:
            where = f" waiting in the queue for a retry (last error: {req.last_error.message})"
        elif req.waiting_for:
            where = f" waiting in the queue: {req.waiting_for}"
        else:
            where = " waiting in the queue"
        if not running:
            # Free its slot now: max_queue bounds live waiters, not requests already answered.
            self.gate.dequeue(req)
        self._fail(req, RequestTimeoutError(f"request timed out after {req.timeout:g}s{where}"))
        if running and req.stats is not None:
            # The caller gave up: that is this attempt's outcome. It says nothing about the
            # worker (a busy one may well answer later), so it is not blamed and the hang
            # policy does not hear of it; the slot stays held until the answer comes.
            req.stats.record_timeout()
            req.settled = True
        if self.dispatcher.cancel(req):
            self.finished(req, False, None, None)
        if running and target is not None and self._drains:
            self._check_drains(target)  # a drain does not wait for it any more

    def _succeed(self, req: Request, result: Any) -> None:
        self.deadlines.discard(req)
        if self._settled is not None and not self.deadlines:
            self._settled.set()
        if isinstance(result, RawJSON):
            raw = result.raw  # as the worker wrote it: spliced in, never decoded
        else:
            try:
                raw = protocol.encode_value(result)  # a oneshot's output, decoded
            except EngctlError as exc:  # not encodable (a lone surrogate): say so
                req.future.set_exception(exc)
                return
        if not req.explain:
            target = req.target
            assert target is not None  # it succeeded somewhere
            latency_ms = (time.perf_counter() - req.started) * 1000
            ok = protocol.exec_ok(req.id, target.engine, target.id, latency_ms, req.attempts, raw)
            req.future.set_raw_result(ok)
            return
        explained = self._explained.pop(req.id, None)
        req.future.set_raw_result(self._result(req, True, raw, explained))

    def _result(
        self, req: Request, ok: bool, result: bytes | None = None, explain: Any = None
    ) -> bytes:
        """The result object of `req` (`protocol.exec_result`), latency up to now."""
        target = req.target
        return protocol.exec_result(
            req.id,
            target.engine if target is not None else None,
            target.id if target is not None else None,
            ok,
            (time.perf_counter() - req.started) * 1000,
            req.attempts,
            explain=explain,
            result=result,
        )

    def _fail(self, req: Request, error: EngctlError) -> None:
        self.deadlines.discard(req)
        if self._settled is not None and not self.deadlines:
            self._settled.set()
        if req.future.done:
            return
        explained = self._explained.pop(req.id, None)
        # A failure carries the result object (ok false) in its error's data.
        error.data = {**error.data, **json.loads(self._result(req, False, explain=explained))}
        req.future.set_exception(error)

    # -- draining ----------------------------------------------------------------------------
    def drain(self, inst: Instance) -> asyncio.Future[None]:
        """A future done when no request `inst` runs is still awaited (at once when it runs
        none); the caller has made it ineligible. Requests waiting in the queue pick again."""
        fut: asyncio.Future[None] = self.loop.create_future()
        old = self._drains.pop(inst, None)
        if old is not None and not old.done():
            old.set_result(None)
        self._drains[inst] = fut
        self._check_drain(inst)
        return fut

    def _check_drains(self, inst_id: str) -> None:
        """A request of `inst_id` ended: the drains of its records may be over."""
        for inst in [i for i in self._drains if i.id == inst_id]:
            self._check_drain(inst)

    def _check_drain(self, inst: Instance) -> None:
        # Requests already answered with a timeout that it never answers are not waited for.
        if inst.stats.in_flight - self.dispatcher.stuck_requests(inst) <= 0:
            self.drained(inst)

    def drained(self, inst: Instance) -> None:
        """`inst` takes no requests any more, one way or another: its drain is over."""
        fut = self._drains.pop(inst, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    def draining(self, inst: Instance) -> bool:
        """Whether a drain of `inst` waits for its requests."""
        return inst in self._drains

    def slot_changed(self, inst_id: str) -> None:
        """Another process serves `inst_id` (a rollout's swap): its counters are looked up
        afresh."""
        self._stats_by_id.pop(inst_id, None)

    async def settle(self, timeout: float) -> int:
        """Take no new request, and wait up to `timeout` seconds for every request held (in
        flight or queued) to end (daemon shutdown, before the engines stop); returns how
        many have not."""
        self.accepting = False
        if self.deadlines:
            if self._settled is None:
                self._settled = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), timeout)
        return len(self.deadlines)

    def stop_settling(self) -> None:
        """End `settle` now (a second signal: the requests still held fail)."""
        self.accepting = False
        if self._settled is None:
            self._settled = asyncio.Event()
        self._settled.set()

    def close(self) -> None:
        """Fail everything still waiting (daemon shutdown)."""
        for inst in list(self._drains):
            self.drained(inst)
        for req in self.gate.close():
            self._fail(req, RequestFailedError("daemon shutting down"))
        for req in self.dispatcher.close():
            self._fail(req, RequestFailedError("daemon shutting down"))


def _input_json(value: Any) -> bytes:
    """A request's input as JSON: as the client sent it when the server kept its bytes."""
    if type(value) is RawJSON:
        return value.raw
    # The shared encoder: json.dumps with arguments would build one per call.
    return protocol.encode_value(value)
