"""Requests of `engctl exec`: pick an instance, queue when all are full, send it over the worker
protocol (or spawn a oneshot), time out, retry elsewhere, and feed the outcome back as
observations.

Selection is `dispatch` (pure); processes belong to `supervisor`. The hot path creates no task
per request: a Request is a plain object moved along by callbacks and one loop timer, and
writes to a worker are batched per loop iteration.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
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
from engctl.models import EngineSpec
from engctl.paths import Paths
from engctl.protocol import StrategyName
from engctl.states import DesiredState, Eligibility, EngineMode, InstanceState, RequestOutcome

from . import output, process
from .oneshot import OneshotRun, uses_argv
from .output import MAX_WORKER_LINE
from .process import ChildProcess
from .selection import (
    Candidate,
    CandidatePool,
    Outcome,
    Selector,
    default_strategies,
)
from .server import Outbox, RawJSON, Reply
from .supervisor import Engine, Instance, RequestStats, Supervisor

log = logging.getLogger("engctl.requests")

S = InstanceState
EWMA_ALPHA = 0.2
# Protocol garbage is logged with at most this many bytes of the offending line.
PREVIEW_BYTES = 200
# On each completion, this many waiting requests are tried against the freed capacity.
QUEUE_SCAN = 8
# How long a worker whose protocol pipe closed may take to exit before it counts as a
# process that lives on without it (a crash closes the pipes a moment before the exit).
CHANNEL_GRACE = 0.25
_KEYED = (StrategyName.AFFINITY, StrategyName.CONSISTENT_HASH)


class PolicyHooks(Protocol):
    """What the failure policies need to hear from dispatch (see `enforcer`)."""

    def request_failed(self, inst_id: str) -> None: ...

    def state_changed(self, inst: Instance, old: InstanceState, new: InstanceState) -> None: ...

    def refresh(self, inst: Instance, announce: bool = True) -> None: ...


class _Wait:
    """`_place` result: the request waits in the queue."""


_WAIT = _Wait()
_PING = "ping"


class Request:
    """One exec request on its way: where it was tried, its deadline, where to reply."""

    __slots__ = (
        "attempts",
        "cand",
        "deadline",
        "explain",
        "future",
        "id",
        "input_json",
        "instance",
        "last_error",
        "retries_left",
        "selector",
        "sent_at",
        "settled",
        "started",
        "stats",
        "timeout",
        "tried",
        "waiting_for",
    )

    def __init__(
        self,
        req_id: str,
        input_json: bytes,
        selector: Selector,
        timeout: float,
        retries: int,
        explain: bool,
        future: Reply,
    ) -> None:
        self.id = req_id
        self.input_json = input_json
        self.selector = selector
        self.timeout = timeout
        self.retries_left = retries
        self.explain = explain
        self.future = future
        self.tried: list[str] = []
        self.attempts = 0
        self.started = time.perf_counter()
        self.sent_at = 0.0
        self.instance: str | None = None
        self.last_error: EngctlError | None = None
        self.deadline = 0.0  # loop time
        self.cand: Candidate | None = None  # the attempt in flight, and its instance's stats
        self.stats: RequestStats | None = None
        # The attempt in flight already has its outcome (it timed out): its slot stays held
        # until the late answer, or the loss, frees it, and then nothing more is counted.
        self.settled = False
        self.waiting_for = ""  # what a waiting request waits for, for its timeout message


class Deadlines:
    """Request deadlines without a loop timer per request.

    Requests with the same timeout expire in arrival order, so each timeout value keeps an
    ordered lane and one loop timer watches the earliest head; a finished request leaves its
    lane in O(1). Memory is bounded by the requests in flight.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, on_expired: Callable[[Request], None]
    ) -> None:
        self._loop = loop
        self._on_expired = on_expired
        self._lanes: dict[float, collections.OrderedDict[str, Request]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf

    def add(self, req: Request) -> None:
        req.deadline = self._loop.time() + req.timeout
        lane = self._lanes.get(req.timeout)
        if lane is None:
            lane = self._lanes[req.timeout] = collections.OrderedDict()
        lane[req.id] = req
        if req.deadline < self._timer_at:
            self._arm(req.deadline)

    def discard(self, req: Request) -> None:
        lane = self._lanes.get(req.timeout)
        if lane is not None:
            lane.pop(req.id, None)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        now = self._loop.time()
        earliest = math.inf
        for timeout, lane in list(self._lanes.items()):
            while lane:
                req = next(iter(lane.values()))
                if req.deadline > now:
                    earliest = min(earliest, req.deadline)
                    break
                lane.popitem(last=False)
                self._on_expired(req)
            if not lane:
                del self._lanes[timeout]
        if earliest < math.inf:
            self._arm(earliest)


class WorkerChannel:
    """The worker protocol over one instance's stdin/stdout: ids, batching, garbage."""

    def __init__(self, router: Router, inst: Instance, proc: ChildProcess) -> None:
        self.router = router
        self.inst = inst
        self.proc = proc
        stdin = proc.popen.stdin
        assert stdin is not None
        self._stdin = stdin
        self._fd = stdin.fileno()
        os.set_blocking(self._fd, False)
        self._out = bytearray()
        self._marked = False
        self._writer_on = False
        self._buf = bytearray()  # the line being received
        self._discarding = False  # inside a line over the limit: dropped up to its newline
        self.pending: dict[int, Request] = {}
        self._pings: dict[int, Callable[[], None]] = {}
        self._next_id = 1
        self.closed = False
        self.last_read = 0.0  # loop time of the last bytes from the worker

    # -- writing -----------------------------------------------------------------------
    def send(self, req: Request) -> int:
        wid = self._next_id
        self._next_id += 1
        self.pending[wid] = req
        self._write(
            b'{"jsonrpc":"2.0","id":%d,"method":"execute","params":{"input":%s}}\n'
            % (wid, req.input_json)
        )
        return wid

    def ping(self, on_answer: Callable[[], None]) -> None:
        """Send a ping; `on_answer()` runs when it is answered (never, if it is not)."""
        wid = self._next_id
        self._next_id += 1
        if len(self._pings) > 64:
            self._pings.clear()  # unanswered pings of a stuck worker must not pile up
        self._pings[wid] = on_answer
        self._write(b'{"jsonrpc":"2.0","id":%d,"method":"ping"}\n' % wid)

    def _write(self, data: bytes) -> None:
        if self.closed:
            return
        self._out += data
        if not self._marked and not self._writer_on:
            self._marked = True
            self.router.outbox.mark(self)  # requests of one batch share one write

    def _flush(self) -> None:
        self._marked = False
        if self.closed or not self._out:
            return
        try:
            n = os.write(self._fd, self._out)
        except BlockingIOError:
            n = 0
        except OSError as exc:  # the worker closed its stdin or died
            self.router.channel_broken(self, f"closed its stdin ({exc.strerror})")
            return
        del self._out[:n]
        if self._out and not self._writer_on:
            self._writer_on = True
            self.router.loop.add_writer(self._fd, self._writable)

    def _writable(self) -> None:
        self.router.loop.remove_writer(self._fd)
        self._writer_on = False
        self._flush()

    # -- reading -----------------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        """Bytes from the worker's stdout (b"" at EOF)."""
        if not data:
            self.router.channel_eof(self)
            return
        self.last_read = self.router.loop.time()
        with self.router.outbox:
            self._receive(data)

    def _receive(self, data: bytes) -> None:
        """Split `data` into lines in time linear in its size: the unfinished line waits in a
        bytearray and only new bytes are scanned for its end (re-joining the buffer per chunk
        made one long line cost quadratic time)."""
        if self._discarding:
            nl = data.find(b"\n")
            if nl < 0:
                return  # still inside a line over the limit
            self._discarding = False
            data = data[nl + 1 :]
        start = 0
        buf = self._buf
        if buf:
            nl = data.find(b"\n")
            if nl < 0:
                buf += data
                if len(buf) > MAX_WORKER_LINE:
                    self._oversized()
                return
            if len(buf) + nl > MAX_WORKER_LINE:
                self._oversized(discard=False)
            else:
                buf += data[:nl]
                line = bytes(buf)
                buf.clear()
                if line.strip():
                    self._line(line)
            start = nl + 1
        find = data.find
        while True:
            nl = find(b"\n", start)
            if nl < 0:
                break
            if nl > start:
                line = data[start:nl]
                if line.strip():
                    self._line(line)
            start = nl + 1
        if start < len(data):
            buf += data[start:]
            if len(buf) > MAX_WORKER_LINE:
                self._oversized()

    def _oversized(self, discard: bool = True) -> None:
        """A line over MAX_WORKER_LINE: a protocol error now, and its rest is dropped as it
        arrives (with `discard`) instead of being held."""
        head = bytes(self._buf[:PREVIEW_BYTES])
        self._buf.clear()
        self._discarding = discard
        self._garbage(head, f"a line longer than the limit of {MAX_WORKER_LINE} bytes")

    def _line(self, line: bytes) -> None:
        try:
            msg, raw = output.reply(line)
        except output.OutputError as exc:
            self._garbage(line, str(exc))
            return
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            self._garbage(line, "not a JSON-RPC 2.0 object")
            return
        if "id" not in msg:
            if msg.get("method") == "ready":
                self.router.sup.mark_ready(self.inst, "announced ready")
            return  # other notifications are allowed and ignored
        wid = msg["id"]
        if type(wid) is not int:  # we only send integer ids (true is not 1 here)
            self._garbage(line, f"unknown id {wid!r}")
            return
        if self._pings and wid in self._pings:
            self._pings.pop(wid)()
            return
        req = self.pending.pop(wid, None)
        if req is None:
            if wid < self._next_id:
                return  # the answer to a ping nobody waits for any more
            self._garbage(line, f"unknown id {wid!r}")
            return
        if raw is not None:
            # Its result exactly as the worker wrote it (the decoded value is the same), to be
            # spliced into the reply: no second encoding pass.
            self.router.finished(req, self.inst.id, True, RawJSON(raw), None)
        elif isinstance(msg.get("error"), dict):
            err = msg["error"]
            text = str(err.get("message", "error"))
            self.router.finished(
                req,
                self.inst.id,
                False,
                None,
                RequestFailedError(f"{self.inst.id}: {text}", {"worker_error": err}),
            )
        else:
            self.pending[wid] = req  # failed with the others by _garbage
            self._garbage(line, "response without result or error")

    def _garbage(self, line: bytes, why: str) -> None:
        """A protocol violation: an error of this instance, logged with the offending bytes.

        Its requests in flight fail at once (and may be retried elsewhere): after garbage, no
        answer on this pipe can be trusted to be theirs, and waiting would end in a timeout.
        """
        excerpt = protocol.preview(line[:PREVIEW_BYTES], PREVIEW_BYTES)
        self.inst.log.note(f"protocol error ({why}): {excerpt}")
        # Counted here as a protocol error; its requests get their outcome (error) below.
        self.router.protocol_errors += 1
        self.inst.stats.protocol_errors += 1
        if self.inst.state in (S.STARTING, S.WARMING):
            self.router.sup.warmup_problem(
                self.inst, f"protocol error on stdout ({why}): {excerpt}"
            )
        pending = list(self.pending.values())
        self.pending.clear()
        error = f"{self.inst.id} broke the worker protocol ({why}): {excerpt}"
        for req in pending:
            self.router.finished(req, self.inst.id, False, None, RequestFailedError(error))
        if not pending:
            self.router.blame(self.inst.id, f"protocol error ({why})")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._writer_on:
            self.router.loop.remove_writer(self._fd)
        with contextlib.suppress(OSError):
            self._stdin.close()


class Router:
    """Owns the candidate pool, worker channels, the wait queue and every request in flight."""

    def __init__(self, sup: Supervisor, config: DaemonConfig, paths: Paths, outbox: Outbox) -> None:
        self.sup = sup
        self.outbox = outbox
        self.config = config
        self.paths = paths
        self.loop = sup.loop
        self.pool = CandidatePool(
            default_strategy=config.default_strategy,
            strategies=default_strategies(weights=config.capability_weights),
        )
        self.channels: dict[str, WorkerChannel] = {}
        self.queue: collections.deque[Request] = collections.deque()
        self.oneshot_runs: dict[Request, OneshotRun] = {}  # so shutdown can kill them
        self.protocol_errors = 0
        self._explained: dict[str, Any] = {}
        self.deadlines = Deadlines(self.loop, self._timed_out)
        self.enforcer: PolicyHooks | None = None
        self.record_latency = config.metrics  # the histograms behind report, metrics and top
        # Instance or oneshot-engine id -> its counters; rebuilt when the engines change.
        self._stats_by_id: dict[str, RequestStats] = {}
        self._selectors: dict[tuple[Any, ...], Selector] = {}
        # Instances draining before a stop, and what waits for their last request.
        self._drains: dict[str, tuple[Instance, asyncio.Future[None]]] = {}
        self._seq = 0
        self._id_prefix = f"r{os.getpid():x}-"
        sup.observer = self

    # -- supervision events ------------------------------------------------------------
    def spawned(self, inst: Instance, proc: ChildProcess) -> Any:
        old = self.channels.pop(inst.id, None)
        if old is not None:
            old.close()
        channel = WorkerChannel(self, inst, proc)
        self.channels[inst.id] = channel
        return channel.feed

    def warming(self, inst: Instance) -> None:
        channel = self.channels.get(inst.id)
        if channel is not None:
            channel.ping(lambda: self.sup.mark_ready(inst, "answered ping"))

    def ping_sender(self, inst: Instance) -> Callable[[Callable[[], None]], None] | None:
        """How to ping the instance's worker, or None when it has no open channel."""
        channel = self.channels.get(inst.id)
        if channel is None or channel.closed:
            return None
        return channel.ping

    def channel_last_read(self, inst: Instance) -> float:
        channel = self.channels.get(inst.id)
        return channel.last_read if channel is not None else 0.0

    def state_changed(self, inst: Instance, old: InstanceState, new: InstanceState) -> None:
        # The policies first: the eligibility they settle is the one the pool is given.
        if self.enforcer is not None:
            self.enforcer.state_changed(inst, old, new)
        if new is S.READY and inst.spec.mode is EngineMode.WORKER:
            self._admit(inst)
        else:
            if old in (S.READY, S.BUSY) and inst.id in self.pool:
                self.pool.remove(inst.id)  # no new requests; those in flight may still finish
            if not new.has_process:
                self._lose_pending(inst.id, f"{inst.id} {new.value}: {inst.state_reason}")
                if new in (S.FATAL, S.EXITED, S.STOPPED) and self.queue:
                    # Requests waiting for it may have nothing left to wait for: they fail
                    # now, saying why, rather than at their deadline.
                    self._drain_queue(len(self.queue))
        if inst.id in self._drains and new not in (S.READY, S.BUSY):
            self._drained(inst.id)  # it stopped taking requests another way

    # -- draining ----------------------------------------------------------------------
    def drain(self, inst: Instance) -> asyncio.Future[None]:
        """No new request for `inst` (its standing now says draining); the future is done
        when none it runs is still awaited. Requests waiting in the queue pick again."""
        if self.enforcer is not None:
            self.enforcer.refresh(inst, announce=False)
        elif inst.id in self.pool:
            self.pool.get(inst.id).eligible = False
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
        if inst.stats.in_flight - self.stuck_requests(inst) <= 0:
            self._drained(inst_id)

    def _drained(self, inst_id: str) -> None:
        entry = self._drains.pop(inst_id, None)
        if entry is not None and not entry[1].done():
            entry[1].set_result(None)

    def candidate_changed(self, inst: Instance) -> None:
        """The instance's eligibility or effective weight changed: tell the selection pool."""
        if inst.id not in self.pool:
            return
        cand = self.pool.get(inst.id)
        eligible = inst.eligibility in (Eligibility.ACTIVE, Eligibility.DOWNWEIGHTED)
        cand.ineligible_reason = "" if eligible else _ineligible(inst)
        cand.effective_weight = inst.effective_weight
        was = cand.eligible
        cand.eligible = eligible
        if eligible and not was:
            self._drain_queue()

    def _admit(self, inst: Instance) -> None:
        spec = inst.spec
        if inst.id in self.pool:
            self.pool.remove(inst.id)
        eligible = inst.eligibility in (Eligibility.ACTIVE, Eligibility.DOWNWEIGHTED)
        self.pool.add(
            Candidate(
                inst.id,
                spec.name,
                spec.type,
                capabilities=spec.capabilities,
                labels=spec.labels,
                weight=spec.weight,
                effective_weight=min(inst.effective_weight, spec.weight),
                max_concurrency=spec.max_concurrency,
                latency_ms=inst.stats.latency_ewma_ms,
                eligible=eligible,
                ineligible_reason="" if eligible else _ineligible(inst),
            )
        )
        self._drain_queue()

    def _lose_pending(self, inst_id: str, why: str) -> None:
        """The process is gone: its requests in flight fail here (and may be retried), so
        none waits forever on an instance that will never answer."""
        channel = self.channels.pop(inst_id, None)
        if channel is None:
            return
        pending = list(channel.pending.values())
        channel.pending.clear()
        channel.close()
        for req in pending:
            lost = RequestFailedError(f"{why} (request lost)")
            self.finished(req, inst_id, False, None, lost, blame=False)

    def channel_eof(self, channel: WorkerChannel) -> None:
        """The worker closed its stdout (or exited: a process's pipes close as it ends)."""
        self.channel_broken(channel, "closed its stdout")

    def channel_broken(self, channel: WorkerChannel, why: str) -> None:
        """The protocol pipe is gone: nothing in flight can be answered, nothing new can be
        sent. If the process lives on without it, it is a failed instance: restarted."""
        channel.close()
        inst = channel.inst
        if self.channels.get(inst.id) is not channel:
            return  # the pipe of a process already replaced
        if inst.id in self.pool:
            self.pool.remove(inst.id)  # no new requests
        # A process that ends closes its pipes a moment before its exit is seen: give the
        # exit time to fail the requests in flight with its own reason (exit code, signal).
        self.loop.call_later(CHANNEL_GRACE, self._without_channel, channel, why)

    def _without_channel(self, channel: WorkerChannel, why: str) -> None:
        inst, proc = channel.inst, channel.proc
        if self.channels.get(inst.id) is not channel:
            return  # its exit was handled meanwhile
        self._lose_pending(inst.id, f"{inst.id} {why}")
        if not proc.alive or inst.proc is not proc or inst.state in (S.STOPPING, S.STOPPED):
            return
        self.sup.fail_instance(
            inst,
            f"worker {why}: without its protocol pipe it cannot serve",
            cause="no protocol pipe",
            failed_start=inst.state in (S.STARTING, S.WARMING),
        )

    def engines_changed(self) -> None:
        """Oneshot engines are candidates without processes: keep them in step."""
        self._stats_by_id.clear()
        wanted = {
            f"{e.spec.name}#oneshot": e.spec
            for e in self.sup.engines.values()
            if e.spec.mode is EngineMode.ONESHOT and e.desired.value == "running"
        }
        for cid in [c.id for c in self.pool if c.id.endswith("#oneshot")]:
            if cid not in wanted:
                self.pool.remove(cid)
        for cid, spec in wanted.items():
            if cid in self.pool:
                old = self.pool.get(cid)
                if old.type == spec.type and old.max_concurrency == _oneshot_capacity(spec):
                    continue
                self.pool.remove(cid)
            self.pool.add(
                Candidate(
                    cid,
                    spec.name,
                    spec.type,
                    capabilities=spec.capabilities,
                    labels=spec.labels,
                    weight=spec.weight,
                    max_concurrency=_oneshot_capacity(spec),
                )
            )
        if self.queue:
            self._drain_queue(len(self.queue))  # what waiters wait for may be gone now

    # -- requests ----------------------------------------------------------------------
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
            # The shared encoder: json.dumps with arguments would build one per call.
            protocol.encode_value(params["input"]),
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
            standby = self._standby(selector, req.tried)
            if standby is not None and standby.wait:
                req.waiting_for = standby.wait
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
        standby = self._standby(selector)
        if standby is not None and standby.wait:
            # Registered and on its way (starting, warming up, restarting, or not started
            # yet by a daemon that is starting): not "no engine". Wait within the deadline.
            req.waiting_for = standby.wait
            return _WAIT
        assert sel.no_match is not None
        error = sel.no_match.error(sel.explanation)
        if standby is not None and standby.error:
            return NoEligibleEngineError(standby.error, error.data)
        return error

    def _standby(self, selector: Selector, tried: list[str] | None = None) -> Standby | None:
        """What the registered engines say about a request nothing in the pool can take:
        something to wait for, a reason to fail at once, or None (the pool's diagnosis of
        the filters stands). Scans the engines: only on the way to waiting or failing."""
        views: list[InstanceView] = []
        services: list[str] = []
        for engine in self.sup.engines.values():
            spec = engine.spec
            if not _spec_matches(spec, selector):
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
        if state in (S.READY, S.BUSY) and inst.id in self.pool:
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
        req.instance = cand.id
        req.cand = cand
        cand.in_flight += 1
        req.sent_at = time.perf_counter()
        req.stats = self._stats(cand.id)
        if req.stats is not None:
            req.stats.in_flight += 1
        if cand.id.endswith("#oneshot"):
            self._run_oneshot(req, cand)
            return
        channel = self.channels.get(cand.id)
        if channel is None or channel.closed:
            lost = RequestFailedError(f"{cand.id} has no protocol channel")
            self.finished(req, cand.id, False, None, lost)
            return
        channel.send(req)

    def _run_oneshot(self, req: Request, cand: Candidate) -> None:
        engine = self.sup.engines.get(cand.engine)
        if engine is None:
            gone = RequestFailedError(f"{cand.engine} is gone")
            self.loop.call_soon(self.finished, req, cand.id, False, None, gone)
            return
        spec = engine.spec
        payload = json.loads(req.input_json)
        text = payload if isinstance(payload, str) else req.input_json.decode()
        if "\0" in text and uses_argv(spec):
            bad = UsageError(
                f"{spec.name}: the input holds a NUL byte, which its command's {{input}}"
                " argument cannot carry (an argv is NUL-terminated)"
            )
            self.loop.call_soon(self.finished, req, cand.id, False, None, bad)
            return
        env = dict(os.environ)
        env.update(spec.env)
        env[process.DAEMON_ID_ENV] = self.paths.daemon_id
        env[process.INSTANCE_ENV] = cand.id

        def done(ok: bool, result: Any, error: str) -> None:
            self.oneshot_runs.pop(req, None)
            err = None if ok else RequestFailedError(f"{spec.name}: {error}")
            self.finished(req, cand.id, ok, result, err)

        # `done` never runs inside the constructor (a spawn error is reported on a later turn);
        # the run is killed at the request's deadline (`_timed_out`).
        self.oneshot_runs[req] = OneshotRun(
            spec,
            text,
            env,
            self.loop,
            done,
            max_stdout=output.MAX_ONESHOT_OUTPUT,
            log=engine.oneshot_log,
            label=req.id,
        )

    def _stats(self, cand_id: str) -> RequestStats | None:
        stats = self._stats_by_id.get(cand_id)
        if stats is None:
            stats = self._find_stats(cand_id)
            if stats is not None:
                self._stats_by_id[cand_id] = stats
        return stats

    def _find_stats(self, cand_id: str) -> RequestStats | None:
        if cand_id.endswith("#oneshot"):
            oneshot = self.sup.engines.get(cand_id.removesuffix("#oneshot"))
            return oneshot.stats if oneshot is not None else None
        name, _, idx = cand_id.rpartition("#")
        engine = self.sup.engines.get(name)
        if engine is None or not idx.isdigit():
            return None
        k = int(idx)
        insts = engine.instances
        return insts[k].stats if k < len(insts) and insts[k].id == cand_id else None

    def finished(
        self,
        req: Request,
        cand_id: str,
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
                stats.record(RequestOutcome.OK)
                stats.consecutive_errors = 0
                if self.record_latency:
                    stats.hist.record_ms(latency_ms)
                prev = stats.latency_ewma_ms
                stats.latency_ewma_ms = (
                    latency_ms if prev is None else prev + EWMA_ALPHA * (latency_ms - prev)
                )
                # The selection index re-sorts on a latency change: tell it only when the
                # EWMA has moved by a tenth since it last heard, not on every request.
                known = cand.latency_ms if cand is not None else None
                if cand is not None and (
                    known is None or abs(stats.latency_ewma_ms - known) > 0.1 * known
                ):
                    cand.latency_ms = stats.latency_ewma_ms
            elif blame:
                stats.record(RequestOutcome.ERROR)
                assert error is not None
                self._blame(stats, cand_id, error.message)
            else:
                stats.record(RequestOutcome.LOST)
        if self._drains and cand_id in self._drains:
            self._check_drain(cand_id)
        if req.future.done:
            self._drain_queue()
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
        self._drain_queue()

    def stuck_requests(self, inst: Instance) -> int:
        """Requests of `inst` already answered with a timeout that it has not answered."""
        channel = self.channels.get(inst.id)
        if channel is None:
            return 0
        return sum(1 for r in channel.pending.values() if r.future.done)

    def unanswered_ages(self, inst: Instance) -> list[tuple[str, float]]:
        """(request id, seconds since it was sent) of every request `inst` has not answered,
        oldest first (timed-out ones included: their slots are still held)."""
        channel = self.channels.get(inst.id)
        if channel is None or not channel.pending:
            return []
        now = time.perf_counter()
        return [(r.id, now - r.sent_at) for r in channel.pending.values()]

    def queue_by_type(self) -> dict[str, int]:
        """Requests waiting for a free instance, by the type they asked for ("" for none)."""
        out: dict[str, int] = {}
        for req in self.queue:
            if not req.future.done:
                t = req.selector.type or ""
                out[t] = out.get(t, 0) + 1
        return out

    def _blame(self, stats: RequestStats, cand_id: str, why: str) -> None:
        stats.consecutive_errors += 1
        stats.last_error = why
        if self.enforcer is not None and not cand_id.endswith("#oneshot"):
            self.enforcer.request_failed(cand_id)

    def blame(self, cand_id: str, why: str) -> None:
        """An error of an instance outside any request (protocol garbage between answers)."""
        stats = self._stats(cand_id)
        if stats is not None:
            self._blame(stats, cand_id, why)

    def _drain_queue(self, scan: int = QUEUE_SCAN) -> None:
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
        if running:
            where = f" on {req.instance}"
        elif req.instance and req.last_error is not None:
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
            req.stats.record(RequestOutcome.TIMEOUT)
            req.settled = True
        run = self.oneshot_runs.pop(req, None)
        if run is not None:
            run.kill()  # a oneshot's process group dies at the deadline: its slot is free
            self.finished(req, req.instance or "", False, None, None)
        if running and req.instance in self._drains:
            self._check_drain(req.instance)  # a drain does not wait for it any more

    def _raw_result(self, req: Request, raw: bytes) -> bytes:
        """The success object of `_result`, built as bytes around the worker's raw result."""
        instance = req.instance or ""
        return (
            b'{"request_id":%s,"engine":%s,"instance":%s,"ok":true,"latency_ms":%.3f,'
            b'"attempts":%d,"result":%s}'
            % (
                protocol.encode_value(req.id),
                protocol.encode_value(instance.rpartition("#")[0]),
                protocol.encode_value(instance),
                (time.perf_counter() - req.started) * 1000,
                req.attempts,
                raw,
            )
        )

    def _result(self, req: Request, ok: bool) -> dict[str, Any]:
        instance = req.instance
        out: dict[str, Any] = {
            "request_id": req.id,
            "engine": instance.rpartition("#")[0] if instance else None,
            "instance": instance,
            "ok": ok,
            "latency_ms": round((time.perf_counter() - req.started) * 1000, 3),
            "attempts": req.attempts,
        }
        explained = self._explained.pop(req.id, None)
        if explained is not None:
            out["explain"] = explained
        return out

    def _succeed(self, req: Request, result: Any) -> None:
        self.deadlines.discard(req)
        if isinstance(result, RawJSON):
            if not req.explain:
                req.future.set_raw_result(self._raw_result(req, result.raw))
                return
            result = json.loads(result.raw)
        out = self._result(req, True)
        out["result"] = result
        req.future.set_result(out)

    def _fail(self, req: Request, error: EngctlError) -> None:
        self.deadlines.discard(req)
        if req.future.done:
            return
        error.data = {**error.data, **self._result(req, False)}
        req.future.set_exception(error)

    def close(self) -> None:
        """Fail everything still waiting (daemon shutdown)."""
        for inst_id in list(self._drains):
            self._drained(inst_id)
        for req in list(self.queue):
            self._fail(req, RequestFailedError("daemon shutting down"))
        self.queue.clear()
        for channel in self.channels.values():
            for req in list(channel.pending.values()):
                self._fail(req, RequestFailedError("daemon shutting down"))
            channel.pending.clear()
        for req, run in list(self.oneshot_runs.items()):
            run.kill()  # no oneshot outlives the daemon
            self._fail(req, RequestFailedError("daemon shutting down"))
        self.oneshot_runs.clear()


@dataclass(frozen=True, slots=True)
class InstanceView:
    """An instance (or a oneshot engine) as `standby` judges it: its id, engine, and where it
    is headed: `ready`, `starting`, `restarting` (with the seconds to its next start when
    known), or down (`stopping`, `stopped`, `exited`, `fatal`) with its reason."""

    id: str
    engine: str
    state: str
    reason: str = ""
    next_start: float | None = None


@dataclass(frozen=True, slots=True)
class Standby:
    """`wait`: what a request waits for (it may be served within its deadline); `error`:
    why it cannot be served by any registered engine that matches it."""

    wait: str = ""
    error: str = ""


_COMING = ("starting", "restarting")


def standby(views: list[InstanceView], services: list[str], whole: bool = True) -> Standby | None:
    """Decide for a request that no ready instance can take: wait for instances that are on
    their way, fail at once saying why the matching engines are down (or take no requests),
    or None when nothing registered matches (or some match and serve: the filters' own
    diagnosis says more). `whole`: `views` holds every instance of their engines (no
    instance was pinned or left out). Pure: plain values in, a decision out."""
    coming = [v for v in views if v.state in _COMING]
    if coming:
        return Standby(wait=_describe(coming, views, _coming_phrase, whole))
    if any(v.state == "ready" for v in views):
        return None
    if views:
        return Standby(error=_describe(views, views, _down_phrase, whole))
    if services:
        if len(services) == 1:
            return Standby(error=f"{services[0]} is a service engine: it takes no requests")
        names = ", ".join(sorted(services))
        return Standby(error=f"{names} are service engines: they take no requests")
    return None


def _coming_phrase(views: list[InstanceView]) -> str:
    if all(v.state == "starting" for v in views):
        return "starting"
    starts = [v.next_start for v in views if v.next_start is not None]
    when = f" (next start in {min(starts):.1f}s)" if starts else ""
    return f"restarting{when}"


def _down_phrase(views: list[InstanceView]) -> str:
    v = views[0]
    return f"{v.state}: {v.reason}" if v.reason else v.state


def _describe(
    chosen: list[InstanceView],
    views: list[InstanceView],
    phrase: Callable[[list[InstanceView]], str],
    whole: bool,
) -> str:
    """Say "all instances of X are P" when `chosen` is every instance of one engine (`whole`:
    `views` holds them all) in one state, else each instance with its own phrase."""
    engines = {v.engine for v in chosen}
    if len(engines) == 1 and whole:
        name = next(iter(engines))
        every = [v for v in views if v.engine == name]
        if len(every) == len(chosen) and len({v.state for v in chosen}) == 1:
            if len(chosen) == 1 and chosen[0].id == name:
                return f"{name} is {phrase(chosen)}"  # a oneshot engine, or 0 instances
            return f"all instances of {name} are {phrase(chosen)}"
    return "; ".join(f"{v.id} is {phrase([v])}" for v in chosen)


def _spec_matches(spec: EngineSpec, selector: Selector) -> bool:
    """Whether an engine passes the request's hard filters as registered (its instances
    may not be dispatchable yet)."""
    if selector.engine is not None and spec.name != selector.engine:
        return False
    if selector.type is not None and spec.type != selector.type:
        return False
    if selector.instance is not None and selector.instance.rpartition("#")[0] != spec.name:
        return False
    if selector.require and not selector.require <= frozenset(spec.capabilities):
        return False
    return all(spec.labels.get(k) == v for k, v in selector.labels)


def _ineligible(inst: Instance) -> str:
    reason = inst.eligibility_reason
    return f"{inst.eligibility.value}: {reason}" if reason else inst.eligibility.value


def _as_tuple(value: Any) -> Any:
    """A hashable form of a list parameter (unhashable junk is left for validation)."""
    return tuple(value) if isinstance(value, list) else value


def _oneshot_capacity(spec: EngineSpec) -> int:
    """Runs of a oneshot engine at once: its `max_concurrency` (it has no instances)."""
    return spec.max_concurrency


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
