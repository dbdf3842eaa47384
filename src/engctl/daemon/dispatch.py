"""Sends requests: to a worker instance over its channel (`channel`), or to a oneshot engine as
a process of its own (`oneshot`). Where a request goes is decided before (`selection`, by the
router); how it ended goes back to the router (`Outcomes`).

Owns every worker channel and every oneshot run: opens a channel when a worker is spawned,
pings through it, fails what was in flight when it breaks or its process ends. Channels are
filed under the instance's `key` (its id, but for a rollout's second process of a slot).
Imports neither the router nor the failure policies.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from engctl.errors import EngctlError, RequestFailedError, UsageError
from engctl.states import InstanceState

from . import output, process
from .channel import WorkerChannel
from .instance import Instance
from .oneshot import OneshotRun, uses_argv
from .pipes import PipeBudget
from .process import ChildProcess
from .request import Request
from .selection import Candidate, CandidateKind, CandidatePool
from .server import Outbox
from .supervisor import Supervisor

S = InstanceState
# How long a worker whose protocol pipe closed may take to exit before it counts as a
# process that lives on without it (a crash closes the pipes a moment before the exit).
CHANNEL_GRACE = 0.25


class Outcomes(Protocol):
    """Where the end of each attempt goes (the router: accounting, the answer, a retry)."""

    def finished(
        self, req: Request, ok: bool, result: Any, error: EngctlError | None, blame: bool = True
    ) -> None:
        """One attempt ended; `blame` False: lost with its process, not failed by it."""

    def blame(self, inst: Instance, why: str) -> None:
        """An error of an instance outside any request."""


class Dispatcher:
    """Sends each request where the router placed it, and owns the means to: the worker
    channels and the oneshot runs."""

    def __init__(self, sup: Supervisor, pool: CandidatePool, outbox: Outbox) -> None:
        self.sup = sup
        self.pool = pool  # a broken channel's instance leaves it at once
        self.outbox = outbox
        self.pipe_budget = PipeBudget.of_this_user()
        self.loop = sup.loop
        self.channels: dict[str, WorkerChannel] = {}
        self.oneshot_runs: dict[Request, OneshotRun] = {}  # so shutdown can kill them
        self.protocol_errors = 0
        self.outcomes: Outcomes | None = None  # wired by the daemon (main.py)

    # -- sending ---------------------------------------------------------------------------
    def send(self, req: Request, cand: Candidate) -> None:
        """Send `req` to `cand`: over its worker channel, or as a oneshot run."""
        channel = self.channels.get(cand.id)
        if channel is not None and not channel.closed:
            channel.send(req)  # a worker instance: the hot path
            return
        if cand.kind is CandidateKind.ONESHOT:
            self._run_oneshot(req, cand)
            return
        lost = RequestFailedError(f"{cand.id} has no protocol channel")
        self.answered(req, False, None, lost)

    def _run_oneshot(self, req: Request, cand: Candidate) -> None:
        engine = self.sup.engines.get(cand.engine)
        if engine is None:
            gone = RequestFailedError(f"{cand.engine} is gone")
            self.loop.call_soon(self.answered, req, False, None, gone)
            return
        spec = engine.spec
        payload = json.loads(req.input_json)
        text = payload if isinstance(payload, str) else req.input_json.decode()
        if "\0" in text and uses_argv(spec):
            bad = UsageError(
                f"{spec.name}: the input holds a NUL byte, which its command's {{input}}"
                " argument cannot carry (an argv is NUL-terminated)"
            )
            self.loop.call_soon(self.answered, req, False, None, bad)
            return
        env = dict(os.environ)
        env.update(spec.env)
        env[process.DAEMON_ID_ENV] = self.sup.paths.daemon_id
        env[process.INSTANCE_ENV] = cand.id

        def done(ok: bool, result: Any, error: str) -> None:
            self.oneshot_runs.pop(req, None)
            err = None if ok else RequestFailedError(f"{spec.name}: {error}")
            self.answered(req, ok, result, err)

        # `done` never runs inside the constructor (a spawn error is reported on a later turn);
        # the run is killed at the request's deadline (`cancel`).
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

    def cancel(self, req: Request) -> bool:
        """Kill `req`'s oneshot run, if it has one (its deadline passed): True if it had."""
        run = self.oneshot_runs.pop(req, None)
        if run is None:
            return False
        run.kill()  # a oneshot's process group dies at the deadline: its slot is free
        return True

    # -- what channels report (ChannelOwner) -----------------------------------------------
    def answered(self, req: Request, ok: bool, result: Any, error: EngctlError | None) -> None:
        assert self.outcomes is not None
        self.outcomes.finished(req, ok, result, error)

    def instance_ready(self, inst: Instance, reason: str) -> None:
        self.sup.mark_ready(inst, reason)

    def protocol_error(self, inst: Instance, text: str) -> None:
        self.protocol_errors += 1
        if inst.state in (S.STARTING, S.WARMING):
            self.sup.warmup_problem(inst, text)

    def blame(self, inst: Instance, why: str) -> None:
        assert self.outcomes is not None
        self.outcomes.blame(inst, why)

    def channel_broken(self, channel: WorkerChannel, why: str) -> None:
        """The protocol pipe is gone: nothing in flight can be answered, nothing new can be
        sent. If the process lives on without it, it is a failed instance: restarted."""
        channel.close()
        inst = channel.inst
        if self.channels.get(inst.key) is not channel:
            return  # the pipe of a process already replaced
        if inst.key in self.pool:
            self.pool.remove(inst.key)  # no new requests
        # A process that ends closes its pipes a moment before its exit is seen: give the
        # exit time to fail the requests in flight with its own reason (exit code, signal).
        self.loop.call_later(CHANNEL_GRACE, self._without_channel, channel, why)

    def _without_channel(self, channel: WorkerChannel, why: str) -> None:
        inst, proc = channel.inst, channel.proc
        if self.channels.get(inst.key) is not channel:
            return  # its exit was handled meanwhile
        self.lose_pending(inst.key, f"{inst.id} {why}")
        if not proc.alive or inst.proc is not proc or inst.state in (S.STOPPING, S.STOPPED):
            return
        self.sup.fail_instance(
            inst,
            f"worker {why}: without its protocol pipe it cannot serve",
            cause="no protocol pipe",
            failed_start=inst.state in (S.STARTING, S.WARMING),
        )

    # -- channels of instances -------------------------------------------------------------
    def open_channel(self, inst: Instance, proc: ChildProcess) -> Callable[[bytes], None]:
        """A worker process started: its channel, replacing the old process's; returns the
        consumer of its stdout."""
        old = self.channels.pop(inst.key, None)
        if old is not None:
            old.close()
        channel = WorkerChannel(self, inst, proc)
        self.channels[inst.key] = channel
        return channel.feed

    def refile(self, inst: Instance, previous_key: str) -> None:
        """`inst`'s key changed (a rollout's swap): its channel follows."""
        channel = self.channels.get(previous_key)
        if channel is not None and channel.inst is inst:
            del self.channels[previous_key]
            self.channels[inst.key] = channel

    def lose_pending(self, key: str, why: str) -> None:
        """The process is gone: its requests in flight fail here (and may be retried), so
        none waits forever on an instance that will never answer. `key`: the instance's."""
        channel = self.channels.pop(key, None)
        if channel is None:
            return
        pending = list(channel.pending.values())
        channel.pending.clear()
        channel.close()
        assert self.outcomes is not None
        for req in pending:
            lost = RequestFailedError(f"{why} (request lost)")
            self.outcomes.finished(req, False, None, lost, blame=False)

    def ping_sender(self, inst: Instance) -> Callable[[Callable[[], None]], None] | None:
        """How to ping the instance's worker, or None when it has no open channel."""
        channel = self.channels.get(inst.key)
        if channel is None or channel.closed:
            return None
        return channel.ping

    def last_read(self, inst: Instance) -> float:
        """Loop time of the last bytes the instance's worker wrote (0 without a channel)."""
        channel = self.channels.get(inst.key)
        return channel.last_read if channel is not None else 0.0

    def stuck_requests(self, inst: Instance) -> int:
        """Requests of `inst` already answered with a timeout that it has not answered."""
        channel = self.channels.get(inst.key)
        if channel is None:
            return 0
        return sum(1 for r in channel.pending.values() if r.future.done)

    def unanswered_ages(self, inst: Instance) -> list[tuple[str, float]]:
        """(request id, seconds since it was sent) of every request `inst` has not answered,
        oldest first (timed-out ones included: their slots are still held)."""
        channel = self.channels.get(inst.key)
        if channel is None or not channel.pending:
            return []
        now = time.perf_counter()
        return [(r.id, now - r.sent_at) for r in channel.pending.values()]

    def close(self) -> list[Request]:
        """Kill every oneshot run and forget what channels wait for (daemon shutdown); returns
        those requests, for the router to fail."""
        waiting: list[Request] = []
        for channel in self.channels.values():
            waiting += channel.pending.values()
            channel.pending.clear()
        for req, run in list(self.oneshot_runs.items()):
            run.kill()  # no oneshot outlives the daemon
            waiting.append(req)
        self.oneshot_runs.clear()
        return waiting
