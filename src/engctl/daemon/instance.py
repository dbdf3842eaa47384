"""The runtime records of what the daemon supervises: an `Engine` (its spec, wish, generation,
instances and rollout), an `Instance` (one process slot, `name#k`, surviving restarts of its
process; during a rollout also a slot's successor or retiring process) and the `EngineIndex` by
type and label.

Records, not behaviour: the supervisor changes an instance's state, the failure policies
publish its health and eligibility here (their own state is the enforcer's), the router counts
its requests. Imports no other daemon module than the ones whose values it holds.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from engctl.models import EngineSpec, instance_id
from engctl.policy_config import PolicySpec, effective_policy
from engctl.states import (
    DesiredState,
    Eligibility,
    EngineMode,
    Health,
    InstanceRole,
    InstanceState,
)

from .backoff import CrashTracker
from .logs import InstanceLog
from .monitor import Sample
from .process import ChildProcess
from .registry import Entry
from .stats import RequestStats

if TYPE_CHECKING:
    from engctl.documents import (
        EngineStatus,
        InstanceStatus,
        LastExit,
        LeaseDoc,
        RolloutDoc,
        ScaleDecision,
        ScaleStatus,
    )

S = InstanceState
_K = TypeVar("_K")
Clock = Callable[[], float]
# Tells the records of one slot apart (a successor or a retiring process shares its id).
_SERIALS = itertools.count(1)


class RolloutRecord(Protocol):
    """What an engine shows of its rollout (`rollout.Rollout`): under way or how it ended."""

    @property
    def running(self) -> bool: ...

    def to_json(self) -> RolloutDoc: ...


@dataclass(eq=False)
class Lease:
    """Exclusive use of one instance by a holder until `expires_at` (renewable); kept by the
    daemon's memory only, so a restart ends every lease."""

    id: str
    holder: str
    instance: str
    engine: str
    ttl: float
    acquired_at: float  # wall-clock
    expires_at: float  # wall-clock, for display; the timer runs on the loop's clock
    held: bool = True  # False while the instance it waits for starts (not yet handed out)

    def to_json(self) -> LeaseDoc:
        return {
            "lease": self.id,
            "holder": self.holder,
            "engine": self.engine,
            "instance": self.instance,
            "ttl": self.ttl,
            "acquired_at": self.acquired_at,
            "expires_at": self.expires_at,
        }


