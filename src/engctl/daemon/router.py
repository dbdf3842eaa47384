"""Routes `engctl exec` requests: place each on an instance (`selection`), queue it when all are
full, retry elsewhere, time it out, make it wait for instances on their way (`standby`), let
drains finish, count every attempt's outcome (`stats`) and answer the caller.

Sending is `dispatch`'s job, processes are `supervisor`'s. The hot path creates no task per
request: a Request is a plain object moved along by callbacks and one loop timer (`deadlines`).
Imports no failure policy: failed requests are reported through `PolicyHooks`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import time
from typing import Any, Protocol

from engctl import protocol
from engctl.config import DaemonConfig
from engctl.errors import (
    BusyError,
    EngctlError,
    InvalidParamsError,
    NoEligibleEngineError,
    RequestFailedError,
    RequestTimeoutError,
    UsageError,
)
from engctl.protocol import StrategyName
from engctl.states import DesiredState, EngineMode, InstanceState

from .deadlines import Deadlines
from .dispatch import Dispatcher
from .instance import Engine, Instance
from .request import Request
from .selection import Candidate, CandidateKind, CandidatePool, Outcome, Selector
from .server import RawJSON, Reply
from .standby import InstanceView, Standby, spec_matches, standby
from .stats import RequestStats
from .supervisor import Supervisor

S = InstanceState
# On each completion, this many waiting requests are tried against the freed capacity.
QUEUE_SCAN = 8
_KEYED = (StrategyName.AFFINITY, StrategyName.CONSISTENT_HASH)


class PolicyHooks(Protocol):
    """What the failure policies hear from the router (see `enforcer`)."""

    def request_failed(self, inst_id: str) -> None: ...


class _Wait:
    """`_place` result: the request waits in the queue."""


_WAIT = _Wait()


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
        self.queue: collections.deque[Request] = collections.deque()
        self._explained: dict[str, Any] = {}
        self.deadlines = Deadlines(self.loop, self._timed_out)
        self.policies: PolicyHooks | None = None  # wired by the daemon (main.py)
        self.record_latency = config.metrics  # the histograms behind report, metrics and top
        # Instance or oneshot-engine id -> its counters; rebuilt when the engines change.
        self._stats_by_id: dict[str, RequestStats] = {}
        self._selectors: dict[tuple[Any, ...], Selector] = {}
        # Instances draining before a stop, and what waits for their last request.
        self._drains: dict[str, tuple[Instance, asyncio.Future[None]]] = {}
        self._seq = 0
        self._id_prefix = f"r{os.getpid():x}-"

    @property
    def protocol_errors(self) -> int:
        """Lines on workers' stdout that broke the protocol, since the daemon started."""
        return self.dispatcher.protocol_errors

    def engines_changed(self) -> None:
        """The registered engines changed: counters are looked up afresh, and what waiting
        requests wait for may be gone now."""
        self._stats_by_id.clear()
        if self.queue:
            self.retry_waiting(len(self.queue))

    # -- requests ----------------------------------------------------------------------------
    def submit(self, params: dict[str, Any]) -> Reply:
        """Start one request from `request.exec` params; the Reply gets its result object."""
        if "input" not in params:
            raise InvalidParamsError("missing parameter 'input'")
        common_type = params.get("type") if len(params) == 2 else None
        if type(common_type) is str:
            # The common call, {input, type}: its key is the type (a str never equals the
            # tuples below), one lookup instead of eight.
            key: Any = common_type
        else:
            key = (
                params.get("type"),
                params.get("engine"),
                params.get("instance"),
                _as_tuple(params.get("require")),
                _as_tuple(params.get("prefer")),
                _as_tuple(params.get("labels")),
                params.get("key"),
                params.get("strategy"),
            )
        try:
            selector = self._selectors.get(key)
        except TypeError:  # unhashable: a list or an object where a string belongs
            selector = key = None
        if selector is None:
            selector = _selector(params)  # InvalidParamsError for values of the wrong type
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
        )
        self.deadlines.add(req)
        self._route(req)
        return fut

    def _route(self, req: Request) -> None:
        """Dispatch a new or retried request, queue it, or fail it."""
        outcome = self._place(req, req.explain)
        if outcome is _WAIT:
            if len(self.queue) >= self.config.max_queue:
                self._fail(
                    req,
                    BusyError(
                        f"busy: no free instance and {len(self.queue)} requests already wait"
                        f" (max_queue {self.config.max_queue})"
                    ),
                )
                return
            self.queue.append(req)
        elif isinstance(outcome, EngctlError):
            self._fail(req, outcome)

    def _place(self, req: Request, explain: bool = False) -> EngctlError | _Wait | None:
        """Dispatch `req` now (None), leave it to wait (_WAIT), or the error that ends it."""
        selector = req.selector
        if req.tried:
            # A retry goes to an instance not tried yet, through every hard filter of the
            # first attempt: the set is keyed by type, engine, capabilities and labels, and
            # the instance filter is applied here. Retries are rare: scanning is fine.
            members = self.pool.candidate_set(selector)
            pinned = selector.instance
            untried = [c for c in members if c.id not in req.tried and pinned in (None, c.id)]
            free = [c for c in untried if not c.full]
            if free:
                self._dispatch(req, min(free, key=lambda c: (c.load, c.id)))
                return None
            if untried:
                return _WAIT
            waiting = self._standby(selector, req.tried)
            if waiting is not None and waiting.wait:
                req.waiting_for = waiting.wait
                return _WAIT
            if req.last_error is not None:
                return req.last_error
            return RequestFailedError("no other instance to retry on")
        sel = self.pool.select(selector, explain=explain)
        if sel.outcome is Outcome.PICKED:
            assert sel.candidate is not None
            if explain and sel.explanation is not None:
                self._explained[req.id] = sel.explanation.to_json()
            self._dispatch(req, sel.candidate)
            return None
        if sel.outcome is Outcome.ALL_FULL:
            return _WAIT
        waiting = self._standby(selector)
        if waiting is not None and waiting.wait:
            # Registered and on its way (starting, warming up, restarting, or not started
            # yet by a daemon that is starting): not "no engine". Wait within the deadline.
            req.waiting_for = waiting.wait
            return _WAIT
        assert sel.no_match is not None
        error = sel.no_match.error(sel.explanation)
        if waiting is not None and waiting.error:
            return NoEligibleEngineError(waiting.error, error.data)
        return error

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
            if not engine.instances:
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
                if cand is not None:
                    self._failed(cand.id, cand.kind)
            else:
                stats.record_lost()
        if self._drains and cand is not None and cand.id in self._drains:
            self._check_drain(cand.id)
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

    def blame(self, inst_id: str, why: str) -> None:
        """An error of an instance outside any request (protocol garbage between answers)."""
        inst = self.sup.find_instance(inst_id)
        if inst is not None:
            inst.stats.blame(why)
            self._failed(inst_id, CandidateKind.INSTANCE)

    def queue_by_type(self) -> dict[str, int]:
        """Requests waiting for a free instance, by the type they asked for ("" for none)."""
        out: dict[str, int] = {}
        for req in self.queue:
            if not req.future.done:
                t = req.selector.type or ""
                out[t] = out.get(t, 0) + 1
        return out

    def retry_waiting(self, scan: int = QUEUE_SCAN) -> None:
        """Offer freed capacity to the oldest `scan` waiting requests (a bounded scan)."""
        if not self.queue:
            return
        kept: list[Request] = []
        blocked: set[object] = set()  # filters that found nothing free in this scan
        for _ in range(min(scan, len(self.queue))):
            req = self.queue.popleft()
            if req.future.done:
                continue
            key = req.selector.filter_key
            if key in blocked and not req.tried:
                kept.append(req)
                continue
            outcome = self._place(req)
            if outcome is _WAIT:
                blocked.add(key)
                kept.append(req)
            elif isinstance(outcome, EngctlError):
                self._fail(req, outcome)
        self.queue.extendleft(reversed(kept))

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
            with contextlib.suppress(ValueError):
                self.queue.remove(req)
        self._fail(req, RequestTimeoutError(f"request timed out after {req.timeout:g}s{where}"))
        if running and req.stats is not None:
            # The caller gave up: that is this attempt's outcome. It says nothing about the
            # worker (a busy one may well answer later), so it is not blamed and the hang
            # policy does not hear of it; the slot stays held until the answer comes.
            req.stats.record_timeout()
            req.settled = True
        if self.dispatcher.cancel(req):
            self.finished(req, False, None, None)
        if running and target in self._drains:
            self._check_drain(target)  # a drain does not wait for it any more

    def _succeed(self, req: Request, result: Any) -> None:
        self.deadlines.discard(req)
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
        old = self._drains.pop(inst.id, None)
        if old is not None and not old[1].done():
            old[1].set_result(None)
        self._drains[inst.id] = (inst, fut)
        self._check_drain(inst.id)
        return fut

    def _check_drain(self, inst_id: str) -> None:
        entry = self._drains.get(inst_id)
        if entry is None:
            return
        inst = entry[0]
        # Requests already answered with a timeout that it never answers are not waited for.
        if inst.stats.in_flight - self.dispatcher.stuck_requests(inst) <= 0:
            self.drained(inst_id)

    def drained(self, inst_id: str) -> None:
        """`inst_id` takes no requests any more, one way or another: its drain is over."""
        entry = self._drains.pop(inst_id, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(None)

    def draining(self, inst_id: str) -> bool:
        """Whether a drain of `inst_id` waits for its requests."""
        return inst_id in self._drains

    def close(self) -> None:
        """Fail everything still waiting (daemon shutdown)."""
        for inst_id in list(self._drains):
            self.drained(inst_id)
        for req in list(self.queue):
            self._fail(req, RequestFailedError("daemon shutting down"))
        self.queue.clear()
        for req in self.dispatcher.close():
            self._fail(req, RequestFailedError("daemon shutting down"))


def _input_json(value: Any) -> bytes:
    """A request's input as JSON: as the client sent it when the server kept its bytes."""
    if type(value) is RawJSON:
        return value.raw
    # The shared encoder: json.dumps with arguments would build one per call.
    return protocol.encode_value(value)


def _as_tuple(value: Any) -> Any:
    """A hashable form of a list parameter (unhashable junk is left for validation)."""
    return tuple(value) if isinstance(value, list) else value


def _selector(params: dict[str, Any]) -> Selector:
    def strings(key: str) -> list[str]:
        value = params.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidParamsError(f"parameter {key!r} must be a list of strings")
        return value

    def opt(key: str) -> str | None:
        value = params.get(key)
        if value is not None and not isinstance(value, str):
            raise InvalidParamsError(f"parameter {key!r} must be a string")
        return value

    selector = Selector.of(
        type=opt("type"),
        engine=opt("engine"),
        instance=opt("instance"),
        require=strings("require"),
        prefer=strings("prefer"),
        labels=strings("labels"),
        key=opt("key"),
        strategy=opt("strategy"),
    )
    if selector.strategy in _KEYED and selector.key is None:
        raise UsageError(f"strategy {selector.strategy} needs --key (the stickiness key)")
    return selector