class Instance:
    """One process slot of an engine, `name#index`; survives restarts of its process.

    During a rollout a slot may have a second record for a moment: its successor (a new
    process warming up, not in dispatch) and, once that took the slot, the retiring one
    (draining, then stopped). Both share the slot's `id`; `key` tells them apart wherever
    the daemon files a process (channels, drains, the monitor)."""

    # Slots, not a dict: its ~45 attributes took a dict of 1.5 KiB in every instance (past
    # the 30 keys a shared-key dict holds), and what a daemon of 200 instances holds at its
    # peak stays its RSS (CPython keeps an arena for life while one object lives in it).
    __slots__ = (
        "_clock",
        "_role",
        "_state_mono",
        "_state_time",
        "crashes",
        "draining",
        "effective_weight",
        "eligibility",
        "eligibility_reason",
        "engine",
        "failed_start",
        "failure",
        "gated",
        "generation",
        "health",
        "health_reason",
        "id",
        "index",
        "isolated_until",
        "isolations",
        "isolations_total",
        "key",
        "kill_cause",
        "last_exit",
        "launch_mono",
        "launch_token",
        "launching",
        "lease",
        "log",
        "proc",
        "ready_seen",
        "removed",
        "restarting",
        "restarts",
        "sample",
        "serial",
        "spawn_retries",
        "spec",
        "state",
        "state_reason",
        "state_since",
        "stats",
        "timer",
        "warmup_note",
    )

    def __init__(
        self,
        engine: Engine,
        index: int,
        log_file: InstanceLog,
        clock: Clock = time.monotonic,
        role: InstanceRole = InstanceRole.CURRENT,
    ) -> None:
        self.engine = engine
        self.index = index
        self.id = instance_id(engine.spec.name, index)
        self.serial = next(_SERIALS)
        self.key = self.id
        self.role = role
        # The spec of its generation: what its process runs (its command, env, …) with the
        # engine's current in-place settings; a restart keeps it, a rollout replaces it.
        self.spec = engine.spec
        self.generation = engine.generation
        # A rollout waits for this process to be ready: its health check runs at once.
        self.gated = False
        # -- lifecycle (the supervisor's) --
        self.state = S.STOPPED
        self.state_reason = "registered"
        self.state_since = time.time()
        self._clock = clock
        self._state_mono = clock()
        self._state_time: dict[str, float] = {}
        self.proc: ChildProcess | None = None
        # A process is being launched (off the loop): `proc` is still the last one, if any.
        self.launching = False
        self.launch_mono = 0.0  # when the latest start began (time.monotonic)
        self.launch_token = ""  # its process's ENGCTL_LAUNCH: whose orphans a sweep takes
        self.restarts = 0
        self.crashes = CrashTracker()  # the restart backoff's count (see `backoff`)
        self.last_exit: LastExit | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.removed = False
        self.ready_seen = False  # the worker announced `ready` before start_seconds passed
        # A drain is under way (then a stop); `restarting`: and a start after it, so requests
        # for it wait instead of failing.
        self.draining = False
        self.restarting = False
        self.kill_cause = ""  # why the daemon killed the process (hang), for the exit record
        self.spawn_retries = 0  # spawns in a row that failed for lack of fds or processes
        # Set when the daemon ends a process it judged failed (no answer during warm-up, no
        # stdout): its exit is then handled as a crash with this reason.
        self.failure = ""
        self.failed_start = False  # ... and counts as a failed start (towards max_retries)
        self.warmup_note = ""  # the last protocol error seen while warming up
        # -- observations: the monitor's latest reading, the router's request counts --
        self.sample = Sample()
        self.log = log_file
        self.stats = RequestStats()
        # -- the failure policies' verdict, published by the enforcer (status, dispatch) --
        self.health = Health.UNKNOWN
        self.health_reason = ""
        # A new slot has no process: unavailable, as the enforcer says of any instance that is
        # not ready (until its first look, which may come a policy tick later).
        self.eligibility = Eligibility.UNAVAILABLE
        self.eligibility_reason = f"{self.state.value}: {self.state_reason}"
        self.effective_weight = engine.spec.weight
        self.isolated_until: float | None = None  # wall-clock time
        self.isolations = 0  # isolations that still count toward the next one's length
        self.isolations_total = 0  # by policy or by hand, since the daemon started
        # -- a lease that holds it (leases): no request but the lease's may be placed here --
        self.lease: Lease | None = None

    @property
    def role(self) -> InstanceRole:
        """Which record of its slot it is: the current process, a successor or a retiring one."""
        return self._role

    @role.setter
    def role(self, role: InstanceRole) -> None:
        self._role = role
        # Its id while it holds the slot; a successor's or a retiring process's own key. Kept
        # as a plain attribute: the monitor's and the policies' lookups read it every tick.
        self.key = self.id if role is InstanceRole.CURRENT else f"{self.id}/{self.serial}"

    def follow(self, spec: EngineSpec) -> None:
        """The engine's spec changed: take its settings; one of an older generation keeps
        the process it runs (command, env, cwd, shell, mode) until a rollout replaces it."""
        current = self.generation == self.engine.generation
        self.spec = spec if current else spec.with_process_of(self.spec)

    def adopt_wanted(self) -> None:
        """Run the engine's wanted spec and generation from its next start on."""
        self.spec = self.engine.spec
        self.generation = self.engine.generation

    @property
    def pid(self) -> int | None:
        proc = self.proc  # read for every instance on every tick: no property on the way
        return proc.pid if proc is not None and proc.exit_status is None else None

    def state_seconds(self) -> dict[str, float]:
        """Seconds spent in each state since the daemon started, the current one included."""
        out = dict(self._state_time)
        cur = self.state.value
        out[cur] = out.get(cur, 0.0) + (self._clock() - self._state_mono)
        return out

    def entered(self, old: InstanceState) -> None:
        """The instance left `old` now (the supervisor's transition): its time is counted."""
        now = self._clock()
        self._state_time[old.value] = self._state_time.get(old.value, 0.0) + (
            now - self._state_mono
        )
        self._state_mono = now

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    @property
    def shown_state(self) -> InstanceState:
        """The state `status` shows: `busy` is `ready` with every slot taken (derived from the
        in-flight count, never entered: no transition or event per request)."""
        if self.state is S.READY and self.stats.in_flight >= self.spec.max_concurrency:
            return S.BUSY
        return self.state

    def to_json(self) -> InstanceStatus:
        """The documented per-instance object of `status --json`."""
        running = self.proc is not None and self.proc.alive
        # Until the monitor's first reading of this process its figures are unknown, not 0.
        sampled = running and self.sample.pid == self.pid
        return {
            "id": self.id,
            "role": self.role.value,
            "generation": self.generation,
            "pid": self.pid,
            "state": self.shown_state.value,
            "state_reason": self.state_reason,
            "state_since": self.state_since,
            "health": self.health.value,
            "health_reason": self.health_reason,
            "eligibility": self.eligibility.value,
            "eligibility_reason": self.eligibility_reason,
            "isolated_until": self.isolated_until,
            "weight": self.spec.weight,
            "effective_weight": round(self.effective_weight, 4),
            "isolations": self.isolations,
            "restarts": self.restarts,
            "uptime_s": round(time.monotonic() - self.proc.started_mono, 3)
            if running and self.proc
            else None,
            "cpu_percent": round(self.sample.cpu_percent, 1) if sampled else None,
            "rss_bytes": self.sample.rss_bytes if sampled else None,
            "threads": self.sample.threads if sampled else None,
            "fds": self.sample.fds if sampled else None,
            "last_exit": self.last_exit,
            "requests": self.stats.to_json(),
            "lease": self.lease.to_json() if self.lease is not None and self.lease.held else None,
        }


class Engine:
    """A registered engine's runtime side: its current spec and instances."""

    def __init__(
        self,
        spec: EngineSpec,
        desired: DesiredState,
        registered_at: float | None = None,
        generation: int = 1,
    ) -> None:
        self.spec = spec
        self.desired = desired
        # The wanted generation: bumped by every change that needs new processes and by each
        # `reload`; an instance runs the spec of its own (`Instance.generation`).
        self.generation = generation
        # First registration (kept across updates and daemon restarts); unknown in a registry
        # written before it was recorded: then the first daemon to load it records its time.
        self.registered_at = time.time() if registered_at is None else registered_at
        # Indices stopped by hand: `start ENGINE` of the whole engine leaves them alone
        # only if they were named; persisted with the registry.
        self.stopped_instances: set[int] = set()
        self.instances: list[Instance] = []
        # A rollout's extra processes: successors warming up, retiring ones draining.
        self.surge: list[Instance] = []
        # The last rollout (under way, finished or failed); None before the first.
        self.rollout: RolloutRecord | None = None
        self.lock = asyncio.Lock()
        self.stats = RequestStats()  # requests of a oneshot engine (it has no instances)
        self.oneshot_log: InstanceLog | None = None  # stderr of a oneshot engine's runs
        self._policy: tuple[EngineSpec, Any, PolicySpec] | None = None
        # -- autoscaling (engines with [scale]; the scaler's) --
        self.last_scaling: ScaleDecision | None = None  # the last decision, for `status`
        self.prewarm: tuple[int, float | None] | None = None  # floor, until (wall-clock)
        self.predicted: tuple[int, str] | None = None  # the predictor's floor and reason

    @property
    def wanted(self) -> int:
        """The instances it should have: the spec's count, or the autoscaler's (its slots)."""
        if not self.spec.mode.long_running:
            return 0
        return len(self.instances) if self.spec.scale is not None else self.spec.instances

    @property
    def rolling_out(self) -> bool:
        """Whether a rollout is under way (the autoscaler and the other callers check)."""
        return self.rollout is not None and self.rollout.running

    def records(self) -> list[Instance]:
        """Every instance record: the slots' current ones, then a rollout's extra ones."""
        return [*self.instances, *self.surge] if self.surge else self.instances

    def set_spec(self, spec: EngineSpec, generation: int | None = None) -> None:
        """Make `spec` the wanted spec (and `generation` the wanted generation): every
        record takes its settings (`Instance.follow`)."""
        self.spec = spec
        if generation is not None:
            self.generation = generation
        for inst in self.records():
            inst.follow(spec)

    def policy(self, daemon_policy: Any) -> PolicySpec:
        """The effective failure policy (defaults < daemon config < this engine)."""
        cached = self._policy
        if cached is None or cached[0] is not self.spec or cached[1] is not daemon_policy:
            merged = effective_policy(daemon_policy, self.spec.policy)[0]
            cached = self._policy = (self.spec, daemon_policy, merged)
        return cached[2]

    def to_entry(self, overrides: Mapping[int, dict[str, Any]]) -> Entry:
        """The registry entry, with the manual overrides of its instances (by index)."""
        stopped = set(self.stopped_instances)
        return Entry(
            self.spec, self.desired, stopped, dict(overrides), self.registered_at, self.generation
        )

    def to_json(self) -> EngineStatus:
        """The documented per-engine object of `status --json`."""
        out: EngineStatus = {
            "name": self.spec.name,
            "type": self.spec.type,
            "mode": self.spec.mode.value,
            "desired": self.desired.value,
            "instances_wanted": self.wanted,
            "instances": [i.to_json() for i in self.instances],
            "generation": self.generation,
            "surge": [i.to_json() for i in self.surge],
            "rollout": None if self.rollout is None else self.rollout.to_json(),
        }
        if self.spec.mode is EngineMode.ONESHOT:
            out["requests"] = self.stats.to_json()
            out["max_concurrency"] = self.spec.max_concurrency
        if self.spec.scale is not None:
            out["scale"] = self.scale_json()
        return out

    def scale_json(self) -> ScaleStatus:
        """An autoscaled engine's settings, its instances by use, and the last decision."""
        scale = self.spec.scale
        assert scale is not None
        ready = [i for i in self.instances if i.state is S.READY]
        leased = sum(1 for i in ready if i.lease is not None)
        busy = sum(1 for i in ready if i.lease is None and i.stats.in_flight > 0)
        prewarm = self.prewarm
        return {
            "min": scale.min,
            "max": scale.max,
            "min_idle": scale.min_idle,
            "target": scale.target,
            "idle_timeout": scale.idle_timeout,
            "predict": scale.predict,
            "wanted": len(self.instances),
            "ready": len(ready),
            "busy": busy,
            "idle": len(ready) - busy - leased,
            "leased": leased,
            "prewarm": None if prewarm is None else {"instances": prewarm[0], "until": prewarm[1]},
            "predicted": None
            if self.predicted is None
            else {"instances": self.predicted[0], "reason": self.predicted[1]},
            "last_decision": self.last_scaling,
        }


class EngineIndex:
    """Engine names by type and by label (seed 003's registry indexes): `list` and `status`
    filters look up instead of scanning the registry."""

    def __init__(self) -> None:
        self._by_type: dict[str, set[str]] = {}
        self._by_label: dict[tuple[str, str], set[str]] = {}

    def add(self, spec: EngineSpec) -> None:
        self._by_type.setdefault(spec.type, set()).add(spec.name)
        for pair in spec.labels.items():
            self._by_label.setdefault(pair, set()).add(spec.name)

    def remove(self, spec: EngineSpec) -> None:
        _discard(self._by_type, spec.type, spec.name)
        for pair in spec.labels.items():
            _discard(self._by_label, pair, spec.name)

    def replace(self, old: EngineSpec, new: EngineSpec) -> None:
        self.remove(old)
        self.add(new)

    def find(self, type: str | None, labels: list[tuple[str, str]]) -> set[str] | None:
        """Names of the engines of `type` with every label in `labels`; None: no filter."""
        found: set[str] | None = None
        if type is not None:
            found = set(self._by_type.get(type, ()))
        for pair in labels:
            names = self._by_label.get(pair, set())
            found = set(names) if found is None else found & names
        return found


def _discard(index: dict[_K, set[str]], key: _K, name: str) -> None:
    names = index.get(key)
    if names is not None:
        names.discard(name)
        if not names:
            del index[key]
